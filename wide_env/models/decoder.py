"""KV-cached decoding of B independent streams of a :class:`MoELM`, layer by layer, under executed-expert masks.

One implementation of a decoding step with the combine rule, for every caller: the live backend
(:class:`wide_env.models.live.LiveMoE`: one perturbed stream and, optionally, an unperturbed reference stream)
and the envs' model accuracy (:mod:`wide_env.envs.model_accuracy`: one stream per episode of a batch).

Each stream has its own key/value cache (``2 * L * block_size * d_model`` float32 numbers: 1 MB for the
Mixtral-profile model, 0.26 MB for tiny) and its own length. A token of some streams (``rows``) runs as

    gates = begin(rows, token_ids)             # layer 0's router on the token's hidden state
    gates = execute(executed)                  # per layer: the combine rule on the executed experts
    ...                                        # (None after the last layer)
    logits = finish()                          # next-token logits; the streams are one token longer

Combine rule (docs/model.md#deviation-estimate): at layer l with executed set A, each Top-K slot i is served
by i if i is executed, else by the executed j minimising D_l(i, j), or skipped when D_l(i, skip) is smaller
(or nothing is executed); ties go to the lowest index, so an expert as good as skipping serves. A skipped
slot's weighted output is dropped; the layer output is sum_i w_i E_{phi(i)}(h). The routing of every layer is
the live router's on the stream's own hidden state, so earlier perturbations re-route later layers, and
perturbed tokens' keys and values reach the stream's later tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .moe_lm import MoELM


class ContextFull(RuntimeError):
    """A stream reached the model's block_size; reset it (the traces use windows of block_size)."""


@dataclass
class Gates:
    """The router outputs of one layer for the streams of the current token (batch-first numpy arrays)."""

    layer: int
    probs: np.ndarray  # (R, E) router softmax
    topk_idx: np.ndarray  # (R, K) descending
    topk_weight: np.ndarray  # (R, K) combine weights (renormalised over the Top-K, or raw)


def serve_batch(D: np.ndarray, topk_idx: np.ndarray, executed: np.ndarray) -> np.ndarray:
    """The combine rule for N rows: D the mismatch table of each row's layer, (E, E+1) shared or (N, E, E+1);
    topk_idx (N, K); executed (N, E) bool. Returns (N, K) servers (an expert index, or E = skip)."""
    topk_idx = np.asarray(topk_idx, np.int64)
    executed = np.asarray(executed, bool)
    N, K = topk_idx.shape
    D = np.asarray(D)
    if D.ndim == 2:
        rows = D[topk_idx]  # (N, K, E+1)
    else:
        rows = np.take_along_axis(D, topk_idx[:, :, None], axis=1)
    allowed = np.concatenate([executed, np.ones((N, 1), bool)], 1)[:, None, :]
    return np.where(allowed, rows, np.inf).argmin(-1)


