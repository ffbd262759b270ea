"""Planning of prefill: a prompt's gating in every layer, and the load tables of its channel (numpy).

In prefilling the device holds the hidden states of all T prompt tokens at a layer at once, so the tokens
routed to one helper travel together [paper]: helper n receives the ``u_n`` distinct tokens that execute at
least one of its experts (``u_n D`` bits, one uplink within the layer deadline) and returns one output per
executed (token, expert) pair (``p_n D`` bits). A helper runs its ``k_n`` experts one after the other
[choice]: ``k_n t_load`` loading (after its queueing delay, overlapping the uplink) and ``k_n t_comp``
computing (a batch of a few tokens is memory bound: ``t_comp`` per expert per batch). Shapes: B episodes,
T prompt tokens, L layers, E experts, K Top-K, N helpers (node 0 = the device).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, fields

import numpy as np

from wide_env.gating.base import TokenGates
from wide_env.sim.physics import by_expert, energy_reference, node_cost_table, node_costs
from wide_env.sim.scenario import Scenario
from wide_env.sim.units import linear_to_db


@dataclass
class PromptPlan:
    """One prompt in every layer (gating once per prompt; the channel part per prompt, or per layer with
    per-layer fading)."""

    probs: np.ndarray  # (B, L, T, E)
    topk_idx: np.ndarray  # (B, L, T, K)
    topk_weight: np.ndarray  # (B, L, T, K)
    topk_mask: np.ndarray  # (B, L, T, E) bool
    deviation_table: np.ndarray  # (B, L, T, K, E+1) kappa_l w D_l(S, j), weighted model units
    load_energy_scopes: np.ndarray  # (B, L, 3, E, T+1) J of expert e alone on its node with n = 0..T tokens
    load_latency: np.ndarray  # (B, L, E, T+1) s at an idle helper (what the device can count on)
    load_deadline_probability: np.ndarray  # (B, L, E, T+1) P(meeting the deadline | the delays the device knows)
    topk_energy: np.ndarray  # (B, L) objective-scope energy of executing every Top-K pair
    energy_reference: np.ndarray  # (B, L) the reward's energy unit
    queue: np.ndarray  # (B, N+1) s, realised queueing delays (node 0 = device: 0), revealed by the step
    channel_gain: np.ndarray  # (B, N)
    channel_gain_db: np.ndarray  # (B, N)

    def assign(self, rows, other: "PromptPlan") -> None:
        for f in fields(self):
            getattr(self, f.name)[rows] = getattr(other, f.name)

    @classmethod
    def concat(cls, plans: list["PromptPlan"]) -> "PromptPlan":
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in plans]) for f in fields(cls)})


def prompt_gates(scn: Scenario, rng: np.random.Generator, first: np.ndarray, prompt_tokens: int) -> TokenGates:
    """Gating of the T prompt tokens starting at trace positions ``first`` (B,): arrays (B, T, L, ...)."""
    B = first.shape[0]
    positions = (first[:, None] + np.arange(prompt_tokens)[None, :]).reshape(-1)
    g = scn.source.gates(positions, rng)
    lead = (B, prompt_tokens)
    return TokenGates(g.probs.reshape(lead + g.probs.shape[1:]), g.topk_idx.reshape(lead + g.topk_idx.shape[1:]),
                      g.topk_weight.reshape(lead + g.topk_weight.shape[1:]))


def plan_prompt(scn: Scenario, rng: np.random.Generator, channel_gain: np.ndarray, gates: TokenGates,
                known_delays: np.ndarray) -> PromptPlan:
    """Gating tables of a prompt and the load tables of its channel ``channel_gain`` (B, N); ``known_delays``
    (B, N) are the helpers' previous queueing delays."""
    B, L, E = channel_gain.shape[0], scn.n_layers, scn.n_experts
    probs = gates.probs.transpose(0, 2, 1, 3).astype(np.float64)  # (B, L, T, E)
    idx = gates.topk_idx.transpose(0, 2, 1, 3)
    weight = gates.topk_weight.transpose(0, 2, 1, 3).astype(np.float64)
    topk_mask = np.zeros(probs.shape, dtype=bool)
    np.put_along_axis(topk_mask, idx, True, axis=-1)
    table = scn.weighted_mismatch[np.arange(L)[None, :, None, None], idx] * weight[..., None]
    T = probs.shape[2]
    empty = np.zeros((B, L, 3, E, T + 1))
    plan = PromptPlan(probs=probs, topk_idx=idx, topk_weight=weight, topk_mask=topk_mask, deviation_table=table,
                      load_energy_scopes=empty, load_latency=np.zeros((B, L, E, T + 1)),
                      load_deadline_probability=np.zeros((B, L, E, T + 1)), topk_energy=np.zeros((B, L)),
                      energy_reference=np.ones((B, L)), queue=np.zeros((B, scn.n_nodes + 1)),
                      channel_gain=channel_gain, channel_gain_db=linear_to_db(channel_gain))
    plan_channel(scn, rng, plan, channel_gain, known_delays)
    return plan


