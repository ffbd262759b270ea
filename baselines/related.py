"""Related-work expert-selection policies as pure, batched functions on (B, E) arrays.

All return a (B, E) bool mask of experts to execute (unbatched (E,) inputs give (E,) outputs).
``feasible`` means "meets the per-layer deadline" (latency ratio <= 1 when the deadline is enforced).

* :func:`topk_policy` - conventional routing: execute the Top-K set S.  Deadline-agnostic ("practical
  Top-K" when the environment enforces the deadline, "ideal Top-K" when it does not).
* :func:`wdmoe_policy` - WDMoE-style: score each i in S by gate weight / latency, keep those whose score
  is at least ``threshold`` times the best score.  Deadline-aware: only feasible experts are scored
  (``feasible=None`` scores all of S); if none is feasible, nothing is executed.
* :func:`des_policy` - DES (arXiv 2503.13421) as specified for this project: the least-energy set of at
  most ``max_experts`` feasible experts (any of the E, not only S) whose gate probability mass is at
  least ``gamma``; exact.  If no such set exists, the max-mass set (ties: least energy).
* :func:`adapmoe_policy` - AdapMoE-like adaptive gating: execute only the top-1 expert when its share
  of the Top-K combine weight (``w_1 / sum_S w``) is at least ``threshold``, otherwise all of S.
  Channel-agnostic.
* :func:`greedy_policy` - channel-greedy: the ``k`` feasible experts with the least energy (ties: lower
  index), taken from ``pool`` (default: all E experts; pass the Top-K mask to restrict to S).  It
  ignores the gate entirely: the stand-in rule then serves S from whatever was executed.
* :func:`random_policy` - each expert of ``pool`` (default S) executed independently with probability
  ``p_keep`` drawn from a seeded ``numpy.random.Generator``.
"""
from __future__ import annotations

import numpy as np

from baselines._search import subset_search

__all__ = ["topk_policy", "wdmoe_policy", "des_policy", "des_solve", "adapmoe_policy", "greedy_policy",
           "random_policy"]


def _as2d(*arrays):
    single = np.asarray(arrays[0]).ndim == 1
    out = [None if a is None else (np.asarray(a)[None] if single else np.asarray(a)) for a in arrays]
    return single, out


def _ret(mask, single):
    return mask[0] if single else mask


def topk_policy(topk_mask) -> np.ndarray:
    single, (m,) = _as2d(topk_mask)
    return _ret(m.astype(bool), single)


def wdmoe_policy(topk_weight, latency_ratio, topk_mask=None, *, threshold: float = 0.5,
                 feasible=None) -> np.ndarray:
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"wdmoe threshold must be in [0, 1], got {threshold}")
    single, (w, lat, s, f) = _as2d(topk_weight, latency_ratio, topk_mask, feasible)
    w = w.astype(np.float64)
    s = (w > 0) if s is None else s.astype(bool)
    pool = s if f is None else s & f.astype(bool)
    score = np.where(pool, w / np.maximum(lat.astype(np.float64), 1e-12), -np.inf)
    best = score.max(axis=1, keepdims=True)
    mask = pool & (score >= threshold * best) & np.isfinite(best)
    return _ret(mask, single)


def adapmoe_policy(topk_weight, topk_mask=None, *, threshold: float = 0.8) -> np.ndarray:
    single, (w, s) = _as2d(topk_weight, topk_mask)
    w = w.astype(np.float64)
    s = (w > 0) if s is None else s.astype(bool)
    ws = np.where(s, w, -np.inf)
    top1 = np.argmax(ws, axis=1)
    total = np.where(s, w, 0.0).sum(axis=1)
    share = np.where(total > 0, ws[np.arange(w.shape[0]), top1] / np.where(total > 0, total, 1.0), 1.0)
    only_top1 = share >= threshold
    mask = s.copy()
    rows = np.flatnonzero(only_top1 & s.any(axis=1))
    mask[rows] = False
    mask[rows, top1[rows]] = True
    return _ret(mask, single)


def greedy_policy(energy, feasible, k: int, *, pool=None) -> np.ndarray:
    single, (e, f, p) = _as2d(energy, feasible, pool)
    ok = f.astype(bool) if p is None else f.astype(bool) & p.astype(bool)
    key = np.where(ok, np.nan_to_num(e.astype(np.float64), nan=np.inf), np.inf)
    order = np.argsort(key, axis=1, kind="stable")[:, : max(int(k), 0)]
    mask = np.zeros(e.shape, dtype=bool)
    rows = np.arange(e.shape[0])[:, None]
    mask[rows, order] = True
    mask &= ok
    return _ret(mask, single)


def random_policy(rng: np.random.Generator, topk_mask, *, p_keep: float = 0.5, pool=None) -> np.ndarray:
    if not 0.0 <= p_keep <= 1.0:
        raise ValueError(f"random p_keep must be in [0, 1], got {p_keep}")
    single, (s, p) = _as2d(topk_mask, pool)
    base = s.astype(bool) if p is None else p.astype(bool)
    mask = base & (rng.random(base.shape) < p_keep)
    return _ret(mask, single)


