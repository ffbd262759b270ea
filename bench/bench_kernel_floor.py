"""The memory traffic of the native vector env's layout against the budget a CartPole ratio target leaves: the
step kernel's reads and writes alone, at a large batch.

    python bench/bench_kernel_floor.py [--batches 4096] [--repeats 5]

Interleaved per repeat: ``CartPoleVectorEnv`` steps and a compiled pass that reads every plan, state and
accuracy-table entry the step kernel reads for one step of every episode (the planned tokens in turn, each
through its layers) and writes every output it writes (the outcome's float and integer columns and the
observation, fresh arrays per step, as the env hands them out), with no arithmetic beyond a sum. Reported in ns
per env-step (best of ``--repeats``, CPU time): what the target ratio r to CartPole allows (CartPole's ns / r),
the pass, and their ratio. Issue 22's target at B = 4096: r = 0.25. The pass counts neither planning (about 330
bytes of plan written per row-step, from numpy's physics) nor Python nor the step's arithmetic: a whole step
cannot be cheaper. At small batches the pass's call overhead (numba typing its arguments) dominates; the whole
step's rate is bench/bench_vector.py's.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
from numba import njit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import wide_env  # noqa: E402,F401  (registers the ids)
from wide_env.sim.decode.state import empty_outcome  # noqa: E402

TARGETS = {256: 0.5, 4096: 0.25}  # issue 22


@njit(cache=True, nogil=True)
def memory_pass(costs, meets, topk, topk_idx, probs, topk_weight, gain, obs_expert, effect_rows, effect_base, full,
                effect_values, counters, amounts, c, layer, values, counts, obs):
    """Read what one step of every episode reads (kernel.run_rows's plan entries at planned token ``c`` and
    ``layer``, the accuracy table's skip rows, the state) and write what it writes; returns the sum (kept live)."""
    E, total = probs.shape[3], 0.0
    for b in range(counters.shape[0]):
        s = float(counters[b, 0])
        counters[b, 1] = layer
        for q in range(costs.shape[3]):
            for e in range(E):
                s += costs[c, 0, b, q, e]
        for e in range(E):
            s += meets[c, 0, b, e] + probs[c, layer, b, e]
        for k in range(topk_idx.shape[3]):
            s += topk_idx[c, layer, b, k] + topk_weight[c, layer, b, k]
            s += effect_values[effect_rows[c, layer, b, k * (E + 1) + E], 0]
        s += topk[c, layer, b, 0] + topk[c, layer, b, 1]
        for i in range(gain.shape[3]):
            s += gain[c, 0, b, i]
        for p in range(obs_expert.shape[3]):
            for e in range(E):
                s += obs_expert[c, layer, b, p, e]
        for i in range(effect_base.shape[3]):
            s += effect_base[c, 0, b, i]
        s += full[c, 0, b]
        for i in range(amounts.shape[1]):
            s += amounts[b, i]
        for i in range(values.shape[1]):
            values[b, i] = s + i
        for i in range(counts.shape[1]):
            counts[b, i] = i + c
        for i in range(obs.shape[1]):
            obs[b, i] = s * i
        total += s
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[4096])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    clock = time.process_time
    print("| B | target ratio | CartPole ns | allowed ns (CartPole / target) | the kernel's reads and writes alone, ns "
          "| their share of the allowed |")
    print("|---:|---:|---:|---:|---:|---:|")
    for B in args.batches:
        wide = gym.make_vec("wide_env/WideMoE-v0", num_envs=B, vectorization_mode="vector_entry_point")
        cart = gym.make_vec("CartPole-v1", num_envs=B, vectorization_mode="vector_entry_point")
        steps = wide.unwrapped.sim.n_tokens * wide.unwrapped.sim.n_layers
        cart.action_space.seed(0)
        cart_actions = [cart.action_space.sample() for _ in range(steps)]
        wide.reset(seed=0)
        cart.reset(seed=0)
        batch = wide.unwrapped.episode_batch
        plan, packed = batch.state.kernel_args[:2] if batch.state.kernel_args else batch.sim._kernel_args(batch.state)[:2]
        costs, meets, topk, topk_idx, _, probs, topk_weight, gain, obs_expert, rows, base, full, table = plan
        counters, amounts = packed[0].copy(), packed[1].copy()
        n_obs, L, C = batch.sim.obs_size, batch.sim.n_layers, costs.shape[0]
        best = {"cartpole": np.inf, "floor": np.inf}
        for r in range(args.repeats + 1):  # the first: warm-up (compiling), not counted
            t = clock()
            for a in cart_actions:
                cart.step(a)
            cart_t = (clock() - t) / (steps * B)
            t = clock()
            for s in range(steps):  # the planned tokens in turn, each through its layers (state: scratch copies)
                out = empty_outcome(B, batch.sim.top_k)
                memory_pass(costs, meets, topk, topk_idx, probs, topk_weight, gain, obs_expert, rows, base, full,
                            table, counters, amounts, (s // L) % C, s % L, out.values, out.counts,
                            np.empty((B, n_obs), dtype=np.float32))
            floor_t = (clock() - t) / (steps * B)
            if r:
                for key, value in (("cartpole", cart_t), ("floor", floor_t)):
                    best[key] = min(best[key], value)
        target = TARGETS.get(B, 0.25)
        allowed = best["cartpole"] / target
        print(f"| {B} | {target} | {best['cartpole'] * 1e9:.0f} | {allowed * 1e9:.0f} | {best['floor'] * 1e9:.0f} | "
              f"{best['floor'] / allowed:.2f} |")


if __name__ == "__main__":
    main()
