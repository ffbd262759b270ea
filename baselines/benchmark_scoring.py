"""The benchmark's scoring and table (:mod:`baselines.benchmark`): the baselines' accuracy-energy curves, the choice
of the best baseline, the equal-accuracy comparison with the agent, gap closed, and the Markdown table."""

from __future__ import annotations

import numpy as np

from baselines.benchmark_fronts import compare_fronts
from baselines.benchmark_regimes import ROLES, TABLE_COLUMNS, TRAIN_SEED, WIN_RATIO, AgentRun, Regime
from baselines.equal_accuracy import accuracy_energy_front, energy_at_accuracy, episode_matrix, mix_at_accuracy
from baselines.oracle import gap_closed
from baselines.results import ci95

__all__ = ["baseline_labels", "baseline_curve", "choose_best", "summary_of", "equal_accuracy", "regime_rows",
           "format_table", "format_fronts", "plot_regime_fronts", "TOPK_SCALE", "agent_policy", "agent_matrix",
           "HEADLINE"]

#: the agents' records: policy ``HEADLINE`` at the table's weight, ``"ppo w=W"`` at the others, each with its
#: ``train_seed`` (records without one are seed TRAIN_SEED's); the table's PPO row pools the headline seeds
HEADLINE = "ppo"
_SINGLE = (AgentRun(TRAIN_SEED, None, True),)


def agent_policy(run: AgentRun) -> str:
    return HEADLINE if run.headline else f"{HEADLINE} w={run.weight:g}"


def _train_seed(row: dict) -> int:
    """A record's training seed: TRAIN_SEED where it has none (policies that are not trained; blank in a CSV)."""
    seed = row.get("train_seed", "")
    return TRAIN_SEED if seed in ("", None) else int(seed)


def _of_seed(rows: list[dict], seed: int) -> list[dict]:
    return [r for r in rows if _train_seed(r) == seed]


def agent_matrix(rows: list[dict], runs, key: str) -> tuple[np.ndarray, int]:
    """(R, W, n) per-episode ``key`` of the agents (seed, weight, episode by seed) and the headline weight's index."""
    runs = list(runs)
    seeds = sorted({r.seed for r in runs})
    policies = list(dict.fromkeys(agent_policy(r) for r in runs))
    out = np.stack([np.stack([episode_matrix(_of_seed(rows, s), p, key, [1.0])[0][0] for p in policies])
                    for s in seeds])
    return out, policies.index(HEADLINE)


def baseline_labels(regime: Regime) -> list[str]:
    return [b.label for b in regime.baselines]


def _agent_accuracy(rows: list[dict]) -> float:
    """The headline agents' mean accuracy, pooled over seeds."""
    return float(np.mean([r["accuracy_correct"] for r in rows if r["policy"] == HEADLINE]))


#: the budget-free end of every baseline's curve: practical Top-K, listed as budget scale 0 (a budget-driven policy
#: with no deviation allowed executes Top-K; without it an agent that merely matches Top-K would lie above curves
#: that stop short of Top-K's accuracy and "win" outright)
TOPK_SCALE = 0.0


def baseline_curve(rows: list[dict], label: str) -> dict:
    """A baseline's per-episode energy per token and accuracy, (S + 1, n), over its budget scales and practical
    Top-K (scale :data:`TOPK_SCALE`, first), with each setting's violation rate and misses per token."""
    energy, scales = episode_matrix(rows, label, "energy_per_token")
    accuracy, _ = episode_matrix(rows, label, "accuracy_correct")
    topk_energy, _ = episode_matrix(rows, "topk", "energy_per_token", [1.0])
    topk_accuracy, _ = episode_matrix(rows, "topk", "accuracy_correct", [1.0])
    summaries = [summary_of(rows, "topk")] + [summary_of(rows, label, s) for s in scales]
    return {"energy": np.vstack([topk_energy, energy]), "accuracy": np.vstack([topk_accuracy, accuracy]),
            "scales": [TOPK_SCALE] + list(scales),
            "violation_rate": np.array([x["violation_rate"] for x in summaries]),
            "misses": np.array([x["deadline_misses_per_token"] for x in summaries])}


def _baseline_point(rows: list[dict], label: str, target: float):
    curve = baseline_curve(rows, label)
    front = accuracy_energy_front(curve["energy"].mean(axis=1), curve["accuracy"].mean(axis=1))
    return energy_at_accuracy(front, target), curve


