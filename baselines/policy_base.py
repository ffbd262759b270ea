"""The base of every observation -> action policy, below the policy modules that build on it (analytic, spanning,
oracle) and the registry that names them (:mod:`baselines.policies`)."""
from __future__ import annotations

import numpy as np

from baselines.observation import feasible_actions, parse_observation

__all__ = ["Policy", "SPAN_POLICY_NAMES"]

#: policies built from the env (hindsight, or statistics of sample episodes): baselines.oracle, baselines.spanning
SPAN_POLICY_NAMES = ("oracle", "siftmoe_span", "siftmoe_cc", "siftmoe_sdp", "siftmoe_dpp")


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
