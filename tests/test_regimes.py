"""Regimes where per-layer SiftMoE is not optimal: budgets that span an episode, uncertain queues, realistic
link budgets, slotted uplinks under p_max, and the real-accuracy objective."""

import numpy as np
import pytest

import wide_env  # noqa: F401
from wide_env import ConfigError
from wide_env.envs.decode import WideMoEEnv


def test_episode_budget_is_spent_over_the_whole_episode():
    """budget.mode = 'episode': one budget, n_tokens x sum_l kappa_l eps_l, for all the episode's layer-steps;
    what is left carries over tokens, violations start when the running total passes it, a new episode
    starts afresh."""
    env = WideMoEEnv({"budget": {"mode": "episode", "layer_weights": [1.0, 2.0, 1.0, 0.5]}, "n_tokens": 3,
                      "gating": {"source": "synthetic"}})
    sim = env.sim
    eps = np.asarray(sim.layer_budget)
    assert sim.span_budget == pytest.approx(3 * float((eps * [1.0, 2.0, 1.0, 0.5]).sum()))
    for seed in (0, 1):
        obs, info = env.reset(seed=seed)
        assert obs["budget_remaining"][0] == pytest.approx(1.0) and info["deviation_budget"] == sim.span_budget
        spent, steps, violations = 0.0, 0, 0
        truncated = False
        while not truncated:
            obs, reward, _, truncated, info = env.step(np.zeros(8, dtype=np.int8))  # skip everything
            assert info["deviation_budget"] == pytest.approx(sim.span_budget - spent, abs=1e-12)
            expected_violation = spent + info["weighted_deviation"] > sim.span_budget * (1 + 1e-9)
            assert info["budget_violated"] == expected_violation
            violations += info["budget_violated"]
            spent += info["weighted_deviation"]
            steps += 1
            if not truncated:
                assert obs["budget_remaining"][0] == pytest.approx(max(sim.span_budget - spent, 0) / sim.span_budget,
                                                                   rel=1e-5)
        assert steps == 3 * 4 and violations > 0  # skipping everything overspends a budget of eps_l per step
    with pytest.raises(ConfigError, match="budget.mode"):
        wide_env.envs.WideMoEPrefillEnv({"budget": {"mode": "episode"}})
