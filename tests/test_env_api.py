"""WideMoE-v0 against the Gymnasium and SB3 contracts: checkers, registration, determinism, errors."""

import copy
import os
import pickle
import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest

import wide_env
from wide_env.envs.decode import INFO_KEYS, WideMoEEnv

SYNTH = {"gating": {"source": "synthetic"}}


def rollout(env, seed, steps, policy="random"):
    obs, _ = env.reset(seed=seed)
    env.action_space.seed(seed)
    trace = []
    for _ in range(steps):
        action = env.action_space.sample() if policy == "random" else obs["topk_mask"].astype(np.int8)
        obs, reward, term, trunc, info = env.step(action)
        trace.append((np.concatenate(list(obs.values())), reward, info["energy_j"], info["deviation"]))
        if term or trunc:
            obs, _ = env.reset()
    return trace


@pytest.mark.parametrize("env_id", sorted(wide_env.ENVIRONMENTS))
def test_gymnasium_check_env_no_warnings(env_id):
    from gymnasium.utils.env_checker import check_env

    env = gym.make(env_id)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped, skip_render_check=True)


def test_gymnasium_check_env_flat_and_render():
    from gymnasium.utils.env_checker import check_env

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env = gym.make("wide_env/WideMoE-v0", config={"flatten_observation": True}, render_mode="ansi")
        check_env(env.unwrapped)


def test_sb3_check_env():
    from stable_baselines3.common.env_checker import check_env

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(WideMoEEnv(), warn=True)
        check_env(WideMoEEnv({"flatten_observation": True}), warn=True)


def test_make_after_import_and_presets_are_json_able():
    import json

    for env_id, (_, kwargs) in wide_env.ENVIRONMENTS.items():
        json.dumps(kwargs)
        assert gym.spec(env_id).kwargs == kwargs
    env = gym.make("wide_env/WideMoE-v0")
    assert isinstance(env.unwrapped, WideMoEEnv)
    wide_env.register_envs()  # idempotent: no error, no duplicate warning


def run_in_fresh_process(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter from the repository root; fail with its stderr if it fails."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr
    return out


def test_make_with_module_prefix_in_fresh_process():
    code = ("import gymnasium as gym, sys\n"
            "assert 'wide_env' not in sys.modules\n"
            "env = gym.make('wide_env:wide_env/WideMoE-v0')\n"
            "obs, info = env.reset(seed=0)\n"
            "obs, r, te, tr, info = env.step(env.action_space.sample())\n"
            "print(type(env.unwrapped).__name__, isinstance(r, float))\n")
    out = run_in_fresh_process(code)
    assert out.stdout.strip() == "WideMoEEnv True"


@pytest.mark.parametrize("config", [{}, SYNTH, {"profile": "gpt-oss-20b", "channel": {"correlation": 0.7}}])
def test_same_seed_same_trajectory_and_different_seeds_differ(config):
    a = rollout(WideMoEEnv(config), 7, 200)
    b = rollout(WideMoEEnv(config), 7, 200)
    c = rollout(WideMoEEnv(config), 8, 200)
    for (oa, ra, ea, da), (ob, rb, eb, db) in zip(a, b):
        assert np.array_equal(oa, ob) and ra == rb and ea == eb and da == db
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, c))


def test_pickle_and_deepcopy_round_trip_continue_identically():
    env = WideMoEEnv()
    env.reset(seed=3)
    for _ in range(5):
        env.step(env.action_space.sample())
    for clone in (pickle.loads(pickle.dumps(env)), copy.deepcopy(env)):
        action = np.ones(env.action_space.n, dtype=np.int8)
        o1, r1, *_ = copy.deepcopy(env).step(action)
        o2, r2, *_ = clone.step(action)
        assert r1 == r2
        for key in o1:
            assert np.array_equal(o1[key], o2[key])


