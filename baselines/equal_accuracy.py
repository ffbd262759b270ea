"""Energy at equal real accuracy: an agent's point against a baseline's accuracy-energy curve, on the same seeds.

A baseline with a budget knob (``budget.scale``) traces a curve of (real accuracy, energy per token) points when
the knob is swept. What the baseline needs to reach an agent's accuracy ``a`` is read off that curve:

* **Front.** The baseline may mix two of its settings (run setting i on a share lambda of the tokens, setting j on
  the rest): that reaches every convex combination of their (accuracy, energy) points, violations and misses
  mixed alike. So its achievable front is the lower convex envelope of its points in the (accuracy, energy)
  plane, from its least-energy point up to its most accurate one; points above the envelope (noise, or
  settings that pay more for less) are never used. ``E*(a)`` = the envelope's energy at accuracy ``a``: linear
  interpolation between the two envelope vertices around ``a`` [choice: the strongest baseline that its own
  settings can realise; no extrapolation].
* **Out of range.** ``a`` above the baseline's most accurate point: the baseline cannot reach it (status
  ``"above"``, E* infinite). ``a`` below its least-energy point: the sweep did not go far enough (status
  ``"below"``, energy NaN: no claim); widen the budget scales.
* **Ratio.** ``energy_ratio = E_agent / E*(a_agent)`` with means over the same episodes (< 1: the agent needs
  less energy than the baseline at the agent's own accuracy). Above the range the ratio is bounded instead:
  ``E_agent / E(most accurate point)``, since the baseline needs at least that energy and still falls short (an
  upper bound of the ratio, conservative for the agent).
* **Paired confidence interval.** A percentile bootstrap over episodes: each replicate draws episode indices
  with replacement and uses the *same* draws for the agent and for every budget setting of the baseline (the
  episodes are paired: same seeds, same channels and tokens), recomputes the means, the envelope and the ratio.
  Why not interpolate each episode's own curve: an episode's accuracy is a mean over a few tokens (multiples of
  1/16 with 16 tokens), so per-episode curves are step functions, often non-monotone, and the ratio of their
  interpolations is dominated by the coarse grid; the bootstrap keeps the ratio of means that the table
  reports and propagates the uncertainty of both the agent's point and the baseline's curve. Replicates whose
  target falls above the baseline's range use the bound above, those below are undefined (their share is
  reported, ``out_of_range``).

All inputs are plain arrays, so the functions are checked on hand-made curves in the tests; the benchmark
(:mod:`baselines.benchmark`) feeds them the per-episode records of :func:`baselines.evaluate.evaluate_policies`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["Front", "accuracy_energy_front", "FrontPoint", "energy_at_accuracy", "mix_at_accuracy",
           "paired_energy_ratio", "ratio_at_accuracy", "episode_matrix"]


class Front(NamedTuple):
    """The lower convex envelope of a baseline's points: vertices by increasing accuracy (and energy)."""

    accuracy: np.ndarray  # (V,)
    energy: np.ndarray  # (V,)
    index: np.ndarray  # (V,) the input point of each vertex


class FrontPoint(NamedTuple):
    energy: float  # E*(a): NaN below the range, inf above it
    status: str  # "interpolated", "below" or "above"
    weights: dict  # input point index -> mixing share (sums to 1; empty out of range)


def accuracy_energy_front(energy, accuracy) -> Front:
    """The lower convex envelope of points (accuracy_i, energy_i), from the least-energy point (ties: the most
    accurate) up to the most accurate point (ties: the least energy), in increasing accuracy."""
    e = np.asarray(energy, dtype=np.float64).ravel()
    a = np.asarray(accuracy, dtype=np.float64).ravel()
    if e.shape != a.shape or e.size == 0:
        raise ValueError(f"energy and accuracy must be non-empty and of equal length, got {e.size} and {a.size}")
    if not (np.all(np.isfinite(e)) and np.all(np.isfinite(a))):
        raise ValueError("energy and accuracy must be finite (an accuracy needs a gating source with effect tables)")
    order = np.lexsort((e, a))  # by accuracy, ties by energy
    hull: list[int] = []
    for i in order:  # Andrew's monotone chain, lower hull
        if hull and a[hull[-1]] == a[i]:
            continue  # same accuracy, more energy: never on the lower envelope
        while len(hull) >= 2:
            o, p = hull[-2], hull[-1]
            cross = (a[p] - a[o]) * (e[i] - e[o]) - (e[p] - e[o]) * (a[i] - a[o])
            if cross <= 0:  # p is not strictly below the chord o -> i
                hull.pop()
            else:
                break
        hull.append(int(i))
    # keep the increasing part: from the least-energy vertex on (to its left, more energy buys less accuracy)
    start = int(np.argmin([e[i] for i in hull]))
    # among equal least energies the lower hull keeps the most accurate last; move to it
    while start + 1 < len(hull) and e[hull[start + 1]] == e[hull[start]]:
        start += 1
    idx = np.asarray(hull[start:], dtype=np.int64)
    return Front(a[idx], e[idx], idx)