def des_solve(energy, feasible, gate_probs, gamma, max_experts: int, *, rtol: float = 1e-9, chunk: int = 128):
    """Exact DES: returns (mask (B,E), energy (B,), mass (B,), gamma_met (B,)).

    Minimise summed energy s.t. sum_{j in A} p_j >= gamma (within rtol), |A| <= max_experts,
    A subset of feasible.  Rows where even the ``max_experts`` most probable feasible experts fall short
    of gamma get the max-mass set, ties by least energy.  Experts with p = 0 are never selected.
    Same vectorised pruned subset search as SiftMoE (energy bound + a mass upper bound from the
    largest remaining probabilities).
    """
    single, (e, f, p) = _as2d(energy, feasible, gate_probs)
    f = f.astype(bool)
    e = np.where(f, e.astype(np.float64), np.inf)
    p = p.astype(np.float64)
    B, E = e.shape
    if f.shape != (B, E) or p.shape != (B, E):
        raise ValueError(f"feasible and gate_probs must have the shape of energy {(B, E)}, "
                         f"got {f.shape} and {p.shape}")
    if (f & ~(np.isfinite(e) & (e >= 0))).any():
        raise ValueError("energy must be finite and >= 0 where feasible is True")
    if np.isnan(p).any() or (p < 0).any():
        raise ValueError("gate_probs must be >= 0 and not NaN")
    max_experts = int(max_experts)
    if max_experts < 0:
        raise ValueError(f"max_experts must be >= 0, got {max_experts}")
    gamma = np.broadcast_to(np.asarray(gamma, dtype=np.float64).reshape(-1), (B,))
    mask = np.zeros((B, E), dtype=bool)
    sol_e, sol_m, met = np.zeros(B), np.zeros(B), np.zeros(B, dtype=bool)
    for s0 in range(0, B, max(1, chunk)):
        sl = slice(s0, min(B, s0 + max(1, chunk)))
        mask[sl], sol_e[sl], sol_m[sl], met[sl] = _des_chunk(e[sl], f[sl], p[sl], gamma[sl], max_experts, rtol)
    if single:
        return mask[0], sol_e[0], sol_m[0], met[0]
    return mask, sol_e, sol_m, met


def _des_chunk(e, f, p, gamma, kmax, rtol):
    B, E = e.shape
    cand = f & (p > 0)
    # Largest achievable mass with <= kmax experts.
    top = -np.sort(-np.where(cand, p, 0.0), axis=1)[:, :kmax]
    mass_max = np.zeros(B)
    for r in range(top.shape[1]):
        mass_max = mass_max + top[:, r]
    tolg = lambda g: g - rtol * np.maximum(1.0, np.abs(g))
    met_possible = mass_max >= tolg(gamma)
    eff = np.where(met_possible, gamma, mass_max)
    thresh = -tolg(eff)  # value = -mass <= thresh

    n_cand = cand.sum(axis=1)
    C = max(int(n_cand.max()) if B else 0, 1)
    order = np.argsort(np.where(cand, e, np.inf), axis=1, kind="stable")[:, :C]
    rows = np.arange(B)[:, None]
    valid = np.arange(C)[None, :] < n_cand[:, None]
    cE = np.where(valid, e[rows, order], np.inf)
    cP = np.where(valid, p[rows, order], 0.0)
    # topsum[b, t, r] = sum of the r largest probabilities among candidate positions >= t.
    R = kmax + 1
    topsum = np.zeros((B, C + 1, R))
    best = np.zeros((B, kmax))  # descending top values seen so far (from the right)
    for t in range(C - 1, -1, -1):
        best = -np.sort(-np.concatenate([best, cP[:, t:t + 1]], axis=1), axis=1)[:, :kmax]
        topsum[:, t, 1:] = np.cumsum(best, axis=1)

    def child_state(ps, nb, j):
        return ps + cP[nb, j][:, None]

    def value(st):
        return -st[:, 0]

    def bound(st, nb, j, remaining):
        r = min(max(remaining, 0), kmax)
        return -(st[:, 0] + topsum[nb, j + 1, r])

    members, sol_e, sol_v = subset_search(cE, n_cand, min(kmax, C if n_cand.max(initial=0) else 0),
                                          np.zeros((B, 1)), child_state, value, bound, thresh)
    if not np.isfinite(sol_e).all():
        raise RuntimeError("DES search found no set reaching min(gamma, max mass); please report")
    mask = np.zeros((B, E), dtype=bool)
    r, c = np.nonzero(members >= 0)
    mask[r, order[r, members[r, c]]] = True
    met = -sol_v >= tolg(gamma)
    return mask, sol_e, -sol_v, met


def des_policy(energy, feasible, gate_probs, *, gamma: float = 0.9, max_experts: int = 2) -> np.ndarray:
    return des_solve(energy, feasible, gate_probs, gamma, max_experts)[0]
