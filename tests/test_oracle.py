"""The hindsight oracle: exact against brute force over every executed mask of every decision of a span, and, as
a policy, the plan the env then executes."""

import types

import gymnasium as gym
import numpy as np
import pytest

import wide_env  # noqa: F401  (registers the envs)
from baselines.oracle import Oracle, gap_closed, plan_episode, solve_span, step_violations, usable_experts
from baselines.pareto import decision_fronts, subset_members
from baselines.policies import make_policy
from baselines.reference import _masks_deviation, _masks_energy, all_masks, brute_force_span
from wide_env.envs.decode import WideMoEEnv


def _random_span(rng, T, E, K, style):
    if style == "ties":  # small integers: many exact ties in energy, deviation and budget sums
        energy = rng.integers(0, 3, size=(T, E)).astype(float)
        table = rng.integers(0, 3, size=(T, K, E + 1)).astype(float) * 0.5
    else:
        energy = rng.exponential(size=(T, E))
        table = rng.random((T, K, E + 1)) * 2.0
    usable = rng.random((T, E)) < 0.8
    return energy, usable, table


# ---- per-decision fronts ---------------------------------------------------------------------------------
def test_subset_members_lists_every_set_of_at_most_k():
    m = subset_members(5, 2)
    assert m.shape == (1 + 5 + 10, 2) and (m[0] == 5).all()
    sets = {tuple(sorted(x for x in row if x < 5)) for row in m.tolist()}
    assert len(sets) == 16


@pytest.mark.parametrize("style", ["ties", "real"])
def test_fronts_are_the_pareto_set_of_all_masks(style):
    """The front over <= K usable experts equals the non-dominated (deviation, energy) points over all 2^E
    executed masks (late experts executed included)."""
    rng = np.random.default_rng(7 if style == "ties" else 8)
    for _ in range(60):
        E, K = int(rng.integers(1, 8)), int(rng.integers(1, 4))
        energy, usable, table = _random_span(rng, 1, E, K, style)
        fr = decision_fronts(energy, usable, table)
        masks = all_masks(E)
        d = _masks_deviation(masks & usable[0], table[0])
        e = _masks_energy(masks, energy[0])
        nd = sorted({(di, ei) for di, ei in zip(d, e)
                     if not ((d <= di) & (e <= ei + 1e-12) & ((d < di) | (e < ei - 1e-12))).any()})
        n = int(fr.size[0])
        got = sorted(zip(fr.deviation[0, :n].tolist(), fr.energy[0, :n].tolist()))
        assert [x[0] for x in got] == [x[0] for x in nd]  # deviations bitwise (the env's sums)
        np.testing.assert_allclose([x[1] for x in got], [x[1] for x in nd], rtol=1e-12, atol=1e-12)
        assert (np.diff(fr.energy[0, :n]) > 0).all() and (np.diff(fr.deviation[0, :n]) < 0).all()
        for f in range(n):  # each point's executed set has that deviation and energy
            mask = fr.masks[0, f]
            assert mask.sum() <= K and not (mask & ~usable[0]).any()
            assert _masks_deviation(mask[None], table[0])[0] == fr.deviation[0, f]
            assert _masks_energy(mask[None], energy[0])[0] == pytest.approx(fr.energy[0, f], rel=1e-12, abs=1e-12)


# ---- one span against brute force --------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["ties", "real"])
def test_solve_span_matches_brute_force(style):
    rng = np.random.default_rng(11 if style == "ties" else 12)
    met_seen = set()
    for trial in range(120):
        E, K = int(rng.integers(2, 6)), int(rng.integers(1, 3))
        T = int(rng.integers(1, 4))
        while (2 ** E) ** T > 70_000:
            T -= 1
        energy, usable, table = _random_span(rng, T, E, K, style)
        skip = max(table[:, :, E].sum(), 0.5)
        # budgets: exactly an achievable sum (ties at the boundary), random, tiny (infeasible); some spans have
        # spent part of their budget, or more than all of it, before the first decision
        budget = [float(skip), float(rng.random() * skip + 1e-3), 1e-3, 0.5 * float(skip)][trial % 4]
        used = [0.0, 0.0, float(rng.random() * budget), 1.5 * budget][trial % 4 if trial % 5 == 0 else 0]
        sol = solve_span(decision_fronts(energy, usable, table), budget, used)
        met, least, spent = brute_force_span(energy, usable, table, budget, used)
        assert sol.budget_met == met
        assert sol.energy == pytest.approx(least, rel=1e-12, abs=1e-12)
        assert sol.spent == spent  # least total deviation among the least-energy plans, bitwise
        met_seen.add(met)
    assert met_seen == {True, False}


