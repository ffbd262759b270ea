r"""Evaluate expert-selection policies on a WIDE environment, on identical episodes.

    python -m baselines.evaluate --env wide_env/WideMoE-v0 --policies topk,siftmoe --episodes 20 --seed 0 \
        --out runs/eval [--env-kwargs "{'config': {'n_tokens': 8}}"] [--budget-scales 0.25,0.5,1,2,4] \
        [--policy-kwargs "{'wdmoe': {'threshold': 0.3}}"] [--vec-env auto|native|single] [--no-progress]

(also installed as ``wide-evaluate``). Policies: the names of :data:`baselines.policies.POLICY_NAMES`
and saved SB3 models ``ALGO:PATH`` with ALGO in :data:`agents.registry.ALGORITHMS` (``ppo``, ``a2c``,
``maskable_ppo``, ``recurrent_ppo``; loaded lazily, on CPU).

Every policy sees the same episodes, and the environment's randomness (channels, gating) does not depend
on the actions, so the channel and token realisations are identical across policies and budget scales:

* ``--vec-env native`` (the default, ``auto``, for ids with wide_env's batched core): the episodes of a
  policy run as one batch on the native vector env (``gym.make_vec(id, num_envs=episodes,
  vectorization_mode="vector_entry_point")``), reset with the seeds ``[seed, ..., seed + episodes - 1]``:
  sub-env ``i`` replays ``gym.make(id).reset(seed=seed + i)`` exactly.
* ``--vec-env single`` (``auto`` for ids without a batched core): one env, episode
  ``i`` is ``env.reset(seed=seed + i)``. Both modes see the same episodes (a policy with its own randomness,
  ``random``, draws differently: once per batch, or once per episode).

A budget scale ``s`` multiplies the env's own ``budget.scale`` (config key ``budget.scale``); it is
applied through the env config, over the registered preset.

Outputs: a table on stdout, ``OUT/results.csv`` (one row per policy and budget scale),
``OUT/episodes.csv`` (one row per episode: ``episode`` i, ``seed`` = seed + i) and ``OUT/tradeoff.png`` (accuracy, when the env's info reports
``accuracy_*`` keys, and deviation vs energy per token, one curve per policy across the scales).
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
from pathlib import Path

from baselines.agent_plugin import AgentPluginUnavailable
from baselines.eval_env import ACCURACY_MODES, VEC_ENV_MODES
from baselines.results import write_outputs
from baselines.rollout import evaluate_policies
from baselines.sweep import RayConnectError, main_ray

__all__ = ["evaluate_policies", "build_parser", "main", "cli"]


def _literal(text: str, what: str):
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as exc:
        raise SystemExit(f"--{what}: cannot parse {text!r} as a Python literal ({exc}); "
                         "example: \"{'config': {'n_tokens': 8}}\"")
    if not isinstance(value, dict):
        raise SystemExit(f"--{what} must be a dict literal, got {type(value).__name__}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (episode i is reset with seed + i, and seeds are "
                                         f"non-negative), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    prog = "wide-evaluate" if script == "wide-evaluate" else "python -m baselines.evaluate"
    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", default="wide_env/WideMoE-v0", help="registered environment id")
    ap.add_argument("--policies", default="topk,siftmoe",
                    help="comma-separated names (topk,topk_ideal,siftmoe,wdmoe,des,adapmoe,greedy,random) or algo:PATH; "
                         "topk = practical Top-K (late experts lost), topk_ideal = deadline enforcement off")
    ap.add_argument("--episodes", type=_positive_int, default=20)
    ap.add_argument("--seed", type=_seed, default=0, help="episode i is reset with seed + i (>= 0; default 0)")
    ap.add_argument("--out", required=True, help="output directory (created)")
    ap.add_argument("--env-kwargs", default=None, help="Python dict literal passed to gym.make")
    ap.add_argument("--policy-kwargs", default=None, help="Python dict literal {policy: {kwarg: value}}")
    ap.add_argument("--budget-scales", default="0.25,0.5,1,2,4",
                    help="comma-separated multipliers of the budget swept for the trade-off curves "
                         "(default 0.25,0.5,1,2,4; '1' for the env as configured only)")
    ap.add_argument("--max-steps", type=_positive_int, default=None,
                    help="cap on steps per episode, >= 1 (default: every episode to its end)")
    ap.add_argument("--vec-env", default="auto", choices=VEC_ENV_MODES,
                    help="native: each policy's episodes as one batch on the native vector env; single: one env; "
                         "either way episode i is seeded seed + i; auto: native where the id has it")
    ap.add_argument("--accuracy", default="auto", choices=ACCURACY_MODES,
                    help="where real accuracy comes from: rule (the trace's accuracy rule), model (the checkpoint "
                         "decodes each token with the executed experts), live (the live backend: live gating in the "
                         "observations) or auto (the model wherever a checkpoint and torch are there, else the env's "
                         "own source); the table says which")
    ap.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    ap.add_argument("--ray", action="store_true",
                    help="spread policies x budget scales x envs x episode chunks over a Ray cluster (pip install "
                         "'.[ray]'); --env may then list several ids (outputs in OUT/ENV_ID per env)")
    ap.add_argument("--address", default=None, help="with --ray: the cluster ('auto' joins 'ray start'; default local)")
    ap.add_argument("--chunk-episodes", type=_positive_int, default=5, help="with --ray: episodes per Ray task")
    return ap


def main(argv=None) -> list[dict]:
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    ap = build_parser()
    args = ap.parse_args(argv)

    env_kwargs = _literal(args.env_kwargs, "env-kwargs") if args.env_kwargs else None
    policy_kwargs = _literal(args.policy_kwargs, "policy-kwargs") if args.policy_kwargs else None
    scales = None
    if args.budget_scales:
        try:
            scales = [float(s) for s in args.budget_scales.split(",") if s.strip()]
        except ValueError:
            raise SystemExit(f"--budget-scales: expected comma-separated numbers, got {args.budget_scales!r}")
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if args.ray:  # the same outputs, computed on a Ray cluster (baselines/sweep.py)
        try:
            return main_ray(args, policies=policies, env_kwargs=env_kwargs, policy_kwargs=policy_kwargs, scales=scales)
        except RayConnectError as exc:  # names the address and the fix
            ap.exit(2, f"{ap.prog}: error: {exc}\n")
    episodes: list[dict] = []
    try:
        rows = evaluate_policies(args.env, policies, episodes=args.episodes, seed=args.seed, env_kwargs=env_kwargs,
                                 budget_scales=scales, policy_kwargs=policy_kwargs,
                                 progress=False if args.no_progress else None, max_steps=args.max_steps,
                                 episode_rows=episodes, vec_env=args.vec_env, accuracy=args.accuracy)
    except (ValueError, TypeError, KeyError, FileNotFoundError, AgentPluginUnavailable) as exc:
        # bad input, or no agents plugin for 'algo:PATH': the message says what to fix
        ap.exit(2, f"{ap.prog}: error: {exc}\n")
    write_outputs(args.env, rows, episodes, Path(args.out), n_episodes=args.episodes, seed=args.seed)
    return rows


def cli() -> int:
    """Console script ``wide-evaluate`` (exit status 0; errors exit 2 with the message)."""
    main()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
