"""Vectorised, exact, level-wise subset search shared by the SiftMoE and DES solvers.

Both solvers minimise the summed energy of an executed expert set ``A`` subject to a *monotone*
quality constraint ``value(A) <= thresh`` (adding an expert never makes ``value`` worse) and
``|A| <= max_size``.  The search enumerates subsets of the per-instance candidate list in
lexicographic order of candidate positions (each subset exactly once: children only append a
candidate after the last one), one size level at a time, for all batch rows at once, and prunes:

* by energy: a node whose energy exceeds the row's incumbent is dropped (energies are ``>= 0`` so no
  descendant can be cheaper); an infeasible node whose energy plus the cheapest candidate it could
  still add exceeds the incumbent is not expanded (candidates are sorted by energy);
* by a problem-specific bound: ``bound(...)`` is a lower bound on ``value`` over the node and all of
  its descendants; if it exceeds ``thresh`` the whole branch is infeasible.

The incumbent of a row is the lexicographic minimum of ``(energy, value)``; among exact ties the
smaller set (found at an earlier level) and then the first generated set win, which makes the result
deterministic.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

StateFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def subset_search(
    cand_energy: np.ndarray,
    n_cand: np.ndarray,
    max_size: int,
    state0: np.ndarray,
    child_state: StateFn,
    value: Callable[[np.ndarray], np.ndarray],
    bound: Callable[[np.ndarray, np.ndarray, np.ndarray, int], np.ndarray],
    thresh: np.ndarray,
    energy_cap: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact min-energy subset search (see module docstring).

    cand_energy: (B, C) energies of each row's candidates, ascending along axis 1 for the first
        ``n_cand[b]`` entries (entries beyond are ignored).
    n_cand: (B,) number of candidates per row.
    max_size: largest subset size considered.
    state0: (B, S) state of the empty set.
    child_state(parent_state (n,S), row (n,), cand_pos (n,)) -> (n,S) state after adding a candidate.
    value(state (n,S)) -> (n,) constraint value (lower is better).
    bound(state, row, cand_pos, remaining) -> (n,) lower bound of ``value`` over the node (whose last
        added candidate is ``cand_pos``) and every descendant that may add up to ``remaining`` more
        candidates from positions > cand_pos.
    thresh: (B,) the constraint is ``value <= thresh``.
    energy_cap: optional (B,) upper bound on the optimal energy (e.g. the energy of a known feasible
        set, with a little slack for summation order); nodes above it are pruned from the start.  It
        never changes the answer as long as it is >= the optimum.

    Returns (members (B, max_size) int candidate positions padded with -1, energy (B,), value (B,)).
    Rows where no subset satisfies the constraint get energy ``inf`` and no members.
    """
    B = cand_energy.shape[0]
    members_best = np.full((B, max(max_size, 0)), -1, dtype=np.int64)
    inc_e = np.full(B, np.inf) if energy_cap is None else np.array(energy_cap, dtype=np.float64)
    inc_v = np.full(B, np.inf)
    if B == 0:
        return members_best, inc_e, inc_v

    rows = np.arange(B)
    v0 = value(state0)
    root_ok = (v0 <= thresh) & (0.0 <= inc_e)
    inc_e[root_ok] = 0.0
    inc_v[root_ok] = v0[root_ok]

    # Level-0 frontier: the empty set of every row whose branch is not provably infeasible.
    lb0 = bound(state0, rows, np.full(B, -1, dtype=np.int64), max_size)
    alive = lb0 <= thresh
    nb = rows[alive]
    last = np.full(nb.size, -1, dtype=np.int64)
    energy = np.zeros(nb.size)
    state = state0[alive]
    members = np.zeros((nb.size, 0), dtype=np.int64)

    for level in range(max_size):
        counts = n_cand[nb] - 1 - last
        np.maximum(counts, 0, out=counts)
        total = int(counts.sum())
        if total == 0:
            break
        pidx = np.repeat(np.arange(nb.size), counts)
        starts = np.cumsum(counts) - counts
        j = last[pidx] + 1 + (np.arange(total) - np.repeat(starts, counts))
        cnb = nb[pidx]
        cen = energy[pidx] + cand_energy[cnb, j]
        keep = cen <= inc_e[cnb]
        pidx, j, cnb, cen = pidx[keep], j[keep], cnb[keep], cen[keep]
        cstate = child_state(state[pidx], cnb, j)
        remaining = max_size - level - 1
        keep = bound(cstate, cnb, j, remaining) <= thresh[cnb]
        pidx, j, cnb, cen, cstate = pidx[keep], j[keep], cnb[keep], cen[keep], cstate[keep]
        cmem = np.concatenate([members[pidx], j[:, None]], axis=1)
        val = value(cstate)
        feas = val <= thresh[cnb]

        fi = np.flatnonzero(feas)
        if fi.size:
            fi = fi[np.lexsort((val[fi], cen[fi]))]  # stable: energy, then value, then generation order
            _, first = np.unique(cnb[fi], return_index=True)
            win = fi[first]
            wb = cnb[win]
            better = (cen[win] < inc_e[wb]) | ((cen[win] == inc_e[wb]) & (val[win] < inc_v[wb]))
            win, wb = win[better], wb[better]
            inc_e[wb] = cen[win]
            inc_v[wb] = val[win]
            members_best[wb] = -1
            members_best[wb, : level + 1] = cmem[win]

        if remaining == 0:
            break
        # Expand: feasible nodes only while they do not cost more than the incumbent (zero-energy
        # additions can still lower the value at equal energy); infeasible nodes only if adding the
        # cheapest remaining candidate can still match the incumbent.
        has_next = j + 1 < n_cand[cnb]
        nxt = np.where(has_next, cand_energy[cnb, np.minimum(j + 1, cand_energy.shape[1] - 1)], np.inf)
        expand = has_next & (cen + nxt <= inc_e[cnb])
        nb, last, energy, state, members = cnb[expand], j[expand], cen[expand], cstate[expand], cmem[expand]
        if nb.size == 0:
            break
    return members_best, inc_e, inc_v
