"""Reward shaping for training: the token's real loss increase, credited to the layer that caused it.

The decoding env reports, at every step, the running estimate of the current token's real loss change
(``info["delta_loss"]``, nats, from the gating source's effect tables: the perturbations of the token's layers so
far); it is final at ``token_complete``. With ``reward.objective = "accuracy"`` the env pays
``-accuracy_weight x delta_loss`` once, at the token's last layer (``info["reward_accuracy"]``), so the layers
before it get their consequence only through discounting.

:class:`RewardShaping` (a VecEnv wrapper, YAML key ``reward_shaping: {accuracy_weight: W}``) pays each step
``-W x (delta_loss_t - delta_loss_(t-1))`` instead, the increment of the running estimate since the token's
previous layer (0 before its first layer), and removes the env's own ``reward_accuracy``:

    r'_t = r_t - reward_accuracy_t - W (delta_loss_t - delta_loss_(t-1))

``correct_weight: C`` adds ``C x (correct_t - correct_(t-1))``, the change of the running estimate of whether
the token's prediction is still right (``info["accuracy_correct"]``; before the first layer it is the full model's,
``accuracy_full``): over a token, C x (final correctness - the full model's), the metric the benchmark judges.

``energy: absolute`` (default ``relative``, the env's) pays the energy in joules over one fixed scale instead of
relative to each state's Top-K energy: ``-energy_j / E_scale`` replaces ``reward_energy``, with E_scale the
median Top-K energy of the config's sample episodes (:mod:`baselines.span_stats`, the same scale the span
baselines plan in). The env's relative energy values saving 10% of a cheap token as much as 10% of an expensive
one; the benchmark measures joules, and a policy that skips where energy is dear saves more of them.

``violation_weight: V`` adds ``-V`` on every step that violates its deviation budget (``info["budget_violated"]``),
on top of the env's own penalty: the benchmark compares agents with baselines that never violate, so an agent
that trades a few violations for energy must be pushed harder than the env's default weight does.

Over a token the increments telescope to ``-W x delta_loss`` (the final value), so with the env's own weight the
shaped return of every token equals the env's (a redistribution within the token); with the deviation objective
it adds the real-accuracy term the benchmark judges agents on. With the rule's accuracy (effect tables) the loss
change is a sum of the layers' single-perturbation effects, so each increment is exactly what the step's action
did to the token's loss and a per-layer (gamma = 0) learner sees all of it. With the model's accuracy (every
benchmark regime's source) ``delta_loss`` is 0 before the token's last layer, so the whole term arrives there:
``token_credit: true`` (:mod:`agents.token_credit`) pays it at every layer of the token. The env's reward and the
evaluation are untouched: only the training signal changes.
"""

from __future__ import annotations

import numpy as np
from stable_baselines3.common.vec_env import VecEnvWrapper

from wide_env.rules import compose_reward

__all__ = ["RewardShaping", "SHAPING_KEYS", "ENERGY_UNITS", "wrap_reward_shaping", "energy_scale"]

#: keys of the YAML's ``reward_shaping`` mapping
SHAPING_KEYS = ("accuracy_weight", "correct_weight", "energy", "violation_weight", "token_credit")
ENERGY_UNITS = ("relative", "absolute")
#: steps the token-credit records may hold before a rollout takes them (a rollout holds n_steps)
MAX_RECORDS = 100_000
#: sample episodes behind the absolute energy scale
SCALE_EPISODES = 8


def _weight(name: str, value) -> float:
    w = float(value)
    if not (np.isfinite(w) and w >= 0):
        raise ValueError(f"reward_shaping.{name} must be a finite number >= 0, got {value!r}")
    return w


def energy_scale(config) -> float:
    """J: the median Top-K energy of the config's sample episodes (:func:`baselines.span_stats.span_statistics`)."""
    from baselines.span_stats import STATS_SEED, span_statistics

    return float(span_statistics(config, SCALE_EPISODES, STATS_SEED).energy_scale)


