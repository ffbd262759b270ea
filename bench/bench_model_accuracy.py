"""Cost of the checkpoint inside the env: the native vector env of the deep presets with
``gating.accuracy = "model"`` (the default there) and with the live backend (``gating.backend = "live"``)
against the same env with the accuracy rule.

    python bench/bench_model_accuracy.py [--envs Switch Mixtral GptOss] [--batches 1 16 256] [--episodes 2]
                                         [--repeats 3] [--clock wall|cpu]

Per env id and batch size, the three envs run the same step calls (``--episodes`` episodes, so resets and the
context loading at each reset are included) with the same presampled random actions, after one untimed
warm-up run; repeats are interleaved so all see the same machine load (``--clock cpu``: the process's CPU
time instead of wall time, steadier where other processes share the cores). Reported: vector steps/s (best of
``--repeats``) and the ratios rule / model and rule / live (how many times slower; medians of per-repeat
ratios); and the one-time cost per process of the full model's run of every trace window (the
contexts episodes start from, computed when first needed).
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
from bench_vector import Runner  # noqa: E402  (bench/ is the script's directory)


SETTINGS = {"rule": {"accuracy": "rule"}, "model": {"accuracy": "model"}, "live": {"backend": "live"}}


class CpuRunner(Runner):
    """bench_vector's runner timed in the process's CPU time."""

    def run(self) -> float:
        self.env.reset(seed=self.seed + self.runs)
        self.runs += 1
        step = self.env.step
        t0 = time.process_time()
        for action in self.actions:
            step(action)
        return len(self.actions) / (time.process_time() - t0)


def make_runner(env_id: str, setting: str, batch: int, calls: int, seed: int, clock: str = "wall") -> Runner:
    """bench_vector's runner on the native vector env with one accuracy setting, after one untimed warm-up run
    (numba, torch and the trace windows' full-model runs, once per process: reported below)."""
    def make(b):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the rule is not validated on these presets: that is the point
            env = gym.make_vec(env_id, num_envs=b, vectorization_mode="vector_entry_point",
                               config={"gating": SETTINGS[setting]})
        assert env.unwrapped.problem.accuracy_source in (setting, "rule_unvalidated")
        return env

    runner = (CpuRunner if clock == "cpu" else Runner)(make, batch, calls, seed)
    runner.run()
    return runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", nargs="+", default=["Switch", "Mixtral", "GptOss"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    print(f"# vector step rate with accuracy from the rule vs measured on the model, best of {args.repeats} "
          f"({args.clock} clock); "
          f"torch {torch.__version__}, numpy {np.__version__}, python {platform.python_version()}, "
          f"{platform.machine()}")
    print("| env | B | step calls | rule: calls/s | model: calls/s | live: calls/s | rule / model | rule / live |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    cold = {}
    for name in args.envs:
        env_id = f"wide_env/WideMoE-{name}-v0"
        env = gym.make(env_id)
        context = env.unwrapped._batch.model.context
        t0 = time.process_time()
        for w in context.window_starts:
            context.prefix(int(w) + 1)
        cold[name] = (len(context.window_starts), time.process_time() - t0)
        problem = env.unwrapped.problem
        calls = args.episodes * problem.n_tokens * problem.n_layers
        for b in args.batches:
            runners = {a: make_runner(env_id, a, b, calls, args.seed, args.clock) for a in SETTINGS}
            runs = {a: [] for a in runners}
            for _ in range(args.repeats):
                for a, r in runners.items():
                    runs[a].append(r.run())
            ratio = {a: float(np.median(np.array(runs["rule"]) / np.array(runs[a]))) for a in ("model", "live")}
            print(f"| {name} | {b} | {calls} | {max(runs['rule']):,.0f} | {max(runs['model']):,.0f} | "
                  f"{max(runs['live']):,.0f} | {ratio['model']:.2f} | {ratio['live']:.2f} |", flush=True)
            for r in runners.values():
                r.env.close()
    print("\none-time cost per process: the full model's run of every trace window")
    for name, (n, seconds) in cold.items():
        print(f"  {name}: {n} windows, {seconds:.2f} CPU-s")


if __name__ == "__main__":
    main()
