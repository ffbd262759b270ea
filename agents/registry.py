"""The registries of learned agents: RL algorithms and policy networks (names defined here only).

Importing this module imports neither torch nor Stable-Baselines3 (:mod:`agents.plugin`, through which
``baselines`` loads saved models, reads it and must stay importable without them).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Algorithm:
    """An SB3 / sb3-contrib algorithm: where its class lives and how its policy is called."""

    module: str
    class_name: str
    #: train.py trains it (only PPO, A2C and MaskablePPO take the envs' MultiBinary actions with our networks)
    trainable: bool
    #: predict() takes ``action_masks`` (sb3-contrib's MultiBinary layout)
    maskable: bool = False
    #: predict() carries a recurrent state and ``episode_start`` flags
    recurrent: bool = False

    def load_class(self):
        return getattr(importlib.import_module(self.module), self.class_name)


ALGORITHMS = {
    "ppo": Algorithm("stable_baselines3", "PPO", trainable=True),
    "a2c": Algorithm("stable_baselines3", "A2C", trainable=True),
    "maskable_ppo": Algorithm("sb3_contrib", "MaskablePPO", trainable=True, maskable=True),
    "recurrent_ppo": Algorithm("sb3_contrib", "RecurrentPPO", trainable=False, recurrent=True),
}
#: algorithms train.py accepts for --algo
TRAINABLE_ALGORITHMS = tuple(name for name, algo in ALGORITHMS.items() if algo.trainable)

#: policy networks of :mod:`agents.networks`, by the name used in the hyperparameter files and --policy;
#: any other name (``MultiInputPolicy``, ``MlpPolicy``) goes to SB3 unchanged
NETWORKS = {
    "expert_set": "permutation-equivariant expert-set network (default): one token per action entry",
    "mlp": "SB3's MLP over every observation key scaled to O(1)",
}
#: SB3's own policy names, accepted as they are
SB3_POLICY_NAMES = ("MultiInputPolicy", "MlpPolicy")


def algorithm(name: str) -> Algorithm:
    """The registry entry of ``name`` (case-insensitive), or ValueError listing the known names."""
    key = str(name).strip().lower()
    if key not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {list(ALGORITHMS)}")
    return ALGORITHMS[key]


def algorithm_name_of(model) -> str:
    """The registry name of a loaded SB3 model (by its class)."""
    for name, algo in ALGORITHMS.items():
        if type(model).__name__ == algo.class_name:
            return name
    raise ValueError(f"{type(model).__name__} is not a registered algorithm; known: "
                     f"{[a.class_name for a in ALGORITHMS.values()]}")
