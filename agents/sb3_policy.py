"""A saved or in-memory Stable-Baselines3 / sb3-contrib model as a ``policy(obs) -> action`` callable.

The one wrapper of a learned agent: ``baselines.make_policy("ppo:PATH", env)``, ``baselines.evaluate``
and train.py's evaluations all use it. Torch and SB3 are imported only when a model is loaded.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any

import numpy as np

from agents.registry import algorithm, algorithm_name_of
from agents.safe_load import (ModelLoadError, check_environment, detect_algorithm, read_model_data,
                               safe_custom_objects)
from baselines.observation import action_masks, parse_observation
from wide_env.models.torch_threads import one_torch_thread  # noqa: F401  (the agents' networks are tiny: one thread)


def load_model(algo: str, path: str, problem=None, *, env=None, schedules: dict | None = None, **kwargs: Any):
    """``ALGO.load(path)`` on CPU without unpickling anything from the zip (:mod:`agents.safe_load`).

    ``problem``: the env's static facts; a model trained for another expert count or observation layout is a
    :class:`ModelLoadError` naming both. ``env``: the VecEnv a resumed model trains on (its spaces are used);
    ``schedules``: the run's own learning-rate / clip-range settings (train.py --resume). FileNotFoundError for a
    missing file, :class:`ModelLoadError` naming the file for a truncated, foreign or unsafe one, or one saved by
    another algorithm (with the prefix to use)."""
    cls = algorithm(algo).load_class()
    file = path if os.path.exists(path) else path + ".zip"
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{algo} model file {path!r} does not exist; pass the .zip written by model.save(...)")
    data = read_model_data(file, algo)
    saved_by = detect_algorithm(data)
    if saved_by is not None and saved_by != str(algo).strip().lower():
        raise ModelLoadError(f"{file!r} holds a {saved_by} model ({algorithm(saved_by).class_name}), not a "
                             f"{algo} one; load it as {saved_by}:{path}")
    objects = safe_custom_objects(data, algo, file, schedules=schedules,
                                  observation_space=None if env is None else env.observation_space,
                                  action_space=None if env is None else env.action_space)
    if problem is not None:
        check_environment(objects["observation_space"], objects["action_space"], problem, algo, file)
    try:
        with one_torch_thread():
            return cls.load(file, env=env, device="cpu", custom_objects=objects, **kwargs)
    except (zipfile.BadZipFile, EOFError, KeyError, ValueError, AssertionError, RuntimeError, OSError,
            TypeError) as exc:
        raise ModelLoadError(f"cannot load the {algo} model {file!r}: the file is truncated or not a model saved by "
                             f"{cls.__name__}.save ({type(exc).__name__}: {exc}); re-save it or pick another "
                             "checkpoint") from None


class SB3Policy:
    """A trained model acting on raw env observations (single or batched, Dict or flat).

    Deterministic by default. A maskable algorithm gets :func:`baselines.observation.action_masks` (the
    deadline mask of ``env.action_masks()``, rebuilt from the observation); a recurrent one carries its
    state across the steps of an episode (``reset`` at episode starts). ``vecnorm``: optional VecNormalize
    whose (frozen) statistics normalise observations first. A model trained on the flat layout acts on
    Dict observations and vice versa (converted with ``problem.obs_slices``)."""

    def __init__(self, model, problem, *, vecnorm=None, deterministic: bool = True, name: str | None = None):
        self.problem, self.vecnorm, self.deterministic = problem, vecnorm, bool(deterministic)
        self._model = model
        self._algo = None if model is None else algorithm_name_of(model)
        self.name = name or (self._algo or "agent")
        self._path = None
        self._state = None
        self._episode_start = True

    @classmethod
    def from_path(cls, path: str, problem, *, algo: str, deterministic: bool = True) -> "SB3Policy":
        """A policy whose model ``algo`` is loaded from ``path`` when first used."""
        algorithm(algo)
        policy = cls(None, problem, deterministic=deterministic, name=f"{algo}:{path}")
        policy._algo, policy._path = algo, path
        return policy

    @property
    def algo(self) -> str:
        return self._algo

    @property
    def model(self):
        if self._model is None:
            self._model = load_model(self._algo, self._path, self.problem)
        return self._model

    def reset(self, seed: int | None = None) -> None:
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
        with one_torch_thread():
            return self._act(obs)

    def _act(self, obs):
        arrays, single = parse_observation(obs, self.problem)
        batch = next(iter(arrays.values())).shape[0]
        model_obs = self._adapt(obs)
        if self.vecnorm is not None:
            model_obs = self.vecnorm.normalize_obs(model_obs)
        spec = algorithm(self._algo)
        kwargs: dict[str, Any] = {"deterministic": self.deterministic}
        if spec.maskable:
            kwargs["action_masks"] = action_masks(obs, self.problem)
        if spec.recurrent:
            start = np.full(1 if single else batch, self._episode_start)
            action, self._state = self.model.predict(model_obs, state=self._state, episode_start=start, **kwargs)
            self._episode_start = False
        else:
            action, _ = self.model.predict(model_obs, **kwargs)
        n_actions = int(np.prod(self.model.action_space.shape))
        return np.asarray(action, dtype=np.int8).reshape((n_actions,) if single else (batch, n_actions))
