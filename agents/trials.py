"""One sweep trial = one ``train.py`` run, and the sweep's closing table (shared by agents.tune and agents.optimize).

A trial owns the run folder ``RUNS_ROOT/ALGO/NAME`` (NAME: the trial's id). Its sampled hyperparameters are
written as a conf file beside the run folders (``RUNS_ROOT/ALGO/NAME.hyperparams.yml``), so the run's
``command.txt`` is an ordinary ``train.py`` command that reproduces it. A trial that finds its run folder
already written (a restored sweep, a retried trial) continues it with ``train.py --resume``: the run's own
crash-safe checkpoints, with the same total budget.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

from agents.common import UsageError, load_hyperparams, parse_env_kwargs
from wide_env.config import deep_merge
from agents.search_space import split_sample

#: train.py flags a sweep sets itself for every trial
SWEEP_OWNED_FLAGS = ("-f", "--log-folder", "--run-name", "--resume", "--optimize")
#: flags of train.py that still apply when a trial resumes its run folder
_RESUME_FLAGS = {"-v": 1, "--verbose": 1, "--progress": 0, "--no-compare": 0, "--num-threads": 1}
#: evaluation columns reported to the search engines (every eval_log row, plus the SiftMoE-relative ones)
REPORTED = ("timesteps", "reward_per_step", "energy_per_token_j", "energy_rel_topk", "energy_pct_of_siftmoe",
            "violation_rate", "violation_rate_above_siftmoe", "deadline_misses_per_token", "executed_per_step")


def metric_names() -> tuple[str, ...]:
    """The evaluation columns a sweep may optimise: :data:`REPORTED` and the env's real-accuracy figures."""
    from wide_env.envs.decode import ACCURACY_KEYS

    return REPORTED + tuple(k for k in ACCURACY_KEYS if k.startswith("accuracy_"))


def check_metric(metric: str) -> str:
    """UsageError naming --metric and the valid names, before any trial runs."""
    names = metric_names()
    if metric not in names:
        import difflib

        close = difflib.get_close_matches(metric, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"--metric {metric!r} is not a reported evaluation column.{hint} Choose one of: "
                         f"{', '.join(names)} (accuracy_* only on envs that report accuracy)")
    return metric


def parse_train_args(argv: list[str]) -> argparse.Namespace:
    """train.py's own parser on the pass-through flags; sweep-owned flags are rejected with the reason."""
    from agents.run_config import DEFAULTS, build_parser

    owned = [a for a in argv if a.split("=", 1)[0] in SWEEP_OWNED_FLAGS]
    if owned:
        raise UsageError(f"{owned[0]} is set by the sweep for each trial (run folders go under the sweep's "
                         "storage; interrupted trials resume by themselves); drop it")
    args = build_parser().parse_args(argv)
    # train.py leaves unset flags None (to tell them from a --resume's); the sweeps read these four
    for name, value in {"algo": DEFAULTS["algo"], "env": DEFAULTS["env"], "seed": DEFAULTS["seed"],
                        "log_folder": "runs"}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def resume_flags(argv: list[str]) -> list[str]:
    """The pass-through flags that still mean something for ``train.py --resume``."""
    out, i = [], 0
    while i < len(argv):
        name = argv[i].split("=", 1)[0]
        if name in _RESUME_FLAGS:
            n = 0 if "=" in argv[i] else _RESUME_FLAGS[name]
            out += argv[i:i + 1 + n]
            i += 1 + n
        else:
            i += 1
    return out


