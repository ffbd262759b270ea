"""Cost of the model-state observation keys (``gating.model_state = true``): the native vector env with model
accuracy, with and without the keys, stepped with the same presampled random actions.

    python bench/bench_model_state.py [--env Switch] [--batches 1 16] [--steps 600] [--repeats 5]

The two settings alternate within each repeat (same machine load); reported: steps/s of each (best of the
repeats) and the median per-repeat ratio with / without (> 1: the keys' cost).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import wide_env  # noqa: E402,F401  (registers the ids)


def make(env_id: str, batch: int, model_state: bool):
    cfg = {"gating": {"source": "trace", "accuracy": "model", "model_state": model_state}}
    vec = gym.make_vec(env_id, num_envs=batch, vectorization_mode="vector_entry_point", config=cfg)
    vec.reset(seed=0)
    return vec


def run(vec, actions) -> float:
    vec.reset(seed=0)
    t = time.perf_counter()
    for a in actions:
        vec.step(a)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default="Switch")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    env_id = f"wide_env/WideMoE-{args.env}-v0"
    for batch in args.batches:
        envs = {flag: make(env_id, batch, flag) for flag in (False, True)}
        E = envs[False].single_action_space.n
        actions = (np.random.default_rng(1).random((args.steps, batch, E)) < 0.6).astype(np.int8)
        for vec in envs.values():  # warm-up: numba, the trace windows
            run(vec, actions[:50])
        times = {False: [], True: []}
        for _ in range(args.repeats):
            for flag, vec in envs.items():
                times[flag].append(run(vec, actions))
        ratio = float(np.median(np.array(times[True]) / np.array(times[False])))
        print(f"{env_id} B={batch}: without {args.steps / min(times[False]):.0f} steps/s, with "
              f"{args.steps / min(times[True]):.0f} steps/s, with / without = {ratio:.3f}")


if __name__ == "__main__":
    main()
