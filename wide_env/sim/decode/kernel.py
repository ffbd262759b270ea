"""The one implementation of a decoding step, compiled by numba, for every batch size (1 for the single env).

For each episode (row) ``b`` taking part, :func:`run_rows` does, at its current token and layer:

* **evaluate**: energies in the three scopes, executed count, deadline misses and latency of the executed
  mask; then the step rule of :mod:`wide_env.rules`: each Top-K slot's server and the deviation estimate,
  the budget terms, the reward terms and their sum, the token's accuracy so far (fold the layer's table rows
  into the token's accumulator, then decide);
* **step** (evaluate, then commit): keep the token's accumulator (and, at its last layer, carry the context
  term to the next token), advance the layer / token / episode, flag episodes whose planned chunk is used up
  (``replan``), and write the next observation;
* **observe**: write the observation of the current position (:func:`observe_rows`, after the step's loop).

Everything else (planning channels and costs, resets) is numpy (:mod:`wide_env.sim.decode.plan`). Numba
compiles one specialisation per argument types; the simulator always passes the same types (read-only plan
views, contiguous arrays), so a process compiles once, and ``cache=True`` keeps the machine code on disk.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from wide_env import rules
from wide_env.rules import MAX_ACC_DIM
from wide_env.models.fused_math import prefetch
from wide_env.sim.decode.kernel_table import WIDTH, view1, view2, view3, view4, view5

#: ADVANCE = STEP without writing the next observations (a model backend routes the next layer first)
EVALUATE, STEP, OBSERVE, ADVANCE = 0, 1, 2, 3

#: float outcome fields (``Outcome.values`` columns), in this order
FLOAT_FIELDS = ("reward", "reward_energy", "reward_deviation", "reward_deadline", "reward_accuracy", "energy_j",
                "topk_energy_j", "energy_uplink_j", "energy_comm_j", "energy_system_j", "deviation",
                "weighted_deviation", "deviation_budget", "latency_s", "cost", "cost_budget", "cost_deadline",
                "delta_loss")
#: integer outcome fields (``Outcome.counts`` columns), in this order; the K slots' servers follow them
INT_FIELDS = ("budget_violated", "deadline_misses", "n_executed", "n_lost", "n_kept", "n_replaced", "n_skipped",
              "layer", "token", "accuracy_correct", "accuracy_same", "accuracy_full", "token_complete")
NI = len(INT_FIELDS)
# column indices, derived from the names (numba reads module globals as constants)
(V_REWARD, V_REWARD_ENERGY, V_REWARD_DEVIATION, V_REWARD_DEADLINE, V_REWARD_ACCURACY, V_ENERGY, V_TOPK_ENERGY,
 V_ENERGY_UPLINK, V_ENERGY_COMM, V_ENERGY_SYSTEM, V_DEVIATION, V_WEIGHTED_DEVIATION, V_DEVIATION_BUDGET, V_LATENCY,
 V_COST, V_COST_BUDGET, V_COST_DEADLINE, V_DELTA_LOSS) = (FLOAT_FIELDS.index(name) for name in (
    "reward", "reward_energy", "reward_deviation", "reward_deadline", "reward_accuracy", "energy_j", "topk_energy_j",
    "energy_uplink_j", "energy_comm_j", "energy_system_j", "deviation", "weighted_deviation", "deviation_budget",
    "latency_s", "cost", "cost_budget", "cost_deadline", "delta_loss"))
(C_BUDGET_VIOLATED, C_DEADLINE_MISSES, C_N_EXECUTED, C_N_LOST, C_N_KEPT, C_N_REPLACED, C_N_SKIPPED, C_LAYER, C_TOKEN,
 C_ACCURACY_CORRECT, C_ACCURACY_SAME, C_ACCURACY_FULL, C_TOKEN_COMPLETE) = (INT_FIELDS.index(name) for name in (
    "budget_violated", "deadline_misses", "n_executed", "n_lost", "n_kept", "n_replaced", "n_skipped", "layer",
    "token", "accuracy_correct", "accuracy_same", "accuracy_full", "token_complete"))

# Packed arrays (one argument each: numba's call overhead grows with the number of arrays passed).
# plan costs (C, Lc, B, 4, E): rows of
UPLINK, COMM, SYSTEM, LATENCY = range(4)
# plan Top-K energies (C, L, B, 2): columns of
TOPK_ENERGY, REFERENCE = range(2)
# state counters (B, 4) int64, amounts (B, 2 + MAX_ACC_DIM) float64, flags (B, 1) bool: columns of
TOKEN, LAYER, CHUNK_START, START = range(4)
BUDGET_USED, CONTEXT, ACC = range(3)  # ACC: the token's accuracy accumulator starts here
DONE = 0
# integer constants, then where the observation's keys start in the flat observation: the gating and step
# keys of OBSERVATION_KEYS, then the planned per-expert keys (wide_env.sim.decode.plan.EXPERT_KEYS)
I_LAYERS, I_TOKENS, I_SPAN, I_ENFORCE, I_SCOPE, I_ACCURACY, I_OBJECTIVE, I_COMPOSE = range(8)
#: ``consts[0][I_COMPOSE]``: 1 = the kernel sums the reward; 0 = a model backend writes terms after the kernel,
#: and the batch sums the reward then (wide_env.envs.batch)
#: ``consts[0][I_OBJECTIVE]``: the deviation budget's penalty (the proxy), or the real loss increase
OBJECTIVE_DEVIATION, OBJECTIVE_ACCURACY = range(2)
#: ``consts[0][I_SPAN]``: what a budget spans; a token or an episode spend one budget over their layer-steps
SPAN_LAYER, SPAN_TOKEN, SPAN_EPISODE = range(3)
I_AT = 8
#: the observation keys the kernel writes besides the planned per-expert ones
OBSERVATION_KEYS = ("gate_probs", "topk_mask", "topk_weight", "deviation_table", "channel_gain_db",
                    "budget_remaining", "position")
I_PROBS_AT, I_MASK_AT, I_WEIGHT_AT, I_DEVIATION_AT, I_GAIN_AT, I_BUDGET_AT, I_POSITION_AT = \
    range(I_AT, I_AT + len(OBSERVATION_KEYS))
I_EXPERT_AT = I_AT + len(OBSERVATION_KEYS)  # one start per planned per-expert key
# float constants: scalars, then eps_l (L values), kappa_l (L values), the observation's budget unit (L values)
(F_SPAN_BUDGET, F_DEVIATION_WEIGHT, F_DEADLINE_WEIGHT, F_ACCURACY_WEIGHT, F_LAYER_DEN, F_TOKEN_DEN, F_MAX_DEVIATION,
 F_CONTEXT_DECAY, F_CONTEXT_WEIGHT) = range(9)
F_LAYER_BUDGET = 9


@njit(cache=True, nogil=True, error_model="numpy")
def run_rows(mode, rows, executed, plan, state, consts, values, counts, obs, replan):
    """Run ``mode`` (EVALUATE, STEP, ADVANCE or OBSERVE) on the episodes with ``rows[b]``; returns the number of
    episodes flagged in ``replan`` (their planned chunk is used up: plan it, then OBSERVE them).

    executed (B, E) bool; plan (step-major, see wide_env.sim.decode.plan) = (costs (C, Lc, B, 4, E),
    meets_deadline (C, Lc, B, E), topk (C, L, B, 2), topk_idx (C, L, B, K), weighted_mismatch (L, E, E+1) (each
    decision's deviation table is derived from it, the Top-K set and the weights),
    probs (C, L, B, E) float32, topk_weight (C, L, B, K), obs_gain (C, Lf, B, N) float32, obs_expert
    (C, L, B, P, E) float32 (the planned per-expert keys), effect_rows (C, L, B, K (E+1)) int32 (the accuracy
    table's row of every slot and server), effect_base (C, 1, B, n) float64, full_correct (C, 1, B) bool,
    effect_values (R + 1, D) float64 (the rows)); state = (counters (B, 4), amounts (B, 2 + MAX_ACC_DIM),
    flags (B, 1)); consts = (int64 constants, float64 constants). Outputs: values (B, FLOAT_FIELDS),
    counts (B, INT_FIELDS + K servers), obs (B, D) float32, replan (B,) bool.

    The rule's functions (wide_env.rules) are compiled into it: numba compiles it once per process (or loads
    it from its cache)."""
    costs, meets, topk, topk_idx, mismatch, _, topk_weight = plan[:7]  # probs and the rest: observe_rows's
    effect_rows, effect_base, full_correct, effect_values = plan[9:]
    counters, amounts, flags = state
    ints, floats = consts
    n_layers, n_tokens, span = ints[I_LAYERS], ints[I_TOKENS], ints[I_SPAN]
    enforce, scope, has_accuracy = ints[I_ENFORCE] != 0, ints[I_SCOPE], ints[I_ACCURACY] != 0
    on_accuracy, composes = ints[I_OBJECTIVE] == OBJECTIVE_ACCURACY, ints[I_COMPOSE] != 0
    span_budget = floats[F_SPAN_BUDGET]
    B, E = executed.shape
    C, K = costs.shape[0], topk_idx.shape[3]
    per_layer_costs = costs.shape[1] > 1
    n_acc = effect_values.shape[1]
    acc = np.zeros(MAX_ACC_DIM)
    allowed = np.empty(E, dtype=np.bool_)
    server = np.empty(K, dtype=np.int64)
    deviation_table = np.empty((K, E + 1))  # the decision's slot table (rules.slot_table; the plan's is not read)
    if mode == OBSERVE:
        observe_rows(rows, plan[3], plan[4], plan[5], plan[6], plan[7], plan[8], state[0], state[1], consts[0],
                     consts[1], deviation_table, obs)
        return 0
    flagged = 0
    # STEP: the rows observed after the loop; a copy of ``rows`` once a row is not (finished, or re-planned)
    observed, copied = rows, False
    flat_values = effect_values.reshape(-1)
    for b in range(B):
        ahead = b + FOLD_AHEAD
        if has_accuracy and ahead < B:
            # fetch the accuracy table's rows of that episode's Top-K slots skipped (a hint: no effect on results).
            # The table (a row per trace position, layer, slot and server) is read at random, and its folds were the
            # kernel's costliest misses (a sixth of a B = 256 step). Only the skip rows: a slot's own expert reads
            # the zero row, and fetching every executed expert's row as well made the step slower. Written out here:
            # a helper function taking the arrays would add their reference counting (atomic) at every row.
            ca = counters[ahead, TOKEN] - counters[ahead, CHUNK_START]
            if 0 <= ca < C:
                la = counters[ahead, LAYER]
                for k in range(K):
                    prefetch(flat_values, effect_rows[ca, la, ahead, k * (E + 1) + E] * n_acc)
        if not rows[b]:
            continue
        if mode != EVALUATE and flags[b, DONE]:  # a finished episode does not step: a zero outcome
            for i in range(values.shape[1]):
                values[b, i] = 0.0
            for i in range(counts.shape[1]):
                counts[b, i] = 0
            if not copied:
                observed, copied = rows.copy(), True
            observed[b] = False
            continue
        token, l = counters[b, TOKEN], counters[b, LAYER]
        c = token - counters[b, CHUNK_START]
        if c < 0 or c >= C:
            raise IndexError("an episode's token is outside its planned chunk: re-plan it before stepping")
        lc = l if per_layer_costs else 0
        # ---- evaluate: energy is spent by every executed expert, even a late one
        up = comm = system = longest = 0.0
        n_executed = misses = 0
        for e in range(E):  # branch-free (random actions would mispredict every branch on them)
            run = executed[b, e]
            on_time = meets[c, lc, b, e]
            up += costs[c, lc, b, UPLINK, e] if run else 0.0
            comm += costs[c, lc, b, COMM, e] if run else 0.0
            system += costs[c, lc, b, SYSTEM, e] if run else 0.0
            longest = max(longest, costs[c, lc, b, LATENCY, e] if run else 0.0)
            n_executed += run
            misses += run & (not on_time)
            allowed[e] = run & (on_time | (not enforce))  # serves its slots: executed, on time when enforced
        # each slot's server and the deviation (the serve rule)
        rules.slot_table(mismatch, l, topk_idx, topk_weight, (c, l, b), deviation_table)
        weighted = rules.serve_slots(deviation_table, (), allowed, server)
        kept = skipped = 0
        for k in range(K):
            if server[k] == topk_idx[c, l, b, k]:
                kept += 1
            elif server[k] == E:
                skipped += 1
        energy = up if scope == 0 else (comm if scope == 1 else system)
        if span != SPAN_LAYER:  # what is left of the token's / episode's budget
            budget = span_budget - amounts[b, BUDGET_USED]
            available = rules.budget_left(span_budget, amounts[b, BUDGET_USED])
            unit = span_budget
        else:
            budget = available = unit = floats[F_LAYER_BUDGET + l]
        violated, overrun = rules.violation(weighted, available, unit)
        reward_deviation = -floats[F_DEVIATION_WEIGHT] * overrun
        if on_accuracy:  # the proxy's budget is reported, not rewarded
            reward_deviation = 0.0
        reward_energy = -energy / topk[c, l, b, REFERENCE]
        reward_deadline = -floats[F_DEADLINE_WEIGHT] * misses if enforce else 0.0
        # the token's real accuracy with this layer folded in (the accuracy rule, wide_env.rules)
        same = correct = full = True
        dloss = 0.0
        if has_accuracy:
            for d in range(n_acc):
                acc[d] = amounts[b, ACC + d]
            rules.fold_slots_at(acc, effect_values, effect_rows, (c, l, b), server, E + 1)
            correct, same, dloss = rules.decide_at(effect_base, (c, 0, b), acc, n_acc, amounts[b, CONTEXT],
                                                floats[F_CONTEXT_WEIGHT])
            full = full_correct[c, 0, b]
        # the accuracy objective: the token's real loss increase, when its last layer completes it
        reward_accuracy = -floats[F_ACCURACY_WEIGHT] * dloss if on_accuracy and l == n_layers - 1 else 0.0
        if composes or mode == EVALUATE:  # else the batch sums the reward once the model backend wrote its terms
            values[b, V_REWARD] = rules.compose_reward(reward_energy, reward_deviation, reward_deadline,
                                                       reward_accuracy)
        values[b, V_REWARD_ENERGY] = reward_energy
        values[b, V_REWARD_DEVIATION] = reward_deviation
        values[b, V_REWARD_DEADLINE] = reward_deadline
        values[b, V_REWARD_ACCURACY] = reward_accuracy
        values[b, V_ENERGY] = energy
        values[b, V_TOPK_ENERGY] = topk[c, l, b, TOPK_ENERGY]
        values[b, V_ENERGY_UPLINK] = up
        values[b, V_ENERGY_COMM] = comm
        values[b, V_ENERGY_SYSTEM] = system
        values[b, V_DEVIATION] = weighted / floats[F_LAYER_BUDGET + n_layers + l]
        values[b, V_WEIGHTED_DEVIATION] = weighted
        values[b, V_DEVIATION_BUDGET] = budget
        values[b, V_LATENCY] = longest
        values[b, V_DELTA_LOSS] = dloss
        # the constraint costs (Safety-Gymnasium style): the budget's excess in budget units (overrun - 1
        # where violated), the deadline misses while deadlines are enforced; cost is their sum
        cost_budget = overrun - 1.0 if violated else 0.0
        cost_deadline = float(misses) if enforce else 0.0
        values[b, V_COST] = cost_budget + cost_deadline
        values[b, V_COST_BUDGET] = cost_budget
        values[b, V_COST_DEADLINE] = cost_deadline
        counts[b, C_BUDGET_VIOLATED] = violated
        counts[b, C_DEADLINE_MISSES] = misses
        counts[b, C_N_EXECUTED] = n_executed
        counts[b, C_N_LOST] = misses if enforce else 0
        counts[b, C_N_KEPT] = kept
        counts[b, C_N_REPLACED] = K - kept - skipped
        counts[b, C_N_SKIPPED] = skipped
        counts[b, C_LAYER] = l
        counts[b, C_TOKEN] = token
        counts[b, C_ACCURACY_CORRECT] = correct
        counts[b, C_ACCURACY_SAME] = same
        counts[b, C_ACCURACY_FULL] = full
        counts[b, C_TOKEN_COMPLETE] = l == n_layers - 1
        for k in range(K):
            counts[b, NI + k] = server[k]
        if mode == EVALUATE:
            continue
        # ---- commit: accuracy bookkeeping, then advance to the next layer / token / episode end
        for d in range(n_acc):
            amounts[b, ACC + d] = acc[d]
        if span != SPAN_LAYER:
            amounts[b, BUDGET_USED] += weighted
        if l + 1 < n_layers:
            counters[b, LAYER] = l + 1
        elif token + 1 >= n_tokens:
            flags[b, DONE] = True  # the layer stays at L-1: the final observation repeats the last layer
        else:
            counters[b, LAYER] = 0
            counters[b, TOKEN] = token + 1
            if span == SPAN_TOKEN:
                amounts[b, BUDGET_USED] = 0.0
            if has_accuracy:  # the context term carried to the next token; a fresh accumulator
                amounts[b, CONTEXT] = floats[F_CONTEXT_DECAY] * amounts[b, CONTEXT] + max(dloss, 0.0)
                for d in range(n_acc):
                    amounts[b, ACC + d] = 0.0
            if token + 1 - counters[b, CHUNK_START] >= C:
                replan[b] = True
                flagged += 1
                if not copied:
                    observed, copied = rows.copy(), True
                observed[b] = False
                continue
    if mode == STEP:
        observe_rows(observed, topk_idx, mismatch, plan[5], topk_weight, plan[7], plan[8], counters, amounts,
                     ints, floats, deviation_table, obs)
    return flagged


#: rows ahead whose accuracy-table rows the step fetches into the cache while it computes this one
FOLD_AHEAD = 6


@njit(cache=True, nogil=True, error_model="numpy")
def observe_rows(rows, topk_idx, mismatch, probs, topk_weight, gain, obs_expert, counters, amounts, ints, floats,
                 deviation_table, obs):
    """Write the observation of the current position of the episodes with ``rows[b]`` into obs (B, D) float32
    (the plan's, state's and constants' arrays it reads, as :func:`run_rows` has them; deviation_table (K, E+1)
    scratch for a decision's slot table). A function of its own, called once per kernel run after the step's loop
    (compiled apart from it: a B = 4096 vector step took about 4% less time than with both in one loop)."""
    n_layers, span = ints[I_LAYERS], ints[I_SPAN]
    span_budget, max_deviation = floats[F_SPAN_BUDGET], floats[F_MAX_DEVIATION]
    C, E, K = probs.shape[0], probs.shape[3], topk_idx.shape[3]
    per_layer_fading = gain.shape[1] > 1
    for b in range(rows.shape[0]):
        if not rows[b]:
            continue
        # ---- observe the current position: the gating entries (probabilities, Top-K mask and weights,
        # deviation table over the budget unit), the planned channel entries, the budget left, the position;
        # every key of the layout, clipped to its box
        token, l = counters[b, TOKEN], counters[b, LAYER]
        c = token - counters[b, CHUNK_START]
        if c < 0 or c >= C:
            raise IndexError("an episode's token is outside its planned chunk: re-plan it before observing")
        lf = l if per_layer_fading else 0
        at, mask_at, weight_at = ints[I_PROBS_AT], ints[I_MASK_AT], ints[I_WEIGHT_AT]
        for e in range(E):
            obs[b, at + e] = probs[c, l, b, e]
            obs[b, mask_at + e] = 0.0
            obs[b, weight_at + e] = 0.0
        for p in range(obs_expert.shape[3]):
            at = ints[I_EXPERT_AT + p]
            for e in range(E):
                obs[b, at + e] = obs_expert[c, l, b, p, e]
        for k in range(K):
            obs[b, mask_at + topk_idx[c, l, b, k]] = 1.0
            obs[b, weight_at + topk_idx[c, l, b, k]] = min(topk_weight[c, l, b, k], 1.0)
        at = ints[I_DEVIATION_AT]
        unit = floats[F_LAYER_BUDGET + 2 * n_layers + l]
        rules.slot_table(mismatch, l, topk_idx, topk_weight, (c, l, b), deviation_table)
        for k in range(K):
            for j in range(E + 1):
                obs[b, at + k * (E + 1) + j] = min(deviation_table[k, j] / unit, max_deviation)
        at = ints[I_GAIN_AT]
        for i in range(gain.shape[3]):
            obs[b, at + i] = gain[c, lf, b, i]
        fraction = 1.0  # layer mode: the budget of this step is its unit
        if span != SPAN_LAYER:
            fraction = min(rules.budget_left(span_budget, amounts[b, BUDGET_USED]) / span_budget, max_deviation)
        obs[b, ints[I_BUDGET_AT]] = fraction
        obs[b, ints[I_POSITION_AT]] = l / floats[F_LAYER_DEN]
        obs[b, ints[I_POSITION_AT] + 1] = token / floats[F_TOKEN_DEN]


@njit(cache=True, nogil=True, error_model="numpy")
def run_table(mode, executed, obs, t):
    """:func:`run_rows` (``mode``, executed (B, E) bool, obs (B, D) float32) on the arrays of table ``t``
    (wide_env.sim.decode.kernel_table: the plan's 13, the state's 3, the 2 constants, rows, the outcome's values and
    counts, the replan flags); returns what run_rows returns."""
    plan = (view5(t, 0, np.float64), view4(t, 1, np.bool_), view4(t, 2, np.float64), view4(t, 3, np.int64),
            view3(t, 4, np.float64), view4(t, 5, np.float32), view4(t, 6, np.float64), view4(t, 7, np.float32),
            view5(t, 8, np.float32), view4(t, 9, np.int32), view4(t, 10, np.float64), view3(t, 11, np.bool_),
            view2(t, 12, np.float64))
    state = (view2(t, 13, np.int64), view2(t, 14, np.float64), view2(t, 15, np.bool_))
    consts = (view1(t, 16, np.int64), view1(t, 17, np.float64))
    return run_rows(mode, view1(t, 18, np.bool_), executed, plan, state, consts, view2(t, 19, np.float64),
                    view2(t, 20, np.int64), obs, view1(t, 21, np.bool_))


_TABLE_ENTRY: list = []  # run_table's compiled entry for the usual argument types, once compiled or loaded


def table_entry():
    """:func:`run_table`'s compiled entry for an int mode, the usual step buffers (executed (B, E) bool and obs (B, D)
    float32, C-contiguous and writeable: wide_env.sim.decode.kernel_entry.usual_step_buffers) and a table of
    wide_env.sim.decode.kernel_table.table_of; None where numba's JIT is disabled (no compiled code to rebuild the
    arrays in: the caller steps through run_rows)."""
    if not _TABLE_ENTRY:
        if not hasattr(run_table, "compile"):  # NUMBA_DISABLE_JIT=1: a plain function
            return None
        usual = (STEP, np.zeros((1, 1), dtype=np.bool_), np.zeros((1, 1), dtype=np.float32),
                 np.zeros((1, WIDTH), dtype=np.int64))
        _TABLE_ENTRY.append(run_table.compile(tuple(run_table.typeof_pyval(a) for a in usual)))
    return _TABLE_ENTRY[0]
