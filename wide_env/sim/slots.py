"""Fast fading within one uplink: S equal slots, bit allocation by uniform split or dynamic programming.

docs/model.md#slots and #policy-siftmoe-fast-fading [paper's fast-fading case]. The uplink window ``tau`` of
a link is split into ``S`` equal slots of ``tau / S``; slot ``s`` sees an i.i.d. power gain ``h_s`` (mean 1)
of the channel's fading model (:class:`wide_env.sim.channel.FadingModel`; the paper's Nakagami-m,
``h ~ Gamma(m, 1/m)``) on top of the large-scale gain ``G``. Every function taking a fading ``law``
accepts a fading model or a number m (Nakagami-m). Sending
``b`` bits in a slot by channel inversion costs (the :func:`~wide_env.sim.physics.inversion_energy`
formula with window ``tau / S``)::

    e(b, h) = (tau/S) * (N0 B / (G h)) * (2^(b / (B tau/S)) - 1)   [J]

Allocations (all numpy, batched over any leading axes of the link arrays):

* ``uniform``: ``D / S`` bits per slot. Expected energy ``S * e(D/S, .)`` with ``1/h`` replaced by
  ``E[1/h] = m / (m - 1)``, which equals the single-window inversion energy with gain ``G (m-1)/m``.
* ``dp`` (causal dynamic programming): at slot ``s`` the current gain ``h_s`` is known, future gains only
  in distribution; the sender chooses ``b_s`` minimising ``e(b_s, h_s) + V_{s+1}(remaining bits)``;
  the last slot sends everything left, so ``V_S(r) = E[1/h] * e(r, 1)``.

**Normalisation.** With ``a = (tau/S) N0 B / G`` (joules) and the spectral load ``x = b / (B tau/S)``
(bit/s/Hz in one slot), ``e = a (2^x - 1) / h``. The normalised value functions ``v_s(x)`` depend only
on the fading law and ``S``, not on the link, so they are tabulated once per (law, S) and shared by every link:
table ``k`` covers ``x in [0, 2^k]`` on a uniform grid of ``grid_points`` points, and a link with total
load ``X = D / (B tau/S)`` uses the smallest table with ``2^k >= X`` (at least ``(grid_points-1)/2 + 1``
grid points fall inside ``[0, X]``). Tables are built lazily and cached.

**Decisions on the grid.** After each slot the remaining load is a grid point of the link's table (the
first slot's choice moves ``X`` onto the grid), so the DP's Bellman recursion is exact on that finite
decision set. Expectations over ``h`` use the fading model's quadrature (Gauss-generalised-Laguerre for the
Gamma(m, 1/m) law, ``quad_nodes`` nodes, Golub-Welsch); the integrand ``min_b(e(b,h) + V(r-b))`` is bounded (it lies
between ``0`` and ``V(r)``), so the rule is stable. The last slot's expectation is analytic (``E[1/h]``).

**Accuracy** (measured, m = 2, spectral load D/(B tau) = 1.09, S = 2..16): with the defaults
(quad_nodes = 48, grid_points = 257) the DP's expected energy is within 0.2 % of a reference table
(quad_nodes = 256, grid_points = 513; the defaults sit slightly above it: a coarser decision grid) and
within 0.3 % (about 2 standard errors) of the Monte-Carlo mean of the realised DP energy over 200k
draws. tests/test_slots.py checks the MC agreement at 20k draws.

**Uniform fallback.** If, for a link, the DP plan's expected energy is not below the (exact) uniform
expected energy - which happens only when fading barely varies (large m) and grid effects dominate -
the policy sends uniformly on that link. Hence ``expected_energy_dp <= expected_energy_uniform`` always.

**m <= 1.** ``E[1/h]`` is infinite, and so is the expected energy of *every* causal policy under a hard
deadline (whatever is left for the last slot costs ``E[1/h]`` times a positive number). Expected
energies, the surrogate and the DP therefore raise :class:`ValueError` for ``m <= 1``; realised
energies of the uniform split work for any m.

**Power limit and lateness** (docs/model.md#slots). The device never sends above ``p_max``: in slot ``s`` it
sends the bits its allocation intends, at most ``x_cap = log2(1 + p_max G h_s / (N0 B))`` of spectral load
(what ``p_max`` carries in that slot); what it could not send is carried over, and the allocation of the
later slots starts from what is really left (the DP decides from the remaining load, the uniform split
spreads it evenly over the slots left). Whatever is still left after the last slot is sent at ``p_max`` on
the last slot's gain after the window closes: the call is late (``overtime_s > 0``) and its energy is spent.
Lateness and energy therefore come from the same slot gains. :func:`completion_probability` gives what the
device can know before the call: the probability that the whole payload fits in the window, given the first
slot's gain, over fixed sample paths of the later slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from wide_env.sim.channel import fading_law
from wide_env.sim.channel import gamma_quadrature  # noqa: F401 (tests/test_slots.py checks it as slots.gamma_quadrature)
from wide_env.sim.physics import inversion_energy, inversion_power

DEFAULT_QUAD_NODES = 48
DEFAULT_GRID_POINTS = 257


# ---- the fading law ------------------------------------------------------------------------------
def expected_inverse_gain(fading) -> float:
    """E[1/h] of the slots' fading law (m / (m - 1) for Nakagami-m); raises ValueError where infinite."""
    return fading_law(fading).expected_inverse_gain()


