"""Decision time of the exact SiftMoE prefilling solver against brute force over all 2^(T E) masks.

    python bench/bench_prefill.py [--instances 30] [--seed 0]

For each (T, E, K) with T*E <= 16 it times, on the same random instances
(:func:`baselines.prefill.random_prefill_instance`: convex inversion-like loads, deadline capacities),
the solver and the vectorised brute force, checks that both find the same optimal energy, and prints
the ratio brute-force time / solver time (> 1: the solver is faster). For env-sized instances
(T = 8, E = 8, K = 2 and T = 16, E = 8, K = 2: 2^64 and 2^128 masks) only the solver is timed, with
its branch-and-bound node counts.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baselines.prefill import brute_force_prefill, random_prefill_instance, solve_prefill  # noqa: E402


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    print(f"{'T':>3} {'E':>3} {'K':>2} {'masks':>8} {'solver ms':>10} {'brute ms':>10} {'ratio':>8} {'nodes':>7} agree")
    for T, E, K in ((2, 4, 2), (3, 4, 2), (4, 4, 2), (2, 8, 2), (2, 8, 1)):
        ts, tb, nodes, agree = [], [], [], 0
        for _ in range(args.instances):
            inst = random_prefill_instance(rng, T, E, K)
            sol, a = _timed(lambda: solve_prefill(*inst))
            (best, missing, _), b = _timed(lambda: brute_force_prefill(*inst))
            ts.append(a)
            tb.append(b)
            nodes.append(sol.nodes)
            agree += bool(np.isclose(sol.energy, best, rtol=1e-9) and sol.dropped.sum() == missing)
        print(f"{T:>3} {E:>3} {K:>2} {2 ** (T * E):>8} {1e3 * np.mean(ts):>10.3f} {1e3 * np.mean(tb):>10.2f} "
              f"{np.mean(tb) / np.mean(ts):>8.0f} {int(np.median(nodes)):>7} {agree}/{args.instances}")
    print("\nenv-sized instances (no brute force possible):")
    print(f"{'T':>3} {'E':>3} {'K':>2} {'mean ms':>8} {'max ms':>8} {'median nodes':>13} {'max nodes':>10}")
    for T, E, K in ((8, 8, 2), (16, 8, 2), (8, 8, 1)):
        ts, nodes = [], []
        for _ in range(args.instances):
            inst = random_prefill_instance(rng, T, E, K, capacity=False)
            sol, a = _timed(lambda: solve_prefill(*inst))
            ts.append(a)
            nodes.append(sol.nodes)
        print(f"{T:>3} {E:>3} {K:>2} {1e3 * np.mean(ts):>8.2f} {1e3 * np.max(ts):>8.2f} {int(np.median(nodes)):>13} "
              f"{max(nodes):>10}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
