"""Batched decoding simulator: B independent WIDE episodes stepped in lockstep by numpy (no gymnasium).

One step is one MoE layer of one generated token. :class:`DecodeSimulator` holds everything static
(config, gating source, host map, physical constants); :class:`DecodeState` holds the per-episode
arrays with a leading batch axis B, and a :class:`TokenPlan` of the next tokens (batch axis last, see
there). The single env, the vector env and fast evaluators all drive the same calls:
:meth:`DecodeSimulator.reset`, :meth:`DecodeSimulator.view` (what a policy may see at the current
layer), :meth:`DecodeSimulator.evaluate` (outcomes of expert masks) and :meth:`DecodeSimulator.advance`
(:meth:`DecodeSimulator.step` does both); the single env uses their one-episode forms
(:meth:`plan_lists`, :meth:`evaluate_one`, :meth:`record_accuracy_one`, :meth:`advance_one`).
"""

from __future__ import annotations

import dataclasses
import weakref
from itertools import compress
from dataclasses import dataclass

import numpy as np

from wide_env.config import WideConfig
from wide_env.gating.base import GatingSource
from wide_env.sim.channel import NakagamiFading, draw_helpers, move_random_waypoint, path_gain
from wide_env.sim import slots
from wide_env.sim.costs import link_costs
from wide_env.sim.deviation import budget_overrun, serve_slots_batch_last
from wide_env.sim.gating_rows import GatingRows, build_gating_rows, position_gating_rows
from wide_env.sim.observation import (GAIN_DB_HIGH, GAIN_DB_LOW, MAX_DEVIATION, MAX_ENERGY_COST, MAX_LATENCY_RATIO,
                                      observation_layout, observation_slices)
from wide_env.sim.units import dbm_to_watt, linear_to_db

SCOPES = ("uplink", "comm", "system")


# Per-source lookup tables of record_accuracy (derived from the source's effect tables, shared by its envs).
_EFFECT_LOOKUPS: "weakref.WeakKeyDictionary[GatingSource, tuple]" = weakref.WeakKeyDictionary()

# Layer-steps planned ahead in one batched call (all envs x tokens x layers): amortises numpy's per-call
# overhead over many steps while bounding memory for large vector envs.
PLAN_LAYER_STEPS = 32768


@dataclass
class TokenPlan:
    """The next C tokens of every episode, computed in one batched call.

    Every array has the token-in-chunk axis C first and the batch axis B last (``obs_*`` entries: second
    to last), so the step of all episodes at (c, l) is one contiguous block ``x[c, l]`` with the batch
    on the fast axis (reductions over experts and slots then vectorise over the batch). After C comes
    the layer axis: L for gating, Lc for costs (1 when every layer sees the same channel and host map,
    else L), Lf for the channel (1, or L with per-layer fading). E experts, K Top-K, N helpers. Gating
    lives in ``gating`` rows indexed by ``gate_rows``."""

    gate_rows: np.ndarray  # (C, L, B) int64: rows of ``gating``
    gating: GatingRows  # per-position rows shared by every plan on the source, or this plan's own
    dense_gating: bool  # True: ``gating`` is this plan's own, row (b * C + c) * L + l
    # (C, Lc, 5, E, B) per expert call: energy (J) in the uplink / comm / system scopes, 1, and 1 if it
    # misses the deadline; one product with the executed mask sums what a step reports
    expert_terms: np.ndarray
    observed_energy_scopes: np.ndarray | None  # (C, Lc, 3, E, B) what the observation shows (slotted uplink), else None
    latency: np.ndarray  # (C, Lc, E, B) s
    meets_deadline: np.ndarray  # (C, Lc, E, B) bool
    topk_energy: np.ndarray  # (C, L, B) objective-scope energy of the Top-K set, J
    energy_reference: np.ndarray  # (C, L, B) the reward's energy denominator (Top-K energy, see _topk_energy)
    channel_gain_db: np.ndarray  # (C, Lf, N, B)
    # observation entries, float32 and clipped, with the batch axis SECOND to last so a step's block
    # (B, size) is contiguous in the observation's own order
    obs_gain: np.ndarray  # (C, Lf, B, N) channel gain, dB
    obs_energy: np.ndarray  # (C, L, B, E) energy / Top-K energy (surrogate energies with slotted uplinks)
    obs_latency: np.ndarray  # (C, Lc, B, E) latency / deadline
    # sources with effect tables: flat index of slot k's row in the (T, L, K, E+1) tables, (C, L, K, B), and
    # whether the full model predicts the token correctly, (C, B); None otherwise
    effect_rows: np.ndarray | None
    full_correct: np.ndarray | None
    helper_positions: np.ndarray  # (C, N, 2, B) m, where the helpers are at each token

    @property
    def energy_scopes(self) -> np.ndarray:
        """(C, Lc, 3, E, B) J per expert call: uplink / comm / system scope."""
        return self.expert_terms[:, :, :3]


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
    # every episode at the same token, layer and chunk offset (true after a joint reset; kept by advance,
    # which moves all episodes alike; a partial reset ends it)
    lockstep: bool = False

    @property
    def batch_size(self) -> int:
        return self.token.shape[0]

    @property
    def chunk_tokens(self) -> int:
        return self.plan.gate_rows.shape[0]