def test_infeasible_span_takes_the_least_deviation_everywhere():
    energy = np.array([[1.0, 2.0], [3.0, 1.0]])
    usable = np.array([[False, True], [True, True]])  # decision 0's own expert is late
    table = np.array([[[0.0, 0.2, 1.0]], [[0.5, 0.0, 1.0]]])  # K = 1: the slot's own expert is 0, then 1
    sol = solve_span(decision_fronts(energy, usable, table), budget=0.01)
    assert not sol.budget_met and sol.spent == 0.2 and sol.energy == 3.0  # stand-in 1, then own expert 1
    assert step_violations([0.2, 0.0], 0.0, 0.01).tolist() == [True, False]
    # with enough budget the cheapest plan skips where it is cheapest: skip decision 0 costs 1.0 of 1.05
    sol = solve_span(decision_fronts(energy, usable, table), budget=1.05)
    assert sol.budget_met and sol.energy == 1.0 and sol.spent == 1.0


def test_a_span_already_overspent_can_still_avoid_violations():
    """More than the budget spent before (another policy's actions): only decisions within the env's tolerance
    (1e-9 budget units) avoid a violation, and the oracle finds the cheapest of them."""
    energy = np.array([[1.0, 0.1], [3.0, 1.0]])
    usable = np.ones((2, 2), dtype=bool)
    table = np.array([[[0.0, 5e-10, 1.0]], [[0.5, 0.0, 1.0]]])  # expert 1 of decision 0: within the tolerance
    sol = solve_span(decision_fronts(energy, usable, table), budget=1.0, used=1.5)
    assert sol.budget_met and sol.energy == pytest.approx(1.1) and sol.spent == 1.5 + 5e-10
    met, least, spent = brute_force_span(energy, usable, table, 1.0, 1.5)
    assert met and least == pytest.approx(1.1) and spent == sol.spent


def test_step_violations_follow_the_env_rule():
    assert step_violations([0.5, 0.5, 0.1], 0.0, 1.0).tolist() == [False, False, True]
    assert step_violations([0.7, 0.5, 0.0], 0.0, 1.0).tolist() == [False, True, False]  # nothing spent: no violation
    assert step_violations([1.0 + 1e-10], 0.0, 1.0).tolist() == [False]  # within the env's 1e-9 tolerance


# ---- whole episodes of small envs against brute force -----------------------------------------------------
def _small_env(mode, E, L, K, n_tokens, scale, queue=0.004):
    return WideMoEEnv({"model": {"n_layers": L, "n_experts": E, "top_k": K}, "gating": {"source": "synthetic"},
                       "n_tokens": n_tokens, "budget": {"mode": mode, "scale": scale},
                       "compute": {"queue_delay_mean_s": queue}})


@pytest.mark.parametrize("mode,E,L,K,n_tokens", [("token", 4, 4, 2, 3), ("token", 6, 2, 2, 2), ("token", 5, 3, 2, 2),
                                                 ("episode", 4, 2, 2, 2), ("episode", 3, 2, 1, 3)])
def test_plan_episode_matches_brute_force(mode, E, L, K, n_tokens):
    met_seen = set()
    for seed, scale in [(0, 1.0), (1, 0.3), (2, 0.05), (3, 2.0)]:
        env = _small_env(mode, E, L, K, n_tokens, scale)
        env.reset(seed=seed)
        tables = env.sim.episode_tables(env._state, 0)
        plan = plan_episode(tables)
        C = tables.energy.shape[0]
        usable = usable_experts(tables)
        spans = [(slice(c, c + 1),) for c in range(C)] if mode == "token" else [(slice(0, C),)]
        total = 0.0
        for (sl,) in spans:
            T = (sl.stop - sl.start) * L
            met, least, spent = brute_force_span(tables.energy[sl].reshape(T, E), usable[sl].reshape(T, E),
                                                 tables.deviation_table[sl].reshape(T, K, E + 1), tables.span_budget)
            total += least
            met_seen.add(met)
            got_spent = 0.0
            for d in plan.step_deviation[sl].reshape(-1).tolist():
                got_spent = got_spent + d
            assert got_spent == spent
            if mode == "token":
                assert plan.budget_met[sl.start] == met
            else:
                assert plan.budget_met[0] == met
        assert plan.energy == pytest.approx(total, rel=1e-12)
        np.testing.assert_allclose((plan.masks * tables.energy).sum(axis=-1), plan.step_energy, rtol=1e-12)
    assert True in met_seen