@pytest.mark.parametrize("n_tokens", [1, 3])
def test_truncation_exactly_at_episode_length(n_tokens):
    env = WideMoEEnv({"n_tokens": n_tokens})
    env.reset(seed=0)
    L = env.problem.n_layers
    for t in range(n_tokens * L):
        _, _, term, trunc, info = env.step(env.action_space.sample())
        assert not term
        assert trunc == (t == n_tokens * L - 1)
        assert info["layer"] == t % L and info["token"] == t // L
    with pytest.raises(RuntimeError, match="reset"):
        env.step(env.action_space.sample())


def test_info_keys_always_present_and_numeric():
    env = WideMoEEnv()
    env.reset(seed=0)
    for _ in range(40):
        _, reward, _, _, info = env.step(env.action_space.sample())
        assert isinstance(reward, float)
        for key in INFO_KEYS + ("layer", "token"):
            assert isinstance(info[key], (int, float)) and not isinstance(info[key], bool), key
        total = info["reward_energy"] + info["reward_deviation"] + info["reward_deadline"]
        assert reward == pytest.approx(total)
        assert info["energy_uplink_j"] <= info["energy_comm_j"] <= info["energy_system_j"]


@pytest.mark.parametrize("config", [{"deadline": {"enforce": False}}, {"compute": {"queue_delay_mean_s": 0.0}},
                                    {"profile": "mixtral-8x7b"}, {"profile": "switch-base-8"}])
def test_topk_action_gives_zero_deviation(config):
    env = WideMoEEnv(config)
    obs, _ = env.reset(seed=1)
    for _ in range(3 * env.problem.n_layers):
        obs, reward, _, trunc, info = env.step(obs["topk_mask"].astype(np.int8))
        assert info["deviation"] == 0.0 and info["n_kept"] == env.problem.top_k
        assert info["energy_j"] == pytest.approx(info["topk_energy_j"])
        assert reward == pytest.approx(-1.0)
        if trunc:
            obs, _ = env.reset()


def test_executing_nothing_costs_nothing_and_skips_everything():
    env = WideMoEEnv(SYNTH)
    env.reset(seed=0)
    _, reward, _, _, info = env.step(np.zeros(env.action_space.n, dtype=np.int8))
    assert info["energy_j"] == 0.0 and info["n_skipped"] == env.problem.top_k and info["deviation"] > 0


def test_observation_energy_cost_predicts_reward_energy_term():
    env = WideMoEEnv(SYNTH)
    obs, _ = env.reset(seed=4)
    for _ in range(20):
        action = env.action_space.sample()
        predicted = -float(np.dot(obs["energy_cost"], action))
        obs, _, _, _, info = env.step(action)
        assert info["reward_energy"] == pytest.approx(predicted, rel=1e-5, abs=1e-6)


def test_deadline_misses_lose_experts_only_when_enforced():
    # persistent backlogs: a helper known to be backed up cannot make the deadline, so it is masked
    tight = {"compute": {"queue_delay_mean_s": 0.02, "queue_persistence": 0.9}, "gating": {"source": "synthetic"}}
    for enforce in (True, False):
        env = WideMoEEnv({**tight, "deadline": {"enforce": enforce}})
        obs, _ = env.reset(seed=0)
        lost = misses = 0
        masked = 0
        for _ in range(200):
            masks = env.action_masks().reshape(-1, 2)
            assert masks[:, 0].all()
            masked += int((~masks[:, 1]).sum())
            obs, _, _, trunc, info = env.step(np.ones(env.action_space.n, dtype=np.int8))
            lost += info["n_lost"]
            misses += info["deadline_misses"]
            if trunc:
                obs, _ = env.reset()
        assert misses > 0
        assert (lost == misses) if enforce else (lost == 0)
        assert (masked > 0) if enforce else (masked == 0)


