"""Wireless channel: small-scale fading models chosen by name, helper placement and mobility (the large-scale
path loss is :mod:`wide_env.sim.pathloss`).

All functions are batched over leading axes and use only numpy (docs/model.md, "Channel").

Fading models implement :class:`FadingModel` and are registered in :data:`FADING_MODELS`; the config field
``channel.fading`` names one. A new model is one class here and one entry in that registry: the simulators,
the slotted uplink's surrogate and DP (``E[1/h]``, quadrature, i.i.d. draws) all go through the interface.

``nakagami`` [paper]: the power gain of a link is built from ``2m`` real Gaussian components x_k,
h = (1/(2m)) * sum_k x_k^2, which is Gamma(m, 1/m) (mean 1, E[1/h] = m/(m-1)). Each component follows
x' = rho*x + sqrt(1-rho^2)*w, so h is stationary with lag-1 power correlation rho^2 and rho = 0 gives
i.i.d. fading, rho = 1 a static channel [std]. Without correlation (rho in {0, 1}) h itself is drawn from
the Gamma law, one draw per link; for m that is not a multiple of 1/2 only those two values are allowed.
``none``: h = 1 (path loss only) [choice].
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from functools import lru_cache

import numpy as np



class FadingModel(ABC):
    """Small-scale power gain h (mean 1) of arrays of links, advancing one epoch (a token, or a layer) at a
    time. The state is an array of the link shape plus one trailing axis, whatever a model needs."""

    #: registry name (config field ``channel.fading``)
    name: str = "fading"

    @abstractmethod
    def init(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """Stationary initial state of links of shape ``shape``."""

    @abstractmethod
    def sequence(self, rng: np.random.Generator, state: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
        """``steps`` successive states after ``state``: ((steps,) + state.shape, the last state)."""

    @abstractmethod
    def gain(self, state: np.ndarray) -> np.ndarray:
        """Power gain h of each link (the state without its trailing axis)."""

    @abstractmethod
    def draw(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """i.i.d. gains of shape ``shape`` (the slots of a slotted uplink)."""

    @abstractmethod
    def expected_inverse_gain(self) -> float:
        """E[1/h]; raises ValueError where it is infinite (then expected inversion energies are infinite)."""

    @abstractmethod
    def quadrature(self, n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
        """Nodes h_q and probability weights w_q with sum_q w_q g(h_q) ~ E[g(h)] (read-only arrays)."""

    def advance(self, rng: np.random.Generator, state: np.ndarray) -> np.ndarray:
        """The next state."""
        return self.sequence(rng, state, 1)[1]

    def law_key(self) -> tuple:
        """A hashable description of the marginal law of h (caches of quantities that depend on it alone)."""
        return (self.name,)


class NakagamiFading(FadingModel):
    """Time-correlated Nakagami-m power gains (Gamma(m, 1/m)) [paper: m = 2]."""

    name = "nakagami"

    def __init__(self, m: float, rho: float = 0.0):
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

    @classmethod
    def from_config(cls, channel) -> "NakagamiFading":
        return cls(channel.nakagami_m, channel.effective_correlation())

    def init(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """Initial fading state: Gaussian components (shape + (2m,)) or the gains themselves (shape + (1,))."""
        if self.n_components:
            return rng.standard_normal(shape + (self.n_components,))
        return self.draw(rng, shape + (1,))

    def advance(self, rng: np.random.Generator, state: np.ndarray) -> np.ndarray:
        if self.rho == 1.0:
            return state
        if self.n_components:
            fresh = rng.standard_normal(state.shape)
            return self.rho * state + np.sqrt(1.0 - self.rho * self.rho) * fresh if self.rho > 0.0 else fresh
        return self.draw(rng, state.shape)

    def sequence(self, rng: np.random.Generator, state: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
        """In one batched draw (no Python loop over steps); the same law as ``steps`` calls of
        :meth:`advance`: x_t = rho^t x_0 + sqrt(1 - rho^2) sum_{s<=t} rho^(t-s) w_s."""
        if steps == 0:
            return np.empty((0,) + state.shape), state
        if self.rho == 1.0:
            states = np.broadcast_to(state, (steps,) + state.shape)
        elif not self.n_components:  # i.i.d. Gamma draws (rho = 0)
            states = self.draw(rng, (steps,) + state.shape)
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

    def draw(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """Gamma(m, 1/m) draws (mean 1) of shape ``shape``."""
        if self._exponentials:
            return rng.standard_exponential((self._exponentials,) + tuple(shape)).sum(axis=0) / self.m
        return rng.gamma(self.m, 1.0 / self.m, size=shape)

    def gain(self, state: np.ndarray) -> np.ndarray:
        if self.n_components:
            return np.einsum("...k,...k->...", state, state) / self.n_components
        return state[..., 0]

    def law_key(self) -> tuple:
        return (self.name, self.m)

    def expected_inverse_gain(self) -> float:
        """E[1/h] = m / (m - 1); raises ValueError for m <= 1 (infinite)."""
        if not self.m > 1.0:
            raise ValueError(f"Nakagami m = {self.m} <= 1: E[1/h] is infinite, so expected inversion energies are "
                             "infinite; use config field 'channel.nakagami_m' > 1 (the paper uses m = 2) for the "
                             "expected-energy surrogate and the DP bit allocation")
        return self.m / (self.m - 1.0)

    def quadrature(self, n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
        """Gauss-generalised-Laguerre rule for the weight x^(m-1) e^(-x) (Golub-Welsch), then h = x / m:
        exact for polynomials of degree < 2 n_nodes."""
        return gamma_quadrature(self.m, int(n_nodes))


class NoFading(FadingModel):
    """h = 1 on every link: path loss only [choice]."""

    name = "none"

    @classmethod
    def from_config(cls, channel) -> "NoFading":
        return cls()

    def init(self, rng, shape):
        return np.ones(tuple(shape) + (1,))

    def sequence(self, rng, state, steps):
        return np.broadcast_to(state, (steps,) + state.shape), state

    def gain(self, state):
        return state[..., 0]

    def draw(self, rng, shape):
        return np.ones(shape)

    def expected_inverse_gain(self) -> float:
        return 1.0

    def quadrature(self, n_nodes):
        return _readonly(np.ones(1)), _readonly(np.ones(1))


#: name -> fading model class (config field ``channel.fading``); each has ``from_config(channel_config)``
FADING_MODELS: dict[str, type[FadingModel]] = {"nakagami": NakagamiFading, "none": NoFading}


def make_fading(channel) -> FadingModel:
    """The fading model the ``channel`` config section names."""
    return FADING_MODELS[channel.fading].from_config(channel)


def fading_law(fading) -> FadingModel:
    """A fading model, or a number m taken as Nakagami-m without correlation (a shorthand of the slot tools)."""
    if isinstance(fading, FadingModel):
        return fading
    return NakagamiFading(float(fading), 0.0)


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@lru_cache(maxsize=64)
def gamma_quadrature(m: float, n_nodes: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Nodes h_q and probability weights w_q with sum_q w_q g(h_q) ~ E[g(h)], h ~ Gamma(m, 1/m).

    Gauss-generalised-Laguerre rule for the weight x^(m-1) e^(-x) (Golub-Welsch: eigen-decomposition
    of the Jacobi matrix), then h = x / m. Exact for polynomials of degree < 2 n_nodes."""
    if not m > 0:
        raise ValueError(f"Nakagami m must be > 0, got {m}")
    if int(n_nodes) < 1:
        raise ValueError(f"quadrature needs n_nodes >= 1, got {n_nodes}")
    n = int(n_nodes)
    alpha = float(m) - 1.0
    i = np.arange(n, dtype=np.float64)
    diag = 2.0 * i + alpha + 1.0
    off = np.sqrt(i[1:] * (i[1:] + alpha))
    jacobi = np.diag(diag) + np.diag(off, 1) + np.diag(off, -1)
    x, vec = np.linalg.eigh(jacobi)
    weights = vec[0] ** 2
    keep = weights > 0  # far-tail nodes whose weight underflows carry no mass
    weights = weights[keep] / weights[keep].sum()
    return _readonly(x[keep] / float(m)), _readonly(weights)


