"""Named scenario profiles: nested dicts of config overrides (JSON-able), merged under user overrides.

The three paper profiles take L, E, K, d_model, B, T_max and eps from the SiftMoE paper [paper]; the
expert load and compute times are our estimates [choice]: load = expert weight bytes over PCIe Gen4
(~13 GB/s; the paper's 27 ms Mixtral figure), compute = weight bytes over ~300 GB/s edge-GPU memory
bandwidth (batch-1 decoding is memory bound). ``output_norm`` sets the synthetic mismatch scale so that
the paper's eps is a meaningful fraction of a typical weighted skip deviation [choice].

``tiny`` (the default) replays the trace of the small byte-level MoE the project trains (4 layers,
8 experts, top-2, d_model 64; ``wide_env/models``), so gates, mismatch tables, budgets and accuracy
effects are real; with ``gating.source = "synthetic"`` it uses the synthetic router at the same sizes; its radio and timing numbers are our choices. Like the paper profiles it has no
helper queueing by default (every feasible expert meets the deadline); the registered
``WideMoE-Stragglers-v0`` preset adds 2 ms mean queueing so that deadlines bite.
"""

from __future__ import annotations

from typing import Any

_PROFILES: dict[str, dict[str, Any]] = {
    "tiny": {
        "n_tokens": 16,
        "model": {"n_layers": 4, "n_experts": 8, "top_k": 2, "d_model": 64, "routing": "softmax_topk_renorm"},
        # the shipped trace of the project's own trained byte-level MoE (wide_env/data/moe_trace.npz)
        "gating": {"source": "trace", "output_norm": 1.0, "synthetic_budget": 0.8},
        "radio": {"bandwidth_hz": 1.0e5},
        "compute": {"load_time_s": 0.002, "compute_time_s": 0.0005, "queue_delay_mean_s": 0.0},
        "deadline": {"deadline_s": 0.01},
    },
    "switch-base-8": {
        "n_tokens": 8,
        "model": {"n_layers": 12, "n_experts": 8, "top_k": 1, "d_model": 768, "routing": "softmax_topk_raw"},
        "gating": {"source": "synthetic", "output_norm": 400.0, "synthetic_budget": 200.0},
        "radio": {"bandwidth_hz": 1.0e6},
        "compute": {"load_time_s": 0.0007, "compute_time_s": 0.00003, "queue_delay_mean_s": 0.0},
        "deadline": {"deadline_s": 0.7},
    },
    "mixtral-8x7b": {
        "n_tokens": 4,
        "model": {"n_layers": 32, "n_experts": 8, "top_k": 2, "d_model": 4096, "routing": "softmax_topk_renorm"},
        "gating": {"source": "synthetic", "output_norm": 3.0, "synthetic_budget": 1.5},
        "radio": {"bandwidth_hz": 2.0e6},
        "compute": {"load_time_s": 0.027, "compute_time_s": 0.0012, "queue_delay_mean_s": 0.0},
        "deadline": {"deadline_s": 0.074},
    },
    "gpt-oss-20b": {
        "n_tokens": 4,
        "model": {"n_layers": 24, "n_experts": 32, "top_k": 4, "d_model": 2880, "routing": "softmax_topk_renorm"},
        "gating": {"source": "synthetic", "output_norm": 60.0, "synthetic_budget": 30.0},
        "radio": {"bandwidth_hz": 0.8e6},
        "compute": {"load_time_s": 0.001, "compute_time_s": 0.00005, "queue_delay_mean_s": 0.0},
        "deadline": {"deadline_s": 0.35},
    },
}

PROFILES = _PROFILES
