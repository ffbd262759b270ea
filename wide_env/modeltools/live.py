"""Live backend: run a shipped MoE LM token by token (KV cache) with a caller-chosen set of executed experts.

The decoding step and the combine rule are :mod:`wide_env.models.decoder`'s (one stream, plus an unperturbed
reference stream with ``track_full``).

Two ways to drive it:

* one call per token: ``step(token_id, executed=None | (L, E) mask | callable(layer, gate) -> (E,) mask)``;
* layer by layer (a policy that sees each layer's router before choosing):
  ``gate = begin(token_id)``; then ``gate = execute(mask)`` per layer until it returns None;
  then ``finish(target)``.

Perturbed experts change this token's hidden states and therefore the keys/values later tokens attend to,
as in a real deployment. With ``track_full=True`` a second, unperturbed stream runs alongside so that every
result also says whether the prediction equals the full Top-K model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from wide_env.models.decoder import ContextFull, Gates, StreamDecoder, serve_batch
from wide_env.models.moe_lm import MoELM, combine_matrix, load_checkpoint
from wide_env.profiles import DEFAULT_PROFILE, profile_checkpoint, profile_trace

#: the default profile's shipped checkpoint and trace (its manifest, wide_env.profiles)
DEFAULT_CHECKPOINT = Path(profile_checkpoint(DEFAULT_PROFILE))
DEFAULT_TRACE = Path(profile_trace(DEFAULT_PROFILE))


@dataclass
class LayerGate:
    layer: int
    probs: np.ndarray  # (E,) router softmax
    topk_idx: np.ndarray  # (K,) descending
    topk_weight: np.ndarray  # (K,) renormalised combine weights


@dataclass
class TokenResult:
    logits: np.ndarray  # (V,) next-token logits
    pred: int  # argmax
    correct: Optional[bool]  # pred == target (None when no target given)
    same_as_full: Optional[bool]  # pred equals the unperturbed model's (None unless track_full)
    served: np.ndarray  # (L, K) phi per slot: expert index, or E = skipped
    estimate: np.ndarray  # (L,) deviation estimate sum_i w_i D_l(i, phi(i)) (calibration-mean tables)
    deviation: np.ndarray  # (L,) measured ||sum_i w_i E_i(h) - sum_i w_i E_phi(i)(h)||
    gates: list = field(default_factory=list)  # LayerGate per layer
    nll: Optional[float] = None  # -log p(target)
    full_nll: Optional[float] = None  # -log p(target) under the unperturbed model (with track_full)


def serve_map(D_l: np.ndarray, topk_idx: np.ndarray, executed: np.ndarray) -> np.ndarray:
    """phi for one layer: (K,) expert index serving each Top-K slot, or E for 'skip' (:func:`serve_batch`)."""
    return serve_batch(D_l, np.asarray(topk_idx)[None], np.asarray(executed, bool)[None])[0]


def _gate(g: Gates, row: int = 0) -> LayerGate:
    return LayerGate(g.layer, g.probs[row], g.topk_idx[row], g.topk_weight[row])


class LiveMoE:
    """Token-by-token execution of :class:`MoELM` under per-layer expert masks: stream 0 of a
    :class:`~wide_env.models.decoder.StreamDecoder` (stream 1 = the unperturbed model, with ``track_full``)."""

    PERTURBED, REFERENCE = 0, 1

    def __init__(self, model: MoELM, mismatch: np.ndarray, track_full: bool = False):
        self.track_full = track_full
        self.decoder = StreamDecoder(model, mismatch, 2 if track_full else 1)
        self.model, self.cfg, self.D = self.decoder.model, self.decoder.cfg, self.decoder.D
        self.L, self.E, self.K = self.decoder.L, self.decoder.E, self.decoder.K
        self.reset()

    @classmethod
    def from_files(cls, ckpt: Union[str, Path] = DEFAULT_CHECKPOINT, trace: Union[str, Path] = DEFAULT_TRACE,
                   track_full: bool = False) -> "LiveMoE":
        """Load the checkpoint and take the mismatch tables from a trace exported from it."""
        from wide_env.gating.trace import load_trace

        model, _ = load_checkpoint(ckpt)
        return cls(model, load_trace(trace)["mismatch"], track_full=track_full)

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        #: deviation bound sum_i w_i D_l(i, phi(i)) and measured ||layer output - full layer output|| of the
        #: layer execute() applied last (model units; NaN before the first execute)
        self.last_estimate = self.last_deviation = float("nan")
        self.decoder.reset()
        self._cur = None

    @property
    def pos(self) -> int:
        """Tokens in the context."""
        return int(self.decoder.length[self.PERTURBED])

    def truncate(self, pos: int) -> None:
        """Forget every token from position ``pos`` on (both streams): e.g. try several perturbations of the
        same token from the same prefix."""
        if not 0 <= pos <= self.pos:
            raise ValueError(f"cannot truncate to {pos}: context holds {self.pos} tokens")
        for row in range(self.decoder.n_streams):
            self.decoder.truncate(row, pos)
        self._cur = None

    @property
    def block_size(self) -> int:
        return self.cfg.block_size

    # ------------------------------------------------------------------ layer-by-layer API
    @torch.no_grad()
    def begin(self, token_id: int) -> LayerGate:
        """Start a token: returns layer 0's gating. Then call execute() once per layer."""
        if self.pos >= self.cfg.block_size:
            raise ContextFull(f"context is full ({self.cfg.block_size} tokens); call reset()")
        ref = self.decoder.decode([self.REFERENCE], [token_id])[0] if self.track_full else None
        g = _gate(self.decoder.begin([self.PERTURBED], [token_id]))
        self._cur = dict(layer=0, gates=[g], ref=ref, served=np.zeros((self.L, self.K), np.int64),
                         estimate=np.zeros(self.L), dev=np.zeros(self.L))
        return g

    @torch.no_grad()
    def execute(self, executed: Optional[np.ndarray] = None, served: Optional[np.ndarray] = None) -> Optional[LayerGate]:
        """Apply the current layer with the executed-expert mask (E,) (None = exactly the Top-K).
        ``served`` (K,) overrides the combine rule with an explicit phi per slot (expert index, E = skip).
        Returns the next layer's gating, or None after the last layer (then call finish())."""
        c = self._cur
        if c is None or c["layer"] >= self.L:
            raise RuntimeError("execute() called without a pending layer; call begin(token) first")
        if executed is not None:
            executed = np.asarray(executed, bool).reshape(-1)
            if executed.shape != (self.E,):
                raise ValueError(f"executed mask must have shape ({self.E},), got {np.shape(executed)}")
            executed = executed[None]
        if served is not None:
            phi = np.asarray(served, np.int64).reshape(-1)
            if phi.shape != (self.K,) or (phi < 0).any() or (phi > self.E).any():
                raise ValueError(f"served must be {self.K} ints in [0, {self.E}], got {served!r}")
            served = phi[None]
        l = c["layer"]
        nxt = self.decoder.execute([self.PERTURBED], executed, served)
        c["served"][l] = self.decoder.last_served[0]
        c["estimate"][l], c["dev"][l] = self.decoder.last_estimate[0], self.decoder.last_deviation[0]
        self.last_estimate, self.last_deviation = c["estimate"][l], c["dev"][l]  # the estimate and the real
        # deviation of the layer output from the full Top-K model's
        c["layer"] = l + 1
        if nxt is None:
            return None
        g = _gate(nxt)
        c["gates"].append(g)
        return g

    @torch.no_grad()
    def finish(self, target: Optional[int] = None) -> TokenResult:
        c = self._cur
        if c is None or c["layer"] != self.L:
            raise RuntimeError("finish() called before every layer was executed")
        logits = self.decoder.finish([self.PERTURBED])[0]
        pred = int(logits.argmax())
        same = None if c["ref"] is None else bool(pred == int(c["ref"].argmax()))
        nll = None if target is None else float(-F.log_softmax(logits.double(), -1)[int(target)])
        full_nll = None
        if target is not None and c["ref"] is not None:
            full_nll = float(-F.log_softmax(c["ref"].double(), -1)[int(target)])
        self._cur = None
        return TokenResult(logits.numpy().copy(), pred, None if target is None else pred == int(target), same,
                           c["served"], c["estimate"], c["dev"], c["gates"], nll, full_nll)

    # ------------------------------------------------------------------ one call per token
    def step(self, token_id: int, executed: Union[None, np.ndarray, Callable[[int, LayerGate], np.ndarray]] = None,
             target: Optional[int] = None) -> TokenResult:
        """Run one token. ``executed``: None (Top-K everywhere), an (L, E) bool mask (a row of all-False
        executes nothing at that layer) or a callable (layer, LayerGate) -> (E,) mask (None = Top-K)."""
        if executed is not None and not callable(executed):
            executed = np.asarray(executed, bool)
            if executed.shape != (self.L, self.E):
                raise ValueError(f"executed must have shape ({self.L}, {self.E}), got {executed.shape}")
        g = self.begin(token_id)
        while g is not None:
            if executed is None:
                m = None
            elif callable(executed):
                m = executed(g.layer, g)
            else:
                m = executed[g.layer]
            g = self.execute(m)
        return self.finish(target)

    @torch.no_grad()
    def prefill(self, token_ids) -> Optional[TokenResult]:
        """Feed a prefix with the full Top-K model (both streams); returns the last token's result. All but
        the last token run in one batched forward pass (their keys and values fill both caches)."""
        ids = [int(t) for t in token_ids]
        if not ids:
            return None
        head = ids[:-1]
        if head:
            if self.pos + len(head) >= self.cfg.block_size:
                raise ContextFull(f"context is full ({self.cfg.block_size} tokens); call reset()")
            if self.pos:  # continue an existing context token by token (the batched pass starts at position 0)
                for t in head:
                    self.step(t)
            else:
                rows = list(range(self.decoder.n_streams))
                self.decoder.prefill(rows, [head] * len(rows))
        return self.step(ids[-1])


