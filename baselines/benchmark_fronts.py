"""Whole fronts over training seeds (:mod:`baselines.benchmark`): the agents' accuracy-energy front against a
baseline's, at matched accuracy levels and by one area measure, aggregated over seeds as RL results are judged.

Per training seed, the agents trained at the regime's trade-off weights give one point each (mean energy per token
and mean real accuracy over the test episodes); with practical Top-K's point they span the seed's front, the lower
convex envelope of :func:`baselines.equal_accuracy.accuracy_energy_front` (mixing two settings reaches every
point between them, for an agent as for a baseline). The baseline's front is the same envelope over its budget
scales and Top-K. Measures, each a ratio agent / baseline per seed (< 1: the agent needs less energy):

* ``acc-P``: the energy at accuracy level ``a_topk - P/100`` (Top-K's mean accuracy minus P points,
  :data:`LEVEL_POINTS`). The energy needed for *at least* a level is the front's at the level; below a front's
  least-energy point it is that point's energy. For the agent that is an upper bound (an agent trained at a smaller
  weight might be cheaper), so the ratio is too: status ``"bound"`` (conservative for the agent). For the baseline
  it would flatter the agent, so a level below the baseline's range has no ratio (NaN: widen the budget scales).
* ``area``: the mean energy of the agent's front over the accuracy range ``[a_topk - AREA_POINTS/100, a_topk]``
  divided by the baseline's (the normalised area under the fronts: 1 - area is the share of energy the agent's
  front saves across the range), with the same conventions.
* ``own``: the agent at the table's weight against the baseline at the agent's own accuracy
  (:func:`baselines.equal_accuracy.paired_energy_ratio`'s ratio, one per seed).

Each measure is the IQM over seeds (:func:`baselines.rl_stats.iqm`) with a stratified bootstrap CI over seeds and
episodes (:func:`baselines.rl_stats.stratified_bootstrap`: seeds resampled, one episode draw shared by every seed
and the baseline, paired). A CI that contains 1 is a tie (:func:`verdict`).
"""

from __future__ import annotations

import numpy as np

from baselines.equal_accuracy import accuracy_energy_front, ratio_at_accuracy
from baselines.rl_stats import iqm, stratified_bootstrap

__all__ = ["LEVEL_POINTS", "AREA_POINTS", "MEASURES", "front_energies", "seed_measures", "compare_fronts",
           "verdict"]

#: matched accuracy levels: Top-K's accuracy minus these points (issue 23)
LEVEL_POINTS = (0.5, 1.0, 2.0, 4.0)
#: the area measure's accuracy range below Top-K's accuracy, in points, and its grid [choice: the widest level]
AREA_POINTS = 4.0
_AREA_GRID = 81
MEASURES = tuple(f"acc-{p:g}" for p in LEVEL_POINTS) + ("area", "own")


def front_energies(energy, accuracy, targets, *, below: str) -> np.ndarray:
    """Energy of the front of the points (energy_i, accuracy_i) at each target accuracy: interpolated on the
    envelope; above its most accurate point inf; below its least-energy point that point's energy
    (``below="bound"``) or NaN (``below="nan"``)."""
    front = accuracy_energy_front(energy, accuracy)
    t = np.asarray(targets, dtype=np.float64)
    out = np.interp(t, front.accuracy, front.energy)
    out[t > front.accuracy[-1]] = np.inf
    if below == "nan":
        out[t < front.accuracy[0]] = np.nan
    elif below != "bound":
        raise ValueError(f"below must be 'bound' or 'nan', got {below!r}")
    return out


def _mean_trapezoid(y: np.ndarray) -> float:
    """Mean of a function sampled on an even grid (trapezoid rule); NaN if any sample is."""
    return float((y[:-1] + y[1:]).sum() / (2 * (y.size - 1)))


def seed_measures(agent_e, agent_a, headline: int, base_e, base_a, topk_e, topk_a, episodes=None) -> np.ndarray:
    """(R, len(MEASURES)) ratios, one row per seed (module docstring), on ``episodes`` (indices; None: all).

    agent_e, agent_a: (R, W, n) per-episode energy per token and accuracy of the agents (seed, weight, episode);
    headline: the weight index of ``own``; base_e, base_a: (S, n) the baseline's settings (Top-K among them);
    topk_e, topk_a: (n,) practical Top-K."""
    ep = slice(None) if episodes is None else episodes
    ae, aa = agent_e[:, :, ep].mean(axis=2), agent_a[:, :, ep].mean(axis=2)  # (R, W)
    be, ba = base_e[:, ep].mean(axis=1), base_a[:, ep].mean(axis=1)
    te, ta = float(topk_e[ep].mean()), float(topk_a[ep].mean())
    levels = ta - np.asarray(LEVEL_POINTS) / 100.0
    grid = np.linspace(ta - AREA_POINTS / 100.0, ta, _AREA_GRID)
    base_levels = front_energies(be, ba, levels, below="nan")
    base_grid = front_energies(be, ba, grid, below="nan")
    out = np.empty((ae.shape[0], len(MEASURES)))
    for r in range(ae.shape[0]):
        e, a = np.append(ae[r], te), np.append(aa[r], ta)  # the seed's agents and Top-K
        agent_levels = front_energies(e, a, levels, below="bound")
        with np.errstate(divide="ignore", invalid="ignore"):
            out[r, :len(LEVEL_POINTS)] = agent_levels / base_levels
        out[r, len(LEVEL_POINTS)] = _mean_trapezoid(front_energies(e, a, grid, below="bound")) / _mean_trapezoid(
            base_grid)
        out[r, -1] = ratio_at_accuracy(ae[r, headline], aa[r, headline], be, ba)[0]
    return out


