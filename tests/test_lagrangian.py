"""The Lagrangian rule (baselines/lagrangian.py), its registration and its tuning (baselines/lagrangian_tuning.py):
exact against brute force on small cases, the guard, the online multiplier, determinism, bad inputs."""

from __future__ import annotations

import itertools
import json

import gymnasium as gym
import numpy as np
import pytest

import wide_env  # noqa: F401
from baselines.benchmark_regimes import REGIMES
from baselines.lagrangian import Lagrangian, lagrangian_sets, make_lagrangian, tuned_kwargs
from baselines.lagrangian_tuning import FRONT_LEVELS, front_score, sample_candidate, tune_budget
from baselines.policies import POLICY_NAMES, make_policy
from baselines.siftmoe import deviation_of
from wide_env.rules import serve_slots_batch


def _instance(rng, E, K, B):
    energy = rng.exponential(1.0, (B, E)) * (rng.uniform(size=(B, E)) > 0.1)  # some zero-energy experts
    usable = rng.uniform(size=(B, E)) > 0.25
    table = rng.exponential(1.0, (B, K, E + 1))
    own = rng.integers(E, size=(B, K))
    table[np.arange(B)[:, None], np.arange(K)[None], own] = 0.0  # each slot's own expert serves it exactly
    if rng.uniform() < 0.5:
        table = np.round(table, 1)  # ties
    price = rng.exponential(2.0, (B, K))
    return energy, usable, table, price


def _brute(energy, usable, table, price, allowed=None, max_size=None):
    """Score of every usable set (all sizes, or at most max_size): (energy, Delta, score) and the best by the rule."""
    E, K = energy.shape[0], table.shape[0]
    best = None
    pts = []
    for size in range(E + 1):
        if max_size is not None and size > max_size:
            break
        for members in itertools.combinations(np.flatnonzero(usable), size):
            mask = np.zeros(E, dtype=bool)
            mask[list(members)] = True
            delta, server = serve_slots_batch(table, mask)
            slot = table[np.arange(K), server]
            e = float(energy[mask].sum())
            pts.append((e, float(delta), e + float((price * slot).sum())))
    pts = np.array(pts)
    if allowed is not None:
        fits = pts[:, 1] <= allowed
        if not fits.any():
            least = np.lexsort((pts[:, 0], pts[:, 1]))[0]
            return pts, pts[least]
        pts_ok = pts[fits]
        best = pts_ok[np.argmin(pts_ok[:, 2])]
        return pts, best
    return pts, pts[np.argmin(pts[:, 2])]


@pytest.mark.parametrize("E,K", [(5, 2), (6, 3), (4, 1)])
def test_exact_against_brute_force_over_every_set(E, K):
    rng = np.random.default_rng(E * 10 + K)
    energy, usable, table, price = _instance(rng, E, K, 40)
    choice = lagrangian_sets(energy, usable, table, price)
    for b in range(40):
        _, best = _brute(energy[b], usable[b], table[b], price[b])  # all sizes: at most K experts suffice
        _, best_k = _brute(energy[b], usable[b], table[b], price[b], max_size=K)
        assert best[2] == pytest.approx(best_k[2], rel=1e-12, abs=1e-12)
        assert choice.score[b] == pytest.approx(best[2], rel=1e-12, abs=1e-12)
        m = choice.mask[b]
        assert m.sum() <= K and not (m & ~usable[b]).any()
        assert choice.energy[b] == pytest.approx(energy[b][m].sum())
        assert choice.deviation[b] == deviation_of(m, table[b])  # the env's serve rule, bit for bit


@pytest.mark.parametrize("E,K", [(5, 2), (6, 3)])
def test_guard_keeps_each_decision_within_what_is_left(E, K):
    rng = np.random.default_rng(7 + E)
    energy, usable, table, price = _instance(rng, E, K, 40)
    allowed = rng.uniform(0.0, 2.0, 40)
    choice = lagrangian_sets(energy, usable, table, price, allowed)
    for b in range(40):
        pts, best = _brute(energy[b], usable[b], table[b], price[b], allowed[b])
        if (pts[:, 1] <= allowed[b]).any():
            assert choice.deviation[b] <= allowed[b]
            assert choice.score[b] == pytest.approx(best[2], rel=1e-12, abs=1e-12)
        else:  # nothing fits: the least deviation, then the least energy
            assert choice.deviation[b] == pytest.approx(best[1]) and choice.energy[b] == pytest.approx(best[0])


