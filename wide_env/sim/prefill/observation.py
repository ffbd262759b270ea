"""The prefill observation (layout in :func:`wide_env.sim.observation.prefill_observation_layout`)."""

from __future__ import annotations

import numpy as np

from wide_env.sim.observation import GAIN_DB_HIGH, GAIN_DB_LOW, MAX_DEVIATION, MAX_ENERGY_COST, MAX_LATENCY_RATIO


def write_observation(view, obs_slices, deadline_s: float, n_layers: int, n_prompts: int, out: np.ndarray) -> None:
    """Flat float32 observations of ``view`` (B episodes) into rows ``out`` (B, D), in layout order."""
    B, T, E = view.probs.shape
    s = obs_slices
    out[:] = 0.0
    out[:, s["gate_probs"]] = np.clip(view.probs, 0.0, 1.0).reshape(B, -1)
    out[:, s["topk_mask"]] = view.topk_mask.reshape(B, -1)
    w = np.zeros((B, T, E))
    np.put_along_axis(w, view.topk_idx, view.topk_weight, axis=-1)
    out[:, s["topk_weight"]] = np.clip(w, 0.0, 1.0).reshape(B, -1)
    out[:, s["channel_gain_db"]] = np.clip(view.channel_gain_db, GAIN_DB_LOW, GAIN_DB_HIGH)
    cost = view.load_energy[:, :, 1:] / view.energy_reference[:, None, None]
    out[:, s["load_energy_cost"]] = np.clip(cost, 0.0, MAX_ENERGY_COST).reshape(B, -1)
    out[:, s["load_latency_ratio"]] = np.clip(view.load_latency[:, :, 1:] / deadline_s, 0.0, MAX_LATENCY_RATIO).reshape(B, -1)
    out[:, s["load_deadline_probability"]] = view.load_deadline_probability[:, :, 1:].reshape(B, -1)
    dev = view.deviation_table / view.budget_unit[:, None, None, None]
    out[:, s["deviation_table"]] = np.clip(dev, 0.0, MAX_DEVIATION).reshape(B, -1)
    out[:, s["budget_remaining"]] = np.clip(view.budget / view.budget_unit[:, None], 0.0, MAX_DEVIATION)
    pos = s["position"].start
    out[:, pos] = view.layer / max(n_layers - 1, 1)
    out[:, pos + 1] = view.prompt / max(n_prompts - 1, 1)
