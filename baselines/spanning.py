"""Causal SiftMoE policies for budgets that span several decisions (``budget.mode`` "token": one budget per token
over its L layers; "episode": one budget over all n_tokens x L decisions of the episode).

They see only the observation (and offline statistics of the same config, :mod:`baselines.span_stats`); each
decision executes a point of the current decision's exact Pareto front of (deviation, energy)
(:mod:`baselines.pareto`, on the observed energies, deadlines and deviation table). They differ in how much
of the span's remaining budget the current decision may use:

* ``siftmoe_span`` (:class:`SpanSiftMoE`): ``allocation="even"`` splits what is left evenly over the
  decisions left in the span (the token's layers, or the episode's decisions), ``"greedy"`` lets every
  decision use all of it. (The per-layer ``siftmoe`` of :mod:`baselines.policies` splits over a token's
  layers only; in episode mode it is greedy.)
* ``siftmoe_sdp`` (:class:`StochasticDPSiftMoE`): a stochastic dynamic program over the decisions left,
  V_h(b) = E[min over the decision's front of (energy + V_{h+1}(b - deviation))], on a grid of remaining
  budget fractions b, with the decision statistics of the sample episodes; the current decision is exact,
  the future is its expectation. Within a token budget, when every layer sees the same channel (the default),
  the token's later layers are evaluated with this token's own expert energies and deadlines (only their
  gating is unknown), solved once per token. Energies are in a common absolute unit
  (:meth:`~baselines.span_stats.SpanStatistics.energy_of`), not the per-state ``energy_cost``.
* ``siftmoe_dpp`` (:class:`DriftPlusPenaltySiftMoE`): Lyapunov drift-plus-penalty. With h of the span's H
  decisions taken and a fraction S of its budget spent, the virtual queue of overspend against an even pace is
  Q = max(Q0 + S - h / H, 0) (Q0 a place-holder backlog) and each decision minimises V energy + Q deviation
  over its front, i.e. energy + price x deviation with price = Q / V = max(price0 + gain (S - h / H), 0).
  ``price0`` = Q0 / V is the least static price at which the sample decisions spend at most the budget on
  average; ``gain`` = 1 / V is tuned offline on the sample episodes (least energy without a violation).
* ``siftmoe_cc`` (:class:`ChanceSiftMoE`): ``siftmoe_span`` under uncertain queues: experts whose
  ``deadline_probability`` (the probability of meeting the deadline given what the device knows) is below
  ``1 - delta`` count as unable to serve (a chance constraint per expert); with no such key in the
  observation it equals ``siftmoe_span``.

Every policy here honours the chance constraint when the key is there, and never lets a decision spend more
than what is left of the span when some point of its front fits (SiftMoE's ``margin`` absorbs float32
rounding); only when none fits it takes the point of least deviation.
"""

from __future__ import annotations

import numpy as np

from baselines.pareto import decision_fronts
from baselines.analytic import SiftMoE
from baselines.observation import layer_of, parse_observation, problem_of
from baselines.policy_base import SPAN_POLICY_NAMES, Policy
from baselines.span_stats import STATS_SEED, SpanStatistics, extra_observation, span_statistics
from wide_env.rules import budget_left_of, violated_of

__all__ = ["SPAN_POLICY_NAMES", "make_span_policy", "SpanPolicy", "SpanSiftMoE", "ChanceSiftMoE",
           "StochasticDPSiftMoE", "DriftPlusPenaltySiftMoE", "span_position", "bellman_step", "interpolate"]

DEFAULT_DELTA = 0.05  # [choice] tolerated probability of missing a deadline per executed expert


def span_position(a: dict, problem) -> tuple[np.ndarray, np.ndarray, int]:
    """(decisions taken in the current span (B,), decisions left including this one (B,), span length H)
    from the observation's position; the span is one layer (layer mode), a token's layers or the episode."""
    L, n = problem.n_layers, problem.n_tokens
    layer = layer_of(a, problem)
    token = np.rint(a["position"][:, 1] * max(n - 1, 1)).astype(np.int64)
    if problem.budget_mode == "episode":
        H, h = n * L, token * L + layer
    elif problem.budget_mode == "token":
        H, h = L, layer
    else:
        H, h = 1, np.zeros_like(layer)
    return h, H - h, H


def check_delta(delta: float) -> float:
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta (tolerated deadline-miss probability) must be in [0, 1), got {delta}")
    return float(delta)


