"""Wireless channel: path loss and Nakagami-m small-scale fading with AR(1) time correlation.

All functions are batched over leading axes and use only numpy. The fading power gain of a link is
built from ``2m`` real Gaussian components x_k, h = (1/(2m)) * sum_k x_k^2, which is Gamma(m, 1/m)
(mean 1, E[1/h] = m/(m-1)). Each component follows x' = rho*x + sqrt(1-rho^2)*w, so h is stationary
with lag-1 power correlation rho^2 and rho = 0 gives i.i.d. fading, rho = 1 a static channel [std].
Without correlation (rho in {0, 1}) h itself is drawn from the Gamma law, one draw per link; for m that
is not a multiple of 1/2 only those two values are allowed.
"""

from __future__ import annotations

import numpy as np

from wide_env.sim.units import db_to_linear


def path_gain(distance_m, exponent: float, reference_gain_db: float = 0.0):
    """Large-scale power gain G = A * d^(-alpha) with A = 10^(reference_gain_db/10) [paper: A = 1, alpha = 4]."""
    return db_to_linear(reference_gain_db) * np.power(np.asarray(distance_m, dtype=np.float64), -exponent)


class NakagamiFading:
    """Time-correlated Nakagami-m power gains for arrays of links of shape ``shape`` (e.g. (B, N))."""

    def __init__(self, m: float, rho: float):
        if not m > 0:
            raise ValueError(f"Nakagami shape m must be > 0, got {m}")
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"fading correlation rho must be in [0, 1], got {rho}")
        self.m = float(m)
        self.rho = float(rho)
        twice_m = 2.0 * self.m
        # Correlated fading evolves 2m Gaussian components by AR(1); without correlation only the gain's
        # law matters, so it is drawn directly from Gamma(m, 1/m) (one draw per link, not 2m).
        correlated = 0.0 < self.rho < 1.0
        self.n_components = int(round(twice_m)) if float(twice_m).is_integer() and correlated else 0
        # Gamma(m, 1/m) for integer m is a sum of m unit exponentials over m: the same law, drawn about
        # twice as fast as numpy's gamma sampler (m = 2 is the paper's)
        self._exponentials = int(self.m) if self.m.is_integer() and self.m <= 8 else 0
        if self.n_components == 0 and self.rho not in (0.0, 1.0):
            raise ValueError("correlated Nakagami fading needs m to be a multiple of 0.5")

    def init(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """Initial fading state: Gaussian components (shape + (2m,)) or the gains themselves (shape + (1,))."""
        if self.n_components:
            return rng.standard_normal(shape + (self.n_components,))
        return self._gamma(rng, shape + (1,))

    def advance(self, rng: np.random.Generator, state: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
        """Next fading state; ``where`` (broadcastable to the link shape) limits the update to some rows."""
        if self.rho == 1.0:
            return state
        if self.n_components:
            fresh = rng.standard_normal(state.shape)
            new = self.rho * state + np.sqrt(1.0 - self.rho * self.rho) * fresh if self.rho > 0.0 else fresh
        else:
            new = self._gamma(rng, state.shape)
        if where is None:
            return new
        return np.where(np.asarray(where)[..., None], new, state)

    def sequence(self, rng: np.random.Generator, state: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
        """``steps`` successive states after ``state`` in one batched draw (no Python loop over steps).
        Returns (states of shape (steps,) + state.shape, the last state). Same law as calling
        :meth:`advance` ``steps`` times: x_t = rho^t x_0 + sqrt(1 - rho^2) sum_{s<=t} rho^(t-s) w_s."""
        if steps == 0:
            return np.empty((0,) + state.shape), state
        if self.rho == 1.0:
            states = np.broadcast_to(state, (steps,) + state.shape)
        elif not self.n_components:  # i.i.d. Gamma draws (rho = 0)
            states = self._gamma(rng, (steps,) + state.shape)
        else:
            fresh = rng.standard_normal((steps,) + state.shape)
            if self.rho == 0.0:
                states = fresh
            else:
                t = np.arange(1, steps + 1)
                lag = t[:, None] - t[None, :]
                weights = np.where(lag >= 0, self.rho ** np.maximum(lag, 0), 0.0) * np.sqrt(1.0 - self.rho ** 2)
                states = np.tensordot(weights, fresh, axes=(1, 0))
                states += (self.rho ** t).reshape((steps,) + (1,) * state.ndim) * state
        return states, states[-1]

    def _gamma(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """Gamma(m, 1/m) draws (mean 1) of shape ``shape``."""
        if self._exponentials:
            return rng.standard_exponential((self._exponentials,) + shape).sum(axis=0) / self.m
        return rng.gamma(self.m, 1.0 / self.m, size=shape)

    def gain(self, state: np.ndarray) -> np.ndarray:
        """Small-scale power gain h (mean 1) for each link."""
        if self.n_components:
            return np.einsum("...k,...k->...", state, state) / self.n_components
        return state[..., 0]


def draw_distances(rng: np.random.Generator, shape: tuple[int, ...], r_min: float, r_max: float) -> np.ndarray:
    """Distances uniform in area over the annulus r_min..r_max (user at the centre) [choice]."""
    u = rng.random(shape)
    return np.sqrt(r_min * r_min + u * (r_max * r_max - r_min * r_min))


def draw_positions(rng: np.random.Generator, shape: tuple[int, ...], r_min: float, r_max: float) -> np.ndarray:
    """Helper positions (shape + (2,)) in metres, uniform in area over the annulus."""
    r = draw_distances(rng, shape, r_min, r_max)
    angle = rng.uniform(0.0, 2.0 * np.pi, size=shape)
    return np.stack([r * np.cos(angle), r * np.sin(angle)], axis=-1)


def draw_helpers(rng: np.random.Generator, batch: int, n_helpers: int, placement, channel):
    """New episodes' helpers: positions (B, N, 2), mobility waypoints (B, N, 2) and speeds (B, N), and
    path gains (B, N). ``placement`` and ``channel`` are the config sections of those names."""
    shape = (batch, n_helpers)
    positions = draw_positions(rng, shape, placement.r_min_m, placement.r_max_m)
    if placement.mobility:
        waypoints = draw_positions(rng, shape, placement.r_min_m, placement.r_max_m)
        speeds = rng.uniform(placement.speed_min_mps, placement.speed_max_mps, size=shape)
    else:
        waypoints, speeds = positions.copy(), np.zeros(shape)
    gain = path_gain(np.linalg.norm(positions, axis=-1), channel.path_loss_exponent, channel.reference_gain_db)
    return positions, waypoints, speeds, gain


def move_random_waypoint(rng: np.random.Generator, positions: np.ndarray, waypoints: np.ndarray, speeds: np.ndarray,
                         dt: float, r_min: float, r_max: float, speed_range: tuple[float, float]):
    """Advance pedestrians by ``dt`` toward their waypoints; those that arrive draw a new waypoint and speed.

    Returns (positions, waypoints, speeds). Positions stay inside the annulus because waypoints do and
    the annulus... is not convex, so the distance is clipped to [r_min, r_max] afterwards.
    """
    delta = waypoints - positions
    remaining = np.linalg.norm(delta, axis=-1)
    step = speeds * dt
    arrived = remaining <= step
    frac = np.where(arrived, 1.0, step / np.maximum(remaining, 1e-12))
    positions = positions + delta * frac[..., None]
    if arrived.any():
        new_wp = draw_positions(rng, arrived.shape, r_min, r_max)
        new_speed = rng.uniform(speed_range[0], speed_range[1], size=arrived.shape)
        waypoints = np.where(arrived[..., None], new_wp, waypoints)
        speeds = np.where(arrived, new_speed, speeds)
    dist = np.linalg.norm(positions, axis=-1)
    clipped = np.clip(dist, r_min, r_max)
    positions = positions * (clipped / np.maximum(dist, 1e-12))[..., None]
    return positions, waypoints, speeds
