r"""The regimes benchmark: PPO against Top-K, the causal analytic baselines and the hindsight oracle, at equal
real accuracy, on held-out seeds, over several training seeds and, where accuracy is traded, whole fronts.

    python -m baselines.benchmark --out runs/benchmark [--quick] [--regimes token,episode,queues,accuracy,mixtral] \
        [--seeds 5] [--jobs 2] [--test-episodes 200] [--selection-episodes 50] [--cpu-minutes 60]

Per regime (:data:`REGIMES`: a registered preset each, whose PPO hyperparameters are the preset's entry of
``agents/hyperparams/ppo.yml``, or the regime's ``hyperparams`` overrides where the preset has none):

1. **Train** PPO with the expert-set policy exactly as ``python train.py --env PRESET`` does (same YAML entry) at
   ``--seeds`` training seeds (0 .. N-1) and, where the regime trades accuracy (``Regime.weights``), at each
   trade-off weight (``reward_shaping.accuracy_weight``). A run stops on its timestep budget (the YAML's
   ``n_timesteps``); ``--cpu-minutes`` is only a safety cap, and a run that hits it is reported
   (``agents.csv: cpu_limit_reached``, ``benchmark.json: cpu_cap_hit``). ``--jobs N`` trains N runs at a time
   in worker processes (the same agents: each run has its own seed). ``--quick``: a few thousand timesteps and
   two seeds instead (a smoke run).
2. **Select** the best causal analytic baseline on the selection seeds (``SELECTION_SEED + i``): every baseline of
   the regime is swept over the budget scales (:data:`SCALES`; its curve also holds practical Top-K, the
   budget-free end) and the one that needs the least energy at the headline agents' accuracy there
   (:mod:`baselines.equal_accuracy`: its convex accuracy-energy front) is chosen.
3. **Test** on held-out seeds (``TEST_SEED + i``, never used for training, model choice or baseline choice):
   practical Top-K, ideal Top-K (deadlines not enforced), every baseline over every scale, every agent and the
   oracle (the exact hindsight optimum of the best baseline's budget at scale 1: a lower bound of the energy on
   the proxy, not of the energy at equal accuracy).

Judged as RL results are judged (:mod:`baselines.benchmark_fronts`, :mod:`baselines.rl_stats`): every ratio is
the interquartile mean over training seeds with a stratified bootstrap 95% CI over seeds and episodes; a CI that
contains 1 is a tie. Against each baseline: the ratio at the headline agents' own accuracy, at matched accuracy
levels (Top-K's accuracy minus 0.5, 1, 2 and 4 points; the agents' front spans their weights and Top-K) and the
normalised area between the fronts over the 4 points below Top-K.

Files: ``benchmark.csv`` / ``benchmark.md`` (per regime the rows Top-K (practical), Top-K (ideal), the best
analytic baseline at scale 1, PPO (the headline agents pooled over seeds; its ``eq_acc_*`` the IQM ratio with
its CI and verdict) and the oracle, with energy per token (J, mean and 95% CI over episodes), energy relative to
Top-K, real next-byte accuracy, violations (share of decisions), deadline misses per token, ``gap_closed``
(:func:`baselines.oracle.gap_closed`), the baseline's violations and misses at the agents' accuracy, and
``wins``: IQM ratio <= 0.9, the CI's upper end below 1, no more violations (where the objective has a budget)
and no more deadline misses than that point; benchmark.md adds the front comparison against the chosen
baseline), ``equal_accuracy.csv`` (the ratio at the agents' accuracy against every baseline), ``fronts.csv``
(every measure against every baseline: IQM, CI, verdict), ``fronts_seeds.csv`` (the same per training seed),
``agents.csv`` (one row per trained agent: seed, weight, test summary, training timesteps and times),
``episodes_REGIME.csv`` (every test episode; agents with their ``train_seed``), ``fronts_REGIME.png``,
``runs/ppo/REGIME*/`` (the training run folders: ``REGIME`` is seed 0 at the YAML's weight, suffixes ``_wW``
and ``_sS`` name what differs), ``benchmark.json`` (settings, command line, wall and CPU times).
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
from baselines.benchmark_fronts import MEASURES
from baselines.benchmark_headroom import regime_headroom
from baselines.benchmark_regimes import (FULL, QUICK, REGIMES, SELECTION_SEED, TEST_SEED, TRAIN_SEED, AgentRun, Regime,
                                         agent_runs)
from baselines.benchmark_scoring import (agent_policy, baseline_labels, choose_best, equal_accuracy, format_fronts,
                                         format_table, plot_regime_fronts, regime_rows, summary_of)
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


# ---- training ----------------------------------------------------------------------------------------
def _env_kwargs(regime: Regime, config: dict | None = None) -> dict | None:
    """gym.make kwargs: the regime's config with ``config`` merged over it (None: the preset as registered)."""
    from wide_env.config import deep_merge

    merged = deep_merge(regime.config or {}, config or {})
    return {"config": merged} if merged else None


