"""Learned agents as ``policy(obs) -> action`` callables, evaluated with ``baselines.evaluate``'s code path.

Periodic evaluations, the reference lines (SiftMoE, Top-K) and the final comparison table all call
:func:`baselines.rollout.evaluate_policies` on the same seeds (``eval_seed + i``), so the agent's
numbers and the baselines' come from the same episodes and the same metric definitions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

REFERENCE_POLICIES = ("siftmoe", "topk")


def evaluate(env_id: str, env_kwargs: dict, policies, *, episodes: int, seed: int,
             episode_rows: list | None = None) -> list[dict]:
    """``baselines.rollout.evaluate_policies`` (the project's single evaluation code path)."""
    from baselines.rollout import evaluate_policies

    return evaluate_policies(env_id, policies, episodes=episodes, seed=seed, env_kwargs=env_kwargs,
                             progress=False, episode_rows=episode_rows)


def format_table(rows: list[dict]) -> str:
    """The evaluation table, then where its accuracy columns come from."""
    from baselines.results import accuracy_lines, format_table as base_format

    return "\n".join([base_format(rows), *accuracy_lines(rows)])


def add_relative_columns(rows: list[dict]) -> list[dict]:
    """energy as % of SiftMoE's, and the violation rate above SiftMoE's (unavoidable violations cancel)."""
    sift = next((r for r in rows if r["policy"] == "siftmoe"), None)
    for r in rows:
        if sift is not None and sift["energy_per_token_j"] > 0:
            r["energy_pct_of_siftmoe"] = 100.0 * r["energy_per_token_j"] / sift["energy_per_token_j"]
            r["violation_rate_above_siftmoe"] = r["violation_rate"] - sift["violation_rate"]
    return rows


def write_csv(rows: list[dict], path) -> None:
    from baselines.results import write_csv as base_write

    base_write(rows, path)


def plot_learning_curve(eval_rows: list[dict], reference: list[dict], path: Path, *, title: str = "") -> None:
    """Energy per token and deviation-violation rate (and accuracy_* if present) vs timesteps, with the
    reference policies as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not eval_rows:
        return
    acc_keys = sorted({k for r in eval_rows for k in r if k.startswith("accuracy_")})
    panels = [("energy_per_token_j", "energy per token (J)"), ("violation_rate", "deviation-budget violation rate")]
    panels += [("deadline_misses_per_token", "deadline misses per token")]
    panels += [(k, k.replace("_", " ")) for k in acc_keys]
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.0 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    x = np.array([r["timesteps"] for r in eval_rows], dtype=float)
    styles = {"siftmoe": ("tab:green", "--"), "topk": ("tab:red", ":")}
    for ax, (key, label) in zip(axes.flat, panels):
        y = np.array([r.get(key, np.nan) for r in eval_rows], dtype=float)
        ax.plot(x, y, marker="o", ms=3, label="agent")
        for ref in reference:
            if key in ref:
                color, ls = styles.get(ref["policy"], ("gray", "-."))
                ax.axhline(ref[key], color=color, ls=ls, label=ref["policy"])
        ax.set_xlabel("timesteps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
