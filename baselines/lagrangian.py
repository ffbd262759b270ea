"""The tuned Lagrangian rule (issue 23, item 1): per decision, the executed set of least uplink energy plus priced
deviation, a causal analytic baseline with a handful of tuned weights.

Per decision (token t, layer l; E experts, K Top-K slots) the rule executes

    A* = argmin over A of   energy(A) + lambda_t mu_l sum_k nu_k Delta_k(A)
         over the sets A of at most K usable experts (deadline-feasible, as the other baselines judge it)

* ``energy(A)`` is the summed energy of A in an absolute unit: the observed ``energy_cost`` (relative to this
  state's Top-K energy) turned into joules with the observed ``channel_gain_db`` by the log-linear link model of
  :class:`baselines.span_stats.SpanStatistics` (fitted on sample episodes of the same physics), divided by the
  config's median Top-K energy (a constant, so lambda is comparable across configs). Relative costs would compare
  experts within a decision but not decisions with each other; joules let the rule spend deviation where the
  channel is poor.
* ``Delta_k(A)`` is slot k's deviation as the env serves it (:func:`wide_env.rules.serve_slots_batch`: the best
  executed stand-in or skip), from the observed ``deviation_table`` in budget units.
* ``mu_l`` (one per layer), ``nu_k`` (one per Top-K slot, ``nu_1 = 1``) and ``lambda`` are the tuned weights
  (:mod:`baselines.lagrangian_tuning`). Because the observed deviations are in budget units, a budget scale s
  (``budget.scale``) divides every Delta by s: sweeping the scale sweeps lambda / s, which is how the benchmark
  traces this rule's accuracy-energy front.
* Online multiplier (token and episode budgets, ``eta > 0``): after each decision
  ``lambda_{t+1} = max(0, lambda_t + eta lambda_0 (H Delta_t - 1))``, the projected dual step of the span
  constraint sum_t Delta_t <= 1 with the even share 1/H per decision (H decisions per span, Delta_t the chosen
  set's deviation in budget units): lambda rises while the episode spends faster than its budget allows and falls
  while it spends slower. It restarts from ``lambda_0`` at each episode's first decision.
* ``guard`` (default on): only sets whose deviation fits what is left of the span's budget compete (as SiftMoE's
  margin, shrunk by ``margin``); when none fits, the set of least deviation (ties: least energy). Off, the rule is
  the pure Lagrangian (the accuracy objective, whose agent has no budget).

Exact minimisation: by enumeration of every subset of at most K candidates (:func:`lagrangian_sets`): an expert that
is unusable, never beats skipping or is dominated (energy and every clipped slot deviation no smaller than another
candidate's; :func:`baselines.pareto.candidate_experts`) can be replaced in any set without raising the energy or
any slot's deviation, so with nu >= 0 and lambda >= 0 dropping it never loses the optimum (or a fitting set). With
E = 8 and K = 2 that is at most 37 sets per decision; larger E enumerate the candidates the same way, up to
:data:`MAX_SETS` sets per decision. Ties: the first set in enumeration order (smaller sets first, then expert
order).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from baselines.observation import layer_of
from baselines.pareto import candidate_experts, subset_members
from baselines.policy_base import Policy
from baselines.span_stats import STATS_SEED, span_statistics
from baselines.spanning import check_delta, span_position
from wide_env.rules import serve_slots_batch

__all__ = ["MAX_SETS", "LagrangianChoice", "lagrangian_sets", "Lagrangian", "check_weights", "make_lagrangian",
           "energy_model_config", "TUNED_PATH", "tuned_kwargs"]

#: the tuned weights of the benchmark's regimes (written by python -m baselines.lagrangian_tuning)
TUNED_PATH = Path(__file__).with_name("lagrangian_tuned.json")
TUNED_FORMAT = 1
#: the most sets one decision may enumerate (C candidates, subsets of size <= K); beyond it the rule refuses
MAX_SETS = 200_000
#: rows x sets x slots handled at once (memory only)
_CHUNK = 1 << 20


class LagrangianChoice:
    """The chosen sets of a batch of decisions: ``mask`` (B, E) bool, ``deviation`` (B,) the env's Delta of each
    (budget units), ``energy`` (B,) and ``score`` (B,) the objective's value."""

    __slots__ = ("mask", "deviation", "energy", "score")

    def __init__(self, mask, deviation, energy, score):
        self.mask, self.deviation, self.energy, self.score = mask, deviation, energy, score