def train_agent(regime: Regime, out: Path, *, run: AgentRun = AgentRun(TRAIN_SEED, None, True),
                timesteps: int | None, cpu_minutes: float, quick: bool, reuse: bool = False) -> dict:
    """``python train.py --env PRESET`` (its YAML entry, the run's seed, its weight as
    ``reward_shaping.accuracy_weight``) into OUT/runs; stops on its timestep budget, or at the ``cpu_minutes``
    safety cap (reported: ``cpu_limit_reached``). Returns the model path, timesteps, CPU and wall seconds.
    ``reuse``: a run folder that finished its budget with the same command line is taken as it is (its recorded
    training times; ``reused`` True) instead of trained again."""
    argv = ["--env", regime.env_id, "--seed", str(run.seed), "-f", str(out / "runs"), "--run-name",
            run.run_name(regime.name), "--no-compare", "-tb", "none", "--max-cpu-minutes", f"{cpu_minutes:g}"]
    kwargs = _env_kwargs(regime)
    if kwargs:
        argv += ["--env-kwargs", repr(kwargs)]
    overrides = list(regime.hyperparams)
    if run.weight is not None:
        overrides.append(f"reward_shaping.accuracy_weight={run.weight!r}")
    if overrides:
        argv += ["--hyperparams", *overrides]
    if timesteps is not None:
        argv += ["-n", str(timesteps)]
    if quick:
        argv += ["--eval-freq", "0", "--eval-episodes", "2", "--save-freq", "0", "-v", "0"]
    command = "python train.py " + shlex.join(argv)
    run_dir = out / "runs" / "ppo" / run.run_name(regime.name)
    status = _finished_status(run_dir, command) if reuse else None
    reused = status is not None
    if reused:
        cpu, wall = float(status.get("train_cpu_s", 0.0)), float(status.get("train_s", 0.0))
    else:
        cpu0, wall0 = time.process_time(), time.time()
        run_dir = Path(agent_plugin("the benchmark's agent training").train(argv))
        cpu, wall = time.process_time() - cpu0, time.time() - wall0
        status = json.loads((run_dir / "status.json").read_text())
    capped = bool(status.get("cpu_limit_reached", False))
    if capped:
        print(f"   WARNING: {run_dir.name} stopped at the {cpu_minutes:g} CPU-minute safety cap after "
              f"{status.get('num_timesteps')} of {status.get('n_timesteps')} timesteps", flush=True)
    return {"regime": regime.name, "seed": run.seed, "weight": "" if run.weight is None else run.weight,
            "headline": run.headline, "model": str(run_dir / "final_model.zip"), "run_dir": str(run_dir),
            "cpu_s": cpu, "wall_s": wall, "timesteps": int(status.get("num_timesteps", status.get("timesteps", 0))),
            "cpu_limit_reached": capped, "command": command, "reused": reused}


def _finished_status(run_dir: Path, command: str) -> dict | None:
    """The status of a run folder that trained its whole budget with exactly ``command`` (None otherwise)."""
    try:
        same = (run_dir / "command.txt").read_text().strip() == command
        status = json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return None
    done = status.get("state") == "done" and status.get("num_timesteps") == status.get("n_timesteps")
    return status if same and done and (run_dir / "final_model.zip").is_file() else None


def _train_one(regime: Regime, run: AgentRun, out: Path, settings: dict) -> dict:
    import torch

    torch.set_num_threads(1)  # a forked worker starts with torch's default
    return train_agent(regime, out, run=run, timesteps=settings.get("timesteps"), cpu_minutes=settings["cpu_minutes"],
                       quick=settings["quick"], reuse=settings.get("reuse_runs", False))


