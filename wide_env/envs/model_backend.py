"""The checkpoint inside the decoding envs, for every batch size: B KV-cached streams of
:class:`wide_env.models.decoder.StreamDecoder`, one per episode (row), driven by
:class:`wide_env.envs.batch.EpisodeBatch` (so the single env, the native vector env and the SB3 VecEnv run the
same code). Two uses:

* :class:`ModelAccuracy` (``gating.accuracy = "model"``, the default where the trace's accuracy rule is not
  validated): the observations keep the trace's gating; at every step the row's executed experts that met
  the deadline (all executed ones when deadlines are not enforced) are recorded for the step's layer, and
  when a token's last layer completes it, the checkpoint decodes the token through its L layers with those
  experts (every layer routed live, the combine rule on the live Top-K).
* :class:`LiveGating` (``gating.backend = "live"``): the checkpoint runs layer by layer with the steps: each
  layer's live router output replaces the trace's gating in the plan (observation, deviation table, Top-K
  energies), the layer is applied with the servers the step chose, and ``measured_deviation`` (the real
  layer-output deviation, next to the estimate) is reported every step, ``live_nll`` and ``live_deviation``
  (the token's loss and summed measured deviation) at each token's last layer (0 at other steps).

Either way a stream holds the episode's text: the full model's keys and values of the trace window before the
episode's first token (:class:`wide_env.models.trace_context.TraceContext`; with model accuracy one copy per
window, shared by the episodes that start in it), then every token as the episode decoded it (perturbed keys
and values reach the episode's later tokens); and at each token's last layer the step's accuracy fields become
the measured ones:

* ``accuracy_correct``: the model's next-byte prediction is the target;
* ``accuracy_same``: it equals the full Top-K model's prediction (same context);
* ``accuracy_full``: the full model's prediction is the target;
* ``delta_loss``: -log p(target) minus the full model's (nats); with ``reward.objective = "accuracy"`` the
  reward's accuracy term is -accuracy_weight x this.

With ``gating.model_state = true`` the model accuracy's streams also fill the model-state observation keys
(the router's entropy and margin and the logit-lens confidence at each stream's current layer, the previous
token's loss; :mod:`wide_env.envs.model_state`) after every step and reset.

For the same executed experts both report the same accuracy. Rows of a batch that are at the same layer run
in one batched pass.
"""

from __future__ import annotations

import weakref

import numpy as np

from wide_env.envs.accuracy_source import (ACCURACY_SOURCES, accuracy_source_of,  # noqa: F401 (public names)
                                           checkpoint_dir_of)
from wide_env.models.fused_math import token_losses
from wide_env.models.torch_threads import one_torch_thread
from wide_env.profiles import profile_checkpoint

# A loaded checkpoint and its trace context per (checkpoint directory, gating source), shared by the envs of a
# process (read-only: each env's decoder holds its own caches).
_CONTEXTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# a loaded model's weights packed for the compiled decoder, shared the same way
_PACKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
#: [choice] memory for the trace windows' contexts a batch of few streams keeps beyond the ones in use (every
#: window of the shipped Mixtral and GPT-OSS traces; 85 of Switch's 128)
_SLOT_BYTES = 32 << 20


def _packed_weights(model):
    got = _PACKED.get(model)
    if got is None:
        from wide_env.models.fused_decoder import pack_weights

        got = _PACKED[model] = pack_weights(model)
    return got


def model_backend_for(sim, num_envs: int, accuracy_source: str) -> "ModelAccuracy | LiveGating | None":
    """The checkpoint's part in a batch of ``sim``'s episodes for its resolved ``accuracy_source``
    (:func:`wide_env.envs.accuracy_source.resolve_accuracy_source`): live gating, model accuracy, or None."""
    if accuracy_source not in ("live", "model"):
        return None
    checkpoint = checkpoint_dir_of(sim.config)
    if checkpoint is None:  # a user's trace under the live backend (checked in the resolution for "model"): the
        checkpoint = profile_checkpoint(sim.config.profile)  # profile's shipped model, checked against L, E, K
    return (LiveGating if accuracy_source == "live" else ModelAccuracy)(sim, checkpoint, num_envs)


