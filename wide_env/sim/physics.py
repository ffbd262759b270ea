"""The physics of an expert call, once for both phases: radio formulas, the cost of a node serving a load,
energy scopes, the expert -> node map and the Top-K reference energy (docs/model.md, "Cost of an expert call").

Pure numpy, batched over any leading axes. Units: bits, seconds, hertz, watts, joules; gains are linear power
gains (path gain times fading), noise is a power spectral density in W/Hz. Node 0 is the user device (no
radio); nodes 1..N are helpers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: energy scopes, in the order of every ``(..., 3, ...)`` scope axis: user radio, + downlink, + compute
SCOPES = ("uplink", "comm", "system")


# ---- radio formulas [std] ------------------------------------------------------------------------------
def shannon_rate(power_w, gain, bandwidth_hz: float, noise_psd_w_hz: float):
    """r = B log2(1 + p g / (N0 B)) in bit/s [std]."""
    snr = np.asarray(power_w) * np.asarray(gain) / (noise_psd_w_hz * bandwidth_hz)
    return bandwidth_hz * np.log2(1.0 + snr)


def inversion_power(bits, window_s, gain, bandwidth_hz: float, noise_psd_w_hz: float):
    """Least transmit power that sends ``bits`` in ``window_s`` (channel inversion): p = (N0 B / g)(2^(D/(B tau)) - 1);
    inf where the window is empty."""
    window = np.asarray(window_s, dtype=np.float64)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        spectral = np.asarray(bits) / (bandwidth_hz * window)
        power = noise_psd_w_hz * bandwidth_hz / np.asarray(gain) * np.expm1(spectral * np.log(2.0))
    return np.where(window > 0, power, np.inf)


def inversion_energy(bits, window_s, gain, bandwidth_hz: float, noise_psd_w_hz: float):
    """E = tau (N0 B / g)(2^(D/(B tau)) - 1): the least uplink energy over the whole window [std]."""
    return np.asarray(window_s) * inversion_power(bits, window_s, gain, bandwidth_hz, noise_psd_w_hz)


# ---- one node serving a load ---------------------------------------------------------------------------
@dataclass(frozen=True)
class LinkParameters:
    """The constants of every link and node (from the scenario's config, in SI units)."""

    bits: float  # payload of one hidden state, D = d_model x bits per element
    bandwidth_hz: float
    noise_psd_w_hz: float  # N0 x the receiver's noise figure
    user_max_power_w: float
    helper_power_w: float
    deadline_s: float
    load_time_s: float
    compute_time_s: float
    helper_compute_power_w: float
    local_compute_power_w: float
    uplink_model: str  # "inversion" or "fixed"
    user_min_power_w: float = 0.0  # the device's least output power (3GPP UE: -40 dBm); 0 = none [paper]
    pa_efficiency: float = 1.0  # eta: radiated / drawn power of the device's amplifier; 1 = radiated energy [paper]
    circuit_power_w: float = 0.0  # drawn by the device's transmit chain while it sends; 0 [paper]


@dataclass(frozen=True)
class LinkCosts:
    """Costs of one helper serving its load (arrays of the link shape)."""

    uplink_energy: np.ndarray  # J, user radio
    downlink_energy: np.ndarray  # J, helper radio
    compute_energy: np.ndarray  # J, helper load + compute
    uplink_time: np.ndarray  # s
    downlink_time: np.ndarray  # s
    latency: np.ndarray  # s, max(t_ul, queue + k t_load) + k t_comp + t_dl
    uplink_power: np.ndarray  # W actually used by the user


def node_costs(gain, link: LinkParameters, *, uplink_payloads=1, downlink_payloads=1, experts=1,
               queue_delay_s=0.0) -> LinkCosts:
    """Costs of helpers with power gains ``gain`` serving ``uplink_payloads`` hidden states up, returning
    ``downlink_payloads`` outputs and running ``experts`` experts (all broadcast together; decoding is the
    load 1, 1, 1; a prefill helper aggregates a layer's tokens). Helpers with nothing to do cost nothing.

    ``inversion``: the least-energy transmission within the window tau = T_max - k t_comp - t_dl [std]. With
    radiated energy only (the paper's link budget) that spreads the bits over the whole window; with a
    transmit chain drawing P_c while it sends (and an amplifier of efficiency eta) the energy
    (p(t)/eta + P_c) t, p(t) = (N0 B / g)(2^(D/(B t)) - 1), is least at t* (:func:`efficient_uplink_time`),
    so the user sends for min(tau, t*), at least for D/r(p_max); at a power below the device's least output
    p_min it sends at p_min, for D/r(p_min). If even p_max needs longer than tau (or tau <= 0) the user sends
    at p_max for D/r(p_max) > tau: the call misses the deadline and its energy is still spent.
    ``fixed``: p_max, t_ul = D_up / r. The helper loads its experts after its queueing delay, overlapping the
    uplink [paper]: latency max(t_ul, q + k t_load) + k t_comp + t_dl (:func:`call_latency`)."""
    gain = np.asarray(gain, dtype=np.float64)
    unit = _is_one(uplink_payloads) and _is_one(downlink_payloads) and _is_one(experts)
    if unit:  # decoding's load, in Python floats: the same doubles as numpy's 0-d arrays, without their overhead
        up_bits = down_bits = link.bits
        k = 1.0
    else:
        up_bits = link.bits * np.asarray(uplink_payloads, dtype=np.float64)
        down_bits = link.bits * np.asarray(downlink_payloads, dtype=np.float64)
        k = np.asarray(experts, dtype=np.float64)
    B, N0 = link.bandwidth_hz, link.noise_psd_w_hz
    t_dl = down_bits / shannon_rate(link.helper_power_w, gain, B, N0)
    t_comp = k * link.compute_time_s
    if link.uplink_model == "inversion":
        window = link.deadline_s - t_comp - t_dl
        if unit:  # decoding's load: the window has the link's shape already
            t_ul = np.array(window, dtype=np.float64)
        else:
            t_ul = np.broadcast_to(window, np.broadcast_shapes(np.shape(window), np.shape(up_bits))).copy()
        if link.circuit_power_w > 0:  # a shorter transmission draws the circuit power for less time
            t_ul = np.minimum(t_ul, efficient_uplink_time(up_bits, gain, link))
        power = inversion_power(up_bits, t_ul, gain, B, N0)
        slow = ~(power <= link.user_max_power_w)  # the window is too short even at p_max (or empty)
        if link.user_min_power_w > 0:
            floor = power < link.user_min_power_w  # below the least output power: send at p_min, faster
            p_ul = np.where(slow, link.user_max_power_w, np.where(floor, link.user_min_power_w, power))
            fixed = slow | floor
        else:  # no least output power (the power is never below 0)
            p_ul = np.where(slow, link.user_max_power_w, power)
            fixed = slow
        if fixed.any():  # usually a few links: their rates only where needed
            rate = shannon_rate(p_ul[fixed], np.broadcast_to(gain, fixed.shape)[fixed], B, N0)
            t_ul[fixed] = np.broadcast_to(up_bits, fixed.shape)[fixed] / rate
    elif link.uplink_model == "fixed":
        t_ul = up_bits / shannon_rate(link.user_max_power_w, gain, B, N0)
        p_ul = np.full(np.shape(t_ul), link.user_max_power_w)
    else:
        raise ValueError(f"unknown uplink_model {link.uplink_model!r}; choose 'inversion' or 'fixed'")
    latency = call_latency(t_ul, t_dl, link, queue_delay_s, k)
    if link.pa_efficiency == 1.0 and link.circuit_power_w == 0.0:  # radiated energy only [paper]: exactly p t
        energy_ul = p_ul * t_ul
    else:
        energy_ul = (p_ul / link.pa_efficiency + link.circuit_power_w) * t_ul
    if not unit:  # idle helpers: no uplink, no time, no energy
        sends, active = up_bits > 0, (up_bits > 0) | (k > 0)
        p_ul, t_ul, energy_ul = np.where(sends, p_ul, 0.0), np.where(sends, t_ul, 0.0), np.where(sends, energy_ul, 0.0)
        latency = np.where(active, latency, 0.0)
    t_load = k * link.load_time_s
    compute = link.helper_compute_power_w * (t_load + t_comp)
    # spread over the link shape (x 1.0 leaves a double as it is: a scalar's fill is the same numbers)
    compute = np.full(gain.shape, compute) if unit else compute * np.ones_like(gain)
    return LinkCosts(uplink_energy=energy_ul, downlink_energy=link.helper_power_w * t_dl,
                     compute_energy=compute,
                     uplink_time=t_ul, downlink_time=t_dl, latency=latency, uplink_power=p_ul)


def _is_one(x) -> bool:
    """x is the scalar 1 (decoding's load; a Python number is checked without numpy's slower scalar test)."""
    return x == 1 if type(x) in (int, float) else bool(np.ndim(x) == 0 and x == 1)


def call_latency(uplink_time, downlink_time, link: LinkParameters, queue_delay_s=0.0, experts=1.0):
    """T = max(t_ul, q + k t_load) + k t_comp + t_dl: the helper loads its k experts after its queueing delay
    q, overlapping the uplink [paper], then computes and sends the outputs back."""
    if type(experts) is not float:  # (a Python float: decoding's one expert, no 0-d array needed)
        experts = np.asarray(experts, dtype=np.float64)
    if type(queue_delay_s) is not float:
        queue_delay_s = np.asarray(queue_delay_s)
    return (np.maximum(uplink_time, queue_delay_s + experts * link.load_time_s) + experts * link.compute_time_s
            + downlink_time)


def efficient_uplink_time(bits, gain, link: LinkParameters):
    """The transmission time t* minimising (p(t)/eta + P_c) t with p(t) = a (2^(D/(B t)) - 1), a = N0 B / g [std].

    Setting the derivative to zero gives 2^x (x ln2 - 1) + 1 = P_c eta / a for the spectral load x = D/(B t),
    i.e. x* = (1 + W0((P_c eta / a - 1) / e)) / ln 2 with the principal Lambert W; t* = D / (B x*), infinite
    without circuit power."""
    a = link.noise_psd_w_hz * link.bandwidth_hz / np.asarray(gain, dtype=np.float64)
    c = link.circuit_power_w * link.pa_efficiency / a
    x = (1.0 + lambert_w0((c - 1.0) / np.e)) / np.log(2.0)
    with np.errstate(divide="ignore"):
        return np.where(x > 0, np.asarray(bits, dtype=np.float64) / (link.bandwidth_hz * np.where(x > 0, x, 1.0)), np.inf)


def lambert_w0(z):
    """Principal branch W0 of the Lambert W function (w e^w = z) for z >= -1/e, by Halley's iteration from a
    branch-point / logarithmic start (relative error below 1e-12 after a few steps)."""
    z = np.asarray(z, dtype=np.float64)
    near = z < 0.0
    p = np.sqrt(np.maximum(2.0 * (np.e * z + 1.0), 0.0))
    w = np.where(near, -1.0 + p - p * p / 3.0, np.log1p(np.maximum(z, 0.0)))  # start: series near -1/e, else log
    w = np.where(z > 3.0, np.log(np.maximum(z, 3.0)) - np.log(np.log(np.maximum(z, 3.0))), w)
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(20):
            ew = np.exp(w)
            f = w * ew - z
            step = f / (ew * (w + 1.0) - (w + 2.0) * f / (2.0 * w + 2.0))
            w = np.where(np.abs(w + 1.0) > 1e-12, w - step, w)  # at the branch point w = -1 exactly
    return w


#: rows of a node cost table: energy in the three scopes (J), then the latency (s)
UPLINK, COMM, SYSTEM, LATENCY = range(4)


def node_cost_table(costs: LinkCosts, link: LinkParameters, uplink_energy=None, local_experts=None,
                    latency=None) -> np.ndarray:
    """(..., 4, N) per helper: energy in the ``uplink`` (user radio), ``comm`` (+ downlink) and ``system``
    (+ compute) scopes, then the latency; from its costs (..., N). ``uplink_energy`` replaces the costs'
    (slotted uplinks spend another uplink energy; the other terms do not change [choice]); ``latency`` replaces
    the costs' (the realised one, with queueing delays). With
    ``local_experts`` (broadcastable to the lead shape) the device comes first as node 0: (..., 4, N+1); it
    spends no radio energy and P_gpu k (t_load + t_comp) in the ``system`` scope, taking k (t_load + t_comp)."""
    up = costs.uplink_energy if uplink_energy is None else uplink_energy
    shape = np.shape(up)
    first = 0 if local_experts is None else 1  # the helpers' first column
    out = np.empty(shape[:-1] + (4, shape[-1] + first))
    helpers = out[..., first:]
    helpers[..., UPLINK, :] = up
    comm = np.add(up, costs.downlink_energy, out=helpers[..., COMM, :])
    np.add(comm, costs.compute_energy, out=helpers[..., SYSTEM, :])
    helpers[..., LATENCY, :] = costs.latency if latency is None else latency
    if local_experts is None:
        return out
    local_time = (link.load_time_s + link.compute_time_s) * np.asarray(local_experts, dtype=np.float64)
    out[..., UPLINK, 0] = out[..., COMM, 0] = 0.0
    out[..., SYSTEM, 0] = link.local_compute_power_w * local_time
    out[..., LATENCY, 0] = local_time
    return out


# ---- experts on nodes ----------------------------------------------------------------------------------
def by_expert(node_values: np.ndarray, hosts: np.ndarray) -> np.ndarray:
    """Node-indexed values (..., N+1) -> expert-indexed (..., E) through one layer's host map ``hosts`` (E,)
    (expert e runs on node hosts[e]; node 0 = the device). A contiguous copy."""
    return np.take(node_values, hosts, axis=-1)


def topk_reference(energy: np.ndarray, topk_idx: np.ndarray):
    """(Top-K energy, reward reference) from expert energies (..., E) and Top-K indices (..., K) (leading axes
    broadcast); see :func:`energy_reference`."""
    lead = np.broadcast_shapes(energy.shape[:-1], topk_idx.shape[:-1])
    E = energy.shape[-1]
    flat = np.ascontiguousarray(np.broadcast_to(energy, lead + (E,))).reshape(-1, E)
    idx = np.broadcast_to(topk_idx, lead + topk_idx.shape[-1:]).reshape(flat.shape[0], -1)
    picked = np.take(flat.reshape(-1), (np.arange(flat.shape[0]) * E)[:, None] + idx)  # one flat gather
    topk_energy = picked[:, 0].copy()
    for k in range(1, picked.shape[1]):  # in slot order
        topk_energy += picked[:, k]
    return topk_energy.reshape(lead), energy_reference(topk_energy.reshape(lead), flat.reshape(lead + (E,)))


def energy_reference(topk_energy: np.ndarray, expert_energy: np.ndarray) -> np.ndarray:
    """The reward's energy unit: the energy of executing the Top-K set (so Top-K scores -1 per step), or, when
    that is 0 (every Top-K expert on the device), the mean energy of one expert call (``expert_energy``
    (..., E)), or 1 J when both are 0."""
    if (topk_energy > 0).all():  # the usual case: every Top-K set costs energy
        return np.array(topk_energy, dtype=np.float64)
    reference = np.where(topk_energy > 0, topk_energy, expert_energy.mean(axis=-1))
    return np.where(reference > 0, reference, 1.0)
