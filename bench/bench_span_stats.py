"""Solver preparation on model-accuracy presets (issue 22's last two table rows): span statistics need no accuracy,
so collecting them on a preset whose accuracy is measured on the model should cost what it costs with the trace's
accuracy rule; and building a span policy or running ``baselines.span_report`` with torch's default thread count
should cost what it costs at one thread.

    python bench/bench_span_stats.py [--envs Mixtral TokenBudget] [--episodes 128] [--repeats 3]

Rows:
1. ``SpanStatistics.collect(config, episodes)`` (no cache) on the preset's config (model accuracy) and on the same
   config with ``gating.accuracy = "rule"``, alternating in one process, CPU time (``time.process_time``); the
   ratio is model / rule of the best repeats (1 = the model is not run; the issue measured 3.0 s vs 0.4 s).
2. ``make_policy("siftmoe_dpp", env)`` (collects its statistics) and ``python -m baselines.span_report --mode token
   --episodes 20``, each in a fresh process with torch's default threads and with ``torch.set_num_threads(1)``,
   alternating after one untimed warm-up run; wall time of the call (CPU time would hide threads that spin); ratio
   default / one thread.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

from bench_threads import ROOT, child_json, default_vs_one  # bench/ is the script's directory

CHILD = """
import json, sys, time, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {root!r})
import gymnasium as gym, torch
import wide_env
if {one}:
    torch.set_num_threads(1)
t0 = time.perf_counter()
if {what!r} == "siftmoe_dpp":
    from baselines.policies import make_policy
    make_policy("siftmoe_dpp", gym.make({env_id!r}))
else:
    from baselines.span_report import main
    main(["--mode", "token", "--episodes", "20", "--env-kwargs", "None"])
print(json.dumps({{"seconds": time.perf_counter() - t0, "threads": torch.get_num_threads()}}))
"""


def run_child(what: str, env_id: str, one_thread: bool) -> float:
    return child_json(CHILD.format(root=str(ROOT), one=one_thread, what=what, env_id=env_id))["seconds"]


def collect_seconds(config, episodes: int) -> float:
    from baselines.span_stats import SpanStatistics

    c0 = time.process_time()
    SpanStatistics.collect(config, episodes)
    return time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", nargs="+", default=["Mixtral", "TokenBudget"])
    parser.add_argument("--episodes", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import gymnasium as gym
    import torch

    import wide_env  # noqa: F401
    from wide_env.config import deep_merge

    print(f"# span statistics and span policies on model-accuracy presets; torch {torch.__version__} (default "
          f"threads {torch.get_num_threads()}), python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"{args.repeats} alternating repeats")
    print("| preset | statistics, model accuracy: CPU-s | with the rule: CPU-s | model / rule |")
    print("|---|---:|---:|---:|")
    for name in args.envs:
        env = gym.make(f"wide_env/WideMoE-{name}-v0")
        config = env.unwrapped.config.to_dict()
        env.close()
        rule = deep_merge(config, {"gating": {"accuracy": "rule"}})
        collect_seconds(config, 2)  # warm-up: numba, the trace, the checkpoint
        model_s, rule_s = [], []
        for _ in range(args.repeats):
            model_s.append(collect_seconds(config, args.episodes))
            rule_s.append(collect_seconds(rule, args.episodes))
        ratio = min(model_s) / min(rule_s)
        print(f"| {name} ({args.episodes} episodes) | {min(model_s):.2f} | {min(rule_s):.2f} | {ratio:.2f} |",
              flush=True)
    print()
    print("| call (fresh process) | default threads: s | 1 thread: s | default / 1 thread |")
    print("|---|---:|---:|---:|")
    for what, env_id in (("siftmoe_dpp", "wide_env/WideMoE-TokenBudget-v0"), ("span_report", "")):
        run_child(what, env_id, True)  # warm-up: numba's cache, the trace windows (the first run pays them)
        default, one, ratio = default_vs_one(lambda one_thread: run_child(what, env_id, one_thread), args.repeats)
        label = ('make_policy("siftmoe_dpp", TokenBudget)' if what == "siftmoe_dpp"
                 else "span_report --mode token --episodes 20")
        print(f"| {label} | {min(default):.2f} | {min(one):.2f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
