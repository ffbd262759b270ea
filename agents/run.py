"""The training driver behind ``train.py`` (rl-baselines3-zoo style).

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
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from agents.common import (DEFAULT_ENV, VEC_ENV_KINDS, UsageError, algo_class, check_env_id, env_slug,
                           has_native_core, load_hyperparams, make_vec_env, parse_env_kwargs, registered_wide_ids,
                           resolve_policy, split_hyperparams)
from agents.registry import NETWORKS, SB3_POLICY_NAMES, TRAINABLE_ALGORITHMS

DEFAULTS = {"algo": "ppo", "env": DEFAULT_ENV, "seed": 0, "eval_freq": 20_000, "eval_episodes": 10,
            "save_freq": 20_000, "n_envs": 8, "n_timesteps": 100_000}
EVAL_SEED = 10_000  # evaluation episodes use seeds EVAL_SEED + i, disjoint from training seeds
MAX_SEED = 2**31 - 1  # numpy's legacy seeding (SB3's set_random_seed) takes [0, 2**32); resumes add offsets
#: options --resume applies (everything else is the run's own setting, read from its config.yml)
RESUME_OVERRIDES = ("-n/--n-timesteps", "--no-compare", "-v/--verbose", "--progress", "--num-threads",
                    "--max-cpu-minutes")
#: saved settings a --resume may not change: (argparse dest, config.yml key, option)
RESUME_FIXED = (("algo", "algo", "--algo"), ("env", "env", "--env"), ("env_kwargs", "env_kwargs", "--env-kwargs"),
                ("seed", "seed", "--seed"), ("n_envs", "n_envs", "--n-envs"), ("vec_env", "vec_env", "--vec-env"),
                ("eval_freq", "eval_freq", "--eval-freq"), ("eval_episodes", "eval_episodes", "--eval-episodes"),
                ("eval_seed", "eval_seed", "--eval-seed"), ("save_freq", "save_freq", "--save-freq"),
                ("tensorboard_log", "tensorboard_log", "-tb/--tensorboard-log"))


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train an RL agent on a WIDE environment and compare it with SiftMoE and Top-K. "
                    "With no arguments: a short demonstration run on wide_env/WideMoE-v0.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--algo", default=None, choices=TRAINABLE_ALGORITHMS, help="RL algorithm (default ppo)")
    p.add_argument("--env", default=None, help=f"registered environment id (default {DEFAULT_ENV})")
    p.add_argument("--env-kwargs", default=None,
                   help="Python dict literal passed to gym.make (parsed with ast.literal_eval), "
                        "e.g. \"{'config': {'n_tokens': 8}}\"; a config merges over the id's preset")
    p.add_argument("--conf-file", default=None,
                   help="YAML hyperparameter file (keyed by env id, with 'default'); "
                        "default agents/hyperparams/ALGO.yml")
    p.add_argument("--policy", default=None,
                   help=f"override the YAML policy: {', '.join(NETWORKS)} or SB3's {', '.join(SB3_POLICY_NAMES)}")
    p.add_argument("-n", "--n-timesteps", type=int, default=None,
                   help="total timesteps (default: from the YAML); with --resume: a new total budget")
    p.add_argument("--seed", type=int, default=None, help=f"seed in [0, {MAX_SEED}] (default 0)")
    p.add_argument("--n-envs", type=int, default=None, help="parallel envs (default: from the YAML)")
    p.add_argument("--vec-env", default=None, choices=VEC_ENV_KINDS,
                   help="VecEnv type (native = wide_env's batched core; default: YAML, else native where the id "
                        "has it, else dummy)")
    p.add_argument("--eval-freq", type=int, default=None, help="evaluate every N timesteps (0: only at the end)")
    p.add_argument("--eval-episodes", type=int, default=None, help="episodes per evaluation")
    p.add_argument("--eval-seed", type=int, default=None,
                   help=f"seed of the evaluation episodes (default {EVAL_SEED}; see baselines.evaluate)")
    p.add_argument("--save-freq", type=int, default=None, help="checkpoint every N timesteps")
    p.add_argument("--log-folder", "-f", default=None, help="root of the run folders (default runs)")
    p.add_argument("--run-name", default=None, help="run folder name (default ENV_N)")
    p.add_argument("--tensorboard-log", "-tb", default=None,
                   help="TensorBoard folder (default RUN_DIR/tb; 'none' disables)")
    p.add_argument("--progress", action="store_true", help="show a progress bar (tqdm + rich)")
    p.add_argument("--num-threads", type=int, default=1, help="torch threads (1 is fastest on small CPUs)")
    p.add_argument("--max-cpu-minutes", type=float, default=None,
                   help="stop training once it has used this much CPU time (time.process_time, not wall time); "
                        "the model reached then is saved as the final model")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue RUN_DIR from its newest loadable checkpoint with its saved settings; it "
                        f"accepts only {', '.join(RESUME_OVERRIDES)}")
    p.add_argument("--demo", action="store_true",
                   help="short demonstration budget (the YAML's demo_timesteps); implied with no arguments")
    p.add_argument("--no-compare", action="store_true", help="skip the final comparison table")
    p.add_argument("-v", "--verbose", type=int, default=1, help="0: quiet, 1: evaluations, 2: + SB3 logs")
    p.add_argument("--optimize", action="store_true",
                   help="hyperparameter search with Optuna (flags: python -m agents.optimize --help)")
    return p


def _prog_name() -> str:
    """How the user started training, for --help and command.txt."""
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if script == "train.py":
        return "python train.py"
    if script in ("__main__.py", "run.py", "-m", "-c", ""):
        return "python -m agents"
    return script  # the console script, wide-train


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Entry point of ``wide-train``, ``python -m agents`` and ``python train.py``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--optimize" in argv:  # Optuna search: its own flags plus these (agents/optimize.py)
        from agents.optimize import main as optimize_main

        return optimize_main([a for a in argv if a != "--optimize"])
    prog = prog or _prog_name()
    args = build_parser(prog).parse_args(argv)
    if not argv:
        args.demo = True
    try:
        run_dir = train(args, argv, prog=prog)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    print(f"run folder: {Path(run_dir).resolve()}")
    return 0


# ---- configuration ----------------------------------------------------------------------------------
def _plain(obj):
    """JSON round trip: tuples -> lists, so YAML safe_dump accepts it."""
    return json.loads(json.dumps(obj, default=str))


def _check_seed(name: str, value: int) -> int:
    if not 0 <= value <= MAX_SEED:
        raise UsageError(f"{name} must be an integer in [0, {MAX_SEED}], got {value}")
    return int(value)


def probe_env(env_id: str, env_kwargs: dict) -> dict:
    """Build the env once: a bad config or a non-WIDE id is a UsageError before anything is written.
    Returns its problem, observation space and resolved config (dict, or None)."""
    import gymnasium as gym

    try:
        env = gym.make(env_id, **env_kwargs)
    except (ValueError, TypeError) as exc:  # ConfigError, TraceError, unknown keyword arguments
        raise UsageError(f"{env_id} with --env-kwargs {env_kwargs!r}: {type(exc).__name__}: {exc}") from None
    try:
        problem = getattr(env.unwrapped, "problem", None)
        if problem is None:
            raise UsageError(f"{env_id!r} is not a WIDE environment (it has no env.unwrapped.problem): train.py "
                             "trains expert-selection agents on the wide_env ids:\n  "
                             + "\n  ".join(registered_wide_ids()))
        config = env.unwrapped.config.to_dict() if hasattr(env.unwrapped, "config") else None
        return {"problem": problem, "observation_space": env.observation_space, "config": config}
    finally:
        env.close()


def _rollout_steps(algo: str, hp: dict) -> int:
    return int(hp.get("n_steps", 2048 if algo != "a2c" else 5))


def _whole_rollouts(n_timesteps: int, rollout: int) -> int:
    """A budget in whole rollouts, so a resumed run replays exactly the remaining budget."""
    if n_timesteps % rollout:
        rounded = (n_timesteps // rollout + 1) * rollout
        print(f"note: n_timesteps {n_timesteps} rounded up to {rounded} (whole rollouts of n_envs * n_steps = "
              f"{rollout})")
        return rounded
    return n_timesteps


def resolve_config(args: argparse.Namespace) -> dict:
    algo = args.algo or DEFAULTS["algo"]
    env_id = check_env_id(args.env or DEFAULTS["env"])
    env_kwargs = parse_env_kwargs(args.env_kwargs)
    hp, source = load_hyperparams(algo, env_id, args.conf_file)
    run_hp, _ = split_hyperparams(hp)
    hp["policy_kwargs"] = select_policy_kwargs(hp, args.policy)
    if args.policy:
        hp["policy"] = args.policy

    def pick(name, cli):
        return cli if cli is not None else run_hp.get(name, DEFAULTS[name])

    n_timesteps = args.n_timesteps
    if n_timesteps is None:
        n_timesteps = int(hp.get("demo_timesteps", 20_000)) if args.demo else int(pick("n_timesteps", None))
    vec_env = args.vec_env or run_hp.get("vec_env")
    if vec_env is None:
        vec_env = "native" if has_native_core(env_id) else "dummy"
        if vec_env == "dummy":
            print(f"note: {env_id} has no batched core (no vector entry point); training on DummyVecEnv")
    elif vec_env == "native" and not has_native_core(env_id):
        raise UsageError(f"--vec-env native: {env_id} has no batched core (no vector entry point); use dummy or "
                         "subproc")
    cfg = {
        "algo": algo, "env": env_id, "env_kwargs": _plain(env_kwargs),
        "seed": _check_seed("--seed", DEFAULTS["seed"] if args.seed is None else args.seed),
        "n_timesteps": int(n_timesteps), "n_envs": int(pick("n_envs", args.n_envs)), "vec_env": vec_env,
        "eval_freq": int(pick("eval_freq", args.eval_freq)), "eval_episodes": int(pick("eval_episodes", args.eval_episodes)),
        "eval_seed": _check_seed("--eval-seed", EVAL_SEED if args.eval_seed is None else args.eval_seed),
        "save_freq": int(pick("save_freq", args.save_freq)), "num_threads": int(args.num_threads),
        "tensorboard_log": args.tensorboard_log, "demo": bool(args.demo), "hyperparams_source": source,
        "max_cpu_minutes": _cpu_minutes(args.max_cpu_minutes),
    }
    if cfg["n_timesteps"] < 1 or cfg["n_envs"] < 1 or cfg["eval_episodes"] < 1:
        raise UsageError("--n-timesteps, --n-envs and --eval-episodes must be >= 1")
    if cfg["eval_freq"] < 0 or cfg["save_freq"] < 0:
        raise UsageError("--eval-freq and --save-freq must be >= 0")
    cfg["n_timesteps"] = _whole_rollouts(cfg["n_timesteps"], cfg["n_envs"] * _rollout_steps(algo, hp))
    # the hyperparameters as used: run settings replaced by the resolved values
    used = {k: v for k, v in hp.items() if k != "demo_timesteps"}
    used.update({k: cfg[k] for k in ("n_timesteps", "n_envs", "vec_env", "eval_freq", "eval_episodes", "save_freq")})
    cfg["hyperparams"] = _plain(used)
    return cfg


def select_policy_kwargs(hp: dict, override: str | None) -> dict:
    """``policy_kwargs`` may be flat (for the YAML's policy) or keyed by policy name
    (``{expert_set: {...}, mlp: {...}}``); return the kwargs of the policy that will be used."""
    pk = hp.get("policy_kwargs") or {}
    policy = override or hp.get("policy", "expert_set")
    if any(k in NETWORKS or k in SB3_POLICY_NAMES for k in pk):
        return dict(pk.get(policy) or {})
    if override and override != hp.get("policy"):
        if pk:
            print(f"note: --policy {override} replaces the YAML's {hp.get('policy')!r}; its policy_kwargs {pk} "
                  "are not used (key policy_kwargs by policy name to give both)")
        return {}
    return dict(pk)


def new_run_dir(log_folder: str, algo: str, env_id: str, name: str | None) -> Path:
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


def _resume_config(args: argparse.Namespace, run_dir: Path) -> dict:
    """The saved config of RUN_DIR with the overrides --resume accepts; any other differing option is an error."""
    import yaml

    if not (run_dir / "config.yml").exists():
        raise UsageError(f"--resume {run_dir}: no config.yml there; pass a run folder written by train.py")
    cfg = yaml.safe_load((run_dir / "config.yml").read_text())
    conflicts = []
    for dest, key, option in RESUME_FIXED:
        given = getattr(args, dest)
        if given is None:
            continue
        if dest == "env_kwargs":
            given = _plain(parse_env_kwargs(given))
        if given != cfg.get(key):
            conflicts.append(f"{option} {given!r} (the run's: {cfg.get(key)!r})")
    for dest, option in (("conf_file", "--conf-file"), ("policy", "--policy"), ("log_folder", "--log-folder"),
                         ("run_name", "--run-name")):
        if getattr(args, dest) is not None:
            conflicts.append(f"{option} {getattr(args, dest)!r}")
    if args.demo:
        conflicts.append("--demo")
    if conflicts:
        raise UsageError(f"--resume {run_dir} continues the run with its saved settings (config.yml); it cannot "
                         f"change {', '.join(conflicts)}. Drop them, or start a new run. --resume accepts "
                         f"{', '.join(RESUME_OVERRIDES)}.")
    if args.n_timesteps is not None and args.n_timesteps != cfg["n_timesteps"]:
        if args.n_timesteps < 1:
            raise UsageError("-n/--n-timesteps must be >= 1")
        rollout = int(cfg["n_envs"]) * _rollout_steps(cfg["algo"], cfg["hyperparams"])
        budget = _whole_rollouts(int(args.n_timesteps), rollout)
        print(f"note: new total budget {budget} timesteps (was {cfg['n_timesteps']})")
        cfg["n_timesteps"] = budget
        cfg["hyperparams"]["n_timesteps"] = budget
    cfg["num_threads"] = int(args.num_threads)
    if args.max_cpu_minutes is not None:
        cfg["max_cpu_minutes"] = _cpu_minutes(args.max_cpu_minutes)
    return cfg


def _cpu_minutes(value) -> float | None:
    if value is None:
        return None
    if not (value > 0 and value == value and value != float("inf")):
        raise UsageError(f"--max-cpu-minutes must be a positive number of minutes, got {value!r}")
    return float(value)


# ---- training ---------------------------------------------------------------------------------------
def train(args: argparse.Namespace, argv: list[str], prog: str = "python train.py", on_evaluation=None) -> Path:
    """Start or resume a run. on_evaluation: listener of every evaluation row (sweeps); a truthy return stops
    the run early (status "stopped"; ``--resume`` continues it to the full budget)."""
    import wide_env  # noqa: F401  (registers the ids)

    resumed = args.resume is not None
    if resumed:
        run_dir = Path(args.resume)
        cfg = _resume_config(args, run_dir)
        env = probe_env(cfg["env"], cfg["env_kwargs"])
        with open(run_dir / "command.txt", "a") as fh:
            fh.write(_command_line(prog, argv) + "\n")
        _write_yaml(run_dir / "config.yml", cfg)
        _write_yaml(run_dir / "hyperparams.yml", cfg["hyperparams"])
    else:
        cfg = resolve_config(args)
        env = probe_env(cfg["env"], cfg["env_kwargs"])  # validated before the run folder exists
        run_dir = new_run_dir(args.log_folder or "runs", cfg["algo"], cfg["env"], args.run_name)
        (run_dir / "command.txt").write_text(_command_line(prog, argv) + "\n")
        _write_yaml(run_dir / "config.yml", cfg)
        _write_yaml(run_dir / "hyperparams.yml", cfg["hyperparams"])
        if env["config"] is not None:
            from agents.callbacks import atomic_write_text

            atomic_write_text(run_dir / "env_config.json", json.dumps(env["config"], indent=1))
    return _train(cfg, run_dir, env, resumed=resumed, progress=args.progress, verbose=args.verbose,
                  compare=not args.no_compare, on_evaluation=on_evaluation)


def _load_newest_checkpoint(cls, run_dir: Path, venv, tb):
    """(model, checkpoint record) of the newest checkpoint that loads, saying which ones did not; (None, None)
    when there is none."""
    from agents.callbacks import checkpoints_newest_first

    for i, ckpt in enumerate(checkpoints_newest_first(run_dir)):
        try:
            model = cls.load(ckpt["model_path"], env=venv, device="cpu", tensorboard_log=tb)
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
    venv = make_vec_env(env_id, env_kwargs, cfg["n_envs"], seed, cfg["vec_env"],
                        monitor_path=str(run_dir / "monitor" / f"train_{attempt}"))
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
        model, ckpt = _load_newest_checkpoint(cls, run_dir, venv, tb)
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
        pol = SB3Policy(m, problem, vecnorm=_frozen(vecnorm))
        return evaluate(env_id, env_kwargs, [(algo, pol)], episodes=episodes, seed=eval_seed)[0]

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
    cpu_limit = CpuTimeLimit(60.0 * cfg["max_cpu_minutes"]) if cfg.get("max_cpu_minutes") else None
    if cpu_limit is not None:
        callbacks.append(cpu_limit)
    write_status(run_dir, "running", model.num_timesteps, budget)
    remaining = budget - int(model.num_timesteps)
    t0, cpu0 = time.time(), time.process_time()
    if remaining > 0:
        model.learn(total_timesteps=remaining, callback=callbacks, reset_num_timesteps=ckpt is None,
                    progress_bar=progress, tb_log_name="tb")
    train_s = time.time() - t0
    train_cpu_s = time.process_time() - cpu0
    if cpu_limit is not None and cpu_limit.reached:
        print(f"note: stopped at the CPU-time limit of {cfg['max_cpu_minutes']:g} min after {model.num_timesteps} "
              f"of {budget} timesteps")
    if ckpt_cb.stop_requested:  # a sweep pruned this run: keep its checkpoints, skip the final comparison
        venv.close()
        write_status(run_dir, "stopped", model.num_timesteps, budget, train_s=train_s)
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
    write_status(run_dir, "trained", model.num_timesteps, budget, train_s=train_s, train_cpu_s=train_cpu_s)
    print(f"trained {model.num_timesteps} timesteps in {train_s:.0f} s ({run_dir / 'final_model.zip'})")

    eval_rows = read_eval_log(run_dir / "eval" / "eval_log.csv")
    if compare:
        _compare(cfg, run_dir, model, problem, vecnorm, reference, eval_rows)
    venv.close()
    write_status(run_dir, "done", model.num_timesteps, budget, train_s=train_s, train_cpu_s=train_cpu_s)
    return run_dir


def checkpoints_exist(run_dir: Path) -> bool:
    return any((Path(run_dir) / "checkpoints").glob("model_*_steps.zip"))


def _resume_state(run_dir: Path, ckpt: dict, n: int) -> dict:
    """The evaluation bookkeeping to continue from checkpoint ``ckpt`` (at ``n`` timesteps)."""
    from agents.callbacks import read_eval_log

    rows = read_eval_log(run_dir / "eval" / "eval_log.csv")
    state = {k: ckpt[k] for k in ("best_reward", "last_eval", "wall_s") if k in ckpt}
    if int(ckpt.get("num_timesteps", -1)) != n or "last_eval" not in ckpt:  # an older checkpoint than latest.json's
        done = [r for r in rows if int(r["timesteps"]) <= n]
        state = {"last_eval": int(done[-1]["timesteps"]) if done else -1,
                 "wall_s": float(done[-1]["wall_s"]) if done else 0.0}
        if rows:
            state["best_reward"] = max(float(r["reward_per_step"]) for r in rows)
    state["last_save"] = n
    return state


def _frozen(vecnorm):
    if vecnorm is None:
        return None
    import copy

    vn = copy.copy(vecnorm)
    vn.training = False
    return vn


def _compare(cfg, run_dir, model, problem, vecnorm, reference, eval_rows) -> None:
    from agents.evaluation import add_relative_columns, evaluate, format_table, plot_learning_curve, write_csv
    from agents.sb3_policy import SB3Policy, load_model

    algo = cfg["algo"]
    policies = [(f"{algo} (final)", SB3Policy(model, problem, vecnorm=_frozen(vecnorm)))]
    best_path = run_dir / "best_model.zip"
    if best_path.exists():
        best = load_model(algo, str(best_path))
        best_vn = vecnorm
        if vecnorm is not None and (run_dir / "best_vecnormalize.pkl").exists():
            from stable_baselines3.common.vec_env import VecNormalize

            best_vn = VecNormalize.load(str(run_dir / "best_vecnormalize.pkl"), vecnorm.venv)
        policies.append((f"{algo} (best)", SB3Policy(best, problem, vecnorm=_frozen(best_vn))))
    policies += ["siftmoe", "topk"]
    ep_rows: list = []
    rows = evaluate(cfg["env"], cfg["env_kwargs"], policies, episodes=int(cfg["eval_episodes"]),
                    seed=int(cfg["eval_seed"]), episode_rows=ep_rows)
    add_relative_columns(rows)
    table = format_table(rows)
    extra = ["", f"{'policy':<24} {'% of SiftMoE energy':>20} {'viol % above SiftMoE':>21}"]
    for r in rows:
        if "energy_pct_of_siftmoe" in r:
            extra.append(f"{r['policy'][:24]:<24} {r['energy_pct_of_siftmoe']:>20.1f} "
                         f"{100 * r['violation_rate_above_siftmoe']:>21.2f}")
    if rows[0].get("vec_env") == "native":
        seeds = f"one batch on the native vector env, seed {cfg['eval_seed']}"
    else:
        seeds = f"seeds {cfg['eval_seed']}..{cfg['eval_seed'] + int(cfg['eval_episodes']) - 1}"
    header = f"{cfg['env']}: {cfg['eval_episodes']} episodes per policy, {seeds}"
    text = "\n".join([header, table, *extra])
    print(text)
    (run_dir / "comparison.txt").write_text(text + "\n")
    write_csv(rows, run_dir / "comparison.csv")
    write_csv(ep_rows, run_dir / "comparison_episodes.csv")
    title = f"{algo} on {cfg['env']} ({cfg['hyperparams'].get('policy', '')}, seed {cfg['seed']})"
    plot_learning_curve(eval_rows, reference, run_dir / "learning_curve.png", title=title)
    print(f"wrote {run_dir / 'comparison.csv'} and {run_dir / 'learning_curve.png'}")


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


if __name__ == "__main__":
    sys.exit(main())
