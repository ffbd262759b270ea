"""The compiled decoder's packed buffers: arrays packed into one buffer per dtype, and their views on both sides.

:class:`wide_env.models.fused_decoder.FusedDecoder` keeps its weights and its streams' state in three buffers
(float32 weights, float32 and int64 stream state), each with a ``meta`` table of the arrays in it, so a compiled
call takes six arrays instead of thirty (numba unboxes every array argument, about 80 ns each). The compiled
side rebuilds the arrays as views at every call: :func:`carve` writes a view's shape and strides directly (a
few instructions; numba's ``reshape`` goes through a helper that checks the layout, about 90 ns a view: at
B = 1 the thirty views of a call cost more than a layer's arithmetic).

Weights (``wbuf``, :func:`wide_env.models.fused_decoder.pack_weights`; float32, matrices input-major so the inner
loops run over contiguous outputs):
  0 tok (V, d), 1 pos (T, d), 2 ln (L, 4, d) = ln1 weight, ln1 bias, ln2 weight, ln2 bias,
  3 qkv_w (L, d, 3d), 4 qkv_b (L, 3d), 5 proj_w (L, d, d), 6 proj_b (L, d), 7 router_w (L, d, E),
  8 w1 (L, E, d, f), 9 b1 (L, E, f), 10 w2 (L, E, f, d), 11 b2 (L, E, d), 12 ln_f (2, d), 13 head_w (d, V),
  14 renorm (1,): 1 where the combine weights are renormalised over the Top-K, else 0.
Stream state ``S`` (:func:`streams`: views of the float32 ``fbuf`` and the int64 ``ibuf``):
  0 keys, 1 values (n, L, T, H, hd): each stream's own positions (a position's heads side by side);
  2 x, 3 r, 4 h (n, d): the residual stream, the current layer's attention output and MoE input;
  5 probs (n, E); 6 topk_idx (n, K) int64; 7 topk_w (n, K); 8 length (n,) int64 (tokens in the cache);
  9 layer (n,) int64 (the pending layer, -1 = no token in progress);
  10 shared keys, 11 shared values (slots, L, H, hd, T): trace windows' prefixes that streams share (positions
  last: the attention's loops run along them); 12 slot (n,) int64: each stream's shared slot (-1: none),
  13 shared (n,) int64: how many of its first positions it reads from there;
  14 logits (n, V): next-token logits of the streams that finished their token at the last advance;
  15 position, 16 finished_at (n,) int64: each stream's trace position of its token in progress, and of the
  token it finished at the last advance;
  17 scratch (float32) and 18 work (int64): the layer passes' scratch (:func:`stream_arrays` sizes them).
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

_JIT = dict(cache=True, nogil=True, error_model="numpy")


def pack(arrays, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Arrays (rank <= 5), or shapes of zero arrays, in one contiguous buffer: (buffer, meta (N, 7) int64:
    offset, rank, shape padded with 1s). Zero arrays are not written: their pages stay unmapped until used (a
    stream's cache is mostly never touched)."""
    shapes = [tuple(a) if isinstance(a, tuple) else a.shape for a in arrays]
    meta = np.ones((len(arrays), 7), np.int64)
    offset = 0
    for i, shape in enumerate(shapes):
        meta[i, 0], meta[i, 1] = offset, len(shape)
        meta[i, 2:2 + len(shape)] = shape
        offset += int(np.prod(shape))
    buf = np.zeros(offset, dtype)
    for i, a in enumerate(arrays):
        if not isinstance(a, tuple):
            buf[meta[i, 0]:meta[i, 0] + a.size] = a.reshape(-1)
    return buf, meta


def views(buf: np.ndarray, meta: np.ndarray) -> list[np.ndarray]:
    """The arrays of a packed buffer as numpy views (writing them writes the buffer)."""
    return [buf[m[0]:m[0] + int(np.prod(m[2:2 + m[1]]))].reshape(tuple(m[2:2 + m[1]])) for m in meta]


def stream_arrays(n: int, L: int, T: int, H: int, hd: int, E: int, K: int, V: int, slots: int,
                  scratch_per_stream: int) -> tuple[list, list]:
    """The shapes of ``n`` streams' float32 and int64 state in the order of the module docstring (float arrays
    0-6 of S are 0, 1, 2, 3, 4, 5, 7; int arrays are 6, 8, 9, 12, 13, 15, 16), with the initial values of the
    int arrays (slot and layer -1)."""
    kv, shared = (n, L, T, H, hd), (slots, L, H, hd, T)
    floats = [kv, kv, (n, H * hd), (n, H * hd), (n, H * hd), (n, E), (n, K), shared, shared, (n, V),
              (n * scratch_per_stream + H * T,)]
    # work: the attention's exps (2 H T: every head of a stream) and the gate's (E), then per stream 6 (layer groups, window order, served
    # rows), the layer and slot counts, the combine rule's table (float64 bits) and servers
    work = 2 * H * T + E + 6 * n + 2 * (L + 1) + slots + 2 + K * (E + 1) + K
    ints = [np.zeros((n, K)), np.zeros(n), np.full(n, -1), np.full(n, -1), np.zeros(n), np.zeros(n), np.zeros(n),
            (work,)]
    return floats, ints


