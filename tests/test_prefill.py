"""WideMoEPrefill-v0 and the prefill simulator: API contracts, physics, determinism, errors."""

import copy
import pickle
import warnings

import gymnasium as gym
import numpy as np
import pytest

import wide_env  # noqa: F401  (registers the package's envs)
from wide_env.envs.prefill import INFO_KEYS, WideMoEPrefillEnv
from wide_env.sim.physics import LinkParameters, node_costs

ENV_ID = "wide_env/WideMoEPrefill-v0"
ENTRY = ("wide_env.envs.prefill:WideMoEPrefillEnv", {"prompt_tokens": 8, "n_prompts": 1})


def _ensure_registered():
    if ENV_ID not in gym.registry:  # the lead adds this entry to wide_env/registration.py
        gym.register(id=ENV_ID, entry_point=ENTRY[0], kwargs=ENTRY[1], disable_env_checker=False)


@pytest.mark.parametrize("config", [{}, {"flatten_observation": True}, {"profile": "mixtral-8x7b"},
                                    {"budget": {"mode": "token"}, "channel": {"fading_per_layer": True}}])
def test_gymnasium_and_sb3_check_env_clean(config):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(WideMoEPrefillEnv(config, prompt_tokens=4, n_prompts=2), skip_render_check=True)
        sb3_check(WideMoEPrefillEnv(config, prompt_tokens=4), warn=True)


def test_make_through_registration_entry():
    from gymnasium.utils.env_checker import check_env

    _ensure_registered()
    env = gym.make(ENV_ID, render_mode="ansi")
    assert isinstance(env.unwrapped, WideMoEPrefillEnv)
    assert env.action_space.n == 8 * env.unwrapped.problem.n_experts
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped)
    env.reset(seed=0)
    env.step(env.action_space.sample())
    assert "energy" in env.render()


def _rollout(env, seed, steps):
    obs, _ = env.reset(seed=seed)
    env.action_space.seed(seed)
    out = []
    for _ in range(steps):
        obs, r, _, trunc, info = env.step(env.action_space.sample())
        out.append((np.concatenate(list(obs.values())), r, info["energy_j"], info["deviation"]))
        if trunc:
            obs, _ = env.reset()
    return out


@pytest.mark.parametrize("config", [{}, {"channel": {"correlation": 0.7}, "placement": {"mobility": True}}])
def test_same_seed_same_trajectory_and_different_seeds_differ(config):
    a = _rollout(WideMoEPrefillEnv(config, n_prompts=2), 7, 30)
    b = _rollout(WideMoEPrefillEnv(config, n_prompts=2), 7, 30)
    c = _rollout(WideMoEPrefillEnv(config, n_prompts=2), 8, 30)
    for x, y in zip(a, b):
        assert np.array_equal(x[0], y[0]) and x[1:] == y[1:]
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, c))


def test_pickle_and_deepcopy_continue_identically():
    env = WideMoEPrefillEnv()
    env.reset(seed=3)
    env.step(env.action_space.sample())
    action = np.ones(env.action_space.n, dtype=np.int8)
    for clone in (pickle.loads(pickle.dumps(env)), copy.deepcopy(env)):
        o1, r1, *_ = copy.deepcopy(env).step(action)
        o2, r2, *_ = clone.step(action)
        assert r1 == r2 and all(np.array_equal(o1[k], o2[k]) for k in o1)


@pytest.mark.parametrize("n_prompts", [1, 3])
def test_truncation_after_n_prompts_times_layers(n_prompts):
    env = WideMoEPrefillEnv(n_prompts=n_prompts)
    env.reset(seed=0)
    L = env.problem.n_layers
    for t in range(n_prompts * L):
        _, _, term, trunc, info = env.step(env.action_space.sample())
        assert not term and trunc == (t == n_prompts * L - 1)
        assert info["layer"] == t % L and info["prompt"] == t // L
    with pytest.raises(RuntimeError, match="reset"):
        env.step(env.action_space.sample())


def test_info_keys_numeric_and_reward_is_sum_of_terms():
    env = WideMoEPrefillEnv(n_prompts=3)
    env.reset(seed=0)
    for _ in range(12):
        _, reward, _, _, info = env.step(env.action_space.sample())
        for key in INFO_KEYS + ("layer", "prompt"):
            assert isinstance(info[key], (int, float)) and not isinstance(info[key], bool), key
        assert reward == pytest.approx(info["reward_energy"] + info["reward_deviation"] + info["reward_deadline"])
        assert info["energy_uplink_j"] <= info["energy_comm_j"] <= info["energy_system_j"]
        assert info["deviation_mean"] <= info["deviation"] + 1e-12
        T, K = env.problem.prompt_tokens, env.problem.top_k
        assert info["n_kept"] + info["n_replaced"] + info["n_skipped"] == T * K


@pytest.mark.parametrize("config", [{"deadline": {"enforce": False}}, {"compute": {"queue_delay_mean_s": 0.0}},
                                    {"profile": "mixtral-8x7b"}])
