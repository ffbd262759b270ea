"""Single-env step rate: ``gym.make("wide_env/WideMoE-v0")`` against ``gym.make("CartPole-v1")``.

    python bench/bench_env.py [--steps 20000] [--repeats 3] [--seed 0] [--clock wall|cpu]

Both envs run the same number of steps with random actions presampled from their action spaces
(sampling is not timed), resetting whenever an episode ends (resets are timed: they are part of a
rollout). The envs' repeats are interleaved so all see the same machine load. Reported: the best of
``--repeats`` runs in steps/s, the ratio of best runs and the median of per-repeat ratios WIDE /
CartPole (steadier on a shared machine). ``--clock cpu`` times the process's CPU time (time.process_time:
steadier than wall time where other jobs share the cores). Targets (issue 22): WideMoE-v0 / CartPole-v1 >= 0.5,
Mixtral and GPT-OSS with their default model accuracy >= 0.15, and Mixtral's model-accuracy rate >= 1/3 of its
rate with the accuracy rule (median of the per-repeat ratios).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import wide_env  # noqa: E402,F401  (registers the ids)


class Runner:
    """One env with presampled actions; ``run()`` times one pass of all steps after a seeded reset."""

    def __init__(self, env_id: str, steps: int, seed: int, **kwargs):
        self.env = gym.make(env_id, **kwargs)
        self.env.action_space.seed(seed)
        self.actions = [self.env.action_space.sample() for _ in range(steps)]
        self.seed = seed
        self.runs = 0

    def run(self, clock=time.perf_counter) -> float:
        env = self.env
        env.reset(seed=self.seed + self.runs)
        self.runs += 1
        t0 = clock()
        for action in self.actions:
            _, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                env.reset()
        return len(self.actions) / (clock() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time (time.perf_counter) or the process's CPU time (time.process_time)")
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    # the deep presets measure accuracy on the model by default (docs/model.md#model-accuracy); with the rule
    # they show the simulator's own speed
    rule = {"config": {"gating": {"accuracy": "rule"}}}
    envs = {"CartPole-v1": ("CartPole-v1", {}), "wide_env/WideMoE-v0": ("wide_env/WideMoE-v0", {})}
    for name in ("Mixtral", "GptOss"):
        env_id = f"wide_env/WideMoE-{name}-v0"
        envs[env_id] = (env_id, {})
        envs[f"{env_id} (accuracy rule)"] = (env_id, rule)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the rule is not validated on the deep presets: measured for speed only
        runners = {label: Runner(env_id, args.steps, args.seed, **kw) for label, (env_id, kw) in envs.items()}
    runs = {label: [] for label in envs}
    for _ in range(args.repeats):  # interleaved, so every env sees the same machine load
        for label in envs:
            runs[label].append(runners[label].run(clock))
    cartpole = np.array(runs["CartPole-v1"])
    print(f"# single-env step rate, {args.steps} steps, {args.repeats} interleaved repeats, {args.clock} time; "
          f"numpy {np.__version__}, "
          f"gymnasium {gym.__version__}, python {platform.python_version()}, {platform.machine()}")
    print("| env | steps/s (best) | ratio to CartPole-v1 (best) | ratio (median of repeats) |")
    print("|---|---:|---:|---:|")
    median = {}
    for label in envs:
        rate = np.array(runs[label])
        median[label] = float(np.median(rate / cartpole))
        print(f"| {label} | {rate.max():,.0f} | {rate.max() / cartpole.max():.3f} | {median[label]:.3f} |")
    best = {label: max(runs[label]) for label in envs}
    print(f"\nus per step (best): wide_env/WideMoE-v0 {1e6 / best['wide_env/WideMoE-v0']:.1f}, "
          f"CartPole-v1 {1e6 / best['CartPole-v1']:.1f}")
    targets = {"wide_env/WideMoE-v0": 0.5, "wide_env/WideMoE-Mixtral-v0": 0.15, "wide_env/WideMoE-GptOss-v0": 0.15}
    print()
    for label, target in targets.items():
        ratio = median[label]
        verdict = "met" if ratio >= target else "NOT met"
        print(f"{label} / CartPole-v1 = {ratio:.3f} median (target >= {target}: {verdict})")
    # the model's cost against the simulator's own: per repeat, model rate / rule rate (the same repeat's load)
    for name, target in (("Mixtral", 1 / 3), ("GptOss", None)):
        env_id = f"wide_env/WideMoE-{name}-v0"
        ratio = float(np.median(np.array(runs[env_id]) / np.array(runs[f"{env_id} (accuracy rule)"])))
        verdict = "" if target is None else f" (target >= 1/3: {'met' if ratio >= target else 'NOT met'})"
        print(f"{env_id} model accuracy / accuracy rule = {ratio:.3f} median of repeats{verdict}")


if __name__ == "__main__":
    main()
