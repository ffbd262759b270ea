"""The full Top-K model's run over a trace's text, window by window, computed once per window and kept.

A trace's text comes in windows of at most ``block_size`` tokens (``doc_start`` marks each window's first
token). An episode that starts at trace position s decodes with the context ``window .. s - 1`` run by the
full model; that context's keys and values are a slice of the full model's run of the window, and so are
the full model's next-token prediction and loss at every position (the reference ``accuracy_same`` and
``delta_loss`` compare with). :class:`TraceContext` runs each window once, when first needed.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch
import torch.nn.functional as F

from .decoder import full_model_run
from .moe_lm import MoELM


def check_vocabulary(model: MoELM, **ids: np.ndarray) -> None:
    """Every trace token id (``token_id=..., target_id=...``) indexes the model's vocabulary; else a
    :class:`~wide_env.gating.TraceError` naming the trace field and the checkpoint's vocabulary size (not torch's
    IndexError at the first reset)."""
    from wide_env.gating.trace import TraceError

    vocab = model.cfg.vocab_size
    for field, values in ids.items():
        bad = (values < 0) | (values >= vocab)
        if bad.any():
            at = int(np.flatnonzero(bad)[0])
            raise TraceError(f"trace field '{field}' has token id {int(values[at])} at position {at}, outside the "
                             f"checkpoint's vocabulary [0, {vocab}) (vocab_size = {vocab}): the trace's text was not "
                             "encoded for this model; use the checkpoint the trace was exported from "
                             "(config field gating.checkpoint_dir) or re-export the trace with it")


class TraceContext:
    """Per-window full-model keys/values, predictions and losses of one trace text under one model."""

    def __init__(self, model: MoELM, token_id: np.ndarray, target_id: np.ndarray, doc_start: np.ndarray | None):
        self.model = model.eval()
        self.token_id = np.asarray(token_id, np.int64)
        self.target_id = np.asarray(target_id, np.int64)
        check_vocabulary(model, token_id=self.token_id, target_id=self.target_id)
        n = len(self.token_id)
        starts = np.flatnonzero(doc_start) if doc_start is not None else np.array([0])
        if starts.size == 0 or starts[0] != 0:
            starts = np.r_[0, starts]
        self.window_starts = starts
        self._starts = starts.tolist()
        ends = np.r_[starts[1:], n]
        longest = int((ends - starts).max())
        if longest > model.cfg.block_size:
            raise ValueError(f"the trace has a window of {longest} tokens; the model's context holds "
                             f"{model.cfg.block_size} (re-export the trace with windows of block_size)")
        self._ends = ends
        self._windows: dict[int, tuple] = {}  # window start -> (keys, values) (L, H, n, hd)
        # the full model's prediction and loss at every position, filled window by window
        self._pred, self._nll = np.zeros(n, np.int64), np.zeros(n)
        self._done = np.zeros(len(starts), bool)

    def window(self, position: int) -> int:
        """The first trace position of the window holding ``position``."""
        return self._starts[bisect.bisect_right(self._starts, position) - 1]

    def _run(self, w: int) -> tuple:
        got = self._windows.get(w)
        if got is None:
            i = int(np.searchsorted(self.window_starts, w))
            end = self._ends[i]
            logits, keys, values = full_model_run(self.model, torch.from_numpy(self.token_id[w:end])[None])
            logits = logits[0].double()
            tgt = torch.from_numpy(self.target_id[w:end])
            self._pred[w:end] = logits.argmax(-1).numpy()
            self._nll[w:end] = (-F.log_softmax(logits, -1)[torch.arange(len(tgt)), tgt]).numpy()
            self._done[i] = True
            got = self._windows[w] = (keys[:, 0], values[:, 0])
        return got

    def prefix(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (L, H, n, hd) of the full model's context ``window .. position - 1``."""
        w, keys, values = self.window_run(position)
        return keys[:, :, : position - w], values[:, :, : position - w]

    def window_run(self, position: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        """The window holding ``position``: its first trace position and the full model's keys and values
        (L, H, n, hd) over all of it (episodes starting in it share them: the first position - window)."""
        w = self.window(position)
        return (w,) + self._run(w)

    def reference_one(self, position: int) -> tuple[int, float]:
        """:meth:`reference` at one trace position, as Python numbers (the single env's every token)."""
        i = bisect.bisect_right(self._starts, position) - 1
        if not self._done[i]:
            from .torch_threads import one_torch_thread

            with one_torch_thread():  # the window's full-model run (once)
                self._run(self._starts[i])
        return int(self._pred[position]), float(self._nll[position])

    def reference(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The full model's prediction (int64) and loss -log p(target) (nats) at each trace position."""
        positions = np.asarray(positions, np.int64).reshape(-1)
        windows = np.searchsorted(self.window_starts, positions, side="right") - 1
        for i in np.unique(windows[~self._done[windows]]):
            self._run(int(self.window_starts[i]))
        return self._pred[positions], self._nll[positions]
