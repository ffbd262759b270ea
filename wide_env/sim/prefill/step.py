"""The prefill step rule (numpy, batched): outcomes of executing (token, expert) masks at the current layer.

A late helper (latency > T_max while deadlines are enforced) loses all its pairs; their energy is still spent.
Each token's slots are served by its best executed stand-in or skipped and each token's deviation estimate is
held to its budget: the step rule of :mod:`wide_env.rules`, as in decoding.
"""

from __future__ import annotations

import numpy as np

from wide_env import rules
from wide_env.sim.outcome import Outcome, OutcomeFields
from wide_env.sim.prefill.plan import layer_node_costs, onehot
from wide_env.sim.scenario import Scenario

FIELDS = OutcomeFields(
    ("reward", "reward_energy", "reward_deviation", "reward_deadline", "energy_j", "topk_energy_j", "energy_uplink_j",
     "energy_comm_j", "energy_system_j", "deviation", "deviation_mean", "weighted_deviation", "deviation_budget",
     "latency_s", "cost", "cost_budget", "cost_deadline"),
    ("budget_violated", "deadline_misses", "n_executed", "n_lost", "n_kept", "n_replaced", "n_skipped",
     "n_helpers_used", "layer", "prompt"))


def evaluate(scn: Scenario, view, executed: np.ndarray) -> Outcome:
    """Outcomes of (B, T, E) bool execution masks on ``view`` (a :class:`PrefillView`); no state change."""
    scopes, latency = layer_node_costs(scn, view.channel_gain, view.queue, view.layer, executed)
    late_node = latency > scn.deadline_s * (1.0 + 1e-9)  # (B, N+1)
    expert_node = onehot(scn)[view.layer]  # (B, E, N+1)
    late_expert = (expert_node & late_node[:, None, :]).any(axis=-1)  # (B, E)
    lost = executed & late_expert[:, None, :] if scn.enforce_deadline else np.zeros_like(executed)
    energy_scopes = scopes.sum(axis=-1)  # (B, 3)
    energy = energy_scopes[:, scn.scope_index]
    weighted, server = rules.serve_slots_batch(view.deviation_table, executed & ~lost)  # (B, T), (B, T, K)
    n_kept = (server == view.topk_idx).sum(axis=(-1, -2))
    n_skipped = (server == scn.n_experts).sum(axis=(-1, -2))
    ran = (executed[:, :, :, None] & expert_node[:, None]).any(axis=(1, 2))  # (B, N+1) nodes used
    misses = (ran & late_node).sum(axis=-1)
    available = rules.budget_left_of(view.budget, 0.0)  # view.budget: the span's budget less what was used
    unit = view.budget_unit[:, None]
    violated, overrun = rules.violated_of(weighted, available, unit), rules.overrun_of(weighted, available, unit)
    rw = scn.config.reward
    reward_energy = -energy / view.energy_reference
    reward_deviation = -rw.deviation_weight * overrun.mean(axis=-1)
    reward_deadline = -rw.deadline_weight * misses * scn.enforce_deadline
    deviation = weighted / view.layer_weight[:, None]
    T, K = executed.shape[1], scn.top_k
    reward_accuracy = np.zeros_like(reward_energy)  # prefill has no accuracy objective (rejected at construction)
    # the constraint costs, as in decoding: the tokens' budget excesses in budget units, summed, and the deadline
    # misses while deadlines are enforced; cost is their sum
    cost_budget = np.where(violated, overrun - 1.0, 0.0).sum(axis=-1)
    cost_deadline = (misses * scn.enforce_deadline).astype(np.float64)
    floats = {"reward": rules.compose_reward(reward_energy, reward_deviation, reward_deadline, reward_accuracy),
              "reward_energy": reward_energy, "reward_deviation": reward_deviation, "reward_deadline": reward_deadline,
              "energy_j": energy, "topk_energy_j": view.topk_energy, "energy_uplink_j": energy_scopes[:, 0],
              "energy_comm_j": energy_scopes[:, 1], "energy_system_j": energy_scopes[:, 2],
              "deviation": deviation.max(axis=-1), "deviation_mean": deviation.mean(axis=-1),
              "weighted_deviation": weighted.max(axis=-1), "deviation_budget": view.budget.min(axis=-1),
              "latency_s": np.where(ran, latency, 0.0).max(axis=-1), "cost": cost_budget + cost_deadline,
              "cost_budget": cost_budget, "cost_deadline": cost_deadline}
    ints = {"budget_violated": violated.sum(axis=-1), "deadline_misses": misses,
            "n_executed": executed.sum(axis=(-1, -2)), "n_lost": lost.sum(axis=(-1, -2)), "n_kept": n_kept,
            "n_replaced": T * K - n_kept - n_skipped, "n_skipped": n_skipped,
            "n_helpers_used": ran[:, 1:].sum(axis=-1), "layer": view.layer, "prompt": view.prompt}
    values = np.stack([floats[name] for name in FIELDS.floats], axis=1)
    counts = np.stack([ints[name] for name in FIELDS.ints], axis=1).astype(np.int64)
    return Outcome(values, counts, server, FIELDS, {"token_weighted_deviation": weighted})
