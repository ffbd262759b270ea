"""Offline statistics of a decoding config for causal policies whose budget spans several decisions
(``budget.mode`` "token" or "episode"): what the policy would observe, decision by decision, in sample
episodes of the same env and config, plus a calibrated estimate of the absolute energy of a decision.

Why an energy estimate.  ``energy_cost`` is relative to the Top-K energy of its own state, so it compares
experts within one decision but not decisions with each other: a policy that spends a budget over several
decisions in those units is up to 1.8x off the least energy in J (measured on the default env, episode
budget). The link's energy is, in the default uplink scope, exactly log-linear in the helpers' channel gain
(E_e ~ 1/g for fixed payload and time); so :class:`SpanStatistics` fits, per expert, ``log E_e`` on the
observed ``channel_gain_db`` (least squares over the sample episodes, whose realised energies are read from
the env's hindsight tables) and :meth:`SpanStatistics.energy` turns an observation's ``energy_cost`` into
energies in units of ``energy_scale`` (the median Top-K energy): ``energy_cost * reference_estimate`` with the
reference estimated from all experts at once [choice: a log-linear model; exact for the uplink scope with
channel inversion, an approximation for other scopes].

Sample episodes use seeds ``seed .. seed + episodes - 1`` (default seed 10**6, away from evaluation seeds
0..n) with every expert skipped: the env's channels and gating do not depend on the actions. Statistics are
cached per (config, episodes, seed) in memory and, with ``cache_dir``, on disk as ``.npz`` (loaded with
``allow_pickle=False`` and checked against the config).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["STATS_SEED", "SpanStatistics", "span_statistics", "config_key", "extra_observation"]

#: first seed of the sample episodes (evaluations use small seeds)
STATS_SEED = 10 ** 6
_FORMAT = 1
_MEMORY: dict[tuple, "SpanStatistics"] = {}


def config_key(config) -> str:
    """A stable hash of a :class:`~wide_env.config.WideConfig` (or dict)."""
    from wide_env.config import WideConfig

    data = WideConfig.from_dict(config).to_dict()
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:32]


def extra_observation(obs, problem, key: str, single: bool) -> np.ndarray | None:
    """Observation entry ``key`` as a float64 (B, size) array (dict or flat, single or batched), or None when
    the observation has no such key."""
    if isinstance(obs, dict):
        if key not in obs:
            return None
        arr = np.asarray(obs[key], dtype=np.float64)
    else:
        sl = problem.obs_slices.get(key)
        if sl is None:
            return None
        arr = np.asarray(obs, dtype=np.float64)[..., sl]
    return arr[None] if single else arr


@dataclass(frozen=True)
class SpanStatistics:
    """Sample decisions of ``episodes`` episodes, arrays (episodes, n_tokens, L, ...): what the policy observed
    (deviation tables in the observation's budget units, usable experts, energies in units of
    ``energy_scale``), and the energy model."""

    key: str  # config_key of the config
    budget_mode: str
    n_layers: int
    n_tokens: int
    n_experts: int
    top_k: int
    costs_shared: bool  # every layer of a token sees the same expert energies and deadlines
    deviation_weight: float  # the reward's penalty weight of a violated step
    deviation: np.ndarray  # (P, T, L, K, E+1) as observed (over the budget unit)
    energy: np.ndarray  # (P, T, L, E) estimated energy / energy_scale
    usable: np.ndarray  # (P, T, L, E) bool, latency_ratio <= 1 (while deadlines are enforced)
    #: (P, T, L, E) the observed ``deadline_probability`` under uncertain queues; shape (0,) without that key
    deadline_probability: np.ndarray
    log_energy_coef: np.ndarray  # (E, 1 + N): ln E_e ~ coef[e, 0] + coef[e, 1:] @ channel_gain_db
    energy_scale: float  # J, the median Top-K energy of the samples
    episodes: int
    seed: int

    # ---- collection ------------------------------------------------------------------------------
    @classmethod
    def collect(cls, config, episodes: int = 32, seed: int = STATS_SEED) -> "SpanStatistics":
        """Run ``episodes`` sample episodes of ``config`` (every expert skipped) and fit the energy model."""
        from wide_env.config import WideConfig

        if isinstance(episodes, bool) or not isinstance(episodes, (int, np.integer)) or episodes < 2:
            raise ValueError(f"episodes must be an integer >= 2, got {episodes!r}")
        config = WideConfig.from_dict(config)
        sim, env = _sample_simulator(config)
        L, T, E, K = sim.n_layers, sim.n_tokens, sim.n_experts, sim.top_k
        obs_keys = ("deviation_table", "energy_cost", "latency_ratio", "channel_gain_db")
        if "deadline_probability" in sim.obs_slices:
            obs_keys += ("deadline_probability",)
        rec = {k: [] for k in obs_keys}
        joules, topk = [], []
        for i, (state, observations) in enumerate(_sample_episodes(sim, env, episodes, seed)):
            tables = sim.episode_tables(state, 0)
            if tables.energy.shape[0] < T:
                raise ValueError(f"n_tokens * n_layers = {T * L} decisions exceed what one env plans at once; "
                                 "statistics need whole episodes")
            joules.append(tables.energy[:T])
            topk.append(tables.topk_energy[:T])
            for obs in observations:
                for k in obs_keys:
                    rec[k].append(np.asarray(obs[sim.obs_slices[k]], dtype=np.float64))
        shape = (episodes, T, L)
        deviation = np.stack(rec["deviation_table"]).reshape(shape + (K, E + 1))
        cost = np.stack(rec["energy_cost"]).reshape(shape + (E,))
        gain = np.stack(rec["channel_gain_db"]).reshape(shape + (-1,))
        usable = np.stack(rec["latency_ratio"]).reshape(shape + (E,)) <= 1.0
        if not sim.enforce_deadline:
            usable[:] = True
        probability = (np.stack(rec["deadline_probability"]).reshape(shape + (E,)) if "deadline_probability" in rec
                       else np.zeros(0))
        joules = np.stack(joules)  # (P, T, L, E)
        coef = _fit_log_energy(gain.reshape(-1, gain.shape[-1]), joules.reshape(-1, E))
        scale = float(np.median(np.stack(topk)))
        if not scale > 0:
            scale = float(np.median(joules[joules > 0])) if (joules > 0).any() else 1.0
        stats = cls(key=config_key(config), budget_mode=sim.budget_mode, n_layers=L, n_tokens=T, n_experts=E,
                    top_k=K, costs_shared=not sim.scenario.cost_per_layer,
                    deviation_weight=float(config.reward.deviation_weight), deviation=deviation,
                    energy=np.zeros(shape + (E,)), usable=usable,
                    deadline_probability=probability, log_energy_coef=coef, energy_scale=scale,
                    episodes=int(episodes), seed=int(seed))
        # the samples' energies as a policy estimates them (the same estimate it makes when acting)
        energy = stats.energy_of(cost.reshape(-1, E), gain.reshape(-1, gain.shape[-1])).reshape(shape + (E,))
        object.__setattr__(stats, "energy", energy)
        return stats

    def usable_under(self, delta: float) -> np.ndarray:
        """(P, T, L, E): the usable experts when those with a deadline probability below 1 - delta cannot serve
        (the span policies' chance constraint; all observed ``usable`` ones without uncertain queues)."""
        if self.deadline_probability.size == 0:
            return self.usable
        return self.usable & (self.deadline_probability >= 1.0 - delta)

    # ---- the energy model ------------------------------------------------------------------------
    def energy_of(self, energy_cost: np.ndarray, channel_gain_db: np.ndarray) -> np.ndarray:
        """(B, E) estimated energies in units of ``energy_scale`` from observed ``energy_cost`` (B, E) and
        ``channel_gain_db`` (B, N): energy_cost times the reference that makes them agree with the model
        (geometric median over the experts with a positive cost)."""
        cost = np.asarray(energy_cost, dtype=np.float64)
        gain = np.asarray(channel_gain_db, dtype=np.float64)
        predicted = self.log_energy_coef[:, 0] + gain @ self.log_energy_coef[:, 1:].T  # (B, E) ln J
        with np.errstate(divide="ignore"):
            log_ref = np.where(cost > 0, predicted - np.log(cost), np.inf)  # inf sorts last
        return cost * (np.exp(_finite_median(log_ref)) / self.energy_scale)[:, None]

    # ---- persistence -----------------------------------------------------------------------------
    _ARRAYS = ("deviation", "energy", "usable", "deadline_probability", "log_energy_coef")
    _SCALARS = ("key", "budget_mode", "n_layers", "n_tokens", "n_experts", "top_k", "costs_shared",
                "deviation_weight", "energy_scale", "episodes", "seed")

    def save(self, path) -> None:
        data = {k: getattr(self, k) for k in self._ARRAYS}
        data.update({k: np.asarray(getattr(self, k)) for k in self._SCALARS})
        data["format"] = np.asarray(_FORMAT)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, **data)
        tmp.replace(path)

    @classmethod
    def load(cls, path, expect_key: str | None = None) -> "SpanStatistics":
        """Load statistics written by :meth:`save`; a file for another config (``expect_key``) is an error."""
        try:
            with np.load(path, allow_pickle=False) as f:
                if int(f["format"]) != _FORMAT:
                    raise ValueError(f"format {int(f['format'])}, expected {_FORMAT}")
                kw = {k: f[k] for k in cls._ARRAYS}
                for k in cls._SCALARS:
                    kw[k] = f[k].item()
        except (OSError, KeyError, ValueError) as exc:
            raise ValueError(f"{path}: not a valid span-statistics file ({exc}); delete it to collect it "
                             "again") from None
        stats = cls(**kw)
        if expect_key is not None and stats.key != expect_key:
            raise ValueError(f"{path} holds statistics of another config (key {stats.key}, expected {expect_key}); "
                             "delete it or pass the matching config")
        P, T, L = stats.usable.shape[:3]
        if (stats.deviation.shape != (P, T, L, stats.top_k, stats.n_experts + 1)
                or stats.energy.shape != stats.usable.shape):
            raise ValueError(f"{path}: inconsistent array shapes; delete it to collect it again")
        return stats