@dataclass
class LayerView:
    """The current layer of each episode: arrays with leading axes ``lead`` = (B,) for a batch, or ()
    for one episode. Arrays may be views into the plan: do not write to them. E experts, K Top-K."""

    layer: np.ndarray  # lead, int
    token: np.ndarray  # lead, int
    topk_idx: np.ndarray  # lead + (K,)
    expert_terms: np.ndarray  # lead + (5, E) energies in the three scopes, 1, misses-the-deadline (TokenPlan)
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
    # observation parts (see DecodeSimulator.observation)
    gating: GatingRows  # the plan's gating rows
    gate_rows: np.ndarray  # lead, rows of ``gating``
    obs_gain: np.ndarray  # lead + (N,) float32
    obs_energy: np.ndarray  # lead + (E,) float32, observed energy / observed Top-K energy
    obs_latency: np.ndarray  # lead + (E,) float32
    # (budget unit, layer, token) as Python numbers when every row shares them (lockstep batches in layer
    # mode): lets evaluate and the observation use scalars instead of (B,) arrays
    uniform: tuple | None = None

    # gathered on demand: a step itself does not need them
    @property
    def probs(self) -> np.ndarray:
        """lead + (E,) router probabilities."""
        return np.take(self.gating.probs, self.gate_rows, axis=0)

    @property
    def topk_weight(self) -> np.ndarray:
        """lead + (K,) combine weights."""
        return np.take(self.gating.topk_weight, self.gate_rows, axis=0)

    @property
    def topk_mask(self) -> np.ndarray:
        """lead + (E,) bool, the Top-K set."""
        return np.take(self.gating.topk_mask, self.gate_rows, axis=0)


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
        self._identity_hosts = self._same_hosts_every_layer and self.hosts[0].tolist() == list(range(1, self.n_nodes + 1))
        self.layout = observation_layout(self.n_experts, self.top_k, self.n_nodes)
        self.obs_slices = observation_slices(self.layout)
        self.obs_size = sum(size for size, _, _ in self.layout.values())
        # budget_remaining and position are the last three entries of the flat layout
        self._budget_index = self.obs_slices["budget_remaining"].start
        assert self.obs_slices["position"].start == self._budget_index + 1 and self._budget_index + 3 == self.obs_size
        sl = self.obs_slices
        self._obs_gain, self._obs_energy = sl["channel_gain_db"], sl["energy_cost"]
        self._obs_latency = sl["latency_ratio"]
        # the observation's deviation unit per layer: eps_l, or the token budget
        self.budget_unit = self.layer_budget.copy() if budget.mode == "layer" else np.full(self.n_layers, self.token_budget)
        # costs differ between layers only with per-layer fading or per-layer host maps
        self.cost_per_layer = bool(ch.fading_per_layer or not self._same_hosts_every_layer)
        self._constants: dict = {}  # see _layer_constants
        self._layer_den = max(self.n_layers - 1, 1)
        self._token_den = max(self.n_tokens - 1, 1)
        self.layer_budget_list = self.layer_budget.tolist()
        self.layer_weight_list = [float(w) for w in self.layer_weight]

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
        state.lockstep = True
        return state

    def reset_rows(self, rng: np.random.Generator, state: DecodeState, rows: np.ndarray) -> None:
        """Reset only episodes ``rows`` (index array) of a batch in place (vector-env autoreset)."""
        fresh = self.reset(rng, len(rows), chunk=state.chunk_tokens)
        for name in ("positions", "waypoints", "speeds", "path_gain", "fading", "start", "token", "layer",
                     "chunk_start", "budget_used", "done", "perturbed_same", "perturbed_correct", "delta_loss"):
            getattr(state, name)[rows] = getattr(fresh, name)
        _assign_rows(state.plan, fresh.plan, rows)
        state.chunk_id += 1
        state.lockstep = state.lockstep and len(rows) == state.batch_size

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
            gains = path_g[:, None] * self.fading_model.gain(states).transpose(1, 0, 2)  # (n, epochs, N)
            path_gains = None  # built only for slotted uplinks (below)
        state.fading[sel] = fading
        tokens = np.minimum(state.chunk_start[sel][:, None] + np.arange(chunk), self.n_tokens - 1)  # (n, C)
        positions = state.start[sel][:, None] + tokens  # (n, C) trace positions
        gate_rows, gating, dense = self._plan_gating(rng, positions)
        shape = (n, chunk, epochs_per_token, self.n_nodes)
        if path_gains is None and self.config.radio.uplink_slots > 1:
            path_gains = np.broadcast_to(path_g[:, None], gains.shape)
        plan = self._plan(rng, gains.reshape(shape), gate_rows, gating, dense, where,
                          None if path_gains is None else path_gains.reshape(shape))
        if self.has_accuracy:
            K, E1 = self.top_k, self.n_experts + 1
            cells = positions[..., None] * self.n_layers + np.arange(self.n_layers)  # (n, C, L)
            plan.effect_rows = (cells[..., None] * K + np.arange(K)) * E1
            full = self.source.full_correct
            plan.full_correct = full[positions] if full is not None else np.ones(positions.shape, dtype=bool)
        _to_batch_last(plan)
        return plan

    def _plan_gating(self, rng: np.random.Generator, positions: np.ndarray):
        """(gate_rows (n, C, L), gating rows, dense) of tokens at ``positions`` (n, C)."""
        L = self.n_layers
        if self.source.positional:  # precomputed rows of every position: the plan only indexes them
            gating = position_gating_rows(self.source, self.weighted_mismatch, self.budget_unit, self.obs_slices)
            return positions[..., None] * L + np.arange(L), gating, False
        n, C = positions.shape
        flat = self.source.gates(positions.reshape(-1), rng)  # (n C, L, ...)
        R = n * C * L
        gating = build_gating_rows(self.weighted_mismatch, self.budget_unit, self.obs_slices, np.tile(np.arange(L), n * C),
                                   flat.probs.reshape(R, -1), flat.topk_idx.reshape(R, -1),
                                   flat.topk_weight.reshape(R, -1))
        return np.arange(R).reshape(n, C, L), gating, True

    def _plan(self, rng: np.random.Generator, channel_gain: np.ndarray, gate_rows, gating, dense: bool, positions,
              path_gains: np.ndarray) -> TokenPlan:
        """Costs of the planned tokens, batch axis FIRST (``_plan_chunk`` moves it last). channel_gain,
        path_gains (n, C, Lf, N) (only needed with slotted uplinks); positions (n, C, N, 2)."""
        comp, radio = self.config.compute, self.config.radio
        n, C, Lf, N = channel_gain.shape
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
        node_latency = np.empty((n, C, Lf, N + 1))
        node_latency[..., 1:] = costs.latency
        node_latency[..., 0] = local_time
        latency = self._by_expert(node_latency)
        late = node_latency > self.deadline * (1.0 + 1e-9)
        expert_terms = self._expert_energy(uplink, costs, local_time, late)
        gain_db = linear_to_db(channel_gain)
        observed = None if expected_uplink is None else self._expert_energy(expected_uplink, costs, local_time)
        topk_idx = np.take(gating.topk_idx, gate_rows, axis=0)
        topk_energy, reference = self._plan_topk_energy(expert_terms, topk_idx)
        if observed is None:
            energy_cost = expert_terms[..., self.scope_index, :] / reference[..., None]
        else:
            energy_cost = self._surrogate_energy_cost(observed, topk_idx)
        return TokenPlan(
            gate_rows=gate_rows, gating=gating, dense_gating=dense, expert_terms=expert_terms,
            observed_energy_scopes=observed, latency=latency, meets_deadline=expert_terms[..., 4, :] == 0.0,
            topk_energy=topk_energy, energy_reference=reference, channel_gain_db=gain_db,
            obs_gain=np.clip(gain_db, GAIN_DB_LOW, GAIN_DB_HIGH).astype(np.float32),
            obs_energy=np.minimum(energy_cost, MAX_ENERGY_COST).astype(np.float32),
            obs_latency=np.minimum(latency / self.deadline, MAX_LATENCY_RATIO).astype(np.float32),
            effect_rows=None, full_correct=None, helper_positions=positions)

    def _expert_energy(self, uplink, costs, local_time, late=None) -> np.ndarray:
        """Per-expert energies (n, C, Lc, 3, E) in the uplink / comm / system scopes from node costs
        (n, C, Lf, N); node 0 is the user device (no radio; P_gpu (t_load + t_comp) in the system scope).
        With ``late`` (n, C, Lf, N+1) bool: the (n, C, Lc, 5, E) ``expert_terms`` (rows 1 and late added)."""
        n, C, Lf, N = uplink.shape
        node_energy = np.empty((n, C, Lf, 3 if late is None else 5, N + 1))
        if late is not None:
            node_energy[..., 3, :] = 1.0
            node_energy[..., 4, :] = late
        node_energy[..., 0, 1:] = uplink
        node_energy[..., 1, 1:] = uplink + costs.downlink_energy
        node_energy[..., 2, 1:] = node_energy[..., 1, 1:] + costs.compute_energy
        node_energy[..., :2, 0] = 0.0
        node_energy[..., 2, 0] = self.config.compute.local_compute_power_w * local_time
        return self._by_expert(node_energy)

    def _by_expert(self, node_values: np.ndarray) -> np.ndarray:
        """Node-indexed values (n, C, Lf, ..., N+1) -> expert-indexed (n, C, Lc, ..., E) through the host map
        (Lc = Lf when every layer has the same host map, else L)."""
        if self._same_hosts_every_layer:
            if self._identity_hosts:  # expert e on helper e + 1 (one-to-one): a view, no gather
                return node_values[..., 1:]
            return np.take(node_values, self.hosts[0], axis=-1)
        n, C, Lf = node_values.shape[:3]
        out = np.empty((n, C, self.n_layers) + node_values.shape[3:-1] + (self.n_experts,))
        for layer in range(self.n_layers):
            out[:, :, layer] = np.take(node_values[:, :, layer if Lf > 1 else 0], self.hosts[layer], axis=-1)
        return out

    def override_gates(self, state: DecodeState, index: int, probs, topk_idx, topk_weight) -> None:
        """Replace episode ``index``'s gating at its current (token, layer) by gates computed elsewhere
        (the live backend: real router outputs after the executed experts changed the hidden state)."""
        plan = state.plan
        _densify(plan)
        layer = int(state.layer[index])
        c = int(state.token[index]) - int(state.chunk_start[index])
        row = build_gating_rows(self.weighted_mismatch, self.budget_unit, self.obs_slices, np.array([layer]),
                                np.asarray(probs, dtype=plan.gating.probs.dtype).reshape(1, -1),
                                np.asarray(topk_idx, dtype=np.int64).reshape(1, -1),
                                np.asarray(topk_weight, dtype=np.float64).reshape(1, -1))
        plan.gating.assign(plan.gate_rows[c, layer, index:index + 1], row)
        cost_layer = layer if self.cost_per_layer else 0
        energy = plan.expert_terms[c, cost_layer, self.scope_index, :, index]
        topk_energy, reference = self._topk_energy(energy, row.topk_idx[0])
        plan.topk_energy[c, layer, index], plan.energy_reference[c, layer, index] = topk_energy, reference
        if plan.observed_energy_scopes is None:
            energy_cost = energy / reference
        else:
            energy_cost = self._surrogate_energy_cost(plan.observed_energy_scopes[c, cost_layer, ..., index],
                                                      row.topk_idx[0])
        plan.obs_energy[c, layer, index] = np.minimum(energy_cost, MAX_ENERGY_COST)
        state.chunk_id += 1  # cached copies of the plan are stale

    # ---- the current layer -----------------------------------------------------------------------
    def view(self, state: DecodeState, index=None) -> LayerView:
        """The current layer of every episode (``index=None``), or of episode ``index`` alone."""
        if index is None and state.batch_size > 1:
            lockstep = self._lockstep_view(state)
            if lockstep is not None:
                return lockstep
        if index is None:
            layer, token = state.layer, state.token
            batch = np.arange(state.batch_size)
            chunk_token = token - state.chunk_start
            if self.budget_mode == "layer":
                budget = self.layer_budget[layer]
                unit = budget
            else:
                budget = self.token_budget - state.budget_used
                unit = np.full(state.batch_size, self.token_budget)
            return self._make_view(state.plan, batch, chunk_token, layer, layer, token, budget, unit,
                                   self.layer_weight[layer])
        layer, token = int(state.layer[index]), int(state.token[index])
        if self.budget_mode == "layer":
            budget = unit = float(self.layer_budget[layer])
        else:
            budget, unit = self.token_budget - float(state.budget_used[index]), self.token_budget
        return self._make_view(state.plan, index, token - int(state.chunk_start[index]), layer, layer, token, budget,
                               unit, self.layer_weight[layer])

    def _lockstep_view(self, state: DecodeState) -> LayerView | None:
        """The batch view through basic slices ``[:, c, l]`` when every episode is at the same layer and
        chunk offset (``state.lockstep``), as after a joint reset; None otherwise."""
        if not state.lockstep:
            return None
        B = state.batch_size
        l, c = int(state.layer[0]), int(state.token[0] - state.chunk_start[0])
        constants = self._layer_constants(B, l)  # read-only (B,) arrays: budget, unit, kappa
        layer_mode = self.budget_mode == "layer"
        if layer_mode:
            budget = unit = constants[0]
        else:
            budget, unit = self.token_budget - state.budget_used, constants[1]
        view = self._make_view(state.plan, slice(None), c, l, state.layer.copy(), state.token.copy(), budget, unit,
                               constants[2])
        if layer_mode:
            view.uniform = (self.layer_budget_list[l], l, int(state.token[0]))
        return view

    def _layer_constants(self, batch: int, layer: int) -> tuple:
        """(eps_l, budget unit, kappa_l, last layer?) of ``layer`` as read-only (batch,) arrays, made once per
        (batch, layer)."""
        key = (batch, layer)
        if key not in self._constants:
            unit = self.layer_budget[layer] if self.budget_mode == "layer" else self.token_budget
            arrays = tuple(np.full(batch, value) for value in (self.layer_budget[layer], unit, self.layer_weight[layer],
                                                               layer == self.n_layers - 1))
            for array in arrays:
                array.flags.writeable = False
            self._constants[key] = arrays
        return self._constants[key]

    def _make_view(self, plan: TokenPlan, b, c, l, layer, token, budget, unit, layer_weight) -> LayerView:
        """The view at batch rows ``b``, chunk offsets ``c`` and layers ``l``: ``b`` = slice(None) with int
        ``c`` and ``l`` (lockstep: contiguous plan blocks, shown batch-first by transposed views), an int
        (one episode), or index arrays (each episode at its own place)."""
        lc = l if self.cost_per_layer else 0
        lf = l if self.config.channel.fading_per_layer else 0
        if isinstance(b, slice):
            def pick(x, layer_index):
                return _lead_first(x[c, layer_index])

            def pick_obs(x, layer_index):  # batch axis already first in the block
                return x[c, layer_index]
        else:
            def pick(x, layer_index):
                return x[c, layer_index, ..., b]

            def pick_obs(x, layer_index):
                return x[c, layer_index, b]
        g = plan.gating
        rows = pick(plan.gate_rows, l)
        terms = pick(plan.expert_terms, lc)
        energy = terms[..., self.scope_index, :]
        topk_idx = np.take(g.topk_idx, rows, axis=0)
        reference = pick(plan.energy_reference, l)
        return LayerView(
            layer=layer, token=token, topk_idx=topk_idx, expert_terms=terms, energy_scopes=terms[..., :3, :],
            energy=energy, latency=pick(plan.latency, lc), meets_deadline=pick(plan.meets_deadline, lc),
            deviation_table=np.take(g.deviation_table, rows, axis=0), layer_weight=layer_weight, budget=budget,
            budget_unit=unit, topk_energy=pick(plan.topk_energy, l), energy_reference=reference,
            channel_gain_db=pick(plan.channel_gain_db, lf), gating=g, gate_rows=rows,
            obs_gain=pick_obs(plan.obs_gain, lf), obs_energy=pick_obs(plan.obs_energy, l),
            obs_latency=pick_obs(plan.obs_latency, lc))

    def _plan_topk_energy(self, expert_terms: np.ndarray, topk_idx: np.ndarray):
        """:meth:`_topk_energy` of a whole plan: expert_terms (n, C, Lc, 5, E), topk_idx (n, C, L, K), by
        one flat gather (many times cheaper than take_along_axis on broadcast arrays)."""
        energy = np.ascontiguousarray(expert_terms[..., self.scope_index, :])  # (n, C, Lc, E): flat-indexable
        n, C, Lc, E = energy.shape
        L = topk_idx.shape[2]
        cell = (np.arange(n)[:, None] * C + np.arange(C)) * Lc  # (n, C) first cost cell of each token
        cell = cell[..., None] + (np.arange(L) if Lc > 1 else 0)  # (n, C, L)
        topk_energy = np.take(energy, (cell * E)[..., None] + topk_idx) @ np.ones(topk_idx.shape[-1])
        if (topk_energy > 0).all():  # the usual case: every Top-K set costs energy
            return topk_energy, topk_energy.copy()
        return self._topk_energy(energy, topk_idx)

    @staticmethod
    def _topk_energy(energy: np.ndarray, topk_idx: np.ndarray):
        """(Top-K energy, reward reference) from energies lead + (E,) (any broadcastable layer axis) and
        Top-K indices lead + (K,). The reference is the Top-K energy, or the mean expert energy when that is
        0 (all Top-K experts on the user device)."""
        energy = np.broadcast_to(energy, topk_idx.shape[:-1] + energy.shape[-1:])
        topk_energy = np.take_along_axis(energy, topk_idx, axis=-1).sum(axis=-1)
        reference = np.where(topk_energy > 0, topk_energy, energy.mean(axis=-1))
        return topk_energy, np.where(reference > 0, reference, 1.0)

    def _surrogate_energy_cost(self, observed_scopes: np.ndarray, topk_idx: np.ndarray) -> np.ndarray:
        """The observation's energy entries with slotted uplinks: the surrogate energy over the surrogate
        Top-K energy (the reward's reference stays the spent Top-K energy). observed_scopes lead + (3, E)
        (a layer axis of 1 spans the layers), topk_idx lead + (K,)."""
        seen = observed_scopes[..., self.scope_index, :]
        seen = np.broadcast_to(seen, topk_idx.shape[:-1] + seen.shape[-1:])
        seen_topk = np.take_along_axis(seen, topk_idx, axis=-1).sum(axis=-1)
        return seen / np.where(seen_topk > 0, seen_topk, 1.0)[..., None]

    def observation(self, view: LayerView) -> np.ndarray:
        """Flat float32 observation(s) of a view, in layout order (a fresh array)."""
        obs = self._static_observation(view.gating, view.gate_rows, view.obs_gain, view.obs_energy, view.obs_latency)
        if view.uniform is not None:  # scalars: no (B,) arithmetic
            i = self._budget_index
            obs[..., i] = 1.0  # budget = unit = eps_l
            obs[..., i + 1] = view.uniform[1] / self._layer_den
            obs[..., i + 2] = view.uniform[2] / self._token_den
            return obs
        fraction = view.budget / view.budget_unit
        return self.fill_observation(obs, fraction if np.ndim(fraction) else float(fraction), view.layer, view.token)

    def _static_observation(self, gating: GatingRows, rows, obs_gain, obs_energy, obs_latency) -> np.ndarray:
        """Observations lead + (D,) without budget and position (a fresh array); lead = rows' shape; the
        other parts broadcast to lead + (size,)."""
        obs = np.take(gating.obs_template, rows, axis=0)  # gating entries filled, channel entries zero
        obs[..., self._obs_gain] = obs_gain
        obs[..., self._obs_energy] = obs_energy
        obs[..., self._obs_latency] = obs_latency
        return obs

    def fill_observation(self, obs: np.ndarray, budget_fraction, layer, token) -> np.ndarray:
        """Write the step-dependent entries (budget left, position) into static observation(s) ``obs``."""
        i = self._budget_index
        if isinstance(budget_fraction, float):  # one episode: Python arithmetic beats numpy calls on scalars
            obs[i] = min(max(float(budget_fraction), 0.0), MAX_DEVIATION)
            obs[i + 1] = layer / self._layer_den
            obs[i + 2] = token / self._token_den
        else:
            obs[..., i] = np.minimum(np.maximum(budget_fraction, 0.0), MAX_DEVIATION)
            obs[..., i + 1] = layer / self._layer_den
            obs[..., i + 2] = token / self._token_den
        return obs

    def evaluate(self, view: LayerView, executed: np.ndarray) -> dict[str, np.ndarray]:
        """Outcomes of executing ``executed`` (lead + (E,), bool) on ``view``; no state changes.
        Works for a batch (lead (B,)) or a single episode (lead ()). Computed with the batch on the last
        axis, so reductions over experts and slots vectorise over the batch (lockstep views are then
        contiguous blocks of the plan)."""
        single = np.ndim(executed) == 1
        to_batch_last = _one_batch_last if single else _batch_last
        terms = to_batch_last(view.expert_terms)  # (5, E, B)
        executed = np.ascontiguousarray(to_batch_last(executed))  # (E, B) bool; contiguous: it is used 4 times
        effective = executed & to_batch_last(view.meets_deadline) if self.enforce_deadline else executed
        executed_f = executed.astype(np.float64)
        # energy is spent by every executed expert, even a late one; summing the expert terms gives the
        # three energy scopes, the executed count and the deadline misses
        sums = np.einsum("seb,eb->sb", terms, executed_f)  # (5, B)
        energy_scopes = sums[:3]
        energy = sums[self.scope_index]
        weighted_dev, server = serve_slots_batch_last(to_batch_last(view.deviation_table), effective)
        n_kept = (server == to_batch_last(view.topk_idx)).sum(axis=0)
        n_skipped = (server == self.n_experts).sum(axis=0)
        latency = (to_batch_last(view.latency) * executed_f).max(axis=0)
        tallies = sums[3:].astype(np.int64)  # exact: sums of 0/1
        n_executed, misses = tallies[0], tallies[1]
        lost = misses if self.enforce_deadline else np.zeros_like(misses)
        if view.uniform is not None:  # layer mode, one eps_l for all rows: budget = unit = a Python float
            available = unit = view.uniform[0]
        else:
            unit = view.budget_unit
            available = view.budget if self.budget_mode == "layer" else np.maximum(view.budget, 0.0)  # eps_l > 0
        violated, overrun = budget_overrun(weighted_dev, available, unit)
        rw = self.config.reward
        reward_energy = -energy / view.energy_reference
        reward_deviation = (-rw.deviation_weight) * overrun
        reward_deadline = (-rw.deadline_weight) * misses if self.enforce_deadline else np.zeros(np.shape(misses))
        out = {
            "reward": reward_energy + reward_deviation + reward_deadline,
            "reward_energy": reward_energy,
            "reward_deviation": reward_deviation,
            "reward_deadline": reward_deadline,
            "energy_j": energy,
            "topk_energy_j": view.topk_energy,
            "energy_uplink_j": energy_scopes[0],
            "energy_comm_j": energy_scopes[1],
            "energy_system_j": energy_scopes[2],
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
            "server": server.T,  # (B, K)
        }
        if single:  # back to one episode's scalars
            out = {key: value[0] if np.ndim(value) else value for key, value in out.items()}
        return out

    # ---- single-episode fast path ---------------------------------------------------------------
    def plan_lists(self, state: DecodeState, index: int) -> dict:
        """Episode ``index``'s current plan chunk as nested Python lists (built once per chunk), for
        :meth:`evaluate_one`: on 8-expert layers plain Python beats numpy's per-call overhead ~5x.
        Cost lists have the cost layer axis (index ``layer if cost_per_layer else 0``); ``obs_static``
        is the chunk's (C, L, D) observations without budget and position (an array)."""
        plan = state.plan
        g = plan.gating
        rows = plan.gate_rows[..., index]  # (C, L)
        topk_idx = np.take(g.topk_idx, rows, axis=0)
        reference = plan.energy_reference[..., index]
        return {
            "energy_scopes": plan.energy_scopes[..., index].tolist(),
            "latency": plan.latency[..., index].tolist(),
            "meets": plan.meets_deadline[..., index].tolist(),
            "table": np.take(g.deviation_table, rows, axis=0).tolist(),
            "topk_idx": topk_idx.tolist(),
            "topk_energy": plan.topk_energy[..., index].tolist(),
            "reference": reference.tolist(),
            "obs_static": self._static_observation(g, rows, plan.obs_gain[..., index, :],
                                                   plan.obs_energy[..., index, :], plan.obs_latency[..., index, :]),
        }

    def evaluate_one(self, lists: dict, chunk_token: int, layer: int, executed: list, budget: float,
                     budget_unit: float) -> dict:
        """:meth:`evaluate` for one episode on Python lists (same results; tests check the equivalence).
        ``executed`` is a list of E bools/0-1 ints; returns Python numbers."""
        E = self.n_experts
        cost_layer = layer if self.cost_per_layer else 0
        scopes = lists["energy_scopes"][chunk_token][cost_layer]
        latency = lists["latency"][chunk_token][cost_layer]
        meets = lists["meets"][chunk_token][cost_layer]
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
        # the env's info keys in the env's order (INFO_KEYS), then reward and server: the env pops those two
        # and hands the rest out as its info without copying
        return {
            "energy_j": energy, "topk_energy_j": lists["topk_energy"][chunk_token][layer],
            "energy_uplink_j": up, "energy_comm_j": comm, "energy_system_j": system,
            "deviation": weighted_dev / self.layer_weight_list[layer], "weighted_deviation": weighted_dev,
            "deviation_budget": budget, "budget_violated": int(violated), "latency_s": longest,
            "deadline_misses": misses, "n_executed": n_exec, "n_lost": lost, "n_kept": n_kept,
            "n_replaced": self.top_k - n_kept - n_skipped, "n_skipped": n_skipped,
            "reward_energy": reward_energy, "reward_deviation": reward_deviation, "reward_deadline": reward_deadline,
            "reward": reward_energy + reward_deviation + reward_deadline, "server": server,
        }

    # ---- real accuracy (effect tables) -----------------------------------------------------------
    @property
    def has_accuracy(self) -> bool:
        return bool(getattr(self.source, "has_effects", False))

    def _effect_lookup(self):
        """Flat (T L K (E+1),) tables for :meth:`record_accuracy`: a uint8 code (bit 0: stays correct, bit 1:
        keeps the full model's prediction) and the loss change, neutral (3, 0) wherever the slot is served
        by its own Top-K expert, so a step gathers without masking unperturbed slots. Built once per source."""
        tables = self.__dict__.get("_effect_tables") or _EFFECT_LOOKUPS.get(self.source)
        if tables is None:
            src = self.source
            effects = src.effects
            T, L, K, E1 = effects["effect_correct"].shape
            code = effects["effect_correct"].astype(np.uint8)
            if "effect_same" in effects:  # without it, only "no perturbation at all" keeps the prediction
                code |= effects["effect_same"].astype(np.uint8) << 1
            dloss = (effects["effect_dloss"].astype(np.float64) if "effect_dloss" in effects
                     else np.zeros(code.shape))
            own = (*np.indices((T, L, K)), src.topk_idx)  # the slot's own expert: no perturbation
            code[own] = 3
            dloss[own] = 0.0
            tables = _EFFECT_LOOKUPS[src] = (code.reshape(-1), dloss.reshape(-1))
        self._effect_tables = tables
        return tables

    def record_accuracy(self, state: DecodeState, server: np.ndarray) -> dict:
        """Fold this layer's serving decisions into each episode's token accuracy (call before advance).

        ``server`` is (B, K), the slots' servers (:meth:`evaluate`); a slot served by its own Top-K expert
        (the source's) is not perturbed. The effect tables hold single perturbations (one slot of one layer
        served by another expert or skipped, all else as the full model); a token's outcome is estimated
        as: prediction unchanged if every perturbation so far left it unchanged (then correct iff the full
        model is), else correct iff every perturbation left it correct. Exact with at most one perturbation
        per token; with more it ignores interactions (the live backend measures them).
        Returns (B,) arrays: accuracy_correct, accuracy_same, accuracy_full, delta_loss, token_complete."""
        code, dloss = self._effect_lookup()
        plan = state.plan
        if state.lockstep:
            c, layer = int(state.token[0] - state.chunk_start[0]), int(state.layer[0])
            flat = plan.effect_rows[c, layer] + server.T  # (K, B)
            full = plan.full_correct[c]
            complete = self._layer_constants(state.batch_size, layer)[3]
        else:
            c = state.token - state.chunk_start
            flat = (plan.effect_rows[c, state.layer, :, np.arange(state.batch_size)] + server).T
            full = plan.full_correct[c, np.arange(state.batch_size)]
            complete = state.layer == self.n_layers - 1
        # slots on the leading axis: the AND and the sum over slots vectorise over the batch
        kept = np.bitwise_and.reduce(np.take(code, flat), axis=0)
        state.perturbed_correct &= (kept & 1).view(bool)
        state.perturbed_same &= (kept >> 1).view(bool)
        state.delta_loss += np.take(dloss, flat).sum(axis=0)
        return {
            "accuracy_correct": np.where(state.perturbed_same, full, state.perturbed_correct),
            "accuracy_same": state.perturbed_same.copy(),
            "accuracy_full": full.copy(),
            "delta_loss": state.delta_loss.copy(),
            "token_complete": complete,
        }

    def record_accuracy_one(self, state: DecodeState, server: list, topk_idx: list, index: int = 0,
                            position: int | None = None, layer: int | None = None) -> dict:
        """:meth:`record_accuracy` for one episode on Python values (same results; tests check it).
        ``position`` (trace position) and ``layer``, when the caller knows them, save reading the state."""
        src = self.source
        if position is None:
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
            return self.advance_one(rng, state, float(np.asarray(weighted_deviation).reshape(-1)[0]))
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

    def advance_one(self, rng: np.random.Generator, state: DecodeState, weighted_deviation: float) -> np.ndarray:
        """:meth:`advance` for a batch of one whose episode is not over, on Python numbers (same semantics,
        a fraction of the overhead)."""
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


