"""What a decoding step needs from the router, per (token, layer) row: probabilities, the Top-K set and its
weights, and the weighted deviation table of each Top-K slot.

These depend on gating alone (not on channels), so for a source whose gating is fixed per trace position
(a recorded trace) they are built once for every position and a plan only gathers its rows; sources that
draw gating at random (synthetic) build them per planned chunk. Pure numpy, rows on the leading axis.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, fields

import numpy as np

from wide_env.sim.deviation import slot_deviation_table


@dataclass
class GatingRows:
    """R rows of gating-derived arrays. E experts, K Top-K."""

    probs: np.ndarray  # (R, E) router probabilities
    topk_idx: np.ndarray  # (R, K) int64, descending probability
    topk_weight: np.ndarray  # (R, K) combine weights
    # (R, K, E+1) float64: kappa_l * w_k * D_l(S_k, j), column E = skip; None where the rows' user derives it
    # from the Top-K sets and weights (wide_env.sim.deviation.slot_deviation_table: one product per entry)
    deviation_table: np.ndarray | None

    def take(self, rows: np.ndarray, deviation_table: bool = True) -> "GatingRows":
        """A new GatingRows holding copies of ``rows`` (flattened) in order (``deviation_table=False``: without
        the deviation tables, the largest part; a decoding plan derives them)."""
        flat = np.asarray(rows).reshape(-1)
        # the array methods directly: a plan of one episode gathers a few rows, where np.take's and
        # dataclasses.fields' Python overhead outweighs the copy
        return GatingRows(self.probs.take(flat, axis=0), self.topk_idx.take(flat, axis=0),
                          self.topk_weight.take(flat, axis=0),
                          self.deviation_table.take(flat, axis=0) if deviation_table else None)


def build_gating_rows(weighted_mismatch: np.ndarray, layer: np.ndarray, probs: np.ndarray, topk_idx: np.ndarray,
                      topk_weight: np.ndarray) -> GatingRows:
    """Rows from flat gating: layer (R,) ints, probs (R, E), topk_idx / topk_weight (R, K);
    weighted_mismatch (L, E, E+1) = kappa_l * D_l."""
    # contiguous rows: np.take on a strided array copies all of it first (topk_idx is often an argsort slice)
    probs, topk_idx, topk_weight = (np.ascontiguousarray(x) for x in (probs, topk_idx, topk_weight))
    table = slot_deviation_table(weighted_mismatch, layer, topk_idx.astype(np.int64), topk_weight)
    return GatingRows(probs=probs, topk_idx=topk_idx.astype(np.int64), topk_weight=topk_weight, deviation_table=table)


# Per-source cache of position tables, keyed by the weighted mismatch tables they depend on besides the
# source. A few settings per process at most; oldest dropped first.
_POSITION_TABLES: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()
_TABLES_PER_SOURCE = 4


def position_gating_rows(source, weighted_mismatch: np.ndarray) -> GatingRows:
    """Rows for every (position, layer) of a positional source (row = position * L + layer), cached."""
    cache = _POSITION_TABLES.setdefault(source, {})
    key = weighted_mismatch.tobytes()
    rows = cache.get(key)
    if rows is None:
        gates = source.all_gates()
        T, L, E = gates.probs.shape
        K = gates.topk_idx.shape[-1]
        rows = build_gating_rows(weighted_mismatch, np.tile(np.arange(L), T), gates.probs.reshape(T * L, E),
                                 gates.topk_idx.reshape(T * L, K), gates.topk_weight.reshape(T * L, K))
        for f in fields(rows):  # shared by every env on this source: nothing may write into it
            getattr(rows, f.name).flags.writeable = False
        while len(cache) >= _TABLES_PER_SOURCE:
            cache.pop(next(iter(cache)))
        cache[key] = rows
    return rows
