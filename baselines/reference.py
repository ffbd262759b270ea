"""Brute-force reference solvers (exponential; for tests and benchmarks only).

Deliberately written independently of the fast solvers: they enumerate every executed mask
(``2^E``) or every slot assignment (``(E + 1)^K``) and apply the definitions literally.
"""
from __future__ import annotations

import numpy as np

__all__ = ["all_masks", "brute_force_decode", "brute_force_decode_batch", "assignment_decode", "brute_force_des",
           "brute_force_best", "brute_force_span"]


def all_masks(E: int) -> np.ndarray:
    """(2^E, E) bool array of every subset of E experts (bit e of the row index = expert e)."""
    idx = np.arange(2 ** E, dtype=np.int64)[:, None]
    return ((idx >> np.arange(E)) & 1).astype(bool)


def _masks_energy(masks, energy):
    # summed energy per mask; infeasible experts masked out by the caller
    return np.where(masks, energy[None, :], 0.0).sum(axis=1)


def _masks_deviation(masks, dev):
    K, E1 = dev.shape
    E = E1 - 1
    total = np.zeros(masks.shape[0])
    for k in range(K):
        served = np.where(masks, dev[k, :E][None, :], np.inf).min(axis=1)
        total = total + np.minimum(served, dev[k, E])
    return total


def brute_force_best(obj_energy, quality, allowed, need, rtol=1e-9):
    """Pick the min-energy row among ``allowed`` rows whose ``quality <= need`` (within rtol), ties by
    quality; if none qualifies, the rows with the least quality (within rtol) and among them the least
    energy.  Returns (index, met)."""
    tol = lambda x: x + rtol * max(1.0, abs(x)) if np.isfinite(x) else x
    ok = allowed & (quality <= tol(need))
    met = bool(ok.any())
    if not met:
        qmin = quality[allowed].min()
        ok = allowed & (quality <= tol(qmin))
    cand = np.flatnonzero(ok)
    emin = obj_energy[cand].min()
    return cand, emin, met


def brute_force_decode(energy, feasible, deviation_table, budget, rtol=1e-9):
    """Enumerate all 2^E masks of one instance (energy (E,), feasible (E,), table (K, E+1), budget).

    Returns (best_energy, best_deviation_among_min_energy, budget_met, masks_with_that_optimum).
    """
    energy = np.asarray(energy, dtype=np.float64)
    feasible = np.asarray(feasible, dtype=bool)
    dev = np.asarray(deviation_table, dtype=np.float64)
    E = energy.shape[0]
    masks = all_masks(E)
    allowed = ~(masks & ~feasible[None, :]).any(axis=1)
    en = _masks_energy(masks, np.where(feasible, energy, 0.0))
    dv = _masks_deviation(masks, dev)
    cand, emin, met = brute_force_best(en, dv, allowed, float(budget), rtol)
    etol = 1e-9 * max(1.0, abs(emin))
    cand = cand[en[cand] <= emin + etol]
    dbest = dv[cand].min()
    return emin, dbest, met, masks[cand]


def assignment_decode(energy, feasible, deviation_table, budget, rtol=1e-9):
    """Reference for large E: enumerate every slot -> {expert, skip} assignment ((E+1)^K of them,
    vectorised); the executed set is the set of assigned experts and Delta is taken for the *set*.
    Returns (best_energy, budget_met)."""
    energy = np.asarray(energy, dtype=np.float64)
    feasible = np.asarray(feasible, dtype=bool)
    dev = np.asarray(deviation_table, dtype=np.float64)
    K, E1 = dev.shape
    E = E1 - 1
    opts = np.arange(E + 1)
    grids = np.stack(np.meshgrid(*([opts] * K), indexing="ij"), axis=-1).reshape(-1, K)  # (M, K)
    ok_feas = np.ones(grids.shape[0], dtype=bool)
    for k in range(K):
        ok_feas &= (grids[:, k] == E) | feasible[np.minimum(grids[:, k], E - 1)]
    # energy of distinct experts: add energy of column k unless it repeats an earlier column
    eg = np.concatenate([np.where(feasible, energy, 0.0), [0.0]])
    en = np.zeros(grids.shape[0])
    for k in range(K):
        dup = np.zeros(grids.shape[0], dtype=bool)
        for k2 in range(k):
            dup |= grids[:, k2] == grids[:, k]
        en = en + np.where(dup, 0.0, eg[grids[:, k]])
    # Delta of the set: per slot, min over the assigned experts and skip
    dv = np.zeros(grids.shape[0])
    for k in range(K):
        best = np.full(grids.shape[0], dev[k, E])
        for k2 in range(K):
            best = np.minimum(best, dev[k, grids[:, k2]])
        dv = dv + best
    cand, emin, met = brute_force_best(en, dv, ok_feas, float(budget), rtol)
    return emin, met


