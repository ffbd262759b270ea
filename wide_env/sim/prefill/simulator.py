"""Batched prefilling simulator: one MoE layer over a prompt of T tokens per step (no gymnasium).

:class:`PrefillSimulator` holds the static scenario (the one decoding uses: :mod:`wide_env.sim.scenario`)
and drives :class:`PrefillState` through reset / step / evaluate / observe, with the same calls as the
decoding simulator, so the env front ends (:mod:`wide_env.envs.batch`) drive both alike. The channel is
planned per prompt (per layer too with ``channel.fading_per_layer``); fading and mobility advance once per
prompt, by ``channel.token_interval_s``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dataclasses import dataclass, fields

import numpy as np

from wide_env.errors import ConfigError

if TYPE_CHECKING:  # annotations only: the simulator reads configs by attribute
    from wide_env.config import WideConfig
from wide_env.gating.base import GatingSource
from wide_env.sim.channel import draw_helpers, move_random_waypoint
from wide_env.sim.observation import observation_slices, prefill_observation_layout
from wide_env.sim.outcome import Outcome
from wide_env.sim.prefill import step as prefill_step
from wide_env.sim.prefill.observation import write_observation
from wide_env.sim.prefill.plan import PromptPlan, layer_node_costs, plan_channel, plan_prompt, prompt_gates
from wide_env.sim.scenario import Scenario, per_row


@dataclass
class PrefillState:
    """B prefill episodes (leading axis B)."""

    positions: np.ndarray  # (B, N, 2)
    waypoints: np.ndarray
    speeds: np.ndarray
    path_state: np.ndarray  # (B, N, P) the path-loss model's per-link state
    path_gain: np.ndarray  # (B, N)
    fading: np.ndarray  # (B, N, S)
    queue_last: np.ndarray  # (B, N) s, the helpers' queueing delays of the current prompt
    start: np.ndarray  # (B, n_prompts) trace positions of each prompt's first token
    prompt: np.ndarray  # (B,)
    layer: np.ndarray  # (B,)
    budget_used: np.ndarray  # (B, T) token mode: weighted deviation spent by each token in this prompt
    done: np.ndarray  # (B,)
    plan: PromptPlan | None = None

    @property
    def batch_size(self) -> int:
        return self.prompt.shape[0]

    def assign(self, rows, other: "PrefillState") -> None:
        for f in fields(self):
            if f.name != "plan":
                getattr(self, f.name)[rows] = getattr(other, f.name)
        self.plan.assign(rows, other.plan)

    @classmethod
    def concat(cls, states: list["PrefillState"]) -> "PrefillState":
        """Several states as one batch, in order."""
        if len(states) == 1:
            return states[0]
        return cls(**{f.name: (PromptPlan.concat([s.plan for s in states]) if f.name == "plan" else
                               np.concatenate([getattr(s, f.name) for s in states])) for f in fields(cls)})


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
    load_latency: np.ndarray  # (B, E, T+1) at an idle helper
    load_deadline_probability: np.ndarray  # (B, E, T+1)
    topk_energy: np.ndarray  # (B,)
    energy_reference: np.ndarray  # (B,)
    queue: np.ndarray  # (B, N+1)
    channel_gain: np.ndarray  # (B, N)
    channel_gain_db: np.ndarray  # (B, N)


def _reject_decoding_fields(config: WideConfig) -> None:
    """Decoding-only settings the prefill phase cannot honour: a ConfigError naming the field and the fix (the
    field matrix, tests/test_field_matrix.py)."""
    if config.reward.objective != "deviation":
        raise ConfigError(f"config field 'reward.objective' = {config.reward.objective!r} is a decoding objective (the "
                          "real loss of generated tokens); prefill rewards the deviation budget: use "
                          "reward.objective = 'deviation'")
    if config.gating.backend != "table":
        raise ConfigError(f"config field 'gating.backend' = {config.gating.backend!r} runs the checkpoint token by "
                          "token while decoding; prefill replays the trace's gating: use gating.backend = 'table'")
    if config.gating.checkpoint_dir is not None:
        raise ConfigError("config field 'gating.checkpoint_dir' names the checkpoint that measures decoding accuracy; "
                          "prefill runs no checkpoint: leave gating.checkpoint_dir unset")
    if config.gating.accuracy != "auto":
        raise ConfigError(f"config field 'gating.accuracy' = {config.gating.accuracy!r}: prefill reports no real "
                          "accuracy (decoding envs only): leave gating.accuracy = 'auto'")


class PrefillSimulator:
    """Static prefill scenario plus batched reset / step / evaluate / observe (numpy only)."""

    RESET_INFO_KEYS = ("layer", "prompt", "topk_energy_j", "deviation_budget")
    #: the named columns of a step's outcome
    outcome_fields = prefill_step.FIELDS

    def __init__(self, config: WideConfig, source: GatingSource, prompt_tokens: int = 8, n_prompts: int = 1):
        for name, value in (("prompt_tokens", prompt_tokens), ("n_prompts", n_prompts)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"argument '{name}' = {value!r} is invalid: expected an integer >= 1")
        self.scenario = scn = Scenario.build(config, source)
        self.config, self.source = config, source
        self.T, self.n_prompts = int(prompt_tokens), int(n_prompts)
        self.n_layers, self.n_experts, self.top_k, self.n_nodes = scn.n_layers, scn.n_experts, scn.top_k, scn.n_nodes
        self.hosts, self.deadline, self.enforce_deadline = scn.hosts, scn.deadline_s, scn.enforce_deadline
        if scn.budget_mode == "episode":
            raise ConfigError("config field 'budget.mode' = 'episode' is a decoding budget (over an episode's "
                              "generated tokens); prefill budgets are per layer or per prompt token ('layer', 'token')")
        if config.radio.uplink_slots > 1:
            raise ConfigError(f"config field 'radio.uplink_slots' = {config.radio.uplink_slots} is a decoding setting "
                              "(fast fading within one expert call's uplink); prefilling sends aggregated loads in "
                              "one window: use radio.uplink_slots = 1")
        _reject_decoding_fields(config)
        self.budget_mode, self.layer_budget, self.span_budget = scn.budget_mode, scn.layer_budget, scn.span_budget
        self.layer_weight = scn.layer_weight
        self.one_to_one = bool((scn.hosts > 0).all() and all(len(set(r)) == len(r) for r in scn.hosts.tolist()))
        self.layout = prefill_observation_layout(self.T, self.n_experts, self.top_k, self.n_nodes)
        self.obs_slices = observation_slices(self.layout)
        self.obs_size = sum(size for size, _, _ in self.layout.values())
        if config.gating.source == "trace":
            source.valid_starts(self.T)  # raises a clear error if prompts do not fit the trace

    # ---- episodes ----------------------------------------------------------------------------------
    def reset(self, rng, batch: int) -> PrefillState:
        """New episodes; ``rng`` is one generator for the batch or a list of one per episode (each drawing
        what a batch of one draws), as for decoding."""
        if per_row(rng):
            if len(rng) != batch:
                raise ValueError(f"{len(rng)} generators for a batch of {batch} episodes")
            return PrefillState.concat([self._reset(r, 1) for r in rng])
        return self._reset(rng, batch)

    def _reset(self, rng: np.random.Generator, batch: int) -> PrefillState:
        scn = self.scenario
        positions, waypoints, speeds, path_state, gain = draw_helpers(rng, batch, scn.n_nodes, self.config.placement,
                                                                      scn.path_loss)
        fading = scn.fading.init(rng, (batch, scn.n_nodes))
        known = scn.queue.initial(rng, (batch, scn.n_nodes))
        start = self.source.start(rng, batch * self.n_prompts, self.T).reshape(batch, self.n_prompts)
        state = PrefillState(
            positions=positions, waypoints=waypoints, speeds=speeds, path_state=path_state, path_gain=gain,
            fading=fading, queue_last=known, start=start, prompt=np.zeros(batch, dtype=np.int64),
            layer=np.zeros(batch, dtype=np.int64), budget_used=np.zeros((batch, self.T)), done=np.zeros(batch, dtype=bool))
        state.plan = plan_prompt(scn, rng, gain * scn.fading.gain(fading), prompt_gates(scn, rng, start[:, 0], self.T),
                                 known)
        state.queue_last[:] = state.plan.queue[:, 1:]
        return state

    def reset_rows(self, rng, state: PrefillState, rows: np.ndarray) -> None:
        state.assign(rows, self.reset([rng[b] for b in rows] if per_row(rng) else rng, len(rows)))

    def step(self, rng: np.random.Generator, state: PrefillState, executed: np.ndarray,
             obs: np.ndarray | None = None) -> Outcome:
        """Evaluate (B, T, E) bool masks, advance, and write the next observations into ``obs`` (B, D)."""
        view = self.view(state)
        out = prefill_step.evaluate(self.scenario, view, executed)
        finished = state.done.copy()
        if finished.any():  # finished episodes do not step (their outcome is zero)
            out.values[finished] = 0.0
            out.counts[finished] = 0
        self._advance(rng, state, out["token_weighted_deviation"], ~finished)
        if obs is not None:
            self.observe(state, None, obs)
        return out

    def evaluate(self, state: PrefillState, executed: np.ndarray) -> Outcome:
        """Outcomes of (B, T, E) bool masks at each episode's current layer; no state change."""
        return prefill_step.evaluate(self.scenario, self.view(state), executed)

    def observe(self, state: PrefillState, rows=None, obs: np.ndarray | None = None) -> np.ndarray:
        """Observations (B, D) float32 of the current layers, into ``obs`` (fresh if None) for ``rows``."""
        if obs is None:
            obs = np.zeros((state.batch_size, self.obs_size), dtype=np.float32)
        view = self.view(state)
        fresh = np.empty_like(obs)
        write_observation(view, self.obs_slices, self.deadline, self.n_layers, self.n_prompts, fresh)
        if rows is None:
            obs[:] = fresh
        else:
            obs[rows] = fresh[rows]
        return obs

    def _advance(self, rng: np.random.Generator, state: PrefillState, token_weighted: np.ndarray, moving) -> None:
        """Move the ``moving`` episodes past their current layer."""
        if self.budget_mode == "token":
            state.budget_used[moving] += token_weighted[moving]
        layer = state.layer + moving
        new_prompt = layer >= self.n_layers
        last = new_prompt & (state.prompt + 1 >= self.n_prompts)
        state.done |= last
        advance = new_prompt & ~last
        state.layer[:] = np.where(last, self.n_layers - 1, np.where(advance, 0, layer))
        per_layer = moving & ~new_prompt if self.config.channel.fading_per_layer else np.zeros_like(advance)
        if advance.any():
            state.prompt[advance] += 1
            state.budget_used[advance] = 0.0
        refresh = advance | per_layer
        if refresh.any():
            rows = np.flatnonzero(refresh)
            if per_row(rng):
                for i, b in enumerate(rows):
                    self._new_channel(rng[b], state, rows[i:i + 1], advance[b:b + 1])
            else:
                self._new_channel(rng, state, rows, advance[refresh])

    def _new_channel(self, rng: np.random.Generator, state: PrefillState, rows: np.ndarray, new_prompt) -> None:
        """Fading step for ``rows``; mobility and fresh gating for rows starting a new prompt; re-plan those
        rows (per-layer refreshes inside a prompt keep the prompt's gating)."""
        scn, pl, ch = self.scenario, self.config.placement, self.config.channel
        state.fading[rows] = scn.fading.advance(rng, state.fading[rows])
        moved = rows[new_prompt]
        if pl.mobility and moved.size:
            pos, wp, sp = move_random_waypoint(rng, state.positions[moved], state.waypoints[moved], state.speeds[moved],
                                               ch.token_interval_s, pl.r_min_m, pl.r_max_m,
                                               (pl.speed_min_mps, pl.speed_max_mps))
            state.positions[moved], state.waypoints[moved], state.speeds[moved] = pos, wp, sp
            state.path_gain[moved] = scn.path_loss.gain(np.linalg.norm(pos, axis=-1), state.path_state[moved])
        gain = state.path_gain[rows] * scn.fading.gain(state.fading[rows])
        known = state.queue_last[rows]
        if new_prompt.all():
            first = state.start[rows, state.prompt[rows]]
            state.plan.assign(rows, plan_prompt(scn, rng, gain, prompt_gates(scn, rng, first, self.T), known))
        else:
            plan = PromptPlan(**{f.name: getattr(state.plan, f.name)[rows].copy() for f in fields(PromptPlan)})
            if new_prompt.any():
                first = state.start[moved, state.prompt[moved]]
                fresh = plan_prompt(scn, rng, gain[new_prompt], prompt_gates(scn, rng, first, self.T), known[new_prompt])
                plan.assign(np.flatnonzero(new_prompt), fresh)
                keep = ~new_prompt
                sub = PromptPlan(**{f.name: getattr(plan, f.name)[keep].copy() for f in fields(PromptPlan)})
                plan_channel(scn, rng, sub, gain[keep], known[keep])
                plan.assign(np.flatnonzero(keep), sub)
            else:
                plan_channel(scn, rng, plan, gain, known)
            state.plan.assign(rows, plan)
        state.queue_last[rows] = state.plan.queue[rows, 1:]

    # ---- what the env front ends report -------------------------------------------------------------
    def info_keys(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return prefill_step.FIELDS.floats[1:], prefill_step.FIELDS.ints

    def reset_info(self, state: PrefillState) -> dict[str, np.ndarray]:
        view = self.view(state)
        return {"layer": state.layer.copy(), "prompt": state.prompt.copy(),
                "topk_energy_j": np.array(view.topk_energy, dtype=np.float64),
                "deviation_budget": view.budget.min(axis=-1)}

    def may_execute(self, state: PrefillState) -> np.ndarray:
        """(B, T, E) bool: pairs whose expert meets the deadline with a single token (all while deadlines are
        not enforced); a per-pair mask cannot express load limits."""
        B = state.batch_size
        if not self.enforce_deadline:
            return np.ones((B, self.T, self.n_experts), dtype=bool)
        single = self.view(state).load_deadline_probability[:, :, 1] > 0  # (B, E): as far as the device knows
        return np.broadcast_to(single[:, None, :], (B, self.T, self.n_experts)).copy()

    def node_costs(self, channel_gain, queue, layer, executed):
        """Per-node energy scopes (lead, 3, N+1) and latency (lead, N+1) of executed masks (lead, T, E)."""
        return layer_node_costs(self.scenario, channel_gain, queue, layer, executed)

    def view(self, state: PrefillState) -> PrefillView:
        rows, layer = np.arange(state.batch_size), state.layer
        p = state.plan
        sel = (rows, layer)
        if self.budget_mode == "layer":
            budget = np.broadcast_to(self.layer_budget[layer][:, None], (state.batch_size, self.T)).copy()
            unit = self.layer_budget[layer]
        else:
            budget = self.span_budget - state.budget_used
            unit = np.full(state.batch_size, self.span_budget)
        scopes = p.load_energy_scopes[sel]
        return PrefillView(
            layer=layer.copy(), prompt=state.prompt.copy(), probs=p.probs[sel], topk_idx=p.topk_idx[sel],
            topk_weight=p.topk_weight[sel], topk_mask=p.topk_mask[sel], deviation_table=p.deviation_table[sel],
            layer_weight=self.layer_weight[layer], budget=budget, budget_unit=unit, load_energy_scopes=scopes,
            load_energy=scopes[:, self.scenario.scope_index], load_latency=p.load_latency[sel],
            load_deadline_probability=p.load_deadline_probability[sel],
            topk_energy=p.topk_energy[sel], energy_reference=p.energy_reference[sel], queue=p.queue,
            channel_gain=p.channel_gain, channel_gain_db=p.channel_gain_db)
