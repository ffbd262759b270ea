"""Live backend of `WideMoE-v0`: the shipped MoE checkpoint runs inside the env (torch, CPU).

The trace supplies the text (token and target ids, document windows); the model runs token by token
with a KV cache and the experts the agent executed, so each layer's router sees the hidden state the
agent's earlier choices produced, and each token reports whether the real next-byte prediction stays
correct and equal to the full Top-K model's. Everything else (channels, costs, budgets) is the shared
simulator's; only the gating entries of the plan are overwritten with the live router outputs.
"""

from __future__ import annotations

import numpy as np


class LiveBackend:
    """Drives :class:`wide_env.models.live.LiveMoE` alongside a single :class:`WideMoEEnv` episode."""

    def __init__(self, source, checkpoint_dir: str | None):
        try:
            import torch  # noqa: F401
        except ImportError:
            raise ImportError("config 'gating.backend' = 'live' needs torch: pip install 'wide-env[train]' "
                              "(or use the default 'table' backend)") from None
        from wide_env.models.live import DATA_DIR, LiveMoE
        from wide_env.models.moe_lm import load_checkpoint

        torch.set_num_threads(1)
        if getattr(source, "token_id", None) is None or getattr(source, "target_id", None) is None:
            raise ValueError("config 'gating.backend' = 'live' needs a trace with 'token_id' and 'target_id'")
        model, _ = load_checkpoint(checkpoint_dir or DATA_DIR)
        cfg = model.cfg
        if (cfg.n_layer, cfg.n_expert, cfg.top_k) != (source.n_layers, source.n_experts, source.top_k):
            raise ValueError(f"config 'gating.checkpoint_dir': the checkpoint has (L, E, K) = "
                             f"({cfg.n_layer}, {cfg.n_expert}, {cfg.top_k}) but the trace has "
                             f"({source.n_layers}, {source.n_experts}, {source.top_k}); use the trace it exported")
        self.source = source
        self.model = LiveMoE(model, source.mismatch, track_full=True)
        self.window_starts = np.flatnonzero(source.doc_start) if source.doc_start is not None else np.array([0])
        self.result = None

    def start_episode(self, sim, state) -> None:
        """Reset the KV cache, feed the document's text before the episode with the full model, and
        route the first token's layer 0 live."""
        start = int(state.start[0])
        window = int(self.window_starts[np.searchsorted(self.window_starts, start, side="right") - 1])
        self.model.reset()
        self.model.prefill(self.source.token_id[window:start])
        gate = self.model.begin(int(self.source.token_id[start]))
        sim.override_gates(state, 0, gate.probs, gate.topk_idx, gate.topk_weight)

    def execute(self, position: int, executed, server, info: dict) -> None:
        """Apply the layer with the env's serving decision (trace ``position`` of the token) and report the
        layer output's real deviation (``measured_deviation``, next to the estimate ``deviation``); at the
        token's last layer, report its measured outcome: accuracy and the loss change (``delta_loss``)."""
        self._pending = self.model.execute(np.asarray(executed, dtype=bool), served=np.asarray(server))
        info["measured_deviation"] = float(self.model.last_deviation)
        if self._pending is None:
            result = self.model.finish(int(self.source.target_id[position]))
            info["accuracy_correct"] = int(result.correct)
            info["accuracy_same"] = int(result.same_as_full)
            info["delta_loss"] = float(result.nll - result.full_nll)
            info["live_nll"] = float(result.nll)
            info["live_deviation"] = float(result.deviation.sum())

    def next_layer(self, sim, state) -> None:
        """After the simulator advanced: route the next layer (or the next token's first layer) live."""
        if self._pending is None:
            gate = self.model.begin(int(self.source.token_id[int(state.start[0] + state.token[0])]))
        else:
            gate = self._pending
        sim.override_gates(state, 0, gate.probs, gate.topk_idx, gate.topk_weight)
