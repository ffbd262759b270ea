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
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from agents.common import (ALGO_NAMES, DEFAULT_ENV, UsageError, algo_class, check_env_id, env_slug,
                           load_hyperparams, make_vec_env, parse_env_kwargs, resolve_policy, split_hyperparams)

DEFAULTS = {"eval_freq": 20_000, "eval_episodes": 10, "save_freq": 20_000, "n_envs": 8, "vec_env": "dummy",
            "n_timesteps": 100_000}
EVAL_SEED = 10_000  # evaluation episodes use seeds EVAL_SEED + i, disjoint from training seeds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python train.py",
        description="Train an RL agent on a WIDE environment and compare it with SiftMoE and Top-K. "
                    "With no arguments: a short demonstration run on wide_env/WideMoE-v0.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--algo", default="ppo", choices=ALGO_NAMES, help="RL algorithm")
    p.add_argument("--env", default=DEFAULT_ENV, help="registered environment id")
    p.add_argument("--env-kwargs", default=None,
                   help="Python dict literal passed to gym.make (parsed with ast.literal_eval), "
                        "e.g. \"{'config': {'n_tokens': 8}}\"")
    p.add_argument("--conf-file", default=None,
                   help="YAML hyperparameter file (keyed by env id, with 'default'); "
                        "default agents/hyperparams/ALGO.yml")
    p.add_argument("--policy", default=None, help="override the YAML policy: expert_set, mlp, MultiInputPolicy, ...")
    p.add_argument("-n", "--n-timesteps", type=int, default=None, help="total timesteps (default: from the YAML)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-envs", type=int, default=None, help="parallel envs (default: from the YAML)")
    p.add_argument("--vec-env", default=None, choices=("dummy", "subproc", "native"),
                   help="VecEnv type (native = wide_env's batched VecEnv; default: YAML or dummy)")
    p.add_argument("--eval-freq", type=int, default=None, help="evaluate every N timesteps (0: only at the end)")
    p.add_argument("--eval-episodes", type=int, default=None, help="episodes per evaluation")
    p.add_argument("--eval-seed", type=int, default=EVAL_SEED, help="evaluation episode i uses seed EVAL_SEED + i")
    p.add_argument("--save-freq", type=int, default=None, help="checkpoint every N timesteps")
    p.add_argument("--log-folder", "-f", default="runs", help="root of the run folders")
    p.add_argument("--run-name", default=None, help="run folder name (default ENV_N)")
    p.add_argument("--tensorboard-log", "-tb", default=None,
                   help="TensorBoard folder (default RUN_DIR/tb; 'none' disables)")
    p.add_argument("--progress", action="store_true", help="show a progress bar (tqdm + rich)")
    p.add_argument("--num-threads", type=int, default=1, help="torch threads (1 is fastest on small CPUs)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue RUN_DIR from its latest checkpoint with the same total budget")
    p.add_argument("--demo", action="store_true",
                   help="short demonstration budget (the YAML's demo_timesteps); implied with no arguments")
    p.add_argument("--no-compare", action="store_true", help="skip the final comparison table")
    p.add_argument("-v", "--verbose", type=int, default=1, help="0: quiet, 1: evaluations, 2: + SB3 logs")
    p.add_argument("--optimize", action="store_true",
                   help="hyperparameter search with Optuna (flags: python -m agents.optimize --help)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--optimize" in argv:  # Optuna search: its own flags plus these (agents/optimize.py)
        from agents.optimize import main as optimize_main

        return optimize_main([a for a in argv if a != "--optimize"])
    args = build_parser().parse_args(argv)
    if not argv:
        args.demo = True
    try:
        run_dir = train(args, argv)
    except UsageError as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    print(f"run folder: {Path(run_dir).resolve()}")
    return 0


# ---- configuration ----------------------------------------------------------------------------------
def _plain(obj):
    """JSON round trip: tuples -> lists, so YAML safe_dump accepts it."""
    return json.loads(json.dumps(obj, default=str))


def resolve_config(args: argparse.Namespace) -> dict:
    env_id = check_env_id(args.env)
    env_kwargs = parse_env_kwargs(args.env_kwargs)
    hp, source = load_hyperparams(args.algo, env_id, args.conf_file)
    run_hp, _ = split_hyperparams(hp)
    hp["policy_kwargs"] = select_policy_kwargs(hp, args.policy)
    if args.policy:
        hp["policy"] = args.policy

    def pick(name, cli):
        return cli if cli is not None else run_hp.get(name, DEFAULTS[name])

    n_timesteps = args.n_timesteps
    if n_timesteps is None:
        n_timesteps = int(hp.get("demo_timesteps", 20_000)) if args.demo else int(pick("n_timesteps", None))
    cfg = {
        "algo": args.algo, "env": env_id, "env_kwargs": _plain(env_kwargs), "seed": int(args.seed),
        "n_timesteps": int(n_timesteps), "n_envs": int(pick("n_envs", args.n_envs)),
        "vec_env": pick("vec_env", args.vec_env), "eval_freq": int(pick("eval_freq", args.eval_freq)),
        "eval_episodes": int(pick("eval_episodes", args.eval_episodes)), "eval_seed": int(args.eval_seed),
        "save_freq": int(pick("save_freq", args.save_freq)), "num_threads": int(args.num_threads),
        "tensorboard_log": args.tensorboard_log, "demo": bool(args.demo), "hyperparams_source": source,
        "hyperparams": _plain({k: v for k, v in hp.items() if k != "demo_timesteps"}),
    }
    if cfg["n_timesteps"] < 1 or cfg["n_envs"] < 1 or cfg["eval_episodes"] < 1:
        raise UsageError("--n-timesteps, --n-envs and --eval-episodes must be >= 1")
    # budget in whole rollouts, so a resumed run replays exactly the remaining budget
    rollout = cfg["n_envs"] * int(hp.get("n_steps", 2048 if args.algo != "a2c" else 5))
    if cfg["n_timesteps"] % rollout:
        rounded = (cfg["n_timesteps"] // rollout + 1) * rollout
        print(f"note: n_timesteps {cfg['n_timesteps']} rounded up to {rounded} (whole rollouts of "
              f"n_envs * n_steps = {rollout})")
        cfg["n_timesteps"] = rounded
    return cfg


POLICY_NAMES = ("expert_set", "mlp", "MultiInputPolicy", "MlpPolicy")


def select_policy_kwargs(hp: dict, override: str | None) -> dict:
    """``policy_kwargs`` may be flat (for the YAML's policy) or keyed by policy name
    (``{expert_set: {...}, mlp: {...}}``); return the kwargs of the policy that will be used."""
    pk = hp.get("policy_kwargs") or {}
    policy = override or hp.get("policy", "expert_set")
    if any(k in POLICY_NAMES for k in pk):
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


def _command_line(argv: list[str]) -> str:
    return shlex.join([Path(sys.executable).name, "train.py", *argv])


# ---- training ---------------------------------------------------------------------------------------
def train(args: argparse.Namespace, argv: list[str], on_evaluation=None) -> Path:
    import torch

    torch.set_num_threads(max(int(args.num_threads), 1))
    resumed = args.resume is not None
    if resumed:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yml").exists():
            raise UsageError(f"--resume {run_dir}: no config.yml there; pass a run folder written by train.py")
        import yaml

        cfg = yaml.safe_load((run_dir / "config.yml").read_text())
        with open(run_dir / "command.txt", "a") as fh:
            fh.write(_command_line(argv) + "\n")
    else:
        cfg = resolve_config(args)
        run_dir = new_run_dir(args.log_folder, cfg["algo"], cfg["env"], args.run_name)
        (run_dir / "command.txt").write_text(_command_line(argv) + "\n")
        _write_yaml(run_dir / "config.yml", cfg)
        _write_yaml(run_dir / "hyperparams.yml", cfg["hyperparams"])
    return _train(cfg, run_dir, resumed=resumed, progress=args.progress, verbose=args.verbose,
                  compare=not args.no_compare, on_evaluation=on_evaluation)


def _train(cfg: dict, run_dir: Path, *, resumed: bool, progress: bool, verbose: int, compare: bool,
           on_evaluation=None) -> Path:
    """on_evaluation: listener of every evaluation row (sweeps); a truthy return stops the run early
    (status "stopped"; ``--resume`` continues it to the full budget)."""
    import gymnasium as gym
    from stable_baselines3.common.utils import set_random_seed
    from stable_baselines3.common.vec_env import VecNormalize

    import wide_env  # noqa: F401
    from agents.callbacks import (CheckpointEvalCallback, WideMetricsCallback, atomic_save_model,
                                  atomic_save_vecnormalize, atomic_write_text, latest_checkpoint, read_eval_log)
    from agents.evaluation import AgentPolicy, evaluate

    algo, env_id, env_kwargs = cfg["algo"], cfg["env"], cfg["env_kwargs"]
    hp = dict(cfg["hyperparams"])
    run_hp, algo_kwargs = split_hyperparams(hp)
    cls = algo_class(algo)
    budget = int(cfg["n_timesteps"])

    probe = gym.make(env_id, **env_kwargs)
    problem = probe.unwrapped.problem
    if not resumed and hasattr(probe.unwrapped, "config"):
        atomic_write_text(run_dir / "env_config.json", json.dumps(probe.unwrapped.config.to_dict(), indent=1))
    observation_space = probe.observation_space
    probe.close()

    ckpt = latest_checkpoint(run_dir) if resumed else None
    attempt = len(list((run_dir / "monitor").glob("train_*"))) if (run_dir / "monitor").exists() else 0
    seed = int(cfg["seed"]) + 1000 * attempt  # fresh env randomness after a resume
    set_random_seed(seed)
    venv = make_vec_env(env_id, env_kwargs, cfg["n_envs"], seed, cfg["vec_env"],
                        monitor_path=str(run_dir / "monitor" / f"train_{attempt}"))
    normalize = run_hp.get("normalize", False)
    vecnorm = None
    if normalize:
        if ckpt and ckpt.get("vecnormalize_path"):
            venv = VecNormalize.load(ckpt["vecnormalize_path"], venv)
            venv.training = True
        else:
            kw = normalize if isinstance(normalize, dict) else {"norm_obs": True, "norm_reward": False}
            venv = VecNormalize(venv, gamma=float(hp.get("gamma", 0.99)), **kw)
        vecnorm = venv

    tb = cfg.get("tensorboard_log")
    if tb is None:
        tb = str(run_dir / "tb")
    if str(tb).lower() == "none":
        tb = None
    elif not _has_tensorboard():
        print("note: tensorboard is not installed; TensorBoard logging is off")
        tb = None

    state = {}
    if ckpt is not None:
        model = cls.load(ckpt["model_path"], env=venv, device="cpu", tensorboard_log=tb)
        state = {k: ckpt[k] for k in ("best_reward", "last_eval", "last_save", "wall_s") if k in ckpt}
        state["last_save"] = int(model.num_timesteps)
        print(f"resuming {run_dir} from {ckpt['model_path']} at {model.num_timesteps} of {budget} timesteps")
    else:
        if resumed:
            print(f"resuming {run_dir}: no checkpoint yet, starting from scratch")
        policy, policy_kwargs = resolve_policy(hp.get("policy", "expert_set"), algo, observation_space, problem,
                                               algo_kwargs.pop("policy_kwargs", None))
        algo_kwargs.pop("policy_kwargs", None)
        model = cls(policy, venv, seed=int(cfg["seed"]), device="cpu", tensorboard_log=tb,
                    verbose=1 if verbose > 1 else 0, policy_kwargs=policy_kwargs, **algo_kwargs)
    maskable = algo == "maskable_ppo"
    episodes, eval_seed = int(cfg["eval_episodes"]), int(cfg["eval_seed"])

    def eval_agent(m) -> dict:
        pol = AgentPolicy(m, problem, maskable=maskable, vecnorm=_frozen(vecnorm))
        return evaluate(env_id, env_kwargs, [(algo, pol)], episodes=episodes, seed=eval_seed)[0]

    ref_path = run_dir / "eval" / "reference.csv"
    reference = _read_csv(ref_path)
    if not reference:
        reference = evaluate(env_id, env_kwargs, ["siftmoe", "topk"], episodes=episodes, seed=eval_seed)
        ref_path.parent.mkdir(parents=True, exist_ok=True)
        from agents.evaluation import write_csv

        write_csv(reference, ref_path)

    ckpt_cb = CheckpointEvalCallback(run_dir, eval_agent, eval_freq=cfg["eval_freq"], save_freq=cfg["save_freq"],
                                     vecnorm=vecnorm, state=state, verbose=verbose, on_evaluation=on_evaluation)
    callbacks = [WideMetricsCallback(problem.n_layers), ckpt_cb]
    _write_status(run_dir, "running", model.num_timesteps, budget)
    remaining = budget - int(model.num_timesteps)
    t0 = time.time()
    if remaining > 0:
        model.learn(total_timesteps=remaining, callback=callbacks, reset_num_timesteps=ckpt is None,
                    progress_bar=progress, tb_log_name="tb")
    train_s = time.time() - t0
    if ckpt_cb.stop_requested:  # a sweep pruned this run: keep its checkpoints, skip the final comparison
        venv.close()
        _write_status(run_dir, "stopped", model.num_timesteps, budget, train_s=train_s)
        return run_dir
    ckpt_cb.model = model
    if ckpt_cb.last_eval < model.num_timesteps and cfg["eval_freq"] >= 0:
        ckpt_cb.run_eval()
    if ckpt_cb.last_save < model.num_timesteps or latest_checkpoint(run_dir) is None:
        ckpt_cb.save_checkpoint()
    atomic_save_model(model, run_dir / "final_model.zip")
    if vecnorm is not None:
        atomic_save_vecnormalize(vecnorm, run_dir / "vecnormalize.pkl")
    _write_status(run_dir, "trained", model.num_timesteps, budget, train_s=train_s)
    print(f"trained {model.num_timesteps} timesteps in {train_s:.0f} s ({run_dir / 'final_model.zip'})")

    eval_rows = read_eval_log(run_dir / "eval" / "eval_log.csv")
    if compare:
        _compare(cfg, run_dir, model, problem, vecnorm, reference, eval_rows)
    venv.close()
    _write_status(run_dir, "done", model.num_timesteps, budget, train_s=train_s)
    return run_dir


def _frozen(vecnorm):
    if vecnorm is None:
        return None
    import copy

    vn = copy.copy(vecnorm)
    vn.training = False
    return vn


def _compare(cfg, run_dir, model, problem, vecnorm, reference, eval_rows) -> None:
    from agents.evaluation import (AgentPolicy, add_relative_columns, evaluate, format_table,
                                   plot_learning_curve, write_csv)

    algo = cfg["algo"]
    cls = algo_class(algo)
    maskable = algo == "maskable_ppo"
    policies = [(f"{algo} (final)", AgentPolicy(model, problem, maskable=maskable, vecnorm=_frozen(vecnorm)))]
    best_path = run_dir / "best_model.zip"
    if best_path.exists():
        best = cls.load(best_path, device="cpu")
        best_vn = vecnorm
        if vecnorm is not None and (run_dir / "best_vecnormalize.pkl").exists():
            from stable_baselines3.common.vec_env import VecNormalize

            best_vn = VecNormalize.load(str(run_dir / "best_vecnormalize.pkl"), vecnorm.venv)
        policies.append((f"{algo} (best)", AgentPolicy(best, problem, maskable=maskable, vecnorm=_frozen(best_vn))))
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
    header = (f"{cfg['env']}: {cfg['eval_episodes']} episodes per policy, seeds {cfg['eval_seed']}.."
              f"{cfg['eval_seed'] + int(cfg['eval_episodes']) - 1}")
    text = "\n".join([header, table, *extra])
    print(text)
    (run_dir / "comparison.txt").write_text(text + "\n")
    write_csv(rows, run_dir / "comparison.csv")
    write_csv(ep_rows, run_dir / "comparison_episodes.csv")
    title = f"{algo} on {cfg['env']} ({cfg['hyperparams'].get('policy', '')}, seed {cfg['seed']})"
    plot_learning_curve(eval_rows, reference, run_dir / "learning_curve.png", title=title)
    print(f"wrote {run_dir / 'comparison.csv'} and {run_dir / 'learning_curve.png'}")


def _write_status(run_dir: Path, state: str, n: int, budget: int, **extra) -> None:
    from agents.callbacks import atomic_write_text

    atomic_write_text(run_dir / "status.json", json.dumps(
        {"state": state, "num_timesteps": int(n), "n_timesteps": int(budget), "time": time.time(), **extra}))


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
