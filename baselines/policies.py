"""Observation -> action policies for the WIDE decoding environments.

``make_policy(name, env, **kwargs)`` returns a callable ``policy(obs) -> action``.  Policies use only
the observation and ``env.unwrapped.problem`` (the information a learned agent gets): ``obs`` is the
env's Dict observation (1-D arrays, or arrays with a leading batch axis) or its flat observation
(``config={"flatten_observation": True}``; split with ``problem.obs_slices``).  The action is an int8
array of shape (E,), or (B, E) for batched observations.

Derived quantities (all from the observation):

* ``feasible`` = ``latency_ratio <= 1`` while ``problem.enforce_deadline`` is on, else every expert.
  (The simulator tests ``latency <= T_max (1 + 1e-9)`` in float64; the observation is float32, so an
  expert within float32 rounding above the deadline could be misjudged - vanishingly rare.)
* ``energy`` = ``energy_cost`` (energy relative to the Top-K energy of this state; clipped by the env at
  1e4, which only matters for experts that are hopeless anyway).
* ``deviation_table`` reshaped to (K, E + 1) and ``budget_remaining``, both in budget units.

Names (``POLICY_NAMES``) and keyword arguments:

* ``topk`` - execute the Top-K set (practical Top-K under deadline enforcement; ideal Top-K when the
  env's ``deadline.enforce`` is false).
* ``siftmoe`` - exact SiftMoE decoding selection (:func:`baselines.siftmoe.solve_decode`) on the
  observed energies, deadline feasibility and deviation table.  ``margin`` (default 1e-6): the budget
  is shrunk by this relative amount to absorb float32 rounding of the observation.  In token budget
  mode the per-layer budget is the remaining token budget split over the layers left of the token,
  ``allocation="even"`` (default; layer index recovered from ``position``), or all of it,
  ``allocation="greedy"`` [our choice; the paper's SiftMoE is per layer].
* ``wdmoe`` - ``threshold`` (default 0.5) on gate weight / latency relative to the best Top-K expert;
  ``respect_deadline`` (default True) scores only feasible experts.
* ``des`` - ``gamma`` (default 0.9) gate mass, ``max_experts`` (default K); exact.
* ``adapmoe`` - ``threshold`` (default 0.8) on the top-1 share of the Top-K weight.
* ``greedy`` - ``k`` (default K) least-energy feasible experts; ``pool="all"`` (default) or ``"topk"``.
* ``random`` - ``p_keep`` (default 0.5) per Top-K expert, ``seed`` (default None); ``policy.reset(seed)``
  reseeds (the evaluator does this per episode).
* ``ppo:PATH``, ``a2c:PATH``, ``maskable_ppo:PATH``, ``recurrent_ppo:PATH`` - a saved
  Stable-Baselines3 / sb3-contrib model, loaded lazily on CPU; ``deterministic`` (default True).
  MaskablePPO gets the same deadline mask as ``env.action_masks()``, rebuilt from the observation.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from baselines.related import (adapmoe_policy, des_policy, greedy_policy, random_policy, topk_policy,
                               wdmoe_policy)
from baselines.prefill_policies import is_prefill, make_prefill_policy
from baselines.siftmoe import solve_decode

__all__ = ["POLICY_NAMES", "SB3_ALGOS", "Policy", "make_policy", "parse_observation", "problem_of"]

POLICY_NAMES = ("topk", "siftmoe", "wdmoe", "des", "adapmoe", "greedy", "random")
SB3_ALGOS = ("ppo", "a2c", "maskable_ppo", "recurrent_ppo")
REQUIRED_KEYS = ("gate_probs", "topk_mask", "topk_weight", "energy_cost", "latency_ratio", "deviation_table",
                 "budget_remaining", "position")


def problem_of(env) -> Any:
    """``env.unwrapped.problem`` with a clear error when the env is not a WIDE decoding env."""
    problem = getattr(getattr(env, "unwrapped", env), "problem", None)
    if problem is None:
        raise TypeError(f"{env!r} has no 'unwrapped.problem'; pass a WIDE environment "
                        "(e.g. gym.make('wide_env/WideMoE-v0'))")
    return problem


def parse_observation(obs, problem) -> tuple[dict[str, np.ndarray], bool]:
    """Observation (dict or flat, single or batched) -> (dict of float64 arrays with a batch axis, single)."""
    if isinstance(obs, dict):
        missing = [k for k in REQUIRED_KEYS if k not in obs]
        if missing:
            raise KeyError(f"observation lacks keys {missing}; policies need the WIDE decoding observation "
                           f"keys {list(REQUIRED_KEYS)}")
        arrays = {k: np.asarray(obs[k], dtype=np.float64) for k in REQUIRED_KEYS}
        single = arrays["gate_probs"].ndim == 1
    else:
        flat = np.asarray(obs, dtype=np.float64)
        slices = problem.obs_slices
        total = max(sl.stop for sl in slices.values())
        if flat.ndim not in (1, 2) or flat.shape[-1] != total:
            raise ValueError(f"flat observation has shape {flat.shape}; expected ({total},) or (B, {total}) "
                             "as laid out by problem.obs_slices")
        single = flat.ndim == 1
        arrays = {k: flat[..., slices[k]] for k in REQUIRED_KEYS}
    if single:
        arrays = {k: v[None] for k, v in arrays.items()}
    E, K = problem.n_experts, problem.top_k
    if arrays["gate_probs"].shape[-1] != E or arrays["deviation_table"].shape[-1] != K * (E + 1):
        raise ValueError(f"observation sizes do not match the problem (E={E}, K={K}): gate_probs "
                         f"{arrays['gate_probs'].shape}, deviation_table {arrays['deviation_table'].shape}")
    return arrays, single


class Policy:
    """Callable policy: ``policy(obs) -> int8 action``; ``reset(seed)`` at episode starts."""

    name = "policy"
    uses_budget = False

    def __init__(self, problem):
        self.problem = problem

    def reset(self, seed: int | None = None) -> None:  # stateless by default
        return None

    def __call__(self, obs):
        arrays, single = parse_observation(obs, self.problem)
        mask = self.select(arrays)
        action = np.asarray(mask, dtype=np.int8)
        return action[0] if single else action

    # helpers --------------------------------------------------------------------------------------
    def feasible(self, a):
        if self.problem.enforce_deadline:
            return a["latency_ratio"] <= 1.0
        return np.ones(a["latency_ratio"].shape, dtype=bool)

    def select(self, a: dict) -> np.ndarray:
        """(B, E) bool mask from the parsed observation; every concrete policy overrides this."""
        raise NotImplementedError(f"{type(self).__name__} must implement select()")


class TopK(Policy):
    name = "topk"

    def select(self, a):
        return topk_policy(a["topk_mask"] > 0.5)


class SiftMoE(Policy):
    name = "siftmoe"
    uses_budget = True

    def __init__(self, problem, *, margin: float = 1e-6, allocation: str = "even"):
        super().__init__(problem)
        if not 0.0 <= margin < 1.0:
            raise ValueError(f"siftmoe margin must be in [0, 1), got {margin}")
        if allocation not in ("even", "greedy"):
            raise ValueError(f"siftmoe allocation must be 'even' or 'greedy', got {allocation!r}")
        self.margin, self.allocation = float(margin), allocation

    def layer_budget(self, a):
        rem = a["budget_remaining"][:, 0]
        if self.problem.budget_mode == "token" and self.allocation == "even":
            L = self.problem.n_layers
            layer = np.rint(a["position"][:, 0] * max(L - 1, 1)).astype(np.int64)
            rem = rem / np.maximum(L - layer, 1)
        return rem * (1.0 - self.margin)

    def select(self, a):
        E, K = self.problem.n_experts, self.problem.top_k
        feas = self.feasible(a)
        energy = np.where(feas, a["energy_cost"], 0.0)
        table = a["deviation_table"].reshape(-1, K, E + 1)
        if table.shape[0] == 1:
            return solve_decode(energy[0], feas[0], table[0], float(self.layer_budget(a)[0]))[None]
        return solve_decode(energy, feas, table, self.layer_budget(a))


class WDMoE(Policy):
    name = "wdmoe"

    def __init__(self, problem, *, threshold: float = 0.5, respect_deadline: bool = True):
        super().__init__(problem)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"wdmoe threshold must be in [0, 1], got {threshold}")
        self.threshold, self.respect_deadline = float(threshold), bool(respect_deadline)

    def select(self, a):
        return wdmoe_policy(a["topk_weight"], a["latency_ratio"], a["topk_mask"] > 0.5, threshold=self.threshold,
                            feasible=self.feasible(a) if self.respect_deadline else None)


class DES(Policy):
    name = "des"

    def __init__(self, problem, *, gamma: float = 0.9, max_experts: int | None = None):
        super().__init__(problem)
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"des gamma must be in [0, 1], got {gamma}")
        self.gamma = float(gamma)
        self.max_experts = problem.top_k if max_experts is None else int(max_experts)
        if self.max_experts < 0:
            raise ValueError(f"des max_experts must be >= 0, got {max_experts}")

    def select(self, a):
        feas = self.feasible(a)
        return des_policy(np.where(feas, a["energy_cost"], 0.0), feas, a["gate_probs"], gamma=self.gamma,
                          max_experts=self.max_experts)


class AdapMoE(Policy):
    name = "adapmoe"

    def __init__(self, problem, *, threshold: float = 0.8):
        super().__init__(problem)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"adapmoe threshold must be in [0, 1], got {threshold}")
        self.threshold = float(threshold)

    def select(self, a):
        return adapmoe_policy(a["topk_weight"], a["topk_mask"] > 0.5, threshold=self.threshold)


class Greedy(Policy):
    name = "greedy"

    def __init__(self, problem, *, k: int | None = None, pool: str = "all"):
        super().__init__(problem)
        if pool not in ("all", "topk"):
            raise ValueError(f"greedy pool must be 'all' or 'topk', got {pool!r}")
        self.k = problem.top_k if k is None else int(k)
        if self.k < 0:
            raise ValueError(f"greedy k must be >= 0, got {k}")
        self.pool = pool

    def select(self, a):
        pool = a["topk_mask"] > 0.5 if self.pool == "topk" else None
        return greedy_policy(a["energy_cost"], self.feasible(a), self.k, pool=pool)


class Random(Policy):
    name = "random"

    def __init__(self, problem, *, p_keep: float = 0.5, seed: int | None = None):
        super().__init__(problem)
        if not 0.0 <= p_keep <= 1.0:
            raise ValueError(f"random p_keep must be in [0, 1], got {p_keep}")
        self.p_keep = float(p_keep)
        self.rng = np.random.default_rng(seed)

    def reset(self, seed=None):
        if seed is not None:
            self.rng = np.random.default_rng(seed)

    def select(self, a):
        return random_policy(self.rng, a["topk_mask"] > 0.5, p_keep=self.p_keep)


class SB3Policy(Policy):
    """A saved Stable-Baselines3 / sb3-contrib model acting on the env's observations."""

    def __init__(self, problem, algo: str, path: str, *, deterministic: bool = True):
        super().__init__(problem)
        self.name = f"{algo}:{path}"
        self.algo, self.path, self.deterministic = algo, path, bool(deterministic)
        self._model = None
        self._state = None

    def _load(self):
        import os

        import torch

        torch.set_num_threads(1)
        if not os.path.exists(self.path) and not os.path.exists(self.path + ".zip"):
            raise FileNotFoundError(f"{self.algo} model file {self.path!r} does not exist; pass the .zip written "
                                    "by model.save(...)")
        if self.algo in ("ppo", "a2c"):
            import stable_baselines3 as sb3

            cls = {"ppo": sb3.PPO, "a2c": sb3.A2C}[self.algo]
        else:
            import sb3_contrib

            cls = {"maskable_ppo": sb3_contrib.MaskablePPO, "recurrent_ppo": sb3_contrib.RecurrentPPO}[self.algo]
        self._model = cls.load(self.path, device="cpu")
        return self._model

    @property
    def model(self):
        return self._model if self._model is not None else self._load()

    def reset(self, seed=None):
        self._state = None
        self._episode_start = True

    def _adapt(self, obs):
        """Convert between the flat and the Dict layout when the model was trained on the other one."""
        from gymnasium import spaces

        space = self.model.observation_space
        slices = self.problem.obs_slices
        if isinstance(space, spaces.Box) and isinstance(obs, dict):
            return np.concatenate([np.asarray(obs[k], dtype=np.float32) for k in slices], axis=-1)
        if isinstance(space, spaces.Dict) and not isinstance(obs, dict):
            flat = np.asarray(obs, dtype=np.float32)
            return {k: flat[..., sl] for k, sl in slices.items()}
        return obs

    def __call__(self, obs):
        arrays, single = parse_observation(obs, self.problem)
        model_obs = self._adapt(obs)
        kwargs = {"deterministic": self.deterministic}
        if self.algo == "maskable_ppo":
            may = self.feasible(arrays)
            masks = np.stack([np.ones_like(may), may], axis=-1).reshape(may.shape[0], -1)
            kwargs["action_masks"] = masks[0] if single else masks
        if self.algo == "recurrent_ppo":
            start = np.array([getattr(self, "_episode_start", True)] * (1 if single else arrays["gate_probs"].shape[0]))
            action, self._state = self.model.predict(model_obs, state=self._state, episode_start=start, **kwargs)
            self._episode_start = False
        else:
            action, _ = self.model.predict(model_obs, **kwargs)
        return np.asarray(action, dtype=np.int8).reshape((-1,) if single else (-1, self.problem.n_experts))


