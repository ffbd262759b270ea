"""Causal policies for budgets that span a token or an episode: budget bookkeeping, the chance constraint, the
offline statistics and energy model, the stochastic DP and drift-plus-penalty, determinism."""

import dataclasses

import gymnasium as gym
import numpy as np
import pytest

import wide_env  # noqa: F401  (registers the envs)
from baselines.policies import make_policy
from baselines.siftmoe import deviation_of
from baselines.span_stats import SpanStatistics, span_statistics
from baselines.spanning import (ChanceSiftMoE, DriftPlusPenaltySiftMoE, SpanSiftMoE, StochasticDPSiftMoE,
                                bellman_step, interpolate, span_position)

SMALL = {"n_tokens": 4}


def _env(mode, **extra):
    return gym.make("wide_env/WideMoE-v0", config={"budget": {"mode": mode}, **SMALL, **extra})


@pytest.fixture(scope="module")
def token_stats():
    return span_statistics(_env("token").unwrapped.config, episodes=8)


@pytest.fixture(scope="module")
def episode_stats():
    return span_statistics(_env("episode").unwrapped.config, episodes=8)


def _policies(mode, stats):
    env = _env(mode)
    return env, {
        "siftmoe_span": make_policy("siftmoe_span", env),
        "siftmoe_span_greedy": make_policy("siftmoe_span", env, allocation="greedy"),
        "siftmoe_cc": make_policy("siftmoe_cc", env),
        "siftmoe_sdp": make_policy("siftmoe_sdp", env, stats=stats),
        "siftmoe_dpp": make_policy("siftmoe_dpp", env, stats=stats),
    }


def test_span_position():
    problem = _env("episode").unwrapped.problem
    a = {"position": np.array([[0.0, 0.0], [1 / 3, 0.0], [1.0, 1.0], [0.0, 1 / 3]])}
    h, left, H = span_position(a, problem)
    assert H == 16 and h.tolist() == [0, 1, 15, 4] and left.tolist() == [16, 15, 1, 12]
    h, left, H = span_position(a, dataclasses.replace(problem, budget_mode="token"))
    assert H == 4 and h.tolist() == [0, 1, 3, 0] and left.tolist() == [4, 3, 1, 4]


def test_even_share_over_the_decisions_left():
    env = _env("episode")
    policy = make_policy("siftmoe_span", env)
    a = {"budget_remaining": np.array([[0.5], [0.5]]), "position": np.array([[0.0, 0.0], [1.0, 1.0]])}
    np.testing.assert_allclose(policy.layer_budget(a), np.array([0.5 / 16, 0.5]) * (1 - 1e-6))
    greedy = make_policy("siftmoe_span", env, allocation="greedy")
    np.testing.assert_allclose(greedy.layer_budget(a), np.array([0.5, 0.5]) * (1 - 1e-6))


def test_span_siftmoe_is_siftmoe_within_a_token():
    env = _env("token")
    mine, theirs = make_policy("siftmoe_span", env), make_policy("siftmoe", env)
    obs, _ = env.reset(seed=3)
    truncated = False
    while not truncated:
        action = mine(obs)
        np.testing.assert_array_equal(action, theirs(obs))
        obs, _, _, truncated, _ = env.step(action)


@pytest.mark.parametrize("mode", ["token", "episode"])
def test_never_overspends_when_the_budget_allows(mode, token_stats, episode_stats):
    """Whenever some usable set fits what is left of the span, the decision fits it (no violation), and every
    policy is deterministic for a seed."""
    env, policies = _policies(mode, token_stats if mode == "token" else episode_stats)
    u = env.unwrapped
    for name, policy in policies.items():
        for seed in (0, 1):
            actions = []
            obs, _ = env.reset(seed=seed)
            policy.reset(seed)
            truncated = False
            while not truncated:
                view = u.current_view()
                least = deviation_of(view.meets_deadline, view.deviation_table)
                action = policy(obs)
                actions.append(action)
                obs, _, _, truncated, info = env.step(action)
                if least <= info["deviation_budget"] * (1 - 1e-5):
                    assert info["budget_violated"] == 0, (name, seed)
                    assert info["weighted_deviation"] <= info["deviation_budget"]
            obs, _ = env.reset(seed=seed)
            policy.reset(seed)
            for action in actions:
                np.testing.assert_array_equal(policy(obs), action)
                obs, *_ = env.step(action)