def _enumerate(energy, table, experts):
    """Every subset of at most K of ``experts`` (D, C) (candidate expert indices): members (M, K) positions
    (padding C), masks (D, M, E), energies (D, M), per-slot served deviations (D, M, K) and Delta (D, M)."""
    D, E = energy.shape
    K = table.shape[1]
    C = experts.shape[1]
    members = subset_members(C, K)  # (M, K) positions into ``experts``, padded with C
    ext = np.concatenate([experts, np.full((D, 1), E)], axis=1)  # position C -> column E (nothing)
    idx = ext[:, members]  # (D, M, K) expert indices, E = padding
    M = members.shape[0]
    masks = np.zeros((D, M, E + 1), dtype=bool)
    np.put_along_axis(masks, idx, True, axis=2)
    masks = masks[:, :, :E]
    delta, server = serve_slots_batch(table[:, None], masks)  # the env's serve rule: (D, M), (D, M, K)
    rows = np.arange(D)[:, None, None]
    slot_dev = table[rows, np.arange(K)[None, None, :], server]  # (D, M, K)
    e_ext = np.concatenate([energy, np.zeros((D, 1))], axis=1)
    set_energy = np.zeros((D, M))
    for s in range(K):  # members ascend in expert index
        set_energy = set_energy + e_ext[np.arange(D)[:, None], idx[:, :, s]]
    return masks, set_energy, slot_dev, delta


