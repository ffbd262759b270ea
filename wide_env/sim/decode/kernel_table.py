"""The step kernel called with one table of its arrays' addresses and shapes, for the single env's every step.

Numba turns each array argument into its own struct on every call (about 40 ns an array, 1.1 us for the kernel's
22 arrays: as long as the single env's whole step in the kernel). A batch of one passes the same plan, state,
constants and outcome step after step; only the executed mask and the observation row change. :func:`table_of`
writes the addresses and shapes of the fixed arrays into an int64 table once per plan, and
:func:`wide_env.sim.decode.kernel.run_table` rebuilds them from it inside compiled code (:func:`view1` ..
:func:`view5`: views without a reference count, so no unboxing) and runs :func:`wide_env.sim.decode.kernel.run_rows`
on them: the same compiled rule on the same memory. ``run_table`` lives in kernel.py so that numba's disk cache,
keyed on the defining file, compiles it again whenever the kernel changes.

The caller keeps every array of a table alive while the table is used (wide_env.sim.decode.simulator keeps them
together in one tuple) and uses a table only for arrays of :data:`DTYPES` (C-contiguous, see :func:`fits`).
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit, types
from numba.extending import intrinsic

#: the dtypes of the table's arrays, in its row order: the plan's 13 (kernel.run_rows), the state's 3, the 2
#: constants, then rows, the outcome's values and counts, and the replan flags
DTYPES = tuple(np.dtype(d) for d in (
    np.float64, np.bool_, np.float64, np.int64, np.float64, np.float32, np.float64, np.float32, np.float32, np.int32,
    np.float64, np.bool_, np.float64,  # plan
    np.int64, np.float64, np.bool_,  # counters, amounts, flags
    np.int64, np.float64,  # consts
    np.bool_, np.float64, np.int64, np.bool_))  # rows, values, counts, replan
#: their numbers of axes
NDIMS = (5, 4, 4, 4, 3, 4, 4, 4, 5, 4, 4, 3, 2, 2, 2, 2, 1, 1, 1, 2, 2, 1)
#: a table row: the address, then up to 5 axis lengths
WIDTH = 6


#: single-env steps a process takes through the kernel's usual entry before it makes the table's: compiling
#: kernel.run_table (and _describe) costs about 2 s of CPU the first time on a machine (numba caches it on disk after), which
#: pays off over many steps only; a short script (one reset and a few steps) never compiles it
WARM_STEPS = 256
_warm = [WARM_STEPS]  # steps left before the table's entry is made


def warming() -> bool:
    """Whether the process is still before :data:`WARM_STEPS` single-env steps (then the caller steps through the
    kernel's usual entry and calls :func:`count_step`)."""
    return _warm[0] > 0


def count_step() -> bool:
    """Count one warming step; True at the last one (the caller looks the table's entry up again)."""
    _warm[0] -= 1
    return _warm[0] <= 0


def fits(arrays) -> bool:
    """Whether ``arrays`` (the table's, in its order) have the table's dtypes and axes and are C-contiguous."""
    if len(arrays) != len(DTYPES):
        return False
    for a, dtype, ndim in zip(arrays, DTYPES, NDIMS):
        if a.dtype != dtype or a.ndim != ndim or not a.flags.c_contiguous:
            return False
    return True


def table_of(plan: tuple, state: tuple, consts: tuple, rows, values, counts, replan) -> np.ndarray:
    """(len(DTYPES), WIDTH) int64: each array's address and axis lengths, in the table's order (arrays that
    :func:`fits`)."""
    table = np.zeros((len(DTYPES), WIDTH), dtype=np.int64)
    _describe(plan, state, consts, rows, values, counts, replan, table)
    return table


@njit(inline="always")
def _row(t, i, a):
    t[i, 0] = a.ctypes.data
    for axis in range(a.ndim):
        t[i, 1 + axis] = a.shape[axis]


@njit(cache=True, nogil=True)
def _describe(plan, state, consts, rows, values, counts, replan, t):
    _row(t, 0, plan[0])
    _row(t, 1, plan[1])
    _row(t, 2, plan[2])
    _row(t, 3, plan[3])
    _row(t, 4, plan[4])
    _row(t, 5, plan[5])
    _row(t, 6, plan[6])
    _row(t, 7, plan[7])
    _row(t, 8, plan[8])
    _row(t, 9, plan[9])
    _row(t, 10, plan[10])
    _row(t, 11, plan[11])
    _row(t, 12, plan[12])
    _row(t, 13, state[0])
    _row(t, 14, state[1])
    _row(t, 15, state[2])
    _row(t, 16, consts[0])
    _row(t, 17, consts[1])
    _row(t, 18, rows)
    _row(t, 19, values)
    _row(t, 20, counts)
    _row(t, 21, replan)


@intrinsic
def _pointer(typingctx, address, dtype):
    """An int64 address as a pointer to ``dtype`` (a numba number class, e.g. np.float64 inside compiled code)."""
    target = dtype.instance_type if isinstance(dtype, types.NumberClass) else dtype.dtype
    sig = types.CPointer(target)(address, dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


@njit(inline="always")
def view1(t, i, dtype):
    """Row ``i`` of table ``t`` as a 1-D C array of ``dtype`` (a numba number class)."""
    return carray(_pointer(t[i, 0], dtype), (t[i, 1],))


@njit(inline="always")
def view2(t, i, dtype):
    return carray(_pointer(t[i, 0], dtype), (t[i, 1], t[i, 2]))


@njit(inline="always")
def view3(t, i, dtype):
    return carray(_pointer(t[i, 0], dtype), (t[i, 1], t[i, 2], t[i, 3]))


@njit(inline="always")
def view4(t, i, dtype):
    return carray(_pointer(t[i, 0], dtype), (t[i, 1], t[i, 2], t[i, 3], t[i, 4]))


@njit(inline="always")
def view5(t, i, dtype):
    return carray(_pointer(t[i, 0], dtype), (t[i, 1], t[i, 2], t[i, 3], t[i, 4], t[i, 5]))