class _SpanObservation:
    """Mixin: reads the observation keys the span policies use beyond the base ones (``deadline_probability``
    under uncertain queues, ``channel_gain_db``) and applies the chance constraint to feasibility."""

    delta = DEFAULT_DELTA

    def __call__(self, obs):
        arrays, single = parse_observation(obs, self.problem)
        for key in ("deadline_probability", "channel_gain_db"):
            extra = extra_observation(obs, self.problem, key, single)
            if extra is not None:
                arrays[key] = extra
        action = np.asarray(self.select(arrays), dtype=np.int8)
        return action[0] if single else action

    def feasible(self, a):
        """Experts that may serve: on time by the observed latency and, under uncertain queues, with
        ``deadline_probability >= 1 - delta`` (while deadlines are enforced; else all)."""
        ok = super().feasible(a)
        if self.problem.enforce_deadline and "deadline_probability" in a:
            ok = ok & (a["deadline_probability"] >= 1.0 - self.delta)
        return ok


class SpanSiftMoE(_SpanObservation, SiftMoE):
    """SiftMoE on a per-decision share of the span's remaining budget (even over the decisions left, or all)."""

    name = "siftmoe_span"

    def __init__(self, problem, *, allocation: str = "even", delta: float = DEFAULT_DELTA, margin: float = 1e-6):
        SiftMoE.__init__(self, problem, margin=margin, allocation=allocation)
        self.delta = check_delta(delta)

    def layer_budget(self, a) -> np.ndarray:
        rem = a["budget_remaining"][:, 0]
        if self.allocation == "even":
            rem = rem / span_position(a, self.problem)[1]
        return rem * (1.0 - self.margin)


class ChanceSiftMoE(SpanSiftMoE):
    """:class:`SpanSiftMoE` whose name says it is meant for uncertain queues (every span policy here applies the
    same chance constraint when the observation has ``deadline_probability``)."""

    name = "siftmoe_cc"


class SpanPolicy(_SpanObservation, Policy):
    """Base of the planning span policies: exact fronts of the observed decision, budget fits."""

    uses_budget = True

    def __init__(self, problem, *, delta: float = DEFAULT_DELTA, margin: float = 1e-6):
        super().__init__(problem)
        if not 0.0 <= margin < 1.0:
            raise ValueError(f"margin must be in [0, 1), got {margin}")
        self.delta, self.margin = check_delta(delta), float(margin)

    def _use_statistics(self, stats: SpanStatistics, verb: str) -> None:
        """Check the offline statistics against the env and set the span length H (decisions per span)."""
        problem = self.problem
        _check_stats(stats, problem)
        if problem.budget_mode == "layer":
            raise ValueError(f"{self.name} {verb} a budget spanning several decisions; with budget.mode = 'layer' "
                             "use siftmoe (exact per layer)")
        self.stats = stats
        self.H = problem.n_layers if problem.budget_mode == "token" else problem.n_tokens * problem.n_layers

    def fronts(self, a, energy):
        """The exact fronts of the observed decisions with energies ``energy`` (B, E)."""
        E, K = self.problem.n_experts, self.problem.top_k
        return decision_fronts(energy, self.feasible(a), a["deviation_table"].reshape(-1, K, E + 1))

    def masks(self, fronts, pick: np.ndarray) -> np.ndarray:
        return fronts.masks[np.arange(pick.shape[0]), pick]

    def fits(self, fronts, budget: np.ndarray) -> np.ndarray:
        """(B, F) bool: front points whose deviation fits ``budget`` (B,) (shrunk by ``margin``)."""
        return fronts.deviation <= (budget * (1.0 - self.margin))[:, None]

    @staticmethod
    def least_deviation(fronts) -> np.ndarray:
        return fronts.size - 1


