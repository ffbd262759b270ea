"""Exactness of the SiftMoE decoding solver against brute force over every executed mask."""
import numpy as np
import pytest

from baselines.instances import random_decode_instances
from baselines.reference import (all_masks, assignment_decode, brute_force_decode,
                                 brute_force_decode_batch)
from baselines.siftmoe import deviation_of, energy_of, solve_decode, solve_decode_full


def _random_batch(rng, B, E, K, style):
    """Random instances with infeasible experts, ties, zero and unreachable budgets."""
    if style == "int":  # many exact ties in energy and deviation
        energy = rng.integers(0, 4, size=(B, E)).astype(float)
        dev = rng.integers(0, 4, size=(B, K, E + 1)).astype(float)
    elif style == "real":
        energy = rng.exponential(size=(B, E))
        dev = rng.random((B, K, E + 1))
    else:  # env-like structure: own expert 0, stand-ins comparable to skip
        inst = random_decode_instances(rng, B, E, K, budget_scale=rng.uniform(0.05, 1.2))
        return inst["energy"], inst["feasible"], inst["deviation_table"], inst["budget"]
    feasible = rng.random((B, E)) < rng.uniform(0.5, 1.0)
    choice = rng.integers(0, 5, size=B)
    skip_total = dev[:, :, E].sum(axis=1)
    budget = np.select(
        [choice == 0, choice == 1, choice == 2, choice == 3],
        [np.zeros(B), np.full(B, -1.0), skip_total, rng.random(B) * skip_total * 0.2],
        rng.random(B) * skip_total)
    return energy, feasible, dev, budget


