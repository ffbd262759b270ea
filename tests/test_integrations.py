"""The RLlib adapters themselves (flat observations, MultiDiscrete actions, presets, native vector env):
plain Gymnasium, so they run without Ray. RLlib training itself: tests/test_rllib.py."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.utils.env_checker import check_env

from wide_env.envs.vector import WideMoEVectorEnv
from wide_env.integrations.rllib import make_env, make_vector_env

SMALL = {"config": {"n_tokens": 4}}


@pytest.mark.filterwarnings("ignore:.*different from the unwrapped version")
@pytest.mark.parametrize("env_id", ["wide_env/WideMoE-v0", "wide_env/WideMoEPrefill-v0"])
def test_adapter_spaces_and_checker(env_id):
    env = make_env(env_id, {"config": {"n_tokens": 2}} if "Prefill" not in env_id else {})
    assert isinstance(env.observation_space, spaces.Box) and env.observation_space.shape[0] > 0
    binary = env.unwrapped.action_space
    assert isinstance(env.action_space, spaces.MultiDiscrete)
    assert list(env.action_space.nvec) == [2] * int(np.prod(binary.shape))
    check_env(env.unwrapped, skip_render_check=True)  # the env RLlib wraps passes Gymnasium's checks
    check_env(env, skip_render_check=True)


def test_actions_mean_the_same_as_multibinary():
    wrapped = make_env("wide_env/WideMoE-v0", SMALL)
    raw = gym.make("wide_env/WideMoE-v0", config={"n_tokens": 4, "flatten_observation": True})
    o1, _ = wrapped.reset(seed=3)
    o2, _ = raw.reset(seed=3)
    rng = np.random.default_rng(0)
    for _ in range(16):  # one whole episode (4 tokens x 4 layers)
        a = rng.integers(0, 2, size=wrapped.action_space.shape)
        o1, r1, *_ , i1 = wrapped.step(a)
        o2, r2, *_ , i2 = raw.step(a.astype(np.int8))
        assert np.array_equal(o1, o2) and r1 == r2 and i1["energy_j"] == i2["energy_j"]


def test_env_config_merges_over_the_preset():
    env = make_env("wide_env/WideMoE-Mixtral-v0", {"config": {"n_tokens": 2}})
    assert env.unwrapped.config.profile == "mixtral-8x7b" and env.unwrapped.config.n_tokens == 2
    assert env.unwrapped.config.flatten_observation


def test_bad_env_config_names_the_field():
    with pytest.raises(Exception, match="n_tokns"):
        make_env("wide_env/WideMoE-v0", {"config": {"n_tokns": 4}})


def test_vector_adapter_is_the_native_vector_env():
    venv = make_vector_env("wide_env/WideMoE-v0", 3, {**SMALL, "num_envs": 3})
    assert isinstance(venv.unwrapped, WideMoEVectorEnv) and venv.num_envs == 3
    assert venv.single_action_space == spaces.MultiDiscrete([2] * venv.unwrapped.single_action_space.n)
    obs, info = venv.reset(seed=0)
    assert obs.shape == (3,) + venv.single_observation_space.shape
    for _ in range(17):  # past one 16-step episode: next-step autoreset
        obs, rew, term, trunc, info = venv.step(venv.action_space.sample())
        assert rew.shape == (3,) and obs.shape[0] == 3
    # the same batch of actions means the same thing as MultiBinary rows on the raw vector env
    raw = gym.make_vec("wide_env/WideMoE-v0", num_envs=3, vectorization_mode="vector_entry_point",
                       config={"n_tokens": 4, "flatten_observation": True})
    a = np.ones((3, venv.single_action_space.shape[0]), dtype=np.int64)
    venv.reset(seed=1)
    raw.reset(seed=1)
    assert np.array_equal(venv.step(a)[1], raw.step(a.astype(bool))[1])


def test_vector_adapter_without_native_core_falls_back_to_sync():
    venv = make_vector_env("wide_env/WideMoEPrefill-v0", 2)
    assert venv.num_envs == 2 and isinstance(venv.single_action_space, spaces.MultiDiscrete)
    venv.reset(seed=0)
    venv.step(venv.action_space.sample())
