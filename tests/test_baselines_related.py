"""Related-work policies: DES exactness against brute force, and the behaviour of the simple rules."""
import numpy as np
import pytest

from baselines.instances import random_decode_instances
from baselines.reference import brute_force_des
from baselines.related import (adapmoe_policy, des_policy, des_solve, greedy_policy, random_policy,
                               topk_policy, wdmoe_policy)
from baselines.siftmoe import energy_of


def test_des_matches_brute_force():
    rng = np.random.default_rng(3)
    n = 0
    for it in range(250):
        E = int(rng.integers(1, 11))
        B = 8
        kmax = int(rng.integers(0, 5))
        if it % 2:
            energy = rng.integers(0, 4, size=(B, E)).astype(float)  # ties
        else:
            energy = rng.exponential(size=(B, E))
        feas = rng.random((B, E)) < rng.uniform(0.4, 1.0)
        p = rng.dirichlet(np.full(E, 0.5), size=B)
        if it % 3 == 0:
            p = np.round(p * 4) / 4  # ties and zero probabilities
        gamma = rng.choice([0.0, 0.3, 0.5, 0.9, 1.0, 1.5], size=B)
        mask, e, mass, met = des_solve(energy, feas, p, gamma, kmax)
        for b in range(B):
            ref_e, ref_mass, ref_met = brute_force_des(energy[b], feas[b], p[b], gamma[b], kmax)
            m = mask[b]
            assert m.sum() <= kmax and not (m & ~feas[b]).any()
            assert energy_of(m, energy[b]) == pytest.approx(ref_e, rel=1e-9, abs=1e-12)
            assert p[b][m].sum() == pytest.approx(ref_mass, rel=1e-9, abs=1e-12)
            assert bool(met[b]) == ref_met
            assert e[b] == pytest.approx(energy_of(m, energy[b]), abs=1e-12)
            assert mass[b] == pytest.approx(p[b][m].sum(), abs=1e-12)
            n += 1
    assert n == 2000


def test_des_simple_cases():
    energy = np.array([5.0, 1.0, 1.0, 3.0])
    p = np.array([0.5, 0.2, 0.2, 0.1])
    feas = np.ones(4, bool)
    # mass 0.4 reachable by {1, 2} (energy 2) or {0} (energy 5)
    assert des_policy(energy, feas, p, gamma=0.4, max_experts=2).tolist() == [False, True, True, False]
    # only one expert allowed: {0}
    assert des_policy(energy, feas, p, gamma=0.4, max_experts=1).tolist() == [True, False, False, False]
    # unreachable gamma with one expert -> max mass set {0}
    m, e, mass, met = des_solve(energy, feas, p, 0.9, 1)
    assert m.tolist() == [True, False, False, False] and not met and mass == 0.5
    # gamma 0: execute nothing
    assert not des_policy(energy, feas, p, gamma=0.0, max_experts=2).any()
    # expert 0 infeasible: max mass with 2 experts = 0.4
    m, e, mass, met = des_solve(energy, np.array([False, True, True, True]), p, 0.9, 2)
    assert m.tolist() == [False, True, True, False] and not met


def test_des_errors():
    with pytest.raises(ValueError, match="gate_probs"):
        des_solve(np.ones((2, 3)), np.ones((2, 3), bool), np.ones((2, 4)), 0.5, 2)
    with pytest.raises(ValueError, match="energy"):
        des_solve(-np.ones(3), np.ones(3, bool), np.ones(3) / 3, 0.5, 2)
    with pytest.raises(ValueError, match="max_experts"):
        des_solve(np.ones(3), np.ones(3, bool), np.ones(3) / 3, 0.5, -1)


@pytest.fixture
def inst():
    return random_decode_instances(np.random.default_rng(0), 64, 8, 2)


def test_topk_executes_the_topk_set(inst):
    np.testing.assert_array_equal(topk_policy(inst["topk_mask"]), inst["topk_mask"])
    np.testing.assert_array_equal(topk_policy(inst["topk_mask"][0].astype(np.float32)), inst["topk_mask"][0])


def test_wdmoe_rule(inst):
    w, lat, s, f = inst["topk_weight"], inst["latency_ratio"], inst["topk_mask"], inst["feasible"]
    m = wdmoe_policy(w, lat, s, threshold=0.5, feasible=f)
    assert not (m & ~(s & f)).any()
    score = np.where(s & f, w / lat, -np.inf)
    best = score.max(axis=1)
    for b in range(64):
        if np.isfinite(best[b]):
            assert m[b, np.argmax(score[b])]  # the best-scoring expert is always kept
            np.testing.assert_array_equal(m[b], (s & f)[b] & (score[b] >= 0.5 * best[b]))
        else:
            assert not m[b].any()
    # threshold 0 keeps every feasible Top-K expert, threshold 1 keeps only the best (no exact ties here)
    np.testing.assert_array_equal(wdmoe_policy(w, lat, s, threshold=0.0, feasible=f), s & f)
    assert (wdmoe_policy(w, lat, s, threshold=1.0, feasible=f).sum(axis=1) <= 1).all()
    with pytest.raises(ValueError, match="threshold"):
        wdmoe_policy(w, lat, s, threshold=1.5)


def test_adapmoe_rule():
    w = np.array([[0.9, 0.1, 0, 0], [0.6, 0.4, 0, 0], [0, 0, 0.5, 0.5]])
    s = w > 0
    m = adapmoe_policy(w, s, threshold=0.8)
    assert m.tolist() == [[True, False, False, False], [True, True, False, False], [False, False, True, True]]
    # K = 1 (raw Switch probability): the single expert is always kept
    w1 = np.array([[0.3, 0, 0]])
    assert adapmoe_policy(w1, w1 > 0, threshold=0.8).tolist() == [[True, False, False]]


def test_greedy_rule(inst):
    e, f = inst["energy"], inst["feasible"]
    m = greedy_policy(e, f, 2)
    assert not (m & ~f).any()
    for b in range(64):
        k = min(2, f[b].sum())
        assert m[b].sum() == k
        if k:
            assert e[b][m[b]].max() <= e[b][f[b] & ~m[b]].min(initial=np.inf)
    pool = inst["topk_mask"]
    assert not (greedy_policy(e, f, 2, pool=pool) & ~pool).any()


def test_random_is_seeded_and_within_pool(inst):
    s = inst["topk_mask"]
    a = random_policy(np.random.default_rng(5), s, p_keep=0.5)
    b = random_policy(np.random.default_rng(5), s, p_keep=0.5)
    np.testing.assert_array_equal(a, b)
    assert not (a & ~s).any()
    np.testing.assert_array_equal(random_policy(np.random.default_rng(1), s, p_keep=1.0), s)
    assert not random_policy(np.random.default_rng(1), s, p_keep=0.0).any()
