"""Tuning ``confident_skip``'s thresholds (:mod:`baselines.model_state_policy`) on the selection seeds.

    python -m baselines.model_state_tuning [--episodes 32]

Every (confidence, margin) pair of a grid runs on the same selection episodes (seeds 30000 onwards; the
benchmark's test episodes use other seeds) of ``wide_env/WideMoE-ModelState-v0``; pairs are ranked by the
preset's mean reward per step (the accuracy objective: energy against the loss measured on the model). The
best pair is the policy's default (``TUNED``). Kept apart from the policy: it evaluates through
:mod:`baselines.rollout`, which builds policies through the registry that imports the policy.
"""
from __future__ import annotations

import argparse
import itertools
import sys

from baselines.model_state_policy import ENV_ID, ConfidentSkip
from baselines.rollout import evaluate_policies

__all__ = ["tune", "SELECTION_SEED", "GRID"]

#: the first selection seed (the tuning episodes)
SELECTION_SEED = 30000
#: the tuning grid of each threshold (1.0: that key never fires)
GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def _factory(confidence: float, margin: float):
    def make(env):
        return ConfidentSkip(env.unwrapped.problem, confidence=confidence, margin=margin)

    make.is_policy_factory = True
    return make


def tune(episodes: int = 32, grid=GRID, env_id: str = ENV_ID, env_kwargs: dict | None = None,
         seed: int = SELECTION_SEED) -> list[dict]:
    """Every (confidence, margin) of ``grid`` x ``grid`` on ``episodes`` selection episodes (seeds ``seed``
    onwards, the same for every pair): rows of the reward per step, energy and accuracy, best reward first."""
    rows = []
    for confidence, margin in itertools.product(grid, grid):
        (row,) = evaluate_policies(env_id, [("confident_skip", _factory(confidence, margin))], episodes=episodes,
                                   seed=seed, env_kwargs=env_kwargs, progress=False)
        rows.append({"confidence": confidence, "margin": margin, "reward_per_step": row["reward_per_step"],
                     "energy_rel_topk": row["energy_rel_topk"], "accuracy_same": row.get("accuracy_same"),
                     "accuracy_correct": row.get("accuracy_correct")})
    rows.sort(key=lambda r: -r["reward_per_step"])
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m baselines.model_state_tuning", description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=32, help="selection episodes per grid point (default 32)")
    args = ap.parse_args(argv)
    for r in tune(args.episodes)[:10]:
        print({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
