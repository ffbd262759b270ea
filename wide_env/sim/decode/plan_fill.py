"""Compiled passes over a plan's per-(token, layer, episode) entries: the Top-K energy and the planned per-expert
observation keys (which depend on the Top-K set and the costs), and the plan's finiteness check. One pass over the
plan's step-major arrays instead of numpy's broadcast copies, gathers and temporaries (each as large as the plan);
the arithmetic is numpy's, operation for operation (same order, IEEE double, cast to float32 on store), so the
values are bit for bit the numpy reference's (:func:`wide_env.sim.physics.topk_reference`,
:func:`wide_env.sim.decode.plan.observed_energy_cost`).
"""

from __future__ import annotations

import numpy as np
from numba import njit

_JIT = dict(cache=True, nogil=True, error_model="numpy")


@njit(**_JIT)
def topk_energy_into(energy, topk_idx, out):
    """out[c, l, b] = the energy (C, Lc, n, E) of the Top-K set topk_idx (C, L, n, K), summed in slot order (Lc is
    1 or L: one cost table for every layer, or one per layer)."""
    C, L, n, K = topk_idx.shape
    per_layer = energy.shape[1] > 1
    for c in range(C):
        for l in range(L):
            lc = l if per_layer else 0
            for b in range(n):
                total = energy[c, lc, b, topk_idx[c, l, b, 0]]
                for k in range(1, K):
                    total += energy[c, lc, b, topk_idx[c, l, b, k]]
                out[c, l, b] = total


@njit(**_JIT)
def expert_keys_into(energy, reference, knowable, deadline_s, max_energy_cost, max_latency_ratio, out):
    """The planned per-expert observation keys (EXPERT_KEYS order) into out (C, L, n, 3, E) float32: the energy
    (C, Lc, n, E) over the reward's reference (C, L, n) and the idle latency over the deadline, each clipped to its
    box, and P(meeting the deadline), from knowable (C, Lc, n, 2, E) = [idle latency, P(meet)]."""
    C, L, n = reference.shape
    E = energy.shape[3]
    per_layer_cost, Lk = energy.shape[1] > 1, knowable.shape[1]
    known = np.empty((Lk, n, 2, E), dtype=np.float32)  # one token's latency and P(meet) keys, once per Lk layer
    for c in range(C):
        for lk in range(Lk):
            for b in range(n):
                for e in range(E):
                    ratio = knowable[c, lk, b, 0, e] / deadline_s
                    known[lk, b, 0, e] = ratio if ratio < max_latency_ratio else max_latency_ratio
                    known[lk, b, 1, e] = knowable[c, lk, b, 1, e]
        for l in range(L):
            lc = l if per_layer_cost else 0
            lk = l if Lk > 1 else 0
            for b in range(n):
                ref = reference[c, l, b]
                for e in range(E):
                    cost = energy[c, lc, b, e] / ref
                    out[c, l, b, 0, e] = cost if cost < max_energy_cost else max_energy_cost
                    out[c, l, b, 1, e] = known[lk, b, 0, e]
                    out[c, l, b, 2, e] = known[lk, b, 1, e]


@njit(**_JIT)
def all_finite(values):
    """Whether every entry of values (1-D float64) is finite (no NaN, no inf): numpy's isfinite(values).all()."""
    for x in values:
        if not np.isfinite(x):
            return False
    return True


@njit(**_JIT)
def all_finite3(a, b, c):
    """all_finite of three 1-D float64 arrays in one call."""
    return all_finite(a) and all_finite(b) and all_finite(c)
