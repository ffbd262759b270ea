"""The deviation estimate (docs/model.md#deviation-estimate): who serves each Top-K slot, and the layer's deviation.

For an executed set A, Top-K slot i (expert S_i, weight w_i) is served by phi(i): S_i itself if executed,
else the executed j minimising D_l(S_i, j), or skip if D_l(S_i, skip) is smaller. The estimate is
Delta_l = sum_i w_i * D_l(S_i, phi(i)) [paper, reconstructed by the triangle inequality]: with the
calibration-mean tables D it estimates the layer's output deviation, it does not bound it per token.
Functions take any leading axes (a batch, or none for one episode).
"""

from __future__ import annotations

import numpy as np

from wide_env import rules


def slot_deviation_table(mismatch: np.ndarray, layer, topk_idx: np.ndarray, topk_weight: np.ndarray) -> np.ndarray:
    """Weighted per-slot table T[..., k, j] = w_k * D_l(S_k, j), column E = skip.
    mismatch (L, E, E+1); layer lead-shaped ints; topk_idx, topk_weight lead + (K,) -> lead + (K, E+1)."""
    return rules.slot_table_batch(mismatch, layer, topk_idx, topk_weight)  # the rule's one product per entry


def serve_slots(table: np.ndarray, executed: np.ndarray):
    """Best stand-in per slot (the serve rule, :func:`wide_env.rules.serve_slots`): table lead + (K, E+1),
    executed lead + (E,) bool. Returns (deviation lead, server lead + (K,)) with server = expert index, or E for
    skip; ties prefer the lowest index, so an executed Top-K expert (cost 0) is reported as kept."""
    return rules.serve_slots_batch(table, executed)


def deviation_estimate(table: np.ndarray, executed: np.ndarray) -> np.ndarray:
    """Delta for executed sets given weighted slot tables (see :func:`serve_slots`)."""
    return serve_slots(table, executed)[0]
