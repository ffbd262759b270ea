#!/usr/bin/env python
"""Train an RL agent on a WIDE environment: a thin shim over :func:`agents.run.main` (rl-baselines3-zoo
style), the same entry point as ``wide-train`` and ``python -m agents`` after ``pip install``.

    python train.py                                   # short demonstration run on wide_env/WideMoE-v0
    python train.py --algo ppo --env wide_env/WideMoE-v0 -n 200000 --seed 0
    python train.py --algo maskable_ppo --env-kwargs "{'config': {'n_tokens': 8}}" --vec-env subproc
    python train.py --resume runs/ppo/wide_env-WideMoE-v0_1   # continue after a crash / kill

See ``python train.py --help`` and agents/training.py for the run folder layout.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from agents.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="python train.py"))
