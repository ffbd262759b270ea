"""The deviation estimate (docs/model.md#deviation-estimate): who serves each Top-K slot, and the layer's deviation.

For an executed set A, Top-K slot i (expert S_i, weight w_i) is served by phi(i): S_i itself if executed,
else the executed j minimising D_l(S_i, j), or skip if D_l(S_i, skip) is smaller. The estimate is
Delta_l = sum_i w_i * D_l(S_i, phi(i)) [paper, reconstructed by the triangle inequality]: with the
calibration-mean tables D it estimates the layer's output deviation, it does not bound it per token.
Functions take any leading axes (a batch, or none for one episode).
"""

from __future__ import annotations

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
    executed = np.asarray(executed, dtype=bool)
    lead, (K, width) = executed.shape[:-1], table.shape[-2:]
    flat_table = np.broadcast_to(table, lead + (K, width)).reshape((-1, K, width))
    cost, server = serve_slots_batch_last(flat_table.transpose(1, 2, 0), executed.reshape(-1, width - 1).T)
    return cost.reshape(lead), server.T.reshape(lead + (K,))


def serve_slots_batch_last(table: np.ndarray, executed: np.ndarray):
    """:func:`serve_slots` with the batch on the LAST axis: table (K, E+1, B), executed (E, B) bool.
    Returns (deviation (B,), server (K, B)). Reductions over experts and slots then run along a leading
    axis, which numpy vectorises over the batch (a short last axis costs a loop per row)."""
    n_experts = executed.shape[0]
    allowed = np.empty((n_experts + 1,) + executed.shape[1:], dtype=bool)
    allowed[:n_experts] = executed
    allowed[n_experts] = True  # skipping is always possible
    masked = np.where(allowed, table, np.inf)  # C order whatever the table's layout: the reductions want it
    server = masked.argmin(axis=1)
    return masked.min(axis=1).sum(axis=0), server  # slots summed in order, as the single-episode path does


def budget_overrun(weighted_deviation, available, unit):
    """The reward's budget terms (docs/model.md#reward): (violated, overrun) with violated = the deviation exceeds
    the available budget by more than 1e-9 units and overrun = violated * (1 + excess / unit), the factor
    the deviation weight multiplies. Elementwise; ``available`` >= 0 (a spent token budget counts as 0)."""
    excess = np.maximum(weighted_deviation - available, 0.0)
    violated = excess > 1e-9 * unit
    return violated, violated * (1.0 + excess / unit)


def deviation_estimate(table: np.ndarray, executed: np.ndarray) -> np.ndarray:
    """Delta for executed sets given weighted slot tables (see :func:`serve_slots`)."""
    return serve_slots(table, executed)[0]