def _train_all(regime: Regime, runs: list[AgentRun], out: Path, settings: dict) -> list[dict]:
    """Every agent of the regime, in order; with ``settings["jobs"]`` > 1 that many at a time in forked worker
    processes (each run is seeded on its own, so the agents are the same as one at a time)."""
    jobs = min(int(settings.get("jobs", 1)), len(runs))
    if jobs <= 1:
        return [_train_one(regime, run, out, settings) for run in runs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_train_one, *zip(*[(regime, run, out, settings) for run in runs])))


# ---- evaluation -------------------------------------------------------------------------------------
def _sweep(regime: Regime, agents: list[tuple[AgentRun, str]], *, episodes: int, seed: int, scales,
           settings: dict, fixed: bool, oracle_config: dict | None = None) -> list[dict]:
    """Per-episode records: every baseline at every scale, practical Top-K (the budget-free end of every curve)
    and every agent at scale 1 (policy :func:`agent_policy`, its ``train_seed``); with ``fixed`` also ideal Top-K
    and the oracle at scale 1, the oracle under ``oracle_config``: the best baseline's budget."""
    rows: list[dict] = []
    for b in regime.baselines:
        evaluate_policies(regime.env_id, [(b.label, _factory(b.policy, _span_kwargs(b.policy, b.kwargs, settings)))],
                          episodes=episodes, seed=seed, budget_scales=scales, progress=False, episode_rows=rows,
                          env_kwargs=_env_kwargs(regime, b.config))
    plain = _env_kwargs(regime)
    if fixed:
        evaluate_policies(regime.env_id, [("oracle", _factory("oracle", {}))], episodes=episodes, seed=seed,
                          progress=False, episode_rows=rows, env_kwargs=_env_kwargs(regime, oracle_config))
    evaluate_policies(regime.env_id, ["topk", "topk_ideal"] if fixed else ["topk"], episodes=episodes, seed=seed,
                      progress=False, episode_rows=rows, env_kwargs=plain)
    for run, model in agents:
        agent_rows: list[dict] = []
        evaluate_policies(regime.env_id, [(agent_policy(run), _factory(f"ppo:{model}", {}))], episodes=episodes,
                          seed=seed, progress=False, episode_rows=agent_rows, env_kwargs=plain)
        rows += [dict(r, train_seed=run.seed) for r in agent_rows]
    return rows


def run_regime(regime: Regime, out: Path, settings: dict) -> dict:
    t0, cpu0 = time.time(), time.process_time()
    print(f"== {regime.name}: {regime.env_id} ({regime.what})", flush=True)
    runs = agent_runs(regime, settings["seeds"])
    trainings = _train_all(regime, runs, out, settings)
    training = {"runs": len(trainings), "timesteps": sum(t["timesteps"] for t in trainings),
                "cpu_s": sum(t["cpu_s"] for t in trainings), "wall_s": sum(t["wall_s"] for t in trainings),
                "cpu_cap_hit": sum(t["cpu_limit_reached"] for t in trainings)}
    print(f"   trained {len(runs)} agents ({settings['seeds']} seeds x {len(regime.weights) or 1} weights), "
          f"{training['timesteps']} timesteps: {training['cpu_s'] / 60:.1f} CPU-min, {training['wall_s'] / 60:.1f} "
          f"min wall", flush=True)
    agents = [(run, t["model"]) for run, t in zip(runs, trainings)]
    # the choice needs only the headline agents' accuracy
    selection = _sweep(regime, [a for a in agents if a[0].headline], episodes=settings["selection_episodes"],
                       seed=SELECTION_SEED, scales=settings["scales"], settings=settings, fixed=False)
    best, scores = choose_best(regime, selection)
    print(f"   best causal analytic baseline on the selection seeds: {best}", flush=True)
    # the oracle solves the best baseline's problem (its budget mode: for the accuracy objective, whose own env
    # has no budget in its reward, that is the mode the chosen baseline ran under), so gap closed compares alike
    best_config = next(b.config for b in regime.baselines if b.label == best)
    test = _sweep(regime, agents, episodes=settings["test_episodes"], seed=TEST_SEED, scales=settings["scales"],
                  settings=settings, fixed=True, oracle_config=best_config)
    comparisons, fronts, per_seed = {}, [], []
    for label in baseline_labels(regime):
        cmp = equal_accuracy(regime, test, label, n_boot=settings["n_boot"], runs=runs)
        cmp.update(selection_energy_at_acc=scores[label], chosen=label == best)
        fronts += [{"regime": regime.name, "baseline": label, "chosen": label == best, **f}
                   for f in cmp.pop("fronts")]
        seeds = sorted({r.seed for r in runs})
        per_seed += [{"regime": regime.name, "baseline": label, "train_seed": s,
                      **{m: float(v) for m, v in zip(MEASURES, values)}}
                     for s, values in zip(seeds, cmp.pop("per_seed"))]
        comparisons[label] = cmp
    room = regime_headroom(regime, test, best, episodes=settings["bound_episodes"],
                           max_nodes=settings["bound_max_nodes"], config=(_env_kwargs(regime) or {}).get("config"))
    print(f"   headroom: {best} / accuracy bound = {room['headroom']:.2f} on {room['episodes']} episodes "
          f"({'counts' if room['counts_for_agents_win'] else 'under 5%: does not count'} for agents win)", flush=True)
    table = regime_rows(regime, test, best, comparisons, training, room)
    write_csv(test, out / f"episodes_{regime.name}.csv")
    plot_regime_fronts(regime, test, best, out / f"fronts_{regime.name}.png")
    agent_rows = [_agent_row(regime, t, test) for t in trainings]
    # training in worker processes (--jobs) is not in this process's CPU time: its runs' own CPU time is added
    workers_cpu = training["cpu_s"] if settings.get("jobs", 1) > 1 else 0.0
    return {"rows": table, "comparisons": list(comparisons.values()), "fronts": fronts, "per_seed": per_seed,
            "agents": agent_rows, "training": training, "best": best, "headroom": room, "wall_s": time.time() - t0,
            "cpu_s": time.process_time() - cpu0 + workers_cpu}


