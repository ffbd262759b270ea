"""The arithmetic of the compiled decoder (:mod:`wide_env.models.fused_kernels`), on blocks of streams.

A layer's streams run together: the matrix products take R rows at once (a weight row, loaded once, serves
four streams), and the transcendental functions of the attention softmax and the GELU run in
loops the compiler vectorises (libm's scalar ``exp`` and ``erf`` cost 3 and 10 ns a call: at B = 256 they
took a quarter of a step). Every stream's result depends on its own inputs alone, in the same order of
operations whatever the number of rows beside it, so a stream decodes alike in a batch of one or of 4096.

Accuracy: ``exp`` and ``erf`` are computed in float64 to about 1e-13 (``tests/test_fused_batch.py``), then
rounded to float32 as before, so they round like libm's except at rare ties.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

_JIT = dict(cache=True, nogil=True, error_model="numpy")
# no reassociation: the loops vectorise across outputs (the products) or elements (exp, erf) as written, each
# output's sum in the order the code gives (a product's chain of fused multiply-adds; without it, the exp and
# erf range reduction's two-part constants could fold); no approximate functions
_EXACT = dict(_JIT, fastmath={"contract"})
_LN_EPS = 1e-5  # torch.nn.LayerNorm's default
_SQRT1_2 = 1.0 / math.sqrt(2.0)

# erf on [0, 4] as a polynomial in t = (z - 2) / 2, degree 27: numpy.polynomial.chebyshev.chebfit of math.erf at
# 200 Chebyshev nodes, converted to powers of t (cheb2poly; the sum of |coefficients| is 4.3, so Horner loses
# nothing): max error 1e-13 on [0, 4]. Beyond 4, erf is 1 to 1.5e-8 (in float32, 1).
_ERF = (
    0.9953222650188577, 0.041333970708112344, -0.16533588279501982, 0.385783726620046, -0.5511196119231265,
    0.4188509027582907, 0.029393110214949558, -0.43249766678676116, 0.40730276117833036, -0.02566067311162093,
    -0.26910253374688425, 0.21251261919200798, 0.021384154868195816, -0.13306322524456526, 0.0648727367955207,
    0.031375595168069134, -0.0462449560737293, 0.0077533944218885174, 0.016384845938591748,
    -0.009722194605274126, -0.002906618075212463, 0.0043384392047300935, -8.536945097148406e-05,
    -0.0011906196363270284, 0.00016110143624246116, 0.00020248591899871838, -2.6011094450950616e-05,
    -1.6762316226959226e-05)
# exp: Cody-Waite reduction x = k ln2 + r (ln2 in two parts, fdlibm's), |r| <= ln2 / 2, Taylor to r^12
_LN2_HI, _LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10
_LOG2E = 1.4426950408889634
_MAGIC = 6755399441055744.0  # 1.5 * 2^52
_MAGIC_BITS = 0x4338000000000000  # its float64 bits


@intrinsic
def prefetch(typingctx, arr, index):
    """Ask the CPU to load the cache line of ``arr[index]`` (a 1-d array) ahead of use (llvm.prefetch: a hint,
    no effect on results). At B = 256 the streams' own cache blocks are visited once every L steps, so each is
    a miss from memory; fetching the next stream's while this one computes hides the wait."""
    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        array = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, array, [args[1]], wraparound=False)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        # the unsuffixed name: LLVM's auto-upgrade gives it the pointer mangling of its version (p0i8, p0)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch")
        # read, keep in all cache levels, data cache
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.void(arr, index), codegen


@njit(**_JIT)
def layer_norm(x, w, b, out):
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


@njit(**_EXACT)
def linear_rows(x, w, b, out):
    """out = x @ w + b for every row of ``x`` (R, in) with w (in, out); b may be empty (no bias). Per output: a
    chain of fused multiply-adds in input order from the bias (the same sums for a row alone or among others,
    whichever of the paths below runs it). Rows run four at a time: each weight row loaded serves four rows,
    and their outputs pass through the registers once per four inputs."""
    R, n_in, n_out = x.shape[0], w.shape[0], w.shape[1]
    for r in range(R):
        o = out[r]
        if b.shape[0]:
            o[:] = b
        else:
            o[:] = 0.0
    for r0 in range(0, R - 3, 4):
        o0, o1, o2, o3 = out[r0], out[r0 + 1], out[r0 + 2], out[r0 + 3]
        x0, x1, x2, x3 = x[r0], x[r0 + 1], x[r0 + 2], x[r0 + 3]
        i = 0
        while i + 4 <= n_in:
            wa, wb, wc, wd = w[i], w[i + 1], w[i + 2], w[i + 3]
            x0a, x0b, x0c, x0d = x0[i], x0[i + 1], x0[i + 2], x0[i + 3]
            x1a, x1b, x1c, x1d = x1[i], x1[i + 1], x1[i + 2], x1[i + 3]
            x2a, x2b, x2c, x2d = x2[i], x2[i + 1], x2[i + 2], x2[i + 3]
            x3a, x3b, x3c, x3d = x3[i], x3[i + 1], x3[i + 2], x3[i + 3]
            for j in range(n_out):
                va, vb, vc, vd = wa[j], wb[j], wc[j], wd[j]
                acc = o0[j]
                acc += x0a * va
                acc += x0b * vb
                acc += x0c * vc
                acc += x0d * vd
                o0[j] = acc
                acc = o1[j]
                acc += x1a * va
                acc += x1b * vb
                acc += x1c * vc
                acc += x1d * vd
                o1[j] = acc
                acc = o2[j]
                acc += x2a * va
                acc += x2b * vb
                acc += x2c * vc
                acc += x2d * vd
                o2[j] = acc
                acc = o3[j]
                acc += x3a * va
                acc += x3b * vb
                acc += x3c * vc
                acc += x3d * vd
                o3[j] = acc
            i += 4
        while i < n_in:
            wi = w[i]
            for j in range(n_out):
                o0[j] += x0[i] * wi[j]
                o1[j] += x1[i] * wi[j]
                o2[j] += x2[i] * wi[j]
                o3[j] += x3[i] * wi[j]
            i += 1
    for r in range(R - R % 4, R):  # the last rows one at a time
        xr, o = x[r], out[r]
        for i in range(n_in):
            xi, wi = xr[i], w[i]
            for j in range(n_out):
                o[j] += xi * wi[j]


