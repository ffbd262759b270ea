"""Batched decoding simulator: B independent WIDE episodes stepped in lockstep by numpy (no gymnasium).

One step is one MoE layer of one generated token. :class:`DecodeSimulator` holds everything static
(config, gating source, host map, physical constants); :class:`DecodeState` holds the per-episode
arrays with a leading batch axis B. The single env, the vector env and fast evaluators all drive the
same three calls: :meth:`DecodeSimulator.reset`, :meth:`DecodeSimulator.view` (what a policy may see
at the current layer) and :meth:`DecodeSimulator.step` (apply masks, return outcomes, advance).
"""

from __future__ import annotations

import dataclasses
from itertools import compress
from dataclasses import dataclass

import numpy as np

from wide_env.config import WideConfig
from wide_env.gating.base import GatingSource, TokenGates
from wide_env.sim.channel import NakagamiFading, draw_helpers, move_random_waypoint, path_gain
from wide_env.sim import slots
from wide_env.sim.costs import link_costs
from wide_env.sim.deviation import serve_slots, slot_deviation_table
from wide_env.sim.observation import MAX_DEVIATION, build_static_observation, observation_layout, observation_slices
from wide_env.sim.units import dbm_to_watt, linear_to_db

SCOPES = ("uplink", "comm", "system")


# Layer-steps planned ahead in one batched call (all envs x tokens x layers): amortises numpy's per-call
# overhead over many steps while bounding memory for large vector envs.
PLAN_LAYER_STEPS = 32768


@dataclass
class TokenPlan:
    """The next C tokens of every episode in every layer, computed in one batched call.
    Axes (B, C, L, ...): batch, token within the chunk, layer. E experts, K Top-K, N helpers."""

    probs: np.ndarray  # (B, C, L, E)
    topk_idx: np.ndarray  # (B, C, L, K)
    topk_weight: np.ndarray  # (B, C, L, K)
    topk_mask: np.ndarray  # (B, C, L, E) bool
    energy_scopes: np.ndarray  # (B, C, L, 3, E) J per expert call: uplink / comm / system scope
    observed_energy_scopes: np.ndarray  # what the observation shows: the same array unless the uplink is slotted
    latency: np.ndarray  # (B, C, L, E) s
    meets_deadline: np.ndarray  # (B, C, L, E) bool
    deviation_table: np.ndarray  # (B, C, L, K, E+1) kappa_l * w_k * D_l(S_k, j)
    topk_energy: np.ndarray  # (B, C, L)
    energy_reference: np.ndarray  # (B, C, L)
    channel_gain_db: np.ndarray  # (B, C, Lf, N), Lf = L with per-layer fading, else 1
    helper_positions: np.ndarray  # (B, C, N, 2) m, where the helpers are at each token
    obs_static: np.ndarray  # (B, C, L, D) float32 observation without budget and position


@dataclass
class DecodeState:
    """Per-episode arrays (leading axis B). The channel arrays describe the last planned token."""

    positions: np.ndarray  # (B, N, 2) helper positions, m
    waypoints: np.ndarray  # (B, N, 2) mobility targets
    speeds: np.ndarray  # (B, N) m/s
    path_gain: np.ndarray  # (B, N) linear
    fading: np.ndarray  # (B, N, C) fading components
    start: np.ndarray  # (B,) trace position of token 0
    token: np.ndarray  # (B,) token index within the episode
    layer: np.ndarray  # (B,) current MoE layer
    chunk_start: np.ndarray  # (B,) token index of plan[:, 0]
    plan: TokenPlan
    budget_used: np.ndarray  # (B,) weighted deviation spent this token (token mode)
    done: np.ndarray  # (B,) episode over (truncated)
    # real-accuracy bookkeeping of the current token (sources with effect tables)
    perturbed_same: np.ndarray = None  # (B,) every perturbation so far kept the full model's prediction
    perturbed_correct: np.ndarray = None  # (B,) every perturbation so far kept the prediction correct
    delta_loss: np.ndarray = None  # (B,) summed single-perturbation loss changes, nats
    chunk_id: int = 0  # bumped whenever any row is re-planned (lets front ends cache per-chunk data)

    @property
    def batch_size(self) -> int:
        return self.token.shape[0]

    @property
    def chunk_tokens(self) -> int:
        return self.plan.probs.shape[1]


@dataclass
class LayerView:
    """The current layer of each episode: arrays with leading axes ``lead`` = (B,) for a batch, or ()
    for one episode (then the arrays are views into the plan, not copies). E experts, K Top-K."""

    layer: np.ndarray  # lead, int
    token: np.ndarray  # lead, int
    probs: np.ndarray  # lead + (E,)
    topk_idx: np.ndarray  # lead + (K,)
    topk_weight: np.ndarray  # lead + (K,)
    topk_mask: np.ndarray  # lead + (E,) bool
    energy_scopes: np.ndarray  # lead + (3, E) J of executing each expert: uplink / comm / system scope
    energy: np.ndarray  # lead + (E,) objective-scope energy, J
    latency: np.ndarray  # lead + (E,) s
    meets_deadline: np.ndarray  # lead + (E,) bool
    deviation_table: np.ndarray  # lead + (K, E+1) kappa_l * w_k * D_l(S_k, j), model units
    layer_weight: np.ndarray  # lead, kappa_l (1 in layer mode)
    budget: np.ndarray  # lead, budget available to this step (weighted units)
    budget_unit: np.ndarray  # lead, eps_l (layer mode) or the token budget (token mode)
    topk_energy: np.ndarray  # lead, objective-scope energy of the Top-K set, J
    energy_reference: np.ndarray  # lead, denominator of the reward's energy term
    channel_gain_db: np.ndarray  # lead + (N,)
    obs_static: np.ndarray  # lead + (D,) float32 observation without budget and position


