"""SiftMoE for fast fading within an uplink ([paper]'s fast-fading case; docs/model.md#policy-siftmoe-fast-fading).

Two stages:

1. **Selection** before the uplink starts, when only the large-scale gains G are known: the exact
   decoding solver runs on the deterministic *surrogate* energy of each expert, the inversion energy
   over the whole window with 1/h replaced by E[1/h] = m/(m-1) (:func:`wide_env.sim.slots.surrogate_energy`;
   it equals the uniform split's expected energy for any number of slots S). m <= 1 raises (infinite).
2. **Bit allocation** while the channel reveals itself slot by slot: causal dynamic programming
   (:class:`wide_env.sim.slots.SlotDP`) or, for comparison, the uniform split.

``solve_decode(energy (B,E), feasible (B,E), deviation_table (B,K,E+1), budget (B,)) -> (B,E) bool`` is a
parameter; by default the exact solver of :mod:`baselines.siftmoe`.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from wide_env.sim.slots import SlotOutcome, allocate_bits, expected_energy, surrogate_energy

__all__ = ["FastFadingResult", "siftmoe_fast_fading"]


class FastFadingResult(NamedTuple):
    mask: np.ndarray  # (B, E) executed experts
    surrogate_energy: np.ndarray  # (B, E) J, selection costs
    expected_energy: np.ndarray  # (B,) J, expected energy of the selected set under the allocation policy
    realised_energy: np.ndarray  # (B,) J, realised on the given slot gains
    outcome: SlotOutcome  # per (B, E) link: bits and energy per slot (zeros for unselected experts)


def siftmoe_fast_fading(path_gain, window_s, deviation_table, budget, fading, *, bits: float, bandwidth_hz: float,
                        noise_psd_w_hz: float, m: float, feasible=None, allocation: str = "dp",
                        solve_decode: Callable | None = None, **dp_options) -> FastFadingResult:
    """Select experts with surrogate costs, then allocate each selected uplink's bits over its S slots.

    path_gain (B, E): large-scale gain G of each expert's link (linear); window_s (B, E) or scalar:
    uplink window tau (s); deviation_table (B, K, E+1); budget (B,); fading (B, E, S): realised slot
    gains h (revealed causally to the DP); feasible (B, E) bool (default: window > 0).
    ``allocation``: 'dp' or 'uniform'. ``dp_options``: quad_nodes, grid_points of the DP.
    """
    if solve_decode is None:
        from baselines.siftmoe import solve_decode
    gain = np.asarray(path_gain, dtype=np.float64)
    if gain.ndim != 2:
        raise ValueError(f"path_gain must have shape (B, E), got {gain.shape}")
    window = np.broadcast_to(np.asarray(window_s, dtype=np.float64), gain.shape)
    fading = np.asarray(fading, dtype=np.float64)
    if fading.ndim != 3 or fading.shape[:2] != gain.shape:
        raise ValueError(f"fading must have shape (B, E, S) = {gain.shape + ('S',)}, got {fading.shape}")
    S = fading.shape[2]
    ok = window > 0
    feasible = ok if feasible is None else (np.asarray(feasible, dtype=bool) & ok)
    safe_window = np.where(ok, window, 1.0)
    sur = np.where(feasible, surrogate_energy(bits, safe_window, gain, bandwidth_hz, noise_psd_w_hz, m), np.inf)
    mask = np.asarray(solve_decode(np.where(feasible, sur, 0.0), feasible, deviation_table,
                                   np.broadcast_to(np.asarray(budget, dtype=np.float64), gain.shape[:1])), dtype=bool)
    sent = np.where(mask, float(bits), 0.0)
    expected = expected_energy(allocation, sent, safe_window, gain, bandwidth_hz, noise_psd_w_hz, m, S, **dp_options)
    outcome = allocate_bits(allocation, sent, safe_window, gain, fading, bandwidth_hz, noise_psd_w_hz, m, **dp_options)
    return FastFadingResult(mask=mask, surrogate_energy=sur, expected_energy=np.where(mask, expected, 0.0).sum(axis=1),
                            realised_energy=outcome.energy.sum(axis=1), outcome=outcome)
