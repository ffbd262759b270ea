"""Planning of decoding: the channels, costs and gating of the next C tokens of every episode, in one batched
numpy call per chunk (a step then only reads its entries; see :mod:`wide_env.sim.decode.kernel`).

Every array is STEP-MAJOR, (C, Lx, n, ...): chunk token, then layer, then episode, then the entries of one
decision. The entries all episodes need at one step, ``x[c, l]``, are then one contiguous block (a lockstep
batch streams through memory), and each episode's entries are contiguous inside it. Lx is L for gating,
Lc for costs (1 when every layer sees the same channel and host map, else L), Lf for the channel (1, or L
with per-layer fading), 1 for helper positions.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, fields

import numpy as np

from wide_env.errors import ConfigError
from wide_env.sim import slots
from wide_env.sim.channel import move_random_waypoint
from wide_env.sim.deviation import slot_deviation_table
from wide_env.sim.decode.plan_fill import all_finite, all_finite3, expert_keys_into, topk_energy_into
from wide_env.sim.gating_rows import GatingRows, build_gating_rows, position_gating_rows
from wide_env.sim.observation import GAIN_DB_HIGH, GAIN_DB_LOW, MAX_ENERGY_COST, MAX_LATENCY_RATIO
from wide_env.sim.physics import by_expert, call_latency, node_cost_table, node_costs, shannon_rate, topk_reference
from wide_env.sim.scenario import Scenario
from wide_env.sim.units import linear_to_db

# Layer-steps planned ahead in one batched call (all envs x tokens x layers): amortises numpy's per-call
# overhead over many steps while bounding memory for large vector envs.
PLAN_LAYER_STEPS = 32768

#: the episode axis of every plan array
EPISODES = 2


@dataclass
class TokenPlan:
    """The next C tokens of n episodes, step-major. E experts, K Top-K, N helpers, D observation entries."""

    # (C, Lc, n, 4, E) per expert call: J spent in the uplink / comm / system scopes, then the latency (s)
    costs: np.ndarray
    meets_deadline: np.ndarray  # (C, Lc, n, E) bool
    observed_energy_scopes: np.ndarray | None  # (C, Lc, n, 3, E) what the observation shows (slotted), else None
    # (C, L, n, 2): objective-scope energy of the Top-K set and the reward's energy unit (physics.topk_reference), J
    topk: np.ndarray
    probs: np.ndarray  # (C, L, n, E) float32 router probabilities
    topk_idx: np.ndarray  # (C, L, n, K) int64, descending probability
    topk_weight: np.ndarray  # (C, L, n, K) combine weights
    deviation_table: np.ndarray  # (C, L, n, K, E+1) kappa_l w_k D_l(S_k, j), weighted model units, column E = skip
    # the channel's observation entries, float32, clipped to their boxes; the step writes them with the
    # gating entries (from the arrays above), the budget left and the position
    obs_gain: np.ndarray  # (C, Lf, n, N) channel_gain_db
    obs_expert: np.ndarray  # (C, L, n, len(EXPERT_KEYS), E) the per-expert keys of EXPERT_KEYS
    deadline_probability: np.ndarray  # (C, Lc, n, E) P(meeting the deadline | what the device knows)
    channel_gain_db: np.ndarray  # (C, Lf, n, N)
    helper_positions: np.ndarray  # (C, 1, n, N, 2) m, where the helpers are at each token
    # real accuracy (wide_env.gating.effects; sources without its tables: width 0): the accuracy table's row of
    # every (slot, server) of the planned tokens (the zero row where a slot is served by its own expert), the
    # tokens' base values (the full model's candidate logits) and whether the full model predicts each token
    effect_rows: np.ndarray  # (C, L, n, K (E+1)) int32
    effect_base: np.ndarray  # (C, 1, n, M + 2) float64
    full_correct: np.ndarray  # (C, 1, n) bool

    #: (L, E, E+1) kappa_l D_l, for the deviation tables derived on first read (set by the planner; not a field)
    weighted_mismatch = None

    @property
    def chunk_tokens(self) -> int:
        return self.costs.shape[0]

    @property
    def energy_scopes(self) -> np.ndarray:
        """(C, Lc, n, 3, E) J of executing each expert: uplink / comm / system scope."""
        return self.costs[..., :3, :]

    @property
    def latency(self) -> np.ndarray:
        """(C, Lc, n, E) s."""
        return self.costs[..., 3, :]

    @property
    def topk_energy(self) -> np.ndarray:
        """(C, L, n) objective-scope energy of the Top-K set, J."""
        return self.topk[..., 0]

    @property
    def energy_reference(self) -> np.ndarray:
        """(C, L, n) the reward's energy unit, J."""
        return self.topk[..., 1]


