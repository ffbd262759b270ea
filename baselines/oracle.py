"""Hindsight oracle: the least energy that meets the deviation budget and the deadlines, knowing in advance every
layer's gating and every channel of the budget's span (the lower bound of every comparison).

Problem (one span: one layer in ``budget.mode="layer"``, one token's L layers in ``"token"``, the whole episode
in ``"episode"``; its T decisions t in the env's step order, budget B, ``used`` already spent)::

    minimise    sum_t energy_t(A_t)                        (objective-scope J, late experts' energy included)
    subject to  no step is violated, where step t is violated iff (the env's rule, step kernel)
                max(Delta_t(A_t) - max(B - S_{t-1}, 0), 0) > 1e-9 B,   S_t = S_{t-1} + Delta_t(A_t),  S_{-1} = used

A_t is any subset of the E experts; a late expert (deadlines enforced) spends its energy and serves nothing.

Exact method.  Each decision's Pareto front of (Delta, energy) over executed sets (:mod:`baselines.pareto`:
sets of at most K usable, non-dominated experts suffice, every such set enumerated) is merged along the span
by a forward label DP: a label (S, energy) per surviving partial plan; a transition is kept iff the env's violation test passes;
labels dominated in both S and energy are dropped (valid in floating point: the running sum and the test are
monotone in S), as are labels that cannot finish: S plus the least deviation still to come exceeds B by more
than the tolerances could ever allow. The deviations are summed exactly as the env sums them (slots in order,
then steps in order), so the plan's violations are the env's, bit for bit. Tie-breaking: least energy, then
least S, then the first label (parent-major, front order: smaller sets first).

Infeasible spans.  When no plan avoids every violation (exactly when executing, at every decision, the
usable set of least deviation violates - any other plan has a pointwise larger running sum), the oracle
minimises the violation first: the span's total deviation S_T, i.e. its overspend S_T - B, which means the
least-deviation set at every decision (ties: least energy), then energy. This is SiftMoE's per-layer rule
(budget raised to the least achievable deviation) and coincides with it in layer mode. The env then counts
every step from the one that crosses B on (with a deviation above the tolerance) as violated; the plan
reports those steps in ``violated``.

``gap_closed(baseline, agent, oracle)`` = (baseline - agent) / (baseline - oracle): the share of the distance
from a baseline to this lower bound that an agent closes. The oracle bounds only policies with no more violations
than it (a policy that overspends the budget, or misses deadlines the oracle's plan respects, can use less
energy), so the share is NaN - not comparable, with the reason in :func:`gap_closed_reason` - where the agent uses
less energy than the oracle or (given the counts) has more violations, and it never exceeds 1.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from baselines.pareto import Fronts, decision_fronts
from baselines.observation import layer_of, problem_of
from baselines.policy_base import Policy
from wide_env.rules import VIOLATION_RTOL, budget_left, budget_left_of, violated_of, violation

__all__ = ["VIOLATION_RTOL", "SpanSolution", "EpisodePlan", "solve_span", "step_violations", "plan_episode",
           "Oracle", "gap_closed", "gap_closed_reason", "GAP_RTOL"]

# VIOLATION_RTOL: the env's violation tolerance, relative to the span's budget (wide_env.rules)


def step_violations(step_deviation, used: float, budget: float) -> np.ndarray:
    """(T,) bool: which steps of a span the env counts as violated, given the deviations in step order, what
    was spent before the first and the span's budget (sums in step order, as the env's)."""
    out = np.zeros(len(step_deviation), dtype=bool)
    spent = float(used)
    for t, d in enumerate(np.asarray(step_deviation, dtype=np.float64).tolist()):
        out[t] = violation(d, budget_left(budget, spent), budget)[0]
        spent = spent + d
    return out


class SpanSolution(NamedTuple):
    choice: np.ndarray  # (T,) index into each decision's front
    energy: float  # summed energy of the plan
    spent: float  # S_T (including ``used``)
    budget_met: bool  # no step violated


def solve_span(fronts: Fronts, budget: float, used: float = 0.0) -> SpanSolution:
    """The exact least-energy plan of one span (module docstring) over T decisions' fronts, in step order."""
    T = fronts.size.shape[0]
    budget, used = float(budget), float(used)
    if not budget > 0 or not np.isfinite(budget):
        raise ValueError(f"the span's budget must be a positive finite number, got {budget!r}")
    if T == 0:
        return SpanSolution(np.zeros(0, dtype=np.int64), 0.0, used, True)
    dev, eng = fronts.deviation, fronts.energy
    # A label that cannot finish is dropped: without a violation every later step adds at most what is left plus
    # the tolerance, so S_T <= max(S_t, budget) + (T - t) tol; the least deviation still to come must fit that
    # (the slack covers the tolerances and the rounding of sums taken in another order)
    least = dev[np.arange(T), fronts.size - 1]
    to_come = np.concatenate([np.cumsum(least[::-1])[::-1][1:], [0.0]])
    slack = budget * (2 * VIOLATION_RTOL * (T + 1) + 1e-12 * T)
    S = np.array([used])
    E = np.array([0.0])
    parents, choices = [], []
    for t in range(T):
        n = int(fronts.size[t])
        d, e = dev[t, :n], eng[t, :n]
        available = budget_left_of(budget, S)  # (labels,)
        ok = ~violated_of(d[None, :], available[:, None], budget)
        new_s = S[:, None] + d[None, :]
        ok &= new_s + to_come[t] <= np.maximum(new_s, budget) + slack
        p, c = np.nonzero(ok)  # parent-major, front order
        if p.size == 0:
            return _least_deviation_plan(fronts, budget, used)
        s, en = new_s[p, c], E[p] + e[c]
        order = np.lexsort((np.arange(p.size), en, s))  # S, then energy, then label order
        s, en = s[order], en[order]
        keep = np.ones(order.size, dtype=bool)
        keep[1:] = en[1:] < np.minimum.accumulate(en)[:-1]
        S, E = s[keep], en[keep]
        parents.append(p[order[keep]])
        choices.append(c[order[keep]])
    # S ascends and energy strictly descends along the labels: the last is the least energy (ties: least S)
    best = S.size - 1
    choice = np.empty(T, dtype=np.int64)
    for t in range(T - 1, -1, -1):
        choice[t] = choices[t][best]
        best = parents[t][best]
    return SpanSolution(choice, float(E[-1]), float(S[-1]), True)


