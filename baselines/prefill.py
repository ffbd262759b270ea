"""Exact SiftMoE prefilling (arXiv 2603.23888, prefilling case): per layer, choose (token, expert) pairs.

Problem (one MoE layer, T prompt tokens, E experts, K Top-K slots per token)::

    minimise    sum_e f_e(n_e),   n_e = number of tokens that execute expert e
    subject to  Delta_t(A_t) = sum_k min(dev[t, k, E], min_{j in A_t} dev[t, k, j]) <= budget_t   for every t

``f_e(n)`` (``load_energy[e, n]``, n = 0..T, f_e(0) = 0) is the energy of expert e's helper serving n
tokens: convex in n for the inversion uplink (the payload n D goes out in one window) [paper]; ``inf``
marks loads that miss the deadline or experts that cannot be used. f must be nondecreasing in n.

Algorithm (exact):

1. **Per-token candidates.** For token t, enumerate the sets A of at most K *useful* experts (usable at
   load 1 and beating skip on some slot) and keep the *minimal* sets meeting the budget (no proper
   subset meets it). Because f is nondecreasing, dropping an expert from a token never costs energy,
   and every expert in a minimal set serves a slot, so some optimum uses only minimal sets, of size
   <= K. If no set meets token t's budget, its budget is raised to Delta_min,t = Delta(all usable
   experts) (as the decoding solver does) and ``budget_met[t]`` is False.
2. **Branch and bound over tokens.** Tokens are ordered by number of candidates (fewest first); a node
   fixes the candidate sets of a prefix of tokens, i.e. the loads n. The bound adds, for every open
   token, its cheapest candidate priced at the marginal costs m_e(n_e) = min_{n' >= n_e}
   (f_e(n'+1) - f_e(n')) of the *current* loads; loads only grow, so this never overestimates
   (for convex f, m_e(n) is simply the next marginal). Children are visited cheapest-increment first;
   the incumbent starts from a greedy assignment improved by best-response passes. Tokens with
   identical candidate families are symmetric (cost depends only on the loads), so their choices are
   forced to be non-decreasing in candidate index.
3. If no assignment has finite energy (loads beyond every expert's deadline capacity), each token may
   also be *dropped* (executes nothing, budget unmet); the search then minimises (number dropped,
   energy) lexicographically.

Complexity: step 1 is O(T * sum_{s<=K} C(E', s) * K) with E' useful experts per token (37 sets for
E = 8, K = 2). Step 2 is exponential in T in the worst case (prod_t |C_t| leaves), each node costing
O(sum_t |C_t| K); the bound prunes almost everything on the env's instances (see
bench/bench_prefill.py). :func:`brute_force_prefill` enumerates all 2^(T E) masks instead.
"""
from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import numpy as np

from wide_env.rules import serve_slots_batch

__all__ = ["PrefillSolution", "solve_prefill", "brute_force_prefill", "random_prefill_instance", "prefill_energy", "token_deviations",
           "load_energy_table", "siftmoe_prefill_action"]

DEFAULT_RTOL = 1e-9


class PrefillSolution(NamedTuple):
    mask: np.ndarray  # (T, E) bool executed pairs
    energy: float  # sum_e f_e(n_e)
    deviation: np.ndarray  # (T,) Delta_t
    budget_met: np.ndarray  # (T,) bool: Delta_t <= budget_t
    dropped: np.ndarray  # (T,) bool: token left empty because no finite-energy assignment exists (step 3)
    nodes: int  # branch-and-bound nodes visited


def _tol(x: float, rtol: float) -> float:
    return x + rtol * max(1.0, abs(x)) if math.isfinite(x) else x


def token_deviations(mask, deviation_table) -> np.ndarray:
    """Delta_t for masks (..., T, E) and tables (..., T, K, E+1): the serve rule (wide_env.rules.serve_slots)."""
    return serve_slots_batch(deviation_table, mask)[0]


