"""Per-decision Pareto fronts of (weighted deviation, energy) over executed expert sets, batched over decisions.

One decision (one MoE layer of one token) has E experts with energies ``energy`` (E,), a usable mask
(``usable``: on time while deadlines are enforced, else all) and the weighted slot table ``table`` (K, E+1),
column E = skip. An executed set A costs ``sum_{j in A} energy[j]`` and has the deviation
``Delta(A) = sum_k min(table[k, E], min_{j in A, usable} table[k, j])`` (the env's serving rule).

Which sets can matter (the front's points are unchanged by each reduction; energies are >= 0):

* at most K experts: the servers of the K slots achieve the same Delta, and dropping the other members never
  raises the energy;
* only candidate experts: an expert that is unusable (it costs energy, serves nothing) or never beats
  skipping can be dropped from any set; so can an expert j dominated by a candidate i (energy_i <= energy_j
  and min(table[k, i], skip_k) <= min(table[k, j], skip_k) for every slot k, exact ties to the lower index):
  replacing j by i never raises the energy or Delta (the rule SiftMoE's solver prunes with).

Every subset of at most K candidates is then enumerated (:func:`subset_members` over candidate positions).

Arithmetic.  Delta is summed over the slots in order k = 0..K-1 starting from 0.0, exactly as the env's
step kernel does, so a front's deviations are bitwise the env's ``weighted_deviation`` of that set; energies
are summed over the members in ascending expert order.

Ties.  Points are ordered by (energy, Delta, enumeration order: smaller sets first); a point is kept iff its
Delta is strictly below every earlier point's, so among sets with identical (energy, Delta) the first in that
order represents them.
"""

from __future__ import annotations

from functools import lru_cache
from itertools import combinations
from typing import NamedTuple

import numpy as np

from wide_env.rules import serve_slots_batch

__all__ = ["Fronts", "subset_members", "candidate_experts", "pareto_fronts", "decision_fronts"]


@lru_cache(maxsize=64)
def subset_members(n: int, max_size: int) -> np.ndarray:
    """(M, max_size) int64: the members of every subset of {0..n-1} of size <= max_size, padded with n.
    Row 0 is the empty set, then by size, each size in lexicographic order. Read-only, cached."""
    if n < 0 or max_size < 0:
        raise ValueError(f"need n >= 0 and max_size >= 0, got {n}, {max_size}")
    size = min(max_size, n)
    rows = [c + (n,) * (max_size - len(c)) for s in range(size + 1) for c in combinations(range(n), s)]
    out = np.array(rows, dtype=np.int64).reshape(len(rows), max_size)
    out.flags.writeable = False
    return out


def candidate_experts(energy: np.ndarray, usable: np.ndarray, table: np.ndarray) -> np.ndarray:
    """(D, E) bool: usable experts that beat skipping in some slot and are not dominated (module docstring)."""
    E = energy.shape[1]
    skip = table[:, :, E]
    clipped = np.minimum(table[:, :, :E], skip[:, :, None])  # (D, K, E)
    useful = usable & (clipped < skip[:, :, None]).any(axis=1)
    e = np.where(useful, energy, np.inf)
    e_le = e[:, :, None] <= e[:, None, :]  # [d, i, j]: i no dearer than j
    e_eq = e[:, :, None] == e[:, None, :]
    d_le = (clipped[:, :, :, None] <= clipped[:, :, None, :]).all(axis=1)
    d_eq = (clipped[:, :, :, None] == clipped[:, :, None, :]).all(axis=1)
    lower = np.triu(np.ones((E, E), dtype=bool), 1)  # lower[i, j] = i < j
    dominated = (useful[:, :, None] & e_le & d_le & (~(e_eq & d_eq) | lower)).any(axis=1)
    return useful & ~dominated


def _set_points(energy: np.ndarray, table: np.ndarray, experts: np.ndarray) -> tuple[np.ndarray, ...]:
    """(Delta (d, M), energy (d, M), members (d, M, K)) of every set of at most K of each decision's candidates
    ``experts`` (d, C) (expert indices in ascending order; C the same for all rows)."""
    d_rows, E = energy.shape
    K = table.shape[1]
    C = experts.shape[1]
    positions = subset_members(C, K)  # (M, K), padded with C
    M = positions.shape[0]
    padded = np.concatenate([experts, np.full((d_rows, 1), E)], axis=1)  # position C -> E (skip, no energy)
    members = padded[:, positions]  # (d, M, K)
    rows = np.arange(d_rows)[:, None]
    allowed = np.zeros((d_rows, M, E + 1), dtype=bool)  # each set as an executed mask (column E: padding)
    np.put_along_axis(allowed, members, True, axis=2)
    dev = serve_slots_batch(table[:, None], allowed[:, :, :E])[0]  # (d, M): the serve rule
    ext = np.concatenate([energy, np.zeros((d_rows, 1))], axis=1)
    cost = np.zeros((d_rows, M))
    for s in range(K):  # members ascend in expert index
        cost = cost + ext[rows, members[:, :, s]]
    return dev, cost, members