def _hand_made(problem, probability=None):
    """One observation: expert 0 is the slot's own expert (cost 1), expert 1 a cheap perfect stand-in."""
    E, K = problem.n_experts, problem.top_k
    table = np.full((K, E + 1), 5.0)
    table[:, E] = 1.0  # skip costs 1 budget unit per slot
    table[:, 0] = 0.0
    table[:, 1] = 0.0
    obs = {"gate_probs": np.full(E, 1 / E), "topk_mask": np.eye(E)[0], "topk_weight": np.eye(E)[0],
           "channel_gain_db": np.full(problem.n_nodes, -100.0), "energy_cost": np.full(E, 5.0),
           "latency_ratio": np.full(E, 0.5), "deviation_table": table.reshape(-1),
           "budget_remaining": np.array([0.0]), "position": np.array([0.0, 0.0])}
    obs["energy_cost"][0], obs["energy_cost"][1] = 1.0, 0.1
    # deterministic queues: every expert certain to meet the deadline (the layout always has the key)
    obs["deadline_probability"] = np.ones(E) if probability is None else np.asarray(probability, dtype=np.float64)
    return {k: np.asarray(v, dtype=np.float32) for k, v in obs.items()}


def test_chance_constraint_on_deadline_probability():
    """Under uncertain queues an expert whose deadline probability is below 1 - delta cannot serve."""
    env = _env("token")
    problem = env.unwrapped.problem
    policy = make_policy("siftmoe_cc", env)  # delta = 0.05
    assert policy(_hand_made(problem)).tolist()[:2] == [0, 1]  # certain deadlines: the cheap stand-in
    risky = np.ones(problem.n_experts)
    risky[1] = 0.9
    assert policy(_hand_made(problem, risky)).tolist()[:2] == [1, 0]  # the stand-in may be late: own expert
    assert make_policy("siftmoe_cc", env, delta=0.2)(_hand_made(problem, risky)).tolist()[:2] == [0, 1]
    # the flat layout: the key found through problem.obs_slices
    flat_problem = dataclasses.replace(problem, flatten=True)
    obs = _hand_made(problem, risky)
    flat = np.concatenate([obs[k] for k in sorted(problem.obs_slices, key=lambda k: problem.obs_slices[k].start)])
    assert ChanceSiftMoE(flat_problem)(flat).tolist()[:2] == [1, 0]
    with pytest.raises(ValueError, match="delta"):
        ChanceSiftMoE(problem, delta=1.0)
    # the planning policies apply the same constraint
    stats = span_statistics(env.unwrapped.config, episodes=4)
    sdp = StochasticDPSiftMoE(problem, stats=stats)
    assert sdp(_hand_made(problem, risky)).tolist()[:2] == [1, 0]
    # ... and plan with the sample decisions' deadline probabilities, when the observation has them
    # deterministic queues: the probabilities are 0 or 1, so the constraint is the usable mask itself
    assert set(np.unique(stats.deadline_probability)) <= {0.0, 1.0}
    assert (stats.usable_under(0.05) == stats.usable).all()
    probability = np.where(np.arange(problem.n_experts) == 1, 0.9, 1.0) * np.ones(stats.usable.shape)
    uncertain = dataclasses.replace(stats, deadline_probability=probability)
    assert not uncertain.usable_under(0.05)[..., 1].any() and (uncertain.usable_under(0.2) == stats.usable).all()


def test_energy_model_recovers_the_joules():
    """The statistics' energy estimate is proportional to the realised energy in J across decisions (the
    default uplink scope is log-linear in the channel gain)."""
    env = _env("episode")
    stats = span_statistics(env.unwrapped.config, episodes=8)
    u = env.unwrapped
    obs, _ = env.reset(seed=123)
    tables = u.sim.episode_tables(u._state, 0)
    ratios = []
    for t in range(8):
        c, layer = divmod(t, u.sim.n_layers)
        est = stats.energy_of(obs["energy_cost"][None], obs["channel_gain_db"][None])[0] * stats.energy_scale
        ratios.append(est / tables.energy[c, layer])
        obs, *_ = env.step(np.zeros(8, dtype=np.int8))
    np.testing.assert_allclose(np.concatenate(ratios), 1.0, rtol=2e-3)