def trial_argv(base_argv: list[str], sample: Mapping[str, Any], runs_root: Path, name: str) -> list[str]:
    """train.py arguments of a new trial: the pass-through flags, the sampled run settings, a conf file with
    the sampled hyperparameters merged over the YAML's, and the trial's run folder."""
    base = parse_train_args(base_argv)
    run, hyper = split_sample(sample)
    env_id = run.get("env", base.env)
    argv = list(base_argv)
    if "seed" in run:
        argv += ["--seed", str(int(run["seed"]))]
    if "env" in run:
        argv += ["--env", str(env_id)]
    if "env_kwargs" in run:
        env_kwargs = deep_merge(parse_env_kwargs(base.env_kwargs), run["env_kwargs"])
        argv += ["--env-kwargs", repr(env_kwargs)]
    if hyper:
        import yaml

        hp, _ = load_hyperparams(base.algo, env_id, base.conf_file)
        conf = Path(runs_root) / base.algo / f"{name}.hyperparams.yml"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(yaml.safe_dump({"default": deep_merge(hp, hyper)}, sort_keys=False))
        argv += ["--conf-file", str(conf)]
    return argv + ["-f", str(runs_root), "--run-name", name]


def run_dir_of(base_argv: list[str], runs_root: Path, name: str) -> Path:
    return Path(runs_root) / parse_train_args(base_argv).algo / name


def run_trial(base_argv: list[str], sample: Mapping[str, Any], runs_root: Path, name: str,
              report: Callable[[dict], Any]) -> Path:
    """Train one trial (in this process) and pass every evaluation, as :func:`metrics_of` reports it, to
    ``report``; a truthy return of ``report`` stops the run early (pruning). Returns the run folder."""
    from agents.run_config import build_parser
    from agents.training import train

    runs_root = Path(runs_root).resolve()
    run_dir = run_dir_of(base_argv, runs_root, name)
    if (run_dir / "config.yml").exists():
        argv = ["--resume", str(run_dir), *resume_flags(base_argv)]
    else:
        if run_dir.exists():  # killed before its config was written: nothing to keep
            shutil.rmtree(run_dir)
        argv = trial_argv(base_argv, sample, runs_root, name)
    args = build_parser().parse_args(argv)

    def on_evaluation(row: dict):
        return report(metrics_of(row, run_dir))

    train(args, argv, on_evaluation=on_evaluation)
    return run_dir


def metrics_of(row: Mapping[str, Any], run_dir: Path) -> dict:
    """An eval_log row with energy as % of SiftMoE's and the violation rate above SiftMoE's (the run's
    ``eval/reference.csv``: same evaluation seeds), plus the run folder."""
    from agents.evaluation import add_relative_columns

    rec = {k: float(v) for k, v in row.items()}
    sift = [r for r in read_csv(Path(run_dir) / "eval" / "reference.csv") if r.get("policy") == "siftmoe"]
    if sift:
        agent = {**rec, "policy": "agent"}
        add_relative_columns([agent, *sift])
        rec.update({k: agent[k] for k in ("energy_pct_of_siftmoe", "violation_rate_above_siftmoe") if k in agent})
    rec["timesteps"] = int(rec["timesteps"])
    out = {k: rec[k] for k in REPORTED if k in rec}
    out.update({k: v for k, v in rec.items() if k.startswith("accuracy_")})
    out["run_dir"] = str(run_dir)
    return out


