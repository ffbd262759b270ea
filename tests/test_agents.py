"""Agent networks: save/load round trips, permutation equivariance, transfer across expert counts, masks."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch as th

import wide_env  # noqa: F401

th.set_num_threads(1)

from agents.common import resolve_policy  # noqa: E402
from baselines.observation import action_masks  # noqa: E402
from agents.sb3_policy import SB3Policy  # noqa: E402
from agents.networks import ExpertSetPolicy, transfer_policy_weights  # noqa: E402

SMALL = {"config": {"n_tokens": 2}}


def _model(algo: str, policy: str, env, **kw):
    from stable_baselines3 import A2C, PPO
    from sb3_contrib import MaskablePPO

    cls = {"ppo": PPO, "a2c": A2C, "maskable_ppo": MaskablePPO}[algo]
    pol, pk = resolve_policy(policy, algo, env.observation_space, env.unwrapped.problem, kw.pop("policy_kwargs", {}))
    extra = {"n_steps": 16, "batch_size": 16} if algo != "a2c" else {"n_steps": 4}
    return cls(pol, env, seed=0, device="cpu", policy_kwargs=pk, **extra, **kw)


def _observations(env, n=12, seed=3):
    obs, _ = env.reset(seed=seed)
    out = [obs]
    rng = np.random.default_rng(seed)
    for _ in range(n - 1):
        obs, _, term, trunc, _ = env.step(rng.integers(0, 2, env.action_space.n))
        if term or trunc:
            obs, _ = env.reset(seed=int(rng.integers(1 << 30)))
        out.append(obs)
    return out


@pytest.mark.parametrize("algo,policy,flat", [("ppo", "expert_set", False), ("ppo", "mlp", False),
                                              ("a2c", "expert_set", True), ("maskable_ppo", "expert_set", False),
                                              ("maskable_ppo", "mlp", True)])
def test_save_load_round_trip_gives_identical_actions(tmp_path, algo, policy, flat):
    cfg = {"config": {"n_tokens": 2, "flatten_observation": flat}}
    env = gym.make("wide_env/WideMoE-v0", **cfg)
    model = _model(algo, policy, env)
    model.learn(32)  # a few updates so the weights are not at their initial values
    path = tmp_path / "m.zip"
    model.save(path)
    loaded = type(model).load(path, device="cpu")
    problem = env.unwrapped.problem
    a = SB3Policy(model, problem)
    b = SB3Policy(loaded, problem)
    obs_list = _observations(env)
    for obs in obs_list:
        np.testing.assert_array_equal(a(obs), b(obs))
    # the same through baselines.make_policy's loader (the CLI path of baselines.evaluate)
    from baselines import make_policy

    c = make_policy(f"{algo}:{path}", env)
    for obs in obs_list:
        np.testing.assert_array_equal(a(obs), c(obs))
    with th.no_grad():
        for p, q in zip(model.policy.parameters(), loaded.policy.parameters()):
            assert th.equal(p, q)


def _permute(obs, perm, K):
    E = len(perm)
    out = dict(obs)
    for k in ("gate_probs", "topk_mask", "topk_weight", "channel_gain_db", "energy_cost", "latency_ratio"):
        out[k] = obs[k][perm]
    table = obs["deviation_table"].reshape(K, E + 1)
    out["deviation_table"] = np.concatenate([table[:, :E][:, perm], table[:, E:]], axis=1).reshape(-1)
    return out


def _logits(model, obs):
    with th.no_grad():
        return model.policy.get_distribution(model.policy.obs_to_tensor(obs)[0]).distribution.logits.numpy()[0]


def test_expert_set_policy_is_permutation_equivariant():
    env = gym.make("wide_env/WideMoE-v0", **SMALL)
    model = _model("ppo", "expert_set", env)
    K = env.unwrapped.problem.top_k
    rng = np.random.default_rng(0)
    for obs in _observations(env, n=4):
        perm = rng.permutation(env.action_space.n)
        np.testing.assert_allclose(_logits(model, obs)[perm], _logits(model, _permute(obs, perm, K)), atol=1e-5)
        with th.no_grad():
            v1 = model.policy.predict_values(model.policy.obs_to_tensor(obs)[0])
            v2 = model.policy.predict_values(model.policy.obs_to_tensor(_permute(obs, perm, K))[0])
        assert float(v1) == pytest.approx(float(v2), abs=1e-5)


def test_expert_set_weights_transfer_from_8_to_32_experts():
    small = gym.make("wide_env/WideMoE-v0", **SMALL)  # E = 8, K = 2
    big = gym.make("wide_env/WideMoE-GptOss-v0", config={"profile": "gpt-oss-20b", "n_tokens": 1})  # E = 32, K = 4
    src = _model("ppo", "expert_set", small)
    dst = _model("ppo", "expert_set", big)
    assert isinstance(dst.policy, ExpertSetPolicy)
    transfer_policy_weights(src.policy, dst.policy)
    for p, q in zip(src.policy.state_dict().values(), dst.policy.state_dict().values()):
        assert th.equal(p, q)
    obs, _ = big.reset(seed=0)
    action, _ = dst.predict(obs, deterministic=True)
    assert action.shape == (32,)


def test_maskable_agent_never_executes_masked_experts():
    # a deadline below load + compute + downlink for about a quarter of the calls: certain misses, masked
    env = gym.make("wide_env/WideMoE-v0", config={"n_tokens": 8, "deadline": {"deadline_s": 0.0029},
                                                         "compute": {"queue_delay_mean_s": 0.003}})
    model = _model("maskable_ppo", "expert_set", env)
    policy = SB3Policy(model, env.unwrapped.problem, deterministic=False)
    obs, _ = env.reset(seed=1)
    seen_masked = 0
    for _ in range(32):
        mask = env.unwrapped.action_masks()
        np.testing.assert_array_equal(action_masks(obs, env.unwrapped.problem), mask)
        action = policy(obs)
        assert not np.any(action[~mask[1::2]])
        seen_masked += int((~mask[1::2]).sum())
        obs, _, term, trunc, _ = env.step(action)
        if term or trunc:
            obs, _ = env.reset()
    assert seen_masked > 0


def test_flat_extractor_scales_every_key_to_order_one():
    from agents.networks import WideFlatExtractor

    env = gym.make("wide_env/WideMoE-v0", **SMALL)
    ext = WideFlatExtractor(env.observation_space)
    obs = model_obs = _observations(env, n=1)[0]
    batch = {k: th.as_tensor(v[None]) for k, v in model_obs.items()}
    feats = ext(batch)
    assert feats.shape == (1, ext.features_dim)
    assert th.isfinite(feats).all() and feats.abs().max() <= 5.0
    assert obs is model_obs