def test_statistics_file_round_trip_and_errors(tmp_path, token_stats):
    path = tmp_path / "stats.npz"
    token_stats.save(path)
    back = SpanStatistics.load(path, expect_key=token_stats.key)
    for f in dataclasses.fields(SpanStatistics):
        np.testing.assert_array_equal(getattr(back, f.name), getattr(token_stats, f.name))
    with pytest.raises(ValueError, match="another config"):
        SpanStatistics.load(path, expect_key="0" * 32)
    path.write_bytes(b"not an npz file")
    with pytest.raises(ValueError, match="not a valid span-statistics file"):
        SpanStatistics.load(path)
    cached = span_statistics(_env("token").unwrapped.config, episodes=3, cache_dir=tmp_path)
    files = list(tmp_path.glob("span-stats-*.npz"))
    assert len(files) == 1 and SpanStatistics.load(files[0]).episodes == 3 and cached.episodes == 3
    with pytest.raises(ValueError, match="episodes"):
        SpanStatistics.collect(_env("token").unwrapped.config, episodes=1)
    with pytest.raises(ValueError, match="same config"):
        StochasticDPSiftMoE(_env("episode").unwrapped.problem, stats=token_stats)
    with pytest.raises(ValueError, match="budget.mode = 'layer'"):
        make_policy("siftmoe_sdp", _env("layer"))


def test_bellman_step_is_the_expectation_of_the_best_point():
    rng = np.random.default_rng(0)
    dev = np.where(rng.random((5, 3)) < 0.8, rng.random((5, 3)) * 0.6, np.inf)
    dev[:, 0] = rng.random(5) * 0.6
    energy = np.where(np.isfinite(dev), rng.random((5, 3)), np.inf)
    future = np.linspace(3.0, 0.0, 11) ** 2 / 3
    got = bellman_step(dev, energy, future, penalty=7.0)
    grid = np.linspace(0, 1, 11)
    for g, b in enumerate(grid):
        expected = np.mean([min(energy[m, f] + interpolate(future, np.array(max(b - dev[m, f], 0.0)))
                                + (7.0 * (1 + dev[m, f] - b) if dev[m, f] > b else 0.0)
                                for f in range(3) if np.isfinite(dev[m, f])) for m in range(5)])
        assert got[g] == pytest.approx(expected, rel=1e-12)


def test_stochastic_dp_values_and_last_decision(token_stats):
    env = _env("token")
    policy = make_policy("siftmoe_sdp", env, stats=token_stats)
    V = policy.values
    assert (V[-1] == 0).all() and (np.diff(V, axis=1) <= 1e-12).all()  # more budget never costs more
    # at a token's last layer the plan is greedy: the least energy that fits what is left
    obs, _ = env.reset(seed=0)
    greedy = make_policy("siftmoe_span", env, allocation="greedy")
    for _ in range(3):
        obs, *_ = env.step(greedy(obs))
    np.testing.assert_array_equal(policy(obs), greedy(obs))
    again = make_policy("siftmoe_sdp", env, stats=token_stats)
    np.testing.assert_array_equal(again.values, V)


def test_drift_plus_penalty_static_price_spends_the_budget(episode_stats):
    env = _env("episode")
    policy = make_policy("siftmoe_dpp", env, stats=episode_stats)
    dev, energy = policy._samples
    spans = dev.shape[0] * dev.shape[1] / policy.H

    def spent(price):  # each sample decision minimises energy + price x deviation
        finite = np.isfinite(dev)
        pick = np.argmin(np.where(finite, energy + price * np.where(finite, dev, 0), np.inf), axis=2)
        return np.take_along_axis(dev, pick[..., None], axis=2).sum() / spans

    assert spent(policy.price0) <= 1.0 < spent(policy.price0 * (1 - 1e-6))  # the least price within budget
    assert policy.price0 > 0 and policy.gain in [g * policy.price0 for g in DriftPlusPenaltySiftMoE.GAINS]
    assert make_policy("siftmoe_dpp", env, stats=episode_stats).gain == policy.gain
    fixed = make_policy("siftmoe_dpp", env, stats=episode_stats, price0=2.0, gain=0.0)
    assert (fixed.price0, fixed.gain) == (2.0, 0.0)


def test_planning_beats_the_even_split_within_tokens(token_stats):
    """On the default trace the stochastic DP and drift-plus-penalty spend less energy than the even split and
    no less than the oracle (same seeds, no violation)."""
    env, policies = _policies("token", token_stats)
    oracle = make_policy("oracle", env)
    totals = {}
    compared = [("oracle", oracle)] + [(k, policies[k]) for k in ("siftmoe_span", "siftmoe_sdp", "siftmoe_dpp")]
    for name, policy in compared:
        total = 0.0
        for seed in range(4):
            obs, _ = env.reset(seed=seed)
            policy.reset(seed)
            truncated = False
            while not truncated:
                obs, _, _, truncated, info = env.step(policy(obs))
                total += info["energy_j"]
                assert info["budget_violated"] == 0
        totals[name] = total
    assert totals["oracle"] <= min(totals.values()) * (1 + 1e-12)
    assert totals["siftmoe_sdp"] < totals["siftmoe_span"] and totals["siftmoe_dpp"] < totals["siftmoe_span"]