def interpolate(values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Piecewise-linear ``values`` on the uniform grid of [0, 1] with ``values.size`` points, at x in [0, 1]."""
    G = values.shape[0]
    pos = np.clip(x, 0.0, 1.0) * (G - 1)
    i = np.minimum(pos.astype(np.int64), G - 2)
    w = pos - i
    return values[i] * (1.0 - w) + values[i + 1] * w


def bellman_step(deviation: np.ndarray, energy: np.ndarray, future: np.ndarray, penalty: float,
                 chunk: int = 1 << 21) -> np.ndarray:
    """One backward step on the uniform grid b = 0, 1/(G-1), ..., 1 of remaining budget fractions:
    V(b) = mean over samples of min over front points of
    energy + future(max(b - deviation, 0)) + [deviation > b] penalty (1 + deviation - b).
    deviation, energy: (M, F) fronts of M sample decisions (+inf padding); future: (G,)."""
    M, F = deviation.shape
    G = future.shape[0]
    grid = np.linspace(0.0, 1.0, G)
    out = np.zeros(G)
    step = max(1, chunk // max(1, F * G))
    for lo in range(0, M, step):
        d = deviation[lo:lo + step, :, None]
        finite = np.isfinite(d)
        left = grid[None, None, :] - np.where(finite, d, 0.0)
        cost = energy[lo:lo + step, :, None] + interpolate(future, left)
        cost += np.where(left < 0, penalty * (1.0 - left), 0.0)
        cost = np.where(finite, cost, np.inf)
        out += cost.min(axis=1).sum(axis=0)
    return out / M


class StochasticDPSiftMoE(SpanPolicy):
    """Stochastic DP over the decisions left in the span (module docstring)."""

    name = "siftmoe_sdp"

    def __init__(self, problem, *, stats: SpanStatistics, samples: int = 256, grid_points: int | None = None,
                 violation_cost: float | None = None, condition: bool | None = None, delta: float = DEFAULT_DELTA,
                 margin: float = 1e-6, seed: int = 0):
        super().__init__(problem, delta=delta, margin=margin)
        self._use_statistics(stats, "plans")
        L, n = problem.n_layers, problem.n_tokens
        G = int(grid_points) if grid_points is not None else max(65, 4 * self.H + 1)  # [choice] finer gave nothing
        if G < 3:
            raise ValueError(f"grid_points must be >= 3, got {grid_points}")
        self.grid = np.linspace(0.0, 1.0, G)
        # the planning cost of a violated decision [choice]: the reward's weight in units of the median Top-K
        # energy, at least 10 - decisions meet the budget whenever they can, so the plan keeps a reserve
        self.violation_cost = max(10.0, stats.deviation_weight) if violation_cost is None else float(violation_cost)
        # conditioning on the token's own energies pays within a token budget (1.06x instead of 1.09x the oracle
        # on the default env), not over an episode (1.10x either way) where it costs 100x the decision time
        if condition is None:
            condition = problem.budget_mode == "token"
        self.condition = bool(condition) and stats.costs_shared
        rng = np.random.default_rng(seed)
        per_layer = stats.deviation.shape[0] * stats.deviation.shape[1]
        self._sample = np.sort(rng.choice(per_layer, size=min(int(samples), per_layer), replace=False))
        self._pool_deviation = [self._pool(layer)[0] for layer in range(L)]
        self._layer_fronts = [self._pool_fronts(layer) for layer in range(L)]
        self._token_cache: dict[int, tuple] = {}  # row -> (token, last layer seen, its _token_values)
        self.values = self._unconditional_values()  # (H + 1, G)

    def _pool(self, layer: int):
        s = self.stats
        take = lambda x: x[:, :, layer].reshape((-1,) + x.shape[3:])[self._sample]  # noqa: E731
        return take(s.deviation), take(s.energy), take(s.usable_under(self.delta))

    def _pool_fronts(self, layer: int):
        dev, energy, usable = self._pool(layer)
        return decision_fronts(energy, usable, dev)

    def _unconditional_values(self) -> np.ndarray:
        L = self.problem.n_layers
        V = np.zeros((self.H + 1, self.grid.size))
        for h in range(self.H - 1, -1, -1):
            f = self._layer_fronts[h % L]
            V[h] = bellman_step(f.deviation, f.energy, V[h + 1], self.violation_cost)
        return V

    def _token_values(self, h: int, energy: np.ndarray, usable: np.ndarray) -> np.ndarray:
        """(L + 1, G): V at each layer of the token that decision h belongs to, its later layers evaluated on
        this token's energies and deadlines (the same in every layer of a token when costs are shared); row L
        is the value at the token's end."""
        L = self.problem.n_layers
        end = h - h % L + L  # the token's end (in span decisions)
        V = np.empty((L + 1, self.grid.size))
        V[L] = self.values[end]
        for layer in range(L - 1, 0, -1):
            dev = self._pool_deviation[layer]
            M = dev.shape[0]
            f = decision_fronts(np.broadcast_to(energy, (M, energy.size)), np.broadcast_to(usable, (M, usable.size)),
                                dev)
            V[layer] = bellman_step(f.deviation, f.energy, V[layer + 1], self.violation_cost)
        V[0] = np.nan  # never used: layer 0's own decision is exact
        return V

    def reset(self, seed=None):
        self._token_cache.clear()

    def _future(self, row: int, h: int, energy: np.ndarray, usable: np.ndarray) -> np.ndarray:
        """V_{h+1}: conditional on the token (computed at its first decision seen, reused for its later layers)."""
        L = self.problem.n_layers
        if not self.condition or h % L == L - 1:
            return self.values[h + 1]
        token, layer = divmod(h, L)
        cached = self._token_cache.get(row)
        if cached is None or cached[0] != token or cached[1] >= layer:
            cached = (token, layer, self._token_values(h, energy, usable))
        self._token_cache[row] = (token, layer, cached[2])
        return cached[2][layer + 1]

    def select(self, a):
        h, _, _ = span_position(a, self.problem)
        energy = self.stats.energy_of(a["energy_cost"], a["channel_gain_db"])
        fronts = self.fronts(a, energy)
        budget = np.clip(a["budget_remaining"][:, 0], 0.0, 1.0)
        fits = self.fits(fronts, budget)
        pick = self.least_deviation(fronts).copy()
        feasible = self.feasible(a)
        for b in np.flatnonzero(fits.any(axis=1)):
            future = self._future(int(b), int(h[b]), energy[b], feasible[b])
            n = int(fronts.size[b])
            d, e = fronts.deviation[b, :n], fronts.energy[b, :n]
            cost = np.where(fits[b, :n], e + interpolate(future, budget[b] - d), np.inf)
            pick[b] = int(np.argmin(cost))  # ties: the least energy
        return self.masks(fronts, pick)


class DriftPlusPenaltySiftMoE(SpanPolicy):
    """Drift-plus-penalty with a virtual queue of budget overspend (module docstring)."""

    name = "siftmoe_dpp"

    #: candidate gains 1 / V, as multiples of price0, tried by the offline tuning
    GAINS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)

    def __init__(self, problem, *, stats: SpanStatistics, price0: float | None = None, gain: float | None = None,
                 delta: float = DEFAULT_DELTA, margin: float = 1e-6):
        super().__init__(problem, delta=delta, margin=margin)
        self._use_statistics(stats, "paces")
        L, n = problem.n_layers, problem.n_tokens
        # sample fronts in episode order (P, T, L)
        P, T = stats.deviation.shape[:2]
        f = decision_fronts(stats.energy.reshape(-1, problem.n_experts),
                            stats.usable_under(self.delta).reshape(-1, problem.n_experts),
                            stats.deviation.reshape((-1,) + stats.deviation.shape[3:]))
        self._samples = (f.deviation.reshape(P, T * L, -1), f.energy.reshape(P, T * L, -1))
        self.price0 = self._static_price() if price0 is None else float(price0)
        self.gain = self._tune_gain() if gain is None else float(gain)
        if not (self.price0 >= 0 and self.gain >= 0):
            raise ValueError(f"price0 and gain must be >= 0, got {self.price0}, {self.gain}")

    def _static_price(self) -> float:
        """The least price per budget fraction at which the sample decisions, each minimising energy + price x
        deviation, spend at most one span budget per span on average (bisection on a log scale)."""
        dev, energy = self._samples
        spans = dev.shape[0] * dev.shape[1] / self.H

        def spent(price):
            with np.errstate(invalid="ignore"):
                pick = np.argmin(np.where(np.isfinite(dev), energy + price * dev, np.inf), axis=2)
            return np.take_along_axis(dev, pick[..., None], axis=2).sum() / spans

        lo, hi = 0.0, 1.0
        if spent(0.0) <= 1.0:
            return 0.0
        while spent(hi) > 1.0 and hi < 1e12:
            lo, hi = hi, hi * 4
        for _ in range(60):
            mid = np.sqrt(lo * hi) if lo > 0 else hi / 2
            lo, hi = (mid, hi) if spent(mid) > 1.0 else (lo, mid)
        return hi

    def _tune_gain(self) -> float:
        """The gain with the least energy and no violated decision on the sample episodes (the fewest violations
        if every gain violates), among multiples :data:`GAINS` of price0 (of H, one energy unit per decision's
        allowance, when price0 = 0: the samples spend less than the budget even when skipping everything)."""
        base = self.price0 if self.price0 > 0 else float(self.H)
        best = None
        for g in self.GAINS:
            energy, violations = self._simulate(base * g)
            if best is None or (violations, energy) < best[0]:
                best = ((violations, energy), base * g)
        return best[1]

    def _simulate(self, gain: float) -> tuple[float, int]:
        """Energy and violated decisions of the policy on the sample episodes (all in lockstep, spans in order)."""
        dev, energy = self._samples
        P, D = dev.shape[:2]
        left = np.ones(P)
        total, violations = 0.0, 0
        rows = np.arange(P)
        for t in range(D):
            h = t % self.H
            if h == 0:
                left[:] = 1.0
            pick = self._choose(dev[:, t], energy[:, t], left, np.full(P, h), gain)
            d = dev[rows, t, pick]
            violations += int(violated_of(d, budget_left_of(left, 0.0), 1.0).sum())  # budget fractions: unit 1
            left = left - d
            total += float(energy[rows, t, pick].sum())
        return total, violations

    def _choose(self, d, e, left, h, gain):
        spent = 1.0 - left
        queue = np.maximum(self.price0 + gain * (spent - h / self.H), 0.0)  # price per budget fraction, Q / V
        fits = d <= (np.maximum(left, 0.0) * (1.0 - self.margin))[:, None]
        with np.errstate(invalid="ignore"):
            score = np.where(fits & np.isfinite(d), e + queue[:, None] * d, np.inf)
        least = np.argmin(np.where(np.isfinite(d), d, np.inf), axis=1)
        return np.where(fits.any(axis=1), np.argmin(score, axis=1), least)

    def select(self, a):
        h, _, _ = span_position(a, self.problem)
        energy = self.stats.energy_of(a["energy_cost"], a["channel_gain_db"])
        fronts = self.fronts(a, energy)
        left = a["budget_remaining"][:, 0]
        pick = self._choose(fronts.deviation, fronts.energy, left, h, self.gain)
        return self.masks(fronts, pick)


