"""RLlib's PPO (new API stack) on WideMoE-v0 through ``wide_env.integrations.rllib.register()``.

Skipped unless RLlib is importable: ``ray[rllib]`` pins gymnasium 1.2.2, so CI runs this file in a
second virtual environment (see .ci/run)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

pytest.importorskip("ray.rllib")

import ray  # noqa: E402

import wide_env  # noqa: E402
from wide_env.envs.vector import WideMoEVectorEnv  # noqa: E402
from wide_env.integrations import rllib as wide_rllib  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=1, include_dashboard=False, object_store_memory=80 * 2 ** 20)
    yield
    ray.shutdown()


def test_register_every_env():
    from ray.tune.registry import ENV_CREATOR, _global_registry

    ids = wide_rllib.register()
    assert set(ids) == set(wide_env.ENVIRONMENTS)
    for env_id in ids:
        assert _global_registry.contains(ENV_CREATOR, env_id)
    env = _global_registry.get(ENV_CREATOR, "wide_env/WideMoE-v0")({"config": {"n_tokens": 2}})
    assert isinstance(env.observation_space, gym.spaces.Box)
    assert isinstance(env.action_space, gym.spaces.MultiDiscrete)


@pytest.mark.parametrize("mode", ["vector_entry_point", "sync"])
def test_ppo_trains_one_iteration(local_ray, mode):
    from ray.rllib.algorithms.ppo import PPOConfig

    wide_rllib.register()
    config = (PPOConfig()
              .environment("wide_env/WideMoE-v0", env_config={"config": {"n_tokens": 4}})
              .env_runners(num_env_runners=0, num_envs_per_env_runner=4, gym_env_vectorize_mode=mode)
              .training(train_batch_size_per_learner=256, minibatch_size=64, num_epochs=1))
    algo = config.build_algo()
    try:
        env = algo.env_runner.env.unwrapped
        if mode == "vector_entry_point":  # RLlib asked for 4 envs: the native batched env serves them
            assert isinstance(env, WideMoEVectorEnv) and env.num_envs == 4
        else:
            assert isinstance(env, gym.vector.SyncVectorEnv)
        result = algo.train()
        runners = result["env_runners"]
        assert runners["num_env_steps_sampled"] >= 256
        assert runners["num_episodes"] >= 1 and np.isfinite(runners["episode_return_mean"])
        assert result["learners"]["default_policy"]["num_module_steps_trained"] > 0
    finally:
        algo.stop()
