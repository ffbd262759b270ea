"""Compiled entries of numba functions by the types of their arguments, looked up instead of dispatched.

Numba's dispatcher types every argument on every call (about 40 ns an array); a caller that passes arrays of the
same types call after call looks the machine-code entry up once per types key (:class:`KernelEntries`) and calls
it directly. The entry checks no type but the item size, so a caller hands it only arrays of the key's types.
Used by the decoding step kernel (wide_env.sim.decode.kernel_entry) and the model's fused decoder
(wide_env.models.fused_decoder).
"""

from __future__ import annotations


def types_key(arrays) -> tuple:
    """What numba's types of ``arrays`` depend on: dtype, number of axes, order (C, F or neither), writeability."""
    key = []
    for a in arrays:
        flags = a.flags
        key.append((a.dtype, a.ndim, flags.c_contiguous, flags.f_contiguous, flags.writeable))
    return tuple(key)


class KernelEntries:
    """Compiled entries of one numba function by the types key of its cached arguments; keys are interned to
    small ints once (:meth:`key_id`), so a step looks its entry up without hashing its types again."""

    def __init__(self, dispatcher):
        self.dispatcher = dispatcher
        # a plain Python function (numba's JIT disabled, NUMBA_DISABLE_JIT=1) has no entries: every call runs it
        self._compiles = hasattr(dispatcher, "compile") and hasattr(dispatcher, "typeof_pyval")
        self._ids: dict = {}  # types key -> its id
        self._entries: dict = {}  # id -> entry

    def key_id(self, key: tuple) -> int:
        """The id of a types key (:func:`types_key`)."""
        return self._ids.setdefault(key, len(self._ids))

    def get(self, key_id: int):
        """The entry for a key's id, or None before :meth:`learn` saw a call with it."""
        return self._entries.get(key_id)

    def learn(self, key_id: int, args: tuple) -> None:
        """Record the entry for the exact types of ``args`` under the key's id (numba compiles it, or loads it
        from its cache, unless a call with these types went through the dispatcher already)."""
        if self._compiles:
            signature = tuple(self.dispatcher.typeof_pyval(a) for a in args)
            self._entries[key_id] = self.dispatcher.compile(signature)

    def entry(self, args: tuple):
        """The entry for the types of ``args`` (compiled, or loaded from numba's cache, the first time a key is
        seen); the function itself where numba's JIT is disabled."""
        if not self._compiles:
            return self.dispatcher
        key = self.key_id(types_key(args))
        if self.get(key) is None:
            self.learn(key, args)
        return self.get(key)