def choose_best(regime: Regime, rows: list[dict]) -> tuple[str, dict]:
    """The baseline with the least energy at the agent's accuracy (selection episodes); when none reaches it or
    the agent is below every curve, the one with the least energy at scale 1. Returns (label, scores)."""
    target = _agent_accuracy(rows)
    scores = {}
    for label in baseline_labels(regime):
        point, *_ = _baseline_point(rows, label, target)
        scores[label] = point.energy if point.status == "interpolated" else float("inf")
    if all(not np.isfinite(v) for v in scores.values()):
        at_one = {label: float(episode_matrix(rows, label, "energy_per_token", [1.0])[0].mean())
                  for label in baseline_labels(regime)}
        return min(at_one, key=at_one.get), scores
    return min(scores, key=scores.get), scores


def summary_of(rows: list[dict], policy: str, scale: float = 1.0) -> dict:
    recs = sorted((r for r in rows if r["policy"] == policy and float(r["budget_scale"]) == scale),
                  key=lambda r: r["seed"])
    if not recs:
        raise ValueError(f"no episodes of {policy!r} at budget scale {scale}")
    # per test episode, averaged over the training seeds that ran it (the headline agents of several seeds each
    # ran every episode): means and CIs over episodes, not over seed x episode records that share their episodes
    by_episode: dict = {}
    for r in recs:
        by_episode.setdefault(r["seed"], []).append(r)
    energy = [np.mean([r["energy_j"] / max(r["tokens"], 1) for r in g]) for g in by_episode.values()]
    acc = [np.mean([r.get("accuracy_correct", float("nan")) for r in g]) for g in by_episode.values()]
    return {"episodes": len(by_episode), "energy_per_token_j": float(np.mean(energy)),
            "energy_per_token_ci95": ci95(energy),
            "energy_rel_topk": float(sum(r["energy_j"] for r in recs)
                                     / max(sum(r["topk_energy_j"] for r in recs), 1e-300)),
            "accuracy": float(np.mean(acc)), "accuracy_ci95": ci95(acc),
            "violation_rate": float(sum(r["budget_violated"] for r in recs) / sum(r["steps"] for r in recs)),
            "deadline_misses_per_token": float(sum(r["deadline_misses"] for r in recs)
                                               / sum(r["tokens"] for r in recs))}


def equal_accuracy(regime: Regime, rows: list[dict], label: str, *, n_boot: int, runs=_SINGLE) -> dict:
    """The agents (``runs``: seeds and weights) against one baseline's sweep on the test episodes: the ratio at the
    headline agents' own accuracy (IQM over seeds, stratified bootstrap CI over seeds and episodes:
    :mod:`baselines.benchmark_fronts`), the baseline's violations and misses at the pooled agents' accuracy, the
    verdict and ``wins``; ``fronts`` holds every measure of the front comparison, ``per_seed`` their per-seed
    ratios."""
    agent_e, headline = agent_matrix(rows, runs, "energy_per_token")
    agent_a, _ = agent_matrix(rows, runs, "accuracy_correct")
    curve = baseline_curve(rows, label)
    topk_e, topk_a = curve["energy"][0], curve["accuracy"][0]
    fronts, per_seed = compare_fronts(agent_e, agent_a, headline, curve["energy"], curve["accuracy"], topk_e, topk_a,
                                      n_boot=n_boot, seed=0)
    own = fronts[-1]
    agent = summary_of(rows, HEADLINE)
    point, _ = _baseline_point(rows, label, agent["accuracy"])
    viol, miss, scales = curve["violation_rate"], curve["misses"], curve["scales"]
    front = accuracy_energy_front(curve["energy"].mean(axis=1), curve["accuracy"].mean(axis=1))
    base_viol, base_miss = mix_at_accuracy(point, viol), mix_at_accuracy(point, miss)
    tol = 1e-12
    # "above": the baseline cannot reach the agent's accuracy at any energy: it wins on accuracy; the violation and
    # miss comparison is then against the baseline's most accurate setting
    if point.status == "above":
        top = int(front.index[-1])
        base_viol, base_miss = float(viol[top]), float(miss[top])
    fair = ((not regime.budget_binding or agent["violation_rate"] <= base_viol + tol)
            and agent["deadline_misses_per_token"] <= base_miss + tol)
    ratio, high = own["ratio"], own["ci_high"]
    return {"regime": regime.name, "baseline": label, "seeds": int(agent_e.shape[0]), "eq_acc_ratio": ratio,
            "eq_acc_ci_low": own["ci_low"], "eq_acc_ci_high": high, "eq_acc_status": point.status,
            "eq_acc_verdict": own["verdict"], "baseline_energy_at_acc": point.energy,
            "agent_energy": agent["energy_per_token_j"], "agent_accuracy": agent["accuracy"],
            "out_of_range": own["undefined"],
            "mix": " + ".join(f"{w:.2f} x " + ("Top-K" if scales[i] == TOPK_SCALE else f"scale {scales[i]:g}")
                              for i, w in sorted(point.weights.items())),
            "baseline_violation_rate_at_acc": base_viol, "baseline_misses_at_acc": base_miss,
            "agent_violation_rate": agent["violation_rate"], "agent_misses": agent["deadline_misses_per_token"],
            "no_more_violations_or_misses": bool(fair),
            # a win: at most WIN_RATIO of the energy (IQM over seeds), the CI's upper end below 1 (not a tie), and
            # no more violations or misses
            "wins": bool(fair and np.isfinite(ratio) and ratio <= WIN_RATIO and high < 1),
            "fronts": fronts, "per_seed": per_seed}