def test_span_policy_errors():
    env = _env("token")
    with pytest.raises(ValueError, match="allocation"):
        SpanSiftMoE(env.unwrapped.problem, allocation="paced")
    with pytest.raises(TypeError, match="SpanStatistics"):
        StochasticDPSiftMoE(env.unwrapped.problem, stats={})
    with pytest.raises(ValueError, match="decoding"):
        make_policy("siftmoe_sdp", gym.make("wide_env/WideMoEPrefill-v0"))


def test_span_report_compares_with_the_oracle_on_the_same_seeds():
    from baselines.span_report import format_report, span_report

    rows = span_report("token", episodes=2, env_kwargs={"config": {"n_tokens": 3}})
    assert [r["policy"] for r in rows][:2] == ["oracle", "siftmoe even"]
    assert rows[0]["energy_over_oracle"] == 1.0 and rows[0]["gap_closed"] == 1.0 and rows[1]["gap_closed"] == 0.0
    assert all(r["energy_over_oracle"] >= 1 - 1e-12 and r["violation_rate"] == 0 for r in rows)
    assert all(0 <= r["accuracy_correct"] <= 1 for r in rows)
    assert "siftmoe_sdp" in format_report(rows)
    with pytest.raises(ValueError, match="mode"):
        span_report("layer")


@pytest.mark.parametrize("mode", ["token", "episode"])
def test_batched_observations_act_like_single_envs(mode, token_stats, episode_stats):
    """On the native vector env (one row per sub-env, per-row caches) the policies act as on single envs."""
    stats = token_stats if mode == "token" else episode_stats
    config = {"budget": {"mode": mode}, **SMALL}
    venv = gym.make_vec("wide_env/WideMoE-v0", num_envs=3, vectorization_mode="vector_entry_point", config=config)
    env = gym.make("wide_env/WideMoE-v0", config=config)
    for name in ("siftmoe_sdp", "siftmoe_dpp"):
        batched, single = make_policy(name, venv, stats=stats), make_policy(name, env, stats=stats)
        obs, _ = venv.reset(seed=[1, 2, 3])
        total = np.zeros(3)
        for _ in range(4 * 4):
            obs, _, _, _, info = venv.step(batched(obs))
            total += info["energy_j"]
        for b, seed in enumerate([1, 2, 3]):
            o, _ = env.reset(seed=seed)
            single.reset(seed)
            energy, done = 0.0, False
            while not done:
                o, _, _, done, info = env.step(single(o))
                energy += info["energy_j"]
            assert total[b] == pytest.approx(energy, rel=1e-12)


def test_statistics_run_without_the_model_and_equal_the_envs(monkeypatch):
    """Span statistics need no accuracy: on a model-accuracy preset they step the simulator alone (no model
    backend is built) and equal what the env (with its model) observes."""
    import baselines.span_stats as span_stats
    import wide_env.envs.batch as batch_module
    from wide_env.config import WideConfig
    from wide_env.envs.decode import WideMoEEnv

    config = WideConfig.from_dict({"profile": "mixtral-8x7b", "n_tokens": 3, "budget": {"mode": "token"}})
    env = WideMoEEnv(config)
    assert env.problem.accuracy_source == "model"  # the preset's default: the checkpoint decodes each token
    monkeypatch.setattr(span_stats, "_sample_simulator", lambda cfg: (env.sim, env))  # the env's own path
    through_env = SpanStatistics.collect(config, episodes=3, seed=5)
    monkeypatch.undo()

    def no_model(*args, **kwargs):
        raise AssertionError("span statistics built a model backend")

    monkeypatch.setattr(batch_module, "model_backend_for", no_model)
    alone = SpanStatistics.collect(config, episodes=3, seed=5)
    for name in SpanStatistics._ARRAYS:
        np.testing.assert_array_equal(getattr(alone, name), getattr(through_env, name), err_msg=name)
    assert alone.energy_scale == through_env.energy_scale and alone.key == through_env.key