# ---- the oracle as a policy ----------------------------------------------------------------------------------
def _run(env, policy, seed):
    obs, _ = env.reset(seed=seed)
    policy.reset(seed)
    energies, violations, truncated = [], [], False
    while not truncated:
        obs, _, _, truncated, info = env.step(policy(obs))
        energies.append(info["energy_j"])
        violations.append(info["budget_violated"])
    return np.array(energies), np.array(violations)


@pytest.mark.parametrize("mode", ["layer", "token", "episode"])
def test_the_env_executes_the_oracle_plan(mode):
    """What the env reports (energy, violations) is what the oracle planned; in layer mode it is SiftMoE."""
    env = gym.make("wide_env/WideMoE-v0", config={"budget": {"mode": mode, "scale": 0.5}, "n_tokens": 6})
    oracle = make_policy("oracle", env)
    for seed in (0, 1):
        env.reset(seed=seed)
        u = env.unwrapped
        plan = plan_episode(u.sim.episode_tables(u._state, 0))
        energies, violations = _run(env, oracle, seed)
        assert energies.sum() == pytest.approx(plan.energy, rel=1e-12)
        np.testing.assert_allclose(energies, plan.step_energy.reshape(-1), rtol=1e-12)
        assert violations.tolist() == plan.violated.reshape(-1).tolist()
        if mode == "layer":
            sift, _ = _run(env, make_policy("siftmoe", env), seed)
            np.testing.assert_allclose(energies, sift, rtol=1e-9)


def test_the_oracle_is_a_lower_bound_of_causal_policies():
    env = gym.make("wide_env/WideMoE-v0", config={"budget": {"mode": "token"}, "n_tokens": 6})
    oracle = make_policy("oracle", env)
    others = [make_policy("siftmoe", env), make_policy("siftmoe", env, allocation="greedy"), make_policy("topk", env)]
    for seed in range(3):
        best, v = _run(env, oracle, seed)
        assert not v.any()
        for policy in others:
            energies, violations = _run(env, policy, seed)
            if not violations.any():
                assert best.sum() <= energies.sum() * (1 + 1e-12)


def test_the_oracle_replans_after_another_action():
    """Another action in the middle of a token: the oracle plans the rest with what the token has spent."""
    env = gym.make("wide_env/WideMoE-v0", config={"budget": {"mode": "token"}, "n_tokens": 3})
    oracle = make_policy("oracle", env)
    obs, _ = env.reset(seed=4)
    oracle(obs)
    obs, _, _, _, info = env.step(np.zeros(8, dtype=np.int8))  # skip everything at layer 0 instead
    u = env.unwrapped
    expected = plan_episode(u.sim.episode_tables(u._state, 0), token=0, layer=1, used=info["weighted_deviation"])
    energies, truncated = [], False
    while not truncated:
        obs, _, _, truncated, info = env.step(oracle(obs))
        energies.append(info["energy_j"])
    assert sum(energies) == pytest.approx(expected.energy, rel=1e-12)


@pytest.mark.parametrize("mode", ["token", "episode"])
def test_the_oracle_drives_the_native_vector_env(mode):
    """Per-sub-env seeds replay the single env: the oracle's energies match, across an autoreset too."""
    config = {"budget": {"mode": mode}, "n_tokens": 4}
    venv = gym.make_vec("wide_env/WideMoE-v0", num_envs=3, vectorization_mode="vector_entry_point", config=config)
    oracle = make_policy("oracle", venv)
    obs, _ = venv.reset(seed=[5, 6, 7])
    steps = 4 * 4
    first, second = np.zeros(3), np.zeros(3)
    for t in range(2 * steps + 1):
        obs, _, _, _, info = venv.step(oracle(obs))
        assert not info["budget_violated"].any()
        (first if t < steps else second)[:] += info["energy_j"]
    env = gym.make("wide_env/WideMoE-v0", config=config)
    single = make_policy("oracle", env)
    for b, seed in enumerate([5, 6, 7]):
        assert first[b] == pytest.approx(_run(env, single, seed)[0].sum(), rel=1e-12)
    assert (second > 0).all()  # the autoreset episodes were planned afresh and played