def lagrangian_sets(energy, usable, table, price, allowed=None) -> LagrangianChoice:
    """The exact Lagrangian choice of B decisions (module docstring).

    energy (B, E) >= 0 (finite where usable), usable (B, E) bool, table (B, K, E+1) the observed slot deviations
    (column E: skip), price (B, K) >= 0 the deviation price of each slot (lambda mu_l nu_k), allowed (B,) or None:
    the deviation each decision may spend (the guard; None: no guard)."""
    energy = np.asarray(energy, dtype=np.float64)
    usable = np.asarray(usable, dtype=bool)
    table = np.asarray(table, dtype=np.float64)
    price = np.asarray(price, dtype=np.float64)
    B, E = energy.shape
    if table.ndim != 3 or table.shape[0] != B or table.shape[2] != E + 1 or usable.shape != (B, E):
        raise ValueError(f"expected energy (B, E), usable (B, E), table (B, K, E+1); got {energy.shape}, "
                         f"{usable.shape}, {table.shape}")
    K = table.shape[1]
    if price.shape != (B, K) or not (price >= 0).all():
        raise ValueError(f"price must be (B, K) = ({B}, {K}) and >= 0 (not NaN), got shape {price.shape}")
    energy = np.where(usable, energy, 0.0)
    cand = candidate_experts(energy, usable, table)
    n_cand = cand.sum(axis=1)
    experts_all = np.argsort(~cand, axis=1, kind="stable")  # candidates first, in expert order
    out = LagrangianChoice(np.zeros((B, E), dtype=bool), np.zeros(B), np.zeros(B), np.zeros(B))
    for count in np.unique(n_cand):
        M = subset_members(int(count), K).shape[0]
        if M > MAX_SETS:
            raise ValueError(f"the Lagrangian rule would enumerate {M} sets per decision ({int(count)} candidate "
                             f"experts, K = {K}); at most {MAX_SETS} (baselines.lagrangian.MAX_SETS) are exact here")
        rows_all = np.flatnonzero(n_cand == count)
        step = max(1, _CHUNK // max(1, M * (K + E)))
        for lo in range(0, rows_all.size, step):
            rows = rows_all[lo:lo + step]
            masks, set_e, slot_dev, delta = _enumerate(energy[rows], table[rows], experts_all[rows, :count])
            score = set_e.copy()
            for k in range(K):  # slots in order
                score = score + price[rows, k][:, None] * slot_dev[:, :, k]
            pick = np.argmin(score, axis=1)
            if allowed is not None:
                fits = delta <= np.asarray(allowed, dtype=np.float64)[rows][:, None]
                least = np.lexsort((np.broadcast_to(np.arange(delta.shape[1]), delta.shape), set_e, delta),
                                   axis=1)[:, 0]  # least deviation, then energy, then order
                pick = np.where(fits.any(axis=1), np.argmin(np.where(fits, score, np.inf), axis=1), least)
            r = np.arange(rows.size)
            out.mask[rows] = masks[r, pick]
            out.deviation[rows], out.energy[rows], out.score[rows] = delta[r, pick], set_e[r, pick], score[r, pick]
    return out


def check_weights(values, size: int, field: str, *, first_one: bool = False) -> np.ndarray:
    """A (size,) array of finite weights >= 0 from a number or a sequence, with an error naming ``field``."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(size, float(arr))
        if first_one:
            arr[0] = 1.0
    if arr.shape != (size,):
        raise ValueError(f"lagrangian {field} must be a number or {size} numbers (one per "
                         f"{'layer' if field == 'mu' else 'Top-K slot'}), got {list(np.ravel(values))}")
    if not (np.isfinite(arr).all() and (arr >= 0).all()):
        raise ValueError(f"lagrangian {field} must be finite and >= 0, got {arr.tolist()}")
    if first_one and arr[0] != 1.0:
        raise ValueError(f"lagrangian nu[0] (the top slot's weight) is fixed at 1 (lambda sets the scale), got "
                         f"{arr[0]}; pass nu = [1, nu_2, ...]")
    return arr


class Lagrangian(Policy):
    """The Lagrangian rule as a policy (module docstring). ``stats``: a :class:`~baselines.span_stats.SpanStatistics`
    of the env's physics (its energy model); ``mu`` (L numbers or one), ``nu`` (K numbers with nu[0] = 1, or one
    for every slot after the first), ``lam`` (lambda_0 >= 0), ``eta`` (>= 0, the online multiplier's step; 0:
    static), ``guard``, ``margin`` (the guard's relative slack), ``delta`` (None: usable = the deadline may be met,
    ``deadline_probability > 0``, as SiftMoE; a number: ``deadline_probability >= 1 - delta``, as siftmoe_cc)."""

    name = "lagrangian"
    uses_budget = True

    def __init__(self, problem, *, stats, mu=1.0, nu=1.0, lam: float = 1.0, eta: float = 0.0, guard: bool = True,
                 margin: float = 1e-6, delta: float | None = None):
        super().__init__(problem)
        L, K = problem.n_layers, problem.top_k
        self.mu = check_weights(mu, L, "mu")
        self.nu = check_weights(nu, K, "nu", first_one=True)
        for field, value in (("lam", lam), ("eta", eta)):
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"lagrangian {field} must be a finite number >= 0, got {value!r}")
        if not 0.0 <= margin < 1.0:
            raise ValueError(f"lagrangian margin must be in [0, 1), got {margin}")
        if getattr(stats, "n_experts", None) != problem.n_experts or not hasattr(stats, "energy_of"):
            raise ValueError("lagrangian stats must be the SpanStatistics of the same physics "
                             "(baselines.span_stats.span_statistics(config)); make_policy('lagrangian', env) "
                             "collects them")
        self.stats = stats
        self.lam0, self.eta, self.guard, self.margin = float(lam), float(eta), bool(guard), float(margin)
        self.delta = None if delta is None else check_delta(delta)
        self._lam = np.zeros(0)  # the online multiplier of each row of the batch

    def reset(self, seed: int | None = None) -> None:
        self._lam = np.zeros(0)

    def feasible(self, a):
        ok = super().feasible(a)
        if self.delta is not None and self.problem.enforce_deadline:
            ok = ok & (a["deadline_probability"] >= 1.0 - self.delta)
        return ok

    def multipliers(self, a) -> np.ndarray:
        """(B,) lambda_t of each row: lambda_0 at an episode's first decision (or a new batch size), else carried."""
        B = a["position"].shape[0]
        first = (a["position"][:, 0] == 0) & (a["position"][:, 1] == 0)
        if self._lam.shape != (B,):
            self._lam = np.full(B, self.lam0)
        self._lam = np.where(first, self.lam0, self._lam)
        return self._lam

    def select(self, a):
        E, K, L = self.problem.n_experts, self.problem.top_k, self.problem.n_layers
        usable = self.feasible(a)
        energy = np.where(usable, self.stats.energy_of(a["energy_cost"], a["channel_gain_db"]), 0.0)
        layer = layer_of(a, self.problem)
        lam = self.multipliers(a)
        price = (lam * self.mu[np.clip(layer, 0, L - 1)])[:, None] * self.nu[None, :]
        allowed = a["budget_remaining"][:, 0] * (1.0 - self.margin) if self.guard else None
        choice = lagrangian_sets(energy, usable, a["deviation_table"].reshape(-1, K, E + 1), price, allowed)
        if self.eta > 0:
            H = span_position(a, self.problem)[2]
            self._lam = np.maximum(lam + self.eta * self.lam0 * (H * choice.deviation - 1.0), 0.0)
        return choice.mask