def test_topk_action_zero_deviation_reward_minus_one(config):
    env = WideMoEPrefillEnv(config, n_prompts=2)
    obs, _ = env.reset(seed=1)
    for _ in range(2 * env.problem.n_layers):
        obs, reward, _, trunc, info = env.step(obs["topk_mask"].astype(np.int8))
        assert info["deviation"] == 0.0 and info["n_kept"] == env.problem.prompt_tokens * env.problem.top_k
        assert info["energy_j"] == pytest.approx(info["topk_energy_j"]) and reward == pytest.approx(-1.0)
        if trunc:
            obs, _ = env.reset()


def test_nothing_executed_costs_nothing_and_skips_every_slot():
    env = WideMoEPrefillEnv()
    env.reset(seed=0)
    _, _, _, _, info = env.step(np.zeros(env.action_space.n, dtype=np.int8))
    assert info["energy_system_j"] == 0.0 and info["n_executed"] == 0 and info["latency_s"] == 0.0
    assert info["n_skipped"] == env.problem.prompt_tokens * env.problem.top_k and info["deviation"] > 0


def test_load_tables_predict_reward_energy_and_are_convex():
    env = WideMoEPrefillEnv({"deadline": {"enforce": False}})
    obs, _ = env.reset(seed=4)
    T, E = env.problem.prompt_tokens, env.problem.n_experts
    assert env.problem.one_to_one
    for _ in range(env.problem.n_layers):
        f = env.current_view().load_energy[0]  # (E, T+1), J
        steps = np.diff(f, axis=1)
        assert (steps > 0).all() and (np.diff(steps, axis=1) > -1e-12 * f.max()).all()  # increasing, convex
        action = env.action_space.sample()
        loads = action.reshape(T, E).sum(axis=0)
        cost = obs["load_energy_cost"].reshape(E, T)
        predicted = -sum(float(cost[e, n - 1]) for e, n in enumerate(loads) if n > 0)
        obs, _, _, _, info = env.step(action)
        assert info["reward_energy"] == pytest.approx(predicted, rel=1e-5, abs=1e-7)


def test_node_costs_of_one_call_match_the_formulas_and_aggregated_loads_are_convex():
    """One physics for both phases: a helper's load (u hidden states up, p outputs down, k experts) gives
    the decoding call for u = p = k = 1 (the hand formulas), and the uplink energy is convex in u."""
    rng = np.random.default_rng(0)
    gain = rng.uniform(10, 150, size=20) ** -4.0
    link = LinkParameters(bits=1024.0, bandwidth_hz=1e5, noise_psd_w_hz=4e-21, user_max_power_w=0.2,
                          helper_power_w=6.3, deadline_s=0.01, load_time_s=0.002, compute_time_s=0.0005,
                          helper_compute_power_w=300.0, local_compute_power_w=30.0, uplink_model="inversion")
    one = node_costs(gain, link, queue_delay_s=0.001)
    ones = np.ones(20)
    agg = node_costs(gain, link, uplink_payloads=ones, downlink_payloads=ones, experts=ones, queue_delay_s=0.001)
    for field in ("uplink_energy", "downlink_energy", "compute_energy", "latency", "uplink_time"):
        np.testing.assert_allclose(getattr(agg, field), getattr(one, field), rtol=1e-12)
    B, N0, D = 1e5, 4e-21, 1024.0
    t_dl = D / (B * np.log2(1 + 6.3 * gain / (N0 * B)))
    window = 0.01 - 0.0005 - t_dl
    e_ul = window * N0 * B / gain * (2 ** (D / (B * window)) - 1)
    feasible = e_ul / window <= 0.2
    np.testing.assert_allclose(one.uplink_energy[feasible], e_ul[feasible], rtol=1e-10)
    np.testing.assert_allclose(one.downlink_energy, 6.3 * t_dl, rtol=1e-12)
    np.testing.assert_allclose(one.compute_energy, 300.0 * (0.002 + 0.0005), rtol=1e-12)
    # n tokens in one uplink window: the energy grows with n and is convex in it
    e = [float(node_costs(gain[:1], link, uplink_payloads=n, downlink_payloads=n, experts=np.ones(1)).uplink_energy[0])
         for n in range(1, 5)]
    assert np.all(np.diff(e) > 0) and np.all(np.diff(e, 2) > 0)


