"""KV-cached decoding streams of a :class:`MoELM` in compiled code, one layer per call as the env steps arrive.

The envs' model accuracy (:class:`wide_env.envs.model_backend.ModelAccuracy`) runs this instead of the torch
:class:`wide_env.models.decoder.StreamDecoder`, which stays the reference (live gating, the modeltools): the same
streams, the same combine rule (:func:`wide_env.rules.serve_slots`), the arithmetic of
:mod:`wide_env.models.fused_kernels` (float32, agreeing with torch to float32 rounding). A stream applies its
pending layer when the env steps it, so at any time each stream exposes its current layer's router output
(``probs``, ``topk_idx``, ``topk_weight``) and its residual stream ``x``, and a call may hold streams at
different layers (those at one layer run together). A stream's context is its own copy (:meth:`set_prefix`)
or a trace window's prefix shared with the other streams of that window (:meth:`share_prefix`).

    decoder.share_prefix(row, window, keys, values, n)   # or set_prefix(row, keys, values)
    decoder.begin(rows, token_ids)                  # embedding, layer 0's attention and router
    finished = decoder.advance(stepped, allowed, env_layer, env_start, env_token, env_done, token_id)
    decoder.logits[finished]                        # next-token logits of the streams that finished their token
"""

from __future__ import annotations

import numpy as np

from wide_env.compiled_entry import KernelEntries

from . import fused_kernels as fk
from .fused_layout import pack, stream_arrays, views
from .decoder import ContextFull, checked_streams
from .moe_lm import MoELM


def pack_weights(model: MoELM) -> tuple[np.ndarray, np.ndarray]:
    """The model's weights in the layout of :mod:`fused_kernels` (float32, matrices input-major), packed into one
    buffer: (buffer, meta)."""
    def arr(t):
        return t.detach().to("cpu").float().numpy()

    blocks = model.blocks
    stack = lambda get: np.stack([arr(get(b)) for b in blocks])  # noqa: E731
    ln = np.stack([np.stack([arr(b.ln1.weight), arr(b.ln1.bias), arr(b.ln2.weight), arr(b.ln2.bias)])
                   for b in blocks])
    return pack([arr(model.tok.weight), arr(model.pos.weight), ln,
                    stack(lambda b: b.qkv.weight.T), stack(lambda b: b.qkv.bias),
                    stack(lambda b: b.proj.weight.T), stack(lambda b: b.proj.bias),
                    stack(lambda b: b.router.weight.T),
                    stack(lambda b: b.experts.w1), stack(lambda b: b.experts.b1),
                    stack(lambda b: b.experts.w2), stack(lambda b: b.experts.b2),
                    np.stack([arr(model.ln_f.weight), arr(model.ln_f.bias)]), arr(model.head.weight.T),
                    np.array([model.cfg.routing == "softmax_topk_renorm"], np.float32)], np.float32)


#: the attributes that are views of the packed buffers (rebuilt after unpickling)
_VIEWS = ("keys", "values", "x", "_r", "_h", "probs", "topk_weight", "_shared_keys", "_shared_values", "logits",
          "topk_idx", "length", "layer", "_slot", "_shared", "position", "finished_at", "_packed")


#: advance_rows' compiled entries by the types of its arguments (numba's typing and lookup of them took about
#: 0.4 ms: at every new episode's bind, 3 us per step of a single env on Mixtral)
_ADVANCE_ENTRIES = KernelEntries(fk.advance_rows)


