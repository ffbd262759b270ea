"""Gymnasium front ends over the simulation core."""

from wide_env.envs.decode import WideMoEEnv

__all__ = ["WideMoEEnv"]
