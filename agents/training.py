"""One training run of train.py (rl-baselines3-zoo style): start or resume, learn, save, compare.

A run folder ``LOG_FOLDER/ALGO/ENV_N`` holds:

* ``command.txt`` - the exact command line (one line per start / resume),
* ``config.yml`` - the resolved run settings and hyperparameters (read back by ``--resume``),
  ``hyperparams.yml`` (hyperparameters alone) and ``env_config.json`` (the env's resolved WideConfig),
* ``checkpoints/`` - ``model_<t>_steps.zip`` (+ ``vecnormalize_<t>_steps.pkl``), ``latest.json``,
* ``best_model.zip`` (best evaluation reward per step), ``final_model.zip``,
* ``eval/eval_log.csv`` and ``eval/evaluations.npz`` - the periodic evaluations (learning curve),
  ``eval/reference.csv`` - SiftMoE and Top-K on the same evaluation seeds,
* ``comparison.csv`` / ``comparison.txt`` / ``comparison_episodes.csv`` - the final table,
* ``learning_curve.png``, ``monitor/`` (training episode returns), ``tb/`` (TensorBoard), ``status.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path
from typing import Any

from agents.common import UsageError, algo_class, env_slug, make_vec_env, resolve_policy, split_hyperparams
from agents.comparison import frozen, write_comparison
from agents.run_config import check_model_builds, check_run_name, probe_env, resolve_config, resume_config

__all__ = ["train", "new_run_dir", "checkpoints_exist"]


def new_run_dir(log_folder: str, algo: str, env_id: str, name: str | None) -> Path:
    check_run_name(name)
    root = Path(log_folder) / algo
    root.mkdir(parents=True, exist_ok=True)
    if name:
        run_dir = root / name
        if run_dir.exists() and any(run_dir.iterdir()):
            raise UsageError(f"run folder {run_dir} already exists; pick another --run-name or --resume it")
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir
    slug = env_slug(env_id)
    ids = [int(p.name.rsplit("_", 1)[1]) for p in root.glob(f"{slug}_*") if p.name.rsplit("_", 1)[1].isdigit()]
    n = max(ids, default=0) + 1
    while True:
        run_dir = root / f"{slug}_{n}"
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            n += 1


def _write_yaml(path: Path, data: Any) -> None:
    import yaml

    from agents.callbacks import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def _command_line(prog: str, argv: list[str]) -> str:
    return " ".join([prog, shlex.join(argv)]).strip()


def train(args: argparse.Namespace, argv: list[str], prog: str = "python train.py", on_evaluation=None) -> Path:
    """Start or resume a run. on_evaluation: listener of every evaluation row (sweeps); a truthy return stops
    the run early (status "stopped"; ``--resume`` continues it to the full budget)."""
    import wide_env  # noqa: F401  (registers the ids)

    resumed = args.resume is not None
    if resumed:
        run_dir = Path(args.resume)
        cfg = resume_config(args, run_dir)
        env = probe_env(cfg["env"], cfg["env_kwargs"])
        with open(run_dir / "command.txt", "a") as fh:
            fh.write(_command_line(prog, argv) + "\n")
        _write_yaml(run_dir / "config.yml", cfg)
        _write_yaml(run_dir / "hyperparams.yml", cfg["hyperparams"])
    else:
        cfg = resolve_config(args)
        env = probe_env(cfg["env"], cfg["env_kwargs"])  # validated before the run folder exists
        check_model_builds(cfg)  # so are the hyperparameters and the policy
        run_dir = new_run_dir(args.log_folder or "runs", cfg["algo"], cfg["env"], args.run_name)
        (run_dir / "command.txt").write_text(_command_line(prog, argv) + "\n")
        _write_yaml(run_dir / "config.yml", cfg)
        _write_yaml(run_dir / "hyperparams.yml", cfg["hyperparams"])
        if env["config"] is not None:
            from agents.callbacks import atomic_write_text

            atomic_write_text(run_dir / "env_config.json", json.dumps(env["config"], indent=1))
    return _train(cfg, run_dir, env, resumed=resumed, progress=args.progress, verbose=args.verbose,
                  compare=not args.no_compare, on_evaluation=on_evaluation)


def run_schedules(cls, algo_kwargs: dict) -> dict:
    """The schedule settings of a run (learning rate, clip ranges) from its own hyperparameters, else the
    algorithm's defaults: what a resumed model gets instead of the pickled schedules in its zip."""
    import inspect

    from stable_baselines3.common.utils import FloatSchedule

    params = inspect.signature(cls.__init__).parameters
    out = {k: algo_kwargs.get(k, params[k].default) for k in ("learning_rate", "clip_range", "clip_range_vf")
           if k in algo_kwargs or k in params}
    out["lr_schedule"] = FloatSchedule(out["learning_rate"])
    return out


