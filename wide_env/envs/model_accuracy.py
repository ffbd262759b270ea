"""Model accuracy of B decoding episodes (``gating.accuracy = "model"``, the default where the trace's accuracy
rule is not validated): the shipped checkpoint decodes each episode's tokens with the experts that executed.

Per episode (row of the batch) a KV-cached stream of :class:`wide_env.models.decoder.StreamDecoder` holds the
episode's text: the window of the trace before the episode's first token (the full model's keys and values,
:class:`wide_env.models.trace_context.TraceContext`), then every decoded token as the episode decoded it. At
every step the row's executed experts that met the deadline (all executed ones when deadlines are not
enforced) are recorded for the step's layer; when a token's last layer completes it, the checkpoint decodes
the token through its L layers with those masks (every layer re-routed live, the combine rule on the live
Top-K; perturbed keys and values reach the episode's later tokens) and the step's accuracy fields become the
measured ones:

* ``accuracy_correct``: the model's next-byte prediction is the target;
* ``accuracy_same``: it equals the full Top-K model's prediction (same context);
* ``accuracy_full``: the full model's prediction is the target;
* ``delta_loss``: -log p(target) minus the full model's (nats); with ``reward.objective = "accuracy"`` the
  reward's accuracy term is -accuracy_weight x this.

That is what the live backend (``gating.backend = "live"``) reports for the same executed experts; the
observations keep the trace's gating (the live backend shows the live router's instead, single env only).
Rows of a batch that complete tokens together decode in one batched pass.
"""

from __future__ import annotations

import importlib.util
import warnings
import weakref

import numpy as np

from wide_env.profiles import accuracy_rule_validated, profile_checkpoint
from wide_env.sim.decode.kernel import FLOAT_FIELDS

#: what each accuracy source means, for tables and plots
ACCURACY_SOURCES = {"live": "measured on the live model (gating.backend = 'live')",
                    "model": "measured on the model: the checkpoint decodes each token with the executed experts "
                             "(exactly what the live model gives for them)",
                    "rule": "the logit-effect rule of the trace (agrees with the live model, docs/real-model.md)",
                    "rule_unvalidated": "the logit-effect rule of the trace, NOT validated for this profile or trace "
                                        "(the deep paper-profile models: off by 1 to 20 points, optimistic beyond "
                                        "their default budget; docs/real-model.md); gating.accuracy = 'model' "
                                        "measures it (needs torch and the trace's checkpoint)",
                    "none": "not available for this gating source"}

_WARNED_UNVALIDATED: set[str] = set()


def checkpoint_dir_of(config) -> str | None:
    """The checkpoint the model accuracy and the live backend run: ``gating.checkpoint_dir``, else the
    profile's shipped model for the profile's shipped trace; None for a user's trace without a checkpoint."""
    if config.gating.checkpoint_dir is not None:
        return config.gating.checkpoint_dir
    return profile_checkpoint(config.profile) if config.gating.trace_path is None else None


def accuracy_source_of(config, source=None) -> str:
    """Where a decoding config's accuracy figures come from (a key of :data:`ACCURACY_SOURCES`; ``source`` the
    gating source, for "auto": the model needs its text), warning once per profile where they come from a
    rule not validated against the live model."""
    g = config.gating
    if g.backend == "live":
        return "live"
    if g.accuracy == "model":
        return "model"
    validated = accuracy_rule_validated(config)
    if g.accuracy == "auto" and not validated and importlib.util.find_spec("torch") is not None \
            and checkpoint_dir_of(config) is not None \
            and getattr(source, "token_id", None) is not None and getattr(source, "target_id", None) is not None:
        return "model"
    if validated:
        return "rule"
    if config.profile not in _WARNED_UNVALIDATED:  # once per profile and process: envs are made by the hundred
        _WARNED_UNVALIDATED.add(config.profile)
        warnings.warn(f"profile {config.profile!r}: accuracy in info comes from "
                      f"{ACCURACY_SOURCES['rule_unvalidated']}", UserWarning, stacklevel=3)
    return "rule_unvalidated"


