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


def _plan_pair(config):
    """Two plans of the same tokens that differ only in the realised queueing delays."""
    from wide_env.gating import make_gating_source
    from wide_env.sim.decode import DecodeSimulator
    from wide_env.sim.decode.plan import _plan_costs, plan_gating

    cfg = wide_env.WideConfig.from_dict(config)
    sim = DecodeSimulator(cfg, make_gating_source(cfg))
    scn, rng = sim.scenario, np.random.default_rng(0)
    C, n, N = 3, 5, sim.n_nodes
    gains = 10 ** rng.uniform(-9, -7, size=(C, 1, n, N))
    known = rng.exponential(0.004, size=(C, 1, n, N))
    gating = plan_gating(scn, rng, rng.integers(0, 1000, size=(C, n)))
    where = np.zeros((C, 1, n, N, 2))
    plans = [_plan_costs(scn, np.random.default_rng(1), gains, gains, rng.exponential(0.004, size=gains.shape), known,
                         gating, where) for _ in range(2)]
    return plans


def test_the_observation_does_not_depend_on_the_realised_queueing_delay():
    """Uncertain queues: what a policy sees (latency at an idle helper, P(meeting the deadline), energies) is
    the same whatever the realised delays; only the outcome (who is late) changes."""
    a, b = _plan_pair({"compute": {"queue_delay_mean_s": 0.004, "queue_persistence": 0.5}})
    np.testing.assert_array_equal(a.obs_expert, b.obs_expert)
    np.testing.assert_array_equal(a.deadline_probability, b.deadline_probability)
    np.testing.assert_array_equal(a.costs[..., :3, :], b.costs[..., :3, :])  # energies
    assert not np.array_equal(a.meets_deadline, b.meets_deadline)  # the realised lateness differs
    assert 0 < a.deadline_probability.mean() < 1


@pytest.mark.parametrize("persistence", [0.0, 0.8])
def test_deadline_probability_is_calibrated(persistence):
    """Among executed experts, the share that meets the deadline matches the observed probability (binned)."""
    from wide_env.envs.vector import WideMoEVectorEnv

    env = WideMoEVectorEnv(64, config={"compute": {"queue_delay_mean_s": 0.004,
                                                                 "queue_persistence": persistence}})
    obs, _ = env.reset(seed=3)
    p_seen, met = [], []
    for _ in range(64):
        p = obs["deadline_probability"].astype(np.float64)
        state = env.episode_batch.state
        meets = env.sim.view(state).meets_deadline
        obs, *_ = env.step(np.ones((64, 8), dtype=np.int8))
        p_seen.append(p.ravel())
        met.append(meets.ravel())
    p_seen, met = np.concatenate(p_seen), np.concatenate(met)
    checked = 0
    for lo, hi in ((0.0, 0.05), (0.05, 0.35), (0.35, 0.65), (0.65, 0.95), (0.95, 1.01)):
        sel = (p_seen >= lo) & (p_seen < hi)
        if sel.sum() < 300:
            continue
        p = p_seen[sel].mean()  # 4 binomial standard errors
        assert abs(met[sel].mean() - p) < 4 * np.sqrt(max(p * (1 - p), 1e-4) / sel.sum()) + 0.005, (lo, hi)
        checked += 1
    assert checked >= (3 if persistence else 1)
    assert abs(met.mean() - p_seen.mean()) < 4 * np.sqrt(p_seen.mean() * (1 - p_seen.mean()) / met.size) + 0.005


def test_accuracy_objective_rewards_the_tokens_loss_increase():
    """reward.objective = 'accuracy': no budget penalty; at a token's last layer the reward adds
    -accuracy_weight x the token's loss increase (the effect tables' estimate); the total is the sum."""
    env = WideMoEEnv({"reward": {"objective": "accuracy", "accuracy_weight": 3.0}, "n_tokens": 4})
    obs, _ = env.reset(seed=0)
    seen_penalty = False
    for _ in range(16):
        obs, reward, _, _, info = env.step(np.zeros(8, dtype=np.int8))  # skip everything: over budget
        assert info["budget_violated"] == 1 and info["reward_deviation"] == 0.0
        if info["token_complete"]:
            assert info["reward_accuracy"] == pytest.approx(-3.0 * info["delta_loss"])
            seen_penalty |= info["reward_accuracy"] < 0
        else:
            assert info["reward_accuracy"] == 0.0
        assert reward == pytest.approx(info["reward_energy"] + info["reward_deadline"] + info["reward_accuracy"])
    assert seen_penalty
    with pytest.raises(ConfigError, match="reward.objective"):
        WideMoEEnv({"reward": {"objective": "accuracy"}, "gating": {"source": "synthetic"}})
