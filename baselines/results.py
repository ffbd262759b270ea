"""The results of an evaluation (:mod:`baselines.evaluate`): episode records summarised per policy and budget scale
(means with 95% confidence intervals), the printed table, the CSV files and the trade-off plot."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

__all__ = ["ci95", "summarize", "write_csv", "format_table", "plot_tradeoff", "accuracy_lines", "write_outputs"]

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


def format_table(rows: list[dict]) -> str:
    acc_keys = sorted({k for r in rows for k in r if k.startswith("accuracy_") and not k.endswith("_ci95")})
    head = (f"{'policy':<24} {'scale':>6} {'energy/token (J)':>24} {'E/E_topk':>8} {'deviation':>10} "
            f"{'viol %':>7} {'miss/tok':>8} {'exec':>5}" + "".join(f" {k[9:]:>9}" for k in acc_keys)
            + f" {'t (us)':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        e = f"{r['energy_per_token_j']:.4g} ± {r['energy_per_token_ci95']:.2g}"
        line = (f"{r['policy'][:24]:<24} {r['budget_scale']:>6g} {e:>24} {r['energy_rel_topk']:>8.3f} "
                f"{r['deviation']:>10.4g} {100 * r['violation_rate']:>7.2f} {r['deadline_misses_per_token']:>8.3f} "
                f"{r['executed_per_step']:>5.2f}")
        line += "".join(f" {r.get(k, float('nan')):>9.4f}" for k in acc_keys)
        line += f" {r['decision_time_us']:>8.1f}"
        lines.append(line)
    return "\n".join(lines)


def plot_tradeoff(rows: list[dict], path) -> None:
    """Accuracy (if reported) and deviation vs energy per token; one curve per policy over the scales."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc_keys = sorted({k for r in rows for k in r if k.startswith("accuracy_") and not k.endswith("_ci95")})
    panels = [(k, k.replace("_", " ")) for k in acc_keys] + [("deviation", "mean deviation per layer (model units)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    energies = [r["energy_per_token_j"] for r in rows if r["energy_per_token_j"] > 0]
    log_x = bool(energies) and max(energies) / min(energies) > 100
    for ax, (key, label) in zip(axes[0], panels):
        for pol in policies:
            pts = sorted((r["budget_scale"], r["energy_per_token_j"], r.get(key, float("nan")))
                         for r in rows if r["policy"] == pol)
            xs = [p[1] for p in pts]
            ys = [p[2] for p in pts]
            ax.plot(xs, ys, marker="o", label=pol)
            if len(pts) > 1 and len({round(x, 15) for x in xs}) > 1:
                for s, x, y in (pts[0], pts[-1]):
                    ax.annotate(f"x{s:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel("energy per token (J)")
        ax.set_ylabel(label)
        if log_x:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    env = rows[0]["env"] if rows else ""
    fig.suptitle(f"{env}: trade-off while sweeping the deviation budget", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
