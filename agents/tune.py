"""Hyperparameter sweeps and many-seed training on Ray Tune: ``python -m agents.tune``.

    python -m agents.tune --search grid -n 51200 --storage-path /shared/sweeps --name ppo-grid
    python -m agents.tune --search optuna --num-samples 20 --address auto --env wide_env/WideMoE-Stragglers-v0
    python -m agents.tune --space seeds-budgets --search grid -n 51200          # 5 seeds x 3 budgets x 2 envs
    python -m agents.tune --storage-path /shared/sweeps --name ppo-grid --restore   # after an interruption

One trial is one ``train.py`` run (:mod:`agents.trials`): its run folder ``STORAGE/NAME/runs/ALGO/TRIAL_ID``
holds the usual contents (command line, resolved config, crash-safe checkpoints, ``eval/eval_log.csv``,
``comparison.csv``). Every periodic evaluation is reported to Tune (reward per step, energy per token,
energy vs Top-K, % of SiftMoE's energy, violation rates, deadline misses, real accuracy), so ASHA stops
poor trials early. Flags this module does not know are ``train.py``'s and pass through to every trial
(``-n``, ``--algo``, ``--env``, ``--env-kwargs``, ``--eval-freq``, ...). The search space is a named entry
of ``agents/hyperparams/search_space.yml`` (see :mod:`agents.search_space`).

At the end: the best trials against SiftMoE and Top-K on the same evaluation seeds, printed and written to
``STORAGE/NAME/best_trials.{txt,csv}``. ``--restore`` continues an interrupted sweep: Tune restores its
experiment state, and every unfinished trial continues its run folder from its latest checkpoint
(``train.py --resume``) to the full budget. With several machines, ``--storage-path`` must be a folder
that every node sees at the same path (e.g. NFS): the trials write their run folders there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agents.common import UsageError, env_slug
from agents.search_space import Param, load_space, tune_param_space
from agents.trials import (best_trials_table, check_metric, metrics_of, parse_train_args, read_csv, run_budget,
                           run_dir_of, run_trial, write_table)

SEARCHES = ("grid", "optuna")
SWEEP_FILE = "sweep.json"  # the sweep's own settings, read back by --restore


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m agents.tune", allow_abbrev=False,
        description="Ray Tune sweep of train.py runs (one trial = one run folder). Unknown flags are "
                    "train.py's and go to every trial (see python train.py --help).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--search", default="grid", choices=SEARCHES,
                   help="grid: the product of the space's 'grid' lists; optuna: Optuna's TPE over values / ranges")
    p.add_argument("--num-samples", type=int, default=1,
                   help="trials to sample (optuna), or repeats of the whole grid (grid)")
    p.add_argument("--space", default=None, help="search space name in the space file (default: the algorithm)")
    p.add_argument("--space-file", default=None, help="search space YAML (default agents/hyperparams/search_space.yml)")
    p.add_argument("--metric", default="reward_per_step",
                   help="reported evaluation column to optimise (e.g. energy_pct_of_siftmoe with --mode min)")
    p.add_argument("--mode", default="max", choices=("max", "min"))
    p.add_argument("--scheduler", default="asha", choices=("asha", "fifo"),
                   help="asha: stop poor trials at evaluation milestones; fifo: run every trial to its budget")
    p.add_argument("--grace-period", type=int, default=None,
                   help="ASHA: timesteps before a trial may be stopped (default: the evaluation interval)")
    p.add_argument("--reduction-factor", type=float, default=3.0, help="ASHA: keep 1/factor trials per milestone")
    p.add_argument("--storage-path", default="runs/tune",
                   help="experiment root shared by the trials (on several machines: a path all nodes see)")
    p.add_argument("--name", default=None, help="experiment name (default ALGO_ENV_SEARCH)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join ('auto': the running cluster of 'ray start'; default: a local Ray)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs reserved per trial")
    p.add_argument("--max-concurrent", type=int, default=None, help="at most this many trials at once")
    p.add_argument("--max-failures", type=int, default=2,
                   help="retries of a trial whose worker died (it resumes its run folder)")
    p.add_argument("--search-seed", type=int, default=None, help="seed of the Optuna sampler")
    p.add_argument("--top", type=int, default=5, help="best trials in the closing table")
    p.add_argument("--restore", action="store_true",
                   help="continue the interrupted sweep STORAGE_PATH/NAME (its settings are read back)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, train_argv = build_parser().parse_known_args(argv)
    try:
        return sweep(args, train_argv)
    except UsageError as exc:
        print(f"python -m agents.tune: error: {exc}", file=sys.stderr)
        return 2


def sweep(args: argparse.Namespace, train_argv: list[str]) -> int:
    try:
        from ray import tune
    except ImportError:
        raise UsageError("Ray Tune is not installed: pip install -e '.[train,ray]' (ray[tune] and optuna)") from None

    from baselines.sweep import RayConnectError, connect_ray

    storage = Path(args.storage_path).resolve()
    if args.restore:
        if not args.name:
            raise UsageError("--restore needs the --name (and --storage-path) of the sweep to continue")
        exp_dir = storage / args.name
        if not (exp_dir / SWEEP_FILE).exists() or not tune.Tuner.can_restore(str(exp_dir)):
            raise UsageError(f"nothing to restore at {exp_dir}: no sweep was started there")
        settings = json.loads((exp_dir / SWEEP_FILE).read_text())
        if train_argv:
            print(f"note: --restore uses the sweep's own train.py flags {settings['train_argv']}; ignoring {train_argv}")
    else:
        settings = new_sweep(args, train_argv, storage)
        exp_dir = storage / settings["name"]
    try:
        connect_ray(args.address)
    except RayConnectError as exc:  # bounded: names the address instead of Ray's ten-minute retries
        raise UsageError(str(exc)) from None
    trainable = tune.with_resources(
        tune.with_parameters(tune_trial, train_argv=settings["train_argv"], runs_root=settings["runs_root"]),
        {"cpu": float(settings["cpus_per_trial"])})
    if args.restore:
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        exp_dir.mkdir(parents=True, exist_ok=True)
        (exp_dir / SWEEP_FILE).write_text(json.dumps(settings, indent=1))
        tuner = tune.Tuner(trainable, param_space=settings_param_space(settings),
                           tune_config=tune_config(settings), run_config=run_config(settings, storage))
    results = tuner.fit()
    trials = []
    for result in results:
        metrics = result.metrics or {}
        if "trial_id" not in metrics:  # never reported (failed before its first evaluation)
            trials.append({"name": Path(result.path).name, "state": "error", "value": None})
            continue
        name = metrics["trial_id"]
        run_dir = run_dir_of(settings["train_argv"], Path(settings["runs_root"]), name)
        state = "error" if result.error else _run_state(run_dir)
        if state == "running":  # the sweep is over: the scheduler stopped it
            state = "stopped"
        trials.append({"name": name, "params": result.config, "run_dir": run_dir,
                       "value": metrics.get(settings["metric"]), "state": state})
    text, rows = best_trials_table(trials, metric=settings["metric"], mode=settings["mode"], top=args.top)
    print(f"\nbest trials of {exp_dir} by {settings['metric']} ({settings['mode']}):\n{text}")
    write_table(text, rows, exp_dir)
    print(f"wrote {exp_dir / 'best_trials.txt'} and best_trials.csv; run folders under {settings['runs_root']}")
    errors = [t["name"] for t in trials if t["state"] == "error"]
    if errors:
        print(f"{len(errors)} trial(s) failed: {errors}; their errors are in {exp_dir}", file=sys.stderr)
    return 1 if errors and len(errors) == len(trials) else 0


def new_sweep(args: argparse.Namespace, train_argv: list[str], storage: Path) -> dict:
    """Validate everything before Ray starts and return the sweep's settings (saved as sweep.json)."""
    from agents.run_config import resolve_config

    if args.num_samples < 1 or args.cpus_per_trial <= 0 or args.top < 1:
        raise UsageError("--num-samples and --top must be >= 1 and --cpus-per-trial > 0")
    check_metric(args.metric)
    base = parse_train_args(train_argv)
    space = load_space(args.space or base.algo, args.space_file)
    tune_param_space(space, args.search)  # raises when the space has nothing to search this way
    cfg = resolve_config(base)
    name = args.name or f"{base.algo}_{env_slug(base.env)}_{args.search}"
    exp_dir = storage / name
    if exp_dir.exists() and any(exp_dir.iterdir()):
        raise UsageError(f"sweep folder {exp_dir} already exists: continue it with --restore --name {name}, "
                         f"or pick another --name")
    eval_freq = int(cfg["eval_freq"])
    grace = args.grace_period or (eval_freq if eval_freq > 0 else int(cfg["n_timesteps"]))
    return {"name": name, "train_argv": train_argv, "runs_root": str(exp_dir / "runs"), "search": args.search,
            "space": {k: _param_dict(p) for k, p in space.items()}, "num_samples": args.num_samples,
            "metric": args.metric, "mode": args.mode, "scheduler": args.scheduler, "max_t": int(cfg["n_timesteps"]),
            "grace_period": int(grace), "reduction_factor": args.reduction_factor,
            "cpus_per_trial": args.cpus_per_trial, "max_concurrent": args.max_concurrent,
            "max_failures": args.max_failures, "search_seed": args.search_seed}


