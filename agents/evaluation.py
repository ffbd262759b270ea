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
    """Energy per token, deviation-violation rate, deadline misses (and accuracy_* if present) vs timesteps, with
    95% CI bands on the agent's means and the reference policies as horizontal lines (their CI shaded). A panel
    whose values (agent and references) are constant, e.g. no deadline misses or ``accuracy_full`` (the full
    model's accuracy, constant by construction), is named in a note instead of drawn; one legend for all panels."""
    from baselines.plotting import ACCURACY_LABELS, panel_grid, pyplot, shared_legend, split_constant, wrap

    if not eval_rows:
        return
    acc_keys = sorted({k for r in eval_rows for k in r if k.startswith("accuracy_") and not k.endswith("_ci95")})
    panels = [("energy_per_token_j", "energy per token (J)"), ("violation_rate", "deviation-budget violation rate")]
    panels += [("deadline_misses_per_token", "deadline misses per token")]
    panels += [(k, ACCURACY_LABELS.get(k, k.replace("_", " "))) for k in acc_keys]
    panels, notes = split_constant(panels, lambda key: [r.get(key, np.nan) for r in [*eval_rows, *reference]])
    fig, axes, spare = panel_grid(len(panels), panel_w=5.0, panel_h=3.6, note_rows=len(notes) + 1)
    x = np.array([r["timesteps"] for r in eval_rows], dtype=float)
    styles = {"siftmoe": ("tab:green", "--"), "topk": ("tab:red", ":")}
    for ax, (key, label) in zip(axes, panels):
        y = np.array([r.get(key, np.nan) for r in eval_rows], dtype=float)
        ci = np.array([r.get(_ci_key(key), np.nan) for r in eval_rows], dtype=float)
        ax.plot(x, y, marker="o", ms=3, color="tab:blue", label="agent", zorder=3)
        if np.isfinite(ci).any():
            ax.fill_between(x, y - np.nan_to_num(ci), y + np.nan_to_num(ci), color="tab:blue", alpha=0.18, lw=0,
                            label="agent 95% CI")
        for j, ref in enumerate(reference):
            if key in ref:
                color, ls = styles.get(ref["policy"], ("gray", "-."))
                ax.axhline(ref[key], color=color, ls=ls, label=ref["policy"])
                half = ref.get(_ci_key(key), np.nan)
                if np.isfinite(half):  # its CI as an error bar at the right edge
                    ax.errorbar([x.max() * (1.02 + 0.025 * j) + 1], [ref[key]], yerr=[half], color=color, capsize=3,
                                lw=1)
        ax.set_xlabel("timesteps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ci_note = "band (agent) and bars at the right edge (references): 95% CI of the evaluation episodes' mean"
    shared_legend(fig, axes, spare=spare, notes=[*notes, ci_note])
    if title:
        fig.suptitle(wrap(title, int(fig.get_figwidth() * 11)), fontsize=10)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def _ci_key(key: str) -> str:
    """The CI column of a summary key (``energy_per_token_j`` -> ``energy_per_token_ci95``)."""
    return ("energy_per_token" if key == "energy_per_token_j" else key) + "_ci95"
