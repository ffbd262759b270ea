"""A regime's headroom: how much energy the best causal baseline could still save, at matched accuracy, against
the accuracy hindsight bound (:mod:`baselines.accuracy_bound`).

Definition.  ``headroom = E_causal*(a) / E_bound`` (a ratio, >= 1 where the bound is cheaper), with

* ``E_bound``: the bound's energy per token (J, the env's ``energy_j`` summed over the episode / its tokens, the
  replayed plan; means over the episodes) and ``a`` its measured accuracy (``accuracy_correct``, the mean);
* ``E_causal*(a)``: for each causal baseline, the energy of its accuracy-energy front at ``a``
  (:func:`baselines.equal_accuracy.energy_at_accuracy`: the lower convex envelope of its budget settings and
  practical Top-K, on the same episodes); where ``a`` is above its most accurate point, that point's energy (it
  needs at least that and still falls short: conservative); the least over the baselines.

The bound's plan is realisable, so ``E_bound`` is at least the least energy that keeps the predictions: this
headroom is at most the true one (conservative: a regime reported with headroom has it).

A regime whose headroom is under 5% (``headroom < HEADROOM_MIN_RATIO`` = 1.05: the bound saves less than 1 in 21
joules of the best causal baseline) is reported as such and does not count for "agents win"
(:func:`counts_for_agents_win`). :func:`baselines.accuracy_bound.regime_headroom` measures it on a few episodes.
"""

from __future__ import annotations

import numpy as np

from baselines.equal_accuracy import accuracy_energy_front, energy_at_accuracy

__all__ = ["HEADROOM_MIN_RATIO", "headroom", "counts_for_agents_win", "baseline_energy_at"]

#: the least headroom (best causal energy / bound energy) for a regime to count for "agents win"
HEADROOM_MIN_RATIO = 1.05


def headroom(best_causal_energy, bound_energy):
    """``best_causal_energy / bound_energy`` (J per token each, at matched accuracy), elementwise; inf where the
    bound spends nothing and the baseline something, NaN where both spend nothing."""
    b, e = (np.asarray(x, dtype=np.float64) for x in (best_causal_energy, bound_energy))
    if (b < 0).any() or (e < 0).any():
        raise ValueError(f"energies must be >= 0 J per token, got best_causal_energy={best_causal_energy!r}, "
                         f"bound_energy={bound_energy!r}")
    with np.errstate(divide="ignore", invalid="ignore"):
        out = b / e
    return float(out) if out.ndim == 0 else out


def counts_for_agents_win(headroom_ratio, minimum: float = HEADROOM_MIN_RATIO) -> bool:
    """Whether a regime with this headroom counts for "agents win": at least ``minimum`` (NaN: no)."""
    return bool(float(headroom_ratio) >= minimum)  # NaN compares False


def baseline_energy_at(energy, accuracy, target: float) -> tuple[float, str]:
    """A baseline's energy per token at accuracy ``target`` from its settings' per-episode values (S, n) (means
    over the episodes make the points): (energy, status) with status as in
    :func:`~baselines.equal_accuracy.energy_at_accuracy`; "above" gives the most accurate point's energy."""
    front = accuracy_energy_front(np.atleast_2d(energy).mean(axis=1), np.atleast_2d(accuracy).mean(axis=1))
    point = energy_at_accuracy(front, target)
    if point.status == "above":
        return float(front.energy[-1]), "above"
    return float(point.energy), point.status