def _check_stats(stats, problem) -> None:
    if not isinstance(stats, SpanStatistics):
        raise TypeError(f"stats must be a SpanStatistics (baselines.span_stats), got {type(stats).__name__}")
    mine = (problem.n_layers, problem.n_tokens, problem.n_experts, problem.top_k, problem.budget_mode)
    theirs = (stats.n_layers, stats.n_tokens, stats.n_experts, stats.top_k, stats.budget_mode)
    if mine != theirs:
        raise ValueError(f"statistics of (L, n_tokens, E, K, budget mode) = {theirs} for an env with {mine}: "
                         "collect them from the same config")


def make_span_policy(name: str, env, **kwargs) -> Policy:
    """Build ``oracle`` (:class:`baselines.oracle.Oracle`, reads the env itself), ``siftmoe_span``,
    ``siftmoe_cc``, ``siftmoe_sdp`` or ``siftmoe_dpp`` for ``env``. The last two use the statistics of the
    env's config: keyword ``stats`` (a SpanStatistics), or else ``stats_episodes`` (default 32),
    ``stats_seed`` and ``cache_dir`` for :func:`~baselines.span_stats.span_statistics`."""
    from baselines.prefill_policies import is_prefill

    if is_prefill(problem_of(env)):
        raise ValueError(f"policy {name!r} is for the decoding envs (wide_env/WideMoE-v0 and its presets), not prefill")
    if name == "oracle":
        from baselines.oracle import Oracle

        return Oracle(env, **kwargs)
    classes = {"siftmoe_span": SpanSiftMoE, "siftmoe_cc": ChanceSiftMoE, "siftmoe_sdp": StochasticDPSiftMoE,
               "siftmoe_dpp": DriftPlusPenaltySiftMoE}
    if name not in classes:
        raise ValueError(f"unknown span policy {name!r}; choose one of {list(SPAN_POLICY_NAMES)}")
    problem = problem_of(env)
    cls = classes[name]
    if cls in (StochasticDPSiftMoE, DriftPlusPenaltySiftMoE) and "stats" not in kwargs:
        episodes = kwargs.pop("stats_episodes", 32)
        seed = kwargs.pop("stats_seed", STATS_SEED)
        cache_dir = kwargs.pop("cache_dir", None)
        kwargs["stats"] = span_statistics(getattr(env, "unwrapped", env).config, episodes, seed, cache_dir)
    return cls(problem, **kwargs)