def span_statistics(config, episodes: int = 32, seed: int = STATS_SEED, cache_dir=None) -> SpanStatistics:
    """:meth:`SpanStatistics.collect`, cached in memory and (``cache_dir``) on disk."""
    key = (config_key(config), int(episodes), int(seed))
    stats = _MEMORY.get(key)
    if stats is not None:
        return stats
    path = None if cache_dir is None else Path(cache_dir) / f"span-stats-{key[0]}-{key[1]}-{key[2]}.npz"
    if path is not None and path.exists():
        stats = SpanStatistics.load(path, expect_key=key[0])
    else:
        stats = SpanStatistics.collect(config, episodes, seed)
        if path is not None:
            stats.save(path)
    _MEMORY[key] = stats
    return stats


def _sample_simulator(config):
    """(the decoding simulator of ``config`` for the sample episodes, the env that drives it or None).

    The statistics need no accuracy: with the trace's gating (``gating.backend = "table"``) the simulator is
    stepped alone, so no model backend decodes the tokens (issue 22: 3.0 s vs 0.4 s on a model-accuracy preset;
    tests/test_spanning.py checks that the statistics equal the env's). With ``gating.backend = "live"`` the model
    routes the gating the policy observes, so the env (and its model) runs the episodes."""
    if config.gating.backend == "live":
        from wide_env.envs.decode import WideMoEEnv

        env = WideMoEEnv(config)
        return env.sim, env
    from wide_env.gating import make_gating_source
    from wide_env.sim.decode import DecodeSimulator

    return DecodeSimulator(config, make_gating_source(config)), None