def _deviation_table(plan: TokenPlan) -> np.ndarray:
    """The plan's deviation tables: the stored ones, or derived once from the Top-K sets and weights (the step
    kernel derives its entries the same way, wide_env.sim.decode.kernel; planning gathers none)."""
    table = plan.__dict__.get("_deviation_table")
    if table is None:
        C, L = plan.topk_idx.shape[:2]
        table = plan.__dict__["_deviation_table"] = slot_deviation_table(
            plan.weighted_mismatch, np.arange(L)[None, :, None], plan.topk_idx, plan.topk_weight)
    return table


def _set_deviation_table(plan: TokenPlan, table: np.ndarray | None) -> None:
    plan.__dict__["_deviation_table"] = table


# a field (the dataclass's __init__, fields(), repr and the plan pins see it) read through the derivation above
TokenPlan.deviation_table = property(_deviation_table, _set_deviation_table)
#: fields derived from others: take / assign / concat leave them to be derived again
DERIVED = ("deviation_table",)

#: per-expert observation keys planned from the channel (``obs_expert``'s rows, in this order)
EXPERT_KEYS = ("energy_cost", "latency_ratio", "deadline_probability")


def chunk_size(scn: Scenario, batch: int) -> int:
    """Tokens planned per batched call for a batch of ``batch`` episodes."""
    return int(max(1, min(scn.n_tokens, PLAN_LAYER_STEPS // max(1, batch * scn.n_layers))))


def plan_tokens(scn: Scenario, rng: np.random.Generator, state, rows, chunk: int, fresh: bool,
                effects: tuple) -> TokenPlan:
    """Channels, gating and costs of tokens chunk_start .. chunk_start+chunk-1 for episodes ``rows`` of
    ``state`` (None = all); advances their fading (and mobility) state. ``fresh``: the stored channel is
    already token 0's (just reset), so the first epoch does not fade. ``effects``: the source's accuracy
    lookups (rows (T, L, K (E+1)), base (T, M + 2), full_correct (T,), ...), or arrays with no rows."""
    sel = slice(None) if rows is None else rows
    cfg = scn.config
    pl, ch = cfg.placement, cfg.channel
    epochs_per_token = scn.n_layers if scn.fading_per_layer else 1
    fading, path_g = state.fading[sel], state.path_gain[sel]
    n, N = fading.shape[0], scn.n_nodes
    epochs = chunk * epochs_per_token
    where = np.empty((chunk, 1, n, N, 2))
    where[:] = state.positions[sel]
    if pl.mobility:  # pedestrians move once per token: walk the epochs in order
        gains = np.empty((epochs, n, N))
        path_gains = np.empty_like(gains)  # large-scale part alone (slotted uplinks fade within the window)
        for epoch in range(epochs):
            if not (fresh and epoch == 0):
                fading = scn.fading.advance(rng, fading)
                if epoch % epochs_per_token == 0:
                    pos, wp, sp = move_random_waypoint(
                        rng, state.positions[sel], state.waypoints[sel], state.speeds[sel], ch.token_interval_s,
                        pl.r_min_m, pl.r_max_m, (pl.speed_min_mps, pl.speed_max_mps))
                    state.positions[sel], state.waypoints[sel], state.speeds[sel] = pos, wp, sp
                    path_g = scn.path_loss.gain(np.linalg.norm(pos, axis=-1), state.path_state[sel])
                    state.path_gain[sel] = path_g
                    where[epoch // epochs_per_token, 0] = pos
            gains[epoch] = path_g * scn.fading.gain(fading)
            path_gains[epoch] = path_g
    else:  # static helpers: every epoch's fading in one draw
        states, last = scn.fading.sequence(rng, fading, epochs - 1 if fresh else epochs)
        if fresh:
            states = np.concatenate([fading[None], states], axis=0)
        fading = last if len(states) else fading
        gains = path_g * scn.fading.gain(states)  # (epochs, n, N)
        # the large-scale part alone: only slotted uplinks read it (they fade within the window)
        path_gains = np.broadcast_to(path_g, gains.shape) if cfg.radio.uplink_slots > 1 else None
    state.fading[sel] = fading
    tokens = np.minimum(state.chunk_start[sel] + np.arange(chunk)[:, None], scn.n_tokens - 1)  # (C, n)
    positions = state.start[sel] + tokens  # (C, n) trace positions
    L = scn.n_layers
    position_rows = positions[:, None, :] * L + np.arange(L)[:, None]  # (C, L, n): row position * L + layer
    gating = plan_gating(scn, rng, positions, position_rows)
    # queueing delays of every epoch and the ones before them (what the device knows when it decides)
    delays = scn.queue.sequence(rng, state.queue_last[sel], epochs)  # (epochs, n, N)
    known = np.concatenate([state.queue_last[sel][None], delays[:-1]])
    state.queue_last[sel] = delays[-1]
    shape = (chunk, epochs_per_token, n, N)
    plan = _plan_costs(scn, rng, gains.reshape(shape), None if path_gains is None else path_gains.reshape(shape),
                       delays.reshape(shape),
                       known.reshape(shape), gating, where)
    check_finite(scn, plan)
    table_rows, base, full = effects[:3]
    if table_rows.shape[0]:
        rows = position_rows.reshape(-1)  # (c, l, b) order
        plan.effect_rows = table_rows.reshape(-1, table_rows.shape[-1]).take(rows, axis=0).reshape(chunk, L, n, -1)
        plan.effect_base = base.take(positions, axis=0)[:, None]
        plan.full_correct = full.take(positions)[:, None, :]
    else:
        plan.effect_rows = np.zeros((chunk, scn.n_layers, n, 0), dtype=np.int32)
        plan.effect_base = np.zeros((chunk, 1, n, 0))
        plan.full_correct = np.ones((chunk, 1, n), dtype=bool)
    return plan


def plan_gating(scn: Scenario, rng: np.random.Generator, positions: np.ndarray,
                position_rows: np.ndarray | None = None) -> GatingRows:
    """Gating rows of the tokens at trace ``positions`` (C, n) in every layer, in step-major order: row
    (c L + l) n + b. A recorded trace's rows are gathered from its per-position tables (``position_rows``: their
    rows, positions[:, None, :] * L + arange(L)[:, None], where the caller has them); a synthetic source draws
    fresh gating."""
    C, n = positions.shape
    L = scn.n_layers
    if scn.source.positional:  # precomputed rows of every position: gather them
        table = _SCENARIO_ROWS.get(scn)
        if table is None:  # (the lookup by source and mismatch tables, once per scenario)
            table = _SCENARIO_ROWS[scn] = position_gating_rows(scn.source, scn.weighted_mismatch)
        if position_rows is None:
            position_rows = positions[:, None, :] * L + np.arange(L)[:, None]
        return table.take(position_rows, deviation_table=False)
    flat = scn.source.gates(positions.reshape(-1), rng)  # (C n, L, ...)
    R = C * n * L
    order = lambda x: x.reshape(C, n, L, -1).transpose(0, 2, 1, 3).reshape(R, -1)  # noqa: E731  (c, l, b) rows
    return build_gating_rows(scn.weighted_mismatch, np.tile(np.repeat(np.arange(L), n), C), order(flat.probs),
                             order(flat.topk_idx), order(flat.topk_weight))


#: a scenario's position gating rows (wide_env.sim.gating_rows.position_gating_rows, looked up once per scenario)
_SCENARIO_ROWS: "weakref.WeakKeyDictionary[Scenario, GatingRows]" = weakref.WeakKeyDictionary()


def _plan_costs(scn: Scenario, rng, channel_gain, path_gains, queue_delays, known_delays, gating: GatingRows,
                positions) -> TokenPlan:
    """Costs of the planned tokens: channel_gain, path_gains (None without slotted uplinks, the only readers), the
    realised queueing delays and the delays the device knows (the previous epoch's), all (C, Lf, n, N); positions
    (C, 1, n, N, 2)."""
    link, radio = scn.link, scn.config.radio
    C, Lf, n, N = channel_gain.shape
    L, E = scn.n_layers, scn.n_experts
    idle = node_costs(channel_gain, link)  # an idle helper: the latency the device can count on
    deadline = link.deadline_s * (1.0 + 1e-9)
    room = deadline - link.compute_time_s - idle.downlink_time  # for max(t_ul, q + t_load)
    uplink, observed, uplink_time = None, None, idle.uplink_time
    uplink_fits = idle.uplink_time <= room
    if radio.uplink_slots > 1:
        uplink, uplink_time, uplink_fits, surrogate = _slotted_uplink(scn, rng, channel_gain, path_gains,
                                                                      idle.downlink_time)
        observed = _experts(scn, node_cost_table(idle, link, surrogate, _local(scn)))[..., :3, :]
    realised_latency = call_latency(uplink_time, idle.downlink_time, link, queue_delays)
    expert_costs = _experts(scn, node_cost_table(idle, link, uplink, _local(scn), realised_latency))  # (C, Lc, n, 4, E)
    # what the device knows of each call: its latency at an idle helper, and P(meeting the deadline)
    meet = uplink_fits * scn.queue.below_probability(room - link.load_time_s, known_delays)
    knowable = _experts(scn, _knowable(scn, idle.latency, meet, link))  # (C, Lc, n, 2, E)
    topk_idx = gating.topk_idx.reshape(C, L, n, -1)
    energy = expert_costs[..., scn.scope_index, :]  # (C, Lc, n, E); Lc broadcasts over L
    topk = np.empty((C, L, n, 2))
    obs_expert = np.empty((C, L, n, len(EXPERT_KEYS), E), dtype=np.float32)
    topk_energy_into(energy, topk_idx, topk[..., 0])
    if observed is None and (topk[..., 0] > 0).all():  # the usual case: the reference is the Top-K energy
        topk[..., 1] = topk[..., 0]
        expert_keys_into(energy, topk[..., 1], knowable, scn.deadline_s, MAX_ENERGY_COST, MAX_LATENCY_RATIO,
                         obs_expert)
    else:  # a Top-K set without energy (experts on the device) or slotted uplinks: numpy's general rule
        topk[..., 1] = topk_reference(energy, topk_idx)[1]
        cost = observed_energy_cost(energy, observed, scn.scope_index, topk_idx, topk[..., 1])
        obs_expert[..., 0, :] = np.minimum(cost, MAX_ENERGY_COST)
        obs_expert[..., 1, :] = np.minimum(knowable[..., 0, :] / scn.deadline_s, MAX_LATENCY_RATIO)
        obs_expert[..., 2, :] = knowable[..., 1, :]
    gain_db = linear_to_db(channel_gain)
    plan = TokenPlan(
        costs=expert_costs, meets_deadline=expert_costs[..., 3, :] <= deadline, observed_energy_scopes=observed,
        topk=topk, probs=gating.probs.reshape(C, L, n, E).astype(np.float32, copy=False), topk_idx=topk_idx,
        topk_weight=gating.topk_weight.reshape(C, L, n, -1).astype(np.float64, copy=False),
        deviation_table=None if gating.deviation_table is None else gating.deviation_table.reshape(C, L, n, -1, E + 1),
        obs_gain=_clipped(gain_db, GAIN_DB_LOW, GAIN_DB_HIGH).astype(np.float32), obs_expert=obs_expert,
        deadline_probability=knowable[..., 1, :], channel_gain_db=gain_db, helper_positions=positions,
        effect_rows=None, effect_base=None, full_correct=None)
    plan.weighted_mismatch = scn.weighted_mismatch
    return plan


def _clipped(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """np.clip(x, low, high) as its two ufuncs (the same numbers, NaN included, without np.clip's Python layers)."""
    out = np.maximum(x, low)
    return np.minimum(out, high, out=out)


def _slotted_uplink(scn: Scenario, rng, channel_gain, path_gains, downlink_time):
    """Fast fading within the uplink [paper] (docs/model.md#slots): the window tau = T_max - t_comp - t_dl is
    split into S slots; slot 1 sees the token's channel (what the device measures and observes), slots 2..S
    fresh gains of the fading law. Bits are allocated per slot by DP or uniformly, never above p_max; what
    does not fit is sent after the window (late). Returns the drawn uplink energy (radiated / eta + P_c while
    transmitting), the uplink time, P(the payload fits in the window) and the selection surrogate (the
    expected-inverse-gain energy over the path gain, what SiftMoE selects with)."""
    link, radio = scn.link, scn.config.radio
    window = link.deadline_s - link.compute_time_s - downlink_time
    # at most the energy of sending at p_max (on the surrogate's gain): a link the window cannot carry
    mean_gain = path_gains / scn.fading.expected_inverse_gain()
    at_p_max = link.user_max_power_w * link.bits / shannon_rate(link.user_max_power_w, mean_gain, link.bandwidth_hz,
                                                                 link.noise_psd_w_hz)
    with np.errstate(over="ignore"):
        surrogate = slots.surrogate_energy(link.bits, np.maximum(window, 1e-12), path_gains, link.bandwidth_hz,
                                           link.noise_psd_w_hz, scn.fading)
    surrogate = np.minimum(surrogate, at_p_max)
    first = channel_gain / path_gains
    later = slots.draw_slot_fading(rng, path_gains.shape, scn.fading, radio.uplink_slots - 1)
    gains = np.concatenate([first[..., None], later], axis=-1)
    usable = window > 0
    safe_window = np.where(usable, window, 1.0)
    run = slots.allocate_bits(radio.bit_allocation, link.bits, safe_window, path_gains, gains, link.bandwidth_hz,
                              link.noise_psd_w_hz, scn.fading, max_power_w=link.user_max_power_w)
    # no window at all (downlink and compute already exceed T_max): the whole payload at p_max, late
    closed = link.bits / shannon_rate(link.user_max_power_w, channel_gain, link.bandwidth_hz, link.noise_psd_w_hz)
    radiated = np.where(usable, run.energy, link.user_max_power_w * closed)
    transmit = np.where(usable, run.transmit_time_s, closed)
    uplink_energy = radiated / link.pa_efficiency + link.circuit_power_w * transmit
    uplink_time = np.where(usable, window + run.overtime_s, closed)
    fits = slots.completion_probability(radio.bit_allocation, link.bits, window, path_gains, first,
                                        link.bandwidth_hz, link.noise_psd_w_hz, scn.fading, radio.uplink_slots,
                                        link.user_max_power_w)
    return uplink_energy, uplink_time, fits, surrogate


def _knowable(scn: Scenario, idle_latency: np.ndarray, meet: np.ndarray, link) -> np.ndarray:
    """(..., 2, N) [idle latency, P(meet)] of the helpers (..., N), with the device's column first when some
    expert runs on it (its latency k (t_load + t_comp), certain)."""
    shape = idle_latency.shape  # meet's too
    first = 1 if scn.local_experts else 0  # the helpers' first column
    out = np.empty(shape[:-1] + (2, shape[-1] + first))
    out[..., 0, first:] = idle_latency
    out[..., 1, first:] = meet
    if first:
        local = link.load_time_s + link.compute_time_s
        out[..., 0, 0] = local
        out[..., 1, 0] = float(local <= link.deadline_s * (1.0 + 1e-9))
    return out


def _local(scn: Scenario):
    """1 (one expert call) when some expert runs on the device (the node table then needs its column)."""
    return 1.0 if scn.local_experts else None


def _experts(scn: Scenario, node_values: np.ndarray) -> np.ndarray:
    """(C, Lf, n, ..., nodes) node values -> (C, Lc, n, ..., E) expert values through the host map. Without a
    device column the nodes are the helpers 1..N (a one-to-one map needs no gather)."""
    if scn.one_to_one_hosts:
        return node_values
    offset = 0 if scn.local_experts else 1
    if scn.same_hosts_every_layer:
        return by_expert(node_values, scn.hosts[0] - offset)
    C, Lf = node_values.shape[:2]
    out = np.empty((C, scn.n_layers) + node_values.shape[2:-1] + (scn.n_experts,))
    for layer in range(scn.n_layers):
        out[:, layer] = by_expert(node_values[:, layer if Lf > 1 else 0], scn.hosts[layer] - offset)
    return out


def observed_energy_cost(energy, observed_scopes, scope_index: int, topk_idx, reference) -> np.ndarray:
    """The observation's ``energy_cost`` entries: the energy of executing each expert over the reward's
    reference (so executed entries sum to -reward_energy); with slotted uplinks the surrogate energy over
    the surrogate Top-K energy instead (the reward's reference stays the spent Top-K energy)."""
    if observed_scopes is None:
        return energy / reference[..., None]
    seen = observed_scopes[..., scope_index, :]
    seen_topk, _ = topk_reference(seen, topk_idx)
    return np.broadcast_to(seen, seen_topk.shape + seen.shape[-1:]) / np.where(seen_topk > 0, seen_topk, 1.0)[..., None]


def check_finite(scn: Scenario, plan: TokenPlan) -> None:
    """A plan with NaN or inf costs comes from a config whose numbers overflow: name the fields."""
    names = ("costs", "topk", "channel_gain_db")
    flat = [getattr(plan, name).reshape(-1).astype(np.float64, copy=False) for name in names]
    if all_finite3(*flat):  # one compiled pass over the three (the usual case)
        return
    bad = [name for name, values in zip(names, flat) if not all_finite(values)]
    if bad:
        cfg = scn.config
        fields_ = {"channel.path_loss_exponent": cfg.channel.path_loss_exponent,
                   "channel.reference_gain_db": cfg.channel.reference_gain_db,
                   "channel.noise_psd_dbm_hz": cfg.channel.noise_psd_dbm_hz,
                   "radio.bandwidth_hz": cfg.radio.bandwidth_hz, "radio.user_max_power_dbm": cfg.radio.user_max_power_dbm,
                   "radio.helper_power_dbm": cfg.radio.helper_power_dbm, "placement.r_min_m": cfg.placement.r_min_m,
                   "placement.r_max_m": cfg.placement.r_max_m}
        listed = ", ".join(f"{k} = {v!r}" for k, v in fields_.items())
        raise ConfigError(f"the planned {', '.join(bad)} are not finite (NaN or inf): the link budget under/overflows "
                          f"double precision with {listed}; bring these fields to physical values")


def _arrays(plan: TokenPlan):
    """(name, array) of the plan's stored fields (not the derived ones)."""
    return [(f.name, getattr(plan, f.name)) for f in fields(plan)
            if f.name not in DERIVED and getattr(plan, f.name) is not None]


def _new_plan(arrays: dict, like: TokenPlan) -> TokenPlan:
    plan = TokenPlan(**{f.name: arrays.get(f.name) for f in fields(TokenPlan)})
    plan.weighted_mismatch = like.weighted_mismatch
    return plan


def take_plan(plan: TokenPlan, rows) -> TokenPlan:
    """The plan of episodes ``rows`` alone (copies)."""
    return _new_plan({name: np.take(value, rows, axis=EPISODES) for name, value in _arrays(plan)}, plan)


def assign_plan(target: TokenPlan, rows, source: TokenPlan) -> None:
    """Write plan ``source`` (len(rows) episodes) into episodes ``rows`` of ``target`` (in place)."""
    for name, value in _arrays(target):
        value[:, :, rows] = getattr(source, name)
    target.deviation_table = None  # derived again from the new Top-K sets when read


def concat_plans(plans: list[TokenPlan]) -> TokenPlan:
    """The plans of several groups of episodes (same chunk length) as one plan, in order."""
    if len(plans) == 1:
        return plans[0]
    return _new_plan({name: np.concatenate([getattr(p, name) for p in plans], axis=EPISODES)
                      for name, _ in _arrays(plans[0])}, plans[0])
