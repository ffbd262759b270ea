"""Observation -> action policies for the WIDE decoding environments.

``make_policy(name, env, **kwargs)`` returns a callable ``policy(obs) -> action``.  Policies use only
the observation and ``env.unwrapped.problem`` (the information a learned agent gets): ``obs`` is the
env's Dict observation (1-D arrays, or arrays with a leading batch axis) or its flat observation
(``config={"flatten_observation": True}``; split with ``problem.obs_slices``).  The action is an int8
array of shape (E,), or (B, E) for batched observations.

Derived quantities (all from the observation):

* ``feasible`` = ``deadline_probability > 0`` (the expert may meet the deadline, as far as the device
  knows: helpers' queueing delays are uncertain) while ``problem.enforce_deadline`` is on, else every expert.
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
* ``ALGO:PATH`` with ALGO in :data:`agents.registry.ALGORITHMS` (``ppo``, ``a2c``, ``maskable_ppo``,
  ``recurrent_ppo``) - a saved Stable-Baselines3 / sb3-contrib model (:class:`agents.sb3_policy.SB3Policy`,
  loaded lazily on CPU); ``deterministic`` (default True). MaskablePPO gets :func:`action_masks`, the
  deadline mask of ``env.action_masks()`` rebuilt from the observation.

The observation is parsed by key name from the env's layout (``problem.obs_slices``, built by
:mod:`wide_env.sim.observation`), so keys added there are parsed too.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from baselines.observation import action_masks, feasible_actions, parse_observation, problem_of
from baselines.related import (adapmoe_policy, des_policy, greedy_policy, random_policy, topk_policy,
                               wdmoe_policy)
from baselines.prefill_policies import is_prefill, make_prefill_policy
from baselines.siftmoe import solve_decode

__all__ = ["POLICIES", "POLICY_NAMES", "Policy", "make_policy", "parse_observation", "problem_of", "feasible_actions",
           "action_masks"]


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
        return feasible_actions(a, self.problem)

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


#: the analytic policies by name (the registry; ``algo:PATH`` loads a saved agent instead)
POLICIES: dict[str, Callable[..., Policy]] = {
    "topk": TopK, "siftmoe": SiftMoE, "wdmoe": WDMoE, "des": DES, "adapmoe": AdapMoE, "greedy": Greedy,
    "random": Random,
}
#: policies built from the env (hindsight, or statistics of sample episodes): baselines.oracle, baselines.spanning
SPAN_POLICY_NAMES = ("oracle", "siftmoe_span", "siftmoe_cc", "siftmoe_sdp", "siftmoe_dpp")
POLICY_NAMES = tuple(POLICIES) + SPAN_POLICY_NAMES


def make_policy(name: str, env, **kwargs) -> Policy:
    """Build policy ``name`` (see the module docstring) for ``env`` (a WIDE env, wrapped or not)."""
    problem = problem_of(env)
    if not isinstance(name, str):
        raise TypeError(f"policy name must be a string, got {name!r}")
    if ":" in name:  # a saved agent: agents.sb3_policy (imports torch and SB3 only when it loads the model)
        from agents.registry import algorithm
        from agents.sb3_policy import SB3Policy

        algo, path = name.split(":", 1)
        try:
            algorithm(algo)
        except ValueError as exc:
            raise ValueError(f"{exc} as 'algo:path' in {name!r}") from None
        return SB3Policy.from_path(path.strip(), problem, algo=algo.strip().lower(), **kwargs)
    key = name.strip().lower()
    if key in SPAN_POLICY_NAMES:  # the oracle and the time-spanning policies are built from the env itself
        from baselines.spanning import make_span_policy

        return make_span_policy(key, env, **kwargs)
    if key not in POLICIES:
        from agents.registry import ALGORITHMS

        raise ValueError(f"unknown policy {name!r}; choose one of {list(POLICY_NAMES)} or 'algo:path.zip' "
                         f"with algo in {list(ALGORITHMS)}")
    try:
        if is_prefill(problem):
            return make_prefill_policy(key, problem, POLICIES[key], **kwargs)
        return POLICIES[key](problem, **kwargs)
    except TypeError as exc:
        raise TypeError(f"bad keyword arguments for policy {key!r}: {exc}") from None