def model_accuracy_for(sim, num_envs: int) -> "ModelAccuracy | None":
    """The model accuracy of a batch of ``sim``'s episodes, or None where the figures come from elsewhere."""
    if not getattr(sim, "has_accuracy", False) or accuracy_source_of(sim.config, sim.source) != "model":
        return None
    checkpoint = checkpoint_dir_of(sim.config)
    if checkpoint is None:
        raise ValueError("config 'gating.accuracy' = 'model' with a user's trace (gating.trace_path) needs "
                         "gating.checkpoint_dir: the checkpoint the trace was exported from")
    return ModelAccuracy(sim, checkpoint, num_envs)

# A loaded checkpoint and its trace context per (checkpoint directory, gating source), shared by the envs of a
# process (read-only: each env's decoder holds its own caches).
_CONTEXTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_REWARD_TERMS = ("reward_energy", "reward_deviation", "reward_deadline", "reward_accuracy")
assert set(_REWARD_TERMS) <= set(FLOAT_FIELDS)


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


class ModelAccuracy:
    """The measured accuracy of the ``num_envs`` episodes of an :class:`~wide_env.envs.batch.EpisodeBatch`."""

    def __init__(self, sim, checkpoint_dir: str, num_envs: int):
        try:
            import torch
        except ImportError:
            raise ImportError("config 'gating.accuracy' = 'model' needs torch: pip install torch (or set "
                              "gating.accuracy = 'rule' for the trace's accuracy rule)") from None
        from wide_env.models.decoder import StreamDecoder

        torch.set_num_threads(1)
        source = sim.source
        if getattr(source, "token_id", None) is None or getattr(source, "target_id", None) is None:
            raise ValueError("config 'gating.accuracy' = 'model' needs a trace with 'token_id' and 'target_id' "
                             "(exported by python -m wide_env.models.export); set gating.accuracy = 'rule'")
        model, self.context = _model_and_context(source, str(checkpoint_dir))
        self.decoder = StreamDecoder(model, source.mismatch, num_envs)
        self.token_id, self.target_id = self.context.token_id, self.context.target_id
        self.n_layers = sim.n_layers
        self.weight = sim.config.reward.accuracy_weight if sim.config.reward.objective == "accuracy" else None
        self.masks = np.zeros((num_envs, sim.n_layers, sim.n_experts), dtype=bool)

    def start(self, state, rows: np.ndarray | None = None) -> None:
        """New episodes in ``rows`` (index array; None = all): load each one's context."""
        rows = np.arange(state.batch_size) if rows is None else np.asarray(rows, np.int64)
        for row in rows:
            keys, values = self.context.prefix(int(state.start[row]))
            self.decoder.set_prefix(int(row), keys, values)

    def record(self, outcome, stepped: np.ndarray, position: np.ndarray, layer: np.ndarray,
               effective: np.ndarray) -> None:
        """After a step: keep the rows' effective masks (executed and in time, (B, E)) at the step's layer; rows
        whose token completed decode it, and ``outcome``'s accuracy fields (and the accuracy reward) become the
        measured ones. ``stepped`` (B,) bool: the rows that stepped; ``position``/``layer``: their trace
        position and layer before the step."""
        rows = np.flatnonzero(stepped)
        self.masks[rows, layer[rows]] = effective[rows]
        rows = rows[layer[rows] == self.n_layers - 1]
        if rows.size == 0:
            return
        import torch

        pos = position[rows]
        logits = self.decoder.decode(rows, self.token_id[pos], self.masks[rows]).double()
        target = self.target_id[pos]
        pred = logits.argmax(-1).numpy()
        nll = -torch.log_softmax(logits, -1)[torch.arange(rows.size), torch.from_numpy(target)].numpy()
        full_pred, full_nll = self.context.reference(pos)
        delta = nll - full_nll
        outcome.column("accuracy_correct")[rows] = pred == target
        outcome.column("accuracy_same")[rows] = pred == full_pred
        outcome.column("accuracy_full")[rows] = full_pred == target
        outcome.column("delta_loss")[rows] = delta
        if self.weight is not None:
            outcome.column("reward_accuracy")[rows] = -self.weight * delta
            outcome.column("reward")[rows] = sum(outcome.column(k)[rows] for k in _REWARD_TERMS)
