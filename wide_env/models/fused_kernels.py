"""Compiled (numba) forward of a :class:`~wide_env.models.moe_lm.MoELM` one stream, one layer at a time.

The shipped models are tiny (d_model 32 or 64): torch's per-operation cost, not arithmetic, dominated the
decoding (issue 22: about 0.7 ms per env step on Mixtral at B = 1). These loops run a stream's layer in a few
microseconds, row by row, so streams of one call may be at different layers.

The arithmetic is the torch model's (:mod:`wide_env.models.moe_lm`, :mod:`wide_env.models.decoder`) in float32
with the same weights; sums run in another order than torch's BLAS (matrix products accumulate in float32 in
input order; layer norms, softmaxes and GELU in float64, cast back), so results agree to float32 rounding
(``tests/test_fused_decoder.py`` bounds it). The combine rule is :func:`wide_env.rules.serve_slots` itself.

Weights ``W`` (views of one packed buffer, :func:`pack`; see :func:`wide_env.models.fused_decoder.pack_weights`),
all float32, matrices stored
input-major so the inner loops run over contiguous outputs:
  0 tok (V, d), 1 pos (T, d), 2 ln (L, 4, d) = ln1 weight, ln1 bias, ln2 weight, ln2 bias,
  3 qkv_w (L, d, 3d), 4 qkv_b (L, 3d), 5 proj_w (L, d, d), 6 proj_b (L, d), 7 router_w (L, d, E),
  8 w1 (L, E, d, f), 9 b1 (L, E, f), 10 w2 (L, E, f, d), 11 b2 (L, E, d), 12 ln_f (2, d), 13 head_w (d, V),
  14 renorm (1,): 1 where the combine weights are renormalised over the Top-K, else 0.
Stream state ``S`` (views of a float32 and an int64 buffer): 0 keys, 1 values (n, L, H, hd, T) (positions
last: the attention's loops run along them); 2 x, 3 r, 4 h (n, d) the residual stream,
the current layer's attention output and MoE input; 5 probs (n, E); 6 topk_idx (n, K) int64; 7 topk_w (n, K);
8 length (n,) int64 (tokens in the cache); 9 layer (n,) int64 (the pending layer, L = every layer applied,
-1 = no token in progress).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from wide_env.rules import serve_slots

_JIT = dict(cache=True, nogil=True, error_model="numpy")
# reassociation lets the position loops (dot products, sums) run in SIMD lanes; no approximate functions
_FAST = dict(_JIT, fastmath={"reassoc", "nsz", "contract"})
_LN_EPS = 1e-5  # torch.nn.LayerNorm's default
_SQRT1_2 = 1.0 / math.sqrt(2.0)

#: status codes the entry points return (the Python side raises the matching error)
OK, CONTEXT_FULL, WRONG_LAYER = 0, 1, 2


@njit(**_JIT)
def _layer_norm(x, w, b, out):
    n = x.shape[0]
    mean = 0.0
    for i in range(n):
        mean += x[i]
    mean /= n
    var = 0.0
    for i in range(n):
        var += (x[i] - mean) ** 2
    inv = 1.0 / math.sqrt(var / n + _LN_EPS)
    for i in range(n):
        out[i] = (x[i] - mean) * inv * w[i] + b[i]


@njit(**_FAST)
def _linear(x, w, b, out):
    """out = x @ w + b with w (in, out); b may be empty (no bias). Four inputs per pass over the outputs (a
    quarter of the loads and stores of ``out``)."""
    n_out, n_in = out.shape[0], x.shape[0]
    if b.shape[0]:
        out[:] = b
    else:
        out[:] = 0.0
    i = 0
    while i + 4 <= n_in:
        x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
        w0, w1, w2, w3 = w[i], w[i + 1], w[i + 2], w[i + 3]
        for j in range(n_out):
            out[j] += x0 * w0[j] + x1 * w1[j] + x2 * w2[j] + x3 * w3[j]
        i += 4
    while i < n_in:
        xi, wi = x[i], w[i]
        for j in range(n_out):
            out[j] += xi * wi[j]
        i += 1


@njit(**_FAST)
def _route(W, S, row, l, scratch):
    """Attention of layer ``l`` for stream ``row`` (its residual stream x at its position), then the router:
    writes the key and value into the cache, r, h, probs and the Top-K with its combine weights."""
    keys, values, x, r, h, probs, topk_idx, topk_w, length = S[0], S[1], S[2], S[3], S[4], S[5], S[6], S[7], S[8]
    ln, qkv_w, qkv_b, proj_w, proj_b, router_w = W[2], W[3], W[4], W[5], W[6], W[7]
    d = x.shape[1]
    H, hd = keys.shape[2], keys.shape[3]
    E, K = probs.shape[1], topk_idx.shape[1]
    a, qkv, y, scores, att = scratch[0], scratch[1], scratch[2], scratch[3], scratch[4]
    a = a[:d]
    qkv = qkv[: 3 * d]
    y = y[:d]
    att = att[:d]
    p = length[row]
    _layer_norm(x[row], ln[l, 0], ln[l, 1], a)
    _linear(a, qkv_w[l], qkv_b[l], qkv)
    scale = np.float32(hd ** -0.5)
    n = p + 1
    for hh in range(H):
        kc, vc = keys[row, l, hh], values[row, l, hh]  # (hd, T): the loops below run along the positions
        q = qkv[hh * hd:(hh + 1) * hd]
        s = scores[:n]
        for j in range(hd):
            kc[j, p] = qkv[d + hh * hd + j]
            vc[j, p] = qkv[2 * d + hh * hd + j]
        s[:] = 0.0
        for j in range(hd):
            qj = q[j]
            kj = kc[j]
            for t in range(n):
                s[t] += qj * kj[t]
        top = np.float32(-np.inf)
        for t in range(n):
            s[t] *= scale
            top = max(top, s[t])
        total = np.float32(0.0)
        for t in range(n):
            s[t] = math.exp(s[t] - top)
            total += s[t]
        inv = np.float32(1.0) / total
        for j in range(hd):
            vj = vc[j]
            acc = np.float32(0.0)
            for t in range(n):
                acc += s[t] * vj[t]
            y[hh * hd + j] = acc * inv
    _linear(y, proj_w[l], proj_b[l], att)
    for i in range(d):
        r[row, i] = x[row, i] + att[i]
    _layer_norm(r[row], ln[l, 2], ln[l, 3], h[row])
    logits = scratch[5][:E]
    _linear(h[row], router_w[l], scratch[5][:0], logits)
    top = -np.inf
    for e in range(E):
        top = max(top, logits[e])
    total = 0.0
    for e in range(E):
        total += math.exp(logits[e] - top)
    for e in range(E):
        probs[row, e] = math.exp(logits[e] - top) / total
    # Top-K descending (the first of equal probabilities first); combine weights renormalised over the Top-K
    # (renorm != 0) or the raw probabilities
    wsum = np.float32(0.0)
    for k in range(K):
        best = -1
        for e in range(E):
            taken = False
            for kk in range(k):
                if topk_idx[row, kk] == e:
                    taken = True
            if not taken and (best < 0 or probs[row, e] > probs[row, best]):
                best = e
        topk_idx[row, k] = best
        topk_w[row, k] = probs[row, best]
        wsum += probs[row, best]
    if W[14][0] != 0:  # the renorm flag
        for k in range(K):
            topk_w[row, k] = topk_w[row, k] / wsum


@njit(**_JIT)
def _apply(W, S, D, row, l, allowed, server, table, combine, scratch):
    """Layer ``l``'s MoE for stream ``row`` under the combine rule with ``allowed`` (E,) experts: x = r + sum_k
    w_k E_phi(k)(h), a skipped slot adding nothing."""
    w1, b1, w2, b2 = W[8], W[9], W[10], W[11]
    x, r, h, topk_idx, topk_w = S[2], S[3], S[4], S[6], S[7]
    E, K = D.shape[1], topk_idx.shape[1]
    d, f = x.shape[1], w1.shape[3]
    for k in range(K):
        wk = np.float64(topk_w[row, k])
        for j in range(E + 1):
            table[k, j] = wk * D[l, topk_idx[row, k], j]
    serve_slots(table, (), allowed, server)
    combine[:] = 0.0
    for k in range(K):
        if server[k] < E:
            combine[server[k]] += topk_w[row, k]
    act, out, moe = scratch[6][:f], scratch[2][:d], scratch[4][:d]
    moe[:] = 0.0
    for e in range(E):
        c = combine[e]
        if c == 0.0:
            continue
        _linear(h[row], w1[l, e], b1[l, e], act)
        for i in range(f):
            v = np.float64(act[i])
            act[i] = 0.5 * v * (1.0 + math.erf(v * _SQRT1_2))
        _linear(act, w2[l, e], b2[l, e], out)
        for i in range(d):
            moe[i] += c * out[i]
    for i in range(d):
        x[row, i] = r[row, i] + moe[i]


@njit(**_JIT)
def _finish(W, S, row, logits, scratch):
    """Next-token logits of stream ``row`` (every layer applied); its cache is one token longer."""
    x, length, layer = S[2], S[8], S[9]
    a = scratch[0][: x.shape[1]]
    _layer_norm(x[row], W[12][0], W[12][1], a)
    _linear(a, W[13], W[13][0, :0], logits)
    length[row] += 1
    layer[row] = -1


@njit(**_JIT)
def _begin(W, S, row, token, scratch):
    x, length, layer = S[2], S[8], S[9]
    p = length[row]
    if p >= W[1].shape[0]:
        return CONTEXT_FULL
    for i in range(x.shape[1]):
        x[row, i] = W[0][token, i] + W[1][p, i]
    layer[row] = 0
    _route(W, S, row, 0, scratch)
    return OK


@njit(**_JIT)
def view(buf, meta, i):
    """Array ``i`` of a packed buffer (:func:`pack`): meta[i] = offset, rank, shape (up to 5)."""
    o = meta[i, 0]
    n = meta[i, 2] * meta[i, 3] * meta[i, 4] * meta[i, 5] * meta[i, 6]
    return buf[o:o + n]


@njit(**_JIT)
def _weights(wbuf, wm):
    s = wm
    return (view(wbuf, s, 0).reshape((s[0, 2], s[0, 3])), view(wbuf, s, 1).reshape((s[1, 2], s[1, 3])),
            view(wbuf, s, 2).reshape((s[2, 2], s[2, 3], s[2, 4])),
            view(wbuf, s, 3).reshape((s[3, 2], s[3, 3], s[3, 4])), view(wbuf, s, 4).reshape((s[4, 2], s[4, 3])),
            view(wbuf, s, 5).reshape((s[5, 2], s[5, 3], s[5, 4])), view(wbuf, s, 6).reshape((s[6, 2], s[6, 3])),
            view(wbuf, s, 7).reshape((s[7, 2], s[7, 3], s[7, 4])),
            view(wbuf, s, 8).reshape((s[8, 2], s[8, 3], s[8, 4], s[8, 5])),
            view(wbuf, s, 9).reshape((s[9, 2], s[9, 3], s[9, 4])),
            view(wbuf, s, 10).reshape((s[10, 2], s[10, 3], s[10, 4], s[10, 5])),
            view(wbuf, s, 11).reshape((s[11, 2], s[11, 3], s[11, 4])),
            view(wbuf, s, 12).reshape((s[12, 2], s[12, 3])), view(wbuf, s, 13).reshape((s[13, 2], s[13, 3])),
            view(wbuf, s, 14))


@njit(**_JIT)
def _streams(fbuf, fm, ibuf, im):
    return (view(fbuf, fm, 0).reshape((fm[0, 2], fm[0, 3], fm[0, 4], fm[0, 5], fm[0, 6])),
            view(fbuf, fm, 1).reshape((fm[1, 2], fm[1, 3], fm[1, 4], fm[1, 5], fm[1, 6])),
            view(fbuf, fm, 2).reshape((fm[2, 2], fm[2, 3])), view(fbuf, fm, 3).reshape((fm[3, 2], fm[3, 3])),
            view(fbuf, fm, 4).reshape((fm[4, 2], fm[4, 3])), view(fbuf, fm, 5).reshape((fm[5, 2], fm[5, 3])),
            view(ibuf, im, 0).reshape((im[0, 2], im[0, 3])), view(fbuf, fm, 6).reshape((fm[6, 2], fm[6, 3])),
            view(ibuf, im, 1), view(ibuf, im, 2))


def pack(arrays, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Arrays (rank <= 5) copied into one contiguous buffer: (buffer, meta (N, 7) int64: offset, rank, shape
    padded with 1s). One buffer per dtype keeps the compiled calls' argument lists short (numba's dispatch cost
    grows with the number of arguments, about 0.4 us each)."""
    meta = np.ones((len(arrays), 7), np.int64)
    offset = 0
    for i, a in enumerate(arrays):
        meta[i, 0], meta[i, 1] = offset, a.ndim
        meta[i, 2:2 + a.ndim] = a.shape
        offset += a.size
    buf = np.empty(offset, dtype)
    for i, a in enumerate(arrays):
        buf[meta[i, 0]:meta[i, 0] + a.size] = a.reshape(-1)
    return buf, meta