def prefill_energy(mask, load_energy) -> np.ndarray:
    """sum_e f_e(n_e) for masks (..., T, E) and a table (E, T+1)."""
    mask = np.asarray(mask, dtype=bool)
    f = np.asarray(load_energy, dtype=np.float64)
    loads = mask.sum(axis=-2)
    vals = f[np.arange(f.shape[0]), loads]
    out = np.zeros(vals.shape[:-1])
    for e in range(vals.shape[-1]):
        out = out + vals[..., e]
    return out


def _validate(load_energy, deviation_table, budget):
    f = np.asarray(load_energy, dtype=np.float64)
    dev = np.asarray(deviation_table, dtype=np.float64)
    if dev.ndim != 3:
        raise ValueError(f"deviation_table must have shape (T, K, E+1), got {dev.shape}")
    T, K, E1 = dev.shape
    E = E1 - 1
    if f.shape != (E, T + 1):
        raise ValueError(f"load_energy must have shape (E, T+1) = ({E}, {T + 1}) (f_e(n) for n = 0..T), got {f.shape}")
    if np.isnan(f).any() or (f < 0).any() or (f[:, 0] != 0).any():
        raise ValueError("load_energy must be >= 0, not NaN, with f_e(0) = 0 (use inf for unusable loads)")
    if (f[:, 1:] < f[:, :-1] * (1.0 - 1e-12)).any():
        raise ValueError("load_energy must be nondecreasing in the load n (more tokens never cost less)")
    if not (dev >= 0).all():
        raise ValueError("deviation_table must be >= 0 and not NaN")
    b = np.broadcast_to(np.asarray(budget, dtype=np.float64), (T,)) if np.ndim(budget) <= 1 else None
    if b is None or np.isnan(b).any():
        raise ValueError(f"budget must be a scalar or shape (T,) = ({T},) without NaN")
    return f, dev, np.array(b), T, K, E


def _token_candidates(dev_t, budget_t, usable, K, E, rtol):
    """Minimal sets (tuples) meeting the budget (or the minimum deviation), and whether the budget is met."""
    skip = dev_t[:, E]
    useful = [e for e in range(E) if usable[e] and (dev_t[:, e] < skip).any()]

    def delta(A):
        total = 0.0
        for k in range(K):
            best = skip[k]
            for j in A:
                if dev_t[k, j] < best:
                    best = dev_t[k, j]
            total += best
        return total

    d_min = delta(useful)
    met = d_min <= _tol(budget_t, rtol)
    need = _tol(budget_t if met else d_min, rtol)
    feasible: set = set()
    minimal = []
    for size in range(0, min(K, len(useful)) + 1):
        for A in itertools.combinations(useful, size):
            if delta(A) <= need:
                feasible.add(A)
                if size == 0 or not any(A[:i] + A[i + 1:] in feasible for i in range(size)):
                    minimal.append(A)
    return minimal, met


