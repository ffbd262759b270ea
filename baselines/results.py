"""The results of an evaluation (:mod:`baselines.evaluate`): episode records summarised per policy and budget scale
(means with 95% confidence intervals), the printed table, the CSV files and the trade-off plot."""
from __future__ import annotations

import csv
import math
import textwrap
from pathlib import Path

import numpy as np

__all__ = ["ci95", "summarize", "write_csv", "format_table", "column_legend", "plot_tradeoff", "accuracy_lines",
           "write_outputs"]

# Two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30; beyond that the normal 1.96 is used
# (error < 2%).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def ci95(values) -> float:
    """Half-width of the 95% confidence interval of the mean (Student t); NaN for fewer than 2 values."""
    v = np.asarray(values, dtype=np.float64)
    n = v.size
    if n < 2:
        return float("nan")
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    return float(t * v.std(ddof=1) / math.sqrt(n))


def summarize(recs: list[dict], *, env_id: str, policy: str, budget_scale: float, problem) -> dict:
    """Aggregate episode records: per-token energy (mean, 95% CI), energy relative to Top-K, mean
    per-layer deviation (model units), budget-violation rate per step, deadline misses per token,
    executed experts per step, reward per step, accuracy_* means, decision time per step (us)."""
    e_tok = [r["energy_j"] / max(r["tokens"], 1) for r in recs]
    dev = [r["deviation"] / r["steps"] for r in recs]
    row = {
        "env": env_id, "policy": policy, "budget_scale": budget_scale, "episodes": len(recs),
        "energy_per_token_j": float(np.mean(e_tok)), "energy_per_token_ci95": ci95(e_tok),
        "energy_rel_topk": float(sum(r["energy_j"] for r in recs) / max(sum(r["topk_energy_j"] for r in recs), 1e-300)),
        "deviation": float(np.mean(dev)), "deviation_ci95": ci95(dev),
        # per decision: a decoding step decides one token's layer, a prefill step every prompt token's
        "violation_rate": float(sum(r["budget_violated"] for r in recs)
                                / (sum(r["steps"] for r in recs) * getattr(problem, "prompt_tokens", 1))),
        "deadline_misses_per_token": float(sum(r["deadline_misses"] for r in recs) / sum(r["tokens"] for r in recs)),
        "executed_per_step": float(sum(r["n_executed"] for r in recs) / sum(r["steps"] for r in recs)),
        "reward_per_step": float(sum(r["reward"] for r in recs) / sum(r["steps"] for r in recs)),
        "decision_time_us": float(1e6 * sum(r["decision_s"] for r in recs) / sum(r["steps"] for r in recs)),
        "steps": int(sum(r["steps"] for r in recs)),
        "n_layers": problem.n_layers, "n_experts": problem.n_experts, "top_k": problem.top_k,
        "budget_mode": problem.budget_mode, "enforce_deadline": problem.enforce_deadline,
        "source_of_accuracy": getattr(problem, "accuracy_source", "none"),
    }
    for key in sorted({k for r in recs for k in r if k.startswith("accuracy_")}):
        vals = [r[key] for r in recs if key in r]
        row[key] = float(np.mean(vals))
        row[key + "_ci95"] = ci95(vals)
    return row


def write_csv(rows: list[dict], path) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow(r)


#: what the printed table's less obvious columns mean (printed under the table)
_COLUMN_LEGEND = {
    "correct": "correct = share of tokens whose next byte the model predicts right with the executed experts",
    "same": "same = share whose prediction equals the full Top-K model's",
    "full": "full = the full Top-K model's own accuracy on the same tokens (equal for every policy: a reference)",
    "delta_loss": "delta_loss = mean increase of the next-byte loss over the full model (nats)",
}


def column_legend(rows: list[dict]) -> list[str]:
    """The legend of the table's columns: scale, E/E_topk, viol %, miss/tok, exec, the accuracy columns and t (us)."""
    acc = [k[9:] for k in sorted({k for r in rows for k in r if k.startswith("accuracy_") and not k.endswith("_ci95")})]
    lines = [("columns: scale = budget scale; energy/token = mean ± 95% CI half-width over episodes; E/E_topk = "
              "energy relative to Top-K on the same episodes; viol % = share of budgets exceeded; miss/tok = deadline "
              "misses per token; exec = experts executed per step")]
    if acc:
        lines.append("accuracy columns: " + "; ".join(_COLUMN_LEGEND.get(k, k) for k in acc))
    lines.append("t (us) = the policy's decision time per step in microseconds (wall clock on this machine, "
                 "not the simulated latency)")
    return [w for line in lines for w in textwrap.wrap(line, 118, subsequent_indent="  ")]