def brute_force_des(energy, feasible, gate_probs, gamma, max_experts, rtol=1e-9):
    """Enumerate all 2^E masks for DES: min energy s.t. mass >= gamma and |A| <= max_experts.
    If no set reaches gamma: the max-mass sets, least energy.  Returns (best_energy, best_mass, met)."""
    energy = np.asarray(energy, dtype=np.float64)
    feasible = np.asarray(feasible, dtype=bool)
    p = np.asarray(gate_probs, dtype=np.float64)
    masks = all_masks(energy.shape[0])
    allowed = ~(masks & ~feasible[None, :]).any(axis=1) & (masks.sum(axis=1) <= max_experts)
    en = _masks_energy(masks, np.where(feasible, energy, 0.0))
    mass = np.where(masks, p[None, :], 0.0).sum(axis=1)
    cand, emin, met = brute_force_best(en, -mass, allowed, -float(gamma), rtol)
    etol = 1e-9 * max(1.0, abs(emin))
    cand = cand[en[cand] <= emin + etol]
    return emin, mass[cand].max(), met


def brute_force_decode_batch(energy, feasible, deviation_table, budget, rtol=1e-9, masks=None):
    """Batched 2^E brute force (small E): returns (best_energy (B,), budget_met (B,)).

    ``masks`` may be a subset of :func:`all_masks` rows (used to time a slice of a 2^E enumeration
    that is too large to run in full); the answer is then the optimum over that slice only.
    """
    energy = np.asarray(energy, dtype=np.float64)
    feasible = np.asarray(feasible, dtype=bool)
    dev = np.asarray(deviation_table, dtype=np.float64)
    B, E = energy.shape
    K = dev.shape[1]
    masks = all_masks(E) if masks is None else masks
    allowed = ~(masks[None, :, :] & ~feasible[:, None, :]).any(axis=2)             # (B, M)
    en = masks.astype(np.float64) @ np.where(feasible, energy, 0.0).T               # (M, B)
    en = en.T
    dv = np.zeros(allowed.shape)
    for k in range(K):
        served = np.where(masks[None, :, :], dev[:, None, k, :E], np.inf).min(axis=2)
        dv = dv + np.minimum(served, dev[:, None, k, E])
    budget = np.broadcast_to(np.asarray(budget, dtype=np.float64), (B,))
    tol = budget + rtol * np.maximum(1.0, np.abs(budget))
    ok = allowed & (dv <= tol[:, None])
    met = ok.any(axis=1)
    dmin = np.where(allowed, dv, np.inf).min(axis=1)
    ok_fallback = allowed & (dv <= (dmin + rtol * np.maximum(1.0, np.abs(dmin)))[:, None])
    ok = np.where(met[:, None], ok, ok_fallback)
    return np.where(ok, en, np.inf).min(axis=1), met


def brute_force_span(energy, usable, deviation_table, budget, used=0.0, violation_rtol=1e-9):
    """Enumerate every combination of executed masks (all 2^E per decision, (2^E)^T in all) of a span of T
    decisions in step order: energy (T, E), usable (T, E) bool (an unusable executed expert spends its energy
    and serves nothing), deviation_table (T, K, E+1), the span's budget and what it spent before.

    The env's rules, literally: a decision's deviation is the sum over slots (in order) of the least of skip
    and its executed usable experts; the running total starts at ``used``; decision t is violated iff
    max(Delta_t - max(budget - S_{t-1}, 0), 0) > violation_rtol * budget. Returns (budget_met, least energy
    over the plans without a violation - or, if there is none, over the plans of least total deviation -,
    the least total deviation among those plans)."""
    energy = np.asarray(energy, dtype=np.float64)
    usable = np.asarray(usable, dtype=bool)
    dev = np.asarray(deviation_table, dtype=np.float64)
    T, E = energy.shape
    masks = all_masks(E)
    M = masks.shape[0]
    step_dev = np.stack([_masks_deviation(masks & usable[t], dev[t]) for t in range(T)])  # (T, M)
    step_energy = np.stack([_masks_energy(masks, energy[t]) for t in range(T)])
    combos = np.stack(np.meshgrid(*([np.arange(M)] * T), indexing="ij"), axis=-1).reshape(-1, T)
    spent = np.full(combos.shape[0], float(used))
    total = np.zeros(combos.shape[0])
    violated = np.zeros(combos.shape[0], dtype=bool)
    for t in range(T):
        d = step_dev[t, combos[:, t]]
        violated |= np.maximum(d - np.maximum(budget - spent, 0.0), 0.0) > violation_rtol * budget
        spent = spent + d
        total = total + step_energy[t, combos[:, t]]
    met = bool((~violated).any())
    ok = ~violated if met else spent <= spent.min()
    least = total[ok].min()
    best = ok & (total <= least * (1 + 1e-12))
    return met, least, spent[best].min()
