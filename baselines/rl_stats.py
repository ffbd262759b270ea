"""Aggregates over training seeds as RL results are judged (Agarwal et al. 2021, "Deep RL at the edge of the
statistical precipice"; the ``rliable`` library): the interquartile mean and stratified bootstrap confidence
intervals.

* **IQM**: the mean of the middle half of the values, ``floor(n / 4)`` cut from each end of the sorted values
  (``scipy.stats.trim_mean(x, 0.25)``, rliable's ``aggregate_iqm``); with fewer than 4 values nothing is cut and
  it is the mean. Robust to one outlying seed, less noisy than the median.
* **Stratified bootstrap**: each replicate resamples the runs of every stratum (rliable: each task) with
  replacement, independently per stratum, so every stratum keeps its size; here optionally also the evaluation
  episodes, with one draw of episode indices shared by every run and baseline of the replicate (the episodes
  are paired: same seeds, same channels and tokens). The interval is the percentile interval of the replicates
  (rliable's default method).

Written once here instead of depending on rliable 1.2, which pulls in scipy and arch for these two functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["iqm", "stratified_bootstrap"]


def iqm(values, axis: int | None = None):
    """Interquartile mean: ``floor(n / 4)`` values cut from each end of the sorted values, the rest averaged (over
    ``axis``; None: all values). NaN values are not dropped (a NaN among them gives NaN)."""
    v = np.asarray(values, dtype=np.float64)
    if axis is None:
        v, axis = v.ravel(), 0
    n = v.shape[axis]
    if n == 0:
        raise ValueError("iqm of no values: pass at least one value (one per training seed)")
    cut = n // 4
    s = np.sort(v, axis=axis)
    kept = np.take(s, np.arange(cut, n - cut), axis=axis)
    out = kept.mean(axis=axis)
    return float(out) if np.ndim(out) == 0 else out


def stratified_bootstrap(statistic: Callable, strata: Sequence[int], n_episodes: int | None = None, *,
                         n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile confidence intervals of ``statistic`` under the stratified bootstrap (module docstring).

    statistic(runs, episodes) -> a float or a 1-d array of m measures: ``runs`` is a tuple with one index array
        per stratum (its runs drawn with replacement, as many as the stratum has), ``episodes`` the drawn episode
        indices (``n_episodes`` of them; None when ``n_episodes`` is None). Called once per replicate.
    strata: the number of runs of each stratum (e.g. ``[5]``: one regime, five training seeds).
    Returns ``low`` / ``high`` ((m,) arrays, or floats for a scalar statistic: the ``level`` percentile interval
    of the replicates whose value is finite), ``undefined`` (the share of replicates with a non-finite value, per
    measure) and ``replicates`` ((n_boot, m)).
    """
    sizes = [int(s) for s in strata]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"strata = {list(strata)!r}: every stratum needs at least one run")
    if n_episodes is not None and int(n_episodes) < 1:
        raise ValueError(f"n_episodes = {n_episodes!r}: need at least one episode to resample (or None)")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot!r}")
    rng = np.random.default_rng(seed)
    reps, scalar = [], True
    for _ in range(int(n_boot)):
        runs = tuple(rng.integers(0, n, size=n) for n in sizes)
        episodes = rng.integers(0, int(n_episodes), size=int(n_episodes)) if n_episodes is not None else None
        value = np.asarray(statistic(runs, episodes), dtype=np.float64)
        scalar = value.ndim == 0
        reps.append(np.atleast_1d(value))
    replicates = np.vstack(reps)
    q = (1 - level) / 2
    low, high, undefined = [], [], []
    for column in replicates.T:
        finite = column[np.isfinite(column)]
        lo, hi = np.quantile(finite, [q, 1 - q]) if finite.size else (np.nan, np.nan)
        low.append(float(lo))
        high.append(float(hi))
        undefined.append(1.0 - finite.size / column.size)
    if scalar:
        return {"low": low[0], "high": high[0], "undefined": undefined[0], "replicates": replicates}
    return {"low": np.array(low), "high": np.array(high), "undefined": np.array(undefined), "replicates": replicates}
