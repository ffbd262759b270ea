"""Training aids of the benchmark's agents: per-layer accuracy shaping (agents.shaping), the Top-K routing prior
of the expert-set network, and train.py's CPU-time limit."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest

import wide_env  # noqa: F401
from agents.shaping import RewardShaping, wrap_reward_shaping
from wide_env.integrations.sb3_vec import make_native_vec_env

N_ENVS, N_TOKENS, LAYERS = 3, 3, 4


def _rollout(objective: str, weight: float, steps: int = 2 * N_TOKENS * LAYERS, seed: int = 0, correct: float = 0.0):
    """A random policy on the shaped and on the plain native VecEnv with the same seed: per-step rewards, infos."""
    kwargs = {"config": {"n_tokens": N_TOKENS, "reward": {"objective": objective}}}
    shaped = RewardShaping(make_native_vec_env("wide_env/WideMoE-v0", N_ENVS, seed, kwargs), weight, correct)
    plain = make_native_vec_env("wide_env/WideMoE-v0", N_ENVS, seed, kwargs)
    shaped.reset(), plain.reset()
    rng = np.random.default_rng(3)
    out = []
    for _ in range(steps):
        action = (rng.random((N_ENVS, 8)) < 0.5).astype(np.int8)
        _, r_shaped, _, infos = shaped.step(action)
        _, r_plain, _, infos_plain = plain.step(action)
        assert [i["delta_loss"] for i in infos] == [i["delta_loss"] for i in infos_plain]  # same episodes
        out.append((r_shaped.astype(np.float64), r_plain.astype(np.float64), infos))
    return out


def test_shaping_redistributes_the_accuracy_objective_within_each_token():
    steps = _rollout("accuracy", 10.0)
    for start in range(0, len(steps), LAYERS):  # token by token (every episode has N_TOKENS tokens of L layers)
        token = steps[start:start + LAYERS]
        assert all(info["layer"] == l for l, (_, _, infos) in enumerate(token) for info in infos)
        shaped = sum(s for s, _, _ in token)
        plain = sum(p for _, p, _ in token)
        np.testing.assert_allclose(shaped, plain, rtol=1e-5, atol=1e-4)
    # and the layers before the last one now carry their share
    first_layers = np.concatenate([s - p for s, p, infos in steps if infos[0]["layer"] < LAYERS - 1])
    assert np.abs(first_layers).max() > 0


def test_shaping_adds_the_real_loss_increase_to_the_deviation_objective():
    steps = _rollout("deviation", 4.0)
    for start in range(0, len(steps), LAYERS):
        token = steps[start:start + LAYERS]
        final_loss = np.array([i["delta_loss"] for i in token[-1][2]])
        added = sum(s - p for s, p, _ in token)
        np.testing.assert_allclose(added, -4.0 * final_loss, rtol=1e-5, atol=1e-4)


def test_correctness_shaping_pays_the_change_of_the_tokens_correctness():
    steps = _rollout("deviation", 0.0, correct=3.0, steps=4 * N_TOKENS * LAYERS)
    changed = 0
    for start in range(0, len(steps), LAYERS):
        token = steps[start:start + LAYERS]
        last = token[-1][2]
        expected = 3.0 * np.array([i["accuracy_correct"] - i["accuracy_full"] for i in last])
        np.testing.assert_allclose(sum(s - p for s, p, _ in token), expected, atol=1e-5)
        changed += int(np.any(expected != 0))
    assert changed > 0  # the random policy did break (or fix) some tokens


def test_violation_shaping_adds_its_penalty_on_violated_steps():
    kwargs = {"config": {"n_tokens": N_TOKENS}}
    shaped = RewardShaping(make_native_vec_env("wide_env/WideMoE-v0", N_ENVS, 0, kwargs), violation_weight=5.0)
    plain = make_native_vec_env("wide_env/WideMoE-v0", N_ENVS, 0, kwargs)
    shaped.reset(), plain.reset()
    violated = 0
    for _ in range(2 * LAYERS):
        action = np.zeros((N_ENVS, 8), dtype=np.int8)  # skip everything: violates
        _, r_shaped, _, infos = shaped.step(action)
        _, r_plain, _, _ = plain.step(action)
        flags = np.array([i["budget_violated"] for i in infos], dtype=float)
        np.testing.assert_allclose(r_shaped, r_plain - 5.0 * flags, rtol=1e-6)
        violated += flags.sum()
    assert violated > 0


def test_shaping_settings_are_checked():
    venv = make_native_vec_env("wide_env/WideMoE-v0", 1, 0, {})
    assert wrap_reward_shaping(venv, None) is venv
    with pytest.raises(ValueError, match="unknown keys"):
        wrap_reward_shaping(venv, {"accuracy_wieght": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        wrap_reward_shaping(venv, {"accuracy_weight": -1.0})
    synthetic = RewardShaping(make_native_vec_env("wide_env/WideMoE-Synthetic-v0", 1, 0, {}), 1.0)
    synthetic.reset()
    with pytest.raises(ValueError, match="delta_loss"):
        synthetic.step(np.zeros((1, 8), dtype=np.int8))


def _policy(prior: float):
    from stable_baselines3 import PPO

    from agents.common import resolve_policy

    env = gym.make("wide_env/WideMoE-v0", config={"n_tokens": 2})
    policy, kwargs = resolve_policy("expert_set", "ppo", env.observation_space, env.unwrapped.problem,
                                    {"hidden": 8, "pair_hidden": 4, "n_blocks": 1, "topk_prior": prior})
    return env, PPO(policy, env, policy_kwargs=kwargs, n_steps=16, batch_size=16, device="cpu", seed=0)


def test_topk_prior_starts_at_topk_routing_and_survives_save_and_load(tmp_path):
    from stable_baselines3 import PPO

    env, model = _policy(4.0)
    path = tmp_path / "m.zip"
    model.save(path)
    loaded = PPO.load(path, device="cpu")
    for seed in range(3):
        obs, _ = env.reset(seed=seed)
        for _ in range(8):
            action, _ = model.predict(obs, deterministic=True)
            np.testing.assert_array_equal(action, obs["topk_mask"])  # a fresh policy routes like Top-K
            np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], action)
            obs, *_ = env.step(action.astype(np.int8))


def test_without_a_prior_the_network_is_unchanged():
    _, with_prior = _policy(2.0)
    _, without = _policy(0.0)
    assert "topk_prior" not in without.policy._get_constructor_parameters()
    # the prior adds no parameters, only the fixed offset
    assert sum(p.numel() for p in with_prior.policy.parameters()) == sum(p.numel() for p in without.policy.parameters())
    with pytest.raises(ValueError, match="topk_prior"):
        _policy(-1.0)


def test_cpu_time_limit_stops_training_and_keeps_the_model(tmp_path, monkeypatch, capsys):
    from agents.run import main

    monkeypatch.chdir(tmp_path)
    status = main(["-n", "100000", "--n-envs", "2", "--eval-freq", "0", "--eval-episodes", "1", "--no-compare",
                   "--max-cpu-minutes", "0.0001", "-f", "runs", "--run-name", "r", "-tb", "none", "-v", "0",
                   "--env-kwargs", "{'config': {'n_tokens': 2}}"], prog="python train.py")
    out = capsys.readouterr().out
    assert status == 0 and "CPU-time limit" in out
    run = tmp_path / "runs" / "ppo" / "r"
    record = json.loads((run / "status.json").read_text())
    assert record["num_timesteps"] < 100000 and record["train_cpu_s"] > 0
    assert (run / "final_model.zip").exists()
    assert main(["--max-cpu-minutes", "-1", "-f", "runs"], prog="python train.py") == 2
    assert "--max-cpu-minutes must be a positive number" in capsys.readouterr().err


def test_absolute_energy_shaping_pays_joules_over_one_fixed_scale():
    from agents.shaping import energy_scale

    kwargs = {"config": {"n_tokens": N_TOKENS}}
    shaped = RewardShaping(make_native_vec_env("wide_env/WideMoE-v0", N_ENVS, 0, kwargs), energy="absolute")
    plain = make_native_vec_env("wide_env/WideMoE-v0", N_ENVS, 0, kwargs)
    scale = energy_scale(plain.get_attr("config")[0])
    assert shaped.energy_scale == scale > 0
    shaped.reset(), plain.reset()
    for _ in range(2 * LAYERS):
        action = np.ones((N_ENVS, 8), dtype=np.int8)
        _, r_shaped, _, infos = shaped.step(action)
        _, r_plain, _, _ = plain.step(action)
        expected = r_plain + np.array([i["reward_energy"] - i["energy_j"] / scale for i in infos])
        np.testing.assert_allclose(r_shaped, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="relative"):
        RewardShaping(plain, energy="joules")


def test_nodes_are_experts_gives_each_expert_its_own_link_gain(tmp_path):
    from stable_baselines3 import PPO

    from agents.common import resolve_policy
    from agents.features import KeyRouting as _Routing

    env = gym.make("wide_env/WideMoE-v0", config={"n_tokens": 2})
    policy, kwargs = resolve_policy("expert_set", "ppo", env.observation_space, env.unwrapped.problem,
                                    {"hidden": 8, "pair_hidden": 4, "n_blocks": 1, "nodes_are_experts": True})
    model = PPO(policy, env, policy_kwargs=kwargs, n_steps=16, batch_size=16, device="cpu", seed=0)
    routing = model.policy.features_extractor.routing
    assert "channel_gain_db" in [k.name for k in routing.element] and not routing.node
    assert "channel_gain_db" in [k.name for k in _Routing(model.policy.features_extractor.spec).node]  # default
    model.save(tmp_path / "m.zip")
    obs, _ = env.reset(seed=0)
    np.testing.assert_array_equal(PPO.load(tmp_path / "m.zip", device="cpu").predict(obs, deterministic=True)[0],
                                  model.predict(obs, deterministic=True)[0])
    # a layout with another number of nodes than experts has no such reading
    from agents.layout import layout_spec

    six_nodes = layout_spec(gym.spaces.Box(-1e3, 1e4, (sum((8, 8, 8, 6, 8, 8, 8, 18, 1, 2)),)), 8, 2, 6)
    with pytest.raises(ValueError, match="one-to-one"):
        _Routing(six_nodes, nodes_are_experts=True)