def test_shared_helper_sends_each_token_once():
    hosts = [[1, 1, 2, 2] for _ in range(2)]
    cfg = {"model": {"n_layers": 2, "n_experts": 4, "top_k": 2}, "placement": {"hosts": hosts},
           "gating": {"source": "synthetic"},
           "deadline": {"enforce": False}, "compute": {"queue_delay_mean_s": 0.0}}
    env = WideMoEPrefillEnv(cfg, prompt_tokens=2)
    env.reset(seed=0)
    assert not env.problem.one_to_one
    sim, view = env.sim, env.current_view()
    both = np.zeros((1, 2, 4), bool)
    both[0, 0, :2] = True  # token 0 on experts 0 and 1, both on helper 1
    first = np.zeros((1, 2, 4), bool)
    first[0, 0, 0] = True
    scopes_both, _ = sim.node_costs(view.channel_gain, view.queue, view.layer, both)
    scopes_one, _ = sim.node_costs(view.channel_gain, view.queue, view.layer, first)
    # one hidden state goes up (2 would cost > 2x by convexity); only the window shrinks (2 t_comp, 2 outputs)
    assert scopes_one[0, 0, 1] < scopes_both[0, 0, 1] < 1.5 * scopes_one[0, 0, 1]
    assert scopes_both[0, 1, 1] > scopes_one[0, 1, 1]  # but two outputs come back
    assert scopes_both[0, 2, 1] > scopes_one[0, 2, 1]  # and two experts are loaded and run


@pytest.mark.parametrize("bad, match", [
    (np.ones(7, dtype=np.int8), r"expected shape \(64,\)"),
    (np.ones((8, 7), dtype=np.int8), r"expected shape \(64,\)"),
    (np.full(64, 2), "0 or 1"),
    (np.full(64, np.nan), "0 or 1"),
    (np.array(["a"] * 64), "dtype"),
])
def test_bad_actions_raise_and_change_nothing(bad, match):
    env = WideMoEPrefillEnv()
    env.reset(seed=0)
    before = copy.deepcopy(env)
    with pytest.raises(ValueError, match=match):
        env.step(bad)
    a = np.ones(64, dtype=np.int8)
    assert env.step(a)[1] == before.step(a)[1]
    env.step(np.ones((8, 8), dtype=bool))  # (T, E) arrays are accepted too


def test_action_masks_follow_the_single_token_deadline_probability():
    """Masks rule out an expert exactly when the observation says a one-token load cannot meet the deadline
    (persistent backlogs: a helper known to be backed up)."""
    env = WideMoEPrefillEnv({"compute": {"queue_delay_mean_s": 0.01, "queue_persistence": 0.9}}, n_prompts=4)
    obs, _ = env.reset(seed=0)
    T, E = env.problem.prompt_tokens, env.problem.n_experts
    masked = 0
    for _ in range(12):
        mask = env.action_masks()
        assert mask.shape == (2 * T * E,) and mask.dtype == bool and mask[0::2].all()
        single = obs["load_deadline_probability"].reshape(E, T)[:, 0] > 0
        np.testing.assert_array_equal(mask[1::2].reshape(T, E), np.broadcast_to(single, (T, E)))
        masked += int((~mask[1::2]).sum())
        obs, _, _, trunc, _ = env.step(env.action_space.sample())
        if trunc:
            obs, _ = env.reset()
    assert masked > 0


def test_late_helpers_lose_their_pairs_only_when_enforced():
    for enforce in (True, False):
        env = WideMoEPrefillEnv({"compute": {"queue_delay_mean_s": 0.02}, "deadline": {"enforce": enforce}},
                                n_prompts=3)
        env.reset(seed=0)
        lost = misses = 0
        for _ in range(12):
            _, _, _, _, info = env.step(np.ones(env.action_space.n, dtype=np.int8))
            lost, misses = lost + info["n_lost"], misses + info["deadline_misses"]
        assert misses > 0 and ((lost >= misses) if enforce else (lost == 0))


def test_token_budget_mode_tracks_each_tokens_budget():
    env = WideMoEPrefillEnv({"budget": {"mode": "token"}}, prompt_tokens=4, n_prompts=2)
    obs, _ = env.reset(seed=0)
    np.testing.assert_allclose(obs["budget_remaining"], 1.0)
    L = env.problem.n_layers
    spent = np.zeros(4)
    unit = env.sim.span_budget
    for layer in range(L):
        a = np.zeros(4 * env.problem.n_experts, dtype=np.int8)
        out = env.sim.evaluate(env._state, a.reshape(1, 4, -1).astype(bool))
        obs, *_ = env.step(a)
        spent += out["token_weighted_deviation"][0]
        if layer < L - 1:
            np.testing.assert_allclose(obs["budget_remaining"], np.maximum(unit - spent, 0) / unit, rtol=1e-5)
    np.testing.assert_allclose(obs["budget_remaining"], 1.0)


def test_siftmoe_prefill_policy_meets_budgets_below_topk_energy():
    from baselines.prefill import siftmoe_prefill_action

    env = WideMoEPrefillEnv({"deadline": {"enforce": False}}, n_prompts=2)
    env.reset(seed=2)
    saved = 0.0
    for _ in range(2 * env.problem.n_layers):
        _, _, _, trunc, info = env.step(siftmoe_prefill_action(env))
        assert info["budget_violated"] == 0
        assert info["deviation"] <= info["deviation_budget"] * (1 + 1e-9)
        assert info["energy_j"] <= info["topk_energy_j"] * (1 + 1e-9)
        saved += info["topk_energy_j"] - info["energy_j"]
    assert saved > 0