def read_csv(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [{k: _number(v) for k, v in r.items()} for r in rows]


def _number(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


# ---- the closing table ------------------------------------------------------------------------------------
def best_trials_table(trials: list[dict], *, metric: str, mode: str, top: int = 5) -> tuple[str, list[dict]]:
    """Best trials against SiftMoE and Top-K on the same evaluation seeds.

    trials: dicts with ``name``, ``params`` (the sample), ``run_dir``, ``state`` and ``value`` (the metric's
    last reported value, None if never reported). Each trial's numbers come from its run's
    ``comparison.csv`` (final model, SiftMoE and Top-K on the run's evaluation seeds); a trial stopped
    early has no comparison and shows its last evaluation. Trials are grouped by environment and env kwargs
    (the reference policies differ between groups). Returns (text, rows for a CSV)."""
    ranked = [t for t in trials if t.get("value") is not None and math.isfinite(float(t["value"]))]
    ranked.sort(key=lambda t: float(t["value"]), reverse=(mode == "max"))
    groups: dict[str, list[dict]] = {}
    for t in ranked:
        cfg = _run_config(t["run_dir"])
        key = json.dumps([cfg.get("env"), cfg.get("env_kwargs")], sort_keys=True)
        groups.setdefault(key, []).append(t)
    lines, rows = [], []
    head = (f"{'trial / policy':<28} {'state':<10} {metric[:16]:>16} {'E/token (J)':>22} {'vs Top-K':>8} "
            f"{'% SiftMoE':>9} {'viol %':>7} {'accuracy':>8}  params")
    for key, members in groups.items():
        env, env_kwargs = json.loads(key)
        cfg = _run_config(members[0]["run_dir"])
        seeds = ""
        if cfg:
            seeds = f", {cfg['eval_episodes']} episodes, seeds {cfg['eval_seed']}..{cfg['eval_seed'] + cfg['eval_episodes'] - 1}"
        lines += [f"{env}{' ' + repr(env_kwargs) if env_kwargs else ''}{seeds}", head, "-" * len(head)]
        reference = []
        for t in members[:top]:
            comparison = read_csv(Path(t["run_dir"]) / "comparison.csv")
            final = next((r for r in comparison if str(r.get("policy", "")).endswith("(final)")), None)
            if final is None:  # stopped early (or still running): its last evaluation
                log = read_csv(Path(t["run_dir"]) / "eval" / "eval_log.csv")
                final = metrics_of(log[-1], t["run_dir"]) if log else {}
            reference = reference or [r for r in comparison if r.get("policy") in ("siftmoe", "topk")]
            row = {"trial": t["name"], "state": t.get("state", ""), metric: t["value"], **_cells(final),
                   "params": json.dumps(t.get("params", {}), sort_keys=True), "run_dir": str(t["run_dir"])}
            rows.append(row)
            lines.append(_line(row, metric))
        if not reference:  # no finished trial in this group: the runs' evaluation references
            reference = [r for r in read_csv(Path(members[0]["run_dir"]) / "eval" / "reference.csv")]
            from agents.evaluation import add_relative_columns

            add_relative_columns(reference)
        for r in reference:
            row = {"trial": str(r["policy"]), "state": "reference", metric: None, **_cells(r), "params": "",
                   "run_dir": ""}
            rows.append(row)
            lines.append(_line(row, metric))
        lines.append("")
    if not ranked:
        lines.append(f"no trial reported {metric!r}")
    return "\n".join(lines), rows


def _cells(r: Mapping[str, Any]) -> dict:
    acc = r.get("accuracy_correct", float("nan"))
    return {"energy_per_token_j": r.get("energy_per_token_j", float("nan")),
            "energy_per_token_ci95": r.get("energy_per_token_ci95", float("nan")),
            "energy_rel_topk": r.get("energy_rel_topk", float("nan")),
            "energy_pct_of_siftmoe": r.get("energy_pct_of_siftmoe", float("nan")),
            "violation_rate": r.get("violation_rate", float("nan")), "accuracy_correct": acc,
            "timesteps": r.get("timesteps", "")}


def _line(row: dict, metric: str) -> str:
    value = row.get(metric)
    v = f"{value:>16.4g}" if isinstance(value, (int, float)) else f"{'':>16}"
    ci = row["energy_per_token_ci95"]
    e = f"{row['energy_per_token_j']:.4g}" + (f" ± {ci:.2g}" if isinstance(ci, float) and math.isfinite(ci) else "")
    return (f"{row['trial'][:28]:<28} {row['state'][:10]:<10} {v} {e:>22} {row['energy_rel_topk']:>8.3f} "
            f"{row['energy_pct_of_siftmoe']:>9.1f} {100 * row['violation_rate']:>7.2f} "
            f"{row['accuracy_correct']:>8.4f}  {row['params']}")


def run_budget(run_dir) -> int:
    """The run's total budget in timesteps (its resolved ``config.yml``)."""
    return int(_run_config(run_dir)["n_timesteps"])


def _run_config(run_dir) -> dict:
    path = Path(run_dir) / "config.yml"
    if not path.exists():
        return {}
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def write_table(text: str, rows: list[dict], folder: Path) -> None:
    from agents.evaluation import write_csv

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "best_trials.txt").write_text(text + "\n")
    if rows:
        write_csv(rows, folder / "best_trials.csv")