def _assign_rows(target: TokenPlan, source: TokenPlan, rows) -> None:
    """Copy plan ``source`` (len(rows) episodes) into episodes ``rows`` (index array) of plan ``target``."""
    for f in dataclasses.fields(target):
        if f.name in ("gate_rows", "gating", "dense_gating"):
            continue
        if getattr(target, f.name) is None:
            continue  # an optional entry this source or radio does not have
        if f.name.startswith("obs_"):  # the batch axis is second to last
            getattr(target, f.name)[..., rows, :] = getattr(source, f.name)
        else:  # the batch axis is last
            getattr(target, f.name)[..., rows] = getattr(source, f.name)
    if source.dense_gating or target.dense_gating:
        _densify(target)
        _densify(source)
        per_episode = target.gate_rows[..., 0].size  # dense rows are episode-major: (b * C + c) * L + l
        flat_rows = (np.asarray(rows)[:, None] * per_episode + np.arange(per_episode)).reshape(-1)
        target.gating.assign(flat_rows, source.gating)
    else:  # both index the same shared per-position rows
        target.gate_rows[..., rows] = source.gate_rows


def _densify(plan: TokenPlan) -> None:
    """Give ``plan`` its own gating rows (episode-major), so they can be written without touching the
    shared per-position rows."""
    if plan.dense_gating:
        return
    C, L, n = plan.gate_rows.shape
    plan.gating = plan.gating.take(plan.gate_rows.transpose(2, 0, 1))  # episode-major order
    plan.gate_rows = np.ascontiguousarray(np.arange(n * C * L).reshape(n, C, L).transpose(1, 2, 0))
    plan.dense_gating = True


