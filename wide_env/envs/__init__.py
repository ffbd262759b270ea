"""Gymnasium front ends over the simulation core."""

from wide_env.envs.decode import WideMoEEnv
from wide_env.envs.prefill import WideMoEPrefillEnv

__all__ = ["WideMoEEnv", "WideMoEPrefillEnv"]
