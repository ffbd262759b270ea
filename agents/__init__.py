"""RL agents for the WIDE environments: SB3 PPO / A2C and sb3-contrib MaskablePPO with either a plain MLP
over the scaled observation or a permutation-equivariant expert-set network; the training driver behind
``wide-train`` / ``python -m agents`` / ``train.py`` (see :mod:`agents.run`); algorithm and network names
in :mod:`agents.registry`."""

from agents.registry import ALGORITHMS, NETWORKS, TRAINABLE_ALGORITHMS

__all__ = ["ALGORITHMS", "NETWORKS", "TRAINABLE_ALGORITHMS"]
