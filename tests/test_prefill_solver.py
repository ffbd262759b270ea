"""Exact SiftMoE prefilling (baselines.prefill) against brute force over all 2^(T E) masks."""

import numpy as np
import pytest

from baselines.prefill import (brute_force_prefill, load_energy_table, prefill_energy, random_prefill_instance,
                               solve_prefill, token_deviations)


def _check(f, dev, budget):
    sol = solve_prefill(f, dev, budget)
    best, missing, masks = brute_force_prefill(f, dev, budget)
    assert sol.energy == pytest.approx(best, rel=1e-9, abs=0)
    assert int(sol.dropped.sum()) == missing
    assert sol.energy == pytest.approx(float(prefill_energy(sol.mask, f)), rel=1e-12)
    np.testing.assert_allclose(sol.deviation, token_deviations(sol.mask, dev))
    return sol, missing


def test_matches_brute_force_on_random_instances():
    rng = np.random.default_rng(0)
    dropped_cases = 0
    for _ in range(300):
        E = int(rng.integers(1, 5))
        T = int(rng.integers(1, 4))
        K = int(rng.integers(1, min(E, 2) + 1))
        sol, missing = _check(*random_prefill_instance(rng, T, E, K))
        dropped_cases += missing > 0
    assert dropped_cases > 0  # capacity-limited instances exercised too


def test_matches_brute_force_without_capacity_limits_and_with_tight_budgets():
    rng = np.random.default_rng(1)
    for _ in range(150):
        E = int(rng.integers(2, 5))
        T = int(rng.integers(2, 4))
        f, dev, budget = random_prefill_instance(rng, T, E, min(2, E), capacity=False, budget_range=(0.0, 0.4))
        sol, missing = _check(f, dev, budget)
        assert missing == 0 and not sol.dropped.any()
        met = sol.deviation <= budget * (1 + 1e-9)
        assert (met == sol.budget_met).all()


def test_env_instances_match_brute_force():
    from wide_env.envs.prefill import WideMoEPrefillEnv

    env = WideMoEPrefillEnv({"model": {"n_layers": 4, "n_experts": 4, "top_k": 2}, "gating": {"source": "synthetic"},
                             "compute": {"queue_delay_mean_s": 0.004}},
                            prompt_tokens=3, n_prompts=4)
    env.reset(seed=0)
    for _ in range(16):
        view = env.current_view()
        f = load_energy_table(view, env.sim)
        _check(f, view.deviation_table[0], view.budget[0])
        env.step(env.action_space.sample())


def test_budget_met_when_reachable_and_min_deviation_otherwise():
    rng = np.random.default_rng(2)
    f, dev, _ = random_prefill_instance(rng, 3, 4, 2, capacity=False)
    sol = solve_prefill(f, dev, 0.0)  # unreachable unless Top-K all usable: raise to Delta_min
    d_min = token_deviations(np.ones((3, 4), bool), dev)
    np.testing.assert_allclose(sol.deviation, d_min, rtol=1e-9, atol=1e-12)
    huge = solve_prefill(f, dev, 1e9)
    assert huge.energy == 0.0 and not huge.mask.any()


def test_larger_instances_solve_and_beat_topk():
    rng = np.random.default_rng(3)
    for _ in range(20):
        f, dev, budget = random_prefill_instance(rng, 8, 8, 2, capacity=False)
        sol = solve_prefill(f, dev, budget)
        assert sol.budget_met.all()
        topk = np.zeros((8, 8), bool)
        for t in range(8):  # executing each token's own Top-K experts gives deviation 0
            topk[t, np.flatnonzero((dev[t, :, :8] == 0).any(axis=0))] = True
        assert sol.energy <= float(prefill_energy(topk, f)) * (1 + 1e-12)


@pytest.mark.parametrize("f, dev, budget, match", [
    (np.zeros((3, 4)), np.zeros((2, 1, 4)), 1.0, r"shape \(E, T\+1\)"),
    (np.array([[0.0, 2.0, 1.0]]), np.zeros((2, 1, 2)), 1.0, "nondecreasing"),
    (np.array([[1.0, 2.0, 3.0]]), np.zeros((2, 1, 2)), 1.0, "f_e\\(0\\) = 0"),
    (np.array([[0.0, 1.0, 2.0]]), np.zeros((2, 2)), 1.0, "deviation_table"),
])
def test_invalid_inputs_raise(f, dev, budget, match):
    with pytest.raises(ValueError, match=match):
        solve_prefill(f, dev, budget)


def test_prefill_policies_from_observation():
    """make_policy on the prefill env: SiftMoE from the observation equals the solver on the simulator's
    own view, meets every token's budget, and uses less energy than Top-K."""
    import gymnasium as gym

    import wide_env  # noqa: F401
    from baselines import make_policy
    from baselines.prefill import siftmoe_prefill_action

    env = gym.make("wide_env/WideMoEPrefill-v0")
    sift, topk = make_policy("siftmoe", env), make_policy("topk", env)
    obs, _ = env.reset(seed=2)
    saved = topk_energy = 0.0
    for _ in range(env.unwrapped.problem.n_layers):
        action = sift(obs)
        np.testing.assert_array_equal(action, siftmoe_prefill_action(env))
        np.testing.assert_array_equal(topk(obs), obs["topk_mask"].astype(np.int8))
        obs, _, _, _, info = env.step(action)
        assert info["budget_violated"] == 0
        saved += info["energy_j"]
        topk_energy += info["topk_energy_j"]
    assert saved < topk_energy
