"""The deviation shield: execute experts back until the layer fits what is left of its deviation budget.

An agent that learns a constrained problem pays in violations while it learns. The shield removes them: before
each decoding step it checks the proposed action with the env's own step rule (:func:`wide_env.rules.serve_slots`
on the current layer's deviation table, :func:`wide_env.rules.budget_left` and :func:`wide_env.rules.violation`,
read from ``env.unwrapped.episode_batch``) and, where the layer would exceed what is left of the budget, adds
the least-energy set of the layer's own Top-K experts that makes it fit.

**What is added, and why the Top-K experts.** A Top-K slot served by its own expert has deviation 0 (its table
entry is 0), whatever the other slots do, so executing the missing Top-K experts always reaches the least
deviation the layer can have; stand-ins only lower it part way and depend on the tables. The search is exact
over the 2^K subsets of the missing on-time Top-K experts (K <= :data:`EXACT_TOP_K`; the shipped profiles have
K <= 4): the shielded action is the proposed one plus the subset of least energy that fits (ties: fewer
experts, then the subset of earlier Top-K slots). An action that already fits is left unchanged. For larger K
the experts are added greedily (each time the one that lowers the deviation most, the cheaper on ties) until
the layer fits: still feasible, not always of least energy. Experts the agent chose are never removed.

**Exactness.** Where executing the whole Top-K set has deviation 0 (no enforced deadline drops a Top-K expert),
the shielded layer never violates: in ``budget.mode`` "token" and "episode" the budget left never goes below
0, so every later layer can still run its Top-K set at deviation 0 and fits; in "layer" mode each layer has its
own budget and the same holds trivially. The test is the kernel's (same table, same allowed experts, same
summation order, same budget left), so it is exact to the bit. With ``deadline.enforce`` a Top-K expert whose
output arrives late cannot serve; the shield then adds only on-time experts (it reads the realised deadline
outcome of this step, as the env does: it acts on the env's side, not the policy's) and, where no subset fits,
the subset of least deviation: violations can then remain, as they would for any policy.

Use :class:`DeviationShield` around a single decoding env and :class:`VectorDeviationShield` around the native
vector env; :func:`shield_actions` is the batched rule both call (the agents' SB3 VecEnv wrapper calls it too).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from wide_env import rules
from wide_env.envs.actions import validate_action
from wide_env.envs.batch import EpisodeBatch

#: the largest Top-K size searched exhaustively (2^K subsets per step); larger K is shielded greedily
EXACT_TOP_K = 10


def decoding_batch(env: Any) -> EpisodeBatch:
    """The episode batch a (wrapped) decoding env drives, or a ValueError saying what the shield needs."""
    batch = getattr(getattr(env, "unwrapped", env), "episode_batch", None)
    sim = getattr(batch, "sim", None)
    if batch is None or not hasattr(sim, "view") or not hasattr(sim, "on_time"):
        raise ValueError(f"the deviation shield needs a wide_env decoding env (gym.make('wide_env/WideMoE-v0') or "
                         f"its vector env), whose unwrapped env has episode_batch; got {env!r}")
    return batch


def shield_actions(batch: EpisodeBatch, executed: np.ndarray) -> np.ndarray:
    """The shielded version of ``executed`` ((B, E) bool, the batch's rows' proposed experts) at each episode's
    current layer: (B, E) bool, a superset of ``executed`` (the module docstring says which)."""
    if batch.state is None:
        raise RuntimeError("call reset() before step(): the shield reads the episodes' current layer")
    sim, state = batch.sim, batch.state
    view = sim.view(state)
    table = view.deviation_table  # (B, K, E+1) the kernel's table (float64 plan entries)
    topk_idx, energy = view.topk_idx, view.energy  # (B, K), (B, E) J in the objective's scope
    available = rules.budget_left_of(view.budget, 0.0)  # the kernel's budget_left(span, used), bitwise
    unit = view.budget_unit
    on_time = sim.on_time(state)  # (B, E) experts whose output may serve their slots at this step
    allowed = executed & on_time
    rows = np.arange(executed.shape[0])
    # the missing Top-K experts that could serve: on time and not executed yet
    addable = on_time[rows[:, None], topk_idx] & ~executed[rows[:, None], topk_idx]  # (B, K)
    K = topk_idx.shape[1]
    if K <= EXACT_TOP_K:
        added = _least_energy_subset(table, allowed, topk_idx, addable, energy, available, unit)
    else:
        added = _greedy_subset(table, allowed, topk_idx, addable, energy, available, unit)
    return executed | added


def _subset_masks(topk_idx: np.ndarray, addable: np.ndarray, n_experts: int) -> np.ndarray:
    """(S = 2^K, B, E) bool: the experts each subset of the Top-K slots adds (bit k = slot k; only addable ones)."""
    B, K = topk_idx.shape
    bits = (np.arange(2 ** K)[:, None] >> np.arange(K)[None, :]) & 1  # (S, K)
    take = bits[:, None, :].astype(bool) & addable[None]  # (S, B, K)
    masks = np.zeros((2 ** K, B, n_experts), dtype=bool)
    s, b, k = np.nonzero(take)
    masks[s, b, topk_idx[b, k]] = True
    return masks


def _least_energy_subset(table, allowed, topk_idx, addable, energy, available, unit) -> np.ndarray:
    """(B, E): per episode the subset of addable Top-K experts that fits at least energy (ties: fewer experts,
    then the lower subset index); where none fits, the one of least deviation (then least energy)."""
    B, E = allowed.shape
    adds = _subset_masks(topk_idx, addable, E)  # (S, B, E); subset 0 adds nothing
    deviation, _ = rules.serve_slots_batch(np.broadcast_to(table, adds.shape[:1] + table.shape), allowed[None] | adds)
    fits = ~rules.violated_of(deviation, available[None], unit[None])  # (S, B)
    cost = (adds * energy[None]).sum(axis=-1)  # (S, B) J added
    count = adds.sum(axis=-1)
    order = np.broadcast_to(np.arange(adds.shape[0])[:, None], fits.shape)
    # lexsort: the last key is the first criterion; among fitting subsets the deviation key is 0
    best = np.lexsort((order, count, cost, np.where(fits, 0.0, deviation), ~fits), axis=0)[0]  # (B,)
    return adds[best, np.arange(B)]


def _greedy_subset(table, allowed, topk_idx, addable, energy, available, unit) -> np.ndarray:
    """(B, E): add addable Top-K experts one at a time (the one lowering the deviation most, the cheaper on
    ties) until the layer fits or nothing is left to add."""
    B, E = allowed.shape
    rows = np.arange(B)
    added = np.zeros((B, E), dtype=bool)
    left = addable.copy()
    for _ in range(topk_idx.shape[1]):
        deviation, _ = rules.serve_slots_batch(table, allowed | added)
        todo = rules.violated_of(deviation, available, unit) & left.any(axis=1)
        if not todo.any():
            break
        trial = np.repeat((allowed | added)[:, None, :], topk_idx.shape[1], axis=1)  # (B, K, E)
        trial[rows[:, None], np.arange(topk_idx.shape[1])[None, :], topk_idx] = True
        dev_k, _ = rules.serve_slots_batch(np.broadcast_to(table[:, None], trial.shape[:2] + table.shape[1:]), trial)
        dev_k = np.where(left, dev_k, np.inf)
        cost_k = energy[rows[:, None], topk_idx]
        pick = np.lexsort((cost_k, dev_k), axis=1)[:, 0]  # (B,)
        b = np.flatnonzero(todo)
        added[b, topk_idx[b, pick[b]]] = True
        left[b, pick[b]] = False
    return added


class DeviationShield(gym.ActionWrapper):
    """A single decoding env whose actions are shielded: the proposed experts, plus the least-energy on-time
    Top-K experts that make the layer fit its budget left (:func:`shield_actions`). ``last_added`` holds the
    experts the shield added at the latest step ((E,) bool)."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self._batch = decoding_batch(env)
        self._shape = (self._batch.sim.n_experts,)
        self.last_added = np.zeros(self._shape, dtype=bool)

    def action(self, action):
        executed = validate_action(action, self._shape, "one 0/1 entry per expert")
        shielded = shield_actions(self._batch, executed)
        self.last_added = (shielded & ~executed)[0]
        return shielded[0].astype(np.int8)


class VectorDeviationShield(gym.vector.VectorActionWrapper):
    """The native decoding vector env with every sub-env's action shielded (as :class:`DeviationShield`);
    ``last_added`` is (B, E) bool."""

    def __init__(self, env: gym.vector.VectorEnv):
        super().__init__(env)
        self._batch = decoding_batch(env)
        self._shape = (self._batch.sim.n_experts,)
        self.last_added = np.zeros((self._batch.num_envs,) + self._shape, dtype=bool)

    def actions(self, actions):
        executed = validate_action(actions, self._shape, "one 0/1 entry per expert", num_envs=self._batch.num_envs)
        shielded = shield_actions(self._batch, executed)
        self.last_added = shielded & ~executed
        return shielded.astype(np.int8)
