"""Reward shaping for training: the token's real loss increase, credited to the layer that caused it.

The decoding env reports, at every step, the running estimate of the current token's real loss change
(``info["delta_loss"]``, nats, from the gating source's effect tables: the perturbations of the token's layers so
far); it is final at ``token_complete``. With ``reward.objective = "accuracy"`` the env pays
``-accuracy_weight x delta_loss`` once, at the token's last layer (``info["reward_accuracy"]``), so the layers
before it get their consequence only through discounting.

:class:`AccuracyShaping` (a VecEnv wrapper, YAML key ``reward_shaping: {accuracy_weight: W}``) pays each step
``-W x (delta_loss_t - delta_loss_(t-1))`` instead, the increment of the running estimate since the token's
previous layer (0 before its first layer), and removes the env's own ``reward_accuracy``:

    r'_t = r_t - reward_accuracy_t - W (delta_loss_t - delta_loss_(t-1))

Over a token the increments telescope to ``-W x delta_loss`` (the final value), so with the env's own weight the
shaped return of every token equals the env's (a redistribution within the token); with the deviation objective
it adds the real-accuracy term the benchmark judges agents on. Because the effect tables' loss change is a sum of
the layers' single-perturbation effects, each increment is exactly what the step's action did to the token's
loss, so a per-layer (gamma = 0) learner sees all of it. The env's reward and the evaluation are untouched: only
the training signal changes.
"""

from __future__ import annotations

import numpy as np
from stable_baselines3.common.vec_env import VecEnvWrapper

__all__ = ["AccuracyShaping", "SHAPING_KEYS", "wrap_reward_shaping"]

#: keys of the YAML's ``reward_shaping`` mapping
SHAPING_KEYS = ("accuracy_weight",)


class AccuracyShaping(VecEnvWrapper):
    """``r'_t = r_t - reward_accuracy_t - weight (delta_loss_t - delta_loss_(t-1))`` (module docstring)."""

    def __init__(self, venv, accuracy_weight: float):
        super().__init__(venv)
        w = float(accuracy_weight)
        if not (np.isfinite(w) and w >= 0):
            raise ValueError(f"reward_shaping.accuracy_weight must be a finite number >= 0 (1/nat), got {accuracy_weight!r}")
        self.accuracy_weight = w
        self._running = np.zeros(self.num_envs)

    def reset(self):
        self._running[:] = 0.0
        return self.venv.reset()

    def step_wait(self):
        obs, reward, done, infos = self.venv.step_wait()
        reward = np.asarray(reward, dtype=np.float32).copy()
        for i, info in enumerate(infos):
            if "delta_loss" not in info:
                raise ValueError("reward_shaping.accuracy_weight needs the env's real accuracy (info['delta_loss']): "
                                 "a gating trace with effect tables, e.g. the shipped one; remove reward_shaping "
                                 "for sources without it")
            current = float(info["delta_loss"])
            before = 0.0 if int(info.get("layer", 0)) == 0 else self._running[i]
            reward[i] += -float(info.get("reward_accuracy", 0.0)) - self.accuracy_weight * (current - before)
            self._running[i] = 0.0 if done[i] else current
        return obs, reward, done, infos


def wrap_reward_shaping(venv, shaping: dict | None):
    """``venv`` wrapped as the YAML's ``reward_shaping`` mapping says (None or empty: unchanged)."""
    if not shaping:
        return venv
    if not isinstance(shaping, dict):
        raise ValueError(f"reward_shaping must be a mapping such as {{accuracy_weight: 10.0}}, got {shaping!r}")
    unknown = sorted(set(shaping) - set(SHAPING_KEYS))
    if unknown:
        raise ValueError(f"reward_shaping: unknown keys {unknown}; known: {list(SHAPING_KEYS)}")
    if "accuracy_weight" in shaping:
        venv = AccuracyShaping(venv, shaping["accuracy_weight"])
    return venv