_CLASSES: dict[str, Callable[..., Policy]] = {
    "topk": TopK, "siftmoe": SiftMoE, "wdmoe": WDMoE, "des": DES, "adapmoe": AdapMoE, "greedy": Greedy,
    "random": Random,
}


def make_policy(name: str, env, **kwargs) -> Policy:
    """Build policy ``name`` (see the module docstring) for ``env`` (a WIDE env, wrapped or not)."""
    problem = problem_of(env)
    if not isinstance(name, str):
        raise TypeError(f"policy name must be a string, got {name!r}")
    if ":" in name:
        algo, path = name.split(":", 1)
        algo = algo.strip().lower()
        if algo not in SB3_ALGOS:
            raise ValueError(f"unknown model type {algo!r} in {name!r}; use one of {list(SB3_ALGOS)} as 'algo:path'")
        return SB3Policy(problem, algo, path, **kwargs)
    key = name.strip().lower()
    # --- issue 13 registration hook: the hindsight oracle and the span policies are built from the env ---
    from baselines.spanning import SPAN_POLICY_NAMES, make_span_policy

    if key in SPAN_POLICY_NAMES:
        return make_span_policy(key, env, **kwargs)
    # --- end of the issue 13 hook ---
    if key not in _CLASSES:
        raise ValueError(f"unknown policy {name!r}; choose one of {list(POLICY_NAMES)} or 'algo:path.zip' "
                         f"with algo in {list(SB3_ALGOS)}")
    try:
        if is_prefill(problem):
            return make_prefill_policy(key, problem, _CLASSES[key], **kwargs)
        return _CLASSES[key](problem, **kwargs)
    except TypeError as exc:
        raise TypeError(f"bad keyword arguments for policy {key!r}: {exc}") from None
