"""Vector-env step rate: the native ``WideMoEVectorEnv`` against Gymnasium's ``CartPoleVectorEnv`` and
against ``gym.vector.SyncVectorEnv`` of our own single env.

    python bench/bench_vector.py [--batches 16 256 4096] [--sync-batches 16 256] [--episodes 2] [--repeats 3]

Each env runs the same number of ``step`` calls per batch size (``--episodes`` WIDE episodes, i.e.
``episodes * n_tokens * L`` calls, so autoresets and episode planning are included) with random
actions presampled for the whole batch (not timed), in the default NEXT_STEP autoreset mode. Reported:
calls/s and env-steps/s (= B * calls/s), best of ``--repeats``, and ratios measured in this run.
Targets: native at B = 256 >= 1/4 of CartPole's vector rate and >= 20x our SyncVectorEnv.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import wide_env  # noqa: E402,F401  (registers the ids)

WIDE = "wide_env/WideMoE-v0"


def calls_per_second(make, batch: int, calls: int, repeats: int, seed: int) -> float:
    env = make(batch)
    env.action_space.seed(seed)
    actions = [env.action_space.sample() for _ in range(calls)]
    best = 0.0
    for r in range(repeats):
        env.reset(seed=seed + r)
        t0 = time.perf_counter()
        for action in actions:
            env.step(action)
        best = max(best, calls / (time.perf_counter() - t0))
    env.close()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 256, 4096])
    parser.add_argument("--sync-batches", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    problem = gym.make(WIDE).unwrapped.problem
    calls = args.episodes * problem.n_tokens * problem.n_layers
    makers = {
        "native": lambda b: gym.make_vec(WIDE, num_envs=b, vectorization_mode="vector_entry_point"),
        "cartpole": lambda b: gym.make_vec("CartPole-v1", num_envs=b, vectorization_mode="vector_entry_point"),
        "sync": lambda b: gym.make_vec(WIDE, num_envs=b, vectorization_mode="sync"),
    }
    rate = {}
    for b in sorted(set(args.batches) | set(args.sync_batches)):
        for name in ("native", "cartpole", "sync"):
            if name == "sync" and b not in args.sync_batches:
                continue
            if name != "sync" and b not in args.batches:
                continue
            rate[name, b] = calls_per_second(makers[name], b, calls, args.repeats, args.seed)

    print(f"# vector step rate, {calls} step calls per run ({args.episodes} WIDE episodes of {problem.n_tokens} "
          f"tokens x {problem.n_layers} layers), best of {args.repeats}; numpy {np.__version__}, gymnasium "
          f"{gym.__version__}, python {platform.python_version()}, {platform.machine()}")
    print("| B | env | calls/s | env-steps/s | native / this |")
    print("|---:|---|---:|---:|---:|")
    labels = {"native": "WideMoEVectorEnv (native)", "cartpole": "CartPoleVectorEnv",
              "sync": "SyncVectorEnv(WideMoEEnv)"}
    for (name, b), cps in sorted(rate.items(), key=lambda kv: (kv[0][1], list(labels).index(kv[0][0]))):
        native = rate.get(("native", b))
        ratio = f"{native / cps:.3f}" if native is not None else "-"
        print(f"| {b} | {labels[name]} | {cps:,.1f} | {b * cps:,.0f} | {ratio} |")
    if ("native", 256) in rate and ("cartpole", 256) in rate:
        r = rate["native", 256] / rate["cartpole", 256]
        print(f"\nB=256 native / CartPole = {r:.3f} (target >= 0.25: {'met' if r >= 0.25 else 'NOT met'})")
    if ("native", 256) in rate and ("sync", 256) in rate:
        r = rate["native", 256] / rate["sync", 256]
        print(f"B=256 native / SyncVectorEnv = {r:.1f}x (target >= 20x: {'met' if r >= 20 else 'NOT met'})")


if __name__ == "__main__":
    main()