def _least_deviation_plan(fronts: Fronts, budget: float, used: float) -> SpanSolution:
    T = fronts.size.shape[0]
    choice = fronts.size - 1  # the front's last point: least deviation, least energy among those
    rows = np.arange(T)
    d = fronts.deviation[rows, choice]
    energy = 0.0
    for x in fronts.energy[rows, choice].tolist():
        energy = energy + x
    spent = used
    for x in d.tolist():
        spent = spent + x
    met = not step_violations(d, used, budget).any()
    return SpanSolution(choice.astype(np.int64), energy, spent, bool(met))


class EpisodePlan(NamedTuple):
    """The oracle's plan of an episode's planned tokens from a position on (earlier decisions: not planned)."""

    first_token: int  # token of row 0
    start: tuple  # (token, layer) of the first planned decision
    masks: np.ndarray  # (C, L, E) bool executed sets (False before ``start``)
    step_energy: np.ndarray  # (C, L) J (0 before start)
    step_deviation: np.ndarray  # (C, L) weighted deviation (0 before start)
    used_before: np.ndarray  # (C, L) what the span had spent before each decision (the env's budget_used)
    violated: np.ndarray  # (C, L) bool, the env's count
    budget_met: np.ndarray  # (C,) per token: its budget (token mode) or all its layers' (layer mode); (1,) episode mode
    energy: float  # summed energy of the planned decisions, J


