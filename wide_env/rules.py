"""The step rule, once: who serves each Top-K slot, the budget test, the reward sum and the accuracy fold.

Every part of the project that applies the rule calls these functions: the decoding step kernel
(:mod:`wide_env.sim.decode.kernel`, compiled code calling compiled code), the prefill step, the model backend,
the solvers' checkers (SiftMoE, prefill, Pareto, oracle, spanning) and the accuracy rule's numpy reference
(:mod:`wide_env.gating.effects`). The scalar functions are numba ``njit`` (callable from numba and from Python);
the ``*_batch`` / ``*_of`` wrappers only broadcast them over numpy arrays.

* **slot tables**: slot k of a Top-K set (expert S_k, weight w_k) at layer l costs w_k kappa_l D_l(S_k, j) when
  served by j (column E = skip).
* **serve slots** (docs/model.md#deviation-estimate): slot k of a Top-K set, with per-slot table
  ``table[k, j]`` (j = 0..E-1 an expert, column E = skip) and ``allowed`` experts (executed, and on time where
  deadlines are enforced), is served by the allowed expert of least table value, or skipped when skipping is
  smaller; ties go to the lowest index (so an allowed own expert, whose entry is 0, is kept). The deviation is
  the sum of the served entries, slot by slot from 0.0 (every caller sums in this order: bitwise agreement).
* **violation**: a deviation exceeds the available budget by more than ``VIOLATION_RTOL`` budget units.
* **budget left**: what is left of a span's budget, never below 0.
* **reward**: the sum of its terms (energy, deviation, deadline, accuracy), taken once all were written.
* **accuracy fold** (:mod:`wide_env.gating.effects`): add the table rows of a layer's servers to the token's
  accumulator, then decide between the target, the competitors and the rest.

The functions are inlined into the kernel (``inline="always"``; without it the calls cost the kernel about a
quarter of its evaluation time). Numba's on-disk cache of the kernel is keyed on kernel.py only: after editing this
module, delete the caches (``find wide_env -name '*.nb[ic]' -delete``) or the kernel keeps the old rule.
"""

from __future__ import annotations

import numpy as np
from numba import guvectorize, njit, vectorize

#: the violation tolerance, relative to the budget unit (absorbs sums taken in another order)
VIOLATION_RTOL = 1e-9
#: the accuracy accumulator is at most this long (the kernel keeps it in a fixed-size state column block)
MAX_ACC_DIM = 8

_JIT = dict(cache=True, nogil=True, error_model="numpy", inline="always")  # inlined into the step kernel


# ---- serve slots ---------------------------------------------------------------------------------------------
@njit(**_JIT)
def serve_slots(table, at, allowed, server):
    """Serve the K slots of one decision: ``table[at]`` (K, E+1) with ``at`` a tuple of leading indices (() for a
    2-D table; the kernel indexes its plan without making a view), allowed (E,) bool; writes server (K,) (an
    expert index, or E for skip) and returns the summed deviation."""
    K, E = table.shape[-2], allowed.shape[0]
    total = 0.0
    for k in range(K):  # selects, not branches: random actions would mispredict a branch on allowed[j]
        best = np.inf
        best_j = E
        for j in range(E):
            value = table[at + (k, j)]
            better = allowed[j] & (value < best)
            best = value if better else best
            best_j = j if better else best_j
        value = table[at + (k, E)]
        better = value < best
        best = value if better else best
        best_j = E if better else best_j
        total += best
        server[k] = best_j
    return total


@guvectorize(["void(float64[:, :], boolean[:], float64[:], int64[:])"], "(k,w),(e)->(),(k)", cache=True,
             nopython=True)
def _serve_slots_gu(table, allowed, total, server):
    total[0] = serve_slots(table, (), allowed, server)


def serve_slots_batch(table, allowed):
    """:func:`serve_slots` broadcast over leading axes: table lead + (K, E+1), allowed lead + (E,) bool.
    Returns (deviation lead, server lead + (K,) int64)."""
    table = np.asarray(table, dtype=np.float64)
    allowed = np.asarray(allowed, dtype=np.bool_)
    if table.shape[-1] != allowed.shape[-1] + 1:
        raise ValueError(f"a slot table has E + 1 columns: table {table.shape} for allowed {allowed.shape}")
    return _serve_slots_gu(table, allowed)


@njit(**_JIT)
def slot_table(mismatch, layer, topk_idx, topk_weight, at, out):
    """One decision's weighted slot table out (K, E+1): out[k, j] = kappa_l D_l(S_k, j) * w_k, from mismatch
    (L, E, E+1) = kappa_l D_l and the Top-K set / weights ``topk_idx[at]`` / ``topk_weight[at]`` (K,) (``at`` a
    tuple of leading indices, as :func:`serve_slots` takes)."""
    for k in range(out.shape[0]):
        expert, weight = topk_idx[at + (k,)], topk_weight[at + (k,)]
        for j in range(out.shape[1]):
            out[k, j] = mismatch[layer, expert, j] * weight


@guvectorize(["void(float64[:, :, :], int64, int64[:], float64[:], float64[:, :])"], "(l,e,w),(),(k),(k)->(k,w)",
             cache=True, nopython=True)
def _slot_table_gu(mismatch, layer, topk_idx, topk_weight, out):
    slot_table(mismatch, layer, topk_idx, topk_weight, (), out)