def plan_channel(scn: Scenario, rng: np.random.Generator, plan: PromptPlan, channel_gain: np.ndarray,
                 known_delays: np.ndarray) -> None:
    """(Re)compute ``plan``'s channel part for gains (B, N): the helpers' queueing delays (drawn after the
    ``known_delays`` (B, N) of the previous prompt, hidden from the observation), the stand-alone load tables
    and the Top-K energies, keeping its gating."""
    link = scn.link
    B, L, T = channel_gain.shape[0], scn.n_layers, plan.probs.shape[2]
    queue = np.zeros((B, scn.n_nodes + 1))
    queue[:, 1:] = scn.queue.sequence(rng, known_delays, 1)[0]
    # stand-alone load tables: expert e alone on an idle node with n = 0..T tokens, (B, T+1, ..., N+1)
    n = np.arange(T + 1, dtype=np.float64)[:, None]
    runs = (n > 0).astype(np.float64)
    c = node_costs(channel_gain[:, None, :], link, uplink_payloads=n, downlink_payloads=n, experts=runs)
    room = link.deadline_s * (1.0 + 1e-9) - runs * link.compute_time_s - c.downlink_time  # for max(t_ul, q + t_load)
    meet = np.where(runs > 0, (c.uplink_time <= room) *
                    scn.queue.below_probability(room - runs * link.load_time_s, known_delays[:, None, :]), 1.0)
    table = node_cost_table(c, link, local_experts=runs[:, 0])  # (B, T+1, 4, N+1)
    local_meet = float(link.load_time_s + link.compute_time_s <= link.deadline_s * (1.0 + 1e-9))
    meet = np.concatenate([np.broadcast_to(np.where(runs > 0, local_meet, 1.0), meet.shape[:-1] + (1,)), meet], -1)
    experts = np.stack([by_expert(table, scn.hosts[l]) for l in range(L)], axis=1)  # (B, L, T+1, 4, E)
    plan.load_energy_scopes = np.ascontiguousarray(experts[..., :3, :].transpose(0, 1, 3, 4, 2))  # (B, L, 3, E, T+1)
    plan.load_latency = np.ascontiguousarray(experts[..., 3, :].transpose(0, 1, 3, 2))  # (B, L, E, T+1)
    plan.load_deadline_probability = np.stack([by_expert(meet, scn.hosts[l]) for l in range(L)],
                                              axis=1).transpose(0, 1, 3, 2).copy()
    layers = np.broadcast_to(np.arange(L), (B, L))
    topk_scopes, _ = layer_node_costs(scn, channel_gain[:, None], queue[:, None], layers, plan.topk_mask)
    plan.topk_energy = topk_scopes[:, :, scn.scope_index].sum(axis=-1)
    plan.energy_reference = energy_reference(plan.topk_energy, plan.load_energy_scopes[:, :, scn.scope_index, :, 1])
    plan.queue, plan.channel_gain, plan.channel_gain_db = queue, channel_gain, linear_to_db(channel_gain)


def layer_node_costs(scn: Scenario, channel_gain, queue, layer, executed):
    """Per-node energy scopes (lead, 3, N+1) and latency (lead, N+1) of executed (token, expert) masks
    (lead, T, E) at layers ``layer`` (lead ints); ``channel_gain`` (lead, N), ``queue`` (lead, N+1)."""
    on_node = executed[..., :, :, None] & onehot(scn)[layer][..., None, :, :]  # lead + (T, E, N+1)
    pairs = on_node.sum(axis=(-3, -2))  # lead + (N+1,)
    tokens = on_node.any(axis=-2).sum(axis=-2)
    experts = on_node.any(axis=-3).sum(axis=-2)
    c = node_costs(channel_gain, scn.link, uplink_payloads=tokens[..., 1:], downlink_payloads=pairs[..., 1:],
                   experts=experts[..., 1:], queue_delay_s=queue[..., 1:])
    table = node_cost_table(c, scn.link, local_experts=experts[..., 0])
    return table[..., :3, :], table[..., 3, :]


def onehot(scn: Scenario) -> np.ndarray:
    """(L, E, N+1) bool: expert e of layer l runs on node n (made once per scenario)."""
    out = _ONEHOT.get(scn)
    if out is None:
        out = np.zeros((scn.n_layers, scn.n_experts, scn.n_nodes + 1), dtype=bool)
        np.put_along_axis(out, scn.hosts[..., None], True, axis=2)
        out.setflags(write=False)
        _ONEHOT[scn] = out
    return out


_ONEHOT: "weakref.WeakKeyDictionary[Scenario, np.ndarray]" = weakref.WeakKeyDictionary()
