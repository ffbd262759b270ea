"""What a policy with hindsight knows about an episode: every planned (token, layer) decision's costs,
deadline outcomes and deviation tables at once (the realised values, not only what an observation shows).
Hindsight oracles (the lower bound of every comparison) and tests read episodes through this."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EpisodeTables:
    """One episode's planned tokens (C of them, from ``first_token``) in all L layers. E experts, K Top-K."""

    first_token: int  # token index of row 0
    energy: np.ndarray  # (C, L, E) J, objective scope, of executing each expert (realised channels)
    energy_scopes: np.ndarray  # (C, L, 3, E) J: uplink / comm / system
    meets_deadline: np.ndarray  # (C, L, E) bool, realised (queueing included)
    deviation_table: np.ndarray  # (C, L, K, E+1) kappa_l w_k D_l(S_k, j), weighted model units, column E = skip
    topk_idx: np.ndarray  # (C, L, K)
    topk_energy: np.ndarray  # (C, L) J
    energy_reference: np.ndarray  # (C, L) J, the reward's energy unit
    layer_budget: np.ndarray  # (L,) eps_l, model units (scaled)
    layer_weight: np.ndarray  # (L,) kappa_l
    span_budget: float  # the token's or the episode's budget (token / episode mode), NaN in layer mode
    budget_mode: str
    enforce_deadline: bool


def episode_tables(sim, state, index: int = 0) -> EpisodeTables:
    """The planned chunk of episode ``index`` of ``state`` (a single env's plan covers its whole episode)."""
    plan, scn = state.plan, sim.scenario
    L = scn.n_layers

    def layers(x):  # (C, Lc, ...) -> (C, L, ...)
        return np.broadcast_to(x, (x.shape[0], L) + x.shape[2:]).copy()

    scopes = layers(plan.energy_scopes[:, :, index])
    return EpisodeTables(
        first_token=int(state.chunk_start[index]), energy=scopes[:, :, scn.scope_index].copy(), energy_scopes=scopes,
        meets_deadline=layers(plan.meets_deadline[:, :, index]), deviation_table=plan.deviation_table[:, :, index].copy(),
        topk_idx=plan.topk_idx[:, :, index].copy(), topk_energy=plan.topk_energy[:, :, index].copy(),
        energy_reference=plan.energy_reference[:, :, index].copy(), layer_budget=np.array(scn.layer_budget),
        layer_weight=np.array(scn.layer_weight), span_budget=scn.span_budget, budget_mode=scn.budget_mode,
        enforce_deadline=scn.enforce_deadline)