def usable_experts(tables) -> np.ndarray:
    """(C, L, E) bool: experts that can serve (on time while deadlines are enforced)."""
    if tables.enforce_deadline:
        return np.asarray(tables.meets_deadline, dtype=bool)
    return np.ones(tables.energy.shape, dtype=bool)


def plan_episode(tables, token: int | None = None, layer: int = 0, used: float = 0.0) -> EpisodePlan:
    """The oracle's plan of ``tables`` (an :class:`~wide_env.sim.decode.hindsight.EpisodeTables`) from
    (``token``, ``layer``) on, the span in progress having spent ``used`` already (token / episode mode).
    ``token`` defaults to the tables' first token."""
    C, L, E = tables.energy.shape
    first = tables.first_token
    token = first if token is None else int(token)
    c0, l0 = token - first, int(layer)
    if not (0 <= c0 < C and 0 <= l0 < L):
        raise ValueError(f"position (token {token}, layer {layer}) is outside the planned tokens "
                         f"{first}..{first + C - 1} x layers 0..{L - 1}")
    mode = tables.budget_mode
    fronts = decision_fronts(tables.energy.reshape(C * L, E), usable_experts(tables).reshape(C * L, E),
                             tables.deviation_table.reshape(C * L, *tables.deviation_table.shape[2:]))
    start = c0 * L + l0
    spans = []  # (first decision, end decision, budget, used)
    if mode == "layer":
        spans = [(i, i + 1, float(tables.layer_budget[i % L]), 0.0) for i in range(start, C * L)]
    elif mode == "token":
        spans = [(start, (c0 + 1) * L, tables.span_budget, float(used))]
        spans += [(c * L, (c + 1) * L, tables.span_budget, 0.0) for c in range(c0 + 1, C)]
    elif mode == "episode":
        spans = [(start, C * L, tables.span_budget, float(used))]
    else:
        raise ValueError(f"unknown budget mode {mode!r}")
    masks = np.zeros((C * L, E), dtype=bool)
    step_e, step_d, before = np.zeros(C * L), np.zeros(C * L), np.zeros(C * L)
    violated = np.zeros(C * L, dtype=bool)
    met = np.ones(C if mode != "episode" else 1, dtype=bool)
    total = 0.0
    for lo, hi, budget, spent in spans:
        part = Fronts(*(x[lo:hi] for x in fronts))
        sol = solve_span(part, budget, spent)
        rows = np.arange(hi - lo)
        masks[lo:hi] = part.masks[rows, sol.choice]
        d = part.deviation[rows, sol.choice]
        step_d[lo:hi], step_e[lo:hi] = d, part.energy[rows, sol.choice]
        before[lo:hi] = _spent_before(d, spent)
        violated[lo:hi] = step_violations(d, spent, budget)
        total = total + sol.energy
        if mode == "episode":
            met[0] = sol.budget_met
        elif not sol.budget_met:
            met[lo // L] = False
    return EpisodePlan(first, (token, l0), masks.reshape(C, L, E), step_e.reshape(C, L), step_d.reshape(C, L),
                       before.reshape(C, L), violated.reshape(C, L), met, float(total))


def _spent_before(step_deviation: np.ndarray, used: float) -> np.ndarray:
    """What a span has spent before each of its steps, summed in step order as the env does."""
    out = np.empty(len(step_deviation))
    spent = float(used)
    for t, d in enumerate(step_deviation.tolist()):
        out[t] = spent
        spent = spent + d
    return out


def _sim_of(env):
    """The decoding simulator of a WIDE decoding env (single, or the native vector env)."""
    sim = getattr(getattr(env, "unwrapped", env), "sim", None)
    if not hasattr(sim, "episode_tables"):
        raise TypeError(f"the oracle needs a WIDE decoding env (gym.make('wide_env/WideMoE-v0') or its native vector "
                        f"env), got {env!r}")
    return sim


def _sim_and_state(env):
    """The decoding simulator and the live state of a WIDE decoding env, through its public batched core."""
    sim = _sim_of(env)
    core = getattr(getattr(env, "unwrapped", env), "episode_batch", None)
    if core is None:
        raise TypeError(f"the oracle needs a WIDE decoding env with its batched core (env.unwrapped.episode_batch), "
                        f"got {env!r}")
    if core.state is None:
        raise RuntimeError("call env.reset() before asking the oracle for an action")
    return sim, core.state


class Oracle(Policy):
    """The hindsight oracle as a policy: it reads the env it was made for (every channel and gate of the span in
    advance), plans at the first decision it is asked about, and then returns the planned set for the
    position the observation shows (single env, or every sub-env of the native vector env).

    A plan stays in use while the env follows it: the next decision is the planned one, its tables are the ones
    planned on, and the span has spent exactly what the plan predicts; otherwise (a new episode, an autoreset,
    another action taken in between, a re-planned chunk) the oracle plans again from the current position with
    what the span has already spent. Episode budgets need the whole episode planned by the env (the single
    env always does; a vector env does with ``reset(seed=[...])`` or while ``num_envs * n_tokens * L`` <= 32768)."""

    name = "oracle"
    uses_budget = True

    def __init__(self, env):
        super().__init__(problem_of(env))
        sim = _sim_of(env)
        if sim.config.gating.backend == "live":
            raise ValueError("the oracle needs every gate of the span in advance, but gating.backend = 'live' computes "
                             "them as the executed experts change the hidden state; use gating.backend = 'table'")
        self.env = env
        self._plans: dict[int, tuple] = {}  # episode row -> (its plan, the tables it was made from)

    def reset(self, seed: int | None = None) -> None:
        self._plans.clear()

    def select(self, a: dict) -> np.ndarray:
        sim, state = _sim_and_state(self.env)
        B, E = a["position"].shape[0], self.problem.n_experts
        if B != state.batch_size:
            raise ValueError(f"{B} observations for an env of {state.batch_size} episodes: the oracle answers the "
                             "observation of the env it was made for")
        L, n = self.problem.n_layers, self.problem.n_tokens
        seen_layer = layer_of(a, self.problem)
        seen_token = np.rint(a["position"][:, 1] * max(n - 1, 1)).astype(np.int64)
        out = np.zeros((B, E), dtype=bool)
        for b in range(B):
            if state.done[b]:  # over: no action counts (the vector env resets it at the next step)
                continue
            token, layer = int(state.token[b]), int(state.layer[b])
            if (seen_token[b], seen_layer[b]) != (token, layer):
                raise RuntimeError(f"observation {b} is at token {seen_token[b]}, layer {seen_layer[b]} but the env is "
                                   f"at token {token}, layer {layer}: the oracle answers the env's current observation")
            out[b] = self._planned(sim, state, b, token, layer)
        return out

    def _planned(self, sim, state, b: int, token: int, layer: int) -> np.ndarray:
        used = 0.0 if sim.budget_mode == "layer" else float(state.budget_used[b])
        cached = self._plans.get(b)
        if cached is None or not _follows(*cached, sim, state, b, token, layer, used):
            tables = sim.episode_tables(state, b)
            if sim.budget_mode == "episode" and tables.first_token + tables.energy.shape[0] < sim.n_tokens:
                raise RuntimeError(
                    f"budget.mode = 'episode' but the env planned only tokens {tables.first_token}.."
                    f"{tables.first_token + tables.energy.shape[0] - 1} of {sim.n_tokens}: the oracle needs the "
                    "whole episode; reset the vector env with one seed per sub-env (reset(seed=[...])) or use fewer "
                    "sub-envs")
            cached = self._plans[b] = (plan_episode(tables, token, layer, used), tables)
        plan = cached[0]
        return plan.masks[token - plan.first_token, layer]


def _follows(plan: EpisodePlan, tables, sim, state, b: int, token: int, layer: int, used: float) -> bool:
    """Whether episode ``b`` of ``state`` is at a decision of ``plan``, on the tables it was planned on, having
    spent what the plan predicts."""
    c = token - plan.first_token
    if not (0 <= c < plan.masks.shape[0]) or (token, layer) < plan.start:
        return False
    if sim.budget_mode != "layer" and used != plan.used_before[c, layer]:
        return False
    view = sim.view(state, b)
    return (np.array_equal(view.energy, tables.energy[c, layer])
            and np.array_equal(view.deviation_table, tables.deviation_table[c, layer])
            and np.array_equal(view.meets_deadline, tables.meets_deadline[c, layer]))


#: the relative slack within which energy at the oracle's counts as reaching it (sums taken in another order)
GAP_RTOL = 1e-9
#: why a gap is not comparable (gap_closed_reason); "" where it is
NO_GAP, NOT_BELOW, MORE_VIOLATIONS, BELOW_BOUND = (
    "no gap: the baseline does not use more energy than the oracle",
    "the baseline has more violations than the oracle: the oracle does not bound it",
    "the policy has more violations than the oracle: the oracle does not bound it",
    "the policy uses less energy than the oracle: the oracle does not bound it (it violates or misses more, or "
    "solves another problem)")


def _gap(baseline, agent, oracle, agent_violations, oracle_violations, baseline_violations):
    b, a, o = (np.asarray(x, dtype=np.float64) for x in (baseline, agent, oracle))
    b, a, o = np.broadcast_arrays(b, a, o)
    reason = np.full(b.shape, "", dtype=object)
    gap = b - o
    tol = GAP_RTOL * np.maximum(np.abs(o), 1e-300)
    if oracle_violations is not None:
        ov = np.broadcast_to(np.asarray(oracle_violations, dtype=np.float64), b.shape)
        if baseline_violations is not None:
            bv = np.broadcast_to(np.asarray(baseline_violations, dtype=np.float64), b.shape)
            reason = np.where(bv > ov, NOT_BELOW, reason)
        if agent_violations is not None:
            av = np.broadcast_to(np.asarray(agent_violations, dtype=np.float64), b.shape)
            reason = np.where(av > ov, MORE_VIOLATIONS, reason)
    reason = np.where(a < o - tol, BELOW_BOUND, reason)
    reason = np.where(~(gap > tol), NO_GAP, reason)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.minimum((b - a) / np.where(reason == "", gap, 1.0), 1.0)  # within GAP_RTOL of the oracle: 1
    value = np.where(reason == "", value, np.nan)
    return value, reason


def gap_closed(baseline, agent, oracle, *, agent_violations=None, oracle_violations=None, baseline_violations=None):
    """The share of a baseline's energy gap to the oracle that a policy closes, elementwise:
    (baseline - agent) / (baseline - oracle), 1 = the policy reaches the oracle, 0 = no better than the baseline,
    < 0 = worse. The oracle is a lower bound only for policies with no more violations than it, so the share is
    defined only where it bounds both the policy and the baseline; it never exceeds 1. NaN (not comparable;
    :func:`gap_closed_reason` says why) where the baseline uses no more energy than the oracle (no gap), where
    the policy uses less energy than the oracle (by more than :data:`GAP_RTOL`: the oracle is no bound for it),
    and, when the violation counts or rates are given, where the policy (or the baseline) has more violations
    than the oracle."""
    value = _gap(baseline, agent, oracle, agent_violations, oracle_violations, baseline_violations)[0]
    return float(value) if value.ndim == 0 else value


def gap_closed_reason(baseline, agent, oracle, *, agent_violations=None, oracle_violations=None,
                      baseline_violations=None):
    """Why :func:`gap_closed` is NaN, elementwise ("" where it is defined)."""
    reason = _gap(baseline, agent, oracle, agent_violations, oracle_violations, baseline_violations)[1]
    return str(reason) if reason.ndim == 0 else reason
