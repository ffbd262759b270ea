"""The deviation shield (wide_env.wrappers) and the per-step constraint costs in info (issue 23, item 7)."""

from __future__ import annotations

import itertools

import gymnasium as gym
import numpy as np
import pytest

import wide_env  # noqa: F401  (registers the ids)
from wide_env.envs.decode import WideMoEEnv
from wide_env.envs.vector import WideMoEVectorEnv
from wide_env.wrappers import DeviationShield, VectorDeviationShield, shield_actions
from wide_env.wrappers.shield import EXACT_TOP_K

SMALL = {"n_tokens": 8}
LATE = {"compute": {"queue_delay_mean_s": 0.02, "queue_persistence": 0.9}, "gating": {"source": "synthetic"}}


def _random_episode(env, seed: int) -> dict:
    """Run one episode of uniformly random actions; sums of the budget figures."""
    env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    n = env.action_space.n
    totals = {"budget_violated": 0, "cost_budget": 0.0, "cost": 0.0, "added": 0, "steps": 0}
    done = False
    while not done:
        _, _, term, trunc, info = env.step(rng.integers(0, 2, n, dtype=np.int8))
        totals["budget_violated"] += info["budget_violated"]
        totals["cost_budget"] += info["cost_budget"]
        totals["cost"] += info["cost"]
        totals["added"] += int(getattr(env, "last_added", np.zeros(1)).sum())
        totals["steps"] += 1
        done = term or trunc
    return totals


@pytest.mark.parametrize("mode", ["token", "episode", "layer"])
def test_random_policy_under_the_shield_never_violates(mode):
    config = {**SMALL, "budget": {"mode": mode}}
    bare = _random_episode(WideMoEEnv(config), seed=3)
    assert bare["budget_violated"] > 0 and bare["cost_budget"] > 0  # the test can fail: random actions violate
    shielded = _random_episode(DeviationShield(gym.make("wide_env/WideMoE-v0", config=config)), seed=3)
    assert shielded["budget_violated"] == 0
    assert shielded["cost_budget"] == 0.0
    assert shielded["added"] > 0


@pytest.mark.parametrize("mode", ["token", "episode"])
def test_vector_shield_never_violates_across_autoresets(mode):
    B = 6
    env = VectorDeviationShield(gym.make_vec("wide_env/WideMoE-v0", num_envs=B, vectorization_mode="vector_entry_point",
                                             config={"n_tokens": 3, "budget": {"mode": mode}}))
    env.reset(seed=5)
    rng = np.random.default_rng(5)
    steps = 3 * env.unwrapped.problem.n_layers * 2 + 3  # two episodes each and an autoreset in between
    violated = cost = 0.0
    for _ in range(steps):
        _, _, _, _, info = env.step(rng.integers(0, 2, (B, env.single_action_space.n), dtype=np.int8))
        violated += info["budget_violated"].sum()
        cost += info["cost_budget"].sum()
    assert violated == 0 and cost == 0.0


def _supersets_by_kernel(env, executed: np.ndarray):
    """Every superset of ``executed`` that adds on-time Top-K experts, evaluated by the step kernel (the
    simulator's what-if, no state change): (added mask, fits, energy) rows."""
    batch = env.unwrapped.episode_batch
    sim, state = batch.sim, batch.state
    view = sim.view(state, 0)
    on_time = sim.on_time(state)[0]
    missing = [int(e) for e in view.topk_idx if on_time[e] and not executed[e]]
    rows = []
    for r in range(len(missing) + 1):
        for subset in itertools.combinations(missing, r):
            trial = executed.copy()
            trial[list(subset)] = True
            out = sim.evaluate(state, trial[None])
            rows.append((trial, out["budget_violated"][0] == 0, out["energy_j"][0]))
    return rows


