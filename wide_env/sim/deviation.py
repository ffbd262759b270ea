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
    n_experts = executed.shape[-1]
    # +inf on experts not executed, 0 on executed ones and on skip: adding it masks the table (cheaper
    # than a broadcast np.where); allowed entries keep their exact values, so ties resolve as before
    penalty = np.zeros(executed.shape[:-1] + (n_experts + 1,))
    penalty[..., :n_experts] = np.take(_NOT_EXECUTED_PENALTY, executed.view(np.uint8))
    masked = table + penalty[..., None, :]
    server = masked.argmin(axis=-1)
    # gather the minima through the argmin (a flat take is several times cheaper than a second reduction),
    # and add the K slots with a product (numpy's reductions over a short last axis are slow)
    cost = np.take(masked, _row_starts(server.size, masked.shape[-1]) + server.reshape(-1)).reshape(server.shape)
    return cost @ _ones(server.shape[-1]), server


_NOT_EXECUTED_PENALTY = np.array([np.inf, 0.0])  # indexed by executed (0/1)
_NOT_EXECUTED_PENALTY.flags.writeable = False


@functools.lru_cache(maxsize=16)
def _ones(n: int) -> np.ndarray:
    ones = np.ones(n)
    ones.flags.writeable = False
    return ones


@functools.lru_cache(maxsize=16)
def _row_starts(rows: int, width: int) -> np.ndarray:
    """Flat offsets of the rows of a (rows, width) array (read-only, cached: a step reuses them)."""
    starts = np.arange(rows) * width
    starts.flags.writeable = False
    return starts


def deviation_bound(table: np.ndarray, executed: np.ndarray) -> np.ndarray:
    """Delta for executed sets given weighted slot tables (see :func:`serve_slots`)."""
    return serve_slots(table, executed)[0]