def regime_rows(regime: Regime, rows: list[dict], best: str, comparisons: dict, training: dict,
                headroom: dict | None = None) -> list[dict]:
    """The table rows of one regime (:data:`ROLES`) from its test episodes. Gap closed is defined where the oracle
    bounds the row (no more violations than the oracle, no less energy: :func:`baselines.oracle.gap_closed`).
    ``headroom`` (:func:`baselines.benchmark_headroom.regime_headroom`) fills the best analytic row's headroom, and
    a regime under the least headroom does not count for ``wins``."""
    labels = {"topk": "topk", "topk_ideal": "topk_ideal", "best_analytic": best, "ppo": HEADLINE, "oracle": "oracle"}
    summaries = {role: summary_of(rows, policy) for role, policy in labels.items()}
    best_s, oracle_s = summaries["best_analytic"], summaries["oracle"]
    out = []
    for role in ROLES:
        s = summaries[role]
        row = {"regime": regime.name, "env": regime.env_id, "role": role, "policy": labels[role], "budget_scale": 1.0,
               **s, "gap_closed": gap_closed(best_s["energy_per_token_j"], s["energy_per_token_j"],
                                             oracle_s["energy_per_token_j"], agent_violations=s["violation_rate"],
                                             oracle_violations=oracle_s["violation_rate"],
                                             baseline_violations=best_s["violation_rate"])}
        if role == "best_analytic" and headroom is not None:
            row.update(headroom=headroom["headroom"], headroom_counts=headroom["counts_for_agents_win"])
        if role == "ppo":
            cmp = comparisons[best]
            row.update({k: cmp[k] for k in ("seeds", "eq_acc_ratio", "eq_acc_ci_low", "eq_acc_ci_high",
                                             "eq_acc_status", "eq_acc_verdict", "baseline_violation_rate_at_acc",
                                             "baseline_misses_at_acc", "wins") if k in cmp})
            if headroom is not None and not headroom["counts_for_agents_win"]:
                row["wins"] = False  # under 5% headroom: reported, not counted (baselines.headroom)
            row.update({"train_runs": training.get("runs", 1), "train_timesteps": training["timesteps"],
                        "train_cpu_s": training["cpu_s"], "train_wall_s": training["wall_s"],
                        "train_cpu_cap_hit": training.get("cpu_cap_hit", 0)})
        out.append({k: row.get(k, "") for k in TABLE_COLUMNS})
    return out


def format_fronts(rows: list[dict]) -> str:
    """The front comparison (``fronts.csv``'s rows of the chosen baselines) as Markdown: one line per regime and
    measure."""
    head = "| regime | against | measure | energy ratio: IQM over seeds (95% CI) | verdict | status |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        lines.append(f"| {r['regime']} | {r['baseline']} | {r['measure']} | {_fmt(r['ratio'], '.3f')} "
                     f"({_fmt(r['ci_low'], '.3f')}-{_fmt(r['ci_high'], '.3f')}) | {r['verdict']} | {r['status']} |")
    return "\n".join(lines)


