"""A user's script on a model-accuracy preset with torch's default thread count against one with
``torch.set_num_threads(1)``: the model backend limits torch's threads around its own calls, so the two should
step at the same rate (issue 22: it was 50x slower with the default threads on a 2-core machine).

    python bench/bench_threads.py [--envs Mixtral GptOss] [--steps 3000] [--repeats 3]

Each setting runs in its own process (torch's thread count is process-wide): ``gym.make(env id)``, a seeded
reset, ``--steps`` untimed warm-up steps (numba, the trace windows' first full-model runs), then ``--steps``
timed steps with presampled random actions, resetting at episode ends. Processes of the two settings alternate,
``--repeats`` times. Reported: steps/s (best), and default / one thread (median of per-repeat ratios).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time, warnings
sys.path.insert(0, {root!r})
import gymnasium as gym, torch
import wide_env
if {one}:
    torch.set_num_threads(1)
env = gym.make({env_id!r})
env.action_space.seed(0)
actions = [env.action_space.sample() for _ in range(2 * {steps})]
env.reset(seed=0)
for i, a in enumerate(actions):
    if i == {steps}:
        t0 = time.perf_counter()
    _, _, terminated, truncated, _ = env.step(a)
    if terminated or truncated:
        env.reset()
print(json.dumps({{"rate": {steps} / (time.perf_counter() - t0), "threads": torch.get_num_threads()}}))
"""


def child_json(code: str) -> dict:
    """Run ``code`` in a fresh Python process (from the repository root) and return the JSON of its last line."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"}, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def default_vs_one(measure, repeats: int) -> tuple[list, list, float]:
    """``measure(one_thread)`` alternating torch's default threads and one thread, ``repeats`` times: both lists
    and the median of the per-repeat ratios default / one."""
    default, one = [], []
    for _ in range(repeats):
        default.append(measure(False))
        one.append(measure(True))
    return default, one, float(np.median(np.array(default) / np.array(one)))


def run(env_id: str, one_thread: bool, steps: int) -> dict:
    return child_json(CHILD.format(root=str(ROOT), one=one_thread, env_id=env_id, steps=steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", nargs="+", default=["Mixtral", "GptOss"])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    print(f"# model-accuracy preset, torch's default threads ({torch.get_num_threads()} here) vs one thread, "
          f"{args.steps} steps, {args.repeats} alternating repeats; torch {torch.__version__}, python "
          f"{platform.python_version()}, {os.cpu_count()} CPUs")
    print("| env | default threads: steps/s | 1 thread: steps/s | default / 1 thread |")
    print("|---|---:|---:|---:|")
    for name in args.envs:
        env_id = f"wide_env/WideMoE-{name}-v0"
        default, one, ratio = default_vs_one(lambda one_thread: run(env_id, one_thread, args.steps)["rate"],
                                             args.repeats)
        print(f"| {name} | {max(default):,.0f} | {max(one):,.0f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