def energy_model_config(config) -> dict:
    """The config the energy model is fitted on: ``config`` with the budget at scale 1 in layer mode. The link
    model depends on the physics only, so every budget scale and mode of one physics shares one fit (and cache)."""
    from wide_env.config import WideConfig, deep_merge

    data = WideConfig.from_dict(config).to_dict()
    return deep_merge(data, {"budget": {"mode": "layer", "scale": 1.0}})


def make_lagrangian(env, *, stats=None, stats_episodes: int = 16, stats_seed: int = STATS_SEED, cache_dir=None,
                    **kwargs) -> Lagrangian:
    """:class:`Lagrangian` for ``env`` (a WIDE decoding env): the energy model from ``stats`` or else from
    ``stats_episodes`` sample episodes of the env's physics (:func:`~baselines.span_stats.span_statistics`,
    seeds from ``stats_seed``, cached in memory and under ``cache_dir``); the other keywords go to the rule."""
    from baselines.observation import problem_of
    from baselines.prefill_policies import is_prefill

    problem = problem_of(env)
    if is_prefill(problem):
        raise ValueError("policy 'lagrangian' is for the decoding envs (wide_env/WideMoE-v0 and its presets), "
                         "not prefill")
    if stats is None:
        config = getattr(getattr(env, "unwrapped", env), "config", None)
        if config is None:
            raise TypeError(f"policy 'lagrangian' needs a WIDE decoding env (its config fits the energy model), "
                            f"got {env!r}")
        stats = span_statistics(energy_model_config(config), stats_episodes, stats_seed, cache_dir)
    return Lagrangian(problem, stats=stats, **kwargs)


def tuned_kwargs(regime: str, path=None) -> dict:
    """The tuned keyword arguments of ``make_policy("lagrangian", env, ...)`` for benchmark regime ``regime``."""
    path = TUNED_PATH if path is None else Path(path)
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: no tuned Lagrangian parameters ({exc}); run python -m baselines.lagrangian_tuning "
                         f"--out {path}") from None
    if data.get("format") != TUNED_FORMAT or regime not in data.get("regimes", {}):
        raise ValueError(f"{path} has no tuned parameters for regime {regime!r} (it has "
                         f"{sorted(data.get('regimes', {}))}); run python -m baselines.lagrangian_tuning --regimes "
                         f"{regime} --out {path}")
    return dict(data["regimes"][regime]["kwargs"])