def solve_prefill(load_energy, deviation_table, budget, *, rtol: float = DEFAULT_RTOL,
                  max_nodes: int = 5_000_000) -> PrefillSolution:
    """Exact SiftMoE prefilling for one layer; see the module docstring. ``max_nodes`` guards runaway
    searches (RuntimeError when exceeded: the instance is too large for an exact answer)."""
    f, dev, budget, T, K, E = _validate(load_energy, deviation_table, budget)
    usable = np.isfinite(f[:, 1]) if T > 0 else np.zeros(E, bool)
    cands, met = [], []
    for t in range(T):
        c, ok = _token_candidates(dev[t], float(budget[t]), usable, K, E, rtol)
        cands.append(c)
        met.append(ok)
    fl = f.tolist()
    # lower envelope of marginal costs: m[e][n] = min_{n' >= n} f(n'+1) - f(n')
    marg = [[(fl[e][n + 1] - fl[e][n]) if math.isfinite(fl[e][n + 1]) else math.inf for n in range(T)] + [math.inf]
            for e in range(E)]
    for e in range(E):
        for n in range(T - 1, -1, -1):
            marg[e][n] = min(marg[e][n], marg[e][n + 1])

    def run(drop_penalty):
        fam = [list(c) + ([None] if drop_penalty is not None else []) for c in cands]
        order = sorted(range(T), key=lambda t: (len(fam[t]), repr(fam[t])))
        fams = [fam[t] for t in order]
        same_as_prev = [i > 0 and fams[i] == fams[i - 1] for i in range(T)]
        loads = [0] * E
        nodes = 0

        def inc(A, ld):
            if A is None:
                return drop_penalty
            c = 0.0
            for e in A:
                c += fl[e][ld[e] + 1] - fl[e][ld[e]] if math.isfinite(fl[e][ld[e] + 1]) else math.inf
            return c

        def bound(i, ld):
            total = 0.0
            for fa in fams[i:]:
                best = math.inf
                for A in fa:
                    c = drop_penalty if A is None else sum(marg[e][ld[e]] for e in A)
                    if c < best:
                        best = c
                total += best
            return total

        # incumbent: greedy, then best-response passes
        choice = []
        for i in range(T):
            costs = [inc(A, loads) for A in fams[i]]
            j = int(np.argmin(costs)) if costs else 0
            choice.append(j)
            for e in (fams[i][j] or ()):
                loads[e] += 1

        def total_cost(ch):
            ld = [0] * E
            c = 0.0
            for i, j in enumerate(ch):
                A = fams[i][j]
                c += inc(A, ld)
                for e in (A or ()):
                    ld[e] += 1
            return c

        best_cost = total_cost(choice)
        improved = True
        while improved:
            improved = False
            for i in range(T):
                for j in range(len(fams[i])):
                    if j != choice[i]:
                        trial = choice[:i] + [j] + choice[i + 1:]
                        c = total_cost(trial)
                        if c < best_cost * (1.0 - 1e-12):
                            best_cost, choice, improved = c, trial, True
        # canonical order among symmetric tokens (same multiset, same cost)
        for i in range(1, T):
            if same_as_prev[i]:
                k = i
                while k > 0 and same_as_prev[k] and choice[k] < choice[k - 1]:
                    choice[k], choice[k - 1] = choice[k - 1], choice[k]
                    k -= 1
        best = [best_cost, list(choice)]
        loads = [0] * E
        path = [0] * T

        def dfs(i, cost):
            nonlocal nodes
            nodes += 1
            if nodes > max_nodes:
                raise RuntimeError(f"solve_prefill: more than max_nodes = {max_nodes} search nodes; the instance is "
                                   "too large for the exact search (lower prompt_tokens or raise max_nodes)")
            if i == T:
                if cost < best[0]:
                    best[0], best[1] = cost, list(path)
                return
            lo = path[i - 1] if same_as_prev[i] else 0
            options = []
            for j in range(lo, len(fams[i])):
                c = inc(fams[i][j], loads)
                if cost + c < best[0]:
                    options.append((c, j))
            options.sort()
            for c, j in options:
                A = fams[i][j]
                for e in (A or ()):
                    loads[e] += 1
                if cost + c + bound(i + 1, loads) < best[0]:
                    path[i] = j
                    dfs(i + 1, cost + c)
                for e in (A or ()):
                    loads[e] -= 1

        dfs(0, 0.0)
        mask = np.zeros((T, E), dtype=bool)
        dropped = np.zeros(T, dtype=bool)
        for i, j in enumerate(best[1]):
            A = fams[i][j]
            if A is None:
                dropped[order[i]] = True
            else:
                mask[order[i], list(A)] = True
        return best[0], mask, dropped, nodes

    cost, mask, dropped, nodes = run(None)
    if not math.isfinite(cost):
        finite_max = float(np.where(np.isfinite(f), f, 0.0).max(axis=1).sum())
        cost, mask, dropped, nodes2 = run(1.0 + 2.0 * finite_max)
        nodes += nodes2
    deviation = token_deviations(mask, dev)
    energy = float(prefill_energy(mask, f))
    met_arr = (deviation <= np.array([_tol(float(b), rtol) for b in budget])) if T else np.zeros(0, bool)
    return PrefillSolution(mask, energy, deviation, met_arr, dropped, nodes)