def _f(x):
    """2^x - 1 (the inversion energy's bit term), accurate for small x."""
    return np.expm1(np.asarray(x, dtype=np.float64) * math.log(2.0))


# ---- deterministic energies ------------------------------------------------------------------------
def surrogate_energy(bits, window_s, path_gain, bandwidth_hz: float, noise_psd_w_hz: float, law):
    """SiftMoE's deterministic selection surrogate: inversion energy over the whole window with 1/h replaced
    by E[1/h] of the fading ``law`` (J). Equals :func:`expected_energy_uniform` for any S. Raises where E[1/h]
    is infinite (Nakagami m <= 1)."""
    mu = expected_inverse_gain(law)
    return inversion_energy(bits, window_s, np.asarray(path_gain, dtype=np.float64) / mu, bandwidth_hz, noise_psd_w_hz)


def expected_energy_uniform(bits, window_s, path_gain, bandwidth_hz: float, noise_psd_w_hz: float, law,
                            n_slots: int):
    """Expected energy (J) of D/S bits per slot by inversion, S i.i.d. Nakagami-m slots: exact,
    S * (tau/S) * E[1/h] * (N0 B / G) * (2^(D/(B tau/S)) - 1). Batched; raises where E[1/h] is infinite."""
    S = _check_slots(n_slots)
    mu = expected_inverse_gain(law)
    window = np.asarray(window_s, dtype=np.float64)
    return S * inversion_energy(np.asarray(bits, dtype=np.float64) / S, window / S,
                                np.asarray(path_gain, dtype=np.float64) / mu, bandwidth_hz, noise_psd_w_hz)


def _check_slots(n_slots) -> int:
    if isinstance(n_slots, bool) or not float(n_slots).is_integer() or int(n_slots) < 1:
        raise ValueError(f"number of uplink slots S = {n_slots!r} is invalid: use an integer >= 1 "
                         "(config field 'radio.uplink_slots')")
    return int(n_slots)


# ---- realised outcomes -----------------------------------------------------------------------------
@dataclass(frozen=True)
class SlotOutcome:
    """Realised allocation over S slots for links of shape ``lead`` (radiated energies)."""

    bits: np.ndarray  # lead + (S,), bits sent in each slot of the window (>= 0)
    slot_energy: np.ndarray  # lead + (S,), J
    slot_power: np.ndarray  # lead + (S,), W (<= max_power_w)
    energy: np.ndarray  # lead, J: the slots plus the overtime at p_max
    used_uniform: np.ndarray  # lead, bool: the DP fell back to the uniform split (always True for 'uniform')
    leftover_bits: np.ndarray  # lead: bits the window could not carry at p_max (sent in overtime)
    overtime_s: np.ndarray  # lead, s: transmission after the window (0 when the payload fit)
    transmit_time_s: np.ndarray  # lead, s: time the device transmits (slots with bits, plus the overtime)

    @property
    def completed(self) -> np.ndarray:
        """lead bool: the payload fit in the window."""
        return self.leftover_bits <= 0.0


