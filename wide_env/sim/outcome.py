"""What a step of B episodes produced, for either phase: float and integer fields by name (the env front
ends turn them into info) plus each Top-K slot's server."""

from __future__ import annotations

import numpy as np


class OutcomeFields:
    """The named columns of a phase's outcomes: ``floats`` (the first is the reward) and ``ints``."""

    def __init__(self, floats: tuple[str, ...], ints: tuple[str, ...]):
        if floats[0] != "reward":
            raise ValueError("the first float field of an outcome is the reward")
        self.floats, self.ints = tuple(floats), tuple(ints)
        self.index = {**{name: (0, i) for i, name in enumerate(floats)}, **{name: (1, i) for i, name in enumerate(ints)}}


class Outcome:
    """values (B, len(floats)) float64; counts (B, len(ints) + extra) int64; server: each Top-K slot's server
    (an expert index, or E for skip), decoding (B, K), prefill (B, T, K); detail: phase-specific arrays by
    name (prefill: ``token_weighted_deviation`` (B, T))."""

    __slots__ = ("values", "counts", "server", "fields", "detail")

    def __init__(self, values: np.ndarray, counts: np.ndarray, server: np.ndarray, fields: OutcomeFields,
                 detail: dict | None = None):
        self.values, self.counts, self.server, self.fields, self.detail = values, counts, server, fields, detail

    def column(self, name: str) -> np.ndarray:
        """(B,) values of one field (a view)."""
        which, i = self.fields.index[name]
        return (self.values, self.counts)[which][:, i]

    def __getitem__(self, name: str) -> np.ndarray:
        if name == "server":
            return self.server
        if self.detail is not None and name in self.detail:
            return self.detail[name]
        return self.column(name)