def _to_batch_last(plan: TokenPlan) -> None:
    """Move the batch axis of every plan array from first to last (``obs_*`` entries: second to last),
    as contiguous copies."""
    for name in _PLAN_ARRAYS:
        value = getattr(plan, name)
        if value is None:
            continue
        to = value.ndim - 2 if name.startswith("obs_") else value.ndim - 1
        shape = value.shape[1:to + 1] + (value.shape[0],) + value.shape[to + 1:]
        if value.shape[0] == 1:  # one episode: the same memory order, no copy
            setattr(plan, name, value.reshape(shape))
        else:
            setattr(plan, name, np.ascontiguousarray(np.moveaxis(value, 0, to)))


_PLAN_ARRAYS = tuple(f.name for f in dataclasses.fields(TokenPlan) if f.name not in ("gating", "dense_gating"))


def _batch_last(x: np.ndarray) -> np.ndarray:
    """lead (B,) + shape -> shape + (B,) (a view)."""
    return x.transpose(tuple(range(1, x.ndim)) + (0,))


def _lead_first(x: np.ndarray) -> np.ndarray:
    """shape + (B,) -> (B,) + shape (a view): the inverse of :func:`_batch_last`."""
    return x.transpose((x.ndim - 1,) + tuple(range(x.ndim - 1)))


def _one_batch_last(x) -> np.ndarray:
    """One episode's array -> a batch of one on the last axis (a view)."""
    return np.asarray(x)[..., None]


@dataclass(frozen=True)
class _Dims:
    n_layers: int
    n_experts: int


def _dims(source: GatingSource) -> _Dims:
    return _Dims(source.n_layers, source.n_experts)