class Fronts(NamedTuple):
    """Pareto fronts of D decisions, padded to F points: energy ascending, deviation strictly descending."""

    deviation: np.ndarray  # (D, F) float64, +inf padding
    energy: np.ndarray  # (D, F) float64, +inf padding
    masks: np.ndarray  # (D, F, E) bool executed sets (padding: empty)
    size: np.ndarray  # (D,) points per front (>= 1: the empty set or a zero-energy set is always there)


def pareto_fronts(deviation: np.ndarray, energy: np.ndarray, members: np.ndarray, n_experts: int) -> Fronts:
    """Pareto fronts (minimise both) of D rows of M candidate points with their members (D, M, S) (expert
    indices, ``n_experts`` = padding); see the module docstring for ties."""
    deviation = np.asarray(deviation, dtype=np.float64)
    energy = np.asarray(energy, dtype=np.float64)
    D, M = energy.shape
    order = np.lexsort((np.broadcast_to(np.arange(M), (D, M)), deviation, energy), axis=1)  # energy, Delta, index
    e = np.take_along_axis(energy, order, axis=1)
    d = np.take_along_axis(deviation, order, axis=1)
    prior = np.minimum.accumulate(d, axis=1)
    keep = np.isfinite(e)
    keep[:, 1:] &= d[:, 1:] < prior[:, :-1]
    size = keep.sum(axis=1)
    F = int(size.max()) if D else 0
    rank = np.cumsum(keep, axis=1) - 1
    out_d = np.full((D, F), np.inf)
    out_e = np.full((D, F), np.inf)
    masks = np.zeros((D, F, n_experts + 1), dtype=bool)
    r, c = np.nonzero(keep)
    out_d[r, rank[r, c]] = d[r, c]
    out_e[r, rank[r, c]] = e[r, c]
    chosen = members[r, order[r, c]]  # (n, S)
    for s in range(chosen.shape[1]):
        masks[r, rank[r, c], chosen[:, s]] = True
    return Fronts(out_d, out_e, masks[:, :, :n_experts], size)


def decision_fronts(energy: np.ndarray, usable: np.ndarray, table: np.ndarray,
                    chunk_elements: int = 1 << 22) -> Fronts:
    """Pareto fronts of D decisions: energy (D, E) >= 0, usable (D, E) bool, table (D, K, E+1). Decisions are
    enumerated in groups of equal candidate count (memory bounded by ``chunk_elements`` per group chunk)."""
    energy = np.asarray(energy, dtype=np.float64)
    usable = np.asarray(usable, dtype=bool)
    table = np.asarray(table, dtype=np.float64)
    D, E = energy.shape
    K = table.shape[1] if table.ndim == 3 else -1
    if usable.shape != (D, E) or table.shape != (D, K, E + 1):
        raise ValueError(f"expected energy (D, E), usable (D, E), table (D, K, E+1); got {energy.shape}, "
                         f"{usable.shape}, {table.shape}")
    cand = candidate_experts(energy, usable, table)
    n_cand = cand.sum(axis=1)
    experts_all = np.argsort(~cand, axis=1, kind="stable")  # candidates first, in expert order
    parts = []
    for count in np.unique(n_cand):
        idx = np.flatnonzero(n_cand == count)
        M = subset_members(int(count), K).shape[0]
        step = max(1, chunk_elements // max(1, M * K * (K + 1)))
        for lo in range(0, idx.size, step):
            rows = idx[lo:lo + step]
            pts = _set_points(energy[rows], table[rows], experts_all[rows, :count])
            parts.append((rows, pareto_fronts(*pts, E)))
    F = max((f.deviation.shape[1] for _, f in parts), default=0)
    out = Fronts(np.full((D, F), np.inf), np.full((D, F), np.inf), np.zeros((D, F, E), dtype=bool),
                 np.zeros(D, dtype=np.int64))
    for rows, f in parts:
        w = f.deviation.shape[1]
        out.deviation[rows, :w], out.energy[rows, :w], out.masks[rows, :w] = f.deviation, f.energy, f.masks
        out.size[rows] = f.size
    return out