def test_price_extremes_give_least_energy_and_least_deviation():
    rng = np.random.default_rng(3)
    energy, usable, table, _ = _instance(rng, 6, 2, 20)
    energy = energy + 0.01  # every set costs
    free = lagrangian_sets(energy, usable, table, np.zeros((20, 2)))
    assert not free.mask.any()  # no price on deviation: execute nothing
    dear = lagrangian_sets(energy, usable, table, np.full((20, 2), 1e9))
    for b in range(20):
        pts, _ = _brute(energy[b], usable[b], table[b], np.zeros(2))
        assert dear.deviation[b] == pytest.approx(pts[:, 1].min())


def test_bad_inputs_name_the_field():
    env = gym.make("wide_env/WideMoE-TokenBudget-v0", config={"n_tokens": 2})
    with pytest.raises(ValueError, match="mu must be a number or 4 numbers"):
        make_policy("lagrangian", env, mu=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"nu\[0\]"):
        make_policy("lagrangian", env, nu=[2.0, 1.0])
    with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
        make_policy("lagrangian", env, lam=-1.0)
    with pytest.raises(ValueError, match="eta must be"):
        make_policy("lagrangian", env, eta=float("nan"))
    with pytest.raises(TypeError, match="bad keyword arguments for policy 'lagrangian'"):
        make_policy("lagrangian", env, lamda=1.0)
    with pytest.raises(ValueError, match="price must be"):
        lagrangian_sets(np.ones((1, 3)), np.ones((1, 3), bool), np.ones((1, 2, 4)), -np.ones((1, 2)))
    with pytest.raises(ValueError, match="not prefill"):
        make_policy("lagrangian", gym.make("wide_env/WideMoEPrefill-v0"))
    with pytest.raises(ValueError, match="no tuned parameters for regime 'nope'"):
        tuned_kwargs("nope")
    assert "lagrangian" in POLICY_NAMES


def _run(env, policy, seed, steps=None):
    obs, _ = env.reset(seed=seed)
    policy.reset(seed)
    actions, violated, done = [], 0, False
    while not done and (steps is None or len(actions) < steps):
        a = policy(obs)
        actions.append(a)
        obs, _, term, trunc, info = env.step(a)
        violated += int(info["budget_violated"])
        done = term or trunc
    return np.array(actions), violated


def test_policy_on_the_token_regime_is_deterministic_batched_and_within_budget():
    env = gym.make("wide_env/WideMoE-TokenBudget-v0", config={"n_tokens": 4})
    pol = make_policy("lagrangian", env, lam=0.5, eta=0.2, mu=[1.0, 0.5, 2.0, 1.0], nu=[1.0, 0.3])
    a1, v1 = _run(env, pol, 11)
    a2, v2 = _run(env, pol, 11)
    np.testing.assert_array_equal(a1, a2)
    assert v1 == 0 and a1.shape == (16, 8) and a1.dtype == np.int8
    # a native vector env's batch gives every episode the single env's actions (per-row multipliers)
    venv = gym.make_vec("wide_env/WideMoE-TokenBudget-v0", num_envs=3, vectorization_mode="vector_entry_point",
                        config={"n_tokens": 4})
    obs, _ = venv.reset(seed=[11, 12, 13])
    pol.reset()
    batched = []
    for _ in range(16):
        act = pol(obs)
        batched.append(act)
        obs, *_ = venv.step(act)
    np.testing.assert_array_equal(np.array(batched)[:, 0], a1)
    single_12, _ = _run(env, pol, 12)
    np.testing.assert_array_equal(np.array(batched)[:, 1], single_12)