def test_action_mask_matches_latency_observation():
    env = WideMoEEnv({"compute": {"queue_delay_mean_s": 0.01}})
    obs, _ = env.reset(seed=0)
    for _ in range(30):
        mask = env.action_masks()
        assert mask.shape == (2 * env.action_space.n,) and mask.dtype == bool
        np.testing.assert_array_equal(mask[1::2], obs["deadline_probability"] > 0)
        obs, *_ = env.step(env.action_space.sample())


@pytest.mark.parametrize("bad, match", [
    (np.ones(7, dtype=np.int8), r"expected shape \(8,\)"),
    (np.ones((1, 8), dtype=np.int8), r"expected shape \(8,\)"),
    (np.array([2, 0, 0, 0, 0, 0, 0, 0]), "0 or 1"),
    (np.array([-1, 0, 0, 0, 0, 0, 0, 0]), "0 or 1"),
    (np.array([np.nan, 0, 0, 0, 0, 0, 0, 0]), "0 or 1"),
    (np.array(["a"] * 8), "dtype"),
])
def test_bad_actions_raise_clear_errors_and_lose_nothing(bad, match):
    env = WideMoEEnv()
    env.reset(seed=0)
    env.step(env.action_space.sample())
    before = copy.deepcopy(env)
    with pytest.raises(ValueError, match=match):
        env.step(bad)
    a = np.ones(8, dtype=np.int8)
    _, r1, *_ = env.step(a)
    _, r2, *_ = before.step(a)
    assert r1 == r2  # the failed call changed nothing


def test_float_and_bool_actions_accepted():
    env = WideMoEEnv()
    env.reset(seed=0)
    env.step(np.ones(8, dtype=np.float32))
    env.step(np.ones(8, dtype=bool))
    env.step([1, 0, 1, 0, 1, 0, 1, 0])


def test_render_modes():
    env = WideMoEEnv(render_mode="ansi")
    env.reset(seed=0)
    env.step(np.ones(8, dtype=np.int8))
    text = env.render()
    assert "energy" in text and "deviation" in text and len(text.splitlines()) >= 10
    env = WideMoEEnv(render_mode="rgb_array")
    env.reset(seed=0)
    env.step(np.ones(8, dtype=np.int8))
    frame = env.render()
    assert frame.ndim == 3 and frame.shape[2] == 3 and frame.dtype == np.uint8 and frame.std() > 0
    with pytest.raises(ValueError, match="render_mode"):
        WideMoEEnv(render_mode="human")


def test_token_budget_mode_tracks_remaining_budget():
    env = WideMoEEnv({"budget": {"mode": "token"}, "gating": {"source": "synthetic"}})
    obs, _ = env.reset(seed=0)
    L = env.problem.n_layers
    assert obs["budget_remaining"][0] == pytest.approx(1.0)
    spent = 0.0
    token_budget = env.sim.span_budget
    for layer in range(L):
        obs, _, _, _, info = env.step(np.zeros(8, dtype=np.int8))  # skip everything
        spent += info["weighted_deviation"]
        if layer < L - 1:
            assert obs["budget_remaining"][0] == pytest.approx(max(token_budget - spent, 0) / token_budget, rel=1e-5)
    assert obs["budget_remaining"][0] == pytest.approx(1.0)  # new token, fresh budget


def test_default_env_runs_on_the_shipped_trace_without_torch():
    code = ("import sys\n"
            "sys.modules['torch'] = None  # any 'import torch' now fails\n"
            "import gymnasium as gym\n"
            "env = gym.make('wide_env:wide_env/WideMoE-v0')\n"
            "obs, _ = env.reset(seed=0)\n"
            "for _ in range(4):\n"
            "    obs, r, te, tr, info = env.step(obs['topk_mask'].astype('int8'))\n"
            "print(env.unwrapped.sim.source.name, info['token_complete'], info['accuracy_same'])\n")
    out = run_in_fresh_process(code)
    assert out.stdout.split() == ["trace", "1", "1"]