class DecodeSimulator:
    """Static description of a decoding scenario plus batched reset / view / evaluate / step."""

    def __init__(self, config: WideConfig, source: GatingSource):
        self.config = config
        self.source = source
        if config.gating.source == "trace":
            self._check_trace_consistency()
        self.n_layers, self.n_experts, self.top_k = source.n_layers, source.n_experts, source.top_k
        self.n_tokens = int(config.n_tokens)
        self.d_model = int(source.d_model)
        dims = config.model if config.gating.source == "synthetic" else _dims(source)
        self.hosts = np.asarray(config.placement.host_map(dims), dtype=np.int64)  # (L, E), 0 = user device
        self.n_nodes = config.placement.helper_count(dims)
        if self.hosts.max() > self.n_nodes:
            raise ValueError(f"config field 'placement.hosts' uses helper {self.hosts.max()} > n_helpers {self.n_nodes}")

        ch, radio = config.channel, config.radio
        self.bits = float(self.d_model * radio.bits_per_element)
        self.noise_psd = float(dbm_to_watt(ch.noise_psd_dbm_hz))
        self.user_max_power = float(dbm_to_watt(radio.user_max_power_dbm))
        self.helper_power = float(dbm_to_watt(radio.helper_power_dbm))
        self.scope_index = SCOPES.index(radio.energy_scope)
        self.fading_model = NakagamiFading(ch.nakagami_m, ch.effective_correlation())
        self.enforce_deadline = bool(config.deadline.enforce)
        self.deadline = float(config.deadline.deadline_s)

        budget = config.budget
        eps = np.full(self.n_layers, budget.layer_budget) if budget.layer_budget is not None else source.layer_budget
        self.layer_budget = np.asarray(eps, dtype=np.float64) * budget.scale  # (L,)
        self.budget_mode = budget.mode
        if budget.mode == "token":
            kappa = np.ones(self.n_layers) if budget.layer_weights is None else np.asarray(budget.layer_weights, float)
            self.token_budget = float((self.layer_budget * kappa).sum())
        else:
            kappa = np.ones(self.n_layers)
            self.token_budget = float("nan")
        self.layer_weight = kappa
        if not (self.layer_budget > 0).all() and budget.mode == "layer":
            raise ValueError("config field 'budget.scale' must be > 0 in layer mode (a zero budget has no unit)")
        if budget.mode == "token" and not self.token_budget > 0:
            raise ValueError("config fields 'budget.scale'/'budget.layer_weights' give a zero token budget; use > 0")
        # Mismatch rows pre-multiplied by kappa_l so tables are directly in budget units.
        self.weighted_mismatch = source.mismatch * self.layer_weight[:, None, None]
        self._same_hosts_every_layer = bool((self.hosts == self.hosts[0]).all())
        self.layout = observation_layout(self.n_experts, self.top_k, self.n_nodes)
        self.obs_slices = observation_slices(self.layout)
        self.obs_size = sum(size for size, _, _ in self.layout.values())
        # budget_remaining and position are the last three entries of the flat layout
        self._budget_index = self.obs_slices["budget_remaining"].start
        assert self.obs_slices["position"].start == self._budget_index + 1 and self._budget_index + 3 == self.obs_size
        self._layer_den = max(self.n_layers - 1, 1)
        self._token_den = max(self.n_tokens - 1, 1)
        self.layer_budget_list = self.layer_budget.tolist()

    def _check_trace_consistency(self) -> None:
        b = self.config.budget
        if b.layer_weights is not None and len(b.layer_weights) != self.source.n_layers:
            raise ValueError(f"config field 'budget.layer_weights' has {len(b.layer_weights)} numbers but the "
                             f"trace has {self.source.n_layers} layers")
        if not isinstance(self.config.placement.hosts, str):
            hosts = np.asarray(self.config.placement.hosts)
            if hosts.shape != (self.source.n_layers, self.source.n_experts):
                raise ValueError(f"config field 'placement.hosts' has shape {hosts.shape}; the trace needs "
                                 f"({self.source.n_layers}, {self.source.n_experts})")

    # ---- episodes --------------------------------------------------------------------------------
    def chunk_size(self, batch: int) -> int:
        """Tokens planned per batched call for a batch of ``batch`` episodes."""
        return int(max(1, min(self.n_tokens, PLAN_LAYER_STEPS // max(1, batch * self.n_layers))))

    def reset(self, rng: np.random.Generator, batch: int, chunk: int | None = None) -> DecodeState:
        """New episodes for ``batch`` environments (all random draws from ``rng``)."""
        positions, waypoints, speeds, gain = draw_helpers(rng, batch, self.n_nodes, self.config.placement,
                                                          self.config.channel)
        fading = self.fading_model.init(rng, (batch, self.n_nodes))
        start = self.source.start(rng, batch, self.n_tokens)
        zeros = np.zeros(batch, dtype=np.int64)
        state = DecodeState(
            positions=positions, waypoints=waypoints, speeds=speeds, path_gain=gain, fading=fading, start=start,
            token=zeros, layer=zeros.copy(), chunk_start=zeros.copy(), plan=None, budget_used=np.zeros(batch),
            done=np.zeros(batch, dtype=bool), perturbed_same=np.ones(batch, dtype=bool),
            perturbed_correct=np.ones(batch, dtype=bool), delta_loss=np.zeros(batch))
        state.plan = self._plan_chunk(rng, state, None, self.chunk_size(batch) if chunk is None else chunk, fresh=True)
        return state

    def reset_rows(self, rng: np.random.Generator, state: DecodeState, rows: np.ndarray) -> None:
        """Reset only episodes ``rows`` (index array) of a batch in place (vector-env autoreset)."""
        fresh = self.reset(rng, len(rows), chunk=state.chunk_tokens)
        for name in ("positions", "waypoints", "speeds", "path_gain", "fading", "start", "token", "layer",
                     "chunk_start", "budget_used", "done", "perturbed_same", "perturbed_correct", "delta_loss"):
            getattr(state, name)[rows] = getattr(fresh, name)
        _assign_rows(state.plan, fresh.plan, rows)
        state.chunk_id += 1

    # ---- physics of the coming tokens ------------------------------------------------------------
    def _plan_chunk(self, rng: np.random.Generator, state: DecodeState, rows, chunk: int, fresh: bool) -> TokenPlan:
        """Channels, gating and costs of tokens chunk_start .. chunk_start+chunk-1 for ``rows`` (None = all).
        ``fresh``: the stored channel is already token 0's (just reset), so the first epoch does not fade."""
        sel = slice(None) if rows is None else rows
        pl, ch = self.config.placement, self.config.channel
        per_layer = ch.fading_per_layer
        epochs_per_token = self.n_layers if per_layer else 1
        fading, path_g = state.fading[sel], state.path_gain[sel]
        n = fading.shape[0]
        epochs = chunk * epochs_per_token
        where = np.empty((n, chunk, self.n_nodes, 2))
        where[:] = state.positions[sel][:, None]
        if pl.mobility:  # pedestrians move once per token: walk the epochs in order
            gains = np.empty((n, epochs, self.n_nodes))
            path_gains = np.empty_like(gains)  # large-scale part alone (slotted uplinks fade within the window)
            for epoch in range(epochs):
                if not (fresh and epoch == 0):
                    fading = self.fading_model.advance(rng, fading)
                    if epoch % epochs_per_token == 0:
                        pos, wp, sp = move_random_waypoint(
                            rng, state.positions[sel], state.waypoints[sel], state.speeds[sel], ch.token_interval_s,
                            pl.r_min_m, pl.r_max_m, (pl.speed_min_mps, pl.speed_max_mps))
                        state.positions[sel], state.waypoints[sel], state.speeds[sel] = pos, wp, sp
                        path_g = path_gain(np.linalg.norm(pos, axis=-1), ch.path_loss_exponent, ch.reference_gain_db)
                        state.path_gain[sel] = path_g
                        where[:, epoch // epochs_per_token] = pos
                gains[:, epoch] = path_g * self.fading_model.gain(fading)
                path_gains[:, epoch] = path_g
        else:  # static helpers: every epoch's fading in one draw
            states, last = self.fading_model.sequence(rng, fading, epochs - 1 if fresh else epochs)
            if fresh:
                states = np.concatenate([fading[None], states], axis=0)
            fading = last if len(states) else fading
            gains = path_g[:, None] * np.moveaxis(self.fading_model.gain(states), 0, 1)  # (n, epochs, N)
            path_gains = np.broadcast_to(path_g[:, None], gains.shape)
        state.fading[sel] = fading
        tokens = np.minimum(state.chunk_start[sel][:, None] + np.arange(chunk), self.n_tokens - 1)  # (n, C)
        flat = self.source.gates((state.start[sel][:, None] + tokens).reshape(-1), rng)
        gates = TokenGates(*(x.reshape((n, chunk) + x.shape[1:]) for x in (flat.probs, flat.topk_idx, flat.topk_weight)))
        shape = (n, chunk, epochs_per_token, self.n_nodes)
        return self._plan(rng, gains.reshape(shape), gates, where, path_gains.reshape(shape))

    def _plan(self, rng: np.random.Generator, channel_gain: np.ndarray, gates: TokenGates, positions,
              path_gains: np.ndarray) -> TokenPlan:
        """Costs, deviation tables and static observations. channel_gain, path_gains (n, C, Lf, N);
        gates (n, C, L, ...); positions (n, C, N, 2)."""
        comp, radio = self.config.compute, self.config.radio
        n, C, Lf, N = channel_gain.shape
        L = self.n_layers
        queue = rng.exponential(comp.queue_delay_mean_s, size=channel_gain.shape) if comp.queue_delay_mean_s > 0 else 0.0
        costs = link_costs(
            channel_gain, bits=self.bits, bandwidth_hz=radio.bandwidth_hz, noise_psd_w_hz=self.noise_psd,
            user_max_power_w=self.user_max_power, helper_power_w=self.helper_power, deadline_s=self.deadline,
            load_time_s=comp.load_time_s, compute_time_s=comp.compute_time_s,
            helper_compute_power_w=comp.helper_compute_power_w, uplink_model=radio.uplink_model, queue_delay_s=queue)
        uplink = costs.uplink_energy
        expected_uplink = None
        if radio.uplink_slots > 1:
            # Fast fading within the uplink [paper]: the policy sees the expected-inverse-gain surrogate
            # (E[1/h] for 1/h over the path gain); the energy spent follows the slot gains as revealed,
            # with bits allocated per slot by DP or uniformly. The window is the inversion window.
            window = self.deadline - comp.compute_time_s - costs.downlink_time
            m = self.config.channel.nakagami_m
            expected_uplink = slots.surrogate_energy(self.bits, window, path_gains, radio.bandwidth_hz, self.noise_psd, m)
            slot_gains = slots.draw_slot_fading(rng, path_gains.shape, m, radio.uplink_slots)
            uplink = slots.allocate_bits(radio.bit_allocation, self.bits, window, path_gains, slot_gains,
                                         radio.bandwidth_hz, self.noise_psd, m).energy
        local_time = comp.load_time_s + comp.compute_time_s
        energy_scopes = self._expert_energy(uplink, costs, local_time)
        node_latency = np.empty((n, C, Lf, N + 1))
        node_latency[..., 1:] = costs.latency
        node_latency[..., 0] = local_time
        latency = self._by_expert(node_latency)
        meets = latency <= self.deadline * (1.0 + 1e-9)
        gain_db = linear_to_db(channel_gain)
        observed = None if expected_uplink is None else self._expert_energy(expected_uplink, costs, local_time)
        gating = self._gating_entries(np.arange(L), gates.probs, gates.topk_idx, gates.topk_weight, energy_scopes,
                                      latency, gain_db, observed)
        return TokenPlan(probs=gates.probs, topk_idx=gates.topk_idx, topk_weight=gates.topk_weight,
                         energy_scopes=energy_scopes, observed_energy_scopes=energy_scopes if observed is None else observed,
                         latency=latency, meets_deadline=meets,
                         channel_gain_db=gain_db, helper_positions=positions, **gating)

    def _expert_energy(self, uplink, costs, local_time) -> np.ndarray:
        """Per-expert energies (n, C, L, 3, E) in the uplink / comm / system scopes from node costs
        (n, C, Lf, N); node 0 is the user device (no radio; P_gpu (t_load + t_comp) in the system scope)."""
        n, C, Lf, N = uplink.shape
        node_energy = np.empty((n, C, Lf, 3, N + 1))
        node_energy[..., 0, 1:] = uplink
        node_energy[..., 1, 1:] = uplink + costs.downlink_energy
        node_energy[..., 2, 1:] = node_energy[..., 1, 1:] + costs.compute_energy
        node_energy[..., :2, 0] = 0.0
        node_energy[..., 2, 0] = self.config.compute.local_compute_power_w * local_time
        return self._by_expert(node_energy)

    def _by_expert(self, node_values: np.ndarray) -> np.ndarray:
        """Node-indexed values (n, C, Lf, ..., N+1) -> expert-indexed (n, C, L, ..., E) through the host map."""
        n, C, Lf = node_values.shape[:3]
        if self._same_hosts_every_layer:  # one gather, then a copy per layer (the common one-to-one case)
            per_expert = np.take(node_values, self.hosts[0], axis=-1)
            out = np.empty((n, C, self.n_layers) + per_expert.shape[3:])
            out[...] = per_expert  # broadcasts over layers when the channel is per token
            return out
        out = np.empty((n, C, self.n_layers) + node_values.shape[3:-1] + (self.n_experts,))
        for layer in range(self.n_layers):
            out[:, :, layer] = np.take(node_values[:, :, layer if Lf > 1 else 0], self.hosts[layer], axis=-1)
        return out

    def _gating_entries(self, layer, probs, topk_idx, topk_weight, energy_scopes, latency, gain_db,
                        observed_energy_scopes=None) -> dict:
        """The plan entries that depend on gating: Top-K mask, deviation tables, Top-K energy, reference and
        the static observation. Leading axes end with the layer axis; ``layer`` holds its layer indices.
        ``observed_energy_scopes``: what the observation shows when it differs from the energy spent
        (slotted uplinks: the surrogate expectation); the reward's reference stays the spent Top-K energy."""
        topk_mask = np.zeros(probs.shape, dtype=bool)
        np.put_along_axis(topk_mask, topk_idx, True, axis=-1)
        table = slot_deviation_table(self.weighted_mismatch, np.asarray(layer), topk_idx, topk_weight)
        energy = energy_scopes[..., self.scope_index, :]
        topk_energy = np.where(topk_mask, energy, 0.0).sum(axis=-1)
        reference = np.where(topk_energy > 0, topk_energy, energy.mean(axis=-1))
        reference = np.where(reference > 0, reference, 1.0)
        unit = self.layer_budget[layer][:, None] if self.budget_mode == "layer" else self.token_budget
        if observed_energy_scopes is None:
            energy_cost = energy / reference[..., None]
        else:
            seen = observed_energy_scopes[..., self.scope_index, :]
            seen_topk = np.where(topk_mask, seen, 0.0).sum(axis=-1)
            energy_cost = seen / np.where(seen_topk > 0, seen_topk, 1.0)[..., None]
        obs = build_static_observation(
            self.layout, probs=probs, topk_mask=topk_mask, topk_idx=topk_idx, topk_weight=topk_weight,
            gain_db=gain_db, energy_cost=energy_cost, latency_ratio=latency / self.deadline,
            deviation_table=table.reshape(table.shape[:-2] + (-1,)) / unit)
        return {"topk_mask": topk_mask, "deviation_table": table, "topk_energy": topk_energy,
                "energy_reference": reference, "obs_static": obs}

    def override_gates(self, state: DecodeState, index: int, probs, topk_idx, topk_weight) -> None:
        """Replace episode ``index``'s gating at its current (token, layer) by gates computed elsewhere
        (the live backend: real router outputs after the executed experts changed the hidden state)."""
        plan = state.plan
        layer = int(state.layer[index])
        c = int(state.token[index]) - int(state.chunk_start[index])
        sel = (index, c, slice(layer, layer + 1))
        gain = plan.channel_gain_db[index, c, slice(layer, layer + 1) if self.config.channel.fading_per_layer else slice(0, 1)]
        plan.probs[sel] = probs
        plan.topk_idx[sel] = topk_idx
        plan.topk_weight[sel] = topk_weight
        observed = None if plan.observed_energy_scopes is plan.energy_scopes else plan.observed_energy_scopes[sel]
        entries = self._gating_entries(np.array([layer]), plan.probs[sel], plan.topk_idx[sel], plan.topk_weight[sel],
                                       plan.energy_scopes[sel], plan.latency[sel], gain, observed)
        for name, value in entries.items():
            getattr(plan, name)[sel] = value
        state.chunk_id += 1  # cached copies of the plan are stale

    # ---- the current layer -----------------------------------------------------------------------
    def view(self, state: DecodeState, index=None) -> LayerView:
        """The current layer of every episode (``index=None``), or of episode ``index`` alone (no copies)."""
        plan = state.plan
        per_layer = self.config.channel.fading_per_layer
        if index is None and state.batch_size > 1:
            lockstep = self._lockstep_view(state)
            if lockstep is not None:
                return lockstep
        if index is None:
            layer, token = state.layer, state.token
            sel = (np.arange(state.batch_size), token - state.chunk_start, layer)
            budget_used = state.budget_used
            gain_sel = sel if per_layer else sel[:2] + (0,)
        else:
            layer, token = int(state.layer[index]), int(state.token[index])
            sel = (index, token - int(state.chunk_start[index]), layer)
            budget_used = float(state.budget_used[index])
            gain_sel = sel if per_layer else sel[:2] + (0,)
        if self.budget_mode == "layer":
            budget = self.layer_budget[layer]
            unit = budget
        else:
            budget = self.token_budget - budget_used
            unit = np.full(np.shape(budget), self.token_budget) if index is None else self.token_budget
        energy_scopes = plan.energy_scopes[sel]
        return LayerView(
            layer=layer, token=token, probs=plan.probs[sel], topk_idx=plan.topk_idx[sel],
            topk_weight=plan.topk_weight[sel], topk_mask=plan.topk_mask[sel], energy_scopes=energy_scopes,
            energy=energy_scopes[..., self.scope_index, :], latency=plan.latency[sel],
            meets_deadline=plan.meets_deadline[sel], deviation_table=plan.deviation_table[sel],
            layer_weight=self.layer_weight[layer], budget=budget, budget_unit=unit, topk_energy=plan.topk_energy[sel],
            energy_reference=plan.energy_reference[sel], channel_gain_db=plan.channel_gain_db[gain_sel],
            obs_static=plan.obs_static[sel])

    def _lockstep_view(self, state: DecodeState) -> LayerView | None:
        """The batch view as basic slices ``[:, c, l]`` (no gathers) when every episode is at the same
        layer and chunk offset, as after a joint reset; None otherwise."""
        layer, offset = state.layer, state.token - state.chunk_start
        B = layer.shape[0]
        l, c = int(layer[0]), int(offset[0])
        if not ((layer == l).all() and (offset == c).all()):
            return None
        plan = state.plan
        if self.budget_mode == "layer":
            budget = np.full(B, self.layer_budget[l])
            unit = budget
        else:
            budget = self.token_budget - state.budget_used
            unit = np.full(B, self.token_budget)
        energy_scopes = plan.energy_scopes[:, c, l]
        return LayerView(
            layer=layer.copy(), token=state.token.copy(), probs=plan.probs[:, c, l], topk_idx=plan.topk_idx[:, c, l],
            topk_weight=plan.topk_weight[:, c, l], topk_mask=plan.topk_mask[:, c, l], energy_scopes=energy_scopes,
            energy=energy_scopes[:, self.scope_index], latency=plan.latency[:, c, l],
            meets_deadline=plan.meets_deadline[:, c, l], deviation_table=plan.deviation_table[:, c, l],
            layer_weight=np.full(B, self.layer_weight[l]), budget=budget, budget_unit=unit,
            topk_energy=plan.topk_energy[:, c, l], energy_reference=plan.energy_reference[:, c, l],
            channel_gain_db=plan.channel_gain_db[:, c, l if self.config.channel.fading_per_layer else 0],
            obs_static=plan.obs_static[:, c, l])

    def observation(self, view: LayerView) -> np.ndarray:
        """Flat float32 observation(s) of a view, in layout order."""
        fraction = view.budget / view.budget_unit
        return self.fill_observation(view.obs_static.copy(), fraction if np.ndim(fraction) else float(fraction),
                                     view.layer, view.token)

    def fill_observation(self, obs: np.ndarray, budget_fraction, layer, token) -> np.ndarray:
        """Write the step-dependent entries (budget left, position) into static observation(s) ``obs``."""
        i = self._budget_index
        if isinstance(budget_fraction, float):  # one episode: Python arithmetic beats numpy calls on scalars
            obs[i] = min(max(float(budget_fraction), 0.0), MAX_DEVIATION)
            obs[i + 1] = layer / self._layer_den
            obs[i + 2] = token / self._token_den
        else:
            obs[..., i] = np.clip(budget_fraction, 0.0, MAX_DEVIATION)
            obs[..., i + 1] = layer / self._layer_den
            obs[..., i + 2] = token / self._token_den
        return obs

    def evaluate(self, view: LayerView, executed: np.ndarray) -> dict[str, np.ndarray]:
        """Outcomes of executing ``executed`` (lead + (E,), bool) on ``view``; no state changes.
        Works for a batch or a single episode alike (only elementwise ops and last-axis reductions)."""
        late_run = executed & ~view.meets_deadline
        effective = executed & view.meets_deadline if self.enforce_deadline else executed
        # energy is spent by every executed expert, even a late one
        energy_scopes = np.einsum("...se,...e->...s", view.energy_scopes, executed.astype(view.energy_scopes.dtype))
        energy = energy_scopes[..., self.scope_index]
        weighted_dev, server = serve_slots(view.deviation_table, effective)
        n_kept = (server == view.topk_idx).sum(axis=-1)
        n_skipped = (server == self.n_experts).sum(axis=-1)
        latency = (view.latency * executed).max(axis=-1)
        n_executed = executed.sum(axis=-1)
        misses = late_run.sum(axis=-1)
        lost = misses if self.enforce_deadline else np.zeros_like(misses)
        available = view.budget if self.budget_mode == "layer" else np.maximum(view.budget, 0.0)  # eps_l > 0
        excess = np.maximum(weighted_dev - available, 0.0)
        violated = excess > 1e-9 * view.budget_unit
        rw = self.config.reward
        reward_energy = -energy / view.energy_reference
        reward_deviation = (-rw.deviation_weight) * violated * (1.0 + excess / view.budget_unit)
        reward_deadline = (-rw.deadline_weight) * misses if self.enforce_deadline else np.zeros(np.shape(misses))
        return {
            "reward": reward_energy + reward_deviation + reward_deadline,
            "reward_energy": reward_energy,
            "reward_deviation": reward_deviation,
            "reward_deadline": reward_deadline,
            "energy_j": energy,
            "topk_energy_j": view.topk_energy,
            "energy_uplink_j": energy_scopes[..., 0],
            "energy_comm_j": energy_scopes[..., 1],
            "energy_system_j": energy_scopes[..., 2],
            "deviation": weighted_dev / view.layer_weight,
            "weighted_deviation": weighted_dev,
            "deviation_budget": view.budget,
            "budget_violated": violated,
            "latency_s": latency,
            "deadline_misses": misses,
            "n_executed": n_executed,
            "n_lost": lost,
            "n_kept": n_kept,
            "n_replaced": self.top_k - n_kept - n_skipped,
            "n_skipped": n_skipped,
            "server": server,
        }

    # ---- single-episode fast path ---------------------------------------------------------------
    def plan_lists(self, state: DecodeState, index: int) -> dict:
        """Episode ``index``'s current plan chunk as nested Python lists (built once per chunk), for
        :meth:`evaluate_one`: on 8-expert layers plain Python beats numpy's per-call overhead ~5x."""
        plan = state.plan
        return {
            "energy_scopes": plan.energy_scopes[index].tolist(),
            "latency": plan.latency[index].tolist(),
            "meets": plan.meets_deadline[index].tolist(),
            "table": plan.deviation_table[index].tolist(),
            "topk_idx": plan.topk_idx[index].tolist(),
            "topk_energy": plan.topk_energy[index].tolist(),
            "reference": plan.energy_reference[index].tolist(),
        }

    def evaluate_one(self, lists: dict, chunk_token: int, layer: int, executed: list, budget: float,
                     budget_unit: float) -> dict:
        """:meth:`evaluate` for one episode on Python lists (same results; tests check the equivalence).
        ``executed`` is a list of E bools/0-1 ints; returns Python numbers."""
        E = self.n_experts
        scopes = lists["energy_scopes"][chunk_token][layer]
        latency = lists["latency"][chunk_token][layer]
        meets = lists["meets"][chunk_token][layer]
        up, comm, system = sum(compress(scopes[0], executed)), sum(compress(scopes[1], executed)), sum(compress(scopes[2], executed))
        n_exec = sum(executed)
        longest = max(compress(latency, executed), default=0.0)
        misses = n_exec - sum(compress(meets, executed))
        effective = [x and m for x, m in zip(executed, meets)] if misses and self.enforce_deadline else executed
        candidates = list(compress(range(E), effective))
        weighted_dev = 0.0
        n_kept = n_skipped = 0
        server = []
        for own, row in zip(lists["topk_idx"][chunk_token][layer], lists["table"][chunk_token][layer]):
            best, best_j = row[E], E  # skip, unless an executed expert is as good (lowest index wins ties)
            if candidates:
                values = [row[j] for j in candidates]
                low = min(values)
                if low <= best:
                    best, best_j = low, candidates[values.index(low)]
            weighted_dev += best
            server.append(best_j)
            n_kept += best_j == own
            n_skipped += best_j == E
        energy = (up, comm, system)[self.scope_index]
        excess = weighted_dev - max(budget, 0.0)
        violated = excess > 1e-9 * budget_unit
        rw = self.config.reward
        reward_energy = -energy / lists["reference"][chunk_token][layer]
        reward_deviation = -rw.deviation_weight * (1.0 + excess / budget_unit) if violated else -0.0
        reward_deadline = -rw.deadline_weight * misses if self.enforce_deadline else 0.0
        lost = misses if self.enforce_deadline else 0
        return {
            "reward": reward_energy + reward_deviation + reward_deadline,
            "reward_energy": reward_energy, "reward_deviation": reward_deviation, "reward_deadline": reward_deadline,
            "energy_j": energy, "topk_energy_j": lists["topk_energy"][chunk_token][layer],
            "energy_uplink_j": up, "energy_comm_j": comm, "energy_system_j": system,
            "deviation": weighted_dev / float(self.layer_weight[layer]), "weighted_deviation": weighted_dev,
            "deviation_budget": budget, "budget_violated": int(violated), "latency_s": longest,
            "deadline_misses": misses, "n_executed": n_exec, "n_lost": lost, "n_kept": n_kept,
            "n_replaced": self.top_k - n_kept - n_skipped, "n_skipped": n_skipped, "server": server,
        }

    # ---- real accuracy (effect tables) -----------------------------------------------------------
    @property
    def has_accuracy(self) -> bool:
        return bool(getattr(self.source, "has_effects", False))

    @property
    def _flat_effects(self) -> dict:
        """The source's effect tables as 1-D views (built once)."""
        if not hasattr(self, "_flat_effect_tables"):
            self._flat_effect_tables = {k: v.reshape(-1) for k, v in self.source.effects.items()}
        return self._flat_effect_tables

    def record_accuracy(self, state: DecodeState, server: np.ndarray, topk_idx: np.ndarray) -> dict:
        """Fold this layer's serving decisions into each episode's token accuracy (call before advance).

        ``server`` and ``topk_idx`` are (B, K). The effect tables hold single perturbations (one slot of one
        layer served by another expert or skipped, all else as the full model); a token's outcome is
        estimated as: prediction unchanged if every perturbation so far left it unchanged (then correct iff
        the full model is), else correct iff every perturbation left it correct. Exact with at most one
        perturbation per token; with more it ignores interactions (the live backend measures them).
        Returns (B,) arrays: accuracy_correct, accuracy_same, accuracy_full, delta_loss, token_complete."""
        src = self.source
        position = state.start + state.token
        perturbed = server != topk_idx
        if perturbed.any():
            K, E1 = server.shape[1], self.n_experts + 1
            # one flat index into the (T, L, K, E+1) tables instead of four index arrays per table
            flat = ((position * self.n_layers + state.layer)[:, None] * K + np.arange(K)) * E1 + server
            tables = self._flat_effects
            state.perturbed_correct &= np.where(perturbed, tables["effect_correct"][flat], True).all(axis=1)
            if "effect_same" in tables:
                state.perturbed_same &= np.where(perturbed, tables["effect_same"][flat], True).all(axis=1)
            else:  # without the table, only "no perturbation at all" is known to keep the prediction
                state.perturbed_same &= ~perturbed.any(axis=1)
            if "effect_dloss" in tables:
                state.delta_loss += np.where(perturbed, tables["effect_dloss"][flat].astype(np.float64), 0.0).sum(axis=1)
        full = src.full_correct[position] if src.full_correct is not None else np.ones(len(position), dtype=bool)
        return {
            "accuracy_correct": np.where(state.perturbed_same, full, state.perturbed_correct),
            "accuracy_same": state.perturbed_same.copy(),
            "accuracy_full": full,
            "delta_loss": state.delta_loss.copy(),
            "token_complete": state.layer == self.n_layers - 1,
        }

    def record_accuracy_one(self, state: DecodeState, server: list, topk_idx: list, index: int = 0) -> dict:
        """:meth:`record_accuracy` for one episode on Python values (same results; tests check it)."""
        src = self.source
        position = int(state.start[index] + state.token[index])
        layer = int(state.layer[index])
        effects = src.effects
        same, correct, dloss = bool(state.perturbed_same[index]), bool(state.perturbed_correct[index]), 0.0
        for k, (j, own) in enumerate(zip(server, topk_idx)):
            if j == own:
                continue
            correct = correct and bool(effects["effect_correct"][position, layer, k, j])
            same = same and (bool(effects["effect_same"][position, layer, k, j]) if "effect_same" in effects else False)
            if "effect_dloss" in effects:
                dloss += float(effects["effect_dloss"][position, layer, k, j])
        state.perturbed_same[index], state.perturbed_correct[index] = same, correct
        state.delta_loss[index] += dloss
        full = bool(src.full_correct[position]) if src.full_correct is not None else True
        return {"accuracy_correct": int(full if same else correct), "accuracy_same": int(same),
                "accuracy_full": int(full), "delta_loss": float(state.delta_loss[index]),
                "token_complete": int(layer == self.n_layers - 1)}

    def advance(self, rng: np.random.Generator, state: DecodeState, weighted_deviation) -> np.ndarray:
        """Move every episode past its current layer; returns the (B,) truncation flags (not a copy)."""
        if state.batch_size == 1 and not state.done[0]:
            return self._advance_single(rng, state, float(np.asarray(weighted_deviation).reshape(-1)[0]))
        if self.budget_mode == "token":
            state.budget_used += weighted_deviation
        layer = state.layer + 1
        new_token = layer >= self.n_layers
        if not new_token.any():
            state.layer = layer
            return state.done  # all False: episodes end only at a token boundary
        last = new_token & (state.token + 1 >= self.n_tokens)
        state.done |= last
        advance = new_token & ~last
        state.layer = np.where(last, self.n_layers - 1, np.where(advance, 0, layer))
        state.token = state.token + advance
        for name, fresh in (("budget_used", 0.0), ("perturbed_same", True), ("perturbed_correct", True), ("delta_loss", 0.0)):
            getattr(state, name)[advance] = fresh
        replan = advance & (state.token - state.chunk_start >= state.chunk_tokens)
        if replan.any():
            rows = None if replan.all() else np.flatnonzero(replan)
            sel = slice(None) if rows is None else rows
            state.chunk_start[sel] = state.token[sel]
            plan = self._plan_chunk(rng, state, rows, state.chunk_tokens, fresh=False)
            if rows is None:
                state.plan = plan
            else:
                _assign_rows(state.plan, plan, rows)
            state.chunk_id += 1
        return state.done

    def _advance_single(self, rng: np.random.Generator, state: DecodeState, weighted_deviation: float) -> np.ndarray:
        """:meth:`advance` for a batch of one on Python ints (same semantics, a fraction of the overhead)."""
        if self.budget_mode == "token":
            state.budget_used[0] += weighted_deviation
        layer = int(state.layer[0]) + 1
        if layer < self.n_layers:
            state.layer[0] = layer
            return state.done
        token = int(state.token[0]) + 1
        if token >= self.n_tokens:
            state.done[0] = True  # the layer stays at L-1: the final observation repeats the last layer
            return state.done
        state.layer[0] = 0
        state.token[0] = token
        state.budget_used[0] = 0.0
        state.perturbed_same[0] = state.perturbed_correct[0] = True
        state.delta_loss[0] = 0.0
        if token - int(state.chunk_start[0]) >= state.chunk_tokens:
            state.chunk_start[0] = token
            state.plan = self._plan_chunk(rng, state, None, state.chunk_tokens, fresh=False)
            state.chunk_id += 1
        return state.done

    def step(self, rng: np.random.Generator, state: DecodeState, executed: np.ndarray):
        """Batched step: evaluate ``executed`` (B, E) bool at each episode's current layer, then advance.
        Returns (outcomes, truncated)."""
        out = self.evaluate(self.view(state), executed)
        return out, self.advance(rng, state, out["weighted_deviation"]).copy()


def _assign_rows(target, source, rows) -> None:
    """Copy every array field of dataclass ``source`` into rows ``rows`` of ``target``'s fields."""
    for f in dataclasses.fields(target):
        if f.name == "observed_energy_scopes" and target.observed_energy_scopes is target.energy_scopes:
            continue  # an alias of energy_scopes (unslotted uplink): copied with it
        getattr(target, f.name)[rows] = getattr(source, f.name)


@dataclass(frozen=True)
class _Dims:
    n_layers: int
    n_experts: int


def _dims(source: GatingSource) -> _Dims:
    return _Dims(source.n_layers, source.n_experts)
