"""Causal span baselines against the hindsight oracle, on the same seeds.

    python -m baselines.span_report --mode token --episodes 20 --seed 0 [--out runs/span] \
        [--env-kwargs "{'config': {'n_tokens': 8}}"]

Runs :func:`baselines.evaluate.evaluate_policies` with the oracle and the causal policies of the budget mode
and prints, per policy: the energy over the oracle's (summed J, and the mean of the per-episode ratios with a
95% CI: the episodes are paired, same seeds; episodes where the oracle spends nothing are left out of the
ratios), the share of the even split's gap to the oracle it closes, the
violated decisions, the real accuracy (``accuracy_correct`` per token, mean and 95% CI over episodes) and the
decision time per step. ``--out`` also writes the evaluator's CSVs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from baselines.results import ci95, write_csv
from baselines.rollout import evaluate_policies
from baselines.oracle import gap_closed
from baselines.policies import make_policy

__all__ = ["MODE_POLICIES", "span_report", "format_report", "main"]

#: (label, policy name, keyword arguments) per budget mode; the first after the oracle is the reference split
MODE_POLICIES = {
    "token": [("oracle", "oracle", {}), ("siftmoe even", "siftmoe", {}),
              ("siftmoe greedy", "siftmoe", {"allocation": "greedy"}), ("siftmoe_sdp", "siftmoe_sdp", {}),
              ("siftmoe_dpp", "siftmoe_dpp", {})],
    "episode": [("oracle", "oracle", {}), ("siftmoe_span even", "siftmoe_span", {}),
                ("siftmoe (per-token even)", "siftmoe", {}),
                ("siftmoe_span greedy", "siftmoe_span", {"allocation": "greedy"}), ("siftmoe_sdp", "siftmoe_sdp", {}),
                ("siftmoe_dpp", "siftmoe_dpp", {})],
}


def _factory(name: str, kwargs: dict):
    def build(env):
        return make_policy(name, env, **kwargs)

    build.is_policy_factory = True
    return build


def span_report(mode: str, episodes: int = 20, seed: int = 0, env_kwargs: dict | None = None,
                policies=None, episode_rows: list | None = None) -> list[dict]:
    """One row per policy (see the module docstring); ``policies`` defaults to :data:`MODE_POLICIES`."""
    from wide_env.config import deep_merge

    if mode not in MODE_POLICIES:
        raise ValueError(f"mode must be one of {list(MODE_POLICIES)}, got {mode!r}")
    chosen = MODE_POLICIES[mode] if policies is None else policies
    env_kwargs = dict(env_kwargs or {})
    env_kwargs["config"] = deep_merge(env_kwargs.get("config") or {}, {"budget": {"mode": mode}})
    rows = [] if episode_rows is None else episode_rows
    summary = evaluate_policies("wide_env/WideMoE-v0", [(label, _factory(name, kw)) for label, name, kw in chosen],
                                episodes=episodes, seed=seed, env_kwargs=env_kwargs, progress=False, episode_rows=rows)
    energy = {label: np.array([r["energy_j"] for r in rows if r["policy"] == label]) for label, _, _ in chosen}
    oracle = energy[chosen[0][0]]
    reference = energy[chosen[1][0]]
    out = []
    positive = oracle > 0  # an episode the oracle serves with no energy at all has no ratio
    for s, (label, _, _) in zip(summary, chosen):
        ratio = energy[label][positive] / oracle[positive]
        acc = [r["accuracy_correct"] for r in rows if r["policy"] == label and "accuracy_correct" in r]
        out.append({
            "policy": label, "energy_over_oracle": float(energy[label].sum() / oracle.sum()),
            "episode_ratio": float(ratio.mean()), "episode_ratio_ci95": ci95(ratio),
            "gap_closed": gap_closed(reference.sum(), energy[label].sum(), oracle.sum()),
            "violation_rate": s["violation_rate"], "accuracy_correct": float(np.mean(acc)) if acc else float("nan"),
            "accuracy_correct_ci95": ci95(acc) if acc else float("nan"), "decision_time_us": s["decision_time_us"],
            "energy_per_token_j": s["energy_per_token_j"], "episodes": episodes, "mode": mode})
    return out


def format_report(rows: list[dict]) -> str:
    head = (f"{'policy':<26} {'E/oracle':>8} {'per-episode ratio':>19} {'gap closed':>10} {'viol %':>7} "
            f"{'accuracy':>17} {'t (us/step)':>11}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['policy'][:26]:<26} {r['energy_over_oracle']:>8.3f} "
                     f"{r['episode_ratio']:>10.3f} ± {r['episode_ratio_ci95']:<6.3f} {r['gap_closed']:>10.2f} "
                     f"{100 * r['violation_rate']:>7.2f} "
                     f"{r['accuracy_correct']:>9.4f} ± {r['accuracy_correct_ci95']:<5.3f} "
                     f"{r['decision_time_us']:>11.0f}")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    import ast

    ap = argparse.ArgumentParser(prog="python -m baselines.span_report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=sorted(MODE_POLICIES), default="token")
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--env-kwargs", default=None, help="Python dict literal passed to gym.make")
    ap.add_argument("--out", default=None, help="directory for report.csv and episodes.csv")
    args = ap.parse_args(argv)
    try:  # an entry point may set the process's threads: the model's tiny decodes are fastest on one
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    env_kwargs = ast.literal_eval(args.env_kwargs) if args.env_kwargs else None
    episodes: list[dict] = []
    rows = span_report(args.mode, args.episodes, args.seed, env_kwargs, episode_rows=episodes)
    print(f"wide_env/WideMoE-v0, budget.mode = {args.mode!r}: {args.episodes} episodes, seeds "
          f"{args.seed}..{args.seed + args.episodes - 1}; gap closed = share of the gap between "
          f"{rows[1]['policy']!r} and the oracle")
    print(format_report(rows))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_csv(rows, out / "report.csv")
        write_csv(episodes, out / "episodes.csv")
    return rows


if __name__ == "__main__":
    main()