def _agent_row(regime: Regime, training: dict, test: list[dict]) -> dict:
    """One agent (seed, weight): its test summary and training, a row of agents.csv."""
    run = AgentRun(training["seed"], training["weight"] if training["weight"] != "" else None, training["headline"])
    recs = [r for r in test if r["policy"] == agent_policy(run) and r["train_seed"] == run.seed]
    summary = summary_of(recs, agent_policy(run))
    keep = ("seed", "weight", "headline", "timesteps", "cpu_s", "wall_s", "cpu_limit_reached", "reused", "run_dir")
    return {"regime": regime.name, "policy": agent_policy(run), **summary,
            **{("train_" + k if k in ("timesteps", "cpu_s", "wall_s") else k): training[k] for k in keep}}


def run_benchmark(out, regimes=None, *, quick: bool = False, test_episodes: int | None = None,
                  selection_episodes: int | None = None, seeds: int | None = None, cpu_minutes: float = 60.0,
                  jobs: int = 1, command: str = "", reuse_runs: bool = False) -> list[dict]:
    """Run the benchmark into ``out`` (see the module docstring); returns the table rows. ``reuse_runs``: take
    the agents whose run folders in ``out`` finished with the same command line instead of training them again."""
    if isinstance(cpu_minutes, bool) or not isinstance(cpu_minutes, numbers.Real) or not 0 < cpu_minutes < math.inf:
        raise ValueError(f"cpu_minutes (--cpu-minutes) = {cpu_minutes!r}: the CPU-time safety cap of each training "
                         "run must be a positive number of minutes, e.g. 60")
    if seeds is not None and (isinstance(seeds, bool) or not isinstance(seeds, numbers.Integral) or seeds < 1):
        raise ValueError(f"seeds (--seeds) = {seeds!r}: the number of training seeds per agent must be an integer "
                         ">= 1 (5 or more for results; the IQM trims nothing below 4)")
    if isinstance(jobs, bool) or not isinstance(jobs, numbers.Integral) or jobs < 1:
        raise ValueError(f"jobs (--jobs) = {jobs!r}: the number of training runs at a time must be an integer >= 1 "
                         "(at most the number of CPU cores)")
    from wide_env.models.torch_threads import one_torch_thread

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
    if seeds is not None:
        settings["seeds"] = int(seeds)
    settings.update(quick=quick, cpu_minutes=float(cpu_minutes), jobs=int(jobs), stats_dir=str(out / "span_stats"),
                    reuse_runs=bool(reuse_runs))
    t0, cpu0 = time.time(), time.process_time()
    rows, comparisons, fronts, per_seed, agents, per_regime = [], [], [], [], [], {}
    for name in names:
        with one_torch_thread():  # tiny networks and models: one thread, the caller's count restored
            result = run_regime(REGIMES[name], out, settings)
        rows += result["rows"]
        comparisons += result["comparisons"]
        fronts += result["fronts"]
        per_seed += result["per_seed"]
        agents += result["agents"]
        per_regime[name] = {k: result[k] for k in ("best", "wall_s", "cpu_s", "training", "headroom")}
        # after every regime: a partial table survives an interruption
        for table, file in ((rows, "benchmark.csv"), (comparisons, "equal_accuracy.csv"), (fronts, "fronts.csv"),
                            (per_seed, "fronts_seeds.csv"), (agents, "agents.csv")):
            write_csv(table, out / file)
    text = format_table(rows) + "\n\n" + format_fronts([f for f in fronts if f["chosen"]])
    (out / "benchmark.md").write_text(text + "\n")
    workers_cpu = sum(r["training"]["cpu_s"] for r in per_regime.values()) if settings["jobs"] > 1 else 0.0
    meta = {"command": command, "wall_s": time.time() - t0, "cpu_s": time.process_time() - cpu0 + workers_cpu,
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()},
            "test_seeds": [TEST_SEED, TEST_SEED + settings["test_episodes"] - 1],
            "selection_seeds": [SELECTION_SEED, SELECTION_SEED + settings["selection_episodes"] - 1],
            "train_seeds": [TRAIN_SEED, TRAIN_SEED + settings["seeds"] - 1],
            "cpu_cap_hit": sum(r["training"]["cpu_cap_hit"] for r in per_regime.values()), "regimes": per_regime}
    (out / "benchmark.json").write_text(json.dumps(meta, indent=1, default=str))
    print(text)
    if meta["cpu_cap_hit"]:
        print(f"WARNING: {meta['cpu_cap_hit']} training runs stopped at the CPU-time safety cap, not on their "
              "timestep budget (agents.csv: cpu_limit_reached)")
    print(f"wrote {out / 'benchmark.csv'}, {out / 'benchmark.md'}, {out / 'equal_accuracy.csv'}, "
          f"{out / 'fronts.csv'}, {out / 'agents.csv'}; {meta['wall_s'] / 60:.1f} min wall, "
          f"{meta['cpu_s'] / 60:.1f} CPU-min")
    return rows