def format_table(rows: list[dict], *, legend: bool = True) -> str:
    """The printed table: one line per policy and budget scale. Names longer than the column are shortened to
    distinct names (:func:`baselines.plotting.short_names`) and listed in full below; then the column legend."""
    from baselines.plotting import short_names

    acc_keys = sorted({k for r in rows for k in r if k.startswith("accuracy_") and not k.endswith("_ci95")})
    head = (f"{'policy':<24} {'scale':>6} {'energy/token (J)':>24} {'E/E_topk':>8} {'deviation':>10} "
            f"{'viol %':>7} {'miss/tok':>8} {'exec':>5}" + "".join(f" {k[9:]:>9}" for k in acc_keys)
            + f" {'t (us)':>8}")
    lines = [head, "-" * len(head)]
    short = short_names(r["policy"] for r in rows)
    for r in rows:
        e = f"{r['energy_per_token_j']:.4g} ± {r['energy_per_token_ci95']:.2g}"
        line = (f"{short[r['policy']]:<24} {r['budget_scale']:>6g} {e:>24} {r['energy_rel_topk']:>8.3f} "
                f"{r['deviation']:>10.4g} {100 * r['violation_rate']:>7.2f} {r['deadline_misses_per_token']:>8.3f} "
                f"{r['executed_per_step']:>5.2f}")
        line += "".join(f" {r.get(k, float('nan')):>9.4f}" for k in acc_keys)
        line += f" {r['decision_time_us']:>8.1f}"
        lines.append(line)
    lines += [f"{s} = {name}" for name, s in short.items() if s != name]
    if legend:
        lines += column_legend(rows)
    return "\n".join(lines)


def plot_tradeoff(rows: list[dict], path) -> None:
    """Accuracy (if reported) and deviation vs energy per token, one curve per policy over the budget scales, with
    95% CI error bars on both means; panels constant by construction (e.g. ``accuracy_full``, the full model's
    accuracy) are named in a note instead of drawn; one legend for all panels."""
    from baselines.plotting import ACCURACY_LABELS, panel_grid, pyplot, shared_legend, split_constant, wrap

    acc_keys = sorted({k for r in rows for k in r if k.startswith("accuracy_") and not k.endswith("_ci95")})
    panels = [(k, ACCURACY_LABELS.get(k, k.replace("_", " "))) for k in acc_keys]
    panels.append(("deviation", "mean deviation per layer (model units)"))
    panels, notes = split_constant(panels, lambda key: [r.get(key, float("nan")) for r in rows])
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    fig, axes, spare = panel_grid(len(panels), legend_rows=-(-len(policies) // 3), note_rows=len(notes) + 1)
    energies = [r["energy_per_token_j"] for r in rows if r["energy_per_token_j"] > 0]
    log_x = bool(energies) and max(energies) / min(energies) > 100
    markers = "osD^vP*Xhp"
    for ax, (key, label) in zip(axes, panels):
        for i, pol in enumerate(policies):
            pts = sorted((r["budget_scale"], r["energy_per_token_j"], r.get("energy_per_token_ci95", np.nan),
                          r.get(key, np.nan), r.get(key + "_ci95", np.nan)) for r in rows if r["policy"] == pol)
            s, x, xe, y, ye = (np.array(c, dtype=float) for c in zip(*pts))
            color = f"C{i % 10}"
            ax.errorbar(x, y, xerr=np.nan_to_num(xe), fmt="none", ecolor=color, alpha=0.3, elinewidth=0.8)
            # earlier policies get larger markers, so a policy whose points coincide with a later one's still shows
            ax.errorbar(x, y, yerr=np.nan_to_num(ye), marker=markers[i % len(markers)], ms=max(3.5, 8 - 1.2 * i),
                        capsize=3, lw=1.2, elinewidth=1.0, color=color, label=pol)
            if len(pts) > 1 and len({round(v, 15) for v in x}) > 1:
                for k, dy in ((0, -11), (len(pts) - 1, 5)):
                    ax.annotate(f"x{s[k]:g}", (x[k], y[k]), textcoords="offset points", xytext=(4, dy), fontsize=7,
                                color=f"C{i % 10}")
        ax.set_xlabel("energy per token (J)")
        ax.set_ylabel(label)
        if log_x:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    notes = notes + ["error bars: 95% CI of the episode means (energy: faint); xS = budget scale at a curve's ends"]
    shared_legend(fig, axes, spare=spare, notes=notes)
    env = rows[0]["env"] if rows else ""
    fig.suptitle(wrap(f"{env}: trade-off while sweeping the deviation budget", int(fig.get_figwidth() * 11)),
                 fontsize=10)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def accuracy_lines(rows: list[dict]) -> list[str]:
    """One line per accuracy source of the rows: where the table's accuracy columns come from."""
    from wide_env.envs.model_backend import ACCURACY_SOURCES

    return [f"accuracy: {ACCURACY_SOURCES.get(source, source)}"
            for source in sorted({r.get("source_of_accuracy", "none") for r in rows}) if source != "none"]


def write_outputs(env_id: str, rows: list[dict], episodes: list[dict], out: Path, *, n_episodes: int,
                  seed: int) -> None:
    """Print the table and write ``results.csv``, ``episodes.csv`` and ``tradeoff.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    print(f"{env_id}: {n_episodes} episodes per policy, seeds {seed}..{seed + n_episodes - 1}")
    print(format_table(rows))
    print("\n".join(accuracy_lines(rows)))
    write_csv(rows, out / "results.csv")
    write_csv(episodes, out / "episodes.csv")
    plot_tradeoff(rows, out / "tradeoff.png")
    print(f"wrote {out / 'results.csv'}, {out / 'episodes.csv'}, {out / 'tradeoff.png'}")
