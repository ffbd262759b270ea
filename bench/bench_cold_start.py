"""Cold start: a fresh process's first ``gym.make("wide_env/WideMoE-v0")`` + ``reset`` + ``step``, with and
without numba's on-disk cache of the step kernel.

    python bench/bench_cold_start.py [--repeats 3]

Each measurement is a new interpreter timing, from its first line, the imports, ``gym.make``, ``reset`` and
one ``step``. "no cache": numba compiles the kernel (``NUMBA_CACHE_DIR`` points to an empty folder);
"cache": a second process finds the compiled kernel in that folder. Also reported: the same process
importing ``gymnasium`` and making ``CartPole-v1`` (the floor any env pays), and each process's CPU time
(steadier than wall time on a shared machine). Target: under 3 s either way.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CODE = """
import time
t0, c0 = time.perf_counter(), time.process_time()
import gymnasium as gym
{imports}
env = gym.make({env_id!r})
env.reset(seed=0)
env.step(env.action_space.sample())
print(time.perf_counter() - t0, time.process_time() - c0)
"""


def run(env_id: str, imports: str, cache_dir: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one fresh process."""
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", CODE.format(imports=imports, env_id=env_id)], capture_output=True,
                         text=True, env=env, cwd=ROOT, check=True)
    wall, cpu = out.stdout.strip().splitlines()[-1].split()
    return float(wall), float(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = {"CartPole-v1 (floor)": [], "WideMoE-v0, no cache": [], "WideMoE-v0, cache": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            rows["CartPole-v1 (floor)"].append(run("CartPole-v1", "", cache))
            rows["WideMoE-v0, no cache"].append(run("wide_env/WideMoE-v0", "import wide_env", cache))
            rows["WideMoE-v0, cache"].append(run("wide_env/WideMoE-v0", "import wide_env", cache))
    print(f"# cold start: first gym.make + reset + step in a fresh process, {args.repeats} repeats; python "
          f"{sys.version.split()[0]}")
    print("| process | wall s (min) | wall s (median) | CPU s (median) | target (median wall) |")
    print("|---|---:|---:|---:|---|")
    for name, times in rows.items():
        wall, cpu = sorted(t[0] for t in times), sorted(t[1] for t in times)
        mid = len(times) // 2
        target = "-" if "floor" in name else ("met" if wall[mid] < 3.0 else "NOT met")
        print(f"| {name} | {wall[0]:.2f} | {wall[mid]:.2f} | {cpu[mid]:.2f} | < 3 s: {target} |")
    print("\n(CPU seconds are the process's own: on a busy machine wall time exceeds them.)")


if __name__ == "__main__":
    main()
