"""The one action validator of every env front end (single, native vector, SB3 VecEnv; decoding and prefill).

An action is a MultiBinary array of 0/1 entries (1 = execute). Accepted: bool, integer or float arrays whose
entries are exactly 0 or 1, of the env's shape (or an alternative shape of the same entries, e.g. prefill's
(T, E)). Anything else raises ValueError naming the problem (shape, dtype, the first bad value and where it is)
and the expected shape, and changes nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: arrays up to this size are checked through a Python set (cheaper than numpy calls for one env's action)
_SMALL = 64
#: one-byte dtypes whose 0/1 entries are valid bools as they are: int8, uint8, bool
_BYTES = frozenset("bB?")


def validate_action(action: Any, shape: tuple[int, ...], entries: str, *, alternative: tuple[int, ...] | None = None,
                    num_envs: int | None = None) -> np.ndarray:
    """Turn one env's action (``num_envs`` None) or a batch of ``num_envs`` actions into a C-contiguous bool array
    of shape (1 or num_envs,) + ``shape`` (a tuple); ``entries`` says what one env's entries mean (for the error
    messages); ``alternative`` is another accepted shape (a tuple) of one env's action (same entries, C order)."""
    if (num_envs is None and type(action) is np.ndarray and action.dtype.char in _BYTES and action.shape == shape
            and not action.tobytes().translate(None, b"\x00\x01")):
        # one env's 0/1 bytes (MultiBinary's own int8, uint8 or bool; the single envs' usual action) are bools
        # already: the action's own buffer is read as one (not copied; the step only reads it)
        try:
            return np.ndarray((1,) + shape, np.bool_, action)
        except (BufferError, ValueError, TypeError):  # not contiguous: the copy below
            pass
    arr = action if type(action) is np.ndarray else np.asarray(action)
    if num_envs is None and arr.shape == shape and arr.size <= _SMALL and arr.dtype.kind in "iuf":
        # one env's action (the single envs' every step): the short path of the checks below
        if not set(arr.tolist() if arr.ndim == 1 else arr.ravel().tolist()) <= {0, 1}:  # NaN, 2, -1, 0.5 fail
            _bad_value(arr, shape)
        return arr.astype(np.bool_).reshape((1,) + shape)
    expected = shape if num_envs is None else (num_envs,) + shape
    if arr.shape != expected and (alternative is None or
                                  arr.shape != (alternative if num_envs is None else (num_envs,) + alternative)):
        raise ValueError(_shape_message(arr.shape, expected, entries, alternative, num_envs, shape))
    kind = arr.dtype.kind
    final = (1,) + shape if num_envs is None else expected
    if kind == "b":
        out = arr
    elif kind not in "iuf":
        raise ValueError(f"{_noun(num_envs)} dtype {arr.dtype}; expected shape {expected} of bool/int/float entries "
                         "equal to 0 or 1")
    elif arr.size <= _SMALL:
        if not set(arr.tolist() if arr.ndim == 1 else arr.ravel().tolist()) <= {0, 1}:  # NaN, 2, -1, 0.5 fail
            _bad_value(arr, expected)
        return arr.astype(np.bool_).reshape(final)  # a fresh C-ordered copy: its reshape is C-contiguous
    elif kind in "iu" and arr.itemsize == 1 and not (arr.view(np.uint8) > 1).any():
        out = arr.view(np.bool_)  # MultiBinary's own int8: 0/1 bytes are bools already
    else:
        if not ((arr == 0) | (arr == 1)).all():
            _bad_value(arr, expected)
        out = arr != 0
    if out.shape != final:
        out = out.reshape(final)
    return out if out.flags.c_contiguous else np.ascontiguousarray(out)


def _noun(num_envs) -> str:
    return "action has" if num_envs is None else "actions have"


def _shape_message(got, expected, entries, alternative, num_envs, shape) -> str:
    if num_envs is None:
        what = entries
    else:
        what = f"one row per sub-env, each {entries}"
    alt = "" if alternative is None else f", or {tuple(([] if num_envs is None else [num_envs]) + list(alternative))}"
    hint = ""
    if num_envs is not None and got in (tuple(shape), alternative):
        hint = "; this is one sub-env's action: stack one row per sub-env (for num_envs=1 pass action[None])"
    return f"{_noun(num_envs)} shape {got}; expected shape {expected}: {what}{alt}{hint}"


def _bad_value(arr: np.ndarray, expected) -> None:
    where = tuple(int(i) for i in np.argwhere(~((arr == 0) | (arr == 1)))[0])
    raise ValueError(f"action entries must be 0 or 1 (got {arr[where].item()!r} at index {where}); expected shape "
                     f"{expected} of 0/1")
