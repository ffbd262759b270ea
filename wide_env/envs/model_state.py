"""The model-state observation keys (``gating.model_state = true``; layout in
:data:`wide_env.sim.observation.MODEL_STATE_KEYS`), read off each episode's decoding stream
(:class:`wide_env.models.fused_decoder.FusedDecoder`) after a step or a reset.

The stream holds its current layer's router softmax (``probs``: routed live on the stream's own hidden state)
and its residual stream ``x`` (the token's hidden state after the layers applied so far). Per row:

* ``router_entropy``: -sum_e p_e log p_e / log E (0: one expert takes all; 1: uniform);
* ``router_margin``: p_(1) - p_(2), the top-1 minus the top-2 probability;
* ``logit_lens_confidence``: max_v softmax(head(ln_f(x)))_v, the LM head on the residual stream so far (the
  "logit lens"); costs one (d x V) product and V exponentials per row and step (d 32-64, V 256 on the
  shipped models; docs/model.md#model-state-observations gives the measured cost);
* ``previous_loss``: the loss -log p(target) (nats) of the episode's previous token as the model measured it
  (the ``delta_loss`` of that token plus the full model's loss), 0 at the episode's first token.

Computed in float64 from the stream's float32 state, in compiled code (one pass per row).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from wide_env.sim.observation import MAX_LOSS, MODEL_STATE_KEYS

_LN_EPS = 1e-5  # torch.nn.LayerNorm's default (the model's ln_f)


class ModelState:
    """Writes the model-state keys of a batch's rows into their observations."""

    def __init__(self, model, obs_slices, num_envs: int):
        at = [obs_slices[key].start for key in MODEL_STATE_KEYS]
        if at != list(range(at[0], at[0] + len(at))):  # one contiguous block (the layout appends them together)
            raise AssertionError(f"the model-state keys must be contiguous in the observation layout, got {at}")
        self._block = slice(at[0], at[0] + len(at))
        self._ln_w = model.ln_f.weight.detach().double().numpy()
        self._ln_b = model.ln_f.bias.detach().double().numpy()
        self._head = np.ascontiguousarray(model.head.weight.detach().double().numpy().T)  # (d, V)
        self._log_e = float(np.log(model.cfg.n_expert)) if model.cfg.n_expert > 1 else 1.0
        #: each row's previous token's loss (nats); the backend sets it when a token completes
        self.previous_loss = np.zeros(int(num_envs))

    def write(self, decoder, obs: np.ndarray, rows: np.ndarray | None = None) -> None:
        """Write the keys of ``rows`` (None = all) into ``obs`` (B, D) float32."""
        rows = np.arange(obs.shape[0]) if rows is None else np.asarray(rows, np.int64)
        _write_keys(decoder.probs, decoder.x, self._ln_w, self._ln_b, self._head, self.previous_loss, self._log_e,
                    rows, obs, rows, self._block.start)


@njit(cache=True, nogil=True)
def _write_keys(probs, x, ln_w, ln_b, head, previous_loss, log_e, rows, out, dest, at):
    """The keys of stream ``rows[i]`` into ``out[dest[i], at:at + 4]``, for every i; ``head`` (d, V). One pass
    per row in float64 (compiled: numpy's per-call overhead made the keys cost most of a step)."""
    E, d, V = probs.shape[1], x.shape[1], head.shape[1]
    normed = np.empty(d)
    logits = np.empty(V)
    for i in range(rows.size):
        b = rows[i]
        entropy, first, second = 0.0, -1.0, -1.0
        for e in range(E):
            p = np.float64(probs[b, e])
            if p > 0.0:
                entropy -= p * np.log(p)
            if p > first:
                first, second = p, first
            elif p > second:
                second = p
        mean = 0.0
        for j in range(d):
            mean += x[b, j]
        mean /= d
        var = 0.0
        for j in range(d):
            var += (np.float64(x[b, j]) - mean) ** 2
        inv = 1.0 / np.sqrt(var / d + _LN_EPS)
        for j in range(d):
            normed[j] = (np.float64(x[b, j]) - mean) * inv * ln_w[j] + ln_b[j]
        logits[:] = 0.0
        for j in range(d):  # along the vocabulary inside: independent sums, SIMD lanes without reassociation
            n = normed[j]
            for v in range(V):
                logits[v] += n * head[j, v]
        top = logits.max()
        total = 0.0
        for v in range(V):
            total += np.exp(logits[v] - top)
        row = dest[i]
        out[row, at] = min(max(entropy / log_e, 0.0), 1.0)
        out[row, at + 1] = first - second if E > 1 else 1.0
        out[row, at + 2] = 1.0 / total
        out[row, at + 3] = min(previous_loss[b], MAX_LOSS)