def _model_and_context(source, checkpoint_dir: str):
    from wide_env.models.moe_lm import CheckpointError, load_checkpoint
    from wide_env.models.trace_context import TraceContext

    per_source = _CONTEXTS.setdefault(source, {})
    got = per_source.get(checkpoint_dir)
    if got is None:
        try:
            model, _ = load_checkpoint(checkpoint_dir)
        except CheckpointError as exc:
            raise CheckpointError(f"config 'gating.checkpoint_dir' (the model that measures accuracy): {exc}; point "
                                  "it at a directory with moe_lm.safetensors and moe_lm.json, drop it for the "
                                  "profile's shipped model, or set gating.accuracy = 'rule'") from None
        cfg = model.cfg
        if (cfg.n_layer, cfg.n_expert, cfg.top_k) != (source.n_layers, source.n_experts, source.top_k):
            raise ValueError(f"config 'gating.checkpoint_dir': the checkpoint {checkpoint_dir} has (L, E, K) = "
                             f"({cfg.n_layer}, {cfg.n_expert}, {cfg.top_k}) but the trace has ({source.n_layers}, "
                             f"{source.n_experts}, {source.top_k}); use the checkpoint the trace was exported from")
        got = per_source[checkpoint_dir] = (model, TraceContext(model, source.token_id, source.target_id,
                                                                source.doc_start))
    return got


