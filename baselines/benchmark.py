r"""The regimes benchmark: PPO against Top-K, the causal analytic baselines and the hindsight oracle, at equal
real accuracy, on held-out seeds.

    python -m baselines.benchmark --out runs/benchmark [--quick] [--regimes token,episode,queues,accuracy] \
        [--test-episodes 200] [--selection-episodes 50] [--cpu-minutes 15]

Per regime (:data:`REGIMES`: a registered preset each, whose PPO hyperparameters are the preset's entry of
``agents/hyperparams/ppo.yml``):

1. **Train** PPO with the expert-set policy exactly as ``python train.py --env PRESET`` does (same YAML entry,
   seed 0), stopped at ``--cpu-minutes`` of CPU time (``time.process_time``) if it has not finished by then;
   the agent is the run's final model. ``--quick``: a few thousand timesteps instead (a smoke run).
2. **Select** the best causal analytic baseline on the selection seeds (``SELECTION_SEED + i``): every baseline of
   the regime is swept over the budget scales (:data:`SCALES`; its curve also holds practical Top-K, the
   budget-free end) and the one that needs the least energy at the agent's accuracy there
   (:mod:`baselines.equal_accuracy`: its convex accuracy-energy front) is chosen.
3. **Test** on held-out seeds (``TEST_SEED + i``, never used for training, model choice or baseline choice):
   practical Top-K, ideal Top-K (deadlines not enforced), every baseline over every scale, PPO and the oracle
   (the exact hindsight optimum of the best baseline's budget at scale 1: a lower bound of the energy on the
   proxy, not of the energy at equal accuracy).

Table (``benchmark.csv``, ``benchmark.md``, printed): per regime the rows Top-K (practical), Top-K (ideal), the
best analytic baseline at the regime's budget (scale 1), PPO and the oracle, with energy per token (J, mean and
95% CI over episodes), energy relative to Top-K, real next-byte accuracy (``accuracy_correct``, mean and 95% CI),
budget violations (share of decisions), deadline misses per token, ``gap_closed`` = (E_best - E_row) /
(E_best - E_oracle) (the share of the best analytic baseline's energy gap to the oracle a row closes; 0 for the
baseline, 1 for the oracle), and for PPO the **equal-accuracy energy ratio** E_PPO / E*_best(a_PPO) with its
paired bootstrap 95% CI, the baseline's violations and misses at that point (its mixture of the two budget
settings around a_PPO), and ``wins``: ratio <= 0.9 with no more violations (where the regime's objective has a
budget) and no more deadline misses than that point. ``equal_accuracy.csv`` has the ratio against every
baseline. Also written: ``episodes_REGIME.csv`` (every test episode), ``fronts_REGIME.png`` (accuracy-energy
fronts with the agent's point), ``runs/ppo/REGIME/`` (the training run folders), ``benchmark.json`` (settings,
command line, wall and CPU times).
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import shlex
import sys
import time
from pathlib import Path

from baselines.agent_plugin import agent_plugin
from baselines.benchmark_regimes import FULL, QUICK, REGIMES, SELECTION_SEED, TEST_SEED, TRAIN_SEED, Regime
from baselines.benchmark_scoring import (baseline_labels, choose_best, equal_accuracy, format_table, plot_regime_fronts,
                                         regime_rows)
from baselines.results import write_csv
from baselines.rollout import evaluate_policies

__all__ = ["train_agent", "run_regime", "run_benchmark", "main"]


def _factory(name: str, kwargs: dict):
    from baselines.policies import make_policy

    def build(env):
        return make_policy(name, env, **kwargs)

    build.is_policy_factory = True
    return build


def _span_kwargs(name: str, kwargs: dict, settings: dict) -> dict:
    """Span statistics (sdp, dpp) from ``stats_episodes`` sample episodes, cached under the run folder."""
    if name in ("siftmoe_sdp", "siftmoe_dpp"):
        return {"stats_episodes": settings["stats_episodes"], "cache_dir": settings["stats_dir"], **kwargs}
    return dict(kwargs)


# ---- training ---------------------------------------------------------------------------------------
def train_agent(regime: Regime, out: Path, *, timesteps: int | None, cpu_minutes: float, quick: bool) -> dict:
    """``python train.py --env PRESET`` (its YAML entry, seed 0) into OUT/runs; returns the model path and the
    training's CPU and wall seconds (this process's ``time.process_time``)."""
    argv = ["--env", regime.env_id, "--seed", str(TRAIN_SEED), "-f", str(out / "runs"), "--run-name", regime.name,
            "--no-compare", "-tb", "none", "--max-cpu-minutes", f"{cpu_minutes:g}"]
    if timesteps is not None:
        argv += ["-n", str(timesteps)]
    if quick:
        argv += ["--eval-freq", "0", "--eval-episodes", "2", "--save-freq", "0", "-v", "0"]
    cpu0, wall0 = time.process_time(), time.time()
    run_dir = Path(agent_plugin("the benchmark's agent training").train(argv))
    cpu, wall = time.process_time() - cpu0, time.time() - wall0
    status = json.loads((run_dir / "status.json").read_text())
    return {"model": str(run_dir / "final_model.zip"), "run_dir": str(run_dir), "cpu_s": cpu, "wall_s": wall,
            "timesteps": int(status.get("num_timesteps", status.get("timesteps", 0))),
            "command": "python train.py " + shlex.join(argv)}


# ---- evaluation -------------------------------------------------------------------------------------
def _agent_factory(model: str):
    return _factory(f"ppo:{model}", {})


def _sweep(regime: Regime, model: str, *, episodes: int, seed: int, scales, settings: dict,
           fixed: bool, oracle_config: dict | None = None) -> list[dict]:
    """Per-episode records: every baseline at every scale, practical Top-K (the budget-free end of every curve)
    and PPO at scale 1 (and, with ``fixed``, ideal Top-K and the oracle at scale 1, the oracle under
    ``oracle_config``: the best baseline's budget)."""
    rows: list[dict] = []
    for b in regime.baselines:
        evaluate_policies(regime.env_id, [(b.label, _factory(b.policy, _span_kwargs(b.policy, b.kwargs, settings)))],
                          episodes=episodes, seed=seed, budget_scales=scales, progress=False, episode_rows=rows,
                          env_kwargs={"config": b.config} if b.config else None)
    points = ["topk", ("ppo", _agent_factory(model))]
    if fixed:
        points = ["topk", "topk_ideal", points[1]]
        evaluate_policies(regime.env_id, [("oracle", _factory("oracle", {}))], episodes=episodes, seed=seed,
                          progress=False, episode_rows=rows,
                          env_kwargs={"config": oracle_config} if oracle_config else None)
    evaluate_policies(regime.env_id, points, episodes=episodes, seed=seed, progress=False, episode_rows=rows)
    return rows


def _plot(regime: Regime, rows: list[dict], best: str, path: Path) -> None:
    plot_regime_fronts(regime, rows, best, path)


def run_regime(regime: Regime, out: Path, settings: dict) -> dict:
    t0, cpu0 = time.time(), time.process_time()
    print(f"== {regime.name}: {regime.env_id} ({regime.what})", flush=True)
    training = train_agent(regime, out, timesteps=settings.get("timesteps"), cpu_minutes=settings["cpu_minutes"],
                           quick=settings["quick"])
    print(f"   trained {training['timesteps']} timesteps: {training['cpu_s'] / 60:.1f} CPU-min, "
          f"{training['wall_s'] / 60:.1f} min wall", flush=True)
    selection = _sweep(regime, training["model"], episodes=settings["selection_episodes"], seed=SELECTION_SEED,
                       scales=settings["scales"], settings=settings, fixed=False)
    best, scores = choose_best(regime, selection)
    print(f"   best causal analytic baseline on the selection seeds: {best}", flush=True)
    # the oracle solves the best baseline's problem (its budget mode: for the accuracy objective, whose own env
    # has no budget in its reward, that is the mode the chosen baseline ran under), so gap closed compares alike
    best_config = next(b.config for b in regime.baselines if b.label == best)
    test = _sweep(regime, training["model"], episodes=settings["test_episodes"], seed=TEST_SEED,
                  scales=settings["scales"], settings=settings, fixed=True, oracle_config=best_config)
    comparisons = {label: equal_accuracy(regime, test, label, n_boot=settings["n_boot"]) for label in baseline_labels(regime)}
    for label in comparisons:
        comparisons[label]["selection_energy_at_acc"] = scores[label]
        comparisons[label]["chosen"] = label == best
    table = regime_rows(regime, test, best, comparisons, training)
    write_csv(test, out / f"episodes_{regime.name}.csv")
    _plot(regime, test, best, out / f"fronts_{regime.name}.png")
    return {"rows": table, "comparisons": list(comparisons.values()), "training": training, "best": best,
            "wall_s": time.time() - t0, "cpu_s": time.process_time() - cpu0}


def run_benchmark(out, regimes=None, *, quick: bool = False, test_episodes: int | None = None,
                  selection_episodes: int | None = None, cpu_minutes: float = 15.0, command: str = "") -> list[dict]:
    """Run the benchmark into ``out`` (see the module docstring); returns the table rows."""
    if isinstance(cpu_minutes, bool) or not isinstance(cpu_minutes, numbers.Real) or not 0 < cpu_minutes < math.inf:
        raise ValueError(f"cpu_minutes (--cpu-minutes) = {cpu_minutes!r}: the CPU-time cap of each training run must "
                         "be a positive number of minutes, e.g. 15")
    import torch

    torch.set_num_threads(1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(REGIMES) if regimes is None else list(regimes)
    unknown = [n for n in names if n not in REGIMES]
    if unknown or not names:
        raise ValueError(f"unknown regimes {unknown}; choose from {list(REGIMES)}")
    settings = dict(QUICK if quick else FULL)
    if test_episodes is not None:
        settings["test_episodes"] = int(test_episodes)
    if selection_episodes is not None:
        settings["selection_episodes"] = int(selection_episodes)
    settings.update(quick=quick, cpu_minutes=float(cpu_minutes), stats_dir=str(out / "span_stats"))
    t0, cpu0 = time.time(), time.process_time()
    rows, comparisons, per_regime = [], [], {}
    for name in names:
        result = run_regime(REGIMES[name], out, settings)
        rows += result["rows"]
        comparisons += result["comparisons"]
        per_regime[name] = {k: result[k] for k in ("best", "wall_s", "cpu_s")} | {"training": result["training"]}
        write_csv(rows, out / "benchmark.csv")  # after every regime: a partial table survives an interruption
        write_csv(comparisons, out / "equal_accuracy.csv")
    text = format_table(rows)
    (out / "benchmark.md").write_text(text + "\n")
    meta = {"command": command, "wall_s": time.time() - t0, "cpu_s": time.process_time() - cpu0,
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()},
            "test_seeds": [TEST_SEED, TEST_SEED + settings["test_episodes"] - 1],
            "selection_seeds": [SELECTION_SEED, SELECTION_SEED + settings["selection_episodes"] - 1],
            "regimes": per_regime}
    (out / "benchmark.json").write_text(json.dumps(meta, indent=1, default=str))
    print(text)
    print(f"wrote {out / 'benchmark.csv'}, {out / 'benchmark.md'}, {out / 'equal_accuracy.csv'}; "
          f"{meta['wall_s'] / 60:.1f} min wall, {meta['cpu_s'] / 60:.1f} CPU-min")
    return rows


def _positive_minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of minutes > 0, got {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number of minutes > 0 (the CPU-time cap of each "
                                         f"training run), got {text}")
    return value


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m baselines.benchmark", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="run folder (created)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny training and evaluation budgets")
    ap.add_argument("--regimes", default=",".join(REGIMES), help=f"comma-separated subset of {list(REGIMES)}")
    ap.add_argument("--test-episodes", type=int, default=None, help="held-out episodes (default 200; quick 4)")
    ap.add_argument("--selection-episodes", type=int, default=None,
                    help="episodes that choose the best baseline (default 50; quick 3)")
    ap.add_argument("--cpu-minutes", type=_positive_minutes, default=15.0,
                    help="CPU-time cap of each training run, minutes > 0 (default 15)")
    args = ap.parse_args(argv)
    for name, value in (("--test-episodes", args.test_episodes), ("--selection-episodes", args.selection_episodes)):
        if value is not None and value < 2:
            ap.error(f"{name} must be >= 2 (confidence intervals need two episodes)")
    regimes = [r.strip() for r in args.regimes.split(",") if r.strip()]
    command = "python -m baselines.benchmark " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    try:
        return run_benchmark(args.out, regimes, quick=args.quick, test_episodes=args.test_episodes,
                             selection_episodes=args.selection_episodes, cpu_minutes=args.cpu_minutes,
                             command=command)
    except ValueError as exc:
        ap.exit(2, f"{ap.prog}: error: {exc}\n")


if __name__ == "__main__":
    main()
