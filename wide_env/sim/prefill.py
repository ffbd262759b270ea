"""Batched prefilling simulator: one MoE layer over a prompt of T tokens per step (docs/model.md#prefill).

In prefilling the user device holds the hidden states of all T prompt tokens at a layer at once, so the
tokens routed to the same helper are sent together [paper]: helper n receives the hidden states of the
``u_n`` distinct tokens that execute at least one of its experts (``u_n * D`` bits, one uplink within the
layer deadline) and returns one output per executed (token, expert) pair (``p_n * D`` bits). With the
``inversion`` uplink the energy ``tau (N0 B / g)(2^(u_n D/(B tau)) - 1)`` is convex in the load.

Choices [choice], documented here and in the env docstring:

* A helper runs its executed experts one after the other on one accelerator: with ``k_n`` experts it
  spends ``k_n * t_load`` loading (overlapping the uplink, after its queueing delay) and ``k_n * t_comp``
  computing; ``t_comp`` is per expert per batch, since a batch of a few tokens is memory bound (weights
  are read once). The inversion window is ``tau_n = T_max - k_n t_comp - t_dl(p_n D)``.
* Channel: the prompt is the unit of time. Fading (and mobility, by ``channel.token_interval_s``)
  advances once per prompt, and per layer too when ``channel.fading_per_layer`` is true.
* A late helper (latency > T_max, enforcement on) loses all its pairs; their energy is still spent.

Shapes: B episodes, T prompt tokens, L layers, E experts, K Top-K, N helpers (node 0 = the device).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from wide_env.config import WideConfig
from wide_env.gating.base import GatingSource, TokenGates
from wide_env.sim.channel import draw_helpers, move_random_waypoint, path_gain
from wide_env.sim.costs import LinkCosts, inversion_power, shannon_rate
from wide_env.sim.decode import DecodeSimulator
from wide_env.sim.deviation import budget_overrun, serve_slots
from wide_env.sim.observation import (GAIN_DB_HIGH, GAIN_DB_LOW, MAX_DEVIATION, MAX_ENERGY_COST, MAX_LATENCY_RATIO,
                                      prefill_observation_layout)
from wide_env.sim.units import linear_to_db

SCOPES = ("uplink", "comm", "system")


def prefill_costs(gain, *, uplink_bits, downlink_bits, n_experts_run, bandwidth_hz: float, noise_psd_w_hz: float,
                  user_max_power_w: float, helper_power_w: float, deadline_s: float, load_time_s: float,
                  compute_time_s: float, helper_compute_power_w: float, uplink_model: str,
                  queue_delay_s=0.0) -> LinkCosts:
    """Costs of one helper serving a batch of prompt tokens at one layer (arrays broadcast together).

    ``uplink_bits`` = u D (distinct tokens' hidden states), ``downlink_bits`` = p D (one output per
    executed pair), ``n_experts_run`` = k. Links with nothing to send cost nothing and take no time.
    Same physics as :func:`wide_env.sim.costs.link_costs` (which is the case u = p = k = 1): inversion
    over tau = T_max - k t_comp - t_dl, falling back to p_max (late) when the needed power exceeds it;
    ``fixed``: p_max, t_ul = u D / r. Latency max(t_ul, q + k t_load) + k t_comp + t_dl.
    """
    gain = np.asarray(gain, dtype=np.float64)
    up = np.asarray(uplink_bits, dtype=np.float64)
    down = np.asarray(downlink_bits, dtype=np.float64)
    k = np.asarray(n_experts_run, dtype=np.float64)
    shape = np.broadcast_shapes(gain.shape, up.shape, down.shape, k.shape, np.shape(queue_delay_s))
    gain, up, down, k = (np.broadcast_to(a, shape) for a in (gain, up, down, k))
    active = (up > 0) | (k > 0)
    rate_dl = shannon_rate(helper_power_w, gain, bandwidth_hz, noise_psd_w_hz)
    t_dl = down / rate_dl
    t_comp = k * compute_time_s
    t_load = k * load_time_s
    rate_ul_max = shannon_rate(user_max_power_w, gain, bandwidth_hz, noise_psd_w_hz)
    t_ul_max_power = up / rate_ul_max
    if uplink_model == "inversion":
        window = deadline_s - t_comp - t_dl
        power = np.where(up > 0, inversion_power(up, window, gain, bandwidth_hz, noise_psd_w_hz), 0.0)
        feasible = power <= user_max_power_w
        p_ul = np.where(feasible, power, user_max_power_w)
        t_ul = np.where(up > 0, np.where(feasible, window, t_ul_max_power), 0.0)
    elif uplink_model == "fixed":
        p_ul = np.where(up > 0, user_max_power_w, 0.0)
        t_ul = t_ul_max_power
    else:
        raise ValueError(f"unknown uplink_model {uplink_model!r}; choose 'inversion' or 'fixed'")
    queue = np.where(active, np.asarray(queue_delay_s, dtype=np.float64), 0.0)
    latency = np.where(active, np.maximum(t_ul, queue + t_load) + t_comp + t_dl, 0.0)
    return LinkCosts(
        uplink_energy=p_ul * t_ul,
        downlink_energy=helper_power_w * t_dl,
        compute_energy=helper_compute_power_w * (t_load + t_comp),
        uplink_time=t_ul, downlink_time=t_dl, latency=latency, uplink_power=p_ul)


@dataclass
class PrefillPlan:
    """One prompt in every layer (computed once per prompt, or per layer with per-layer fading)."""

    topk_mask: np.ndarray  # (B, L, T, E) bool
    topk_idx: np.ndarray  # (B, L, T, K)
    topk_weight: np.ndarray  # (B, L, T, K)
    probs: np.ndarray  # (B, L, T, E)
    deviation_table: np.ndarray  # (B, L, T, K, E+1) weighted, budget units x eps
    load_energy_scopes: np.ndarray  # (B, L, 3, E, T+1) J of expert e alone on its node with n tokens
    load_latency: np.ndarray  # (B, L, E, T+1) s
    topk_energy: np.ndarray  # (B, L) objective-scope energy of executing every Top-K pair
    energy_reference: np.ndarray  # (B, L)
    queue: np.ndarray  # (B, N+1) s (node 0 = device: 0)
    channel_gain: np.ndarray  # (B, N)
    channel_gain_db: np.ndarray  # (B, N)


@dataclass
class PrefillState:
    positions: np.ndarray  # (B, N, 2)
    waypoints: np.ndarray
    speeds: np.ndarray
    path_gain: np.ndarray  # (B, N)
    fading: np.ndarray  # (B, N, C)
    start: np.ndarray  # (B, n_prompts) trace positions of each prompt's first token
    prompt: np.ndarray  # (B,)
    layer: np.ndarray  # (B,)
    plan: PrefillPlan
    budget_used: np.ndarray  # (B, T) token mode: weighted deviation spent by each token in this prompt
    done: np.ndarray  # (B,)

    @property
    def batch_size(self) -> int:
        return self.prompt.shape[0]


@dataclass
class PrefillView:
    """The current layer of B episodes (arrays with leading axis B)."""

    layer: np.ndarray  # (B,)
    prompt: np.ndarray  # (B,)
    probs: np.ndarray  # (B, T, E)
    topk_idx: np.ndarray  # (B, T, K)
    topk_weight: np.ndarray  # (B, T, K)
    topk_mask: np.ndarray  # (B, T, E)
    deviation_table: np.ndarray  # (B, T, K, E+1) kappa_l w D_l(S, j)
    layer_weight: np.ndarray  # (B,)
    budget: np.ndarray  # (B, T) budget available to each token at this step (weighted units)
    budget_unit: np.ndarray  # (B,) eps_l (layer mode) or the token budget
    load_energy_scopes: np.ndarray  # (B, 3, E, T+1)
    load_energy: np.ndarray  # (B, E, T+1) objective scope
    load_latency: np.ndarray  # (B, E, T+1)
    topk_energy: np.ndarray  # (B,)
    energy_reference: np.ndarray  # (B,)
    queue: np.ndarray  # (B, N+1)
    channel_gain: np.ndarray  # (B, N)
    channel_gain_db: np.ndarray  # (B, N)


class PrefillSimulator:
    """Static prefill scenario plus batched reset / view / evaluate / advance (numpy only).

    Constants (host map, physics, budgets, fading model) are taken from a
    :class:`~wide_env.sim.decode.DecodeSimulator` of the same config, so both phases share one core.
    """

    def __init__(self, config: WideConfig, source: GatingSource, prompt_tokens: int = 8, n_prompts: int = 1):
        for name, value in (("prompt_tokens", prompt_tokens), ("n_prompts", n_prompts)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"argument '{name}' = {value!r} is invalid: expected an integer >= 1")
        self.config = config
        self.source = source
        core = DecodeSimulator(config, source)
        self.core = core
        self.T, self.n_prompts = int(prompt_tokens), int(n_prompts)
        self.n_layers, self.n_experts, self.top_k = core.n_layers, core.n_experts, core.top_k
        self.n_nodes = core.n_nodes
        self.hosts = core.hosts  # (L, E)
        self.bits = core.bits
        self.deadline = core.deadline
        self.enforce_deadline = core.enforce_deadline
        self.scope_index = core.scope_index
        self.budget_mode = core.budget_mode
        self.layer_budget = core.layer_budget
        self.token_budget = core.token_budget
        self.layer_weight = core.layer_weight
        self.weighted_mismatch = core.weighted_mismatch
        self.fading_model = core.fading_model
        # node incidence: onehot[l, e, n] = expert e of layer l lives on node n (0 = device)
        self.onehot = np.zeros((self.n_layers, self.n_experts, self.n_nodes + 1), dtype=bool)
        np.put_along_axis(self.onehot, self.hosts[..., None], True, axis=2)
        self.one_to_one = bool((self.hosts > 0).all() and all(
            len(set(row)) == len(row) for row in self.hosts.tolist()))
        self.layout = prefill_observation_layout(self.T, self.n_experts, self.top_k, self.n_nodes)
        offset, self.obs_slices = 0, {}
        for key, (size, _, _) in self.layout.items():
            self.obs_slices[key] = slice(offset, offset + size)
            offset += size
        self.obs_size = offset
        if config.gating.source == "trace":
            source.valid_starts(self.T)  # raises a clear error if prompts do not fit the trace

    # ---- physics -----------------------------------------------------------------------------------
    def _physics(self, gain, uplink_tokens, pairs, experts_run, queue):
        cfg_c, radio = self.config.compute, self.config.radio
        core = self.core
        return prefill_costs(
            gain, uplink_bits=uplink_tokens * self.bits, downlink_bits=pairs * self.bits, n_experts_run=experts_run,
            bandwidth_hz=radio.bandwidth_hz, noise_psd_w_hz=core.noise_psd, user_max_power_w=core.user_max_power,
            helper_power_w=core.helper_power, deadline_s=self.deadline, load_time_s=cfg_c.load_time_s,
            compute_time_s=cfg_c.compute_time_s, helper_compute_power_w=cfg_c.helper_compute_power_w,
            uplink_model=radio.uplink_model, queue_delay_s=queue)

    def node_costs(self, channel_gain, queue, layer, executed):
        """Per-node energy scopes (lead, 3, N+1) and latency (lead, N+1) of executed masks
        (lead, T, E) at layers ``layer`` (lead ints); ``channel_gain`` (lead, N), ``queue`` (lead, N+1)."""
        comp = self.config.compute
        onehot = self.onehot[layer]  # lead + (E, N+1)
        on_node = executed[..., :, :, None] & onehot[..., None, :, :]  # lead + (T, E, N+1)
        pairs = on_node.sum(axis=(-3, -2))  # lead + (N+1,)
        tokens = on_node.any(axis=-2).sum(axis=-2)
        experts = on_node.any(axis=-3).sum(axis=-2)
        c = self._physics(channel_gain, tokens[..., 1:], pairs[..., 1:], experts[..., 1:], queue[..., 1:])
        lead = executed.shape[:-2]
        scopes = np.zeros(lead + (3, self.n_nodes + 1))
        scopes[..., 0, 1:] = c.uplink_energy
        scopes[..., 1, 1:] = c.uplink_energy + c.downlink_energy
        scopes[..., 2, 1:] = scopes[..., 1, 1:] + c.compute_energy
        local_time = experts[..., 0] * (comp.load_time_s + comp.compute_time_s)
        scopes[..., 2, 0] = comp.local_compute_power_w * local_time
        latency = np.zeros(lead + (self.n_nodes + 1,))
        latency[..., 1:] = c.latency
        latency[..., 0] = local_time
        return scopes, latency

    # ---- episodes ----------------------------------------------------------------------------------
    def reset(self, rng: np.random.Generator, batch: int) -> PrefillState:
        N = self.n_nodes
        positions, waypoints, speeds, gain = draw_helpers(rng, batch, N, self.config.placement, self.config.channel)
        fading = self.fading_model.init(rng, (batch, N))
        start = self.source.start(rng, batch * self.n_prompts, self.T).reshape(batch, self.n_prompts)
        state = PrefillState(
            positions=positions, waypoints=waypoints, speeds=speeds, path_gain=gain, fading=fading, start=start,
            prompt=np.zeros(batch, dtype=np.int64), layer=np.zeros(batch, dtype=np.int64), plan=None,
            budget_used=np.zeros((batch, self.T)), done=np.zeros(batch, dtype=bool))
        state.plan = self._plan(rng, gain * self.fading_model.gain(fading), self._gates(rng, start[:, 0]))
        return state

    def _gates(self, rng, first: np.ndarray) -> TokenGates:
        """Gating of the T prompt tokens starting at trace positions ``first`` (B,): arrays (B, T, L, ...)."""
        B = first.shape[0]
        positions = (first[:, None] + np.arange(self.T)[None, :]).reshape(-1)
        g = self.source.gates(positions, rng)
        shape = (B, self.T) + g.probs.shape[1:]
        return TokenGates(g.probs.reshape(shape), g.topk_idx.reshape((B, self.T) + g.topk_idx.shape[1:]),
                          g.topk_weight.reshape((B, self.T) + g.topk_weight.shape[1:]))

    def _plan(self, rng, channel_gain: np.ndarray, gates: TokenGates) -> PrefillPlan:
        comp = self.config.compute
        B, N, L, E, T = channel_gain.shape[0], self.n_nodes, self.n_layers, self.n_experts, self.T
        queue = np.zeros((B, N + 1))
        if comp.queue_delay_mean_s > 0:
            queue[:, 1:] = rng.exponential(comp.queue_delay_mean_s, size=(B, N))
        probs = gates.probs.transpose(0, 2, 1, 3).astype(np.float64)  # (B, L, T, E)
        idx = gates.topk_idx.transpose(0, 2, 1, 3)
        weight = gates.topk_weight.transpose(0, 2, 1, 3).astype(np.float64)
        topk_mask = np.zeros((B, L, T, E), dtype=bool)
        np.put_along_axis(topk_mask, idx, True, axis=-1)
        table = self.weighted_mismatch[np.arange(L)[None, :, None, None], idx] * weight[..., None]
        # stand-alone load tables: expert e alone on its node with n = 0..T tokens
        n = np.arange(T + 1, dtype=np.float64)
        c = self._physics(channel_gain[:, :, None], n, n, (n > 0).astype(np.float64), queue[:, 1:, None])
        node_scopes = np.zeros((B, 3, N + 1, T + 1))
        node_scopes[:, 0, 1:] = c.uplink_energy
        node_scopes[:, 1, 1:] = c.uplink_energy + c.downlink_energy
        node_scopes[:, 2, 1:] = node_scopes[:, 1, 1:] + c.compute_energy
        local_time = (n > 0) * (comp.load_time_s + comp.compute_time_s)
        node_scopes[:, 2, 0] = comp.local_compute_power_w * local_time
        node_latency = np.zeros((B, N + 1, T + 1))
        node_latency[:, 1:] = c.latency
        node_latency[:, 0] = local_time
        load_scopes = node_scopes[:, :, self.hosts].transpose(0, 2, 1, 3, 4)  # (B, L, 3, E, T+1)
        load_latency = node_latency[:, self.hosts]  # (B, L, E, T+1)
        layers = np.broadcast_to(np.arange(L), (B, L))
        scopes, _ = self.node_costs(channel_gain[:, None], queue[:, None], layers, topk_mask)
        topk_energy = scopes[:, :, self.scope_index].sum(axis=-1)
        single = load_scopes[:, :, self.scope_index, :, 1]
        reference = np.where(topk_energy > 0, topk_energy, single.mean(axis=-1))
        reference = np.where(reference > 0, reference, 1.0)
        return PrefillPlan(topk_mask=topk_mask, topk_idx=idx, topk_weight=weight, probs=probs, deviation_table=table,
                           load_energy_scopes=load_scopes, load_latency=load_latency, topk_energy=topk_energy,
                           energy_reference=reference, queue=queue, channel_gain=channel_gain,
                           channel_gain_db=linear_to_db(channel_gain))

    def view(self, state: PrefillState) -> PrefillView:
        rows, layer = np.arange(state.batch_size), state.layer
        p = state.plan
        sel = (rows, layer)
        if self.budget_mode == "layer":
            budget = np.broadcast_to(self.layer_budget[layer][:, None], (state.batch_size, self.T)).copy()
            unit = self.layer_budget[layer]
        else:
            budget = self.token_budget - state.budget_used
            unit = np.full(state.batch_size, self.token_budget)
        scopes = p.load_energy_scopes[sel]
        return PrefillView(
            layer=layer.copy(), prompt=state.prompt.copy(), probs=p.probs[sel], topk_idx=p.topk_idx[sel],
            topk_weight=p.topk_weight[sel], topk_mask=p.topk_mask[sel], deviation_table=p.deviation_table[sel],
            layer_weight=self.layer_weight[layer], budget=budget, budget_unit=unit, load_energy_scopes=scopes,
            load_energy=scopes[:, self.scope_index], load_latency=p.load_latency[sel], topk_energy=p.topk_energy[sel],
            energy_reference=p.energy_reference[sel], queue=p.queue, channel_gain=p.channel_gain,
            channel_gain_db=p.channel_gain_db)

    def observation(self, view: PrefillView) -> np.ndarray:
        """Flat float32 observations (B, D) in layout order."""
        B, T, E = view.probs.shape
        s = self.obs_slices
        out = np.zeros((B, self.obs_size), dtype=np.float32)
        out[:, s["gate_probs"]] = np.clip(view.probs, 0.0, 1.0).reshape(B, -1)
        out[:, s["topk_mask"]] = view.topk_mask.reshape(B, -1)
        w = np.zeros((B, T, E))
        np.put_along_axis(w, view.topk_idx, view.topk_weight, axis=-1)
        out[:, s["topk_weight"]] = np.clip(w, 0.0, 1.0).reshape(B, -1)
        out[:, s["channel_gain_db"]] = np.clip(view.channel_gain_db, GAIN_DB_LOW, GAIN_DB_HIGH)
        cost = view.load_energy[:, :, 1:] / view.energy_reference[:, None, None]
        out[:, s["load_energy_cost"]] = np.clip(cost, 0.0, MAX_ENERGY_COST).reshape(B, -1)
        lat = view.load_latency[:, :, 1:] / self.deadline
        out[:, s["load_latency_ratio"]] = np.clip(lat, 0.0, MAX_LATENCY_RATIO).reshape(B, -1)
        dev = view.deviation_table / view.budget_unit[:, None, None, None]
        out[:, s["deviation_table"]] = np.clip(dev, 0.0, MAX_DEVIATION).reshape(B, -1)
        out[:, s["budget_remaining"]] = np.clip(view.budget / view.budget_unit[:, None], 0.0, MAX_DEVIATION)
        pos = s["position"].start
        out[:, pos] = view.layer / max(self.n_layers - 1, 1)
        out[:, pos + 1] = view.prompt / max(self.n_prompts - 1, 1)
        return out

    def evaluate(self, view: PrefillView, executed: np.ndarray) -> dict[str, np.ndarray]:
        """Outcomes of (B, T, E) bool execution masks at the current layers; no state change."""
        scopes, latency = self.node_costs(view.channel_gain, view.queue, view.layer, executed)
        late_node = latency > self.deadline * (1.0 + 1e-9)  # (B, N+1)
        onehot = self.onehot[view.layer]  # (B, E, N+1)
        late_expert = (onehot & late_node[:, None, :]).any(axis=-1)  # (B, E)
        late_pairs = executed & late_expert[:, None, :]
        lost = late_pairs if self.enforce_deadline else np.zeros_like(executed)
        effective = executed & ~lost
        energy_scopes = scopes.sum(axis=-1)  # (B, 3)
        energy = energy_scopes[:, self.scope_index]
        weighted, server = serve_slots(view.deviation_table, effective)  # (B, T), (B, T, K)
        n_kept = (server == view.topk_idx).sum(axis=(-1, -2))
        n_skipped = (server == self.n_experts).sum(axis=(-1, -2))
        ran = (executed[:, :, :, None] & onehot[:, None]).any(axis=(1, 2))  # (B, N+1) node used
        misses = (ran & late_node).sum(axis=-1)
        unit = view.budget_unit[:, None]
        violated, overrun = budget_overrun(weighted, np.maximum(view.budget, 0.0), unit)
        rw = self.config.reward
        reward_energy = -energy / view.energy_reference
        reward_deviation = -rw.deviation_weight * overrun.mean(axis=-1)
        reward_deadline = -rw.deadline_weight * misses * self.enforce_deadline
        dev = weighted / view.layer_weight[:, None]
        return {
            "reward": reward_energy + reward_deviation + reward_deadline,
            "reward_energy": reward_energy,
            "reward_deviation": reward_deviation,
            "reward_deadline": reward_deadline,
            "energy_j": energy,
            "topk_energy_j": view.topk_energy,
            "energy_uplink_j": energy_scopes[:, 0],
            "energy_comm_j": energy_scopes[:, 1],
            "energy_system_j": energy_scopes[:, 2],
            "deviation": dev.max(axis=-1),
            "deviation_mean": dev.mean(axis=-1),
            "weighted_deviation": weighted.max(axis=-1),
            "deviation_budget": view.budget.min(axis=-1),
            "budget_violated": violated.sum(axis=-1),
            "latency_s": np.where(ran, latency, 0.0).max(axis=-1),
            "deadline_misses": misses,
            "n_executed": executed.sum(axis=(-1, -2)),
            "n_lost": lost.sum(axis=(-1, -2)),
            "n_kept": n_kept,
            "n_replaced": self.T * self.top_k - n_kept - n_skipped,
            "n_skipped": n_skipped,
            "n_helpers_used": ran[:, 1:].sum(axis=-1),
            "token_weighted_deviation": weighted,
            "server": server,
        }

    def advance(self, rng: np.random.Generator, state: PrefillState, token_weighted_deviation: np.ndarray) -> np.ndarray:
        """Move every episode past its current layer; returns the (B,) truncation flags."""
        if self.budget_mode == "token":
            state.budget_used += token_weighted_deviation
        layer = state.layer + 1
        new_prompt = layer >= self.n_layers
        last = new_prompt & (state.prompt + 1 >= self.n_prompts)
        state.done = state.done | last
        advance = new_prompt & ~last
        state.layer = np.where(last, self.n_layers - 1, np.where(advance, 0, layer))
        refresh = advance | (~new_prompt if self.config.channel.fading_per_layer else np.zeros_like(advance))
        if advance.any():
            state.prompt[advance] += 1
            state.budget_used[advance] = 0.0
        if refresh.any():
            self._new_channel(rng, state, np.flatnonzero(refresh), np.flatnonzero(advance))
        return state.done

    def _new_channel(self, rng, state: PrefillState, rows: np.ndarray, new_prompt_rows: np.ndarray) -> None:
        """Fading step for ``rows``; mobility for rows starting a new prompt; re-plan those rows."""
        state.fading[rows] = self.fading_model.advance(rng, state.fading[rows])
        pl, ch = self.config.placement, self.config.channel
        if pl.mobility and new_prompt_rows.size:
            r = new_prompt_rows
            pos, wp, sp = move_random_waypoint(rng, state.positions[r], state.waypoints[r], state.speeds[r],
                                               ch.token_interval_s, pl.r_min_m, pl.r_max_m,
                                               (pl.speed_min_mps, pl.speed_max_mps))
            state.positions[r], state.waypoints[r], state.speeds[r] = pos, wp, sp
            state.path_gain[r] = path_gain(np.linalg.norm(pos, axis=-1), ch.path_loss_exponent, ch.reference_gain_db)
        gain = state.path_gain[rows] * self.fading_model.gain(state.fading[rows])
        first = state.start[rows, state.prompt[rows]]
        gates = self._gates(rng, first)
        old = state.plan
        fresh = self._plan(rng, gain, gates)
        # per-layer refresh inside a prompt keeps the prompt's gating (synthetic sources redraw tokens)
        keep = np.isin(rows, new_prompt_rows, invert=True)
        if keep.any():
            for name in ("topk_mask", "topk_idx", "topk_weight", "probs", "deviation_table"):
                getattr(fresh, name)[keep] = getattr(old, name)[rows[keep]]
            layers = np.broadcast_to(np.arange(self.n_layers), (int(keep.sum()), self.n_layers))
            scopes, _ = self.node_costs(gain[keep][:, None], fresh.queue[keep][:, None], layers,
                                        fresh.topk_mask[keep])
            topk = scopes[:, :, self.scope_index].sum(axis=-1)
            single = fresh.load_energy_scopes[keep][:, :, self.scope_index, :, 1]
            ref = np.where(topk > 0, topk, single.mean(axis=-1))
            fresh.topk_energy[keep] = topk
            fresh.energy_reference[keep] = np.where(ref > 0, ref, 1.0)
        for f in dataclasses.fields(old):
            getattr(old, f.name)[rows] = getattr(fresh, f.name)
