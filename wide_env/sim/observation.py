"""The decoding observation: layout, bounds and a batched builder shared by every env front end.

Scale-free by design: energies are relative to the Top-K energy of the same state (so the reward's
energy term is the sum of ``energy_cost`` over executed experts), latencies relative to the deadline,
deviations relative to the budget unit (eps_l per layer, or the token budget).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

# Finite clipping bounds [choice]: values beyond them carry no decision-relevant information.
MAX_ENERGY_COST = 1.0e4
MAX_LATENCY_RATIO = 100.0
MAX_DEVIATION = 1.0e3
GAIN_DB_LOW, GAIN_DB_HIGH = -250.0, 50.0


def observation_layout(n_experts: int, top_k: int, n_nodes: int) -> "OrderedDict[str, tuple[int, float, float]]":
    """key -> (size, low, high), in the order of the flat observation."""
    E, K, N = n_experts, top_k, n_nodes
    return OrderedDict([
        ("gate_probs", (E, 0.0, 1.0)),
        ("topk_mask", (E, 0.0, 1.0)),
        ("topk_weight", (E, 0.0, 1.0)),
        ("channel_gain_db", (N, GAIN_DB_LOW, GAIN_DB_HIGH)),
        ("energy_cost", (E, 0.0, MAX_ENERGY_COST)),
        ("latency_ratio", (E, 0.0, MAX_LATENCY_RATIO)),
        ("deviation_table", (K * (E + 1), 0.0, MAX_DEVIATION)),
        ("budget_remaining", (1, 0.0, MAX_DEVIATION)),
        ("position", (2, 0.0, 1.0)),
    ])


def observation_slices(layout) -> "OrderedDict[str, slice]":
    out, offset = OrderedDict(), 0
    for key, (size, _, _) in layout.items():
        out[key] = slice(offset, offset + size)
        offset += size
    return out


def build_static_observation(layout, *, probs, topk_mask, topk_idx, topk_weight, gain_db, energy_cost,
                             latency_ratio, deviation_table) -> np.ndarray:
    """Flat float32 observations (lead + (D,)) of tokens in every layer, except ``budget_remaining`` and
    ``position``, which change with the step and are filled by the simulator. Inputs have leading axes
    ``lead`` (e.g. batch, token, layer); ``gain_db`` may have 1 in the layer axis (same in every layer)."""
    slices = observation_slices(layout)
    out = np.zeros(probs.shape[:-1] + (sum(size for size, _, _ in layout.values()),), dtype=np.float32)
    # probabilities, masks and combine weights lie in [0, 1] by construction (validated sources)
    out[..., slices["gate_probs"]] = probs
    out[..., slices["topk_mask"]] = topk_mask
    np.put_along_axis(out[..., slices["topk_weight"]], topk_idx, np.minimum(topk_weight, 1.0), axis=-1)
    out[..., slices["channel_gain_db"]] = np.clip(gain_db, GAIN_DB_LOW, GAIN_DB_HIGH)  # broadcasts over layers
    # energies, latencies and deviations are >= 0 by construction: only the upper bound needs clipping
    np.minimum(energy_cost, MAX_ENERGY_COST, out=out[..., slices["energy_cost"]], casting="same_kind")
    np.minimum(latency_ratio, MAX_LATENCY_RATIO, out=out[..., slices["latency_ratio"]], casting="same_kind")
    np.minimum(deviation_table, MAX_DEVIATION, out=out[..., slices["deviation_table"]], casting="same_kind")
    return out
