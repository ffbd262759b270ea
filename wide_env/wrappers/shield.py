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
from numba import njit

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
    if state.batch_size == 1:  # one episode: scalar indexing is the cheaper gather
        view = sim.view(state, 0)
        table, topk_idx, energy = view.deviation_table[None], view.topk_idx[None], view.energy[None]
        budget, unit = np.atleast_1d(view.budget), np.atleast_1d(view.budget_unit)
    else:
        view = sim.view(state)
        table, topk_idx, energy, budget, unit = (view.deviation_table, view.topk_idx, view.energy, view.budget,
                                                 view.budget_unit)
    out = np.empty_like(executed, dtype=np.bool_)
    _shield_rows(np.ascontiguousarray(table, dtype=np.float64), np.ascontiguousarray(topk_idx, dtype=np.int64),
                 np.ascontiguousarray(energy, dtype=np.float64), sim.on_time(state),
                 np.ascontiguousarray(executed, dtype=np.bool_), np.asarray(budget, dtype=np.float64),
                 np.asarray(unit, dtype=np.float64), EXACT_TOP_K, out)
    return out


@njit(cache=True, nogil=True, error_model="numpy")
def _deviation(table, b, allowed, server) -> float:
    return rules.serve_slots(table, (b,), allowed, server)


@njit(cache=True, nogil=True, error_model="numpy")
def _shield_rows(table, topk_idx, energy, on_time, executed, budget, unit, exact_top_k, out):
    """Per episode b: table (B, K, E+1) the layer's deviation table, topk_idx (B, K), energy (B, E) J, on_time (B, E),
    executed (B, E) the proposal, budget (B,) the budget of this step (span budgets: may be < 0), unit (B,);
    writes out (B, E) = the proposal plus the chosen missing on-time Top-K experts (the module docstring).
    The rule's functions are compiled in; numba's disk cache is keyed on this file, so after editing
    wide_env/rules.py delete ``wide_env/wrappers/__pycache__/shield.*.nb[ic]`` as well as the kernel's."""
    B, K = topk_idx.shape
    E = executed.shape[1]
    allowed = np.empty(E, dtype=np.bool_)
    server = np.empty(K, dtype=np.int64)
    cand = np.empty(K, dtype=np.int64)
    for b in range(B):
        available = rules.budget_left(budget[b], 0.0)  # the kernel's budget_left(span, used), bitwise
        n = 0  # the missing Top-K experts that could serve (on time, not executed), in Top-K order
        for k in range(K):
            e = topk_idx[b, k]
            if on_time[b, e] and not executed[b, e]:
                cand[n] = e
                n += 1
        for e in range(E):
            out[b, e] = executed[b, e]
        if n <= exact_top_k:
            best, best_fits, best_dev, best_cost, best_count = 0, False, np.inf, np.inf, K + 1
            for s in range(1 << n):  # subset s adds candidate i where bit i is set (s = 0: the proposal)
                for e in range(E):
                    allowed[e] = executed[b, e] and on_time[b, e]
                cost = 0.0
                count = 0
                for i in range(n):
                    if (s >> i) & 1:
                        allowed[cand[i]] = True
                        cost += energy[b, cand[i]]
                        count += 1
                dev = _deviation(table, b, allowed, server)
                fits = not rules.violation(dev, available, unit[b])[0]
                if fits and not best_fits:
                    better = True
                elif fits:  # both fit: less energy, then fewer experts (then the lower s: kept)
                    better = cost < best_cost or (cost == best_cost and count < best_count)
                elif best_fits:
                    better = False
                else:  # neither fits: less deviation, then less energy, then fewer experts
                    better = dev < best_dev or (dev == best_dev and (cost < best_cost or
                                                                     (cost == best_cost and count < best_count)))
                if better:
                    best, best_fits, best_dev, best_cost, best_count = s, fits, dev, cost, count
            for i in range(n):
                if (best >> i) & 1:
                    out[b, cand[i]] = True
        else:  # greedy: the candidate lowering the deviation most (the cheaper on ties) until the layer fits
            for e in range(E):
                allowed[e] = executed[b, e] and on_time[b, e]
            left = n
            while left > 0:
                dev = _deviation(table, b, allowed, server)
                if not rules.violation(dev, available, unit[b])[0]:
                    break
                pick, pick_dev = -1, np.inf
                for i in range(n):
                    e = cand[i]
                    if allowed[e]:
                        continue
                    allowed[e] = True
                    trial = _deviation(table, b, allowed, server)
                    allowed[e] = False
                    if trial < pick_dev or (trial == pick_dev and energy[b, e] < energy[b, cand[pick]]):
                        pick, pick_dev = i, trial
                allowed[cand[pick]] = True
                out[b, cand[pick]] = True
                left -= 1


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