class RewardShaping(VecEnvWrapper):
    """``r'_t = r_t - reward_accuracy_t - W (delta_loss_t - delta_loss_(t-1)) + C (correct_t - correct_(t-1))
    - V [violated]``, with ``energy="absolute"`` also ``reward_energy`` replaced by ``-energy_j / E_scale`` (module
    docstring)."""

    def __init__(self, venv, accuracy_weight: float = 0.0, correct_weight: float = 0.0, energy: str = "relative",
                 violation_weight: float = 0.0, token_credit: bool = False):
        super().__init__(venv)
        if not isinstance(token_credit, bool):
            raise ValueError(f"reward_shaping.token_credit must be true or false, got {token_credit!r}")
        #: token credit (agents/token_credit.py) reads each step's shaped reward, accuracy term, layer, completion
        self.records_steps = token_credit
        self._records: list[tuple] = []
        self.violation_weight = _weight("violation_weight", violation_weight)
        self.accuracy_weight = _weight("accuracy_weight", accuracy_weight)
        self.correct_weight = _weight("correct_weight", correct_weight)
        if energy not in ENERGY_UNITS:
            raise ValueError(f"reward_shaping.energy must be one of {list(ENERGY_UNITS)}, got {energy!r}")
        self.energy_scale = energy_scale(venv.get_attr("config")[0]) if energy == "absolute" else None
        self._loss = np.zeros(self.num_envs)
        self._correct = np.zeros(self.num_envs)

    def reset(self):
        self._loss[:] = 0.0
        self._correct[:] = 0.0
        return self.venv.reset()

    def step_wait(self):
        obs, reward, done, infos = self.venv.step_wait()
        reward = np.asarray(reward, dtype=np.float32).copy()
        terms = [None] * len(infos)
        for i, info in enumerate(infos):
            if "delta_loss" not in info:
                raise ValueError("reward_shaping needs the env's real accuracy (info['delta_loss'], "
                                 "info['accuracy_correct']): a gating trace with effect tables, e.g. the shipped one; "
                                 "remove reward_shaping for sources without it")
            loss, correct = float(info["delta_loss"]), float(info["accuracy_correct"])
            first = int(info.get("layer", 0)) == 0  # a new token: nothing perturbed before this layer
            loss_before = 0.0 if first else self._loss[i]
            correct_before = float(info["accuracy_full"]) if first else self._correct[i]
            # the env's terms with the shaped ones in their place, summed by the env's rule
            accuracy = -self.accuracy_weight * (loss - loss_before) + self.correct_weight * (correct - correct_before)
            deviation = float(info["reward_deviation"]) - self.violation_weight * float(info["budget_violated"])
            energy = float(info["reward_energy"])
            if self.energy_scale is not None:  # as tests/test_shaping_and_prior.py pins it: added to the env's term
                energy += energy - float(info["energy_j"]) / self.energy_scale
            reward[i] = compose_reward(energy, deviation, float(info["reward_deadline"]), accuracy)
            self._loss[i], self._correct[i] = (0.0, 0.0) if done[i] else (loss, correct)
            if self.records_steps:
                terms[i] = (accuracy, int(info.get("layer", 0)), bool(info.get("token_complete", False)))
        if self.records_steps:
            if len(self._records) >= MAX_RECORDS:
                raise RuntimeError(f"reward_shaping.token_credit: {MAX_RECORDS} steps recorded and never taken; "
                                   "train with agents.token_credit.TokenCredit as a callback (train.py adds it)")
            self._records.append((reward.copy(), *(np.array(column) for column in zip(*terms))))
        return obs, reward, done, infos

    def clear_records(self) -> None:
        self._records.clear()

    def take_records(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The steps since :meth:`clear_records`, each (n_steps, n_envs): shaped reward, accuracy term, layer,
        token complete."""
        shaped, accuracy, layer, complete = (np.stack(column) for column in zip(*self._records))
        self._records.clear()
        return shaped, accuracy, layer, complete


def wrap_reward_shaping(venv, shaping: dict | None):
    """``venv`` wrapped as the YAML's ``reward_shaping`` mapping says (None or empty: unchanged)."""
    if not shaping:
        return venv
    if not isinstance(shaping, dict):
        raise ValueError(f"reward_shaping must be a mapping such as {{accuracy_weight: 10.0}}, got {shaping!r}")
    unknown = sorted(set(shaping) - set(SHAPING_KEYS))
    if unknown:
        raise ValueError(f"reward_shaping: unknown keys {unknown}; known: {list(SHAPING_KEYS)}")
    return RewardShaping(venv, **shaping)
