"""The IQM and the stratified bootstrap (baselines.rl_stats) against known values and brute force."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from baselines.rl_stats import iqm, stratified_bootstrap


def _trimmed_by_hand(values):
    """scipy.stats.trim_mean(values, 0.25), written out: floor(n / 4) cut from each end of the sorted values."""
    s = sorted(values)
    cut = len(s) // 4
    kept = s[cut:len(s) - cut]
    return sum(kept) / len(kept)


def test_iqm_known_values():
    assert iqm([1, 2, 3, 4, 5, 6, 7, 8]) == pytest.approx(4.5)  # 3, 4, 5, 6
    assert iqm([1, 2, 3, 4, 100]) == pytest.approx(3.0)  # one cut from each end of five seeds
    assert iqm([7.0, 1.0, 4.0]) == pytest.approx(4.0)  # fewer than 4: the mean
    assert iqm([2.5]) == 2.5
    # rliable's example: IQM of 0..99 cuts 25 from each end
    assert iqm(np.arange(100)) == pytest.approx(np.arange(25, 75).mean())
    assert np.allclose(iqm(np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [400.0, 40.0]]), axis=0), [2.5, 25.0])
    assert np.isnan(iqm([1.0, np.nan, 2.0]))
    with pytest.raises(ValueError, match="at least one value"):
        iqm([])


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=40))
@settings(max_examples=200, deadline=None)
def test_iqm_is_the_quarter_trimmed_mean(values):
    assert iqm(values) == pytest.approx(_trimmed_by_hand(values), rel=1e-9, abs=1e-6)


def _exact_distribution(values):
    """Exact percentile interval of the bootstrap distribution of iqm over all n**n equally likely draws."""
    n = len(values)
    dist = Counter(round(iqm([values[i] for i in draw]), 12) for draw in itertools.product(range(n), repeat=n))
    support = np.array(sorted(dist))
    cdf = np.cumsum([dist[v] for v in support]) / n ** n
    return support, cdf


def test_bootstrap_matches_the_exact_bootstrap_distribution_on_a_small_case():
    values = [0.8, 1.0, 1.3, 2.0, 0.6]  # five seeds: 3125 equally likely resamples, enumerated
    support, cdf = _exact_distribution(values)
    res = stratified_bootstrap(lambda runs, _: iqm(np.asarray(values)[runs[0]]), [5], n_boot=20000, seed=3)
    reps = res["replicates"][:, 0]
    # the empirical CDF of the replicates is within sampling error of the exact one at every support point
    emp = np.searchsorted(np.sort(reps), support + 1e-12, side="right") / reps.size
    assert np.max(np.abs(emp - cdf)) < 0.015
    exact_low = support[np.searchsorted(cdf, 0.025)]
    exact_high = support[np.searchsorted(cdf, 0.975)]
    assert res["low"] == pytest.approx(exact_low, abs=0.05) and res["high"] == pytest.approx(exact_high, abs=0.05)
    assert res["undefined"] == 0.0


def test_strata_are_resampled_within_themselves_and_episodes_are_one_shared_draw():
    seen = []

    def statistic(runs, episodes):
        seen.append((runs, episodes))
        return np.array([runs[0].max(), runs[1].max(), episodes.max()])

    res = stratified_bootstrap(statistic, [2, 3], 7, n_boot=50, seed=0)
    for runs, episodes in seen:
        assert runs[0].shape == (2,) and runs[1].shape == (3,) and episodes.shape == (7,)
        assert runs[0].max() < 2 and runs[1].max() < 3 and episodes.max() < 7
    assert res["replicates"].shape == (50, 3) and res["low"].shape == (3,)
    # with one run per stratum, nothing varies: the interval is a point
    one = stratified_bootstrap(lambda runs, _: float(runs[0][0]), [1], n_boot=20)
    assert one["low"] == one["high"] == 0.0


def test_undefined_replicates_are_counted_and_left_out():
    values = np.array([1.0, np.nan, 3.0])
    res = stratified_bootstrap(lambda runs, _: values[runs[0]].mean(), [3], n_boot=400, seed=1)
    # a replicate is NaN unless it never draws the second run: (2/3)^3 of them are defined
    assert res["undefined"] == pytest.approx(1 - (2 / 3) ** 3, abs=0.06)
    assert 1.0 <= res["low"] <= res["high"] <= 3.0


def test_same_seed_same_interval_and_bad_input_is_named():
    stat = lambda runs, eps: float(np.asarray([1.0, 5.0, 2.0])[runs[0]].mean() + eps.mean())  # noqa: E731
    a = stratified_bootstrap(stat, [3], 4, n_boot=100, seed=9)
    b = stratified_bootstrap(stat, [3], 4, n_boot=100, seed=9)
    assert a["low"] == b["low"] and a["high"] == b["high"]
    with pytest.raises(ValueError, match="strata"):
        stratified_bootstrap(stat, [0], n_boot=10)
    with pytest.raises(ValueError, match="n_episodes"):
        stratified_bootstrap(stat, [3], 0, n_boot=10)
    with pytest.raises(ValueError, match="level"):
        stratified_bootstrap(stat, [3], 4, n_boot=10, level=1.5)
    with pytest.raises(ValueError, match="n_boot"):
        stratified_bootstrap(stat, [3], 4, n_boot=0)