def realised_uniform(bits, window_s, path_gain, fading, bandwidth_hz: float, noise_psd_w_hz: float,
                     max_power_w: float = np.inf) -> SlotOutcome:
    """D/S bits per slot (what is left spread evenly over the slots left once ``p_max`` binds); ``fading``
    lead + (S,) are the slots' small-scale gains. Any fading law."""
    fading = np.asarray(fading, dtype=np.float64)
    return _run_slots(None, bits, window_s, path_gain, fading, bandwidth_hz, noise_psd_w_hz, max_power_w)


def _check_links(bits: np.ndarray, window: np.ndarray, gain: np.ndarray) -> None:
    """Payloads, windows and path gains of links a slotted uplink can serve."""
    if (bits < 0).any() or not np.isfinite(bits).all():
        raise ValueError("bits must be finite and >= 0")
    if not (window > 0).all():
        raise ValueError("uplink window tau must be > 0 s for every link (an expert whose downlink and compute "
                         "already exceed the deadline cannot use slots)")
    if not (gain > 0).all():
        raise ValueError("path gain G must be > 0 for every link")


def _run_slots(dp, bits, window_s, path_gain, fading, bandwidth_hz, noise_psd_w_hz, max_power_w) -> SlotOutcome:
    """The causal allocation ``dp`` (a :class:`SlotDP`, or None for the uniform split) run slot by slot on the
    realised gains ``fading`` (lead + (S,)), capped at ``max_power_w`` per slot, with carry-over and overtime
    (module docstring)."""
    S = fading.shape[-1]
    bits = np.asarray(bits, dtype=np.float64)
    window = np.asarray(window_s, dtype=np.float64)
    gain = np.asarray(path_gain, dtype=np.float64)
    lead = np.broadcast_shapes(bits.shape, window.shape, gain.shape, fading.shape[:-1])
    _check_links(bits, window, gain)
    if not (fading > 0).all():
        raise ValueError("slot fading gains must be > 0")
    if not max_power_w > 0:
        raise ValueError(f"max_power_w = {max_power_w!r} must be > 0 W (config field 'radio.user_max_power_dbm')")
    bf, wf, gf = (np.broadcast_to(x, lead).reshape(-1) for x in (bits, window, gain))
    h = np.broadcast_to(fading, lead + (S,)).reshape(-1, S)
    slot = wf / S
    X = bf / (bandwidth_hz * slot)  # spectral load of the payload in one slot (bit/s/Hz)
    snr = gf[:, None] * h / (noise_psd_w_hz * bandwidth_hz)  # per unit power
    with np.errstate(over="ignore"):
        cap = np.log2(1.0 + max_power_w * snr) if np.isfinite(max_power_w) else np.full(h.shape, np.inf)
    uniform = np.ones(X.shape, dtype=bool) if dp is None else ~dp.use_dp(X)
    loads = np.zeros(h.shape)
    left = X.copy()
    k = dp._scale(np.where(uniform, 1.0, X)) if dp is not None else None
    for s in range(S):
        if s == S - 1:
            intend = left
        else:
            intend = left / (S - s)
            if dp is not None and not uniform.all():
                rows = np.flatnonzero(~uniform & (left > 0))
                intend[rows] = dp.intended_load(left[rows], k[rows], h[rows, s], s)
        sent = np.minimum(intend, cap[:, s])
        loads[:, s] = sent
        left = np.maximum(left - sent, 0.0)
    per_bit = bandwidth_hz * slot  # bits per unit spectral load in one slot
    slot_bits = loads * per_bit[:, None]
    leftover = left * per_bit
    leftover = np.where(leftover > 1e-9 * np.maximum(bf, 1.0), leftover, 0.0)  # rounding of the carry-over
    window_slot = slot[:, None]
    link_gain = gf[:, None] * h
    power = np.where(slot_bits > 0, inversion_power(slot_bits, window_slot, link_gain, bandwidth_hz, noise_psd_w_hz), 0.0)
    power = np.minimum(power, max_power_w)  # the capped slots sit exactly at p_max (up to rounding)
    energy = power * window_slot * (slot_bits > 0)
    last_rate = bandwidth_hz * cap[:, -1]
    overtime = np.where(leftover > 0, leftover / np.where(leftover > 0, last_rate, 1.0), 0.0)
    over_energy = np.where(leftover > 0, max_power_w * overtime, 0.0) if np.isfinite(max_power_w) else 0.0
    transmit = (slot_bits > 0).sum(axis=1) * slot + overtime
    shape = lambda x: x.reshape(lead + x.shape[1:])  # noqa: E731
    return SlotOutcome(bits=shape(slot_bits), slot_energy=shape(energy), slot_power=shape(power),
                       energy=shape(energy.sum(axis=1) + over_energy), used_uniform=shape(uniform),
                       leftover_bits=shape(leftover), overtime_s=shape(overtime), transmit_time_s=shape(transmit))


