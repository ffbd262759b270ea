"""Whole fronts over training seeds (baselines.benchmark_fronts) on hand-made fronts."""

from __future__ import annotations

import numpy as np
import pytest

from baselines.benchmark_fronts import LEVEL_POINTS, MEASURES, compare_fronts, front_energies, verdict
from baselines.rl_stats import iqm

N = 3  # episodes, all alike: the bootstrap varies only the seeds
TOPK = (10.0, 0.50)
# the baseline's settings, Top-K first: front (0.44, 2) - (0.48, 6) - (0.50, 10)
BASE = [TOPK, (6.0, 0.48), (2.0, 0.44)]
# an agent seed: weights (3 J, 0.46) and the headline (5 J, 0.485); with Top-K its front is
# (0.46, 3) - (0.485, 5) - (0.50, 10)
AGENT = [(3.0, 0.46), (5.0, 0.485)]


def _episodes(points):
    """(P, N) energy and accuracy arrays of points repeated over the N episodes."""
    e = np.array([[p[0]] * N for p in points])
    a = np.array([[p[1]] * N for p in points])
    return e, a


def _agents(seeds):
    e = np.stack([_episodes(s)[0] for s in seeds])
    a = np.stack([_episodes(s)[1] for s in seeds])
    return e, a


def _compare(seeds, base=BASE, n_boot=200):
    ae, aa = _agents(seeds)
    be, ba = _episodes(base)
    te, ta = _episodes([TOPK])
    return compare_fronts(ae, aa, 1, be, ba, te[0], ta[0], n_boot=n_boot, seed=0)


# by hand: levels 0.495, 0.49, 0.48, 0.46 -> agent 8.333, 6.667, 4.6, 3; baseline 9, 8, 6, 4
HAND = {"acc-0.5": (5 + 5 * 10 / 15) / 9, "acc-1": (5 + 5 * 5 / 15) / 8, "acc-2": 4.6 / 6, "acc-4": 3 / 4,
        # mean energy over 0.46-0.50: agent (0.1 + 0.1125) / 0.04, baseline (0.1 + 0.16) / 0.04
        "area": 0.2125 / 0.26,
        # the headline agent (5 J at 0.485) against the baseline at 0.485: 6 + 4 / 4 = 7 J
        "own": 5 / 7}


def test_measures_match_the_hand_computation_and_the_iqm_drops_an_outlying_seed():
    assert MEASURES == ("acc-0.5", "acc-1", "acc-2", "acc-4", "area", "own") and LEVEL_POINTS == (0.5, 1, 2, 4)
    outlier = [(3.0 * e, a) for e, a in AGENT]  # three times the energy: a worse seed
    rows, per_seed = _compare([AGENT] * 4 + [outlier])
    by = {r["measure"]: r for r in rows}
    for m, value in HAND.items():
        assert per_seed[0, MEASURES.index(m)] == pytest.approx(value), m
        # five seeds: the IQM cuts the best and the worst; four alike seeds give the hand value exactly
        assert by[m]["ratio"] == pytest.approx(value), m
        assert by[m]["ratio"] == pytest.approx(iqm(per_seed[:, MEASURES.index(m)]))
        assert by[m]["ci_low"] <= by[m]["ratio"] + 1e-12 <= by[m]["ci_high"] + 2e-12
        assert by[m]["status"] == "interpolated"
    assert per_seed[4, MEASURES.index("own")] > 1  # the outlier alone needs more energy than the baseline
    # resamples with two or more outliers move the IQM up, not down: the CI's low end is the hand value
    assert by["own"]["ci_low"] == pytest.approx(HAND["own"]) and by["own"]["ci_high"] > HAND["own"]
    assert by["own"]["undefined"] == 0.0
    # one seed in five at 3x the energy: resamples with three or more of it pass 1, so the verdict is a tie; five
    # alike seeds are better
    assert by["acc-4"]["verdict"] == "tie"
    alike = {r["measure"]: r for r in _compare([AGENT] * 5)[0]}
    assert alike["acc-4"]["verdict"] == "better" and alike["acc-4"]["ci_high"] == pytest.approx(0.75)


def test_an_agent_front_that_stops_short_of_a_level_is_read_as_a_bound():
    # the agent's cheapest point (4 J at 0.47) is more accurate than the 4-point level (0.46): its energy there is
    # at most 4 J, an upper bound, so the ratio (4 / 4) is too
    rows, per_seed = _compare([[(4.0, 0.47), (5.0, 0.485)]] * 2)
    by = {r["measure"]: r for r in rows}
    assert by["acc-4"]["ratio"] == pytest.approx(1.0) and by["acc-4"]["status"] == "bound"
    assert by["acc-4"]["verdict"] == "tie"  # every replicate is exactly 1: inside the CI
    assert by["acc-1"]["status"] == "interpolated"


def test_a_baseline_that_does_not_reach_down_to_a_level_gives_no_ratio():
    rows, per_seed = _compare([AGENT] * 2, base=[TOPK, (6.0, 0.48)])  # its cheapest point: 0.48
    by = {r["measure"]: r for r in rows}
    assert np.isnan(by["acc-4"]["ratio"]) and by["acc-4"]["status"] == "no baseline"
    assert by["acc-4"]["verdict"] == "undefined" and by["acc-4"]["undefined"] == 1.0
    assert np.isnan(by["area"]["ratio"])
    assert by["acc-2"]["ratio"] == pytest.approx(4.6 / 6)
    # a seed whose own accuracy is below the baseline's cheapest point: no ratio at its accuracy, said so
    rows, per_seed = _compare([AGENT, [(3.0, 0.46), (5.0, 0.47)]], base=[TOPK, (6.0, 0.48)])
    own = {r["measure"]: r for r in rows}["own"]
    assert per_seed[0, -1] == pytest.approx(5 / 7) and np.isnan(per_seed[1, -1])
    assert np.isnan(own["ratio"]) and own["status"] == "no baseline"
    rows, per_seed = _compare([AGENT, [(3.0, 0.46), (5.0, 0.47)]])
    own = {r["measure"]: r for r in rows}["own"]
    assert np.isfinite(per_seed[:, -1]).all() and own["status"] == "interpolated"


def test_front_energies_conventions():
    e, a = [2.0, 6.0, 10.0], [0.44, 0.48, 0.50]
    out = front_energies(e, a, [0.43, 0.46, 0.50, 0.51], below="bound")
    assert out.tolist() == pytest.approx([2.0, 4.0, 10.0, np.inf])
    assert np.isnan(front_energies(e, a, [0.43], below="nan")[0])
    with pytest.raises(ValueError, match="below"):
        front_energies(e, a, [0.45], below="zero")


def test_verdict_is_a_tie_when_the_ci_contains_one():
    assert verdict(0.7, 0.95) == "better"
    assert verdict(0.8, 1.1) == "tie" and verdict(0.9, 1.0) == "tie"
    assert verdict(1.02, 1.3) == "worse"
    assert verdict(np.nan, 1.0) == "undefined"


def test_mismatched_episodes_are_rejected():
    ae, aa = _agents([AGENT])
    be, ba = _episodes(BASE)
    with pytest.raises(ValueError, match="same episodes"):
        compare_fronts(ae, aa, 1, be[:, :2], ba[:, :2], be[0], ba[0], n_boot=10)


def test_same_inputs_same_intervals():
    seeds = [AGENT, [(3.3, 0.462), (5.2, 0.487)], [(2.9, 0.455), (4.7, 0.48)]]
    a, _ = _compare(seeds, n_boot=100)
    b, _ = _compare(seeds, n_boot=100)
    assert a == b
