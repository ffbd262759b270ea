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
#: a token's loss in nats beyond which the previous token's loss is clipped (log of the byte vocabulary is 5.5)
MAX_LOSS = 100.0

#: The model-state keys (``gating.model_state = true``, with ``gating.accuracy = "model"``): written by the model
#: backend (:class:`wide_env.envs.model_backend.ModelAccuracy`) from the episode's own decoding stream, after the
#: simulator's keys. At the current layer of the token in progress: the router's entropy over the E experts
#: divided by log E, the margin between its top-1 and top-2 probabilities, the logit-lens confidence (the
#: largest softmax probability of the LM head applied to the residual stream so far); and the loss (nats) of
#: the episode's previous token (0 at its first token).
MODEL_STATE_KEYS = OrderedDict([
    ("router_entropy", (1, 0.0, 1.0)),
    ("router_margin", (1, 0.0, 1.0)),
    ("logit_lens_confidence", (1, 0.0, 1.0)),
    ("previous_loss", (1, 0.0, MAX_LOSS)),
])


def observation_layout(n_experts: int, top_k: int, n_nodes: int,
                       model_state: bool = False) -> "OrderedDict[str, tuple[int, float, float]]":
    """key -> (size, low, high), in the order of the flat observation (``model_state``: the model-state keys
    last)."""
    E, K, N = n_experts, top_k, n_nodes
    layout = OrderedDict([
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
    if model_state:
        layout.update(MODEL_STATE_KEYS)
    return layout


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


# ---- per-key metadata for consumers that route keys generically (agents' networks, analytic policies) ----
#: The axes a key's flat entries run over, row-major: "expert" (E), "node" (N helpers), "slot" (K Top-K
#: slots), "choice" (the E experts, then skip: E + 1), "token" (T prompt tokens), "load" (T: the number of
#: tokens an expert serves), "feature" (the key's own width; a key without expert/token/node axes is global).
#: A new observation key needs an entry here and in OBSERVATION_SCALES.
OBSERVATION_AXES = {
    "gate_probs": ("expert",), "topk_mask": ("expert",), "topk_weight": ("expert",), "channel_gain_db": ("node",),
    "energy_cost": ("expert",), "latency_ratio": ("expert",), "deadline_probability": ("expert",),
    "deviation_table": ("slot", "choice"),
    "budget_remaining": ("feature",), "position": ("feature",),
    **{key: ("feature",) for key in MODEL_STATE_KEYS},
}
PREFILL_OBSERVATION_AXES = {
    "gate_probs": ("token", "expert"), "topk_mask": ("token", "expert"), "topk_weight": ("token", "expert"),
    "channel_gain_db": ("node",), "load_energy_cost": ("expert", "load"), "load_latency_ratio": ("expert", "load"),
    "load_deadline_probability": ("expert", "load"),
    "deviation_table": ("token", "slot", "choice"), "budget_remaining": ("token",), "position": ("feature",),
}
#: The axes of the action (MultiBinary over their product, row-major: prefill is token-major).
ACTION_AXES = ("expert",)
PREFILL_ACTION_AXES = ("token", "expert")
#: How a key's values scale: "fraction" (already in [0, 1]), "ratio" (>= 0, relative to a unit at which 1
#: is the threshold: the Top-K energy, the deadline, the budget), "decibel" (a gain in dB).
OBSERVATION_SCALES = {
    "gate_probs": "fraction", "topk_mask": "fraction", "topk_weight": "fraction", "channel_gain_db": "decibel",
    "energy_cost": "ratio", "latency_ratio": "ratio", "deviation_table": "ratio", "budget_remaining": "ratio",
    "position": "fraction", "load_energy_cost": "ratio", "load_latency_ratio": "ratio",
    "deadline_probability": "fraction", "load_deadline_probability": "fraction",
    "router_entropy": "fraction", "router_margin": "fraction", "logit_lens_confidence": "fraction",
    "previous_loss": "ratio",
}


def axis_lengths(n_experts: int, top_k: int, n_nodes: int, prompt_tokens: int = 1) -> dict[str, int]:
    """The length of every named axis of OBSERVATION_AXES / PREFILL_OBSERVATION_AXES."""
    T = prompt_tokens
    return {"expert": n_experts, "node": n_nodes, "slot": top_k, "choice": n_experts + 1, "token": T, "load": T}


def key_shapes(layout, axes: dict, lengths: dict[str, int]) -> "OrderedDict[str, tuple[int, ...]]":
    """key -> the shape of its entries along its axes ("feature" takes the rest of the key's size)."""
    out = OrderedDict()
    for key, (size, _, _) in layout.items():
        if key not in axes or key not in OBSERVATION_SCALES:
            raise KeyError(f"observation key {key!r} has no axes or scale: declare them in OBSERVATION_AXES (or "
                           f"PREFILL_OBSERVATION_AXES) and OBSERVATION_SCALES of wide_env/sim/observation.py")
        known = 1
        for axis in axes[key]:
            known *= lengths.get(axis, 1)
        shape = tuple(size // known if axis == "feature" else lengths[axis] for axis in axes[key])
        count = 1
        for n in shape:
            count *= n
        if count != size:
            raise ValueError(f"observation key {key!r}: axes {axes[key]} with lengths {shape} do not give its size {size}")
        out[key] = shape
    return out