# ---- dynamic programming ---------------------------------------------------------------------------
class SlotDP:
    """Causal DP bit allocation over ``n_slots`` i.i.d. slots of the fading ``law`` (see the module docstring).

    ``expected_energy(...)`` gives the DP's expected energy per link, ``allocate(...)`` runs the policy on
    realised slot gains. Both are batched over the leading axes of ``bits``, ``window_s``, ``path_gain``.
    Complexity: building one table costs (S-2) * quad_nodes * grid_points^2 / 2 operations (once per
    scale, cached); per link, the first slot's decision costs quad_nodes * grid_points (expectation) or
    grid_points (realised), later slots grid_points each.
    """

    def __init__(self, law, n_slots: int, *, quad_nodes: int = DEFAULT_QUAD_NODES,
                 grid_points: int = DEFAULT_GRID_POINTS):
        self.S = _check_slots(n_slots)
        self.law = fading_law(law)
        self.mu = self.law.expected_inverse_gain()
        if int(grid_points) < 3:
            raise ValueError(f"grid_points = {grid_points} is too small; use >= 3 (64-1025 recommended)")
        self.G = int(grid_points)
        self.nodes, self.weights = self.law.quadrature(int(quad_nodes))
        self._tables: dict[int, np.ndarray] = {}

    def _table(self, k: int) -> np.ndarray:
        """(S, G) normalised values on the grid r_i = i * 2^k / (G-1) of table ``k``.

        Row s >= 1 (0-based) is v_{s+1}(r_i): the expected energy of slots s+1..S (1-based) from remaining
        load r_i under the DP; row S-1 is the last slot (analytic, E[1/h] f(r)). Row 0 is the bound
        W_i = E min_{j < i} (f(r_i - r_j)/h + v_2(r_j)): the expected energy from any load X in
        (r_{i-1}, r_i] is at most W_i (it may keep the same r_j and send less now), so W gives a
        rigorous, O(1) test of whether the DP beats the uniform split."""
        if k in self._tables:
            return self._tables[k]
        S, G = self.S, self.G
        r = np.arange(G) * (2.0 ** k / (G - 1))
        fr = _f(r)
        v = np.empty((S, G))
        v[S - 1] = self.mu * fr
        inv_h = 1.0 / self.nodes  # (Q,)
        # send[i, j] = f(r_i - r_j): send i-j grid steps now and keep r_j (j <= i)
        diff = np.arange(G)[:, None] - np.arange(G)[None, :]
        send = np.where(diff >= 0, fr[np.clip(diff, 0, None)], np.inf)  # (G, G)
        strict = np.where(diff > 0, send, np.inf)
        # (loads beyond ~1000 bit/s/Hz overflow to inf/NaN: such links fall back to the uniform split)
        for s in range(S - 2, -1, -1):
            nxt = v[s + 1]
            cand = strict if s == 0 else send
            acc = np.zeros(G)
            with np.errstate(over="ignore", invalid="ignore"):
                for q in range(inv_h.shape[0]):
                    acc += self.weights[q] * np.min(cand * inv_h[q] + nxt[None, :], axis=1)
            v[s] = acc
        v[0, 0] = 0.0
        v.setflags(write=False)
        self._tables[k] = v
        return v

    def _scale(self, X: np.ndarray) -> np.ndarray:
        """Table index k = ceil(log2 X) per link (X > 0)."""
        k = np.ceil(np.log2(X)).astype(np.int64)
        # guard rounding: 2^k must cover X
        k = np.where(2.0 ** k < X, k + 1, k)
        return k

    def _normalise(self, bits, window_s, path_gain, bandwidth_hz, noise_psd_w_hz):
        bits = np.asarray(bits, dtype=np.float64)
        window = np.asarray(window_s, dtype=np.float64)
        gain = np.asarray(path_gain, dtype=np.float64)
        lead = np.broadcast_shapes(bits.shape, window.shape, gain.shape)
        bits, window, gain = (np.broadcast_to(a, lead) for a in (bits, window, gain))
        _check_links(bits, window, gain)
        slot = window / self.S
        a = slot * noise_psd_w_hz * bandwidth_hz / gain  # J per unit (2^x - 1)/h
        X = bits / (bandwidth_hz * slot)
        return lead, a, X

    def _first_slot_costs(self, X: np.ndarray, k: np.ndarray):
        """For links with loads X (n,) and table indices k (n,): (send (n, G) = f(X - r_i) or inf,
        cont (n, G) = v_2(r_i)) over remaining grid loads r_i <= X."""
        n = X.shape[0]
        send = np.full((n, self.G), np.inf)
        cont = np.zeros((n, self.G))
        for kk in np.unique(k):
            rows = np.flatnonzero(k == kk)
            table = self._table(int(kk))
            r = np.arange(self.G) * (2.0 ** kk / (self.G - 1))
            left = X[rows, None] - r[None, :]
            ok = left >= -1e-12 * X[rows, None]
            send[rows] = np.where(ok, _f(np.maximum(left, 0.0)), np.inf)
            cont[rows] = table[1][None, :]
        return send, cont

    def use_dp(self, X: np.ndarray) -> np.ndarray:
        """Per link (normalised loads X, flat): True where the DP plan is used, i.e. its rigorous bound
        W (table row 0) is below the uniform split's exact expected energy; False = uniform fallback."""
        uni = self.S * self.mu * _f(X / self.S)
        out = np.zeros(X.shape, dtype=bool)
        if self.S == 1:
            return out
        pos = np.flatnonzero(X > 0)
        if pos.size:
            k = self._scale(X[pos])
            for kk in np.unique(k):
                sub = pos[k == kk]
                step = 2.0 ** kk / (self.G - 1)
                hi = np.minimum(np.ceil(X[sub] / step - 1e-9).astype(np.int64), self.G - 1)
                out[sub] = self._table(int(kk))[0, hi] < uni[sub]
        return out

    def expected_energy(self, bits, window_s, path_gain, bandwidth_hz: float, noise_psd_w_hz: float):
        """Expected energy (J) of the DP policy, per link (lead shape); never above the uniform split's
        (links on the uniform fallback, and S = 1, return :func:`expected_energy_uniform` exactly)."""
        lead, a, X = self._normalise(bits, window_s, path_gain, bandwidth_hz, noise_psd_w_hz)
        out = np.array(np.broadcast_to(expected_energy_uniform(bits, window_s, path_gain, bandwidth_hz, noise_psd_w_hz,
                                                               self.law, self.S), lead), dtype=np.float64).reshape(-1)
        Xf = X.reshape(-1)
        use = self.use_dp(Xf)
        if use.any():
            Xu, inverse = np.unique(Xf[use], return_inverse=True)
            send, cont = self._first_slot_costs(Xu, self._scale(Xu))
            acc = np.zeros(Xu.shape[0])
            for h, w in zip(self.nodes, self.weights):
                acc += w * np.min(send / h + cont, axis=1)
            out[use] = np.minimum(a.reshape(-1)[use] * acc[inverse.reshape(-1)], out[use])
        return out.reshape(lead)

    def intended_load(self, left: np.ndarray, k: np.ndarray, h: np.ndarray, s: int) -> np.ndarray:
        """Spectral load the DP sends in slot ``s`` (0-based, s < S - 1) with ``left`` (n,) still to send,
        table indices ``k`` (n,) and the slot's gain ``h`` (n,): argmin over grid loads r_j <= left kept for
        later of f(left - r_j) / h + v_{s+1}(r_j). Without a power cap ``left`` stays on the grid after the
        first slot, so this is the Bellman decision of the tables exactly."""
        out = np.empty(left.shape[0])
        for kk in np.unique(k):
            sub = np.flatnonzero(k == kk)
            step = 2.0 ** kk / (self.G - 1)
            r = np.arange(self.G) * step
            rest = left[sub, None] - r[None, :]
            ok = rest >= -1e-9 * step
            cost = np.where(ok, _f(np.maximum(rest, 0.0)) / h[sub, None] + self._table(int(kk))[s + 1][None, :],
                            np.inf)
            keep = r[np.argmin(cost, axis=1)]
            out[sub] = np.maximum(left[sub] - keep, 0.0)
        return out

    def allocate(self, bits, window_s, path_gain, fading, bandwidth_hz: float, noise_psd_w_hz: float,
                 max_power_w: float = np.inf) -> SlotOutcome:
        """Run the causal DP on realised slot gains ``fading`` (lead + (S,)): slot s's decision uses only
        h_1..h_s and what is really left; no slot above ``max_power_w`` (module docstring)."""
        fading = np.asarray(fading, dtype=np.float64)
        if fading.shape[-1:] != (self.S,):
            raise ValueError(f"fading must have a last axis of S = {self.S} slot gains, got shape {fading.shape}")
        return _run_slots(self, bits, window_s, path_gain, fading, bandwidth_hz, noise_psd_w_hz, max_power_w)