def test_online_multiplier_follows_the_dual_step():
    env = gym.make("wide_env/WideMoE-TokenBudget-v0", config={"n_tokens": 2})
    pol = make_policy("lagrangian", env, lam=2.0, eta=0.3)
    obs, _ = env.reset(seed=5)
    H = env.unwrapped.problem.n_layers
    lam = 2.0
    for _ in range(8):
        a = pol(obs)
        E, K = 8, 2
        dev = deviation_of(a.astype(bool), np.asarray(obs["deviation_table"], dtype=np.float64).reshape(K, E + 1))
        lam = max(0.0, lam + 0.3 * 2.0 * (H * dev - 1.0))
        assert pol._lam[0] == pytest.approx(lam)
        obs, *_ = env.step(a)
    obs, _ = env.reset(seed=6)  # an episode's first decision restarts from lambda_0, not from the carried value
    assert pol._lam[0] != 2.0
    a = pol(obs)
    dev = deviation_of(a.astype(bool), np.asarray(obs["deviation_table"], dtype=np.float64).reshape(2, 9))
    assert pol._lam[0] == pytest.approx(max(0.0, 2.0 + 0.3 * 2.0 * (H * dev - 1.0)))


def test_energy_model_is_joules_up_to_the_configs_median_topk_energy():
    """The rule's energies are the observed costs in J (the view's objective-scope energies) over one constant."""
    env = gym.make("wide_env/WideMoE-TokenBudget-v0", config={"n_tokens": 4})
    pol = make_policy("lagrangian", env)
    obs, _ = env.reset(seed=2)
    ratios = []
    for _ in range(16):
        view = env.unwrapped.sim.view(env.unwrapped.episode_batch.state, 0)
        est = pol.stats.energy_of(obs["energy_cost"][None].astype(np.float64), obs["channel_gain_db"][None])[0]
        ratios.append(view.energy / (est * pol.stats.energy_scale))
        obs, *_ = env.step(np.zeros(8, dtype=np.int8))
    ratios = np.concatenate(ratios)
    assert np.all(np.abs(np.log(ratios)) < 0.05)  # within 5% of the true joules


def test_tuned_parameters_cover_every_regime_and_build():
    for name, regime in REGIMES.items():
        kwargs = tuned_kwargs(name)
        env = gym.make(regime.env_id, config={"n_tokens": 2})
        pol = make_policy("lagrangian", env, **kwargs)
        assert isinstance(pol, Lagrangian)
        assert any(b.policy == "lagrangian" and b.kwargs == kwargs for b in regime.baselines), name
        obs, _ = env.reset(seed=0)
        assert env.action_space.contains(pol(obs))


def test_tuning_is_deterministic_and_respects_siftmoe_violations(tmp_path):
    a = sample_candidate(np.random.default_rng(4), 4, 2, online=True, queues=True, front=False)
    b = sample_candidate(np.random.default_rng(4), 4, 2, online=True, queues=True, front=False)
    assert a == b and a["nu"][0] == 1.0 and len(a["mu"]) == 4
    assert json.loads(json.dumps(a)) == a
    r1 = tune_budget("wide_env/WideMoE-TokenBudget-v0", trials=3, episodes=3, seed=30_000, search_seed=1,
                     config={"n_tokens": 4})
    r2 = tune_budget("wide_env/WideMoE-TokenBudget-v0", trials=3, episodes=3, seed=30_000, search_seed=1,
                     config={"n_tokens": 4})
    assert r1["kwargs"] == r2["kwargs"] and r1["selection"] == r2["selection"]
    sel = r1["selection"]
    assert sel["violations"] <= sel["siftmoe_violations"] and sel["misses"] <= sel["siftmoe_misses"]
    assert sel["energy_per_token_j"] == min(h["energy_per_token_j"] for h in r1["history"] if h["admissible"])


def test_front_score_on_a_hand_made_front():
    # Top-K (0.50, 1.0 J); the rule: (0.49, 0.5 J), (0.40, 0.1 J): linear between them
    energy, accuracy = [1.0, 0.5, 0.1], [0.50, 0.49, 0.40]
    expected = []
    for level in FRONT_LEVELS:
        a = 0.50 - level
        e = 1.0 + (0.5 - 1.0) * (0.50 - a) / 0.01 if a >= 0.49 else 0.5 + (0.1 - 0.5) * (0.49 - a) / 0.09
        expected.append(np.log(e))
    assert front_score(energy, accuracy, 0.50) == pytest.approx(np.mean(expected))
    # a level below the front's least-energy point counts that point's energy
    assert front_score([1.0, 0.5], [0.50, 0.495], 0.50) == pytest.approx(
        np.mean([np.log(0.5), np.log(0.5), np.log(0.5), np.log(0.5)]))