def _positive_minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of minutes > 0, got {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number of minutes > 0 (the CPU-time safety cap of each "
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
    ap.add_argument("--seeds", type=int, default=None,
                    help=f"training seeds per agent (default {FULL['seeds']}; quick {QUICK['seeds']})")
    ap.add_argument("--jobs", type=int, default=1,
                    help="training runs at a time, in worker processes (spreads the seeds over CPU cores)")
    ap.add_argument("--cpu-minutes", type=_positive_minutes, default=60.0,
                    help="safety cap of each training run's CPU time, minutes > 0 (default 60; runs stop on their "
                         "timestep budget well before it; a run that hits it is reported)")
    ap.add_argument("--reuse-runs", action="store_true",
                    help="take agents whose run folders in OUT finished their budget with the same command line "
                         "(e.g. after an interruption, or to evaluate again with new baselines) instead of training "
                         "them again; a changed YAML entry needs a fresh OUT")
    args = ap.parse_args(argv)
    for name, value in (("--test-episodes", args.test_episodes), ("--selection-episodes", args.selection_episodes)):
        if value is not None and value < 2:
            ap.error(f"{name} must be >= 2 (confidence intervals need two episodes)")
    if args.seeds is not None and args.seeds < 1:
        ap.error("--seeds must be >= 1 (5 or more for results)")
    if args.jobs < 1:
        ap.error("--jobs must be >= 1 (training runs at a time)")
    regimes = [r.strip() for r in args.regimes.split(",") if r.strip()]
    command = "python -m baselines.benchmark " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    try:
        return run_benchmark(args.out, regimes, quick=args.quick, test_episodes=args.test_episodes,
                             selection_episodes=args.selection_episodes, seeds=args.seeds,
                             cpu_minutes=args.cpu_minutes, jobs=args.jobs,
                             command=command, reuse_runs=args.reuse_runs)
    except ValueError as exc:
        ap.exit(2, f"{ap.prog}: error: {exc}\n")


if __name__ == "__main__":
    main()