def slot_dp(law, n_slots: int, quad_nodes: int = DEFAULT_QUAD_NODES,
            grid_points: int = DEFAULT_GRID_POINTS) -> SlotDP:
    """A cached :class:`SlotDP` (its tables are shared by every caller with the same law and settings)."""
    law = fading_law(law)
    return _slot_dp(law.law_key(), law, int(n_slots), int(quad_nodes), int(grid_points))


@lru_cache(maxsize=32)
def _slot_dp(key: tuple, law, n_slots: int, quad_nodes: int, grid_points: int) -> SlotDP:
    return SlotDP(law, n_slots, quad_nodes=quad_nodes, grid_points=grid_points)


def expected_energy_dp(bits, window_s, path_gain, bandwidth_hz: float, noise_psd_w_hz: float, law,
                       n_slots: int, *, quad_nodes: int = DEFAULT_QUAD_NODES, grid_points: int = DEFAULT_GRID_POINTS):
    """Expected energy (J) of causal DP bit allocation over S slots, per link (batched); <= uniform's."""
    return slot_dp(law, _check_slots(n_slots), int(quad_nodes), int(grid_points)).expected_energy(
        bits, window_s, path_gain, bandwidth_hz, noise_psd_w_hz)


def allocate_bits(policy: str, bits, window_s, path_gain, fading, bandwidth_hz: float, noise_psd_w_hz: float,
                  law=None, *, max_power_w: float = np.inf, quad_nodes: int = DEFAULT_QUAD_NODES,
                  grid_points: int = DEFAULT_GRID_POINTS) -> SlotOutcome:
    """Realised allocation with ``policy`` 'uniform' or 'dp' (the fading ``law`` needed for 'dp');
    S = fading.shape[-1]; no slot above ``max_power_w`` (what does not fit is sent late)."""
    if policy == "uniform":
        return realised_uniform(bits, window_s, path_gain, fading, bandwidth_hz, noise_psd_w_hz, max_power_w)
    if policy == "dp":
        if law is None:
            raise ValueError("bit allocation 'dp' needs the fading law of the slot gains (a model or Nakagami m)")
        S = np.shape(fading)[-1]
        return slot_dp(law, int(S), int(quad_nodes), int(grid_points)).allocate(
            bits, window_s, path_gain, fading, bandwidth_hz, noise_psd_w_hz, max_power_w)
    raise ValueError(f"unknown bit allocation {policy!r}; choose 'uniform' or 'dp' (config field 'radio.bit_allocation')")


