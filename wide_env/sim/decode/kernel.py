"""The one implementation of a decoding step, compiled by numba, for every batch size (1 for the single env).

For each episode (row) ``b`` taking part, :func:`run_rows` does, at its current token and layer:

* **evaluate**: energies in the three scopes, executed count, deadline misses and latency of the executed
  mask; each Top-K slot's server (its own expert if executed and on time, else the executed on-time expert of
  least weighted mismatch, or skip when that is smaller; ties to the lowest index); the deviation estimate;
  the budget terms (sim.deviation.budget_overrun's rule); the reward terms; the token's accuracy so far (the
  accuracy rule of :mod:`wide_env.gating.effects`: fold the layer's table rows into the token's accumulator,
  then decide);
* **step** (evaluate, then commit): keep the token's accumulator (and, at its last layer, carry the context
  term to the next token), advance the layer / token / episode, flag episodes whose planned chunk is used up
  (``replan``), and write the next observation;
* **observe**: write the observation of the current position.

Everything else (planning channels and costs, resets) is numpy (:mod:`wide_env.sim.decode.plan`). Numba
compiles one specialisation per argument types; the simulator always passes the same types (read-only plan
views, contiguous arrays), so a process compiles once, and ``cache=True`` keeps the machine code on disk.
"""

from __future__ import annotations

import numpy as np
from numba import njit

EVALUATE, STEP, OBSERVE = 0, 1, 2

#: float outcome fields (``Outcome.values`` columns), in this order
FLOAT_FIELDS = ("reward", "reward_energy", "reward_deviation", "reward_deadline", "reward_accuracy", "energy_j",
                "topk_energy_j", "energy_uplink_j", "energy_comm_j", "energy_system_j", "deviation",
                "weighted_deviation", "deviation_budget", "latency_s", "delta_loss")
#: integer outcome fields (``Outcome.counts`` columns), in this order; the K slots' servers follow them
INT_FIELDS = ("budget_violated", "deadline_misses", "n_executed", "n_lost", "n_kept", "n_replaced", "n_skipped",
              "layer", "token", "accuracy_correct", "accuracy_same", "accuracy_full", "token_complete")
NI = len(INT_FIELDS)