def _fmt(value, spec: str) -> str:
    if value == "" or value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-" if value in ("", None) or (isinstance(value, float) and np.isnan(value)) else "inf"
    return format(value, spec)


def format_table(rows: list[dict]) -> str:
    """The table as Markdown (one line per regime and role)."""
    names = {"topk": "Top-K (practical)", "topk_ideal": "Top-K (ideal)", "ppo": "PPO", "oracle": "oracle"}
    head = ("| regime | policy | energy/token (J) | vs Top-K | accuracy | violations | misses/token | gap closed | "
            "E at equal accuracy: IQM over seeds (95% CI) | wins | headroom |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        label = names.get(r["role"], f"best analytic: {r['policy']}")
        ratio = ""
        if r["role"] == "ppo":
            # "<=": above the baseline's reach, bounded by its most accurate setting's energy
            bound = "<= " if r["eq_acc_status"] == "above" else ""
            seeds = f"{r['seeds']} seeds: " if r.get("seeds") not in ("", None) else ""
            ratio = (f"{seeds}{bound}{_fmt(r['eq_acc_ratio'], '.3f')} ({_fmt(r['eq_acc_ci_low'], '.3f')}-"
                     f"{_fmt(r['eq_acc_ci_high'], '.3f')}) {r.get('eq_acc_verdict', '')} vs "
                     f"{_fmt(r['baseline_violation_rate_at_acc'], '.2%')} viol, "
                     f"{_fmt(r['baseline_misses_at_acc'], '.3f')} miss")
        wins = "yes" if r["wins"] is True else ("no" if r["wins"] is False else "")
        lines.append(f"| {r['regime']} | {label} | {_fmt(r['energy_per_token_j'], '.4g')} ± "
                     f"{_fmt(r['energy_per_token_ci95'], '.2g')} | {_fmt(r['energy_rel_topk'], '.3f')} | "
                     f"{_fmt(r['accuracy'], '.4f')} ± {_fmt(r['accuracy_ci95'], '.3f')} | "
                     f"{_fmt(r['violation_rate'], '.2%')} | {_fmt(r['deadline_misses_per_token'], '.3f')} | "
                     f"{_fmt(r['gap_closed'], '.2f')} | {ratio} | {wins} | {_fmt(r.get('headroom', ''), '.2f')} |")
    return "\n".join(lines)


#: the single points of a fronts figure: (policy, legend label, marker, size, face colour, edge colour, z-order);
#: Top-K hollow and large so the agent's filled star drawn last on top of it stays visible where they coincide
_POINTS = (("topk", "Top-K (practical)", "s", 150, "none", "k", 6),
           ("topk_ideal", "Top-K (ideal)", "D", 110, "none", "0.45", 6),
           ("oracle", "oracle (scale 1)", "v", 70, "0.35", "0.35", 7),
           (HEADLINE, "PPO (all seeds)", "*", 190, "tab:red", "darkred", 10))


def plot_regime_fronts(regime: Regime, rows: list[dict], best: str, path) -> None:
    """``fronts_REGIME.png``: each baseline's accuracy-energy points over its budget scales and practical Top-K with
    the convex front the equal-accuracy comparison interpolates on (drawn to Top-K, which every front may mix
    with), 95% CI bars on the means; Top-K, the oracle and PPO as points with their CIs. The legend sits beside
    the axes, the title is wrapped, and budget scales are written once, at the ends of the best baseline's
    curve."""
    from matplotlib.lines import Line2D

    from baselines.plotting import pyplot, wrap

    plt = pyplot()
    fig = plt.figure(figsize=(10.5, 5.6))
    ax = fig.add_axes((0.08, 0.11, 0.56, 0.74))
    handles = []
    energies = []
    for i, label in enumerate(baseline_labels(regime)):
        curve = baseline_curve(rows, label)
        e, a = curve["energy"].mean(axis=1), curve["accuracy"].mean(axis=1)
        e_ci = np.array([ci95(v) for v in curve["energy"]])
        a_ci = np.array([ci95(v) for v in curve["accuracy"]])
        # each curve its own colour, marker and dash, earlier ones wider: curves that coincide stay distinguishable
        color, marker, dash = f"C{i % 10}", "osD^vP"[i % 6], ("-", "--", "-.", ":")[i % 4]
        width = max(1.0, 3.2 - 0.45 * i) + (0.6 if label == best else 0.0)
        ax.errorbar(e[1:], a[1:], xerr=np.nan_to_num(e_ci[1:]), yerr=np.nan_to_num(a_ci[1:]), fmt=marker, ms=3.5,
                    color=color, ecolor=color, elinewidth=0.6, alpha=0.55, capsize=0)
        front = accuracy_energy_front(e, a)
        ax.plot(front.energy, front.accuracy, color=color, lw=width, ls=dash, zorder=4 + 0.01 * i)
        energies += list(e)
        name = f"{label} (best)" if label == best else label
        handles.append(Line2D([], [], color=color, marker=marker, ms=4, lw=width, ls=dash, label=name))
        if label == best:
            scales = curve["scales"]
            # inward from the curve's ends: the smallest scale (most energy) to the left, the largest to the right
            for k, (dx, dy, ha) in ((1, (-14, -22, "right")), (len(scales) - 1, (14, -22, "left"))):
                ax.annotate(f"scale {scales[k]:g}", (e[k], a[k]), textcoords="offset points", xytext=(dx, dy),
                            ha=ha, fontsize=7.5, color=color, zorder=12,
                            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85},
                            arrowprops={"arrowstyle": "-", "color": color, "lw": 0.6})
    # every agent (seed, weight) as a small point: the spread over seeds the IQM summarises (salmon: the filled
    # tab:red star is the pooled headline agents)
    runs = sorted({(r["policy"], _train_seed(r)) for r in rows if str(r["policy"]).startswith(HEADLINE)})
    if len(runs) > 1:
        for policy, seed in runs:
            s = summary_of(_of_seed(rows, seed), policy)
            ax.scatter([s["energy_per_token_j"]], [s["accuracy"]], marker="." if policy == HEADLINE else "x", s=40,
                       color="salmon", zorder=9)
            energies.append(s["energy_per_token_j"])
        handles.append(Line2D([], [], ls="none", marker=".", ms=8, color="salmon",
                              label="PPO per seed (x: other weights)"))
    policies = list(dict.fromkeys(p for p, _ in runs))
    if len(policies) > 1:
        # the agents' front: each weight's point averaged over the seeds, with Top-K (as the comparison builds it)
        points = [summary_of(rows, p) for p in policies] + [summary_of(rows, "topk")]
        front = accuracy_energy_front([p["energy_per_token_j"] for p in points], [p["accuracy"] for p in points])
        ax.plot(front.energy, front.accuracy, color="salmon", lw=1.6, ls="--", zorder=8)
        handles.append(Line2D([], [], color="salmon", lw=1.6, ls="--", label="PPO front (seed means)"))
    for policy, label, marker, size, face, edge, z in _POINTS:
        if not any(r["policy"] == policy for r in rows):
            continue
        s = summary_of(rows, policy)
        x, y = s["energy_per_token_j"], s["accuracy"]
        energies.append(x)
        ax.errorbar([x], [y], xerr=[np.nan_to_num(s["energy_per_token_ci95"])],
                    yerr=[np.nan_to_num(s["accuracy_ci95"])], fmt="none", ecolor=edge, elinewidth=0.9, capsize=2.5,
                    zorder=z - 1)
        ax.scatter([x], [y], marker=marker, s=size, facecolors=face, edgecolors=edge, linewidths=1.5, zorder=z)
        handles.append(Line2D([], [], ls="none", marker=marker, ms=np.sqrt(size) * 0.8, markerfacecolor=face,
                              markeredgecolor=edge, markeredgewidth=1.5, label=label))
    finite = [v for v in energies if np.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 20:  # a zero energy (nothing executed) stays linear
        ax.set_xscale("log")
    ax.set_xlabel("energy per token (J)")
    ax.set_ylabel("real next-byte accuracy")
    ax.grid(alpha=0.3)
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.66, 0.85), fontsize=8, frameon=False,
               title="lines: front over budget scales\nand practical Top-K", title_fontsize=8)
    fig.text(0.66, 0.11, wrap("bars: 95% CI of the episode means; a front mixes two settings (the lower convex "
                              "envelope), so any point on it is reachable", 48), fontsize=7.5, color="0.3",
             va="bottom")
    fig.suptitle(wrap(f"{regime.env_id}: {regime.what}", 75), fontsize=10, x=0.36, ha="center")
    fig.savefig(path, dpi=110)
    plt.close(fig)
