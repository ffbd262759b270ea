"""What a policy, a renderer or a test may look at: the current layer of each episode as plain arrays.

Built on demand by numpy gathers from the plan (a step never builds one). Batch-first arrays with leading
axes ``lead`` = (B,), or () for one episode (``index``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LayerView:
    """The current layer of each episode (copies). E experts, K Top-K, N helpers."""

    layer: np.ndarray  # lead, int
    token: np.ndarray  # lead, int
    probs: np.ndarray  # lead + (E,) router probabilities
    topk_idx: np.ndarray  # lead + (K,)
    topk_weight: np.ndarray  # lead + (K,) combine weights
    topk_mask: np.ndarray  # lead + (E,) bool
    deviation_table: np.ndarray  # lead + (K, E+1) kappa_l w_k D_l(S_k, j), model units, column E = skip
    energy_scopes: np.ndarray  # lead + (3, E) J of executing each expert: uplink / comm / system scope
    energy: np.ndarray  # lead + (E,) objective-scope energy, J
    latency: np.ndarray  # lead + (E,) s
    meets_deadline: np.ndarray  # lead + (E,) bool
    layer_weight: np.ndarray  # lead, kappa_l (1 in layer mode)
    budget: np.ndarray  # lead, budget available to this step (weighted units; token mode: may be < 0)
    budget_unit: np.ndarray  # lead, eps_l (layer mode) or the token's / episode's budget
    topk_energy: np.ndarray  # lead, objective-scope energy of the Top-K set, J
    energy_reference: np.ndarray  # lead, the reward's energy unit, J
    channel_gain_db: np.ndarray  # lead + (N,)


def make_view(sim, state, index=None) -> LayerView:
    """The view of every episode of ``state`` (``index=None``) or of episode ``index``."""
    scn = sim.scenario
    b = np.arange(state.batch_size) if index is None else int(index)
    token, layer = state.token[b], state.layer[b]
    c = token - state.chunk_start[b]
    lc = layer if scn.cost_per_layer else 0
    lf = layer if scn.fading_per_layer else 0
    plan = state.plan
    at = (c, layer, b)
    scopes = plan.energy_scopes[c, lc, b]
    topk_idx = plan.topk_idx[at]
    topk_mask = np.zeros(np.shape(topk_idx)[:-1] + (scn.n_experts,), dtype=bool)
    np.put_along_axis(topk_mask, topk_idx, True, axis=-1)
    if scn.budget_mode == "layer":
        budget = unit = scn.layer_budget[layer]
    else:
        budget = scn.span_budget - state.budget_used[b]
        unit = np.full(np.shape(budget), scn.span_budget) if index is None else scn.span_budget
    return LayerView(
        layer=np.array(layer), token=np.array(token), probs=plan.probs[at], topk_idx=topk_idx,
        topk_weight=plan.topk_weight[at], topk_mask=topk_mask, deviation_table=plan.deviation_table[at],
        energy_scopes=scopes, energy=scopes[..., scn.scope_index, :], latency=plan.latency[c, lc, b],
        meets_deadline=plan.meets_deadline[c, lc, b], layer_weight=np.array(scn.layer_weight[layer]),
        budget=np.array(budget), budget_unit=np.array(unit), topk_energy=plan.topk_energy[at],
        energy_reference=plan.energy_reference[at], channel_gain_db=plan.channel_gain_db[c, lf, b])