def _load_newest_checkpoint(algo: str, run_dir: Path, venv, tb, schedules: dict):
    """(model, checkpoint record) of the newest checkpoint that loads, saying which ones did not; (None, None)
    when there is none. Nothing in the zips is unpickled (:func:`agents.sb3_policy.load_model`)."""
    from agents.callbacks import checkpoints_newest_first
    from agents.sb3_policy import load_model

    for i, ckpt in enumerate(checkpoints_newest_first(run_dir)):
        try:
            model = load_model(algo, ckpt["model_path"], env=venv, schedules=schedules, tensorboard_log=tb)
        except Exception as exc:  # noqa: BLE001  (a truncated zip raises anything from zipfile to SB3's asserts)
            print(f"note: checkpoint {ckpt['model_path']} does not load ({type(exc).__name__}: {exc}); "
                  "trying the previous one")
            continue
        if i > 0:
            print(f"note: resuming from the older intact checkpoint {ckpt['model_path']}")
        return model, ckpt
    return None, None


def _train(cfg: dict, run_dir: Path, env: dict, *, resumed: bool, progress: bool, verbose: int,
           compare: bool, on_evaluation=None) -> Path:
    import torch
    from stable_baselines3.common.utils import set_random_seed
    from stable_baselines3.common.vec_env import VecNormalize

    from agents.callbacks import (CheckpointEvalCallback, CpuTimeLimit, WideMetricsCallback, read_eval_log,
                                  write_status)
    from agents.evaluation import evaluate, write_csv
    from agents.sb3_policy import SB3Policy
    from agents.shaping import wrap_reward_shaping
    from agents.shielding import shield_setting, shielded_factory
    from agents.token_credit import token_credit_callback

    torch.set_num_threads(max(int(cfg["num_threads"]), 1))

    algo, env_id, env_kwargs = cfg["algo"], cfg["env"], cfg["env_kwargs"]
    hp = dict(cfg["hyperparams"])
    run_hp, algo_kwargs = split_hyperparams(hp)
    cls = algo_class(algo)
    budget = int(cfg["n_timesteps"])
    problem, observation_space = env["problem"], env["observation_space"]

    attempt = len(list((run_dir / "monitor").glob("train_*"))) if (run_dir / "monitor").exists() else 0
    seed = int(cfg["seed"]) + 1000 * attempt  # fresh env randomness after a resume
    set_random_seed(seed)
    shield = shield_setting(run_hp.get("shield", False), cfg.get("hyperparams_source", "hyperparameters"))
    venv = make_vec_env(env_id, env_kwargs, cfg["n_envs"], seed, cfg["vec_env"],
                        monitor_path=str(run_dir / "monitor" / f"train_{attempt}"), shield=shield)
    # the training signal only (the monitor above and every evaluation see the env's own reward)
    venv = wrap_reward_shaping(venv, run_hp.get("reward_shaping"))

    tb = cfg.get("tensorboard_log")
    if tb is None:
        tb = str(run_dir / "tb")
    if str(tb).lower() == "none":
        tb = None
    elif not _has_tensorboard():
        print("note: tensorboard is not installed; TensorBoard logging is off")
        tb = None

    normalize = run_hp.get("normalize", False)
    model, ckpt, state = None, None, {}
    if resumed:
        model, ckpt = _load_newest_checkpoint(algo, run_dir, venv, tb, run_schedules(cls, algo_kwargs))
    vecnorm = None
    if normalize:
        if ckpt and ckpt.get("vecnormalize_path"):
            venv = VecNormalize.load(ckpt["vecnormalize_path"], venv)
            venv.training = True
        else:
            kw = normalize if isinstance(normalize, dict) else {"norm_obs": True, "norm_reward": False}
            venv = VecNormalize(venv, gamma=float(hp.get("gamma", 0.99)), **kw)
        vecnorm = venv
    if model is not None:
        model.set_env(venv)
        state = _resume_state(run_dir, ckpt, int(model.num_timesteps))
        print(f"resuming {run_dir} from {ckpt['model_path']} at {model.num_timesteps} of {budget} timesteps")
    else:
        if resumed:
            print(f"resuming {run_dir}: no loadable checkpoint, starting from scratch")
        policy, policy_kwargs = resolve_policy(hp.get("policy", "expert_set"), algo, observation_space, problem,
                                               algo_kwargs.pop("policy_kwargs", None))
        model = cls(policy, venv, seed=int(cfg["seed"]), device="cpu", tensorboard_log=tb,
                    verbose=1 if verbose > 1 else 0, policy_kwargs=policy_kwargs, **algo_kwargs)
    episodes, eval_seed = int(cfg["eval_episodes"]), int(cfg["eval_seed"])

    def eval_agent(m) -> dict:
        pol = SB3Policy(m, problem, vecnorm=frozen(vecnorm))
        # under the shield the agent is scored on what it executes in training
        return evaluate(env_id, env_kwargs, [(algo, shielded_factory(pol) if shield else pol)], episodes=episodes,
                        seed=eval_seed)[0]

    ref_path = run_dir / "eval" / "reference.csv"
    reference = _read_csv(ref_path)
    if not reference:
        reference = evaluate(env_id, env_kwargs, ["siftmoe", "topk"], episodes=episodes, seed=eval_seed)
        ref_path.parent.mkdir(parents=True, exist_ok=True)
        write_csv(reference, ref_path)

    ckpt_cb = CheckpointEvalCallback(run_dir, eval_agent, eval_freq=cfg["eval_freq"], save_freq=cfg["save_freq"],
                                     vecnorm=vecnorm, state=state, verbose=verbose, budget=budget,
                                     on_evaluation=on_evaluation)
    callbacks = [WideMetricsCallback(problem.n_layers), ckpt_cb]
    credit = token_credit_callback(venv, problem.n_layers)  # reward_shaping.token_credit
    if credit is not None:
        callbacks.insert(0, credit)
    cpu_limit = CpuTimeLimit(60.0 * cfg["max_cpu_minutes"]) if cfg.get("max_cpu_minutes") else None
    if cpu_limit is not None:
        callbacks.append(cpu_limit)
    write_status(run_dir, "running", model.num_timesteps, budget)
    remaining = budget - int(model.num_timesteps)
    t0, cpu0 = time.time(), time.process_time()
    if remaining > 0:
        model.learn(total_timesteps=remaining, callback=callbacks, reset_num_timesteps=ckpt is None,
                    progress_bar=progress, tb_log_name="tb")
    segment_s, segment_cpu_s = time.time() - t0, time.process_time() - cpu0
    # every segment of a resumed run: the time recorded at the checkpoint it continued from, plus this one
    train_s = ckpt_cb.wall_offset + segment_s
    train_cpu_s = ckpt_cb.cpu_offset + segment_cpu_s
    times = dict(train_s=round(train_s, 2), train_cpu_s=round(train_cpu_s, 2), segment_s=round(segment_s, 2),
                 # a run stopped by the safety cap, not its timestep budget, says so (the benchmark reports it)
                 cpu_limit_reached=bool(cpu_limit is not None and cpu_limit.reached))
    if cpu_limit is not None and cpu_limit.reached:
        print(f"note: stopped at the CPU-time limit of {cfg['max_cpu_minutes']:g} min after {model.num_timesteps} "
              f"of {budget} timesteps")
    if ckpt_cb.stop_requested:  # a sweep pruned this run: keep its checkpoints, skip the final comparison
        venv.close()
        write_status(run_dir, "stopped", model.num_timesteps, budget, **times)
        return run_dir
    ckpt_cb.model = model
    if ckpt_cb.last_eval < model.num_timesteps and cfg["eval_freq"] >= 0:
        ckpt_cb.run_eval()
    if ckpt_cb.last_save < model.num_timesteps or not checkpoints_exist(run_dir):
        ckpt_cb.save_checkpoint()
    from agents.callbacks import atomic_save_model, atomic_save_vecnormalize

    atomic_save_model(model, run_dir / "final_model.zip")
    if vecnorm is not None:
        atomic_save_vecnormalize(vecnorm, run_dir / "vecnormalize.pkl")
    write_status(run_dir, "trained", model.num_timesteps, budget, **times)
    segments = f"; this segment {segment_s:.0f} s" if resumed else ""
    print(f"trained {model.num_timesteps} timesteps in {train_s:.0f} s ({train_cpu_s:.0f} CPU-s{segments}) "
          f"({run_dir / 'final_model.zip'})")

    eval_rows = read_eval_log(run_dir / "eval" / "eval_log.csv")
    if compare:
        write_comparison(cfg, run_dir, model, problem, vecnorm, reference, eval_rows)
    venv.close()
    write_status(run_dir, "done", model.num_timesteps, budget, **times)
    return run_dir