@intrinsic
def carve(typingctx, buf, offset, shape):
    """``buf[offset:offset + prod(shape)]`` as a C-contiguous array of ``shape`` (a tuple of ints), written
    directly: no layout check (the packed arrays are contiguous by construction) and no reference taken (a
    borrowed view, valid while the caller holds the buffer: for the compiled call that got it)."""
    if not isinstance(buf, types.Array) or buf.ndim != 1 or not isinstance(shape, types.UniTuple):
        return None
    ndim = shape.count
    out_type = types.Array(buf.dtype, ndim, "C")

    def codegen(context, builder, signature, args):
        src = context.make_array(signature.args[0])(context, builder, args[0])
        out = context.make_array(out_type)(context, builder)
        intp = context.get_value_type(types.intp)
        dims = [context.cast(builder, d, signature.args[2].dtype, types.intp)
                for d in cgutils.unpack_tuple(builder, args[2], ndim)]
        itemsize = context.get_abi_sizeof(context.get_data_type(buf.dtype))
        strides, step = [], intp(itemsize)
        for dim in reversed(dims):
            strides.insert(0, step)
            step = builder.mul(step, dim)
        start = context.cast(builder, args[1], signature.args[1], types.intp)
        data = builder.gep(src.data, [start])
        context.populate_array(out, data=data, shape=dims, strides=strides, itemsize=intp(itemsize), meminfo=None)
        return out._getvalue()

    return out_type(buf, offset, shape), codegen


@njit(**_JIT)
def weights(wbuf, wm):
    """The weights W of the module docstring, as views of ``wbuf``."""
    return (carve(wbuf, wm[0, 0], (wm[0, 2], wm[0, 3])), carve(wbuf, wm[1, 0], (wm[1, 2], wm[1, 3])),
            carve(wbuf, wm[2, 0], (wm[2, 2], wm[2, 3], wm[2, 4])),
            carve(wbuf, wm[3, 0], (wm[3, 2], wm[3, 3], wm[3, 4])), carve(wbuf, wm[4, 0], (wm[4, 2], wm[4, 3])),
            carve(wbuf, wm[5, 0], (wm[5, 2], wm[5, 3], wm[5, 4])), carve(wbuf, wm[6, 0], (wm[6, 2], wm[6, 3])),
            carve(wbuf, wm[7, 0], (wm[7, 2], wm[7, 3], wm[7, 4])),
            carve(wbuf, wm[8, 0], (wm[8, 2], wm[8, 3], wm[8, 4], wm[8, 5])),
            carve(wbuf, wm[9, 0], (wm[9, 2], wm[9, 3], wm[9, 4])),
            carve(wbuf, wm[10, 0], (wm[10, 2], wm[10, 3], wm[10, 4], wm[10, 5])),
            carve(wbuf, wm[11, 0], (wm[11, 2], wm[11, 3], wm[11, 4])),
            carve(wbuf, wm[12, 0], (wm[12, 2], wm[12, 3])), carve(wbuf, wm[13, 0], (wm[13, 2], wm[13, 3])),
            carve(wbuf, wm[14, 0], (wm[14, 2],)))


@njit(**_JIT)
def streams(fbuf, fm, ibuf, im):
    """The stream state S of the module docstring, as views of ``fbuf`` and ``ibuf``."""
    return (carve(fbuf, fm[0, 0], (fm[0, 2], fm[0, 3], fm[0, 4], fm[0, 5], fm[0, 6])),
            carve(fbuf, fm[1, 0], (fm[1, 2], fm[1, 3], fm[1, 4], fm[1, 5], fm[1, 6])),
            carve(fbuf, fm[2, 0], (fm[2, 2], fm[2, 3])), carve(fbuf, fm[3, 0], (fm[3, 2], fm[3, 3])),
            carve(fbuf, fm[4, 0], (fm[4, 2], fm[4, 3])), carve(fbuf, fm[5, 0], (fm[5, 2], fm[5, 3])),
            carve(ibuf, im[0, 0], (im[0, 2], im[0, 3])), carve(fbuf, fm[6, 0], (fm[6, 2], fm[6, 3])),
            carve(ibuf, im[1, 0], (im[1, 2],)), carve(ibuf, im[2, 0], (im[2, 2],)),
            carve(fbuf, fm[7, 0], (fm[7, 2], fm[7, 3], fm[7, 4], fm[7, 5], fm[7, 6])),
            carve(fbuf, fm[8, 0], (fm[8, 2], fm[8, 3], fm[8, 4], fm[8, 5], fm[8, 6])),
            carve(ibuf, im[3, 0], (im[3, 2],)), carve(ibuf, im[4, 0], (im[4, 2],)),
            carve(fbuf, fm[9, 0], (fm[9, 2], fm[9, 3])),
            carve(ibuf, im[5, 0], (im[5, 2],)), carve(ibuf, im[6, 0], (im[6, 2],)),
            carve(fbuf, fm[10, 0], (fm[10, 2],)), carve(ibuf, im[7, 0], (im[7, 2],)))