def slot_table_batch(mismatch, layer, topk_idx, topk_weight):
    """:func:`slot_table` broadcast over leading axes: layer lead ints, topk_idx / topk_weight lead + (K,) ->
    lead + (K, E+1) float64."""
    return _slot_table_gu(np.asarray(mismatch, dtype=np.float64), np.asarray(layer, dtype=np.int64),
                          np.asarray(topk_idx, dtype=np.int64), np.asarray(topk_weight, dtype=np.float64))


# ---- budget --------------------------------------------------------------------------------------------------
@njit(**_JIT)
def budget_left(budget, used):
    """What is left of a span's budget after ``used`` was spent (never below 0)."""
    return max(budget - used, 0.0)


@njit(**_JIT)
def violation(deviation, available, unit):
    """(violated, overrun): the deviation exceeds the ``available`` budget by more than VIOLATION_RTOL units;
    overrun = 1 + excess / unit where violated (the factor the deviation weight multiplies), else 0."""
    excess = max(deviation - available, 0.0)
    if excess > VIOLATION_RTOL * unit:
        return True, 1.0 + excess / unit
    return False, 0.0


@vectorize(["boolean(float64, float64, float64)"], cache=True)
def violated_of(deviation, available, unit):
    """Elementwise :func:`violation`'s flag (numpy arrays)."""
    return violation(deviation, available, unit)[0]


@vectorize(["float64(float64, float64, float64)"], cache=True)
def overrun_of(deviation, available, unit):
    """Elementwise :func:`violation`'s overrun factor (numpy arrays)."""
    return violation(deviation, available, unit)[1]


@vectorize(["float64(float64, float64)"], cache=True)
def budget_left_of(budget, used):
    """Elementwise :func:`budget_left` (numpy arrays)."""
    return budget_left(budget, used)


# ---- reward --------------------------------------------------------------------------------------------------
#: the reward's terms (outcome fields); the reward is their sum (:func:`compose_reward`)
REWARD_TERMS = ("reward_energy", "reward_deviation", "reward_deadline", "reward_accuracy")


@njit(**_JIT)
def compose_reward(energy, deviation, deadline, accuracy):
    """The reward from its terms (scalars, or numpy arrays of one shape), summed in this order."""
    return energy + deviation + deadline + accuracy


# ---- accuracy fold -------------------------------------------------------------------------------------------
@njit(**_JIT)
def fold_row(acc, values, row):
    """Add one perturbation's table row ``values[row]`` to a token's accumulator ``acc`` in place."""
    for d in range(values.shape[1]):
        acc[d] += values[row, d]


@njit(**_JIT)
def fold_slots(acc, values, slot_rows, server, n_servers):
    """Fold one layer into a token's accumulator, slot by slot: slot k served by ``server[k]`` adds
    ``values[slot_rows[k * n_servers + server[k]]]`` (the zero row where the slot keeps its own expert)."""
    fold_slots_at(acc, values, slot_rows, (), server, n_servers)


@njit(**_JIT)
def fold_slots_at(acc, values, slot_rows, at, server, n_servers):
    """:func:`fold_slots` with the slots' rows ``slot_rows[at]`` (``at`` a tuple of leading indices, as
    :func:`serve_slots` takes: the kernel indexes its plan without making a view)."""
    for k in range(server.shape[0]):
        fold_row(acc, values, slot_rows[at + (k * n_servers + server[k],)])


@njit(**_JIT)
def decide(base, acc, n_acc, context, context_weight):
    """(correct, same_as_full, delta_loss) of a token from its base values (n,) and accumulator ``acc[:n_acc]``
    (``[delta, count]``, or ``[delta, frozen, count]`` with n_acc = 2n + 2; several perturbations use the
    frozen-routing sums); ``context`` lowers the full model's prediction by ``context_weight * context``.
    Ties go to the lower candidate (the target first)."""
    return decide_at(base, (), acc, n_acc, context, context_weight)


@njit(**_JIT)
def decide_at(base, at, acc, n_acc, context, context_weight):
    """:func:`decide` with the base values ``base[at]`` (``at`` a tuple of leading indices)."""
    n_cand = base.shape[-1]
    off = n_cand + 1 if n_acc == 2 * n_cand + 2 and acc[n_acc - 1] > 1.5 else 0
    full_winner = 0
    for i in range(1, n_cand):
        if base[at + (i,)] > base[at + (full_winner,)]:
            full_winner = i
    winner = 0
    best = -np.inf
    for i in range(n_cand):
        score = base[at + (i,)] + acc[off + i]
        if i == full_winner:
            score -= context_weight * context
        if score > best:
            best = score
            winner = i
    return winner == 0, winner == full_winner, acc[n_cand]


@njit(**_JIT)
def fold_batch(acc, values, rows):
    """One layer folded into B tokens' accumulators acc (B, D) in place: rows (B, K) the slots' table rows."""
    for b in range(acc.shape[0]):
        for k in range(rows.shape[1]):
            fold_row(acc[b], values, rows[b, k])


@njit(**_JIT)
def decide_batch(base, acc, context, context_weight, correct, same, delta_loss):
    """:func:`decide` for B tokens: base (B, n), acc (B, D), context (B,); writes the three (B,) outputs."""
    n_acc = acc.shape[1]
    for b in range(acc.shape[0]):
        correct[b], same[b], delta_loss[b] = decide_at(base, (b,), acc[b], n_acc, context[b], context_weight)
