"""Everything a decoding step needs from the router, per (token, layer) row: Top-K mask, weighted deviation
tables and the gating part of the observation.

These depend on gating alone (not on channels), so for a source whose gating is fixed per trace position
(a recorded trace) they are built once for every position and a step only gathers its rows; sources that
draw gating at random (synthetic) build them per planned chunk. Pure numpy, rows on the leading axis.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, fields

import numpy as np

from wide_env.sim.deviation import slot_deviation_table
from wide_env.sim.observation import MAX_DEVIATION


@dataclass
class GatingRows:
    """R rows of gating-derived arrays. E experts, K Top-K."""

    probs: np.ndarray  # (R, E) router probabilities
    topk_idx: np.ndarray  # (R, K) int64, descending probability
    topk_weight: np.ndarray  # (R, K) combine weights
    topk_mask: np.ndarray  # (R, E) bool
    deviation_table: np.ndarray  # (R, K, E+1) float64: kappa_l * w_k * D_l(S_k, j), column E = skip
    # (R, D) float32 observation with the gating entries filled (gate_probs, topk_mask, dense topk_weight,
    # deviation_table / budget unit) and zeros elsewhere: one gathered row starts a step's observation
    obs_template: np.ndarray

    def take(self, rows: np.ndarray) -> "GatingRows":
        """A new GatingRows holding copies of ``rows`` (flattened) in order."""
        flat = np.asarray(rows).reshape(-1)
        return GatingRows(*(np.take(getattr(self, f.name), flat, axis=0) for f in fields(self)))

    def assign(self, rows: np.ndarray, other: "GatingRows") -> None:
        """Write ``other``'s rows into rows ``rows`` (flat index array) of this one."""
        for f in fields(self):
            getattr(self, f.name)[rows] = getattr(other, f.name)


def build_gating_rows(weighted_mismatch: np.ndarray, budget_unit: np.ndarray, obs_slices, layer: np.ndarray,
                      probs: np.ndarray, topk_idx: np.ndarray, topk_weight: np.ndarray) -> GatingRows:
    """Rows from flat gating: layer (R,) ints, probs (R, E), topk_idx / topk_weight (R, K).
    weighted_mismatch (L, E, E+1) = kappa_l * D_l; budget_unit (L,) = the observation's deviation unit
    of each layer (eps_l per layer, or the token budget); obs_slices: the observation layout's slices."""
    # contiguous rows: np.take on a strided array copies all of it first (topk_idx is often an argsort slice)
    probs, topk_idx, topk_weight = (np.ascontiguousarray(x) for x in (probs, topk_idx, topk_weight))
    R, E = probs.shape
    topk_mask = np.zeros((R, E), dtype=bool)
    np.put_along_axis(topk_mask, topk_idx, True, axis=-1)
    table = slot_deviation_table(weighted_mismatch, layer, topk_idx, topk_weight)
    size = max(sl.stop for sl in obs_slices.values())
    obs = np.zeros((R, size), dtype=np.float32)
    obs[:, obs_slices["gate_probs"]] = probs  # in [0, 1] by construction (validated sources)
    obs[:, obs_slices["topk_mask"]] = topk_mask
    np.put_along_axis(obs[:, obs_slices["topk_weight"]], topk_idx, np.minimum(topk_weight, 1.0), axis=-1)
    scaled = table.reshape(R, -1) / budget_unit[layer][:, None]
    np.minimum(scaled, MAX_DEVIATION, out=obs[:, obs_slices["deviation_table"]], casting="same_kind")  # >= 0
    return GatingRows(probs=probs, topk_idx=topk_idx, topk_weight=topk_weight, topk_mask=topk_mask,
                      deviation_table=table, obs_template=obs)


# Per-source cache of position tables, keyed by what they depend on besides the source: the weighted
# mismatch and the budget units. A few budget settings per process at most; oldest dropped first.
_POSITION_TABLES: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()
_TABLES_PER_SOURCE = 4


def position_gating_rows(source, weighted_mismatch: np.ndarray, budget_unit: np.ndarray, obs_slices) -> GatingRows:
    """Rows for every (position, layer) of a positional source (row = position * L + layer), cached."""
    cache = _POSITION_TABLES.setdefault(source, {})
    key = (weighted_mismatch.tobytes(), np.asarray(budget_unit, dtype=np.float64).tobytes(),
           tuple((name, sl.start, sl.stop) for name, sl in obs_slices.items()))
    rows = cache.get(key)
    if rows is None:
        gates = source.all_gates()
        T, L, E = gates.probs.shape
        K = gates.topk_idx.shape[-1]
        rows = build_gating_rows(weighted_mismatch, np.asarray(budget_unit, dtype=np.float64), obs_slices,
                                 np.tile(np.arange(L), T), gates.probs.reshape(T * L, E),
                                 gates.topk_idx.reshape(T * L, K), gates.topk_weight.reshape(T * L, K))
        for f in fields(rows):  # shared by every env on this source: views handed out must not write into it
            getattr(rows, f.name).flags.writeable = False
        while len(cache) >= _TABLES_PER_SOURCE:
            cache.pop(next(iter(cache)))
        cache[key] = rows
    return rows