class StreamDecoder:
    """``n_streams`` KV-cached decoding streams of ``model`` (eval mode, CPU) with the combine rule of the
    mismatch tables ``mismatch`` (L, E, E+1)."""

    def __init__(self, model: MoELM, mismatch: np.ndarray, n_streams: int):
        self.model = model.eval()
        cfg = self.cfg = model.cfg
        self.L, self.E, self.K = cfg.n_layer, cfg.n_expert, cfg.top_k
        D = np.asarray(mismatch, np.float64)
        if D.shape != (self.L, self.E, self.E + 1):
            raise ValueError(f"mismatch must have shape {(self.L, self.E, self.E + 1)}, got {D.shape}")
        if int(n_streams) < 1:
            raise ValueError(f"n_streams must be >= 1, got {n_streams}")
        self.D = D
        self.n_streams = int(n_streams)
        hd = cfg.d_model // cfg.n_head
        shape = (self.L, self.n_streams, cfg.n_head, cfg.block_size, hd)
        self._keys, self._values = torch.zeros(shape), torch.zeros(shape)
        #: tokens held by each stream's cache
        self.length = np.zeros(self.n_streams, np.int64)
        #: the layer execute() applied last, per stream of the token: the deviation estimate
        #: sum_k w_k D_l(i_k, phi(i_k)) and the measured ||layer output - full Top-K layer output|| (model units),
        #: and the servers phi (R, K)
        self.last_estimate = self.last_deviation = np.zeros(0)
        self.last_served = np.zeros((0, self.K), np.int64)
        self._cur: Optional[dict] = None

    # ------------------------------------------------------------------ streams
    def reset(self, rows=None) -> None:
        """Empty the caches of ``rows`` (None = every stream) and drop a token in progress."""
        self.length[slice(None) if rows is None else np.asarray(rows, np.int64)] = 0
        self._cur = None

    def truncate(self, row: int, pos: int) -> None:
        """Forget stream ``row``'s tokens from position ``pos`` on."""
        if not 0 <= pos <= self.length[row]:
            raise ValueError(f"cannot truncate to {pos}: context holds {self.length[row]} tokens")
        self.length[row] = pos
        self._cur = None

    @torch.no_grad()
    def prefill(self, rows, token_lists) -> None:
        """Fill the (empty) caches of ``rows`` with their token lists, run by the full Top-K model in one
        padded batched pass (causal attention: padding after a stream's tokens does not reach them)."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        lists = [np.asarray(t, np.int64).reshape(-1) for t in token_lists]
        if len(lists) != len(rows):
            raise ValueError(f"{len(lists)} token lists for {len(rows)} streams")
        if (self.length[rows] != 0).any():
            raise ValueError("prefill() fills empty streams; reset() them first")
        lens = np.array([len(t) for t in lists], np.int64)
        if lens.size and lens.max() > self.cfg.block_size:
            raise ContextFull(f"a prefix of {lens.max()} tokens exceeds the context ({self.cfg.block_size} tokens)")
        for t in lists:
            if t.size and (t.min() < 0 or t.max() >= self.cfg.vocab_size):
                raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size})")
        keep = lens > 0
        self._cur = None
        if not keep.any():
            return
        rows, lens, lists = rows[keep], lens[keep], [t for t, k in zip(lists, keep) if k]
        T = int(lens.max())
        idx = torch.zeros((len(rows), T), dtype=torch.long)
        for i, t in enumerate(lists):
            idx[i, : len(t)] = torch.from_numpy(t)
        rec: dict = {}
        self.model(idx, record=rec)
        rows_t = torch.from_numpy(rows)
        for l, lay in enumerate(rec["layers"]):
            self._keys[l, rows_t, :, :T] = lay["k"]
            self._values[l, rows_t, :, :T] = lay["v"]
        self.length[rows] = lens

    def set_prefix(self, row: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Load stream ``row``'s cache with precomputed keys and values (L, H, n, hd) of its first n tokens
        (:class:`wide_env.models.trace_context.TraceContext`: the full model's run of a trace window)."""
        n = keys.shape[2]
        if keys.shape != values.shape or keys.shape[:2] != self._keys.shape[::2][:2] or n > self.cfg.block_size:
            raise ValueError(f"prefix keys/values must be (L, H, n <= {self.cfg.block_size}, hd) = "
                             f"{tuple(self._keys.shape[i] for i in (0, 2))} + (n, hd); got {tuple(keys.shape)}")
        self._keys[:, row, :, :n] = keys
        self._values[:, row, :, :n] = values
        self.length[row] = n
        self._cur = None

    # ------------------------------------------------------------------ one token, layer by layer
    @torch.no_grad()
    def begin(self, rows, token_ids) -> Gates:
        """Start a token on streams ``rows``: returns layer 0's gates. Then call execute() once per layer."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        ids = np.asarray(token_ids, np.int64).reshape(-1)
        if ids.shape != rows.shape:
            raise ValueError(f"{ids.size} token ids for {rows.size} streams")
        if ids.size and (ids.min() < 0 or ids.max() >= self.cfg.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size}), got {ids.tolist()}")
        pos = self.length[rows]
        if (pos >= self.cfg.block_size).any():
            raise ContextFull(f"context is full ({self.cfg.block_size} tokens); reset the stream")
        pos_t = torch.from_numpy(pos.copy())
        x = self.model.tok(torch.from_numpy(ids)[:, None]) + self.model.pos(pos_t)[:, None, :]
        # consecutive streams (a batch stepping in lockstep) read their caches as views, not gathered copies
        sel = slice(int(rows[0]), int(rows[-1]) + 1) if rows.size and (np.diff(rows) == 1).all() else torch.from_numpy(rows)
        self._cur = dict(rows=rows, sel=sel, pos=pos_t, x=x, layer=0)
        return self._route()

    def _route(self) -> Gates:
        c = self._cur
        l, sel, pos = c["layer"], c["sel"], c["pos"]
        blk = self.model.blocks[l]
        x = c["x"]
        q, k, v = blk.qkv_heads(x)  # (R, H, 1, hd)
        R = len(c["rows"])
        at = torch.from_numpy(c["rows"]) if isinstance(sel, torch.Tensor) else torch.arange(sel.start, sel.stop)
        self._keys[l, at, :, pos] = k[:, :, 0]
        self._values[l, at, :, pos] = v[:, :, 0]
        T = int(pos.max()) + 1
        keys, values = self._keys[l, sel, :, :T], self._values[l, sel, :, :T]
        scores = (q @ keys.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (R, H, 1, T)
        scores = scores.masked_fill(torch.arange(T)[None, None, None, :] > pos[:, None, None, None], float("-inf"))
        r = x + blk.attn_out(torch.softmax(scores, -1) @ values)
        h = blk.ln2(r).reshape(R, -1)
        probs, idx, w = blk.moe_route(h)
        c.update(r=r, h=h, idx=idx, w=w)
        return Gates(l, probs.numpy(), idx.numpy(), w.numpy())

    @torch.no_grad()
    def execute(self, executed: Optional[np.ndarray] = None, served: Optional[np.ndarray] = None) -> Optional[Gates]:
        """Apply the current layer to the token's streams: ``executed`` (R, E) bool (None = exactly each
        stream's Top-K) under the combine rule, or ``served`` (R, K) an explicit server per slot (expert index,
        E = skip). Returns the next layer's gates, or None after the last layer (then call finish())."""
        c = self._cur
        if c is None or c["layer"] >= self.L:
            raise RuntimeError("execute() called without a pending layer; call begin() first")
        l, R = c["layer"], len(c["rows"])
        idx, w = c["idx"], c["w"]
        topk = idx.numpy()
        if served is not None:
            phi = np.asarray(served, np.int64).reshape(R, -1) if np.size(served) == R * self.K else None
            if phi is None or (phi < 0).any() or (phi > self.E).any():
                raise ValueError(f"served must be ({R}, {self.K}) ints in [0, {self.E}], got {served!r}")
        else:
            if executed is None:
                ex = np.zeros((R, self.E), bool)
                np.put_along_axis(ex, topk, True, axis=1)
            else:
                ex = np.asarray(executed, bool)
                if ex.shape != (R, self.E):
                    raise ValueError(f"executed must have shape ({R}, {self.E}), got {ex.shape}")
            phi = serve_batch(self.D[l], topk, ex)
        eo = self.model.blocks[l].experts(c["h"])  # (R, E, d)
        full = (w[:, None, :] @ eo[torch.arange(R)[:, None], idx])[:, 0]
        C = torch.zeros(R, self.E + 1).scatter_add_(1, torch.from_numpy(phi), w)
        moe = (C[:, None, : self.E] @ eo)[:, 0]
        self.last_served = phi
        self.last_estimate = (w.numpy().astype(np.float64) * self.D[l][topk, phi]).sum(1)
        self.last_deviation = (full - moe).norm(dim=1).numpy().astype(np.float64)
        c["x"] = c["r"] + moe[:, None, :]
        c["layer"] = l + 1
        return self._route() if l + 1 < self.L else None

    @torch.no_grad()
    def finish(self) -> torch.Tensor:
        """(R, V) next-token logits of the token's streams, which are one token longer."""
        c = self._cur
        if c is None or c["layer"] != self.L:
            raise RuntimeError("finish() called before every layer was executed")
        logits = self.model.head_logits(c["x"])[:, 0]
        self.length[c["rows"]] += 1
        self._cur = None
        return logits

    def decode(self, rows, token_ids, executed: Optional[np.ndarray] = None) -> torch.Tensor:
        """One token on streams ``rows`` with executed masks ``executed`` (R, L, E) bool (None = Top-K at every
        layer); returns the (R, V) next-token logits."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        if executed is not None:
            executed = np.asarray(executed, bool)
            if executed.shape != (len(rows), self.L, self.E):
                raise ValueError(f"executed must have shape ({len(rows)}, {self.L}, {self.E}), got {executed.shape}")
        gates = self.begin(rows, token_ids)
        while gates is not None:
            gates = self.execute(None if executed is None else executed[:, gates.layer])
        return self.finish()
