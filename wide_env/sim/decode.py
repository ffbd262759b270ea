"""Batched decoding simulator: B independent WIDE episodes stepped in lockstep by numpy (no gymnasium).

One step is one MoE layer of one generated token. :class:`DecodeSimulator` holds everything static
(config, gating source, host map, physical constants); :class:`DecodeState` holds the per-episode
arrays with a leading batch axis B. The single env, the vector env and fast evaluators all drive the
same three calls: :meth:`DecodeSimulator.reset`, :meth:`DecodeSimulator.view` (what a policy may see
at the current layer) and :meth:`DecodeSimulator.step` (apply masks, return outcomes, advance).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from wide_env.config import WideConfig
from wide_env.gating.base import GatingSource, TokenGates
from wide_env.sim.channel import NakagamiFading, draw_positions, move_random_waypoint, path_gain
from wide_env.sim.costs import link_costs
from wide_env.sim.deviation import serve_slots
from wide_env.sim.observation import MAX_DEVIATION, build_static_observation, observation_layout, observation_slices
from wide_env.sim.units import dbm_to_watt, linear_to_db

SCOPES = ("uplink", "comm", "system")


@dataclass
class DecodeState:
    """Per-episode arrays (leading axis B)."""

    positions: np.ndarray  # (B, N, 2) helper positions, m
    waypoints: np.ndarray  # (B, N, 2) mobility targets
    speeds: np.ndarray  # (B, N) m/s
    path_gain: np.ndarray  # (B, N) linear
    fading: np.ndarray  # (B, N, C) fading components
    channel_gain: np.ndarray  # (B, N) G * h, linear
    start: np.ndarray  # (B,) trace position of token 0
    token: np.ndarray  # (B,) token index within the episode
    layer: np.ndarray  # (B,) current MoE layer
    gates: TokenGates  # current token, all layers
    plan: "TokenPlan"  # the current token in every layer
    budget_used: np.ndarray  # (B,) weighted deviation spent this token (token mode)
    done: np.ndarray  # (B,) episode over (truncated)

    @property
    def batch_size(self) -> int:
        return self.token.shape[0]


@dataclass
class LayerView:
    """The current layer of each episode: arrays with leading axes ``lead`` = (B,) for a batch, or ()
    for one episode (the single env slices the token plan without copying). E = experts, K = Top-K."""

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


@dataclass
class TokenPlan:
    """Everything about the current token in every layer, computed once per token (axes (B, L, ...))."""

    topk_mask: np.ndarray  # (B, L, E) bool
    energy_scopes: np.ndarray  # (B, L, 3, E)
    latency: np.ndarray  # (B, L, E)
    meets_deadline: np.ndarray  # (B, L, E)
    deviation_table: np.ndarray  # (B, L, K, E+1)
    topk_energy: np.ndarray  # (B, L)
    energy_reference: np.ndarray  # (B, L)
    channel_gain_db: np.ndarray  # (B, N)
    obs_static: np.ndarray  # (B, L, D) float32


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
        self.layout = observation_layout(self.n_experts, self.top_k, self.n_nodes)
        self.obs_slices = observation_slices(self.layout)
        self.obs_size = sum(size for size, _, _ in self.layout.values())

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
    def reset(self, rng: np.random.Generator, batch: int) -> DecodeState:
        """New episodes for ``batch`` environments (all random draws from ``rng``)."""
        pl = self.config.placement
        N = self.n_nodes
        positions = draw_positions(rng, (batch, N), pl.r_min_m, pl.r_max_m)
        if pl.mobility:
            waypoints = draw_positions(rng, (batch, N), pl.r_min_m, pl.r_max_m)
            speeds = rng.uniform(pl.speed_min_mps, pl.speed_max_mps, size=(batch, N))
        else:
            waypoints, speeds = positions.copy(), np.zeros((batch, N))
        gain = path_gain(np.linalg.norm(positions, axis=-1), self.config.channel.path_loss_exponent,
                         self.config.channel.reference_gain_db)
        fading = self.fading_model.init(rng, (batch, N))
        start = self.source.start(rng, batch, self.n_tokens)
        channel_gain = gain * self.fading_model.gain(fading)
        gates = self.source.gates(start, rng)
        return DecodeState(
            positions=positions, waypoints=waypoints, speeds=speeds, path_gain=gain, fading=fading,
            channel_gain=channel_gain, start=start, token=np.zeros(batch, dtype=np.int64),
            layer=np.zeros(batch, dtype=np.int64), gates=gates, plan=self._plan(rng, channel_gain, gates),
            budget_used=np.zeros(batch), done=np.zeros(batch, dtype=bool))

    def reset_rows(self, rng: np.random.Generator, state: DecodeState, rows: np.ndarray) -> None:
        """Reset only episodes ``rows`` (index array) of a batch in place (vector-env autoreset)."""
        fresh = self.reset(rng, len(rows))
        for name in ("positions", "waypoints", "speeds", "path_gain", "fading", "channel_gain", "start", "token",
                     "layer", "budget_used", "done"):
            getattr(state, name)[rows] = getattr(fresh, name)
        _assign_rows(state.gates, fresh.gates, rows)
        _assign_rows(state.plan, fresh.plan, rows)

    # ---- per-token physics -----------------------------------------------------------------------
    def _plan(self, rng: np.random.Generator, channel_gain: np.ndarray, gates: TokenGates) -> TokenPlan:
        """Costs, deviation tables and the static observation of one token in every layer (batched)."""
        comp, radio = self.config.compute, self.config.radio
        B, N, L, E = channel_gain.shape[0], self.n_nodes, self.n_layers, self.n_experts
        queue = rng.exponential(comp.queue_delay_mean_s, size=(B, N)) if comp.queue_delay_mean_s > 0 else 0.0
        costs = link_costs(
            channel_gain, bits=self.bits, bandwidth_hz=radio.bandwidth_hz, noise_psd_w_hz=self.noise_psd,
            user_max_power_w=self.user_max_power, helper_power_w=self.helper_power, deadline_s=self.deadline,
            load_time_s=comp.load_time_s, compute_time_s=comp.compute_time_s,
            helper_compute_power_w=comp.helper_compute_power_w, uplink_model=radio.uplink_model, queue_delay_s=queue)
        # node axis: 0 = the user device (local experts: no radio, P_gpu * (t_load + t_comp) in the system scope)
        local_time = comp.load_time_s + comp.compute_time_s
        node_energy = np.empty((B, 3, N + 1))
        node_energy[:, 0, 1:] = costs.uplink_energy
        node_energy[:, 1, 1:] = costs.uplink_energy + costs.downlink_energy
        node_energy[:, 2, 1:] = node_energy[:, 1, 1:] + costs.compute_energy
        node_energy[:, :2, 0] = 0.0
        node_energy[:, 2, 0] = comp.local_compute_power_w * local_time
        node_latency = np.empty((B, N + 1))
        node_latency[:, 1:] = costs.latency
        node_latency[:, 0] = local_time

        energy_scopes = node_energy[:, :, self.hosts].transpose(0, 2, 1, 3)  # (B, L, 3, E)
        latency = node_latency[:, self.hosts]  # (B, L, E)
        meets = latency <= self.deadline * (1.0 + 1e-9)
        topk_mask = np.zeros((B, L, E), dtype=bool)
        np.put_along_axis(topk_mask, gates.topk_idx, True, axis=2)
        table = self.weighted_mismatch[np.arange(L)[None, :, None], gates.topk_idx] * gates.topk_weight[..., None]
        energy = energy_scopes[:, :, self.scope_index]
        topk_energy = np.where(topk_mask, energy, 0.0).sum(axis=2)
        reference = np.where(topk_energy > 0, topk_energy, energy.mean(axis=2))
        reference = np.where(reference > 0, reference, 1.0)
        gain_db = linear_to_db(channel_gain)
        unit = self.layer_budget[None, :, None] if self.budget_mode == "layer" else self.token_budget
        obs = build_static_observation(
            self.layout, probs=gates.probs, topk_mask=topk_mask, topk_idx=gates.topk_idx, topk_weight=gates.topk_weight,
            gain_db=gain_db, energy_cost=energy / reference[..., None], latency_ratio=latency / self.deadline,
            deviation_table=table.reshape(B, L, -1) / unit)
        return TokenPlan(topk_mask=topk_mask, energy_scopes=energy_scopes, latency=latency, meets_deadline=meets,
                         deviation_table=table, topk_energy=topk_energy, energy_reference=reference,
                         channel_gain_db=gain_db, obs_static=obs)

    # ---- the current layer -----------------------------------------------------------------------
    def view(self, state: DecodeState, index=None) -> LayerView:
        """The current layer of every episode (``index=None``), or of episode ``index`` alone (no copies)."""
        if index is None:
            rows, layer, token = np.arange(state.batch_size), state.layer, state.token
            sel = (rows, layer)
            budget_used = state.budget_used
            gain_db = state.plan.channel_gain_db
        else:
            layer, token = int(state.layer[index]), int(state.token[index])
            sel = (index, layer)
            budget_used = state.budget_used[index]
            gain_db = state.plan.channel_gain_db[index]
        plan, gates = state.plan, state.gates
        if self.budget_mode == "layer":
            budget = self.layer_budget[layer]
            unit = budget
        else:
            budget = self.token_budget - budget_used
            unit = np.full(np.shape(budget), self.token_budget)
        energy_scopes = plan.energy_scopes[sel]
        return LayerView(
            layer=layer, token=token, probs=gates.probs[sel], topk_idx=gates.topk_idx[sel],
            topk_weight=gates.topk_weight[sel], topk_mask=plan.topk_mask[sel], energy_scopes=energy_scopes,
            energy=energy_scopes[..., self.scope_index, :], latency=plan.latency[sel],
            meets_deadline=plan.meets_deadline[sel], deviation_table=plan.deviation_table[sel],
            layer_weight=self.layer_weight[layer], budget=budget, budget_unit=unit, topk_energy=plan.topk_energy[sel],
            energy_reference=plan.energy_reference[sel], channel_gain_db=gain_db, obs_static=plan.obs_static[sel])

    def observation(self, view: LayerView) -> np.ndarray:
        """Flat float32 observation(s) of a view, in layout order."""
        obs = view.obs_static.copy()
        budget_slice = self.obs_slices["budget_remaining"]
        position = self.obs_slices["position"]
        obs[..., budget_slice.start] = np.clip(view.budget / view.budget_unit, 0.0, MAX_DEVIATION)
        obs[..., position.start] = view.layer / max(self.n_layers - 1, 1)
        obs[..., position.start + 1] = view.token / max(self.n_tokens - 1, 1)
        return obs

    def evaluate(self, view: LayerView, executed: np.ndarray) -> dict[str, np.ndarray]:
        """Outcomes of executing ``executed`` (lead + (E,), bool) on ``view``; no state changes.
        Works for a batch or a single episode alike (only elementwise ops and last-axis reductions)."""
        late = ~view.meets_deadline
        late_run = executed & late
        lost = late_run if self.enforce_deadline else np.zeros_like(executed)
        effective = executed & ~lost
        energy_scopes = (view.energy_scopes * executed[..., None, :]).sum(axis=-1)  # spent even if late
        energy = energy_scopes[..., self.scope_index]
        weighted_dev, server = serve_slots(view.deviation_table, effective)
        n_kept = (server == view.topk_idx).sum(axis=-1)
        n_skipped = (server == self.n_experts).sum(axis=-1)
        latency = np.where(executed, view.latency, 0.0).max(axis=-1)
        misses = late_run.sum(axis=-1)
        excess = np.maximum(weighted_dev - np.maximum(view.budget, 0.0), 0.0)
        violated = excess > 1e-9 * view.budget_unit
        rw = self.config.reward
        reward_energy = -energy / view.energy_reference
        reward_deviation = -rw.deviation_weight * (violated + excess / view.budget_unit * violated)
        reward_deadline = -rw.deadline_weight * misses * self.enforce_deadline
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
            "n_executed": executed.sum(axis=-1),
            "n_lost": lost.sum(axis=-1),
            "n_kept": n_kept,
            "n_replaced": self.top_k - n_kept - n_skipped,
            "n_skipped": n_skipped,
            "server": server,
        }

    def advance(self, rng: np.random.Generator, state: DecodeState, weighted_deviation) -> np.ndarray:
        """Move every episode past its current layer; returns the (B,) truncation flags."""
        if self.budget_mode == "token":
            state.budget_used += weighted_deviation
        layer = state.layer + 1
        new_token = layer >= self.n_layers
        if not new_token.any():
            state.layer = layer
            if self.config.channel.fading_per_layer:
                self._new_channel(rng, state, None)
            return state.done  # all False here: episodes end only at a token boundary
        last = new_token & (state.token + 1 >= self.n_tokens)
        state.done = state.done | last
        advance = new_token & ~last
        state.layer = np.where(last, self.n_layers - 1, np.where(advance, 0, layer))
        if advance.any():
            rows = None if advance.all() else np.flatnonzero(advance)
            sel = slice(None) if rows is None else rows
            state.token[sel] += 1
            state.budget_used[sel] = 0.0
            gates = self.source.gates(state.start[sel] + state.token[sel], rng)
            if rows is None:
                state.gates = gates
            else:
                _assign_rows(state.gates, gates, rows)
            self._new_channel(rng, state, rows)
        if self.config.channel.fading_per_layer and not new_token.all():
            self._new_channel(rng, state, np.flatnonzero(~new_token))
        return state.done

    def step(self, rng: np.random.Generator, state: DecodeState, executed: np.ndarray):
        """Batched step: evaluate ``executed`` (B, E) bool at each episode's current layer, then advance.
        Returns (outcomes, truncated)."""
        out = self.evaluate(self.view(state), executed)
        return out, self.advance(rng, state, out["weighted_deviation"]).copy()

    def _new_channel(self, rng, state: DecodeState, rows) -> None:
        """Fading (and mobility) step for ``rows`` (None = all), then re-plan those rows' token."""
        sel = slice(None) if rows is None else rows
        state.fading[sel] = self.fading_model.advance(rng, state.fading[sel])
        pl = self.config.placement
        if pl.mobility:
            pos, wp, sp = move_random_waypoint(
                rng, state.positions[sel], state.waypoints[sel], state.speeds[sel], self.config.channel.token_interval_s,
                pl.r_min_m, pl.r_max_m, (pl.speed_min_mps, pl.speed_max_mps))
            state.positions[sel], state.waypoints[sel], state.speeds[sel] = pos, wp, sp
            state.path_gain[sel] = path_gain(np.linalg.norm(pos, axis=-1), self.config.channel.path_loss_exponent,
                                             self.config.channel.reference_gain_db)
        state.channel_gain[sel] = state.path_gain[sel] * self.fading_model.gain(state.fading[sel])
        if rows is None:
            state.plan = self._plan(rng, state.channel_gain, state.gates)
        else:
            sub = TokenGates(state.gates.probs[rows], state.gates.topk_idx[rows], state.gates.topk_weight[rows])
            _assign_rows(state.plan, self._plan(rng, state.channel_gain[rows], sub), rows)


def _assign_rows(target, source, rows) -> None:
    """Copy every array field of dataclass ``source`` into rows ``rows`` of ``target``'s fields."""
    for f in dataclasses.fields(target):
        getattr(target, f.name)[rows] = getattr(source, f.name)


@dataclass(frozen=True)
class _Dims:
    n_layers: int
    n_experts: int


def _dims(source: GatingSource) -> _Dims:
    return _Dims(source.n_layers, source.n_experts)