def brute_force_prefill(load_energy, deviation_table, budget, *, rtol: float = DEFAULT_RTOL):
    """Reference: enumerate all 2^(T E) masks (T E <= 20). Each token must meet its budget, or, where no
    mask can, reach Delta_min,t (deviation with every usable expert). If no such mask has finite energy,
    minimise (number of tokens missing that requirement, energy) lexicographically, as the solver does.
    Returns (best_energy, n_missing, masks (M, T, E) attaining it)."""
    f, dev, budget, T, K, E = _validate(load_energy, deviation_table, budget)
    n = T * E
    if n > 20:
        raise ValueError(f"brute force over 2^{n} masks is too large; use T*E <= 20")
    idx = np.arange(2 ** n, dtype=np.int64)[:, None]
    masks = ((idx >> np.arange(n)) & 1).astype(bool).reshape(-1, T, E)
    usable = np.isfinite(f[:, 1])
    d_min = token_deviations(np.broadcast_to(usable, (T, E)), dev)
    need = np.array([_tol(float(b), rtol) if d <= _tol(float(b), rtol) else _tol(float(d), rtol)
                     for b, d in zip(budget, d_min)])
    missing = (token_deviations(masks, dev[None]) > need).sum(axis=1)
    energy = prefill_energy(masks, f)
    finite = np.isfinite(energy)
    least = int(missing[finite].min())
    ok = finite & (missing == least)
    best = energy[ok].min()
    return float(best), least, masks[ok & (energy <= best * (1 + 1e-12))]


def random_prefill_instance(rng: np.random.Generator, T: int, E: int, K: int, *, capacity: bool = True,
                            budget_range=(0.0, 1.0)):
    """A random (load_energy (E, T+1), deviation_table (T, K, E+1), budget (T,)) instance: convex
    inversion-like f_e(n) = a_e (2^(c_e n) - 1), optional deadline capacities (inf beyond), a random
    unusable expert now and then, mismatch tables with zero diagonal weighted by Dirichlet gates."""
    dev = np.zeros((T, K, E + 1))
    for t in range(T):
        top = rng.choice(E, K, replace=False)
        w = rng.dirichlet(np.ones(K))
        D = rng.uniform(0.3, 2.0, size=(E, E + 1))
        np.fill_diagonal(D, 0.0)
        dev[t] = D[top] * w[:, None]
    n = np.arange(T + 1)
    f = rng.uniform(0.2, 3.0, size=E)[:, None] * np.expm1(n * rng.uniform(0.3, 1.5, size=E)[:, None] * np.log(2.0))
    if capacity:
        cap = rng.integers(1, T + 2, size=E)
        f = np.where(n[None] <= cap[:, None], f, np.inf)
        if rng.random() < 0.2:
            f[rng.integers(E), 1:] = np.inf
    return f, dev, rng.uniform(*budget_range, size=T)


def load_energy_table(view, sim, index: int = 0) -> np.ndarray:
    """(E, T+1) objective-scope energies f_e(n) of a prefill view, ``inf`` for loads that miss the
    deadline while enforcement is on (those pairs would be lost)."""
    f = np.array(view.load_energy[index], dtype=np.float64)
    f[:, 0] = 0.0
    if sim.enforce_deadline:
        f = np.where(view.load_latency[index] <= sim.deadline * (1.0 + 1e-9), f, np.inf)
        f[:, 0] = 0.0
    return np.maximum.accumulate(f, axis=1)


def siftmoe_prefill_action(env) -> np.ndarray:
    """SiftMoE prefilling action for a `WideMoEPrefill-v0` env (unwrapped or wrapped): flat int8 T*E mask.
    Exact for the paper's one-to-one placement (``env.problem.one_to_one``)."""
    base = env.unwrapped
    view, sim = base.current_view(), base.sim
    sol = solve_prefill(load_energy_table(view, sim), view.deviation_table[0], view.budget[0])
    return sol.mask.reshape(-1).astype(np.int8)