def _param_dict(p: Param) -> dict:
    out = {"values": p.values, "low": p.low, "high": p.high, "log": p.log, "int": p.integer, "grid": p.grid}
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items() if v is not None}


def settings_param_space(settings: dict) -> dict:
    space = {k: Param.from_dict(k, v) for k, v in settings["space"].items()}
    return tune_param_space(space, settings["search"])


def tune_config(settings: dict):
    from ray import tune

    search_alg, scheduler = None, None
    if settings["search"] == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=settings["search_seed"])
    if settings["scheduler"] == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="timesteps", max_t=settings["max_t"],
                                  grace_period=min(settings["grace_period"], settings["max_t"]),
                                  reduction_factor=settings["reduction_factor"])
    return tune.TuneConfig(metric=settings["metric"], mode=settings["mode"], search_alg=search_alg,
                           scheduler=scheduler, num_samples=settings["num_samples"],
                           max_concurrent_trials=settings["max_concurrent"])


def run_config(settings: dict, storage: Path):
    from ray import tune

    return tune.RunConfig(name=settings["name"], storage_path=str(storage),
                          failure_config=tune.FailureConfig(max_failures=settings["max_failures"]))


def tune_trial(config: dict, *, train_argv: list[str], runs_root: str) -> None:
    """Tune's function trainable: one train.py run in this worker, every evaluation reported to Tune.

    The run folder is named by the trial id, so a trial restarted by ``Tuner.restore`` or after a worker
    failure finds its folder and resumes it from the latest checkpoint."""
    import ray
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    node_id = ray.get_runtime_context().get_node_id()
    final: list[dict] = []

    def report(metrics: dict) -> None:
        # The evaluation at the full budget is reported after the run has finished: schedulers stop a
        # trial that reaches max_t at once, which would kill the run before its final comparison.
        if metrics["timesteps"] >= run_budget(metrics["run_dir"]):
            final.append(metrics)
        else:
            tune.report({**metrics, "node_id": node_id})

    run_dir = run_trial(train_argv, config, Path(runs_root), trial_id, report)
    if not final:  # restored after the run had finished: its last evaluation is the trial's result
        log = read_csv(run_dir / "eval" / "eval_log.csv")
        final = [metrics_of(log[-1], run_dir)] if log else []
    if final:
        tune.report({**final[-1], "node_id": node_id})


def _run_state(run_dir: Path) -> str:
    try:
        return json.loads((Path(run_dir) / "status.json").read_text()).get("state", "")
    except (OSError, ValueError):
        return "not started"


if __name__ == "__main__":
    sys.exit(main())
