"""RLlib (new API stack) adapters: ``register()`` makes every WIDE env usable by its Gymnasium id.

    import wide_env.integrations.rllib as wide_rllib
    from ray.rllib.algorithms.ppo import PPOConfig

    wide_rllib.register()
    config = (PPOConfig().environment("wide_env/WideMoE-v0", env_config={"config": {"n_tokens": 8}})
              .env_runners(num_envs_per_env_runner=16, gym_env_vectorize_mode="vector_entry_point"))
    algo = config.build_algo()
    algo.train()

What RLlib gets (RLlib has no default encoder for a ``Dict`` observation and no action distribution for
``MultiBinary``):

* observations: the env's one flat ``Box`` (``config={"flatten_observation": True}`` is always set; the
  slices are ``env.unwrapped.problem.obs_slices``). Values are in physical ranges (dB, energy ratios up to
  1e4), so normalise them, e.g. with RLlib's ``MeanStdFilter`` env-to-module connector.
* actions: ``MultiBinary(E)`` presented as ``MultiDiscrete([2] * E)`` (same 0/1 entries, one categorical
  per expert, which RLlib samples with its multi-categorical distribution); the prefill env's
  ``MultiBinary(T * E)`` likewise.
* ``env_config``: the keyword arguments of ``gym.make`` (``{"config": {...}}``, the prefill env's
  ``prompt_tokens`` ...), merged over the id's registered preset (a preset's ``config`` is deep-merged,
  not replaced).
* several envs per EnvRunner: with ``gym_env_vectorize_mode="vector_entry_point"`` RLlib calls the env's
  native vector env (``WideMoEVectorEnv``: one numpy call steps every sub-env, Gymnasium's next-step
  autoreset, which RLlib expects); with RLlib's default ``"sync"`` it builds a ``SyncVectorEnv`` of
  single envs (same dynamics, slower). Ids without a native vector env get the ``SyncVectorEnv`` in both
  modes.

The network: RLlib's default MLP does not learn this task (README, "RLlib"). The project's expert-set network
is an RLlib ``RLModule`` in ``agents/rllib_module.py`` (``expert_set_spec(env)`` -> ``RLModuleSpec``), and
``python -m agents.rllib_ppo --env wide_env/WideMoE-v0 --iterations 100`` trains PPO with it and prints the
comparison with SiftMoE and Top-K. It lives in ``agents`` because it shares its layers with the SB3 policy and
its deadline-mask rule with the SB3 agents (``baselines.observation``), which this package may not import.

Deadline masks (``env.action_masks()``: experts that cannot meet the deadline) are not an observation key:
the flat observation carries ``deadline_probability``, from which that module rebuilds them (an expert with
probability 0 never runs). RLlib's default modules ignore them; the deadline penalty of the reward is then what
teaches an agent to avoid late experts.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import gymnasium as gym
import numpy as np
from gymnasium import spaces

import wide_env
from wide_env.config import deep_merge

__all__ = ["register", "make_env", "make_vector_env", "MultiDiscreteActions", "VectorMultiDiscreteActions"]


def _multidiscrete(space: spaces.Space) -> spaces.MultiDiscrete:
    if not isinstance(space, spaces.MultiBinary):
        raise TypeError(f"expected a MultiBinary action space, got {space}")
    return spaces.MultiDiscrete(np.full(int(np.prod(space.shape)), 2, dtype=np.int64))


class MultiDiscreteActions(gym.ActionWrapper, gym.utils.RecordConstructorArgs):
    """``MultiBinary(n)`` presented as ``MultiDiscrete([2] * n)``: the same 0/1 vector, another space."""

    def __init__(self, env: gym.Env):
        gym.utils.RecordConstructorArgs.__init__(self)
        gym.ActionWrapper.__init__(self, env)
        self._binary = env.action_space
        self.action_space = _multidiscrete(env.action_space)

    def action(self, action):
        return np.asarray(action, dtype=np.int8).reshape(self._binary.shape)


class VectorMultiDiscreteActions(gym.vector.VectorActionWrapper):
    """The vector-env counterpart of :class:`MultiDiscreteActions` (batched ``(num_envs, n)`` actions)."""

    def __init__(self, env: gym.vector.VectorEnv):
        super().__init__(env)
        self._binary = env.single_action_space
        self.single_action_space = _multidiscrete(env.single_action_space)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, env.num_envs)

    def actions(self, actions):
        return np.asarray(actions, dtype=np.int8).reshape((self.num_envs, *self._binary.shape))


def _kwargs(env_id: str, env_config: Mapping[str, Any] | None) -> dict:
    """gym.make kwargs: the registered preset, the user's env_config merged over it, flat observations."""
    user = {k: v for k, v in dict(env_config or {}).items() if k != "num_envs"}
    config = user.get("config")
    if config is not None and not isinstance(config, Mapping):  # a WideConfig
        user["config"] = config.to_dict()
    merged = deep_merge(dict(gym.spec(env_id).kwargs), user)
    return deep_merge(merged, {"config": {"flatten_observation": True}})


def make_env(env_id: str, env_config: Mapping[str, Any] | None = None) -> gym.Env:
    """One RLlib-ready env: flat observation, ``MultiDiscrete([2] * n)`` actions."""
    return MultiDiscreteActions(gym.make(env_id, **_kwargs(env_id, env_config)))


def make_vector_env(env_id: str, num_envs: int, env_config: Mapping[str, Any] | None = None) -> gym.vector.VectorEnv:
    """``num_envs`` RLlib-ready envs: the native vector env where the id has one, else a SyncVectorEnv."""
    kwargs = _kwargs(env_id, env_config)
    if gym.spec(env_id).vector_entry_point is not None:
        venv = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="vector_entry_point", **kwargs)
    else:
        venv = gym.vector.SyncVectorEnv([functools.partial(gym.make, env_id, **kwargs) for _ in range(num_envs)])
    return VectorMultiDiscreteActions(venv)


def _creator(env_id: str, env_config: Mapping[str, Any] | None):
    """RLlib's env creator: RLlib adds ``num_envs`` when it asks for a vector env (vector_entry_point mode)."""
    import wide_env  # noqa: F401  (registers the ids in RLlib's worker processes)

    num_envs = (env_config or {}).get("num_envs")
    if num_envs is not None:
        return make_vector_env(env_id, int(num_envs), env_config)
    return make_env(env_id, env_config)


def register(env_ids=None) -> list[str]:
    """Register ``env_ids`` (default: every id of ``wide_env.ENVIRONMENTS``) with RLlib under their
    Gymnasium ids, so ``PPOConfig().environment("wide_env/WideMoE-v0")`` works. Idempotent; returns the ids."""
    from ray.tune.registry import register_env

    ids = list(wide_env.ENVIRONMENTS if env_ids is None else env_ids)
    for env_id in ids:
        gym.spec(env_id)  # unknown ids fail here, with Gymnasium's message
        register_env(env_id, functools.partial(_creator, env_id))
    return ids
