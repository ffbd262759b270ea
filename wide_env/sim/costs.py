"""Cost of executing one expert for one token: uplink, helper, downlink; energy and latency (docs/model.md#expert-cost).

Pure numpy, batched over any leading axes. Units: bits, seconds, hertz, watts, joules; gains are linear
power gains (path gain times fading), noise is a power spectral density in W/Hz.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def shannon_rate(power_w, gain, bandwidth_hz: float, noise_psd_w_hz: float):
    """r = B log2(1 + p g / (N0 B)) in bit/s [std]."""
    snr = np.asarray(power_w) * np.asarray(gain) / (noise_psd_w_hz * bandwidth_hz)
    return bandwidth_hz * np.log2(1.0 + snr)


def inversion_power(bits: float, window_s, gain, bandwidth_hz: float, noise_psd_w_hz: float):
    """Least transmit power that sends ``bits`` in ``window_s`` (channel inversion): p = (N0 B / g)(2^(D/(B tau)) - 1)."""
    window = np.asarray(window_s, dtype=np.float64)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        spectral = bits / (bandwidth_hz * window)
        power = noise_psd_w_hz * bandwidth_hz / np.asarray(gain) * np.expm1(spectral * np.log(2.0))
    return np.where(window > 0, power, np.inf)


def inversion_energy(bits: float, window_s, gain, bandwidth_hz: float, noise_psd_w_hz: float):
    """E = tau * (N0 B / g) * (2^(D/(B tau)) - 1): the least uplink energy over the whole window [std]."""
    return np.asarray(window_s) * inversion_power(bits, window_s, gain, bandwidth_hz, noise_psd_w_hz)


@dataclass(frozen=True)
class LinkCosts:
    """Per-link costs (arrays of the link shape) of one expert call."""

    uplink_energy: np.ndarray  # J, user radio
    downlink_energy: np.ndarray  # J, helper radio
    compute_energy: np.ndarray  # J, helper (or device) load + compute
    uplink_time: np.ndarray  # s
    downlink_time: np.ndarray  # s
    latency: np.ndarray  # s, T_j = max(t_ul, t_load) + t_comp + t_dl
    uplink_power: np.ndarray  # W actually used by the user


def link_costs(gain, *, bits: float, bandwidth_hz: float, noise_psd_w_hz: float, user_max_power_w: float,
               helper_power_w: float, deadline_s: float, load_time_s: float, compute_time_s: float,
               helper_compute_power_w: float, uplink_model: str, queue_delay_s=0.0) -> LinkCosts:
    """Costs of one remote expert call over links with power gains ``gain`` (any shape).

    ``inversion``: the uplink spreads over the window tau = T_max - t_comp - t_dl with the least power;
    if that power exceeds p_max (or tau <= 0) the user sends at p_max instead, which takes D/r > tau,
    so the expert misses the deadline and its energy is still spent (docs/model.md#latency).
    ``fixed``: p_max, t_ul = D / r.
    ``queue_delay_s`` (broadcastable to ``gain``) delays the helper's load: helpers shared with others.
    """
    gain = np.asarray(gain, dtype=np.float64)
    rate_dl = shannon_rate(helper_power_w, gain, bandwidth_hz, noise_psd_w_hz)
    t_dl = bits / rate_dl
    if uplink_model == "inversion":
        window = deadline_s - compute_time_s - t_dl
        power = inversion_power(bits, window, gain, bandwidth_hz, noise_psd_w_hz)
        feasible = power <= user_max_power_w
        p_ul, t_ul = power, window  # both shaped like gain
        if not feasible.all():  # usually a few links: the p_max rate only where it is needed
            infeasible = ~feasible
            p_ul = np.where(feasible, power, user_max_power_w)
            t_ul = window.copy()
            t_ul[infeasible] = bits / shannon_rate(user_max_power_w, gain[infeasible], bandwidth_hz, noise_psd_w_hz)
    elif uplink_model == "fixed":
        p_ul = np.full_like(gain, user_max_power_w)
        t_ul = bits / shannon_rate(user_max_power_w, gain, bandwidth_hz, noise_psd_w_hz)
    else:
        raise ValueError(f"unknown uplink_model {uplink_model!r}; choose 'inversion' or 'fixed'")
    load = float(load_time_s)
    latency = np.maximum(t_ul, np.asarray(queue_delay_s) + load) + compute_time_s + t_dl
    return LinkCosts(
        uplink_energy=p_ul * t_ul,
        downlink_energy=helper_power_w * t_dl,
        compute_energy=np.full_like(gain, helper_compute_power_w * (load + compute_time_s)),
        uplink_time=t_ul,
        downlink_time=t_dl,
        latency=latency,
        uplink_power=p_ul,
    )
