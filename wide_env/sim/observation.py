"""The observations of both phases: layouts and bounds shared by every env front end (the simulators fill
them), the one place that says which key sits where.

Scale-free by design: energies are relative to the Top-K energy of the same state (so the reward's
energy term is the sum of ``energy_cost`` over executed experts), latencies relative to the deadline,
deviations relative to the budget unit (eps_l per layer, or the token budget).
"""

from __future__ import annotations

from collections import OrderedDict

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
        ("deadline_probability", (E, 0.0, 1.0)),
        ("deviation_table", (K * (E + 1), 0.0, MAX_DEVIATION)),
        ("budget_remaining", (1, 0.0, MAX_DEVIATION)),
        ("position", (2, 0.0, 1.0)),
    ])


def prefill_observation_layout(prompt_tokens: int, n_experts: int, top_k: int,
                               n_nodes: int) -> "OrderedDict[str, tuple[int, float, float]]":
    """key -> (size, low, high), in the order of the flat prefill observation (token-major tables)."""
    T, E, K, N = prompt_tokens, n_experts, top_k, n_nodes
    return OrderedDict([
        ("gate_probs", (T * E, 0.0, 1.0)),
        ("topk_mask", (T * E, 0.0, 1.0)),
        ("topk_weight", (T * E, 0.0, 1.0)),
        ("channel_gain_db", (N, GAIN_DB_LOW, GAIN_DB_HIGH)),
        ("load_energy_cost", (E * T, 0.0, MAX_ENERGY_COST)),
        ("load_latency_ratio", (E * T, 0.0, MAX_LATENCY_RATIO)),
        ("load_deadline_probability", (E * T, 0.0, 1.0)),
        ("deviation_table", (T * K * (E + 1), 0.0, MAX_DEVIATION)),
        ("budget_remaining", (T, 0.0, MAX_DEVIATION)),
        ("position", (2, 0.0, 1.0)),
    ])


def observation_slices(layout) -> "OrderedDict[str, slice]":
    out, offset = OrderedDict(), 0
    for key, (size, _, _) in layout.items():
        out[key] = slice(offset, offset + size)
        offset += size
    return out
