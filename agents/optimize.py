"""Hyperparameter search with Optuna alone (no Ray): ``python train.py --optimize`` / ``python -m agents.optimize``.

    python train.py --optimize --n-trials 20 -n 51200
    python train.py --optimize --n-trials 40 --n-jobs 2 --storage sqlite:///runs/optuna.db --study-name ppo-wide
    python train.py --optimize --sampler grid --space seeds-budgets -n 51200

Every trial is a full ``train.py`` run (:mod:`agents.trials`) with the project's policy (the expert-set
network of ``agents/hyperparams/ALGO.yml`` unless the space or ``--policy`` says otherwise) and its final
comparison against SiftMoE and Top-K on the run's evaluation seeds, in the run folder
``LOG_FOLDER/optuna/STUDY/runs/ALGO/trial_N``. Each periodic evaluation is reported to Optuna
(``--metric``, default reward per step) and the median pruner stops poor trials (their status is
"stopped"; ``train.py --resume`` would continue them). The study lives in ``--storage``: a journal file
(default ``LOG_FOLDER/optuna/STUDY/study.journal``) or an RDB URL (``sqlite:///...``,
``postgresql://...``); running the command again adds ``--n-trials`` more trials to the same study.
``--n-jobs N`` runs N worker processes on the shared storage. At the end: the best trials against
SiftMoE and Top-K, printed and written to ``LOG_FOLDER/optuna/STUDY/best_trials.{txt,csv}``.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import sys
from pathlib import Path

from agents.common import UsageError, env_slug
from agents.search_space import load_space, optuna_grid
from agents.trials import (best_trials_table, check_metric, parse_train_args, run_budget, run_dir_of, run_trial,
                           write_table)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python train.py --optimize", allow_abbrev=False,
        description="Optuna search over train.py runs. Unknown flags are train.py's and go to every trial.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n-trials", type=int, default=10, help="trials to run in this call (all jobs together)")
    p.add_argument("--n-jobs", type=int, default=1, help="worker processes sharing the study storage")
    p.add_argument("--storage", default=None,
                   help="journal file path or RDB URL (default LOG_FOLDER/optuna/STUDY/study.journal)")
    p.add_argument("--study-name", default=None, help="study name (default ALGO_ENV)")
    p.add_argument("--sampler", default="tpe", choices=("tpe", "random", "grid"),
                   help="grid: the product of the space's 'grid' lists")
    p.add_argument("--pruner", default="median", choices=("median", "none"),
                   help="median: stop a trial whose evaluation is worse than the median of earlier trials at "
                        "the same timestep")
    p.add_argument("--space", default=None, help="search space name (default: the algorithm)")
    p.add_argument("--space-file", default=None, help="search space YAML (default agents/hyperparams/search_space.yml)")
    p.add_argument("--metric", default="reward_per_step", help="evaluation column to optimise")
    p.add_argument("--mode", default="max", choices=("max", "min"))
    p.add_argument("--search-seed", type=int, default=None, help="sampler seed")
    p.add_argument("--top", type=int, default=5, help="best trials in the closing table")
    p.add_argument("-f", "--log-folder", default="runs", help="root of the study folder")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, train_argv = build_parser().parse_known_args(argv)
    try:
        return optimize(args, train_argv)
    except UsageError as exc:
        print(f"train.py --optimize: error: {exc}", file=sys.stderr)
        return 2


def optimize(args: argparse.Namespace, train_argv: list[str]) -> int:
    try:
        import optuna
    except ImportError:
        raise UsageError("Optuna is not installed: pip install -e '.[optuna]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.n_trials < 1 or args.n_jobs < 1 or args.top < 1:
        raise UsageError("--n-trials, --n-jobs and --top must be >= 1")
    check_metric(args.metric)
    check_storage(args.storage)
    base = parse_train_args(train_argv)
    space = load_space(args.space or base.algo, args.space_file)
    if args.sampler == "grid":
        optuna_grid(space)  # raises when no parameter has a grid
    study_name = args.study_name or f"{base.algo}_{env_slug(base.env)}"
    study_dir = (Path(args.log_folder) / "optuna" / study_name).resolve()
    storage = args.storage or str(study_dir / "study.journal")
    if "://" not in storage:  # the journal file's folder
        Path(storage).resolve().parent.mkdir(parents=True, exist_ok=True)
    settings = dict(storage=storage, study_name=study_name, sampler=args.sampler, pruner=args.pruner,
                    space_name=args.space or base.algo, space_file=args.space_file, metric=args.metric,
                    mode=args.mode, search_seed=args.search_seed, train_argv=train_argv,
                    runs_root=str(study_dir / "runs"))
    try:
        study = open_study(settings)  # created here once, before the workers load it
    except (ImportError, OSError, ValueError) as exc:
        raise UsageError(f"--storage {storage!r}: cannot open the study there ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # noqa: BLE001  (sqlalchemy's errors: a database that refuses the connection)
        if type(exc).__module__.split(".")[0] != "sqlalchemy":
            raise
        raise UsageError(f"--storage {storage!r}: cannot open the study there ({type(exc).__name__}: {exc})") from None
    study_dir.mkdir(parents=True, exist_ok=True)
    shares = [args.n_trials // args.n_jobs + (i < args.n_trials % args.n_jobs) for i in range(args.n_jobs)]
    if args.n_jobs == 1:
        run_worker(settings, shares[0], 0)
    else:  # processes, not threads: training is numpy / torch work that holds the GIL between calls
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=run_worker, args=(settings, n, i)) for i, n in enumerate(shares) if n]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        failed = [p.exitcode for p in procs if p.exitcode != 0]
        if failed:
            print(f"warning: {len(failed)} worker process(es) exited with {failed}", file=sys.stderr)
    study = open_study(settings)
    trials = []
    for t in study.trials:
        name = f"trial_{t.number}"
        value = t.value if t.value is not None else (list(t.intermediate_values.values()) or [None])[-1]
        trials.append({"name": name, "params": t.params, "value": value, "state": t.state.name.lower(),
                       "run_dir": run_dir_of(train_argv, Path(settings["runs_root"]), name)})
    text, rows = best_trials_table(trials, metric=args.metric, mode=args.mode, top=args.top)
    counts = {s: sum(t["state"] == s for t in trials) for s in ("complete", "pruned", "fail", "running")}
    print(f"\nstudy {study_name} ({storage}): {len(trials)} trials {counts}; best by {args.metric} ({args.mode}):\n{text}")
    write_table(text, rows, study_dir)
    print(f"wrote {study_dir / 'best_trials.txt'} and best_trials.csv")
    return 0 if counts["complete"] else 1


def check_storage(storage: str | None) -> None:
    """A --storage that is an RDB URL must name a database Optuna can use; checked before anything is written."""
    if storage is None or "://" not in storage:
        return
    try:
        from sqlalchemy.engine import make_url

        make_url(storage).get_dialect()
    except Exception as exc:  # noqa: BLE001  (ArgumentError, NoSuchModuleError, a missing driver's ImportError)
        raise UsageError(f"--storage {storage!r} is not a database URL Optuna can use ({type(exc).__name__}: {exc}); "
                         "pass a journal file path (e.g. runs/optuna/study.journal) or an RDB URL such as "
                         "sqlite:///runs/optuna.db or postgresql://user@host/db") from None


def open_study(settings: dict, worker: int = 0):
    """The study (created on first use); ``worker`` offsets the sampler seed so that parallel workers
    do not draw the same samples."""
    import optuna

    storage = settings["storage"]
    if "://" not in storage:  # a journal file: safe for several processes on one file system
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        storage = JournalStorage(JournalFileBackend(storage))
    seed = None if settings["search_seed"] is None else settings["search_seed"] + worker
    if settings["sampler"] == "grid":
        space = load_space(settings["space_name"], settings["space_file"])
        sampler = optuna.samplers.GridSampler(optuna_grid(space), seed=seed)
    elif settings["sampler"] == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed)
    # no pruning before the second evaluation: the first one scores the untrained policy
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1) if settings["pruner"] == "median"
              else optuna.pruners.NopPruner())
    return optuna.create_study(storage=storage, study_name=settings["study_name"], sampler=sampler, pruner=pruner,
                               direction="maximize" if settings["mode"] == "max" else "minimize",
                               load_if_exists=True)


def run_worker(settings: dict, n_trials: int, index: int) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(settings, worker=index)
    study.optimize(functools.partial(objective, settings=settings), n_trials=n_trials)


def objective(trial, *, settings: dict) -> float:
    """One train.py run; its evaluations are the trial's intermediate values, the last one its value."""
    import optuna

    space = load_space(settings["space_name"], settings["space_file"])
    if settings["sampler"] == "grid":  # GridSampler fixes the grid parameters; the others keep the YAML's
        sample = {name: p.suggest(trial) for name, p in space.items() if p.grid is not None}
    else:
        sample = {name: p.suggest(trial) for name, p in space.items() if p.values is not None or p.low is not None}
    metric = settings["metric"]
    last = {"value": None, "pruned": False}
    budget = None

    def report(metrics: dict) -> bool:
        nonlocal budget
        if metric not in metrics:
            raise UsageError(f"--metric {metric!r} is not an evaluation column; reported: {sorted(metrics)}")
        if budget is None:
            budget = run_budget(metrics["run_dir"])
        step = int(metrics["timesteps"])
        last["value"] = float(metrics[metric])
        trial.report(last["value"], step)
        if step < budget and trial.should_prune():
            last["pruned"] = True
            return True
        return False

    run_trial(settings["train_argv"], sample, Path(settings["runs_root"]), f"trial_{trial.number}", report)
    if last["pruned"]:
        raise optuna.TrialPruned(f"pruned at {metric} = {last['value']:.4g}")
    if last["value"] is None:
        raise RuntimeError("the run reported no evaluation (is --eval-freq negative?)")
    return last["value"]


if __name__ == "__main__":
    sys.exit(main())