# Packed arrays (one argument each: numba's call overhead grows with the number of arrays passed).
# plan costs (C, Lc, B, 4, E): rows of
UPLINK, COMM, SYSTEM, LATENCY = range(4)
# plan Top-K energies (C, L, B, 2): columns of
TOPK_ENERGY, REFERENCE = range(2)
# state counters (B, 4) int64, amounts (B, 2 + MAX_ACC_DIM) float64, flags (B, 1) bool: columns of
TOKEN, LAYER, CHUNK_START, START = range(4)
BUDGET_USED, CONTEXT, ACC = range(3)  # ACC: the token's accuracy accumulator starts here
MAX_ACC_DIM = 8  # wide_env.gating.effects.MAX_ACC_DIM
DONE = 0
# integer constants, then where the observation's keys start in the flat observation: the gating and step
# keys of OBSERVATION_KEYS, then the planned per-expert keys (wide_env.sim.decode.plan.EXPERT_KEYS)
I_LAYERS, I_TOKENS, I_SPAN, I_ENFORCE, I_SCOPE, I_ACCURACY, I_OBJECTIVE = range(7)
#: ``consts[0][I_OBJECTIVE]``: the deviation budget's penalty (the proxy), or the real loss increase
OBJECTIVE_DEVIATION, OBJECTIVE_ACCURACY = range(2)
#: ``consts[0][I_SPAN]``: what a budget spans; a token or an episode spend one budget over their layer-steps
SPAN_LAYER, SPAN_TOKEN, SPAN_EPISODE = range(3)
I_AT = 7
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
    """Run ``mode`` (EVALUATE, STEP or OBSERVE) on the episodes with ``rows[b]``; returns the number of
    episodes flagged in ``replan`` (their planned chunk is used up: plan it, then OBSERVE them).

    executed (B, E) bool; plan (step-major, see wide_env.sim.decode.plan) = (costs (C, Lc, B, 4, E),
    meets_deadline (C, Lc, B, E), topk (C, L, B, 2), topk_idx (C, L, B, K), deviation_table (C, L, B, K, E+1),
    probs (C, L, B, E) float32, topk_weight (C, L, B, K), obs_gain (C, Lf, B, N) float32, obs_expert
    (C, L, B, P, E) float32 (the planned per-expert keys), effect_rows (C, L, B, K (E+1)) int32 (the accuracy
    table's row of every slot and server), effect_base (C, 1, B, n) float64, full_correct (C, 1, B) bool,
    effect_values (R + 1, D) float64 (the rows)); state = (counters (B, 4), amounts (B, 2 + MAX_ACC_DIM),
    flags (B, 1)); consts = (int64 constants, float64 constants). Outputs: values (B, FLOAT_FIELDS),
    counts (B, INT_FIELDS + K servers), obs (B, D) float32, replan (B,) bool.

    One function (no nested compiled calls): numba compiles it once, in about a second."""
    costs, meets, topk, topk_idx, deviation_table, probs, topk_weight = plan[:7]
    gain, obs_expert, effect_rows, effect_base, full_correct, effect_values = plan[7:]
    counters, amounts, flags = state
    ints, floats = consts
    n_layers, n_tokens, span = ints[I_LAYERS], ints[I_TOKENS], ints[I_SPAN]
    enforce, scope, has_accuracy = ints[I_ENFORCE] != 0, ints[I_SCOPE], ints[I_ACCURACY] != 0
    on_accuracy = ints[I_OBJECTIVE] == OBJECTIVE_ACCURACY
    span_budget, max_deviation = floats[F_SPAN_BUDGET], floats[F_MAX_DEVIATION]
    B, E = executed.shape
    C, K = costs.shape[0], topk_idx.shape[3]
    per_layer_costs, per_layer_fading = costs.shape[1] > 1, gain.shape[1] > 1
    n_acc, n_cand = effect_values.shape[1], effect_base.shape[3]
    # several perturbations of a token add their frozen-routing rows when the table has them (effects.decide)
    has_frozen = n_acc == 2 * n_cand + 2
    acc = np.zeros(MAX_ACC_DIM)
    flagged = 0
    for b in range(B):
        if not rows[b]:
            continue
        if mode != OBSERVE:
            if mode == STEP and flags[b, DONE]:  # a finished episode does not step: a zero outcome
                for i in range(values.shape[1]):
                    values[b, i] = 0.0
                for i in range(counts.shape[1]):
                    counts[b, i] = 0
                continue
            token, l = counters[b, TOKEN], counters[b, LAYER]
            c = token - counters[b, CHUNK_START]
            if c < 0 or c >= C:
                raise IndexError("an episode's token is outside its planned chunk: re-plan it before stepping")
            lc = l if per_layer_costs else 0
            # ---- evaluate: energy is spent by every executed expert, even a late one
            up = comm = system = longest = 0.0
            n_executed = misses = 0
            for e in range(E):
                if executed[b, e]:
                    up += costs[c, lc, b, UPLINK, e]
                    comm += costs[c, lc, b, COMM, e]
                    system += costs[c, lc, b, SYSTEM, e]
                    n_executed += 1
                    if not meets[c, lc, b, e]:
                        misses += 1
                    if costs[c, lc, b, LATENCY, e] > longest:
                        longest = costs[c, lc, b, LATENCY, e]
            # each slot's server: an executed (on-time, when enforced) expert of least mismatch, or skip
            weighted = 0.0
            kept = skipped = 0
            for k in range(K):
                best = np.inf
                best_j = E
                for j in range(E):
                    if executed[b, j] and (meets[c, lc, b, j] or not enforce):
                        v = deviation_table[c, l, b, k, j]
                        if v < best:
                            best = v
                            best_j = j
                if deviation_table[c, l, b, k, E] < best:
                    best = deviation_table[c, l, b, k, E]
                    best_j = E
                weighted += best
                counts[b, NI + k] = best_j
                if best_j == topk_idx[c, l, b, k]:
                    kept += 1
                elif best_j == E:
                    skipped += 1
            energy = up if scope == 0 else (comm if scope == 1 else system)
            # budget terms: violated = exceeds the available budget by > 1e-9 units (deviation.budget_overrun)
            if span != SPAN_LAYER:  # what is left of the token's / episode's budget
                budget = span_budget - amounts[b, BUDGET_USED]
                available = max(budget, 0.0)
                unit = span_budget
            else:
                budget = available = unit = floats[F_LAYER_BUDGET + l]
            excess = max(weighted - available, 0.0)
            violated = excess > 1e-9 * unit
            reward_deviation = -floats[F_DEVIATION_WEIGHT] * (1.0 + excess / unit) if violated else 0.0
            if on_accuracy:  # the proxy's budget is reported, not rewarded
                reward_deviation = 0.0
            reward_energy = -energy / topk[c, l, b, REFERENCE]
            reward_deadline = -floats[F_DEADLINE_WEIGHT] * misses if enforce else 0.0
            # the token's real accuracy with this layer folded in (wide_env.gating.effects): add each slot's
            # table row (zero where the slot is served by its own expert) to the token's accumulator, then
            # decide between the target, the competitors and the rest
            same = correct = full = True
            dloss = 0.0
            if has_accuracy:
                for d in range(n_acc):
                    acc[d] = amounts[b, ACC + d]
                for k in range(K):
                    row = effect_rows[c, l, b, k * (E + 1) + counts[b, NI + k]]
                    for d in range(n_acc):
                        acc[d] += effect_values[row, d]
                off = n_cand + 1 if has_frozen and acc[n_acc - 1] > 1.5 else 0
                full_winner = 0
                for i in range(1, n_cand):
                    if effect_base[c, 0, b, i] > effect_base[c, 0, b, full_winner]:
                        full_winner = i
                winner = 0
                best = -np.inf
                for i in range(n_cand):
                    score = effect_base[c, 0, b, i] + acc[off + i]
                    if i == full_winner:  # the context term: earlier tokens' losses weaken the full prediction
                        score -= floats[F_CONTEXT_WEIGHT] * amounts[b, CONTEXT]
                    if score > best:
                        best = score
                        winner = i
                correct, same, dloss = winner == 0, winner == full_winner, acc[n_cand]
                full = full_correct[c, 0, b]
            # the accuracy objective: the token's real loss increase, when its last layer completes it
            reward_accuracy = -floats[F_ACCURACY_WEIGHT] * dloss if on_accuracy and l == n_layers - 1 else 0.0
            values[b, 0] = reward_energy + reward_deviation + reward_deadline + reward_accuracy
            values[b, 1] = reward_energy
            values[b, 2] = reward_deviation
            values[b, 3] = reward_deadline
            values[b, 4] = reward_accuracy
            values[b, 5] = energy
            values[b, 6] = topk[c, l, b, TOPK_ENERGY]
            values[b, 7] = up
            values[b, 8] = comm
            values[b, 9] = system
            values[b, 10] = weighted / floats[F_LAYER_BUDGET + n_layers + l]
            values[b, 11] = weighted
            values[b, 12] = budget
            values[b, 13] = longest
            values[b, 14] = dloss
            counts[b, 0] = violated
            counts[b, 1] = misses
            counts[b, 2] = n_executed
            counts[b, 3] = misses if enforce else 0
            counts[b, 4] = kept
            counts[b, 5] = K - kept - skipped
            counts[b, 6] = skipped
            counts[b, 7] = l
            counts[b, 8] = token
            counts[b, 9] = correct
            counts[b, 10] = same
            counts[b, 11] = full
            counts[b, 12] = l == n_layers - 1
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
        for k in range(K):
            for j in range(E + 1):
                obs[b, at + k * (E + 1) + j] = min(deviation_table[c, l, b, k, j] / unit, max_deviation)
        at = ints[I_GAIN_AT]
        for i in range(gain.shape[3]):
            obs[b, at + i] = gain[c, lf, b, i]
        fraction = 1.0  # layer mode: the budget of this step is its unit
        if span != SPAN_LAYER:
            fraction = min(max(span_budget - amounts[b, BUDGET_USED], 0.0) / span_budget, max_deviation)
        obs[b, ints[I_BUDGET_AT]] = fraction
        obs[b, ints[I_POSITION_AT]] = l / floats[F_LAYER_DEN]
        obs[b, ints[I_POSITION_AT] + 1] = token / floats[F_TOKEN_DEN]
    return flagged