def views(buf: np.ndarray, meta: np.ndarray) -> list[np.ndarray]:
    """The arrays of a packed buffer as numpy views (writing them writes the buffer)."""
    return [buf[m[0]:m[0] + int(np.prod(m[2:2 + m[1]]))].reshape(tuple(m[2:2 + m[1]])) for m in meta]


@njit(**_JIT)
def begin_rows(wbuf, wm, fbuf, fm, ibuf, im, scratch, rows, tokens):
    """Start a token on each stream of ``rows`` (token ids ``tokens``): embedding, then layer 0's attention and
    router. Returns (status, the row it stopped at)."""
    W, S = _weights(wbuf, wm), _streams(fbuf, fm, ibuf, im)
    for i in range(rows.shape[0]):
        if _begin(W, S, rows[i], tokens[i], scratch) != OK:
            return CONTEXT_FULL, rows[i]
    return OK, -1


@njit(**_JIT)
def advance_rows(wbuf, wm, fbuf, fm, ibuf, im, scratch, D, stepped, allowed, env_layer, env_start, env_token,
                 env_done, token_id, logits, finished, finished_at, position):
    """Every stream b with ``stepped[b]`` and a token in progress applies its pending layer with its
    ``allowed[b]`` (E,) experts under the combine rule, then routes its next layer. ``env_*`` are the episodes'
    counters after the step (:class:`wide_env.sim.decode.state.DecodeState`), which the streams must agree
    with: the next layer, or at a token's end the next token (layer 0, trace position start + token) unless
    the episode is done. A stream that applied its last layer writes its next-token logits into ``logits[b]``,
    sets ``finished[b]``, ``finished_at[b]`` = its token's trace position (``position[b]``, kept from its
    begin) and, unless done, starts its next token (id from ``token_id``). Returns (status, row)."""
    W, S = _weights(wbuf, wm), _streams(fbuf, fm, ibuf, im)
    L, E = D.shape[0], D.shape[1]
    K = S[6].shape[1]
    layer = S[9]
    table = np.empty((K, E + 1))
    server = np.empty(K, np.int64)
    combine = np.empty(E, np.float32)
    for row in range(stepped.shape[0]):
        finished[row] = False
        l = layer[row]
        if not stepped[row] or (l < 0 and env_done[row]):  # not stepped, or the episode was over
            continue
        if l < 0 or l >= L:
            return WRONG_LAYER, row
        _apply(W, S, D, row, l, allowed[row], server, table, combine, scratch)
        if l + 1 < L:
            if env_layer[row] != l + 1:
                return WRONG_LAYER, row
            layer[row] = l + 1
            _route(W, S, row, l + 1, scratch)
            continue
        finished[row] = True
        finished_at[row] = position[row]
        _finish(W, S, row, logits[row], scratch)
        if env_done[row]:
            continue
        if env_layer[row] != 0:
            return WRONG_LAYER, row
        position[row] = env_start[row] + env_token[row]
        if _begin(W, S, row, token_id[position[row]], scratch) != OK:
            return CONTEXT_FULL, row
    return OK, -1
