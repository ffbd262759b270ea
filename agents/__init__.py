"""RL agents for the WIDE environments: SB3 PPO / A2C and sb3-contrib MaskablePPO with either a plain MLP
over the scaled observation or a permutation-equivariant expert-set network; training driver behind
``train.py`` (see :mod:`agents.run`)."""

ALGOS = ("ppo", "a2c", "maskable_ppo")

__all__ = ["ALGOS"]