def test_oracle_errors():
    env = gym.make("wide_env/WideMoE-v0", config={"budget": {"mode": "token"}, "n_tokens": 2})
    oracle = make_policy("oracle", env)
    with pytest.raises(RuntimeError, match="reset"):
        oracle(env.observation_space.sample())
    obs, _ = env.reset(seed=0)
    env.step(oracle(obs))
    with pytest.raises(RuntimeError, match="current observation"):
        oracle(obs)  # the observation of layer 0, the env is at layer 1
    with pytest.raises(ValueError, match="decoding"):
        make_policy("oracle", gym.make("wide_env/WideMoEPrefill-v0"))
    live = types.SimpleNamespace(problem=env.unwrapped.problem, _batch=env.unwrapped._batch,
                                 sim=types.SimpleNamespace(episode_tables=None, config=types.SimpleNamespace(
                                     gating=types.SimpleNamespace(backend="live"))))
    with pytest.raises(ValueError, match="live"):
        Oracle(live)
    with pytest.raises(TypeError, match="WIDE decoding env"):
        Oracle(types.SimpleNamespace(problem=env.unwrapped.problem))


def test_episode_oracle_needs_the_whole_episode_planned():
    config = {"budget": {"mode": "episode"}, "n_tokens": 600, "gating": {"source": "synthetic"}}
    venv = gym.make_vec("wide_env/WideMoE-v0", num_envs=14, vectorization_mode="vector_entry_point", config=config)
    obs, _ = venv.reset(seed=0)  # one generator: chunks of 32768 / (14 x 4) = 585 tokens < 600
    with pytest.raises(RuntimeError, match="whole episode"):
        make_policy("oracle", venv)(obs)


def test_gap_closed():
    assert gap_closed(2.0, 1.5, 1.0) == 0.5
    assert gap_closed(2.0, 1.0, 1.0) == 1.0
    assert gap_closed(2.0, 2.5, 1.0) == -0.5
    assert np.isnan(gap_closed(1.0, 1.0, 1.0))
    np.testing.assert_allclose(gap_closed([2.0, 3.0], [1.5, 1.0], [1.0, 1.0]), [0.5, 1.0])


def test_gap_closed_never_exceeds_one_and_says_why_not():
    from baselines.oracle import BELOW_BOUND, MORE_VIOLATIONS, NO_GAP, NOT_BELOW, gap_closed_reason

    # the benchmark's queues regime (issue 23): PPO 2.841 mJ against the oracle's 3.06 mJ is not "2.46 of the gap"
    best = 3.21e-3
    assert (best - 2.841e-3) / (best - 3.06e-3) == pytest.approx(2.46, abs=0.01)  # the old reading
    assert np.isnan(gap_closed(best, 2.841e-3, 3.06e-3))
    assert gap_closed_reason(best, 2.841e-3, 3.06e-3) == BELOW_BOUND
    # the oracle bounds only policies with no more violations than it
    assert np.isnan(gap_closed(2.0, 1.5, 1.0, agent_violations=0.02, oracle_violations=0.0))
    assert gap_closed_reason(2.0, 1.5, 1.0, agent_violations=0.02, oracle_violations=0.0) == MORE_VIOLATIONS
    assert gap_closed(2.0, 1.5, 1.0, agent_violations=0.0, oracle_violations=0.0) == 0.5
    assert np.isnan(gap_closed(2.0, 1.5, 1.0, baseline_violations=3, oracle_violations=1))
    assert gap_closed_reason(2.0, 1.5, 1.0, baseline_violations=3, oracle_violations=1) == NOT_BELOW
    # a baseline below the oracle has no gap to close (it violates or solves another problem)
    assert np.isnan(gap_closed(0.9, 0.95, 1.0)) and gap_closed_reason(0.9, 0.95, 1.0) == NO_GAP
    # energy equal to the oracle's up to summation order reads 1, never more
    assert gap_closed(2.0, 1.0 * (1 - 1e-12), 1.0) == 1.0
    rng = np.random.default_rng(0)
    b, a, o = rng.uniform(0, 3, (3, 1000))
    values = gap_closed(b, a, o, agent_violations=rng.integers(0, 3, 1000), oracle_violations=1)
    assert not (values > 1).any() and np.isfinite(values).any()
    reasons = gap_closed_reason(b, a, o)
    assert ((reasons == "") == np.isfinite(gap_closed(b, a, o))).all()
