"""Exact SiftMoE decoding solver (arXiv 2603.23888, slow-fading decoding case), batched.

Problem (one row ``b`` of the batch; ``K`` Top-K slots, ``E`` experts)::

    minimise    sum_{j in A} energy[j]
    subject to  A subset of {j : feasible[j]}
                Delta(A) = sum_k min(dev[k, E], min_{j in A} dev[k, j]) <= budget

``dev = deviation_table[b]`` has shape (K, E + 1): ``dev[k, j]`` is slot ``k``'s contribution to the
deviation estimate when expert ``j`` serves it (the slot's own expert has 0), ``dev[k, E]`` when the slot is
skipped; the slot weight ``w_k`` is already folded in.

Exactness argument.  With ``energy >= 0`` an optimal ``A`` needs only experts that serve some slot, so
``|A| <= K``.  The solver (1) drops infeasible experts and experts that never beat skipping
(``dev[k, j] >= dev[k, E]`` for every k), (2) drops *dominated* experts: ``j`` is dominated by ``i``
if ``energy[i] <= energy[j]`` and ``min(dev[k, i], skip_k) <= min(dev[k, j], skip_k)`` for all k
(exact ties keep the lower index) - replacing ``j`` by ``i`` in any set never raises energy or
Delta - and (3) enumerates the subsets of size ``<= K`` of the remaining candidates with the pruned,
vectorised level-wise search of :mod:`baselines._search` (energy bound against the incumbent, and a
lower bound on Delta from the per-slot suffix minima of the candidates not yet considered).

Infeasible budgets.  The smallest achievable deviation is ``Delta_min = Delta(all feasible experts)``.
If ``budget < Delta_min`` no set meets the budget; the solver then returns the *minimum-deviation*
feasible set, breaking ties by least energy, i.e. it solves the problem with the budget raised to
``Delta_min``.  :func:`solve_decode_full` reports ``budget_met=False`` for such rows.

Ties.  Among sets of equal (least) energy the one with the smallest Delta is returned; remaining exact
ties go to the smaller set, then deterministically to the first in the search order.

Tolerance.  ``Delta <= budget`` is tested as ``Delta <= budget + rtol * max(1, |budget|)``
(``rtol = 1e-9`` by default) so that sums accumulated in a different order do not flip a boundary case.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from baselines._search import subset_search
from wide_env.rules import serve_slots_batch

__all__ = ["SiftSolution", "solve_decode", "solve_decode_full", "deviation_of", "energy_of"]

DEFAULT_RTOL = 1e-9


class SiftSolution(NamedTuple):
    mask: np.ndarray        # (B, E) bool executed set
    energy: np.ndarray      # (B,) summed energy of the set
    deviation: np.ndarray   # (B,) Delta of the set
    budget_met: np.ndarray  # (B,) bool: Delta <= budget (within rtol)
    min_deviation: np.ndarray  # (B,) Delta_min = Delta(all feasible experts)


def _slot_sum(x: np.ndarray) -> np.ndarray:
    """Sum over the last axis in a fixed sequential order (bitwise reproducible)."""
    out = np.zeros(x.shape[:-1], dtype=np.float64)
    for k in range(x.shape[-1]):
        out = out + x[..., k]
    return out


def deviation_of(mask: np.ndarray, deviation_table: np.ndarray) -> np.ndarray:
    """Delta(A) for executed masks ``mask`` (..., E) and tables (..., K, E + 1): the serve rule
    (wide_env.rules.serve_slots)."""
    return serve_slots_batch(deviation_table, mask)[0]


def energy_of(mask: np.ndarray, energy: np.ndarray) -> np.ndarray:
    """Summed energy of executed masks (entries of unexecuted experts are ignored, even if inf)."""
    return np.where(np.asarray(mask, dtype=bool), np.asarray(energy, dtype=np.float64), 0.0).sum(axis=-1)


def _validate(energy, feasible, deviation_table, budget):
    energy = np.asarray(energy, dtype=np.float64)
    feasible = np.asarray(feasible)
    dev = np.asarray(deviation_table, dtype=np.float64)
    budget = np.asarray(budget, dtype=np.float64)
    single = energy.ndim == 1
    if single:
        energy, feasible, dev, budget = energy[None], feasible[None], dev[None], budget.reshape(1)
    if energy.ndim != 2:
        raise ValueError(f"energy must have shape (B, E) or (E,), got {energy.shape}")
    B, E = energy.shape
    if feasible.shape != (B, E):
        raise ValueError(f"feasible must have the shape of energy {(B, E)}, got {feasible.shape}")
    if feasible.dtype != bool:
        if not ((feasible == 0) | (feasible == 1)).all():
            raise ValueError("feasible must be boolean (or 0/1)")
        feasible = feasible != 0
    if dev.ndim != 3 or dev.shape[0] != B or dev.shape[2] != E + 1:
        raise ValueError(
            f"deviation_table must have shape (B, K, E + 1) = ({B}, K, {E + 1}) "
            f"(column E is the skip deviation), got {dev.shape}")
    if not (dev >= 0).all():  # also catches NaN
        raise ValueError("deviation_table must be >= 0 and not NaN (+inf is allowed: 'cannot serve')")
    if budget.ndim > 1 or budget.size not in (1, B):
        raise ValueError(f"budget must have shape (B,) = ({B},) or be a scalar, got {budget.shape}")
    budget = np.broadcast_to(budget.reshape(-1), (B,))
    if np.isnan(budget).any():
        raise ValueError("budget must not be NaN")
    # energies of infeasible experts are never used (may be inf/NaN); feasible ones must be finite >= 0
    energy = np.where(feasible, energy, np.inf)
    ok = (energy >= 0) & (energy < np.inf)
    if not (ok | ~feasible).all():
        b, e = np.argwhere(feasible & ~ok)[0]
        raise ValueError(
            f"energy[{b}, {e}] = {energy[b, e]!r}: energy must be finite and >= 0 where feasible is True "
            "(mark unusable experts infeasible instead)")
    return energy, feasible, dev, budget, single


def _single_row_lists(energy, feasible, deviation_table, budget):
    """Fast path for one small unbatched instance: validated Python lists, or None to take the
    general path (which also produces the error messages)."""
    if type(energy) is not np.ndarray or energy.ndim != 1 or energy.shape[0] > _PY_MAX_EXPERTS:
        return None
    E = energy.shape[0]
    feasible = np.asarray(feasible)
    dev = np.asarray(deviation_table)
    if feasible.shape != (E,) or dev.ndim != 2 or dev.shape[1] != E + 1 or np.ndim(budget) != 0:
        return None
    e_l, f_l, d_l, b = energy.tolist(), feasible.tolist(), dev.tolist(), float(budget)
    if b != b:
        return None
    for j in range(E):
        if f_l[j] not in (0, 1, True, False):
            return None
        if f_l[j] and not (0.0 <= e_l[j] < math.inf):
            return None
    for r in d_l:
        for x in r:
            if not x >= 0.0:
                return None
    return [x if f else math.inf for x, f in zip(e_l, f_l)], [bool(f) for f in f_l], d_l, b


def solve_decode_full(energy, feasible, deviation_table, budget, *, rtol: float = DEFAULT_RTOL,
                      chunk: int = 128) -> SiftSolution:
    """Exact SiftMoE decoding solution with diagnostics; see the module docstring.

    energy (B, E) float >= 0 where feasible; feasible (B, E) bool; deviation_table (B, K, E + 1);
    budget (B,) or scalar.  Unbatched inputs ((E,), (E,), (K, E + 1), scalar) are accepted and give
    unbatched outputs.  ``chunk`` bounds the number of rows searched at once (memory only).
    """
    row = _single_row_lists(energy, feasible, deviation_table, budget)
    if row is not None:
        return SiftSolution(*_solve_row_py(*row, rtol))
    energy, feasible, dev, budget, single = _validate(energy, feasible, deviation_table, budget)
    B, E = energy.shape
    K = dev.shape[1]
    mask = np.zeros((B, E), dtype=bool)
    sol_e = np.zeros(B)
    sol_d = np.zeros(B)
    met = np.zeros(B, dtype=bool)
    dmin = np.zeros(B)
    if B <= _PY_MAX_ROWS and E <= _PY_MAX_EXPERTS:
        # Few rows: a pure-Python depth-first version of the same search (same arithmetic, same
        # tie-breaking, identical results) avoids numpy's per-call overhead.
        for b in range(B):
            mask[b], sol_e[b], sol_d[b], met[b], dmin[b] = _solve_row_py(
                energy[b].tolist(), feasible[b].tolist(), dev[b].tolist(), float(budget[b]), rtol)
    else:
        for s in range(0, B, max(1, chunk)):
            sl = slice(s, min(B, s + max(1, chunk)))
            m, e, d, ok, dm = _solve_chunk(energy[sl], feasible[sl], dev[sl], budget[sl], rtol, K, E)
            mask[sl], sol_e[sl], sol_d[sl], met[sl], dmin[sl] = m, e, d, ok, dm
    if single:
        return SiftSolution(mask[0], sol_e[0], sol_d[0], met[0], dmin[0])
    return SiftSolution(mask, sol_e, sol_d, met, dmin)


def solve_decode(energy, feasible, deviation_table, budget, *, rtol: float = DEFAULT_RTOL) -> np.ndarray:
    """Exact SiftMoE decoding: (B, E) bool mask of the least-energy feasible set meeting the budget.

    Rows whose budget no feasible set meets get the minimum-deviation feasible set (ties: least energy).
    """
    return solve_decode_full(energy, feasible, deviation_table, budget, rtol=rtol).mask


_PY_MAX_ROWS = 2
_PY_MAX_EXPERTS = 64


def _tol_py(x: float, rtol: float) -> float:
    return x + rtol * max(1.0, abs(x)) if math.isfinite(x) else x


def _solve_row_py(energy, feasible, dev, budget, rtol):
    """One row, pure Python: same reductions, bounds and tie-breaking as :func:`_solve_chunk` (the
    depth-first order visits equal-size subsets in the same lexicographic order), identical results."""
    K = len(dev)
    E = len(energy)
    inf = math.inf
    skip = [row[E] for row in dev]
    # clipped deviations per feasible, useful expert
    useful = []
    best_slot = [inf] * K
    for j in range(E):
        if not feasible[j]:
            continue
        cj = [row[j] if row[j] < row[E] else row[E] for row in dev]
        hit = False
        for k in range(K):
            if cj[k] < skip[k]:
                hit = True
                if cj[k] < best_slot[k]:
                    best_slot[k] = cj[k]
        if hit:
            useful.append((energy[j], j, cj))
    dmin = 0.0
    for k in range(K):
        dmin = dmin + (best_slot[k] if best_slot[k] < skip[k] else skip[k])
    eff = budget if dmin <= _tol_py(budget, rtol) else dmin
    thresh = _tol_py(eff, rtol)

    useful.sort()  # by energy, then index (unique), never compares the lists
    cand = []
    for ej, j, cj in useful:
        dominated = False
        for ei, i, ci in useful:
            if ei > ej:
                break  # sorted by energy: no later expert can dominate j
            if i == j:
                continue
            le = True
            eq = ei == ej
            for k in range(K):
                if ci[k] > cj[k]:
                    le = False
                    break
                if ci[k] != cj[k]:
                    eq = False
            if le and (not eq or i < j):
                dominated = True
                break
        if not dominated:
            cand.append((ej, j, cj))
    c = len(cand)
    cE = [x[0] for x in cand]
    cD = [x[2] for x in cand]
    suff = [None] * (c + 1)
    suff[c] = skip
    for t in range(c - 1, -1, -1):
        suff[t] = [a if a <= b else b for a, b in zip(suff[t + 1], cD[t])]
    kmax = K if K < c else c

    v0 = 0.0
    for x in skip:
        v0 = v0 + x
    best = [inf, inf, 0, ()]  # energy, value, size, members
    if v0 <= thresh:
        best = [0.0, v0, 0, ()]

    def dfs(start, en, state, members):
        size = len(members) + 1
        remaining = kmax - size
        for j in range(start, c):
            ce = en + cE[j]
            if ce > best[0]:
                break  # candidates are sorted by energy
            st = [a if a <= b else b for a, b in zip(state, cD[j])]
            v = 0.0
            for x in st:
                v = v + x
            if remaining > 0:
                lb = 0.0
                for a, b in zip(st, suff[j + 1]):
                    lb = lb + (a if a <= b else b)
            else:
                lb = v
            if lb > thresh:
                continue
            mem = members + (j,)
            if v <= thresh and (ce < best[0] or (ce == best[0] and (v < best[1] or (v == best[1] and size < best[2])))):
                best[:] = [ce, v, size, mem]
            if remaining > 0 and j + 1 < c and ce + cE[j + 1] <= best[0]:
                dfs(j + 1, ce, st, mem)

    lb0 = 0.0
    if kmax > 0:
        for a, b in zip(skip, suff[0]):
            lb0 = lb0 + (a if a <= b else b)
        if lb0 <= thresh:
            dfs(0, 0.0, skip, ())
    if best[0] == inf:
        raise RuntimeError("SiftMoE search found no set meeting max(budget, Delta_min); please report")
    mask = np.zeros(E, dtype=bool)
    for t in best[3]:
        mask[cand[t][1]] = True
    return mask, best[0], best[1], best[1] <= _tol_py(budget, rtol), dmin


def _tol(x: np.ndarray, rtol: float) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(x), x + rtol * np.maximum(1.0, np.abs(x)), x)


def _greedy_cap(energy, clipped, skip, cand, thresh, K):
    """Energy of a feasible set, used only to prune the exact search early: greedy by deviation
    reduction per unit energy over the candidates (at most K picks); if that does not meet the
    threshold, the union of every slot's best candidate (always meets max(budget, Delta_min)).  A
    relative slack of 1e-9 absorbs summation-order differences, so the cap is >= the optimum."""
    B, E = energy.shape
    state = skip.copy()
    sel = np.zeros((B, E), dtype=bool)
    done = _slot_sum(state) <= thresh
    e_safe = np.where(cand, np.maximum(energy, 1e-300), np.inf)
    rows = np.arange(B)
    for _ in range(K):
        if done.all():
            break
        gain = np.maximum(state[:, :, None] - clipped, 0.0).sum(axis=1)  # (B, E)
        score = np.where(cand & ~sel & (gain > 0), gain / e_safe, -np.inf)
        pick = np.argmax(score, axis=1)
        ok = ~done & np.isfinite(score[rows, pick])
        sel[rows[ok], pick[ok]] = True
        state[ok] = np.minimum(state[ok], clipped[rows[ok], :, pick[ok]])
        done = _slot_sum(state) <= thresh
    greedy_e = np.where(sel, energy, 0.0).sum(axis=1)
    best = np.argmin(np.where(cand[:, None, :], clipped, np.inf), axis=2)            # (B, K)
    has = np.take_along_axis(clipped, best[:, :, None], axis=2)[:, :, 0] < skip
    serve = np.zeros((B, E), dtype=bool)
    r, k = np.nonzero(has)
    serve[r, best[r, k]] = True
    cap = np.where(done, np.minimum(greedy_e, np.where(serve, energy, 0.0).sum(axis=1)),
                   np.where(serve, energy, 0.0).sum(axis=1))
    return cap * (1.0 + 1e-9) + 1e-300


def _solve_chunk(energy, feasible, dev, budget, rtol, K, E):
    B = energy.shape[0]
    skip = dev[:, :, E]                                   # (B, K)
    clipped = np.minimum(dev[:, :, :E], skip[:, :, None])  # (B, K, E)
    useful = feasible & (clipped < skip[:, :, None]).any(axis=1)

    # Delta_min over all feasible experts; effective budget = max(budget, Delta_min).
    best_slot = np.where(feasible[:, None, :], clipped, np.inf).min(axis=2, initial=np.inf)
    dmin = _slot_sum(np.minimum(best_slot, skip))
    met_possible = dmin <= _tol(budget, rtol)
    eff = np.where(met_possible, budget, dmin)
    thresh = _tol(eff, rtol)

    # Dominance among useful experts: i dominates j if energy and every clipped slot deviation are <=,
    # with exact ties broken towards the lower index.
    e_le = energy[:, :, None] <= energy[:, None, :]
    e_eq = energy[:, :, None] == energy[:, None, :]
    d_le = (clipped[:, :, :, None] <= clipped[:, :, None, :]).all(axis=1)
    d_eq = (clipped[:, :, :, None] == clipped[:, :, None, :]).all(axis=1)
    lower = np.tri(E, E, -1, dtype=bool).T  # lower[i, j] = i < j
    dom = useful[:, :, None] & useful[:, None, :] & e_le & d_le & (~(e_eq & d_eq) | lower[None])
    cand = useful & ~dom.any(axis=1)

    n_cand = cand.sum(axis=1)
    C = int(n_cand.max()) if B else 0
    # Candidate positions sorted by energy (stable: index order on ties); non-candidates last.
    order = np.argsort(np.where(cand, energy, np.inf), axis=1, kind="stable")[:, :max(C, 1)]
    rows = np.arange(B)[:, None]
    valid = np.arange(max(C, 1))[None, :] < n_cand[:, None]
    cE = np.where(valid, energy[rows, order], np.inf)
    cD = np.where(valid[:, :, None], np.transpose(clipped, (0, 2, 1))[rows, order], skip[:, None, :])  # (B, C, K)
    # suff[b, t] = per-slot min over candidate positions >= t (and skip); suff[b, C] = skip.
    suff = np.empty((B, cD.shape[1] + 1, K))
    suff[:, -1] = skip
    for t in range(cD.shape[1] - 1, -1, -1):
        suff[:, t] = np.minimum(suff[:, t + 1], cD[:, t])

    def child_state(ps, nb, j):
        return np.minimum(ps, cD[nb, j])

    def bound(st, nb, j, remaining):
        if remaining <= 0:
            return _slot_sum(st)
        return _slot_sum(np.minimum(st, suff[nb, j + 1]))

    members, sol_e, sol_d = subset_search(
        cE, n_cand, min(K, C), skip.copy(), child_state, _slot_sum, bound, thresh,
        energy_cap=_greedy_cap(energy, clipped, skip, cand, thresh, K))
    if not np.isfinite(sol_e).all():  # cannot happen: the serving set of all feasible experts meets eff
        raise RuntimeError("SiftMoE search found no set meeting max(budget, Delta_min); please report")
    mask = np.zeros((B, E), dtype=bool)
    r, c = np.nonzero(members >= 0)
    mask[r, order[r, members[r, c]]] = True
    met = sol_d <= _tol(budget, rtol)
    return mask, sol_e, sol_d, met, dmin