def _sample_episodes(sim, env, episodes: int, seed: int):
    """Per sample episode ``seed + i`` (every expert skipped): (its state right after the reset, an iterator of its
    T * L flat observations, each read before its step), exactly as ``WideMoEEnv(config).reset(seed=seed + i)``
    and its steps produce them."""
    from gymnasium.utils import seeding

    for i in range(episodes):
        if env is not None:
            env.reset(seed=int(seed) + i)
            yield env.episode_batch.state, _env_steps(env)
        else:
            rng, _ = seeding.np_random(int(seed) + i)  # the generator WideMoEEnv.reset(seed=...) makes
            state = sim.reset(rng, 1)
            yield state, _simulator_steps(sim, state, rng)
    if env is not None:
        env.close()


def _simulator_steps(sim, state, rng):
    """The flat observations of one episode stepped by the simulator alone (the env's reset and step calls)."""
    keep = np.zeros((1, sim.n_experts), dtype=bool)
    obs = sim.observe(state)
    for _ in range(sim.n_tokens * sim.n_layers):
        yield obs[0]
        obs = np.empty_like(obs)
        sim.step(rng, state, keep, obs)


def _env_steps(env):
    keep = np.zeros(env.sim.n_experts, dtype=np.int8)
    for _ in range(env.sim.n_tokens * env.sim.n_layers):
        yield env.episode_batch.obs[0]
        env.step(keep)


def _finite_median(x: np.ndarray) -> np.ndarray:
    """Median of each row's finite entries (+inf marks the others); 0 for a row without any."""
    x = np.sort(x, axis=1)
    n = np.isfinite(x).sum(axis=1)
    rows = np.arange(x.shape[0])
    lo = x[rows, np.maximum((n - 1) // 2, 0)]
    hi = x[rows, np.maximum(n // 2, 0)]
    return np.where(n > 0, 0.5 * (lo + hi), 0.0)


def _fit_log_energy(gain_db: np.ndarray, joules: np.ndarray) -> np.ndarray:
    """Per expert least squares of ln J on [1, gain_db] over samples with J > 0; (E, 1 + N)."""
    n, N = gain_db.shape
    X = np.concatenate([np.ones((n, 1)), gain_db], axis=1)
    coef = np.zeros((joules.shape[1], N + 1))
    for e in range(joules.shape[1]):
        ok = joules[:, e] > 0
        if ok.sum() > N + 1:
            coef[e] = np.linalg.lstsq(X[ok], np.log(joules[ok, e]), rcond=None)[0]
        elif ok.any():
            coef[e, 0] = np.log(joules[ok, e]).mean()
    return coef