def expected_energy(policy: str, bits, window_s, path_gain, bandwidth_hz: float, noise_psd_w_hz: float, law,
                    n_slots: int, **kwargs):
    """Expected energy (J) under ``policy`` 'uniform' or 'dp' (dispatch helper for the simulators)."""
    if policy == "uniform":
        return expected_energy_uniform(bits, window_s, path_gain, bandwidth_hz, noise_psd_w_hz, law, n_slots)
    if policy == "dp":
        return expected_energy_dp(bits, window_s, path_gain, bandwidth_hz, noise_psd_w_hz, law, n_slots, **kwargs)
    raise ValueError(f"unknown bit allocation {policy!r}; choose 'uniform' or 'dp' (config field 'radio.bit_allocation')")


#: sample paths of the later slots behind :func:`completion_probability` [choice: a 1/64 resolution]
COMPLETION_SAMPLES = 64


@lru_cache(maxsize=32)
def _later_slot_paths(key: tuple, law, n_slots: int, samples: int) -> np.ndarray:
    """(samples, S - 1) fixed gains of slots 2..S: common random numbers from their own seed, so the
    probability is a deterministic function of the state (the env's generator is not touched)."""
    paths = law.draw(np.random.default_rng(20_240_611), (samples, n_slots - 1))
    paths.setflags(write=False)
    return paths


