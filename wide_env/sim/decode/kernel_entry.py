"""The step kernel's compiled entry for the argument types a simulator passes, looked up instead of dispatched.

Numba's dispatcher types every argument on every call (about 1 us for the kernel's twenty arrays in tuples, on
the order of the single env's whole kernel run). A simulator's step passes the same types step after step: its
plan, state and constants (one key per state, :func:`wide_env.compiled_entry.types_key`) and its own buffers.
:class:`wide_env.compiled_entry.KernelEntries` keeps the machine-code entry numba compiled (or loaded from its
cache) for each key; the simulator hands it out only for calls whose per-step buffers have the usual types
(:func:`usual_step_buffers`, :func:`usual_outcome`); any other call goes through the dispatcher. Numba's entry
checks no type but the item size (an array of other axes or order would be read out of bounds), so both checks
must hold before it is called.
"""

from __future__ import annotations

import numpy as np

_BOOL, _FLOAT32, _FLOAT64, _INT64 = np.dtype(np.bool_), np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.int64)


def usual_step_buffers(executed: np.ndarray, obs: np.ndarray) -> bool:
    """The caller's step buffers have the types the entries were compiled for: executed (B, E) bool and obs
    (B, D) float32, both C-contiguous and writeable (the rows, outcome and replan buffers are the simulator's)."""
    if executed.dtype is not _BOOL or executed.ndim != 2 or obs.dtype is not _FLOAT32 or obs.ndim != 2:
        return False
    e, o = executed.flags, obs.flags
    return e.c_contiguous and e.writeable and o.c_contiguous and o.writeable


def usual_outcome(out) -> bool:
    """A caller's outcome has the types of :func:`wide_env.sim.decode.state.empty_outcome`'s: values (B, F) float64
    and counts (B, C) int64, C-contiguous and writeable."""
    values, counts = out.values, out.counts
    if values.dtype is not _FLOAT64 or values.ndim != 2 or counts.dtype is not _INT64 or counts.ndim != 2:
        return False
    v, c = values.flags, counts.flags
    return v.c_contiguous and v.writeable and c.c_contiguous and c.writeable
