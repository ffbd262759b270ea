"""Compiled (numba) forward of a :class:`~wide_env.models.moe_lm.MoELM`, one layer at a time, the streams of a
layer together.

The shipped models are tiny (d_model 32 or 64): torch's per-operation cost, not arithmetic, dominated the
decoding (issue 22: about 0.7 ms per env step on Mixtral at B = 1). These loops run a layer for all the streams
at it in one pass (:mod:`wide_env.models.fused_math`: matrix products over tiles of streams, vectorised exp and
erf), so a call may hold streams at different layers and costs about the same per stream at B = 1 or 4096.

The arithmetic is the torch model's (:mod:`wide_env.models.moe_lm`, :mod:`wide_env.models.decoder`) in float32
with the same weights; sums run in another order than torch's BLAS (matrix products accumulate in float32 in
input order; layer norms, softmaxes and GELU in float64, cast back), so results agree to float32 rounding
(``tests/test_fused_decoder.py`` bounds it). A stream's numbers do not depend on the streams beside it. The
combine rule is :func:`wide_env.rules.serve_slots` itself.

Weights ``W`` and stream state ``S`` are views of the decoder's packed buffers, laid out as
:mod:`wide_env.models.fused_layout` describes.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from wide_env.rules import serve_slots

from .fused_layout import carve, streams, weights
from .fused_math import exp_flat, gelu_rows, layer_norm, linear_rows, prefetch

_JIT = dict(cache=True, nogil=True, error_model="numpy")
# reassociation lets the position loops (dot products, sums) run in SIMD lanes; no approximate functions
_FAST = dict(_JIT, fastmath={"reassoc", "nsz", "contract"})
_EXACT = dict(_JIT, fastmath={"contract"})

#: status codes the entry points return (the Python side raises the matching error)
OK, CONTEXT_FULL, WRONG_LAYER = 0, 1, 2


def scratch_per_stream(d: int, d_ff: int, n_expert: int, vocab: int) -> int:
    """Float32 scratch per stream of the layer passes below (the largest of route, apply and finish)."""
    return max(6 * d + n_expert, 3 * d + n_expert + d_ff, d + vocab)


@njit(inline="always", **_JIT)
def _rows_of(scratch, o, R, c):
    """The (R, c) block of ``scratch`` at offset ``o`` and the offset after it (the layer passes carve their
    buffers from one scratch, in the order scratch_per_stream counts them)."""
    return carve(scratch, o, (R, c)), o + R * c


@njit(**_FAST)
def _route(W, S, rows, l):
    """Attention of layer ``l`` for the streams ``rows`` (all at layer l; each at its residual stream x and its
    position), then the router: writes the keys and values into the caches, r, h, probs and the Top-K with its
    combine weights."""
    keys, values, x, r, h, probs, topk_idx, topk_w, length = S[0], S[1], S[2], S[3], S[4], S[5], S[6], S[7], S[8]
    ln, qkv_w, qkv_b, proj_w, proj_b, router_w = W[2], W[3], W[4], W[5], W[6], W[7]
    R, d = rows.shape[0], x.shape[1]
    T, H, hd = keys.shape[2], keys.shape[3], keys.shape[4]
    E, K = probs.shape[1], topk_idx.shape[1]
    scratch, bits = S[17], S[18]
    a, o = _rows_of(scratch, 0, R, d)
    qkv, o = _rows_of(scratch, o, R, 3 * d)
    y, o = _rows_of(scratch, o, R, d)
    att, o = _rows_of(scratch, o, R, d)
    logits, o = _rows_of(scratch, o, R, E)
    scores = scratch[o:o + H * T]  # a stream's scores, head after head
    # the exps' float64 arguments (then polynomials) and 2^k of every head's positions (_work: the start of S[18])
    shifted, k_bits = bits[:H * T].view(np.float64), bits[H * T:2 * H * T]
    scale_bits = k_bits.view(np.float64)
    for g in range(R):
        layer_norm(x[rows[g]], ln[l, 0], ln[l, 1], a[g])
    linear_rows(a, qkv_w[l], qkv_b[l], qkv)
    scale = np.float32(hd ** -0.5)
    shared_keys, shared_values, slot, shared = S[10], S[11], S[12], S[13]
    ahead = 0  # the first stream of the next window in ``rows`` (they run in window order: _by_slot)
    for g in range(R):
        if g + 1 < R:
            _prefetch_own(S, rows[g + 1], l)
        if g == ahead:  # the first stream of its window's run: fetch the next window's prefix meanwhile
            ahead = g + 1
            while ahead < R and slot[rows[ahead]] == slot[rows[g]]:
                ahead += 1
            if ahead < R:
                _prefetch_shared(S, rows[ahead], l)
        row = rows[g]
        p = length[row]
        n = p + 1
        q = qkv[g]
        P = shared[row] if slot[row] >= 0 else 0  # positions [0, P) in the shared prefix, [P, n) the stream's own
        sk, sv = shared_keys[max(slot[row], 0), l], shared_values[max(slot[row], 0), l]
        kc, vc = keys[row, l], values[row, l]  # (T, H, hd)
        kc[p] = carve(q, d, (H, hd))
        vc[p] = carve(q, 2 * d, (H, hd))
        heads = carve(scores, 0, (H, n))
        for hh in range(H):  # every head's scores, scaled, and their exps' arguments (shifted by the maximum)
            s = heads[hh]
            s[:] = 0.0
            for j in range(hd):  # the shared prefix: (hd, T), loops along the positions (they vectorise)
                qj = q[hh * hd + j]
                kj = sk[hh, j]
                for t in range(P):
                    s[t] += qj * kj[t]
            for t in range(P, n):  # the stream's own positions (few): a position's key is contiguous
                kt = kc[t, hh]
                acc = np.float32(0.0)
                for j in range(hd):
                    acc += q[hh * hd + j] * kt[j]
                s[t] = acc
            top = np.float32(-np.inf)
            for t in range(n):
                s[t] *= scale
                top = max(top, s[t])
            _shift(s, n, top, shifted[hh * n:])
        exp_flat(scores, H * n, shifted, k_bits, scale_bits)  # the heads' exps in one pass (long loops)
        for hh in range(H):
            s = heads[hh]
            total = np.float32(0.0)
            for t in range(n):
                total += s[t]
            inv = np.float32(1.0) / total
            yh = y[g, hh * hd:(hh + 1) * hd]
            for j in range(hd):
                vj = sv[hh, j]
                acc = np.float32(0.0)
                for t in range(P):
                    acc += s[t] * vj[t]
                yh[j] = acc
            for t in range(P, n):
                vt = vc[t, hh]
                for j in range(hd):
                    yh[j] += s[t] * vt[j]
            for j in range(hd):
                yh[j] *= inv
    linear_rows(y, proj_w[l], proj_b[l], att)
    for g in range(R):
        row = rows[g]
        for i in range(d):
            r[row, i] = x[row, i] + att[g, i]
        layer_norm(r[row], ln[l, 2], ln[l, 3], h[row])
        a[g] = h[row]
    linear_rows(a, router_w[l], W[14][:0], logits)
    ex = carve(bits, 2 * H * T, (E,)).view(np.float64)  # the gate's exps (work after the attention's)
    renorm = W[14][0] != 0
    for g in range(R):
        _gate(logits[g], probs[rows[g]], topk_idx[rows[g]], topk_w[rows[g]], K, E, renorm, ex)


@njit(**_EXACT)
def _shift(s, n, top, out):
    """out[:n] = s[:n] - top in float64, at least -700 (exp_flat's arguments; compiled without reassociation)."""
    for t in range(n):
        out[t] = max(np.float64(s[t] - top), -700.0)


@njit(**_JIT)
def _prefetch_own(S, row, l):
    """Fetch stream ``row``'s own positions of layer ``l`` (the keys and values its attention reads and the
    position it writes) into the cache while the stream before it computes: each stream's block is visited
    once every L steps, a miss from memory otherwise. (Its window's shared prefix is read in long runs the
    hardware prefetcher follows.)"""
    keys, values, length, slot, shared = S[0], S[1], S[8], S[12], S[13]
    first = shared[row] if slot[row] >= 0 else 0
    k, v = keys[row, l].reshape(-1), values[row, l].reshape(-1)
    d = keys.shape[3] * keys.shape[4]
    for i in range(first * d, (length[row] + 1) * d, 16):  # a cache line holds 16 floats
        prefetch(k, i)
        prefetch(v, i)


@njit(**_JIT)
def _prefetch_shared(S, row, l):
    """Fetch the shared prefix of stream ``row``'s window at layer ``l`` (the positions it reads: the first of
    each (head, dimension) row of keys and values) into the cache while the stream before it computes, where it
    reads another window than that stream (the streams run in window order): at B = 256 most windows' blocks
    of a layer are a miss from memory, visited once per step."""
    shared_keys, shared_values, slot, shared = S[10], S[11], S[12], S[13]
    if slot[row] < 0:
        return
    P = shared[row]
    k, v = shared_keys[slot[row], l], shared_values[slot[row], l]
    for hh in range(k.shape[0]):
        for j in range(k.shape[1]):
            kj, vj = k[hh, j], v[hh, j]
            for t in range(0, P, 16):  # a cache line holds 16 floats
                prefetch(kj, t)
                prefetch(vj, t)


@njit(**_JIT)
def _gate(logits, probs, topk_idx, topk_w, K, E, renorm, ex):
    """The router's softmax (float64; ``ex``: float64 scratch (E,), each exp computed once), Top-K descending
    (the first of equal probabilities first: one pass, each expert inserted after those at least as probable)
    and combine weights, renormalised over the Top-K (``renorm``) or the raw probabilities."""
    top = -np.inf
    for e in range(E):
        top = max(top, logits[e])
    total = 0.0
    for e in range(E):
        ex[e] = math.exp(logits[e] - top)
        total += ex[e]
    for e in range(E):
        probs[e] = ex[e] / total
    filled = 0
    for e in range(E):
        p = probs[e]
        if filled == K and not p > probs[topk_idx[K - 1]]:
            continue
        i = min(filled, K - 1)  # the last slot (dropped when full), then up past the less probable
        while i > 0 and p > probs[topk_idx[i - 1]]:
            topk_idx[i] = topk_idx[i - 1]
            i -= 1
        topk_idx[i] = e
        filled = min(filled + 1, K)
    wsum = np.float32(0.0)
    for k in range(K):
        topk_w[k] = probs[topk_idx[k]]
        wsum += probs[topk_idx[k]]
    if renorm:
        for k in range(K):
            topk_w[k] = topk_w[k] / wsum


@njit(**_JIT)
def _apply(W, S, D, rows, l, allowed, table, server, served):
    """Layer ``l``'s MoE for the streams ``rows`` (all at layer l) under the combine rule with their ``allowed``
    (n, E) experts: x = r + sum_k w_k E_phi(k)(h), a skipped slot adding nothing. Each expert runs once on the
    streams it serves."""
    w1, b1, w2, b2 = W[8], W[9], W[10], W[11]
    x, r, h, topk_idx, topk_w = S[2], S[3], S[4], S[6], S[7]
    E, K = D.shape[1], topk_idx.shape[1]
    R, d, f = rows.shape[0], x.shape[1], w1.shape[3]
    scratch = S[17]
    combine, o = _rows_of(scratch, 0, R, E)
    moe, o = _rows_of(scratch, o, R, d)
    inp, o = _rows_of(scratch, o, R, d)
    act, o = _rows_of(scratch, o, R, f)
    out, _ = _rows_of(scratch, o, R, d)
    for g in range(R):
        row = rows[g]
        for k in range(K):
            wk = np.float64(topk_w[row, k])
            for j in range(E + 1):
                table[k, j] = wk * D[l, topk_idx[row, k], j]
        serve_slots(table, (), allowed[row], server)
        combine[g] = 0.0
        for k in range(K):
            if server[k] < E:
                combine[g, server[k]] += topk_w[row, k]
    moe[:] = 0.0
    for e in range(E):
        m = 0
        for g in range(R):
            if combine[g, e] != 0.0:
                served[m] = g
                inp[m] = h[rows[g]]
                m += 1
        if m == 0:
            continue
        linear_rows(inp[:m], w1[l, e], b1[l, e], act[:m])
        gelu_rows(act[:m])
        linear_rows(act[:m], w2[l, e], b2[l, e], out[:m])
        for q in range(m):
            g = served[q]
            c = combine[g, e]
            for i in range(d):
                moe[g, i] += c * out[q, i]
    for g in range(R):
        row = rows[g]
        for i in range(d):
            x[row, i] = r[row, i] + moe[g, i]


@njit(**_JIT)
def _finish(W, S, rows):
    """Next-token logits of the streams ``rows`` (every layer applied) into ``logits[row]``; their caches are one
    token longer."""
    x, length, layer, logits, scratch = S[2], S[8], S[9], S[14], S[17]
    R, d, V = rows.shape[0], x.shape[1], logits.shape[1]
    a, o = _rows_of(scratch, 0, R, d)
    out, _ = _rows_of(scratch, o, R, V)
    for g in range(R):
        layer_norm(x[rows[g]], W[12][0], W[12][1], a[g])
    linear_rows(a, W[13], W[14][:0], out)
    for g in range(R):
        row = rows[g]
        logits[row] = out[g]
        length[row] += 1
        layer[row] = -1


@njit(**_JIT)
def _embed(W, S, row, token):
    """Start a token on stream ``row``: its embedding at the stream's next position; layer 0 pending."""
    x, length, layer = S[2], S[8], S[9]
    p = length[row]
    for i in range(x.shape[1]):
        x[row, i] = W[0][token, i] + W[1][p, i]
    layer[row] = 0


@njit(**_JIT)
def _by_slot(slot, starts, seq):
    """The rows in order of their shared prefix slot (rows without one first) into ``seq``: a layer's streams of
    one trace window then run one after another, so the window's keys and values stay in the cache between
    them. ``starts``: scratch (slots + 2,)."""
    starts[:] = 0
    for row in range(slot.shape[0]):
        starts[slot[row] + 2] += 1
    for i in range(starts.shape[0] - 1):
        starts[i + 1] += starts[i]
    for row in range(slot.shape[0]):
        seq[starts[slot[row] + 1]] = row
        starts[slot[row] + 1] += 1


@njit(**_JIT)
def _by_layer(target, seq, order, starts, fill):
    """The rows with ``target[row]`` in [0, L) grouped by it (in the order of ``seq`` in each), L =
    len(starts) - 1: the rows at layer l are ``order[starts[l]:starts[l + 1]]`` afterwards (``fill``: scratch
    like ``starts``)."""
    L = starts.shape[0] - 1
    starts[:] = 0
    for row in seq:
        if 0 <= target[row] < L:
            starts[target[row] + 1] += 1
    for l in range(L):
        starts[l + 1] += starts[l]
    fill[:] = starts
    for row in seq:
        t = target[row]
        if 0 <= t < L:
            order[fill[t]] = row
            fill[t] += 1


@njit(inline="always", **_JIT)
def _work(S, L, K, E):
    """The int64 scratch of a call carved from S[18] (its size: :func:`wide_env.models.fused_layout.stream_arrays`):
    per stream the layer each applies and routes, the window order, the layer groups and the served rows; the
    groups' and windows' counts; the combine rule's table (float64) and servers."""
    work, n, T, H = S[18], S[8].shape[0], S[0].shape[2], S[0].shape[3]
    o = 2 * H * T + E  # the attention's and the gate's exps (_route)
    applies, routes, seq, order, served = (carve(work, o, (n,)), carve(work, o + n, (n,)), carve(work, o + 2 * n, (n,)),
                                           carve(work, o + 3 * n, (n,)), carve(work, o + 4 * n, (n,)))
    o += 6 * n
    starts, fill = carve(work, o, (L + 1,)), carve(work, o + L + 1, (L + 1,))
    o += 2 * (L + 1)
    slot_starts = carve(work, o, (S[10].shape[0] + 2,))
    o += S[10].shape[0] + 2
    table = carve(work, o, (K * (E + 1),)).view(np.float64).reshape((K, E + 1))
    server = carve(work, o + K * (E + 1), (K,))
    return applies, routes, seq, order, served, starts, fill, slot_starts, table, server


@njit(**_JIT)
def begin_rows(wbuf, wm, fbuf, fm, ibuf, im, rows, tokens):
    """Start a token on each stream of ``rows`` (token ids ``tokens``): embedding, then layer 0's attention and
    router. Returns (status, the first row refused); a refused call changes nothing."""
    W, S = weights(wbuf, wm), streams(fbuf, fm, ibuf, im)
    for i in range(rows.shape[0]):
        if S[8][rows[i]] >= W[1].shape[0]:
            return CONTEXT_FULL, rows[i]
    for i in range(rows.shape[0]):
        _embed(W, S, rows[i], tokens[i])
    begun, _, seq, order, _, starts, fill, slot_starts, _, _ = _work(S, W[2].shape[0], S[6].shape[1], S[5].shape[1])
    begun[:] = -1
    begun[rows] = 0
    _by_slot(S[12], slot_starts, seq)
    _by_layer(begun, seq, order, starts, fill)
    _route(W, S, order[:starts[1]], 0)
    return OK, -1


@njit(**_JIT)
def advance_rows(wbuf, wm, fbuf, fm, ibuf, im, D, stepped, allowed, env_layer, env_start, env_token, env_done,
                 token_id, finished):
    """Every stream b with ``stepped[b]`` and a token in progress applies its pending layer with its
    ``allowed[b]`` (E,) experts under the combine rule, then routes its next layer. ``env_*`` are the episodes'
    counters after the step (:class:`wide_env.sim.decode.state.DecodeState`), which the streams must agree
    with: the next layer, or at a token's end the next token (layer 0, trace position start + token) unless
    the episode is done. A stream that applied its last layer writes its next-token logits (S[14]), sets
    ``finished[b]`` and its finished_at (S[16]) = its token's trace position (S[15], kept from its begin) and,
    unless done, starts its next token (id from ``token_id``). Streams at the same layer run together. Returns
    (OK, how many streams finished) or (status, row) for a refused call (a stream out of step, a full
    context), which changes nothing."""
    W, S = weights(wbuf, wm), streams(fbuf, fm, ibuf, im)
    L, E = D.shape[0], D.shape[1]
    length, layer, position, finished_at = S[8], S[9], S[15], S[16]
    n = stepped.shape[0]
    applies, routes, seq, order, served, starts, fill, slot_starts, table, server = _work(S, L, S[6].shape[1], E)
    for row in range(n):  # the layer each stream applies now (-1: none)
        finished[row] = False
        applies[row] = -1
        l = layer[row]
        if not stepped[row] or (l < 0 and env_done[row]):  # not stepped, or the episode was over
            continue
        if l < 0 or l >= L:
            return WRONG_LAYER, row
        if l + 1 < L:
            if env_layer[row] != l + 1:
                return WRONG_LAYER, row
        elif not env_done[row]:
            if env_layer[row] != 0:
                return WRONG_LAYER, row
            if length[row] + 1 >= W[1].shape[0]:  # the next token has no position left
                return CONTEXT_FULL, row
        applies[row] = l
    if n == 1:  # one stream (the single env): no ordering to do
        seq[0] = 0
    else:
        _by_slot(S[12], slot_starts, seq)
    _by_layer(applies, seq, order, starts, fill)
    for l in range(L):
        if starts[l + 1] > starts[l]:
            _apply(W, S, D, order[starts[l]:starts[l + 1]], l, allowed, table, server, served)
    last = order[starts[L - 1]:starts[L]]
    if last.shape[0]:
        _finish(W, S, last)
    done = 0
    for row in range(n):  # the layer each stream routes next (-1: none)
        routes[row] = -1
        l = applies[row]
        if l < 0:
            continue
        if l + 1 < L:
            layer[row] = l + 1
            routes[row] = l + 1
            continue
        finished[row] = True
        done += 1
        finished_at[row] = position[row]
        if not env_done[row]:
            position[row] = env_start[row] + env_token[row]
            _embed(W, S, row, token_id[position[row]])
            routes[row] = 0
    _by_layer(routes, seq, order, starts, fill)
    for l in range(L):
        if starts[l + 1] > starts[l]:
            _route(W, S, order[starts[l]:starts[l + 1]], l)
    return OK, done