@pytest.mark.parametrize("config", [{**SMALL, "budget": {"mode": "token"}},
                                    {**SMALL, "budget": {"mode": "episode"}},
                                    {**SMALL, "budget": {"mode": "layer"}},
                                    {**SMALL, "gating": {"source": "synthetic"},
                                     "model": {"n_experts": 6, "top_k": 3, "n_layers": 3},
                                     "budget": {"mode": "token"}}])
def test_shielded_action_is_the_least_energy_feasible_superset_brute_force(config):
    """Brute force on small cases: against every superset adding on-time Top-K experts, evaluated by the
    kernel, the shielded action fits, is a superset, is unchanged where the proposal fits, and has the least
    energy of the fitting ones."""
    env = WideMoEEnv(config)
    env.reset(seed=11)
    rng = np.random.default_rng(11)
    checked = changed = 0
    for _ in range(3 * env.problem.n_layers * 4):
        proposal = rng.integers(0, 2, env.sim.n_experts).astype(bool)
        shielded = shield_actions(env.unwrapped.episode_batch, proposal[None])[0]
        rows = _supersets_by_kernel(env, proposal)
        assert (shielded | proposal == shielded).all()
        fitting = [(trial, energy) for trial, fits, energy in rows if fits]
        assert fitting, "the Top-K set fits whenever no Top-K expert is late"
        own = next(fits for trial, fits, _ in rows if (trial == proposal).all())
        if own:
            assert (shielded == proposal).all()
        else:
            changed += 1
        got = next((fits, energy) for trial, fits, energy in rows if (trial == shielded).all())
        assert got[0], "the shielded action fits the budget left"
        assert got[1] <= min(energy for _, energy in fitting) * (1 + 1e-12)
        checked += 1
        env.step(rng.integers(0, 2, env.sim.n_experts, dtype=np.int8))  # move on with an unshielded action
        if env.unwrapped.episode_batch.state.done[0]:
            env.reset(seed=int(rng.integers(1000)))
    assert changed > 0 and checked > changed


def test_with_late_experts_the_shield_adds_only_on_time_experts():
    # a backlog that makes some experts late, some of them Top-K: a late Top-K expert cannot serve its slot, so
    # a violation can be unavoidable then (documented); the shield never adds a late expert
    config = {"compute": {"queue_delay_mean_s": 0.005, "queue_persistence": 0.9}, "n_tokens": 6,
              "budget": {"mode": "token"}}
    env = DeviationShield(gym.make("wide_env/WideMoE-v0", config=config))
    env.reset(seed=2)
    rng = np.random.default_rng(2)
    batch = env.unwrapped.episode_batch
    added_any = late_seen = 0
    for _ in range(6 * batch.sim.n_layers):
        on_time = batch.sim.on_time(batch.state)[0].copy()
        late_seen += int((~on_time).sum())
        _, _, _, trunc, info = env.step(rng.integers(0, 2, env.action_space.n, dtype=np.int8))
        assert not (env.last_added & ~on_time).any()
        added_any += int(env.last_added.sum())
        if trunc:
            break
    assert late_seen > 0 and added_any > 0


def test_greedy_shield_for_large_top_k_fits():
    K = EXACT_TOP_K + 1
    config = {"n_tokens": 2, "gating": {"source": "synthetic"}, "model": {"n_experts": K + 1, "top_k": K,
                                                                          "n_layers": 2},
              "deadline": {"enforce": False}, "budget": {"mode": "token", "scale": 0.05}}
    assert _random_episode(WideMoEEnv(config), seed=4)["budget_violated"] > 0
    totals = _random_episode(DeviationShield(WideMoEEnv(config)), seed=4)
    assert totals["budget_violated"] == 0 and totals["added"] > 0


def test_shield_is_deterministic():
    def run():
        env = DeviationShield(WideMoEEnv({**SMALL, "budget": {"mode": "episode"}}))
        env.reset(seed=9)
        rng = np.random.default_rng(9)
        out = []
        for _ in range(20):
            _, reward, _, _, info = env.step(rng.integers(0, 2, env.action_space.n, dtype=np.int8))
            out.append((reward, info["energy_j"], tuple(env.last_added)))
        return out

    assert run() == run()


