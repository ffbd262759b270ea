"""Fresh observations for a single env, allocated a block of steps at a time.

A single env returns a new observation every step, and earlier ones must not change (a caller may keep them). Each
step's flat observation is one row of a float32 block of ``ROWS`` steps, and each Dict observation holds views of
its own row only: rows never overlap, so nothing is shared between observations. The block and its row views are
made once per block, not per step.
"""

from __future__ import annotations

import numpy as np

from wide_env.envs.dict_display import dict_function

#: steps per block: a kept observation keeps its block alive (ROWS x D float32, a few kB per block)
ROWS = 32


class ObservationRows:
    """Hands out (row (1, D) float32, the observation of that row) step after step: ``flatten`` gives the row as a
    flat (D,) array, else a dict of the layout's keys (views of the row, in ``slices`` order)."""

    def __init__(self, size: int, slices: dict, flatten: bool, rows: int = ROWS):
        self.size, self.flatten, self.rows = int(size), bool(flatten), int(rows)
        self._items = tuple(slices.items())
        self._split = self._split_function()
        self._targets: list = []  # the block's rows, each (1, D), in step order
        self._flat: list = []  # the same rows, each (D,)
        self._next = self.rows

    def __getstate__(self) -> dict:  # pickle / deepcopy: a copy starts a block of its own (views would come apart)
        state = dict(self.__dict__)
        state.update(_targets=[], _flat=[], _next=self.rows, _split=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._split = self._split_function()

    def _split_function(self):
        """flat row -> the dict of its keys' views (slices of the row), one dict display (wide_env.envs.dict_display)."""
        for key, sl in self._items:
            if sl.step not in (None, 1):
                raise ValueError(f"observation key {key!r}: slices of step 1 only, got {sl}")
        return dict_function("f", [(key, f"f[{int(sl.start)}:{int(sl.stop)}]") for key, sl in self._items])

    def split(self, flat: np.ndarray) -> dict:
        """The Dict observation of a flat (D,) row: its keys' views, in layout order."""
        return self._split(flat)

    def take(self) -> tuple[np.ndarray, np.ndarray | dict]:
        """A fresh row to write the next observation into, and that observation (written once the row is)."""
        i = self._next
        if i == self.rows:
            block = np.empty((self.rows, self.size), dtype=np.float32)
            self._targets, self._flat = list(block.reshape(self.rows, 1, self.size)), list(block)
            i = 0
        self._next = i + 1
        flat = self._flat[i]
        if self.flatten:
            return self._targets[i], flat
        return self._targets[i], self._split(flat)  # slicing: cheaper than prebuilt views