@torch.no_grad()
def replay_executed(model: MoELM, mismatch: np.ndarray, token_ids, targets, start: int, executed: np.ndarray) -> dict:
    """What :class:`LiveMoE` reports for a run of tokens under fixed executed-expert masks, in one batched
    forward pass: tokens ``token_ids[:start]`` run with the full model (the episode's context), token
    ``start + j`` with ``executed[j]`` (L, E) and the combine rule on its live (re-routed) Top-K; perturbed
    tokens' keys and values reach the later tokens, as in the live backend.

    Returns per decoded token (n = len(executed)): ``correct``, ``same_as_full`` (bool), ``nll`` (nats),
    ``served`` (n, L, K) and ``topk_idx`` (n, L, K) (the live routing)."""
    cfg = model.cfg
    L, E = cfg.n_layer, cfg.n_expert
    executed = np.asarray(executed, bool)
    n = executed.shape[0]
    if executed.shape != (n, L, E) or start + n > len(token_ids) or start + n > cfg.block_size:
        raise ValueError(f"executed must be (n, {L}, {E}) masks of tokens start..start+n-1 within the text and the "
                         f"{cfg.block_size}-token context; got {executed.shape}, start {start}, {len(token_ids)} tokens")
    D = np.asarray(mismatch, np.float64)
    served = np.zeros((n, L, cfg.top_k), np.int64)
    routed = np.zeros((n, L, cfg.top_k), np.int64)

    def combine(l, probs, tidx, tw):
        C = combine_matrix(tidx, tw, E)
        idx = tidx[start : start + n].numpy()
        routed[:, l] = idx
        served[:, l] = serve_batch(D[l], idx, executed[:, l])
        weights = torch.zeros(n, E + 1, dtype=tw.dtype)
        weights.scatter_add_(1, torch.from_numpy(served[:, l]), tw[start : start + n])
        C[start : start + n] = weights[:, :E].to(C.dtype)
        return C

    x = torch.as_tensor(np.asarray(token_ids[: start + n], np.int64))[None]
    logits = model(x, combine=combine)[0][0, start:].double()
    ref = model(x)[0][0, start:]
    y = torch.as_tensor(np.asarray(targets[start : start + n], np.int64))
    pred = logits.argmax(-1)
    nll = -torch.log_softmax(logits, -1)[torch.arange(n), y]
    return {"correct": (pred == y).numpy(), "same_as_full": (pred == ref.argmax(-1)).numpy(), "nll": nll.numpy(),
            "served": served, "topk_idx": routed}
