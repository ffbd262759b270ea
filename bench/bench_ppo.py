"""PPO training throughput on WideMoE-v0: the native batched SB3 adapter against SB3's DummyVecEnv.

    python bench/bench_ppo.py [--n-envs 16 64] [--timesteps 16384] [--n-steps 64] [--repeats 2]

For each ``n_envs``: ``PPO("MultiInputPolicy", venv, n_steps, batch_size=256, n_epochs=1)`` learns
``--timesteps`` steps on CPU (one torch thread) with
* ``make_vec_env("wide_env/WideMoE-v0", n_envs, vec_env_cls=DummyVecEnv)`` (a Python loop over single envs),
* ``make_native_vec_env("wide_env/WideMoE-v0", n_envs)`` (one batched call; full per-step infos),
* the same with ``info_keys=()`` (no per-step info dicts, only what SB3 needs).
Reported: timesteps/s of ``learn`` (rollouts + updates, best of ``--repeats``), and the ratio to
DummyVecEnv measured in this run. The policy update cost is the same in all three, so the ratio
understates the env speed-up; the env-only rates are in ``bench/bench_vector.py``.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import stable_baselines3  # noqa: E402
from stable_baselines3 import PPO  # noqa: E402
from stable_baselines3.common.env_util import make_vec_env  # noqa: E402
from stable_baselines3.common.vec_env import DummyVecEnv  # noqa: E402

import wide_env  # noqa: E402,F401
from wide_env.integrations.sb3_vec import make_native_vec_env  # noqa: E402

ENV_ID = "wide_env/WideMoE-v0"


def throughput(make_venv, n_envs: int, timesteps: int, n_steps: int, repeats: int, seed: int) -> float:
    best = 0.0
    for r in range(repeats):
        venv = make_venv(n_envs, seed + r)
        model = PPO("MultiInputPolicy", venv, n_steps=n_steps, batch_size=256, n_epochs=1, seed=seed + r,
                    device="cpu", verbose=0)
        t0 = time.perf_counter()
        model.learn(timesteps)
        best = max(best, model.num_timesteps / (time.perf_counter() - t0))
        venv.close()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-envs", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--timesteps", type=int, default=16384)
    parser.add_argument("--n-steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    variants = {
        "DummyVecEnv": lambda n, s: make_vec_env(ENV_ID, n_envs=n, seed=s, vec_env_cls=DummyVecEnv),
        "native": lambda n, s: make_native_vec_env(ENV_ID, n_envs=n, seed=s),
        "native, info_keys=()": lambda n, s: make_native_vec_env(ENV_ID, n_envs=n, seed=s, info_keys=()),
    }
    print(f"# PPO learn throughput, {args.timesteps} timesteps, n_steps={args.n_steps}, batch 256, 1 epoch, "
          f"best of {args.repeats}; torch {torch.__version__} (1 thread), sb3 {stable_baselines3.__version__}, "
          f"numpy {np.__version__}, python {platform.python_version()}")
    print("| n_envs | vec env | timesteps/s | ratio to DummyVecEnv |")
    print("|---:|---|---:|---:|")
    for n in args.n_envs:
        rates = {name: throughput(make, n, args.timesteps, args.n_steps, args.repeats, args.seed)
                 for name, make in variants.items()}
        for name, rate in rates.items():
            print(f"| {n} | {name} | {rate:,.0f} | {rate / rates['DummyVecEnv']:.2f} |")


if __name__ == "__main__":
    main()
