"""The deviation bound of spec section 4: who serves each Top-K slot, and the layer's output deviation.

For an executed set A, Top-K slot i (expert S_i, weight w_i) is served by phi(i): S_i itself if executed,
else the executed j minimising D_l(S_i, j), or skip if D_l(S_i, skip) is smaller. The bound is
Delta_l = sum_i w_i * D_l(S_i, phi(i)) [paper, reconstructed by the triangle inequality].
Functions take any leading axes (a batch, or none for one episode).
"""

from __future__ import annotations

import functools

import numpy as np


def slot_deviation_table(mismatch: np.ndarray, layer, topk_idx: np.ndarray, topk_weight: np.ndarray) -> np.ndarray:
    """Weighted per-slot table T[..., k, j] = w_k * D_l(S_k, j), column E = skip.
    mismatch (L, E, E+1); layer lead-shaped ints; topk_idx, topk_weight lead + (K,) -> lead + (K, E+1)."""
    n_experts = mismatch.shape[1]
    # one take over the (L*E, E+1) rows is about twice as fast as a broadcast fancy index
    rows = np.asarray(layer)[..., None] * n_experts + topk_idx
    return np.take(mismatch.reshape(-1, n_experts + 1), rows, axis=0) * topk_weight[..., None]


def serve_slots(table: np.ndarray, executed: np.ndarray):
    """Best stand-in per slot: table lead + (K, E+1), executed lead + (E,) bool.

    Returns (deviation lead, server lead + (K,)) with server = expert index, or E for skip. Ties prefer
    the lowest index, so an executed Top-K expert (cost 0) is reported as kept, never as skipped.
    """
    allowed = np.concatenate([executed, np.ones(executed.shape[:-1] + (1,), dtype=bool)], axis=-1)
    masked = np.where(allowed[..., None, :], table, np.inf)
    server = masked.argmin(axis=-1)
    # gather the minima through the argmin (a flat take is several times cheaper than a second reduction)
    cost = np.take(masked, _row_starts(server.size, masked.shape[-1]) + server.reshape(-1)).reshape(server.shape)
    return cost.sum(axis=-1), server


@functools.lru_cache(maxsize=16)
def _row_starts(rows: int, width: int) -> np.ndarray:
    """Flat offsets of the rows of a (rows, width) array (read-only, cached: a step reuses them)."""
    starts = np.arange(rows) * width
    starts.flags.writeable = False
    return starts


def deviation_bound(table: np.ndarray, executed: np.ndarray) -> np.ndarray:
    """Delta for executed sets given weighted slot tables (see :func:`serve_slots`)."""
    return serve_slots(table, executed)[0]
