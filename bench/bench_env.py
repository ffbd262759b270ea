"""Single-env step rate: ``gym.make("wide_env/WideMoE-v0")`` against ``gym.make("CartPole-v1")``.

    python bench/bench_env.py [--steps 20000] [--repeats 3] [--seed 0]

Both envs run the same number of steps with random actions presampled from their action spaces
(sampling is not timed), resetting whenever an episode ends (resets are timed: they are part of a
rollout). Reported: the best of ``--repeats`` runs in steps/s, and the ratio WIDE / CartPole measured
in this run. Target: ratio >= 0.25.
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


def steps_per_second(env_id: str, steps: int, repeats: int, seed: int, **kwargs) -> float:
    env = gym.make(env_id, **kwargs)
    env.action_space.seed(seed)
    actions = [env.action_space.sample() for _ in range(steps)]
    best = 0.0
    for r in range(repeats):
        env.reset(seed=seed + r)
        t0 = time.perf_counter()
        for action in actions:
            _, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                env.reset()
        best = max(best, steps / (time.perf_counter() - t0))
    env.close()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rows = [("CartPole-v1", steps_per_second("CartPole-v1", args.steps, args.repeats, args.seed))]
    for env_id in ("wide_env/WideMoE-v0", "wide_env/WideMoE-Mixtral-v0", "wide_env/WideMoE-GptOss-v0"):
        rows.append((env_id, steps_per_second(env_id, args.steps, args.repeats, args.seed)))
    cartpole = rows[0][1]
    print(f"# single-env step rate, {args.steps} steps, best of {args.repeats}; numpy {np.__version__}, "
          f"gymnasium {gym.__version__}, python {platform.python_version()}, {platform.machine()}")
    print("| env | steps/s | ratio to CartPole-v1 |")
    print("|---|---:|---:|")
    for env_id, rate in rows:
        print(f"| {env_id} | {rate:,.0f} | {rate / cartpole:.3f} |")
    ratio = rows[1][1] / cartpole
    print(f"\nwide_env/WideMoE-v0 / CartPole-v1 = {ratio:.3f} (target >= 0.25: {'met' if ratio >= 0.25 else 'NOT met'})")


if __name__ == "__main__":
    main()