class FusedDecoder:
    """``n_streams`` KV-cached streams of ``model`` with the combine rule of the mismatch tables ``mismatch``
    (L, E, E+1), advanced one layer per call. ``prefix_slots``: how many trace windows' prefixes the streams
    may share at a time (:meth:`share_prefix`; min(windows, n_streams) or more, so that one is always free)."""

    def __init__(self, model: MoELM, mismatch: np.ndarray, n_streams: int, weights: tuple | None = None,
                 prefix_slots: int = 0):
        cfg = self.cfg = model.cfg
        self.L, self.E, self.K, self.V = cfg.n_layer, cfg.n_expert, cfg.top_k, cfg.vocab_size
        self.D, n = checked_streams(cfg, mismatch, n_streams)
        self.n_streams = n
        d, H, E, K = cfg.d_model, cfg.n_head, self.E, self.K
        #: the packed weights (decoders of one model may share them: ``weights=``)
        self.weights = pack_weights(model) if weights is None else weights
        slots = max(int(prefix_slots), 1)
        per_stream = fk.scratch_per_stream(d, cfg.d_ff, E, self.V)
        floats, ints = stream_arrays(n, self.L, cfg.block_size, H, d // H, E, K, self.V, slots, per_stream)
        self._floats = pack(floats, np.float32)  # zeros: pages mapped when first written
        self._ints = pack(ints, np.int64)
        self._views()
        self._window_of: list = [None] * slots  # the window each shared slot holds, and back
        self._slot_of: dict = {}
        self._refs = np.zeros(slots, np.int64)  # how many streams read each slot
        self._loaded = np.zeros(slots, np.int64)  # how many of its window's first positions each slot holds
        # when each slot was last taken (share_prefix's count; -1: never): a free slot holding the window least
        # recently used gives it up first, so a few streams over many windows keep the others' copies
        self._taken = np.full(slots, -1, np.int64)
        self._takes = 0
        # self.x: per stream, the residual stream (the token's hidden state after its applied layers)
        # self.probs, topk_idx, topk_weight: the pending layer's router softmax, Top-K (descending), combine weights
        # self.length: tokens held by each stream's cache
        # self.layer: each stream's pending layer (-1: no token in progress)
        # self.logits: next-token logits of each stream that finished its token at the last advance()
        # self.position, self.finished_at: each stream's trace position of its token in progress (begin()'s
        # ``positions``), and of the token it finished at the last advance()
        self.finished = np.zeros(n, bool)
        #: how many streams finished their token at the last advance()
        self.n_finished = 0
        self._bound = None  # bind()

    def _views(self) -> None:
        (self.keys, self.values, self.x, self._r, self._h, self.probs, self.topk_weight, self._shared_keys,
         self._shared_values, self.logits, _) = views(*self._floats)
        (self.topk_idx, self.length, self.layer, self._slot, self._shared, self.position, self.finished_at,
         _) = views(*self._ints)
        self._packed = self.weights + self._floats + self._ints

    def reset(self, rows=None) -> None:
        """Empty the caches of ``rows`` (None = every stream) and drop a token in progress."""
        sel = slice(None) if rows is None else np.asarray(rows, np.int64)
        self.length[sel] = 0
        self.layer[sel] = -1
        for row in np.arange(self.n_streams)[sel].reshape(-1):
            self._release(int(row))

    def _release(self, row: int) -> None:
        if self._slot[row] >= 0:
            self._refs[self._slot[row]] -= 1
        self._slot[row], self._shared[row] = -1, 0

    def share_prefix(self, row: int, window, keys, values, n: int) -> None:
        """Stream ``row``'s first ``n`` tokens are the first n of the trace window ``window`` (any hashable id),
        whose full keys and values (L, H, N, hd) with N >= n are ``keys``, ``values``: the same context as
        :meth:`set_prefix` of their first n, read from a slot the window's streams share (when no slot holds the
        window, the free slot least recently taken takes it: an unused one first; positions are copied in as far as
        a stream needs them)."""
        keys, values = np.asarray(keys), np.asarray(values)
        self._check_prefix(keys, values)
        if not 0 <= n <= keys.shape[2]:
            raise ValueError(f"prefix length n must be in [0, {keys.shape[2]}] (the window's run), got {n}")
        if self.share_loaded(row, window, n):
            return
        self._release(row)
        slot = self._slot_of.get(window)
        if slot is None:
            free = np.flatnonzero(self._refs == 0)
            if not free.size:
                raise RuntimeError(f"all {self._refs.size} prefix slots are in use; build the decoder with "
                                   "prefix_slots >= min(windows, n_streams)")
            slot = int(free[self._taken[free].argmin()])
            self._slot_of.pop(self._window_of[slot], None)
            self._slot_of[window], self._window_of[slot], self._loaded[slot] = slot, window, 0
        have = self._loaded[slot]
        if n > have:  # (the slot holds positions last)
            self._shared_keys[slot, :, :, :, have:n] = keys[:, :, have:n].transpose(0, 1, 3, 2)
            self._shared_values[slot, :, :, :, have:n] = values[:, :, have:n].transpose(0, 1, 3, 2)
            self._loaded[slot] = n
        self._take(row, slot, n)

    def share_loaded(self, row: int, window, n: int) -> bool:
        """:meth:`share_prefix` where a slot already holds the first ``n`` positions of ``window`` (no keys and
        values needed: a new episode in a window the streams visited before); False (nothing changed) otherwise."""
        slot = self._slot_of.get(window)
        if slot is None or not 0 <= n <= self._loaded[slot]:
            return False
        self._release(row)
        self._take(row, slot, n)
        return True

    def _take(self, row: int, slot: int, n: int) -> None:
        """Stream ``row`` reads its first ``n`` positions from ``slot`` (which holds them)."""
        self._refs[slot] += 1
        self._taken[slot] = self._takes
        self._takes += 1
        self._slot[row], self._shared[row] = slot, n
        self.length[row] = n
        self.layer[row] = -1

    def _check_prefix(self, keys: np.ndarray, values: np.ndarray) -> None:
        if (keys.shape != values.shape or keys.shape[:2] != self._shared_keys.shape[1:3]
                or keys.shape[2] > self.cfg.block_size):
            raise ValueError(f"prefix keys/values must be (L, H, n, hd) with (L, H) = {self._shared_keys.shape[1:3]} "
                             f"and n <= {self.cfg.block_size}; got {keys.shape}")

    def set_prefix(self, row: int, keys, values) -> None:
        """Load stream ``row``'s cache with the keys and values (L, H, n, hd) of its first n tokens (numpy or
        torch: :class:`wide_env.models.trace_context.TraceContext`'s run of a trace window)."""
        keys, values = np.asarray(keys), np.asarray(values)
        self._check_prefix(keys, values)
        n = keys.shape[2]
        self._release(row)
        self.keys[row, :, :n] = keys.transpose(0, 2, 1, 3)  # (the stream's cache holds positions before heads)
        self.values[row, :, :n] = values.transpose(0, 2, 1, 3)
        self.length[row] = n
        self.layer[row] = -1

    def _check(self, status: int, row: int) -> None:
        if status == fk.CONTEXT_FULL:
            raise ContextFull(f"stream {row}: context is full ({self.cfg.block_size} tokens); reset the stream")
        if status == fk.WRONG_LAYER:
            raise RuntimeError(f"stream {row} is at layer {self.layer[row]}, not the layer the step applies "
                               "(call begin() first; a stream applies its layers in order)")

    def begin(self, rows, token_ids, positions=None) -> None:
        """Start a token on streams ``rows``: embedding, then layer 0's attention and router (``positions``: the
        tokens' trace positions, kept for reporting)."""
        rows = np.ascontiguousarray(rows, np.int64).reshape(-1)
        if positions is not None:
            self.position[rows] = positions
        ids = np.ascontiguousarray(token_ids, np.int64).reshape(-1)
        if ids.shape != rows.shape:
            raise ValueError(f"{ids.size} token ids for {rows.size} streams")
        if ids.size and (ids.min() < 0 or ids.max() >= self.V):
            raise ValueError(f"token ids must be in [0, {self.V}), got {ids.tolist()}")
        self._check(*fk.begin_rows(*self._packed, rows, ids))

    def advance(self, stepped: np.ndarray, allowed: np.ndarray, env_layer: np.ndarray, env_start: np.ndarray,
                env_token: np.ndarray, env_done: np.ndarray, token_id: np.ndarray) -> np.ndarray:
        """Every stream b with ``stepped[b]`` (n,) bool and a token in progress applies its pending layer with
        its ``allowed[b]`` (E,) experts under the combine rule and routes its next layer, in step with an
        episode whose counters after the step are ``env_layer``, ``env_start``, ``env_token``, ``env_done``
        (checked: the next layer, or the next token at layer 0, or done). A stream that applied its last layer
        writes its next-token logits into ``self.logits[b]`` and its token's trace position into
        ``self.finished_at[b]`` and, unless done, starts its next token ``token_id[start + token]``. Returns
        ``finished`` (n,) bool (a buffer the next call overwrites)."""
        return self._advanced(*fk.advance_rows(*self._packed, self.D, stepped, allowed, env_layer, env_start,
                                                env_token, env_done, token_id, self.finished))

    def _advanced(self, status: int, got: int) -> np.ndarray:
        if status:
            self._check(status, got)
        self.n_finished = got
        return self.finished

    def bind(self, stepped: np.ndarray, allowed: np.ndarray, env_layer: np.ndarray, env_start: np.ndarray,
             env_token: np.ndarray, env_done: np.ndarray, token_id: np.ndarray) -> None:
        """Bind :meth:`advance`'s arguments for :meth:`advance_bound`, which advances with their contents at
        call time (the caller writes them in place). It calls the kernel's compiled entry for these arrays'
        types directly: numba's dispatcher types every argument at every call (about 1.3 us of a single env's
        step). Arrays of other sizes than the decoder's are refused."""
        n, E = self.n_streams, self.E
        for name, a, shape in (("stepped", stepped, (n,)), ("allowed", allowed, (n, E)), ("env_layer", env_layer, (n,)),
                               ("env_start", env_start, (n,)), ("env_token", env_token, (n,)),
                               ("env_done", env_done, (n,))):
            if not isinstance(a, np.ndarray) or a.shape != shape:
                raise ValueError(f"{name} must be an array of shape {shape}, got {getattr(a, 'shape', type(a))}")
        if not isinstance(token_id, np.ndarray) or token_id.ndim != 1:
            raise ValueError("token_id must be a 1-d array (the trace's token ids)")
        args = self._packed + (self.D, stepped, allowed, env_layer, env_start, env_token, env_done, token_id,
                               self.finished)
        self._bound = (_ADVANCE_ENTRIES.entry(args), args)

    def advance_bound(self) -> np.ndarray:
        """:meth:`advance` with the arrays of the last :meth:`bind`."""
        entry, args = self._bound
        return self._advanced(*entry(*args))

    def __getstate__(self) -> dict:  # pickle / deepcopy: the views are rebuilt from the buffers, not copied apart
        state = {k: v for k, v in self.__dict__.items() if k not in _VIEWS}
        state["_bound"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._views()

    def decode(self, rows, token_ids, allowed: np.ndarray) -> np.ndarray:
        """One token on streams ``rows`` with allowed masks (R, L, E) bool: returns the (R, V) next-token
        logits (a copy)."""
        rows = np.ascontiguousarray(rows, np.int64).reshape(-1)
        allowed = np.asarray(allowed, bool)
        if allowed.shape != (rows.size, self.L, self.E):
            raise ValueError(f"allowed must have shape ({rows.size}, {self.L}, {self.E}), got {allowed.shape}")
        self.begin(rows, token_ids)
        n = self.n_streams
        stepped, mask, zeros = np.zeros(n, bool), np.zeros((n, self.E), bool), np.zeros(n, np.int64)
        stepped[rows] = True
        for l in range(self.L):  # in step with an episode whose last token this is (done after it)
            mask[rows] = allowed[:, l]
            self.advance(stepped, mask, np.full(n, min(l + 1, self.L - 1), np.int64), zeros, zeros,
                         np.full(n, l + 1 == self.L), zeros)
        return self.logits[rows].copy()