def draw_distances(rng: np.random.Generator, shape: tuple[int, ...], r_min: float, r_max: float) -> np.ndarray:
    """Distances uniform in area over the annulus r_min..r_max (user at the centre) [choice]."""
    u = rng.random(shape)
    return np.sqrt(r_min * r_min + u * (r_max * r_max - r_min * r_min))


def draw_positions(rng: np.random.Generator, shape: tuple[int, ...], r_min: float, r_max: float) -> np.ndarray:
    """Helper positions (shape + (2,)) in metres, uniform in area over the annulus."""
    r = draw_distances(rng, shape, r_min, r_max)
    angle = rng.uniform(0.0, 2.0 * np.pi, size=shape)
    out = np.empty(tuple(shape) + (2,))
    np.multiply(r, np.cos(angle), out=out[..., 0])
    np.multiply(r, np.sin(angle), out=out[..., 1])
    return out


def draw_helpers(rng: np.random.Generator, batch: int, n_helpers: int, placement, path_loss):
    """New episodes' helpers: positions (B, N, 2), mobility waypoints (B, N, 2) and speeds (B, N), the path
    loss model's per-link state (B, N, S) and the path gains (B, N). ``placement`` is that config section."""
    shape = (batch, n_helpers)
    positions = draw_positions(rng, shape, placement.r_min_m, placement.r_max_m)
    if placement.mobility:
        waypoints = draw_positions(rng, shape, placement.r_min_m, placement.r_max_m)
        speeds = rng.uniform(placement.speed_min_mps, placement.speed_max_mps, size=shape)
    else:
        waypoints, speeds = positions.copy(), np.zeros(shape)
    distance = np.sqrt(np.add.reduce(positions * positions, axis=-1))  # np.linalg.norm's own sum, less overhead
    state = path_loss.init(rng, distance)
    return positions, waypoints, speeds, state, path_loss.gain(distance, state)


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