def _statuses(agent_e, agent_a, headline, base_e, base_a, topk_e, topk_a) -> list[str]:
    """Per measure on all episodes: "no baseline" where the baseline's front does not reach down to the level (or
    to some seed's own accuracy), "bound" where some seed's agent front is read below its range (an upper bound of
    the ratio) or the baseline cannot reach a seed's own accuracy, else "interpolated"."""
    ae, aa = agent_e.mean(axis=2), agent_a.mean(axis=2)
    be, ba = base_e.mean(axis=1), base_a.mean(axis=1)
    ta = float(topk_a.mean())
    bottom = accuracy_energy_front(be, ba).accuracy[[0, -1]]
    seed_bottoms = [accuracy_energy_front(np.append(ae[r], topk_e.mean()), np.append(aa[r], ta)).accuracy[0]
                    for r in range(ae.shape[0])]
    targets = [ta - p / 100.0 for p in LEVEL_POINTS] + [ta - AREA_POINTS / 100.0]
    out = []
    for t in targets:
        out.append("no baseline" if t < bottom[0] else "bound" if t < max(seed_bottoms) else "interpolated")
    own = aa[:, headline]  # a seed below the baseline's range has no ratio (NaN), one above it a bound
    return out + ["no baseline" if own.min() < bottom[0] else "bound" if own.max() > bottom[1] else "interpolated"]


def verdict(ci_low: float, ci_high: float) -> str:
    """"better" (the agent: the CI's upper end below 1), "worse" (its lower end above 1), "tie" (the CI contains
    1) or "undefined"."""
    if not (np.isfinite(ci_low) and np.isfinite(ci_high)):
        return "undefined"
    tol = 1e-9  # a ratio of 1 up to rounding (levels are Top-K's accuracy minus points) is a tie
    return "better" if ci_high < 1 - tol else "worse" if ci_low > 1 + tol else "tie"


def compare_fronts(agent_e, agent_a, headline: int, base_e, base_a, topk_e, topk_a, *, n_boot: int,
                   seed: int = 0, level: float = 0.95) -> tuple[list[dict], np.ndarray]:
    """Every measure of :data:`MEASURES`: ``ratio`` (IQM over seeds), ``ci_low`` / ``ci_high`` (stratified bootstrap
    over seeds and episodes), ``verdict``, ``status`` and ``undefined`` (share of replicates without a ratio); and
    the (R, M) per-seed ratios on all episodes."""
    agent_e, agent_a = np.asarray(agent_e, dtype=np.float64), np.asarray(agent_a, dtype=np.float64)
    base_e, base_a = np.atleast_2d(base_e), np.atleast_2d(base_a)
    n = agent_e.shape[2]
    if agent_e.shape != agent_a.shape or base_e.shape[1] != n or np.shape(topk_e) != (n,) or np.shape(topk_a) != (n,):
        raise ValueError(f"the agents, the baseline and Top-K need the same episodes: agents {agent_e.shape} (seeds x "
                         f"weights x episodes), baseline {base_e.shape}, Top-K {np.shape(topk_e)}")
    args = (agent_e, agent_a, headline, base_e, base_a, np.asarray(topk_e, float), np.asarray(topk_a, float))
    per_seed = seed_measures(*args)

    def statistic(runs, episodes):
        return iqm(seed_measures(*args, episodes=episodes)[runs[0]], axis=0)

    boot = stratified_bootstrap(statistic, [agent_e.shape[0]], n, n_boot=n_boot, seed=seed, level=level)
    point = iqm(per_seed, axis=0)
    statuses = _statuses(*args)
    rows = [{"measure": m, "ratio": float(point[i]), "ci_low": float(boot["low"][i]),
             "ci_high": float(boot["high"][i]), "verdict": verdict(boot["low"][i], boot["high"][i]),
             "status": statuses[i], "undefined": float(boot["undefined"][i])} for i, m in enumerate(MEASURES)]
    return rows, per_seed