def test_shield_rejects_other_envs_and_bad_actions():
    with pytest.raises(ValueError, match="episode_batch"):
        DeviationShield(gym.make("CartPole-v1"))
    with pytest.raises(ValueError, match="decoding env"):
        DeviationShield(gym.make("wide_env/WideMoEPrefill-v0"))
    env = DeviationShield(WideMoEEnv(SMALL))
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(env.action_space.n, dtype=np.int8))
    env.reset(seed=0)
    with pytest.raises(ValueError, match="0 or 1"):
        env.step(np.full(env.action_space.n, 2))


# ---- the constraint costs in info ----------------------------------------------------------------------------
@pytest.mark.parametrize("config", [{**SMALL, "budget": {"mode": "token"}}, {**SMALL, "budget": {"mode": "layer"}},
                                    {**LATE, "n_tokens": 4}])
def test_cost_is_the_budget_excess_plus_the_enforced_deadline_misses(config):
    env = WideMoEEnv(config)
    env.reset(seed=1)
    rng = np.random.default_rng(1)
    weight = env.config.reward.deviation_weight
    seen = {"budget": 0.0, "deadline": 0.0}
    for _ in range(60):
        _, _, _, trunc, info = env.step(rng.integers(0, 2, env.action_space.n, dtype=np.int8))
        # the reward's deviation term is -w (1 + excess / unit) where violated: the cost is the excess / unit
        expected_budget = -info["reward_deviation"] / weight - 1.0 if info["budget_violated"] else 0.0
        assert info["cost_budget"] == pytest.approx(expected_budget, abs=1e-9)
        assert info["cost_budget"] >= 0.0
        assert info["cost_deadline"] == (info["deadline_misses"] if env.sim.enforce_deadline else 0)
        assert info["cost"] == info["cost_budget"] + info["cost_deadline"]
        seen["budget"] += info["cost_budget"]
        seen["deadline"] += info["cost_deadline"]
        if trunc:
            env.reset()
    assert seen["budget"] > 0
    if "compute" in config:  # the backlogged helpers miss the enforced deadline
        assert seen["deadline"] > 0


def test_cost_is_the_same_in_single_vector_and_sb3_envs():
    from wide_env.integrations.sb3_vec import WideMoESB3VecEnv

    config = {**LATE, "n_tokens": 3, "budget": {"mode": "token"}}
    single = WideMoEEnv(config)
    vector = WideMoEVectorEnv(1, config=config)
    sb3 = WideMoESB3VecEnv(1, config=config)
    single.reset(seed=7)
    vector.reset(seed=7)
    sb3.seed(7)
    sb3.reset()
    rng = np.random.default_rng(7)
    keys = ("cost", "cost_budget", "cost_deadline")
    total = 0.0
    for _ in range(3 * single.problem.n_layers - 1):
        action = rng.integers(0, 2, single.action_space.n, dtype=np.int8)
        _, _, _, _, a = single.step(action)
        _, _, _, _, b = vector.step(action[None])
        _, _, _, c = sb3.step(action[None])
        for key in keys:
            assert a[key] == b[key][0] == c[0][key], key
            assert isinstance(a[key], float) and b[key].dtype == np.float64
        total += a["cost"]
    assert total > 0


def test_prefill_reports_the_costs():
    env = gym.make("wide_env/WideMoEPrefill-v0")
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    _, _, _, _, info = env.step(rng.integers(0, 2, env.action_space.shape, dtype=np.int8))
    assert info["cost"] == info["cost_budget"] + info["cost_deadline"]
    assert info["cost_budget"] >= 0.0
    assert (info["cost_budget"] > 0) == (info["budget_violated"] > 0)