def checkpoints_exist(run_dir: Path) -> bool:
    return any((Path(run_dir) / "checkpoints").glob("model_*_steps.zip"))


def _resume_state(run_dir: Path, ckpt: dict, n: int) -> dict:
    """The evaluation bookkeeping to continue from checkpoint ``ckpt`` (at ``n`` timesteps)."""
    from agents.callbacks import read_eval_log

    rows = read_eval_log(run_dir / "eval" / "eval_log.csv")
    state = {k: ckpt[k] for k in ("best_reward", "last_eval", "wall_s", "cpu_s") if k in ckpt}
    if int(ckpt.get("num_timesteps", -1)) != n or "last_eval" not in ckpt:  # an older checkpoint than latest.json's
        done = [r for r in rows if int(r["timesteps"]) <= n]
        state = {"last_eval": int(done[-1]["timesteps"]) if done else -1,
                 "wall_s": float(ckpt.get("wall_s", done[-1]["wall_s"] if done else 0.0)),
                 "cpu_s": float(ckpt.get("cpu_s", 0.0))}
        if rows:
            state["best_reward"] = max(float(r["reward_per_step"]) for r in rows)
    state["last_save"] = n
    return state


def _read_csv(path: Path) -> list[dict]:
    import csv

    if not path.exists():
        return []
    out = []
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            row = {}
            for k, v in r.items():
                try:
                    row[k] = float(v)
                except (TypeError, ValueError):
                    row[k] = v
            out.append(row)
    return out


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401

        return True
    except ImportError:
        return False
