"""KV-cached decoding of B independent streams of a :class:`MoELM`, layer by layer, under executed-expert masks.

One implementation of a decoding step with the combine rule, for every caller: the envs' model accuracy and
live gating (:mod:`wide_env.envs.model_backend`: one stream per episode of a batch), the standalone
:class:`wide_env.modeltools.live.LiveMoE` (one perturbed stream and, optionally, an unperturbed reference stream)
and the calibration and agreement tools built on it.

Each stream has its own key/value cache (``2 * L * block_size * d_model`` float32 numbers: 1 MB for the
Mixtral-profile model, 0.26 MB for tiny), its own length and its own token in progress. A token of some
streams (``rows``) runs as

    gates = begin(rows, token_ids)             # layer 0's router on the token's hidden state
    gates = execute(rows, executed)            # per layer: the combine rule on the executed experts
    ...                                        # (None after the last layer)
    logits = finish(rows)                      # next-token logits; the streams are one token longer

Streams advance independently: the rows of one ``execute`` call must be at the same layer, other streams
may be anywhere in their own tokens.

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

from wide_env.rules import serve_slots_batch

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


def serve_batch(D: np.ndarray, topk_idx: np.ndarray, executed: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
    """The combine rule for N rows: D the mismatch table of each row's layer, (E, E+1) shared or (N, E, E+1);
    topk_idx (N, K); executed (N, E) bool. Returns (N, K) servers (an expert index, or E = skip): the serve rule
    (wide_env.rules.serve_slots) on the slots' rows w_k D(S_k, .) with ``weight`` (N, K) the combine weights
    (the env's table, so a slot of weight 0 is served as in the env), or the unweighted rows; ties to the lowest
    index."""
    topk_idx = np.asarray(topk_idx, np.int64)
    executed = np.asarray(executed, bool)
    D = np.asarray(D)
    if D.ndim == 2:
        rows = D[topk_idx]  # (N, K, E+1)
    else:
        rows = np.take_along_axis(D, topk_idx[:, :, None], axis=1)
    if weight is not None:
        rows = rows * np.asarray(weight, np.float64)[:, :, None]
    return serve_slots_batch(rows, executed)[1]


@torch.no_grad()
def full_model_run(model: MoELM, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The full Top-K model on token runs ``idx`` (B, T): (logits (B, T, V), keys and values (L, B, H, T, hd)),
    the context a decoding stream starts from."""
    rec: dict = {}
    logits = model(idx, record=rec)[0]
    return (logits, torch.stack([lay["k"] for lay in rec["layers"]]),
            torch.stack([lay["v"] for lay in rec["layers"]]))


def checked_streams(cfg, mismatch, n_streams) -> tuple[np.ndarray, int]:
    """A decoder's mismatch tables (L, E, E+1) as contiguous float64 and its stream count, checked."""
    D = np.ascontiguousarray(mismatch, np.float64)
    if D.shape != (cfg.n_layer, cfg.n_expert, cfg.n_expert + 1):
        raise ValueError(f"mismatch must have shape {(cfg.n_layer, cfg.n_expert, cfg.n_expert + 1)}, got {D.shape}")
    if int(n_streams) < 1:
        raise ValueError(f"n_streams must be >= 1, got {n_streams}")
    return D, int(n_streams)


class StreamDecoder:
    """``n_streams`` KV-cached decoding streams of ``model`` (eval mode, CPU) with the combine rule of the
    mismatch tables ``mismatch`` (L, E, E+1)."""

    def __init__(self, model: MoELM, mismatch: np.ndarray, n_streams: int):
        self.model = model.eval()
        cfg = self.cfg = model.cfg
        self.L, self.E, self.K = cfg.n_layer, cfg.n_expert, cfg.top_k
        self.D, n = checked_streams(cfg, mismatch, n_streams)
        self.n_streams = n
        d = cfg.d_model
        shape = (self.L, n, cfg.n_head, cfg.block_size, d // cfg.n_head)
        self._keys, self._values = torch.zeros(shape), torch.zeros(shape)
        #: tokens held by each stream's cache
        self.length = np.zeros(n, np.int64)
        #: each stream's layer of its token in progress (L: every layer applied, finish() next; -1: none)
        self.layer = np.full(n, -1, np.int64)
        # each stream's token in progress: residual stream x, the current layer's attention output r, MoE
        # input h and routing (Top-K indices and combine weights), and the token's position
        self._x, self._r, self._h = torch.zeros(n, 1, d), torch.zeros(n, 1, d), torch.zeros(n, d)
        self._idx, self._w = torch.zeros(n, self.K, dtype=torch.long), torch.zeros(n, self.K)
        self._pos = torch.zeros(n, dtype=torch.long)
        #: the layer execute() applied last, per row of that call: the deviation estimate
        #: sum_k w_k D_l(i_k, phi(i_k)), the measured ||layer output - full Top-K layer output|| (model units),
        #: and the servers phi (R, K)
        self.last_estimate = self.last_deviation = np.zeros(0)
        self.last_served = np.zeros((0, self.K), np.int64)

    # ------------------------------------------------------------------ streams
    def reset(self, rows=None) -> None:
        """Empty the caches of ``rows`` (None = every stream) and drop a token in progress."""
        sel = slice(None) if rows is None else np.asarray(rows, np.int64)
        self.length[sel] = 0
        self.layer[sel] = -1

    def truncate(self, row: int, pos: int) -> None:
        """Forget stream ``row``'s tokens from position ``pos`` on."""
        if not 0 <= pos <= self.length[row]:
            raise ValueError(f"cannot truncate to {pos}: context holds {self.length[row]} tokens")
        self.length[row] = pos
        self.layer[row] = -1

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
        self.layer[rows] = -1
        if not keep.any():
            return
        rows, lens, lists = rows[keep], lens[keep], [t for t, k in zip(lists, keep) if k]
        T = int(lens.max())
        idx = torch.zeros((len(rows), T), dtype=torch.long)
        for i, t in enumerate(lists):
            idx[i, : len(t)] = torch.from_numpy(t)
        _, keys, values = full_model_run(self.model, idx)
        rows_t = torch.from_numpy(rows)
        self._keys[:, rows_t, :, :T] = keys
        self._values[:, rows_t, :, :T] = values
        self.length[rows] = lens

    def set_prefix(self, row: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Load stream ``row``'s cache with precomputed keys and values (L, H, n, hd) of its first n tokens
        (:class:`wide_env.models.trace_context.TraceContext`: the full model's run of a trace window)."""
        n = keys.shape[2]
        if keys.shape != values.shape or tuple(keys.shape[:2]) != (self.L, self.cfg.n_head) or n > self.cfg.block_size:
            raise ValueError(f"prefix keys/values must be (L, H, n, hd) with (L, H) = ({self.L}, {self.cfg.n_head}) "
                             f"and n <= {self.cfg.block_size}; got {tuple(keys.shape)}")
        self._keys[:, row, :, :n] = keys
        self._values[:, row, :, :n] = values
        self.length[row] = n
        self.layer[row] = -1

    # ------------------------------------------------------------------ one token, layer by layer
    @staticmethod
    def _select(rows: np.ndarray):
        """Consecutive streams (a batch in lockstep) as a slice (views, not gathered copies), else a tensor."""
        if rows.size and (np.diff(rows) == 1).all():
            return slice(int(rows[0]), int(rows[-1]) + 1)
        return torch.from_numpy(rows)

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
        sel = self._select(rows)
        pos_t = torch.from_numpy(pos.copy())
        self._pos[sel] = pos_t
        self._x[sel] = self.model.tok(torch.from_numpy(ids)[:, None]) + self.model.pos(pos_t)[:, None, :]
        self.layer[rows] = 0
        return self._route(rows, sel, 0)

    def _route(self, rows: np.ndarray, sel, l: int) -> Gates:
        """Attention and router of layer ``l`` for streams ``rows`` (their residual stream in ``_x``)."""
        blk = self.model.blocks[l]
        x, pos = self._x[sel], self._pos[sel]
        q, k, v = blk.qkv_heads(x)  # (R, H, 1, hd)
        at = torch.from_numpy(rows)
        self._keys[l, at, :, pos] = k[:, :, 0]
        self._values[l, at, :, pos] = v[:, :, 0]
        T = int(pos.max()) + 1
        keys, values = self._keys[l, sel, :, :T], self._values[l, sel, :, :T]
        scores = (q @ keys.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (R, H, 1, T)
        scores = scores.masked_fill(torch.arange(T)[None, None, None, :] > pos[:, None, None, None], float("-inf"))
        r = x + blk.attn_out(torch.softmax(scores, -1) @ values)
        h = blk.ln2(r).reshape(len(rows), -1)
        probs, idx, w = blk.moe_route(h)
        self._r[sel], self._h[sel], self._idx[sel], self._w[sel] = r, h, idx, w
        return Gates(l, probs.numpy(), idx.numpy(), w.numpy())

    @torch.no_grad()
    def execute(self, rows, executed: Optional[np.ndarray] = None, served: Optional[np.ndarray] = None) -> Optional[Gates]:
        """Apply the current layer (the same for every row) to streams ``rows``: ``executed`` (R, E) bool (None =
        exactly each stream's Top-K) under the combine rule, or ``served`` (R, K) an explicit server per slot
        (expert index, E = skip). Returns the next layer's gates, or None after the last layer (then call
        finish())."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        R = rows.size
        layers = np.unique(self.layer[rows])
        if R == 0 or layers.size != 1 or not 0 <= layers[0] < self.L:
            raise RuntimeError(f"execute() needs streams with a pending layer, all at the same one; streams {rows.tolist()} "
                               f"are at layers {self.layer[rows].tolist()} (call begin() first)")
        l = int(layers[0])
        sel = self._select(rows)
        idx, w = self._idx[sel], self._w[sel]
        topk = idx.numpy()
        if served is not None:
            phi = np.asarray(served, np.int64)
            if phi.shape != (R, self.K) or (phi < 0).any() or (phi > self.E).any():
                raise ValueError(f"served must be ({R}, {self.K}) ints in [0, {self.E}], got {served!r}")
        else:
            if executed is None:
                ex = np.zeros((R, self.E), bool)
                np.put_along_axis(ex, topk, True, axis=1)
            else:
                ex = np.asarray(executed, bool)
                if ex.shape != (R, self.E):
                    raise ValueError(f"executed must have shape ({R}, {self.E}), got {ex.shape}")
            phi = serve_batch(self.D[l], topk, ex, w.numpy())
        eo = self.model.blocks[l].experts(self._h[sel])  # (R, E, d)
        full = (w[:, None, :] @ eo[torch.arange(R)[:, None], idx])[:, 0]
        C = torch.zeros(R, self.E + 1).scatter_add_(1, torch.from_numpy(phi), w)
        moe = (C[:, None, : self.E] @ eo)[:, 0]
        self.last_served = phi
        self.last_estimate = (w.numpy().astype(np.float64) * self.D[l][topk, phi]).sum(1)
        self.last_deviation = (full - moe).norm(dim=1).numpy().astype(np.float64)
        self._x[sel] = self._r[sel] + moe[:, None, :]
        self.layer[rows] = l + 1
        return self._route(rows, sel, l + 1) if l + 1 < self.L else None

    @torch.no_grad()
    def finish(self, rows) -> torch.Tensor:
        """(R, V) next-token logits of streams ``rows`` (every layer applied); they are one token longer."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        if (self.layer[rows] != self.L).any():
            raise RuntimeError(f"finish() called before every layer was executed (streams at layers "
                               f"{self.layer[rows].tolist()}, L = {self.L})")
        logits = self.model.head_logits(self._x[self._select(rows)])[:, 0]
        self.length[rows] += 1
        self.layer[rows] = -1
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
            gates = self.execute(rows, None if executed is None else executed[:, gates.layer])
        return self.finish(rows)
