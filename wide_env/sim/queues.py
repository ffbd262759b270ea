"""Helpers' queueing delays (helpers shared with other users) and what the device can know of them
(docs/model.md, "Helper queueing").

The delay of helper n at epoch t (a token; a layer too with per-layer fading) follows [choice]

    q_t = rho q_(t-1) + (1 - rho) e_t,    e_t ~ Exponential(mean),

stationary mean ``mean``, lag-one correlation rho (``compute.queue_persistence``; 0 = i.i.d. delays, larger =
persistent backlogs). The device decides before the call, so it does not know q_t; it knows the previous
epoch's delays (it measured them) and the law, hence P(q_t <= s | q_(t-1)). The simulators draw q_t with the
plan (the same realisations for every policy on the same seed) and reveal it only in the outcome.
"""

from __future__ import annotations

import numpy as np


class QueueModel:
    """Exponential innovations, AR(1) backlog; ``mean`` 0 = no queueing."""

    def __init__(self, mean_s: float, persistence: float = 0.0):
        if not mean_s >= 0:
            raise ValueError(f"queue delay mean must be >= 0 s, got {mean_s}")
        if not 0.0 <= persistence < 1.0:
            raise ValueError(f"queue persistence rho must be in [0, 1), got {persistence}")
        self.mean, self.rho = float(mean_s), float(persistence)

    @property
    def active(self) -> bool:
        return self.mean > 0.0

    def initial(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """The delays of the epoch before the first (what the device knows at the start); no draws without
        queueing."""
        if not self.active:
            return np.zeros(shape)
        return rng.exponential(self.mean, size=shape)

    def sequence(self, rng: np.random.Generator, previous: np.ndarray, steps: int) -> np.ndarray:
        """``steps`` successive delays after ``previous`` (shape S): (steps,) + S, in one draw."""
        if not self.active:
            return np.zeros((steps,) + previous.shape)
        fresh = rng.exponential(self.mean, size=(steps,) + previous.shape)
        if self.rho == 0.0:
            return fresh
        out = np.empty_like(fresh)
        last = previous
        for t in range(steps):
            last = out[t] = self.rho * last + (1.0 - self.rho) * fresh[t]
        return out

    def below_probability(self, slack_s, previous) -> np.ndarray:
        """P(q_t <= slack | q_(t-1) = previous), elementwise."""
        slack = np.asarray(slack_s, dtype=np.float64)
        if not self.active:
            return (slack >= 0).astype(np.float64)
        room = slack - self.rho * np.asarray(previous, dtype=np.float64)
        with np.errstate(over="ignore"):
            return np.where(room >= 0, -np.expm1(-np.maximum(room, 0.0) / ((1.0 - self.rho) * self.mean)), 0.0)