class _ModelStreams:
    """One decoding stream per episode of a batch, started from the episode's trace context."""

    #: step info keys this part adds (float columns after the simulator's)
    extra_keys: tuple[str, ...] = ()
    #: whether the part writes the next layers' gating into the plan after a step (the batch observes after it)
    routes_gating = False
    #: whether the part writes observation keys of its own (:meth:`ModelAccuracy.observe`)
    observes = False
    _needs = "config 'gating.accuracy' = 'model'"

    def __init__(self, sim, checkpoint_dir: str, num_envs: int):
        try:
            import torch  # noqa: F401  (the envs leave torch's RNG to the caller; its threads: one_torch_thread)
        except ImportError:
            raise ImportError(f"{self._needs} needs torch: pip install torch (or the default gating.backend = "
                              "'table' with gating.accuracy = 'rule')") from None
        source = sim.source
        with one_torch_thread():
            model, self.context = _model_and_context(source, str(checkpoint_dir))
            self.decoder = self._decoder(model, source.mismatch, num_envs)
        self.sim = sim
        #: the checkpoint's torch model (the reference the streams were built from; solvers such as the accuracy
        #: bound run it themselves)
        self.model = model
        self.token_id, self.target_id = self.context.token_id, self.context.target_id
        self.n_layers = sim.n_layers
        self.weight = sim.config.reward.accuracy_weight if sim.config.reward.objective == "accuracy" else None

    def start(self, state, rows: np.ndarray | None = None) -> None:
        """New episodes in ``rows`` (index array; None = all): load each one's context."""
        rows = np.arange(state.batch_size) if rows is None else np.asarray(rows, np.int64)
        with one_torch_thread():  # the trace window's full-model run, once per window
            for row in rows:
                keys, values = self.context.prefix(int(state.start[row]))
                self.decoder.set_prefix(int(row), keys, values)

    def before_step(self, state, executed: np.ndarray) -> tuple:
        """What the step is about to do: the rows that step, their layer and trace position."""
        return ~state.done, state.layer.copy(), state.start + state.token

    def _report(self, outcome, rows: np.ndarray, positions: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """Rows whose token completed: the step's accuracy fields (and the accuracy reward) from the model's
        next-token ``logits`` (R, V); returns the tokens' losses -log p(target) (nats)."""
        target = self.target_id[positions]
        pred, nll = np.empty(rows.size, np.int64), np.empty(rows.size)
        token_losses(np.ascontiguousarray(logits), target, pred, nll)
        with one_torch_thread():  # the window's full-model run where no episode started in it
            full_pred, full_nll = self.context.reference(positions)
        delta = nll - full_nll
        outcome.column("accuracy_correct")[rows] = pred == target
        outcome.column("accuracy_same")[rows] = pred == full_pred
        outcome.column("accuracy_full")[rows] = full_pred == target
        outcome.column("delta_loss")[rows] = delta
        if self.weight is not None:  # the batch sums the reward afterwards (wide_env.rules.compose_reward)
            outcome.column("reward_accuracy")[rows] = -self.weight * delta
        return nll

    def _report_one(self, outcome, position: int, logits: np.ndarray) -> float:
        """:meth:`_report` for a batch of one (row 0) whose token at trace ``position`` completed with next-token
        ``logits`` (1, V): the same numbers, without index arrays (the single env's every token)."""
        target = self.target_id[position:position + 1]
        pred, nll = self._one_pred, self._one_nll
        token_losses(logits, target, pred, nll)
        pred, nll, target = int(pred[0]), float(nll[0]), int(target[0])
        full_pred, full_nll = self.context.reference_one(position)  # (its full-model run where no episode started)
        delta = nll - full_nll
        got = [("accuracy_correct", pred == target), ("accuracy_same", pred == full_pred),
               ("accuracy_full", full_pred == target), ("delta_loss", delta)]
        if self.weight is not None:
            got.append(("reward_accuracy", -self.weight * delta))
        index, columns = outcome.fields.index, (outcome.values, outcome.counts)
        for name, value in got:
            which, i = index[name]
            columns[which][0, i] = value
        return nll


class ModelAccuracy(_ModelStreams):
    """The measured accuracy of a batch's episodes; the observations keep the trace's gating. The streams run
    in compiled code (:class:`wide_env.models.fused_decoder.FusedDecoder`), a layer per step: each stepped row
    applies its layer with the experts that served it and routes its next one (so ``decoder.probs`` and
    ``decoder.x`` hold each row's current layer's router output and residual stream)."""

    def _decoder(self, model, mismatch, num_envs):
        from wide_env.models.fused_decoder import FusedDecoder

        # the episodes starting in one trace window share its context (one slot per window in use); a few streams
        # keep more windows than they use at a time, up to _SLOT_BYTES, so that a new episode mostly finds its
        # window's context already copied in (a single env on Mixtral copied 1 MiB, about 110 us, at every reset)
        cfg = model.cfg
        slot_bytes = 2 * cfg.n_layer * cfg.d_model * cfg.block_size * 4  # keys and values, float32
        slots = min(len(self.context.window_starts), max(num_envs, _SLOT_BYTES // slot_bytes))
        return FusedDecoder(model, mismatch, num_envs, weights=_packed_weights(model), prefix_slots=slots)

    def __init__(self, sim, checkpoint_dir: str, num_envs: int):
        super().__init__(sim, checkpoint_dir, num_envs)
        self._stepped = np.ones(num_envs, bool)  # the decoder steps every stream with a token in progress
        # the experts each step serves with (before_step writes them here), and the state the decoder's
        # arguments are bound to (FusedDecoder.bind: the compiled call without numba's per-call typing)
        self._effective = np.zeros((num_envs, sim.n_experts), bool)
        self._bound_state = None
        self._one = num_envs == 1
        self._one_pred, self._one_nll = np.zeros(1, np.int64), np.zeros(1)  # _report_one's
        self.observes = bool(sim.config.gating.model_state)
        if self.observes:
            from wide_env.envs.model_state import ModelState

            self.state_keys = ModelState(self.context.model, sim.obs_slices, num_envs)

    def __getstate__(self) -> dict:  # pickle / deepcopy: the copy binds its own decoder's call again
        return {**self.__dict__, "_bound_state": None}

    def observe(self, obs: np.ndarray, rows: np.ndarray | None = None) -> None:
        """Write the model-state keys of ``rows`` (index array; None = all) into ``obs`` (B, D)."""
        self.state_keys.write(self.decoder, obs, rows)

    def start(self, state, rows: np.ndarray | None = None) -> None:
        """Point the episodes' streams at their contexts (shared by the episodes of a trace window) and start
        their first token (layer 0 routed)."""
        rows = np.arange(state.batch_size) if rows is None else np.asarray(rows, np.int64)
        context, decoder = self.context, self.decoder
        for row, start in zip(rows.tolist(), state.start[rows].tolist()):
            window = context.window(start)
            if not decoder.share_loaded(row, window, start - window):  # (a slot holds it: the usual case)
                with one_torch_thread():  # the trace window's full-model run, once per window
                    window, keys, values = context.window_run(start)
                decoder.share_prefix(row, window, keys, values, start - window)
        if self.observes:
            self.state_keys.previous_loss[rows] = 0.0  # an episode's first token has no previous one
        position = state.start[rows] + state.token[rows]
        self.decoder.begin(rows, self.token_id[position], position)

    def before_step(self, state, executed: np.ndarray) -> np.ndarray:
        """The experts the step serves with: executed and in time (the realised delays)."""
        return self.sim.served(state, executed, self._effective)

    def after_step(self, state, outcome, effective: np.ndarray) -> None:
        """Each stepped row applies its layer with its effective experts (the decoder checks it is in step with
        the episode); rows whose token completed report it and start their next token."""
        if effective is self._effective:  # before_step's buffer: the bound call
            if state is not self._bound_state:
                self.decoder.bind(self._stepped, effective, state.layer, state.start, state.token, state.done,
                                  self.token_id)
                self._bound_state = state
            finished = self.decoder.advance_bound()
        else:
            finished = self.decoder.advance(self._stepped, effective, state.layer, state.start, state.token,
                                            state.done, self.token_id)
        if not self.decoder.n_finished:
            return
        if self._one:  # the single env: one token, its numbers as Python's
            nll = self._report_one(outcome, int(self.decoder.finished_at[0]), self.decoder.logits)
            rows = 0
        else:
            rows = np.flatnonzero(finished)
            nll = self._report(outcome, rows, self.decoder.finished_at[rows], self.decoder.logits[rows])
        if self.observes:
            self.state_keys.previous_loss[rows] = nll


class LiveGating(_ModelStreams):
    """The checkpoint runs with the steps: live gating in the plan (and so in the observations), the layers
    applied with the servers the steps chose, measured accuracy and deviation."""

    extra_keys = ("measured_deviation", "live_nll", "live_deviation")
    _needs = "config 'gating.backend' = 'live'"
    routes_gating = True

    @staticmethod
    def _decoder(model, mismatch, num_envs):
        from wide_env.models.decoder import StreamDecoder

        return StreamDecoder(model, mismatch, num_envs)

    def __init__(self, sim, checkpoint_dir: str, num_envs: int):
        super().__init__(sim, checkpoint_dir, num_envs)
        self.token_deviation = np.zeros(num_envs)

    def start(self, state, rows: np.ndarray | None = None) -> None:
        """Load the episodes' contexts and route their first token's layer 0 live (observe them afterwards)."""
        super().start(state, rows)
        rows = np.arange(state.batch_size) if rows is None else np.asarray(rows, np.int64)
        with one_torch_thread():
            self._begin(state, rows)

    def _begin(self, state, rows: np.ndarray) -> None:
        gates = self.decoder.begin(rows, self.token_id[state.start[rows] + state.token[rows]])
        self.token_deviation[rows] = 0.0
        self.sim.override_gates(state, rows, gates.probs, gates.topk_idx, gates.topk_weight)

    def after_step(self, state, outcome, before: tuple) -> np.ndarray:
        """Apply each stepped row's layer with the servers the step chose, report what was measured, and route
        the rows' next layer (or next token) live into the plan (the batch observes them afterwards). Returns
        the extra info columns (B, 3)."""
        with one_torch_thread():
            return self._after_step(state, outcome, before)

    def _after_step(self, state, outcome, before: tuple) -> np.ndarray:
        stepped, layer, position = before
        extra = np.zeros((state.batch_size, len(self.extra_keys)))  # 0 where nothing was measured (checkers
        # compare infos for equality: no NaN)
        servers = outcome.server
        for l in np.unique(layer[stepped]):
            rows = np.flatnonzero(stepped & (layer == l))
            gates = self.decoder.execute(rows, served=servers[rows])
            extra[rows, 0] = self.decoder.last_deviation
            self.token_deviation[rows] += self.decoder.last_deviation
            if gates is not None:
                self.sim.override_gates(state, rows, gates.probs, gates.topk_idx, gates.topk_weight)
                continue
            extra[rows, 1] = self._report(outcome, rows, position[rows], self.decoder.finish(rows).numpy())
            extra[rows, 2] = self.token_deviation[rows]
            going = rows[~state.done[rows]]  # the episode's next token
            if going.size:
                self._begin(state, going)
        return extra
