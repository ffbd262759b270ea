"""Batched decoding simulator: B WIDE episodes, one MoE layer of one generated token per step (no gymnasium).

:class:`DecodeSimulator` holds the static scenario and drives :class:`DecodeState` (B episodes) through
:meth:`~DecodeSimulator.reset`, :meth:`~DecodeSimulator.step` (one compiled kernel evaluates, folds the
accuracy, advances and writes the next observations; chunks of tokens are planned in numpy when a plan is
used up), :meth:`~DecodeSimulator.evaluate` (what-if outcomes, no state change) and
:meth:`~DecodeSimulator.observe`. The single env is a batch of one; the vector envs are batches of B.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import weakref

import numpy as np

from wide_env.errors import ConfigError

if TYPE_CHECKING:  # annotations only: the simulator reads configs by attribute
    from wide_env.config import WideConfig
from wide_env.gating import effects
from wide_env.gating.base import GatingSource
from wide_env.sim.channel import draw_helpers
from wide_env.sim.decode import kernel, kernel_table
from wide_env.sim.decode.plan import (EXPERT_KEYS, assign_plan, chunk_size, concat_plans, observed_energy_cost,
                                      plan_tokens)
from wide_env.sim.decode.hindsight import EpisodeTables, episode_tables
from wide_env.compiled_entry import KernelEntries, types_key
from wide_env.sim.decode.kernel_entry import usual_outcome, usual_step_buffers
from wide_env.sim.decode.state import FIELDS, DecodeState, empty_outcome
from wide_env.sim.outcome import Outcome
from wide_env.sim.decode.view import LayerView, make_view
from wide_env.sim.gating_rows import build_gating_rows
from wide_env.sim.observation import (MAX_DEVIATION, MAX_ENERGY_COST, MODEL_STATE_KEYS, observation_layout,
                                      observation_slices)
from wide_env.sim.physics import topk_reference
from wide_env.sim.scenario import Scenario, per_row

#: the step kernel's compiled entries by the types of a state's arguments (shared by every simulator)
_STEP_ENTRIES = KernelEntries(kernel.run_rows)
_NO_ONE = (None,) * 6  # DecodeSimulator.step_one before its first call
_TABLE_FITS: dict[int, bool] = {}  # types key id -> whether such kernel arguments go into a table
_BOOL = np.dtype(np.bool_)
# Per-source lookup tables of the accuracy bookkeeping (derived from the source's effect tables, shared).
_EFFECT_LOOKUPS: "weakref.WeakKeyDictionary[GatingSource, tuple]" = weakref.WeakKeyDictionary()


class DecodeSimulator:
    """Static description of a decoding scenario plus batched reset / step / evaluate / observe."""

    #: info keys a (re)set episode reports
    RESET_INFO_KEYS = ("layer", "token", "topk_energy_j", "deviation_budget")
    #: outcome fields whose info keys only sources with effect tables report
    ACCURACY_KEYS = ("delta_loss", "accuracy_correct", "accuracy_same", "accuracy_full", "token_complete")
    #: the named columns of a step's outcome (the kernel's FLOAT_FIELDS and INT_FIELDS)
    outcome_fields = FIELDS

    def __init__(self, config: WideConfig, source: GatingSource):
        self.scenario = scn = Scenario.build(config, source)
        self.config, self.source = config, source
        self.n_layers, self.n_experts, self.top_k = scn.n_layers, scn.n_experts, scn.top_k
        self.n_nodes, self.n_tokens = scn.n_nodes, scn.n_tokens
        self.deadline, self.enforce_deadline, self.budget_mode = scn.deadline_s, scn.enforce_deadline, scn.budget_mode
        self.layer_budget, self.span_budget, self.layer_weight = scn.layer_budget, scn.span_budget, scn.layer_weight
        self.hosts = scn.hosts
        model_state = bool(config.gating.model_state)  # the model backend writes these keys (after the kernel's)
        self.layout = observation_layout(self.n_experts, self.top_k, self.n_nodes, model_state)
        self.obs_slices = observation_slices(self.layout)
        self.obs_size = sum(size for size, _, _ in self.layout.values())
        self.has_accuracy = getattr(source, "logit_effects", None) is not None
        sl = self.obs_slices
        written = kernel.OBSERVATION_KEYS + EXPERT_KEYS + (tuple(MODEL_STATE_KEYS) if model_state else ())
        if sorted(sl) != sorted(written):  # the step kernel writes every key of the layout
            raise AssertionError(f"the decoding observation layout {list(sl)} differs from the keys the step kernel "
                                 f"writes {list(written)}: plan a new per-expert key in wide_env/sim/decode/plan.py "
                                 "(EXPERT_KEYS), others in kernel.py")
        span = {"layer": kernel.SPAN_LAYER, "token": kernel.SPAN_TOKEN, "episode": kernel.SPAN_EPISODE}[self.budget_mode]
        if config.reward.objective == "accuracy" and not self.has_accuracy:
            raise ConfigError("config field 'reward.objective' = 'accuracy' needs real accuracy: a gating trace with "
                              "logit-effect tables (the shipped ones: gating.source = 'trace'); this source has none "
                              "(re-export a trace with python -m wide_env.models.export)")
        objective = {"deviation": kernel.OBJECTIVE_DEVIATION, "accuracy": kernel.OBJECTIVE_ACCURACY}
        ints = [self.n_layers, self.n_tokens, span, self.enforce_deadline, scn.scope_index,
                self.has_accuracy, objective[config.reward.objective], 1]
        ints += [sl[key].start for key in kernel.OBSERVATION_KEYS + EXPERT_KEYS]
        assert len(ints) == kernel.I_EXPERT_AT + len(EXPERT_KEYS)
        rw = config.reward
        floats = [0.0 if np.isnan(self.span_budget) else self.span_budget, rw.deviation_weight, rw.deadline_weight,
                  rw.accuracy_weight,
                  max(self.n_layers - 1, 1), max(self.n_tokens - 1, 1), MAX_DEVIATION,
                  effects.CONTEXT_DECAY, effects.CONTEXT_WEIGHT]
        assert len(floats) == kernel.F_LAYER_BUDGET
        self._consts = (np.array(ints, dtype=np.int64),
                        np.array(floats + list(self.layer_budget) + list(self.layer_weight) + list(scn.budget_unit),
                                 dtype=np.float64))
        self._accuracy = self._accuracy_tables()
        # the kernel's slot tables: a writeable copy of the scenario's frozen array (the kernel only reads it), so the
        # step's arguments have the types kernel.run_table rebuilds and both share one compiled kernel
        self._mismatch = np.array(scn.weighted_mismatch, dtype=np.float64, order="C")
        self._all_rows: dict[int, np.ndarray] = {}
        self._unused: dict[int, tuple] = {}
        self._usual_out: tuple = (None, None, None)  # the last outcome (and its arrays) that usual_outcome passed
        self._one: tuple = _NO_ONE  # step_one's call (_one_call)

    def __getstate__(self) -> dict:  # pickle / deepcopy: step_one's compiled entry is looked up again
        state = dict(self.__dict__)
        state["_one"] = _NO_ONE
        return state

    # ---- episodes --------------------------------------------------------------------------------
    def chunk_size(self, batch: int) -> int:
        return chunk_size(self.scenario, batch)

    def reset(self, rng, batch: int, chunk: int | None = None) -> DecodeState:
        """New episodes for ``batch`` environments; observe them with :meth:`observe`. ``rng``: one generator
        for the whole batch, or a list of ``batch`` generators, one per episode, each drawing exactly what a
        batch of one (the single env) draws (then every plan covers a single env's chunk of tokens)."""
        if per_row(rng):
            if len(rng) != batch:
                raise ValueError(f"{len(rng)} generators for a batch of {batch} episodes")
            chunk = self.chunk_size(1) if chunk is None else chunk
            return DecodeState.concat([self._reset(r, 1, chunk) for r in rng])
        return self._reset(rng, batch, self.chunk_size(batch) if chunk is None else chunk)

    def _reset(self, rng: np.random.Generator, batch: int, chunk: int) -> DecodeState:
        scn = self.scenario
        positions, waypoints, speeds, path_state, gain = draw_helpers(rng, batch, scn.n_nodes, self.config.placement,
                                                                      scn.path_loss)
        fading = scn.fading.init(rng, (batch, scn.n_nodes))
        queue_last = scn.queue.initial(rng, (batch, scn.n_nodes))
        start = self.source.start(rng, batch, self.n_tokens)
        state = DecodeState.new(positions, waypoints, speeds, path_state, gain, fading, queue_last, start)
        state.plan = plan_tokens(scn, rng, state, None, chunk, True, self._accuracy)
        return state

    def reset_rows(self, rng, state: DecodeState, rows: np.ndarray) -> None:
        """Reset only episodes ``rows`` (index array) of a batch in place (vector-env autoreset); ``rng`` as in
        :meth:`reset` (a list holds every episode's generator)."""
        chunk = state.plan.chunk_tokens
        fresh = self.reset([rng[b] for b in rows], len(rows), chunk) if per_row(rng) else self.reset(rng, len(rows), chunk)
        state.assign(rows, fresh)

    def step(self, rng: np.random.Generator, state: DecodeState, executed: np.ndarray,
             obs: np.ndarray | None = None, rows: np.ndarray | None = None, observe: bool = True,
             out: Outcome | None = None) -> Outcome:
        """Evaluate ``executed`` ((B, E) bool, C-contiguous) at each episode's current layer, fold the
        accuracy, advance, and write the next observations into ``obs`` ((B, D) float32; None: none kept).
        ``rows`` ((B,) bool) limits the step to some episodes; finished episodes are skipped (zero outcome).
        ``observe=False``: no observations are written (the caller changes the next layer's gating first, then
        calls :meth:`observe`). ``out``: an outcome of B rows to fill (every field is written; its earlier
        values are overwritten), else a fresh one."""
        # every step of every env runs this: the buffers, arguments and the kernel's entry are looked up
        plan, packed, consts, all_rows, replan, key = state.kernel_args or self._kernel_args(state)
        B = replan.shape[0]
        if out is None:
            out, usual = empty_outcome(B, self.top_k), True
        else:  # the single env hands the same outcome every step: checked once
            seen = self._usual_out
            usual = seen[0] is out and seen[1] is out.values and seen[2] is out.counts
            if not usual and usual_outcome(out):
                self._usual_out, usual = (out, out.values, out.counts), True
        if obs is None:
            obs = np.empty((B, self.obs_size), dtype=np.float32)
        usual = usual and rows is None and usual_step_buffers(executed, obs)
        if not usual and not (executed.dtype == np.bool_ and executed.flags.c_contiguous and executed.flags.writeable):
            executed = np.array(executed, dtype=bool)  # the kernel's one argument type
        rows = all_rows if rows is None else np.ascontiguousarray(rows, dtype=bool)
        call = (kernel.STEP if observe else kernel.ADVANCE, rows, executed, plan, packed, consts, out.values,
                out.counts, obs, replan)
        entry = _STEP_ENTRIES.get(key) if usual else None
        if entry is not None:
            flagged = entry(*call)
        else:
            flagged = kernel.run_rows(*call)
            if usual:  # compiled for these types now: the next steps with them skip numba's dispatch
                _STEP_ENTRIES.learn(key, call)
        if flagged:  # some planned chunks are used up: plan the next ones, then observe those episodes
            self._replan_flagged(rng, state, replan, obs if observe else None)
        return out

    def step_one(self, rng: np.random.Generator, state: DecodeState, executed: np.ndarray, obs: np.ndarray,
                 out: Outcome) -> None:
        """:meth:`step` of a batch of one, all rows, observed, into ``out`` (:meth:`outcome_buffer` (1)) and ``obs``
        ((1, D) float32, C-contiguous and writeable, as wide_env.envs.observation_rows hands them out): the single
        env's every step. The kernel is called through a table of its fixed arrays (wide_env.sim.decode.kernel_table),
        made once per plan and outcome; an ``executed`` other than (1, E) bool, C-contiguous and writeable, or
        arrays the table does not take, go through :meth:`step`."""
        one = self._one
        if one[0] is not state.kernel_args or one[1] is not out:
            one = self._one_call(state, out)
        flags = executed.flags
        if (one[2] is None or not (flags.c_contiguous and flags.writeable) or executed.dtype is not _BOOL
                or executed.ndim != 2):
            self.step(rng, state, executed, obs, out=out)
            if one[5] and kernel_table.count_step():  # warmed up: the table's entry from the next step on
                self._one = _NO_ONE
        elif one[2](kernel.STEP, executed, obs, one[3]):  # some planned chunks are used up
            self._replan_flagged(rng, state, one[4], obs)

    def _one_call(self, state: DecodeState, out: Outcome) -> tuple:
        """:meth:`step_one`'s call for this state's kernel arguments and this outcome: (kernel arguments, outcome,
        the table's compiled entry (None where the table does not apply, or while the process warms up:
        kernel_table.WARM_STEPS), the table (it keeps the addresses of arrays the kernel arguments and the outcome
        hold), the replan flags, whether the process is warming up)."""
        args = state.kernel_args or self._kernel_args(state)
        plan, packed, consts, rows, replan, key = args
        warming = kernel_table.warming()
        entry = table = None
        if not warming and rows.shape[0] == 1 and usual_outcome(out) and self._table_fits(key, args, out):
            table = kernel_table.table_of(plan, packed, consts, rows, out.values, out.counts, replan)
            entry = kernel.table_entry()
        # kept until the plan or the outcome changes (the arrays of the table live as long as this tuple: args and
        # out hold them)
        self._one = (args, out, entry, table, replan, warming)
        return self._one

    def _table_fits(self, key: int, args: tuple, out: Outcome) -> bool:
        """Whether kernel arguments of types key ``key`` (and the simulator's own rows and replan flags and a usual
        outcome) go into a table (kernel_table.fits), checked once per key."""
        fits = _TABLE_FITS.get(key)
        if fits is None:
            plan, packed, consts, rows, replan, _ = args
            fits = _TABLE_FITS[key] = kernel_table.fits(plan + packed + consts + (rows, out.values, out.counts, replan))
        return fits

    def _replan_flagged(self, rng, state: DecodeState, replan: np.ndarray, obs: np.ndarray | None) -> None:
        """Plan the next chunks of the episodes the kernel flagged in ``replan`` (cleared), then observe them into
        ``obs`` (None: not observed)."""
        replanned = replan.copy()
        replan[:] = False
        self._replan(rng, state, replanned)
        if obs is not None:
            self.observe(state, replanned, obs)

    def outcome_buffer(self, batch: int) -> Outcome:
        """An outcome of ``batch`` rows for :meth:`step`'s ``out`` (the step writes every field)."""
        return empty_outcome(batch, self.top_k)

    def evaluate(self, state: DecodeState, executed: np.ndarray, rows: np.ndarray | None = None) -> Outcome:
        """Outcomes of ``executed`` ((B, E) bool) at each episode's current layer, without any state change."""
        out = empty_outcome(state.batch_size, self.top_k)
        executed = np.array(executed, dtype=bool)
        kernel.run_rows(kernel.EVALUATE, self._rows(state, rows), executed, *self._kernel_args(state)[:3],
                        out.values, out.counts, self._obs_buffer(state, None), np.zeros(state.batch_size, dtype=bool))
        return out

    def observe(self, state: DecodeState, rows: np.ndarray | None = None, obs: np.ndarray | None = None) -> np.ndarray:
        """Observations (B, D) float32 of the current positions, written into ``obs`` (fresh if None) for the
        episodes with ``rows[b]`` ((B,) bool; None = all)."""
        if obs is None:
            obs = np.zeros((state.batch_size, self.obs_size), dtype=np.float32)
        args = state.kernel_args or self._kernel_args(state)
        rows = args[3] if rows is None else np.ascontiguousarray(rows, dtype=bool)
        unused = self._unused.get(state.batch_size) or self._unused_buffers(state.batch_size)
        kernel.run_rows(kernel.OBSERVE, rows, unused[0], *args[:3], unused[1], unused[2], obs, args[4])
        return obs

    def _unused_buffers(self, batch: int) -> tuple:
        """The arguments the kernel's OBSERVE mode neither reads nor writes, (B, E) bool and empty outcome fields."""
        buffers = self._unused[batch] = (np.zeros((batch, self.n_experts), dtype=bool), np.zeros((batch, 0)),
                                         np.zeros((batch, 0), dtype=np.int64))
        return buffers

    def _replan(self, rng, state: DecodeState, replan: np.ndarray) -> None:
        rows = None if replan.all() else np.flatnonzero(replan)
        sel = slice(None) if rows is None else rows
        state.chunk_start[sel] = state.token[sel]
        C = state.plan.chunk_tokens
        if per_row(rng):
            each = np.flatnonzero(replan)
            plan = concat_plans([plan_tokens(self.scenario, rng[b], state, each[i:i + 1], C, False, self._accuracy) for i, b in enumerate(each)])
        else:
            plan = plan_tokens(self.scenario, rng, state, rows, C, False, self._accuracy)
        if rows is None:
            state.plan = plan
        else:
            assign_plan(state.plan, rows, plan)
        state.kernel_args = None

    # ---- kernel plumbing -------------------------------------------------------------------------
    def _rows(self, state: DecodeState, rows) -> np.ndarray:
        if rows is not None:
            return np.ascontiguousarray(rows, dtype=bool)
        B = state.batch_size
        if B not in self._all_rows:
            self._all_rows[B] = np.ones(B, dtype=bool)  # never written
        return self._all_rows[B]

    def _obs_buffer(self, state: DecodeState, obs):
        return np.empty((state.batch_size, self.obs_size), dtype=np.float32) if obs is None else obs

    def _kernel_args(self, state: DecodeState) -> tuple:
        """(plan, state, consts, all rows, replan flags, types key) for :func:`kernel.run_rows` (the first three
        tuples, then a (B,) bool array of ones, the (B,) bool buffer of the kernel's replan flags (all False between
        steps) and the id of the key of their types (:mod:`wide_env.sim.decode.kernel_entry`)), cached on the state
        until its plan is replaced."""
        args = state.kernel_args
        if args is None:
            p = state.plan
            plan = (p.costs, p.meets_deadline, p.topk, p.topk_idx, self._mismatch, p.probs, p.topk_weight, p.obs_gain,
                    p.obs_expert, p.effect_rows, p.effect_base, p.full_correct, self._accuracy[3])
            packed = (state.counters, state.amounts, state.flags)
            args = state.kernel_args = (plan, packed, self._consts, self._rows(state, None),
                                        np.zeros(state.batch_size, dtype=bool),
                                        _STEP_ENTRIES.key_id(types_key(plan + packed + self._consts)))
        return args

    def _accuracy_tables(self) -> tuple:
        """(rows (T, L, K (E+1)) int32, base (T, M + 2) float64, full_correct (T,) bool, values (R + 1, D) float64):
        the accuracy rule's tables (wide_env.gating.effects) in the form the plans gather and the kernel folds,
        built once per source; no rows without them."""
        lookup = getattr(self.source, "logit_effects", None)
        if lookup is None:
            return self._no_accuracy_tables()
        tables = _EFFECT_LOOKUPS.get(self.source)
        if tables is None:
            T, L, K = lookup.topk_idx.shape
            full = lookup.base[:, 0] >= lookup.base.max(axis=1)  # the target leads the full model's logits
            tables = _EFFECT_LOOKUPS[self.source] = (
                lookup.row_table().reshape(T, L, K * (self.n_experts + 1)), np.ascontiguousarray(lookup.base),
                full, np.ascontiguousarray(lookup.values))
        return tables

    def leave_to_model(self) -> None:
        """A model backend measures the accuracy fields and writes the reward's accuracy term after each step
        (wide_env.envs.model_backend): from now on steps neither fold the accuracy rule (the accuracy fields stay
        at their defaults until the model writes them at the token's last layer) nor sum the reward (the caller
        sums it then, :func:`wide_env.rules.compose_reward`), and plans gather no accuracy tables. Call it
        before the first reset."""
        ints = self._consts[0]
        ints[kernel.I_ACCURACY] = 0
        ints[kernel.I_COMPOSE] = 0
        self._accuracy = self._no_accuracy_tables()

    def _no_accuracy_tables(self) -> tuple:
        L, KE = self.n_layers, self.top_k * (self.n_experts + 1)
        return (np.zeros((0, L, KE), np.int32), np.zeros((0, 0)), np.zeros(0, bool), np.zeros((1, 0)))

    # ---- what the env front ends report -------------------------------------------------------------
    def info_keys(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(float keys, int keys) of a step's info: the outcome's fields (:attr:`outcome_fields`) but the reward
        (the accuracy fields only with effect tables)."""
        floats, ints = FIELDS.floats[1:], FIELDS.ints
        if not self.has_accuracy:
            floats = tuple(k for k in floats if k not in self.ACCURACY_KEYS)
            ints = tuple(k for k in ints if k not in self.ACCURACY_KEYS)
        return floats, ints

    def reset_info(self, state: DecodeState) -> dict[str, np.ndarray]:
        """layer, token, Top-K energy and deviation budget at each episode's current position (copies)."""
        b, layer = np.arange(state.batch_size), state.layer
        topk = state.plan.topk_energy[state.token - state.chunk_start, layer, b]
        budget = (self.layer_budget[layer] if self.budget_mode == "layer" else self.span_budget - state.budget_used)
        return {"layer": layer.copy(), "token": state.token.copy(), "topk_energy_j": np.array(topk, dtype=np.float64),
                "deviation_budget": np.array(budget, dtype=np.float64)}

    def reset_info_one(self, state: DecodeState, row: int = 0) -> dict:
        """:meth:`reset_info` of one episode as Python numbers (the single env's reset info: the same numbers, read
        one by one instead of through (B,) arrays)."""
        counters = state.counters[row].tolist()
        token, layer = counters[kernel.TOKEN], counters[kernel.LAYER]
        topk = state.plan.topk.item(token - counters[kernel.CHUNK_START], layer, row, 0)  # topk_energy
        if self.budget_mode == "layer":
            budget = float(np.float64(self.layer_budget[layer]))
        else:
            budget = float(np.float64(self.span_budget - state.budget_used[row]))
        return {"layer": layer, "token": token, "topk_energy_j": float(topk), "deviation_budget": budget}

    # ---- what policies and tests may look at -------------------------------------------------------
    def episode_tables(self, state: DecodeState, index: int = 0) -> EpisodeTables:
        """Hindsight: every planned (token, layer) of episode ``index`` (:mod:`wide_env.sim.decode.hindsight`)."""
        return episode_tables(self, state, index)

    def view(self, state: DecodeState, index: int | None = None) -> LayerView:
        """The current layer of every episode (``index=None``, batch-first arrays), or of episode ``index``."""
        return make_view(self, state, index)

    def may_execute(self, state: DecodeState) -> np.ndarray:
        """(B, E) bool: experts that may meet the deadline, as far as the device knows (P(meeting it) > 0), at
        each episode's current layer (all while deadlines are not enforced): the ``may be 1`` half of
        MaskablePPO's masks. The realised queueing delays stay hidden."""
        if not self.enforce_deadline:
            return np.ones((state.batch_size, self.n_experts), dtype=bool)
        return self._at_current_layer(state, state.plan.deadline_probability) > 0

    def on_time(self, state: DecodeState) -> np.ndarray:
        """(B, E) bool: experts whose output arrives by the deadline at each episode's current layer, with the
        realised delays (what the step serves with; all while deadlines are not enforced). Not for policies:
        they see :meth:`may_execute`."""
        if not self.enforce_deadline:
            return np.ones((state.batch_size, self.n_experts), dtype=bool)
        return self._at_current_layer(state, state.plan.meets_deadline)

    def served(self, state: DecodeState, executed: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``executed`` (B, E) bool and :meth:`on_time`, written into ``out`` (B, E) bool: the experts a step
        serves with (the model backend's, before every step)."""
        if not self.enforce_deadline:
            np.copyto(out, executed)
            return out
        return np.logical_and(executed, self._at_current_layer(state, state.plan.meets_deadline, copy=False), out=out)

    def _at_current_layer(self, state: DecodeState, table: np.ndarray, copy: bool = True) -> np.ndarray:
        """(B, ...) a plan cost table (C, Lc, B, ...) at each episode's current token and layer: a copy (with
        ``copy=False`` a view where there is one episode)."""
        counters = state.counters
        if counters.shape[0] == 1:  # one episode (the single env, every step with a model): no index arrays
            row = counters[0].tolist()
            c = row[kernel.TOKEN] - row[kernel.CHUNK_START]
            at = table[c, row[kernel.LAYER] if self.scenario.cost_per_layer else 0, :1]
            return at.copy() if copy else at
        c = counters[:, kernel.TOKEN] - counters[:, kernel.CHUNK_START]
        lc = counters[:, kernel.LAYER] if self.scenario.cost_per_layer else 0
        return table[c, lc, np.arange(counters.shape[0])]

    def override_gates(self, state: DecodeState, rows, probs, topk_idx, topk_weight) -> None:
        """Replace episodes ``rows``' gating at their current (token, layer) by gates computed elsewhere (the
        model's live router outputs after the executed experts changed the hidden state): probs (R, E),
        topk_idx / topk_weight (R, K); the deviation tables and Top-K energies follow. Observe them again with
        :meth:`observe`."""
        plan, scn = state.plan, self.scenario
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        layer, c = state.layer[rows], state.token[rows] - state.chunk_start[rows]
        got = build_gating_rows(scn.weighted_mismatch, layer, np.asarray(probs).reshape(rows.size, -1),
                                np.asarray(topk_idx, dtype=np.int64).reshape(rows.size, -1),
                                np.asarray(topk_weight, dtype=np.float64).reshape(rows.size, -1))
        at = (c, layer, rows)
        plan.probs[at], plan.topk_idx[at], plan.topk_weight[at] = got.probs, got.topk_idx, got.topk_weight
        plan.deviation_table[at] = got.deviation_table
        lc = layer if scn.cost_per_layer else np.zeros_like(layer)
        energy = plan.energy_scopes[c, lc, rows, scn.scope_index]
        topk_energy, reference = topk_reference(energy, got.topk_idx)
        plan.topk[at] = np.stack([topk_energy, reference], axis=-1)
        observed = None if plan.observed_energy_scopes is None else plan.observed_energy_scopes[c, lc, rows]
        cost = observed_energy_cost(energy, observed, scn.scope_index, got.topk_idx, reference)
        plan.obs_expert[c, layer, rows, EXPERT_KEYS.index("energy_cost")] = np.minimum(cost, MAX_ENERGY_COST)
