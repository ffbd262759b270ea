"""Token credit (agents.token_credit): every layer of a token is paid the token's whole accuracy term."""

from __future__ import annotations

import numpy as np
import pytest

import wide_env  # noqa: F401
from agents.shaping import RewardShaping
from agents.token_credit import TokenCredit, credit_tokens, token_credit_callback
from wide_env.integrations.sb3_vec import make_native_vec_env


def test_each_layer_of_a_complete_token_gets_the_tokens_accuracy_sum():
    # one env, L = 3: a token cut at the start (layers 1, 2), two whole tokens, one cut by the rollout's end
    layer = np.array([[1], [2], [0], [1], [2], [0], [1], [2], [0], [1]])
    complete = layer == 2
    accuracy = np.zeros((10, 1))
    accuracy[[1, 4, 7], 0] = [-5.0, -2.0, -3.0]
    accuracy[3, 0] = 0.5  # an increment before the token's end (a rule's running estimate)
    energy = -np.arange(1, 11, dtype=float)[:, None] / 10
    shaped = energy + accuracy
    out = credit_tokens(shaped.astype(np.float32), shaped, accuracy, layer, complete)
    expected = energy.copy()
    expected[[0, 1], 0] += [0.0, -5.0]  # the cut token: unchanged
    expected[2:5, 0] += -1.5  # 0.5 - 2.0 at each of its layers
    expected[5:8, 0] += -3.0
    expected[8:10, 0] += accuracy[8:10, 0]  # not complete by the end: unchanged
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_normalised_rewards_are_credited_at_the_tokens_last_scale():
    layer = np.array([[0, 0], [1, 1]])
    complete = layer == 1
    accuracy = np.array([[0.0, 0.0], [-4.0, 0.0]])
    shaped = np.array([[-1.0, -1.0], [-5.0, -1.0]])
    normalised = (shaped * 0.5).astype(np.float32)  # VecNormalize's factor 0.5
    out = credit_tokens(normalised, shaped, accuracy, layer, complete)
    np.testing.assert_allclose(out, [[-0.5 - 2.0, -0.5], [-2.5, -0.5]], rtol=1e-6)


def _shaped_env(token_credit: bool):
    kwargs = {"config": {"n_tokens": 2, "reward": {"objective": "accuracy"}}}
    return RewardShaping(make_native_vec_env("wide_env/WideMoE-v0", 2, 0, kwargs), 10.0,
                         token_credit=token_credit)


def test_the_shaping_records_what_token_credit_needs():
    env = _shaped_env(True)
    env.reset()
    env.clear_records()
    rng = np.random.default_rng(0)
    rewards = [env.step((rng.random((2, 8)) < 0.5).astype(np.int8))[1] for _ in range(8)]
    shaped, accuracy, layer, complete = env.take_records()
    assert shaped.shape == accuracy.shape == layer.shape == complete.shape == (8, 2)
    np.testing.assert_array_equal(shaped, np.stack(rewards))
    np.testing.assert_array_equal(layer[:, 0], [0, 1, 2, 3, 0, 1, 2, 3])
    np.testing.assert_array_equal(complete[:, 0], layer[:, 0] == 3)
    assert np.any(accuracy != 0)
    assert token_credit_callback(env, 4) is not None
    assert token_credit_callback(_shaped_env(False), 4) is None


def test_token_credit_settings_are_checked():
    with pytest.raises(ValueError, match="token_credit must be true or false"):
        RewardShaping(make_native_vec_env("wide_env/WideMoE-v0", 1, 0, {}), 1.0, token_credit="yes")
    with pytest.raises(ValueError, match="token_credit=True"):
        TokenCredit(_shaped_env(False), 4)


def test_training_with_token_credit_rewrites_the_rollout(monkeypatch):
    from stable_baselines3 import PPO

    env = _shaped_env(True)
    model = PPO("MultiInputPolicy", env, n_steps=8, batch_size=16, n_epochs=1, gamma=0.0, gae_lambda=0.0,
                seed=0, device="cpu")
    seen = {}
    original = credit_tokens

    def spy(rewards, shaped, accuracy, layer, complete):
        out = original(rewards, shaped, accuracy, layer, complete)
        seen.update(before=np.array(rewards), after=out, shaped=shaped, accuracy=accuracy, layer=layer)
        return out

    monkeypatch.setattr("agents.token_credit.credit_tokens", spy)
    model.learn(16, callback=token_credit_callback(env, 4))
    buffer = model.rollout_buffer
    np.testing.assert_array_equal(seen["before"], seen["shaped"])  # the records are the buffer's steps, in order
    np.testing.assert_allclose(buffer.rewards, seen["after"])
    # gamma = 0: the returns are the credited rewards (the buffer holds them env-major after the update)
    np.testing.assert_allclose(buffer.returns.ravel(), seen["after"].swapaxes(0, 1).ravel(), rtol=1e-5, atol=1e-6)
    token = seen["accuracy"][0:4].sum(axis=0)  # the first token of each env
    np.testing.assert_allclose(seen["after"][0] - seen["before"][0], token - seen["accuracy"][0], rtol=1e-5)
    with pytest.raises(ValueError, match="n_steps = 6 must be a multiple"):
        PPO("MultiInputPolicy", env, n_steps=6, batch_size=12, n_epochs=1, gamma=0.0, seed=0,
            device="cpu").learn(12, callback=token_credit_callback(env, 4))


def test_records_nobody_takes_stop_with_a_clear_error(monkeypatch):
    monkeypatch.setattr("agents.shaping.MAX_RECORDS", 3)
    env = _shaped_env(True)
    env.reset()
    action = np.ones((2, 8), np.int8)
    for _ in range(3):
        env.step(action)
    with pytest.raises(RuntimeError, match="train with agents.token_credit.TokenCredit"):
        env.step(action)
    env.clear_records()
    env.step(action)  # taken records make room again