def energy_at_accuracy(front: Front, target: float) -> FrontPoint:
    """``E*(target)`` on a front (module docstring) with the mixing shares of the input points."""
    t = float(target)
    acc, eng, idx = front
    if not np.isfinite(t):
        raise ValueError(f"target accuracy must be finite, got {target!r}")
    if t > acc[-1]:
        return FrontPoint(float("inf"), "above", {})
    if t < acc[0]:
        return FrontPoint(float("nan"), "below", {})
    j = int(np.searchsorted(acc, t, side="left"))
    if acc[j] == t:
        return FrontPoint(float(eng[j]), "interpolated", {int(idx[j]): 1.0})
    lam = (t - acc[j - 1]) / (acc[j] - acc[j - 1])  # share of the upper vertex
    return FrontPoint(float((1 - lam) * eng[j - 1] + lam * eng[j]), "interpolated",
                      {int(idx[j - 1]): float(1 - lam), int(idx[j]): float(lam)})


def mix_at_accuracy(point: FrontPoint, values) -> float:
    """A per-point quantity (violation rate, misses per token ...) of the baseline's mixture at ``point``."""
    if not point.weights:
        return float("nan")
    v = np.asarray(values, dtype=np.float64)
    return float(sum(w * v[i] for i, w in point.weights.items()))


def ratio_at_accuracy(agent_energy: float, agent_accuracy: float, base_energy, base_accuracy) -> tuple[float, FrontPoint]:
    """E_agent / E*(a_agent) on the front of the baseline's settings (means), bounded above its range, NaN below it
    (module docstring), with the front point."""
    front = accuracy_energy_front(base_energy, base_accuracy)
    point = energy_at_accuracy(front, agent_accuracy)
    if point.status == "above":  # bounded by the most accurate point's energy (module docstring)
        top = float(front.energy[-1])
        return (agent_energy / top if top > 0 else float("nan")), point
    if point.status == "below" or point.energy <= 0:
        return float("nan"), point
    return agent_energy / point.energy, point


def paired_energy_ratio(agent_energy, agent_accuracy, base_energy, base_accuracy, *, n_boot: int = 2000,
                        seed: int = 0, level: float = 0.95) -> dict:
    """The equal-accuracy energy ratio of an agent against a baseline's sweep, with a paired bootstrap CI.

    agent_energy, agent_accuracy: (n,) per-episode energy per token and accuracy of the agent.
    base_energy, base_accuracy: (S, n) the same for each of the baseline's S budget settings, episodes in the same
        order (the same seeds) as the agent's.
    Returns ``ratio`` (E_agent / E*(a_agent), means over the n episodes), ``ci_low`` / ``ci_high`` (percentile
    bootstrap, ``level``), ``baseline_energy`` (E*), ``status``, ``weights`` (mixing shares of the S settings),
    ``agent_energy``, ``agent_accuracy`` and ``out_of_range`` (share of replicates whose target fell below the
    baseline's range; those have no ratio).
    """
    ae = np.asarray(agent_energy, dtype=np.float64).ravel()
    aa = np.asarray(agent_accuracy, dtype=np.float64).ravel()
    be = np.atleast_2d(np.asarray(base_energy, dtype=np.float64))
    ba = np.atleast_2d(np.asarray(base_accuracy, dtype=np.float64))
    n = ae.size
    if aa.size != n or be.shape != ba.shape or be.shape[1] != n or n == 0:
        raise ValueError(f"paired samples need the same episodes: agent {ae.shape}/{aa.shape}, baseline "
                         f"{be.shape}/{ba.shape} (settings x episodes)")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    ratio, point = ratio_at_accuracy(ae.mean(), aa.mean(), be.mean(axis=1), ba.mean(axis=1))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(int(n_boot), n))
    boot = np.empty(int(n_boot))
    for b, sample in enumerate(draws):
        boot[b], _ = ratio_at_accuracy(ae[sample].mean(), aa[sample].mean(), be[:, sample].mean(axis=1),
                            ba[:, sample].mean(axis=1))
    defined = boot[np.isfinite(boot)]
    q = (1 - level) / 2
    low, high = (np.quantile(defined, [q, 1 - q]) if defined.size else (float("nan"), float("nan")))
    return {"ratio": float(ratio), "ci_low": float(low), "ci_high": float(high),
            "baseline_energy": float(point.energy), "status": point.status, "weights": point.weights,
            "agent_energy": float(ae.mean()), "agent_accuracy": float(aa.mean()),
            "out_of_range": float(1 - defined.size / boot.size) if boot.size else float("nan")}


def episode_matrix(episode_rows: list[dict], policy: str, key: str, scales=None) -> tuple[np.ndarray, list]:
    """(S, n) per-episode values of ``key`` for ``policy`` (rows of :func:`baselines.evaluate.evaluate_policies`'s
    ``episode_rows``), one row per budget scale (sorted, or ``scales``), episodes ordered by seed. ``key``
    ``"energy_per_token"`` is ``energy_j / tokens``. Raises when the scales do not cover the same seeds."""
    rows = [r for r in episode_rows if r["policy"] == policy]
    if not rows:
        raise ValueError(f"no episodes of policy {policy!r}")
    scales = sorted({float(r["budget_scale"]) for r in rows}) if scales is None else [float(s) for s in scales]
    out, seeds = [], None
    for s in scales:
        sel = sorted((r for r in rows if float(r["budget_scale"]) == s), key=lambda r: r["seed"])
        these = [r["seed"] for r in sel]
        if seeds is None:
            seeds = these
        elif these != seeds:
            raise ValueError(f"policy {policy!r}: budget scale {s} ran seeds {these[:3]}..., not the same episodes "
                             f"as the others ({seeds[:3]}...)")
        if key == "energy_per_token":
            out.append([r["energy_j"] / max(r["tokens"], 1) for r in sel])
        else:
            out.append([r[key] for r in sel])
    return np.asarray(out, dtype=np.float64), scales