def completion_probability(policy: str, bits, window_s, path_gain, first_gain, bandwidth_hz: float,
                           noise_psd_w_hz: float, law, n_slots: int, max_power_w: float, *,
                           samples: int = COMPLETION_SAMPLES) -> np.ndarray:
    """P(the payload fits in the window at no more than ``max_power_w`` per slot) per link (lead shape), given
    the first slot's small-scale gain ``first_gain`` (what the device measures when it decides), over
    ``samples`` fixed paths of the later slots; the realised allocation ``policy`` itself is run on each path.
    Links with no window (``window_s <= 0``) get 0."""
    S = _check_slots(n_slots)
    law = fading_law(law)
    bits, window = np.asarray(bits, dtype=np.float64), np.asarray(window_s, dtype=np.float64)
    gain, first = np.asarray(path_gain, dtype=np.float64), np.asarray(first_gain, dtype=np.float64)
    lead = np.broadcast_shapes(bits.shape, window.shape, gain.shape, first.shape)
    bits, window, gain, first = (np.broadcast_to(x, lead).reshape(-1) for x in (bits, window, gain, first))
    out = np.zeros(bits.shape[0])
    ok = window > 0
    if ok.any():
        later = _later_slot_paths(law.law_key(), law, S, int(samples))  # (M, S - 1)
        M = later.shape[0]
        fading = np.concatenate([np.broadcast_to(first[ok][:, None, None], (int(ok.sum()), M, 1)),
                                 np.broadcast_to(later[None], (int(ok.sum()), M, S - 1))], axis=-1)
        run = allocate_bits(policy, bits[ok][:, None], window[ok][:, None], gain[ok][:, None], fading,
                            bandwidth_hz, noise_psd_w_hz, law, max_power_w=max_power_w)
        out[ok] = run.completed.mean(axis=1)
    return out.reshape(lead)


def draw_slot_fading(rng: np.random.Generator, shape: tuple[int, ...], law, n_slots: int) -> np.ndarray:
    """i.i.d. slot gains of the fading ``law``, of shape ``shape + (S,)``."""
    return fading_law(law).draw(rng, tuple(shape) + (_check_slots(n_slots),))