@njit(**_EXACT)
def exp_shifted(s, n, top, poly, k_bits, scale):
    """s[:n] = exp(s[:n] - top) (float32 in and out, float64 inside): :func:`exp_flat` of the shifted scores.
    Scratch (>= n,): ``poly`` float64, ``k_bits`` int64 and ``scale``, its float64 view."""
    for t in range(n):
        poly[t] = max(np.float64(s[t] - top), -700.0)
    exp_flat(s, n, poly, k_bits, scale)


@njit(**_EXACT)
def exp_flat(s, n, x, k_bits, scale):
    """s[:n] = exp(x[:n]) rounded to float32, for float64 ``x`` >= -700 (overwritten: the polynomial). One call
    serves a stream's scores of every head (each shifted by its head's maximum beforehand), so the loops run
    long. Scratch (>= n,): ``k_bits`` int64 and ``scale``, its float64 view (made once by the caller: a view
    costs reference counting). 2^k is built from k's bits: k + 1.5 * 2^52 holds k in its low bits (so no
    float-to-int conversion, which AVX2 cannot vectorise for int64)."""
    for t in range(n):
        xt = x[t]
        k = np.floor(xt * _LOG2E + 0.5)
        r = (xt - k * _LN2_HI) - k * _LN2_LO
        p = 1.0 / 479001600.0
        p = p * r + 1.0 / 39916800.0
        p = p * r + 1.0 / 3628800.0
        p = p * r + 1.0 / 362880.0
        p = p * r + 1.0 / 40320.0
        p = p * r + 1.0 / 5040.0
        p = p * r + 1.0 / 720.0
        p = p * r + 1.0 / 120.0
        p = p * r + 1.0 / 24.0
        p = p * r + 1.0 / 6.0
        p = p * r + 0.5
        p = p * r + 1.0
        x[t] = p * r + 1.0
        scale[t] = k + _MAGIC
    for t in range(n):
        k_bits[t] = (k_bits[t] - _MAGIC_BITS + 1023) << 52  # 2^k's float64 bits
    for t in range(n):
        s[t] = np.float32(x[t] * scale[t])


@njit(inline="always", **_EXACT)
def _erf_chain(t4, j):
    """One of erf's four Horner chains in t^4: the coefficients _ERF[j], _ERF[j + 4], ..., _ERF[j + 24], written
    out (no loop) so that the loops over elements around it vectorise."""
    p = _ERF[24 + j]
    p = p * t4 + _ERF[20 + j]
    p = p * t4 + _ERF[16 + j]
    p = p * t4 + _ERF[12 + j]
    p = p * t4 + _ERF[8 + j]
    p = p * t4 + _ERF[4 + j]
    return p * t4 + _ERF[j]


@njit(inline="always", **_EXACT)
def erf(x):
    """erf in float64 to about 1e-13 (1 beyond 4: 1.5e-8 off at most): the polynomial _ERF in four interleaved
    Horner chains in t^4 (p = A + t B + t^2 C + t^3 D: a quarter of the dependency chain, the loops over elements
    run at throughput)."""
    z = min(abs(x), 4.0)
    t = 0.5 * z - 1.0
    t2 = t * t
    t4 = t2 * t2
    a, b, c, d = _erf_chain(t4, 0), _erf_chain(t4, 1), _erf_chain(t4, 2), _erf_chain(t4, 3)
    y = (a + t * b) + t2 * (c + t * d) if z < 4.0 else 1.0
    return y if x >= 0 else -y


@njit(**_EXACT)
def gelu_rows(a):
    """a = GELU(a) (erf form, float64 inside) on every element of a (R, f) float32."""
    flat = a.reshape(-1)
    for i in range(flat.shape[0]):
        v = np.float64(flat[i])
        flat[i] = 0.5 * v * (1.0 + erf(v * _SQRT1_2))


@njit(**_JIT)
def token_losses(logits, target, pred, nll):
    """Per row i of next-token ``logits`` (R, V): the prediction (the first of equal maxima, as numpy's argmax)
    into ``pred[i]`` and the loss -log softmax(logits[i])[target[i]] (float64, nats; the exps summed in vocabulary
    order from the maximum) into ``nll[i]``. Compiled: the model backend reports each completed token with it,
    right after the decoder ran, where numpy's per-call work on one row cost 4-5 us a call in the loop."""
    for i in range(logits.shape[0]):
        x = logits[i]
        best = 0
        for v in range(1, x.shape[0]):
            if x[v] > x[best]:
                best = v
        top = np.float64(x[best])
        total = 0.0
        for v in range(x.shape[0]):
            total += math.exp(np.float64(x[v]) - top)
        pred[i] = best
        nll[i] = top + math.log(total) - np.float64(x[target[i]])