def _check_rows(sol, energy, feasible, dev, budget):
    for b in range(energy.shape[0]):
        emin, dbest, met, _ = brute_force_decode(energy[b], feasible[b], dev[b], budget[b])
        m = sol.mask[b]
        K = dev.shape[1]
        assert not (m & ~feasible[b]).any(), "executed an infeasible expert"
        assert m.sum() <= K
        assert energy_of(m, energy[b]) == pytest.approx(emin, rel=1e-9, abs=1e-12)
        assert deviation_of(m, dev[b]) == pytest.approx(dbest, rel=1e-9, abs=1e-12)
        assert bool(sol.budget_met[b]) == met
        assert sol.energy[b] == pytest.approx(energy_of(m, energy[b]), rel=1e-12, abs=1e-12)
        assert sol.deviation[b] == pytest.approx(deviation_of(m, dev[b]), rel=1e-12, abs=1e-12)
        if met:
            assert sol.deviation[b] <= budget[b] + 1e-9 * max(1.0, abs(budget[b]))
        else:  # fallback: minimum deviation over all feasible subsets
            assert sol.deviation[b] == pytest.approx(deviation_of(feasible[b], dev[b]), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("style", ["int", "real", "env"])
def test_matches_brute_force_full_check(style):
    rng = np.random.default_rng({"int": 1, "real": 2, "env": 3}[style])
    for _ in range(40):
        E = int(rng.integers(1, 11))
        K = int(rng.integers(1, 5))
        args = _random_batch(rng, 16, E, K, style)
        _check_rows(solve_decode_full(*args), *args)


def test_matches_brute_force_thousands():
    """~6000 instances, optimal energy and budget feasibility vs the batched 2^E enumeration."""
    rng = np.random.default_rng(7)
    n = 0
    for it in range(120):
        E = int(rng.integers(1, 11))
        K = int(rng.integers(1, 5))
        style = ("int", "real", "env")[it % 3]
        energy, feasible, dev, budget = _random_batch(rng, 50, E, K, style)
        sol = solve_decode_full(energy, feasible, dev, budget)
        ref_e, ref_met = brute_force_decode_batch(energy, feasible, dev, budget)
        np.testing.assert_allclose(sol.energy, ref_e, rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(sol.budget_met, ref_met)
        np.testing.assert_allclose(energy_of(sol.mask, energy), sol.energy, rtol=1e-12, atol=1e-12)
        assert not (sol.mask & ~feasible).any()
        assert (sol.mask.sum(axis=1) <= K).all()
        n += energy.shape[0]
    assert n == 6000


def test_single_row_path_matches_batched_path():
    """Few rows use a pure-Python search, many rows the vectorised one: identical masks."""
    rng = np.random.default_rng(11)
    for it in range(60):
        E = int(rng.integers(1, 11))
        K = int(rng.integers(1, 5))
        energy, feasible, dev, budget = _random_batch(rng, 12, E, K, ("int", "real", "env")[it % 3])
        batched = solve_decode_full(energy, feasible, dev, budget)
        for b in range(12):
            single = solve_decode_full(energy[b], feasible[b], dev[b], budget[b])
            np.testing.assert_array_equal(single.mask, batched.mask[b])
            assert single.energy == batched.energy[b]
            assert single.deviation == batched.deviation[b]


@pytest.mark.parametrize("E,K", [(16, 3), (32, 2), (24, 3)])
def test_large_E_matches_assignment_enumeration(E, K):
    rng = np.random.default_rng(E * 10 + K)
    for style in ("real", "env", "int"):
        energy, feasible, dev, budget = _random_batch(rng, 6, E, K, style)
        sol = solve_decode_full(energy, feasible, dev, budget)
        for b in range(6):
            ref_e, ref_met = assignment_decode(energy[b], feasible[b], dev[b], budget[b])
            assert sol.energy[b] == pytest.approx(ref_e, rel=1e-9, abs=1e-12)
            assert bool(sol.budget_met[b]) == ref_met


def test_gpt_oss_size_instances_are_consistent():
    """E=32, K=4: constraints hold and the answer is no worse than every size<=2 subset and Top-K."""
    rng = np.random.default_rng(5)
    inst = random_decode_instances(rng, 64, 32, 4, budget_scale=0.4)
    e, f, d, bud = inst["energy"], inst["feasible"], inst["deviation_table"], inst["budget"]
    sol = solve_decode_full(e, f, d, bud)
    assert not (sol.mask & ~f).any()
    assert (sol.mask.sum(axis=1) <= 4).all()
    assert (sol.deviation[sol.budget_met] <= bud[sol.budget_met] * (1 + 1e-9) + 1e-12).all()
    for b in range(8):
        ref_e, ref_met = assignment_decode(e[b], f[b], d[b], bud[b])
        assert sol.energy[b] == pytest.approx(ref_e, rel=1e-9, abs=1e-12)
        assert bool(sol.budget_met[b]) == ref_met
    # the pure-Python single-row search and the vectorised batch search agree at this size too
    for b in range(16):
        single = solve_decode_full(e[b], f[b], d[b], bud[b])
        np.testing.assert_array_equal(single.mask, sol.mask[b])
        assert single.energy == sol.energy[b] and single.deviation == sol.deviation[b]
    # Top-K restricted to feasible experts, when it meets the budget, costs at least as much.
    topk_f = inst["topk_mask"] & f
    ok = deviation_of(topk_f, d) <= bud
    assert (sol.energy[ok] <= energy_of(topk_f, e)[ok] + 1e-12).all()


def test_energy_monotone_in_budget():
    rng = np.random.default_rng(9)
    inst = random_decode_instances(rng, 200, 8, 2)
    e, f, d = inst["energy"], inst["feasible"], inst["deviation_table"]
    skip = d[:, :, -1].sum(axis=1)
    prev = None
    for scale in (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5):
        sol = solve_decode_full(e, f, d, scale * skip)
        if prev is not None:
            assert (sol.energy <= prev + 1e-12).all()
        prev = sol.energy
    assert (prev == 0).all()  # budget >= skip-everything deviation: execute nothing


def test_zero_budget_and_unreachable_budget():
    # 2 slots, 3 experts. Slot 0 owned by expert 0, slot 1 by expert 1; expert 2 is a perfect stand-in
    # for both but costs more than either alone and less than both together.
    dev = np.array([[0.0, 5.0, 0.0, 1.0],
                    [5.0, 0.0, 0.0, 1.0]])
    energy = np.array([1.0, 1.0, 1.5])
    feas = np.array([True, True, True])
    assert solve_decode(energy, feas, dev, 0.0).tolist() == [False, False, True]
    assert solve_decode(energy, feas, dev, 1.0).tolist() == [True, False, False]  # ties: lower index
    assert solve_decode(energy, feas, dev, 2.0).tolist() == [False, False, False]
    # expert 2 infeasible, zero budget: needs both owners
    feas2 = np.array([True, True, False])
    assert solve_decode(energy, feas2, dev, 0.0).tolist() == [True, True, False]
    # nothing feasible and a budget below skip-all: fallback = empty set (the only feasible set)
    sol = solve_decode_full(energy, np.zeros(3, bool), dev, 0.5)
    assert sol.mask.tolist() == [False, False, False] and not sol.budget_met
    assert sol.deviation == pytest.approx(2.0)
    # only expert 1 feasible, negative budget: min-deviation set is {1}
    sol = solve_decode_full(energy, np.array([False, True, False]), dev, -1.0)
    assert sol.mask.tolist() == [False, True, False] and not sol.budget_met
    assert sol.deviation == pytest.approx(1.0)


def test_fallback_prefers_least_energy_among_min_deviation_sets():
    # Slot 0 can be served perfectly by expert 0 (energy 3) or expert 1 (energy 2): both give the
    # minimum deviation 0, so the fallback must pick the cheaper expert 1.
    dev = np.array([[0.0, 0.0, 1.0]])
    sol = solve_decode_full(np.array([3.0, 2.0]), np.array([True, True]), dev, -5.0)
    assert sol.mask.tolist() == [False, True] and not sol.budget_met and sol.deviation == 0.0


def test_zero_energy_ties_prefer_lower_deviation():
    dev = np.array([[0.0, 0.5, 1.0]])
    # expert 1 costs 0 and gets within budget; expert 0 also costs 0 and gives deviation 0.
    sol = solve_decode_full(np.array([0.0, 0.0]), np.array([True, True]), dev, 0.6)
    assert sol.mask.tolist() == [True, False] and sol.energy == 0.0 and sol.deviation == 0.0


def test_infeasible_expert_values_are_ignored():
    dev = np.array([[0.0, 0.2, 1.0]])
    sol = solve_decode_full(np.array([np.inf, 1.0]), np.array([False, True]), dev, 0.5)
    assert sol.mask.tolist() == [False, True]
    sol = solve_decode_full(np.array([np.nan, 1.0]), np.array([False, True]), dev, 0.1)
    assert sol.mask.tolist() == [False, True] and not sol.budget_met


@pytest.mark.parametrize("kwargs,match", [
    (dict(energy=np.ones((2, 3)), feasible=np.ones((2, 4), bool)), "feasible"),
    (dict(deviation_table=np.ones((2, 1, 3))), "deviation_table"),
    (dict(deviation_table=np.full((2, 1, 4), np.nan)), "deviation_table"),
    (dict(deviation_table=-np.ones((2, 1, 4))), "deviation_table"),
    (dict(energy=-np.ones((2, 3))), r"energy\[0, 0\]"),
    (dict(energy=np.full((2, 3), np.inf)), r"energy\[0, 0\]"),
    (dict(budget=np.ones(3)), "budget"),
    (dict(budget=np.array([np.nan, 1.0])), "budget"),
])
def test_input_errors_name_the_field(kwargs, match):
    args = dict(energy=np.ones((2, 3)), feasible=np.ones((2, 3), bool), deviation_table=np.ones((2, 1, 4)),
                budget=np.ones(2))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        solve_decode(**args)


def test_scalar_budget_broadcasts_and_empty_batch():
    rng = np.random.default_rng(0)
    inst = random_decode_instances(rng, 5, 6, 2)
    a = solve_decode(inst["energy"], inst["feasible"], inst["deviation_table"], 0.3)
    b = solve_decode(inst["energy"], inst["feasible"], inst["deviation_table"], np.full(5, 0.3))
    np.testing.assert_array_equal(a, b)
    out = solve_decode(np.zeros((0, 4)), np.zeros((0, 4), bool), np.zeros((0, 2, 5)), np.zeros(0))
    assert out.shape == (0, 4)


def test_all_masks_enumerates_every_subset():
    m = all_masks(4)
    assert m.shape == (16, 4) and len({tuple(r) for r in m}) == 16
