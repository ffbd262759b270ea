"""The settings of a training run: train.py's command line and the run config resolved from it, from the YAML
hyperparameters and from a resumed run's saved ``config.yml`` (the folder layout: :mod:`agents.training`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from agents.common import (DEFAULT_ENV, VEC_ENV_KINDS, UsageError, check_env_id, has_native_core, load_hyperparams,
                           parse_env_kwargs, registered_wide_ids, split_hyperparams)
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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default only where it has one (None: the help text says where the value comes from)."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train an RL agent on a WIDE environment and compare it with SiftMoE and Top-K. "
                    "With no arguments: a short demonstration run on wide_env/WideMoE-v0.",
        formatter_class=_HelpFormatter)
    p.add_argument("--algo", default=None, choices=TRAINABLE_ALGORITHMS, help="RL algorithm (default ppo)")
    p.add_argument("--env", default=None, help=f"registered environment id (default {DEFAULT_ENV})")
    p.add_argument("--env-kwargs", default=None,
                   help="Python dict literal passed to gym.make (parsed with ast.literal_eval), "
                        "e.g. \"{'config': {'n_tokens': 8}}\"; a config merges over the id's preset")
    p.add_argument("--conf-file", default=None,
                   help="YAML hyperparameter file (keyed by env id, with 'default'); "
                        "default agents/hyperparams/ALGO.yml")
    p.add_argument("--hyperparams", nargs="+", default=None, metavar="KEY=VALUE",
                   help="override the YAML's hyperparameters: dotted keys reach into mappings, values are YAML, e.g. "
                        "reward_shaping.accuracy_weight=5 gamma=0.0")
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
    p.add_argument("--shield", action="store_true",
                   help="train and evaluate under the deviation shield (wide_env.wrappers.DeviationShield: experts "
                        "are executed back until each layer fits its budget; YAML key shield: true)")
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


def override_hyperparams(hp: dict, items: list[str]) -> dict:
    """``hp`` with each ``KEY=VALUE`` of --hyperparams set (a dotted KEY reaches into nested mappings, created where
    missing; VALUE is read as YAML, so numbers, booleans and {a: 1} mappings keep their types)."""
    import copy

    import yaml

    out = copy.deepcopy(hp)
    for item in items:
        key, sep, text = item.partition("=")
        parts = key.split(".")
        if not sep or not all(p.strip() for p in parts):
            raise UsageError(f"--hyperparams {item!r}: expected KEY=VALUE with a dotted KEY, e.g. "
                             "reward_shaping.accuracy_weight=5")
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UsageError(f"--hyperparams {item!r}: {part!r} is {child!r} in the YAML, not a mapping")
            node = child
        node[parts[-1]] = yaml.safe_load(text)
    return out


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
    check_run_name(getattr(args, "run_name", None))
    hp, source = load_hyperparams(algo, env_id, args.conf_file)
    if getattr(args, "hyperparams", None):
        hp = override_hyperparams(hp, args.hyperparams)
        source += " with --hyperparams " + " ".join(args.hyperparams)
    check_hyperparams(hp, source, algo, args.policy)
    run_hp, _ = split_hyperparams(hp)
    hp["policy_kwargs"] = select_policy_kwargs(hp, args.policy)
    if args.policy:
        hp["policy"] = args.policy
    if getattr(args, "shield", False):
        hp["shield"] = True

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


#: constructor arguments train.py sets itself (from its flags), never from the YAML
_SET_BY_TRAIN = {"self": None, "policy": "--policy or the YAML's policy", "env": "--env", "seed": "--seed",
                 "device": "train.py (CPU)", "tensorboard_log": "-tb/--tensorboard-log", "verbose": "-v/--verbose",
                 "_init_setup_model": "SB3", "kwargs": None}
#: settings that must be whole numbers >= 1
_POSITIVE_INTS = ("n_steps", "batch_size", "n_epochs", "n_envs", "n_timesteps", "demo_timesteps", "eval_episodes")


def check_hyperparams(hp: dict, source: str, algo: str, policy: str | None) -> None:
    """UsageError naming the key and ``source`` for a YAML key that is neither a run setting nor an argument of the
    algorithm, a count that is not a whole number >= 1, or an unknown policy (--policy or the YAML's)."""
    import inspect

    from agents.common import _RUN_KEYS, algo_class

    cls = algo_class(algo)
    params = [k for k in inspect.signature(cls.__init__).parameters if k not in _SET_BY_TRAIN]
    for key in hp:
        if key in _SET_BY_TRAIN and _SET_BY_TRAIN[key] and key != "policy":
            raise UsageError(f"{source}: {key!r} is set by {_SET_BY_TRAIN[key]}, not by the hyperparameter file; "
                             "remove it")
        if key not in _RUN_KEYS and key not in params and key not in ("demo_timesteps", "policy"):
            raise UsageError(f"{source}: unknown hyperparameter {key!r}: it is neither a run setting "
                             f"({', '.join(_RUN_KEYS)}, demo_timesteps) nor a {cls.__name__} argument "
                             f"({', '.join(params)}); environment options such as render_mode go in --env-kwargs")
    if "shield" in hp:
        from agents.shielding import shield_setting

        try:
            shield_setting(hp["shield"], source)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    for key in _POSITIVE_INTS:
        value = hp.get(key)
        if key in hp and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UsageError(f"{source}: {key} must be a whole number >= 1, got {value!r}")
    valid = (*NETWORKS, *SB3_POLICY_NAMES)
    for name, where in ((hp.get("policy"), f"{source}: policy"), (policy, "--policy")):
        if name is not None and name not in valid:
            raise UsageError(f"{where} {name!r} is not a policy; choose one of {', '.join(valid)}")


def check_model_builds(cfg: dict) -> None:
    """Build the run's model once on a 1- or 2-env DummyVecEnv (nothing is trained or written): a hyperparameter
    or policy_kwargs value SB3 or the network rejects is a UsageError before the run folder exists."""
    import warnings

    from stable_baselines3.common.vec_env import DummyVecEnv

    from agents.common import algo_class, make_env_fn, resolve_policy

    hp = dict(cfg["hyperparams"])
    _, algo_kwargs = split_hyperparams(hp)
    cls = algo_class(cfg["algo"])
    venv = DummyVecEnv([make_env_fn(cfg["env"], cfg["env_kwargs"], 0, i) for i in range(min(cfg["n_envs"], 2))])
    try:
        problem = getattr(venv.envs[0].unwrapped, "problem", None)
        policy, policy_kwargs = resolve_policy(hp.get("policy", "expert_set"), cfg["algo"], venv.observation_space,
                                               problem, algo_kwargs.pop("policy_kwargs", None))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SB3's batch-size advice for the small probe env
            cls(policy, venv, device="cpu", policy_kwargs=policy_kwargs, **algo_kwargs)
    except (TypeError, ValueError, AssertionError, KeyError, AttributeError) as exc:
        raise UsageError(f"the hyperparameters {cfg['hyperparams_source']} (policy {hp.get('policy', 'expert_set')!r})"
                         f" do not build a {cls.__name__} model: {type(exc).__name__}: {exc}") from None
    finally:
        venv.close()


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


def resume_config(args: argparse.Namespace, run_dir: Path) -> dict:
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
    for dest, option in (("conf_file", "--conf-file"), ("hyperparams", "--hyperparams"), ("policy", "--policy"), ("log_folder", "--log-folder"),
                         ("run_name", "--run-name")):
        if getattr(args, dest, None) is not None:
            conflicts.append(f"{option} {getattr(args, dest)!r}")
    if args.demo:
        conflicts.append("--demo")
    if getattr(args, "shield", False) and not cfg.get("hyperparams", {}).get("shield", False):
        conflicts.append("--shield (the run trained without the shield)")
    if conflicts:
        raise UsageError(f"--resume {run_dir} continues the run with its saved settings (config.yml); it cannot "
                         f"change {', '.join(conflicts)}. Drop them, or start a new run. --resume accepts "
                         f"{', '.join(RESUME_OVERRIDES)}.")
    if args.n_timesteps is not None and args.n_timesteps != cfg["n_timesteps"]:
        if args.n_timesteps < 1:
            raise UsageError("-n/--n-timesteps must be >= 1")
        rollout = int(cfg["n_envs"]) * _rollout_steps(cfg["algo"], cfg["hyperparams"])
        budget = _whole_rollouts(int(args.n_timesteps), rollout)
        done = _trained_timesteps(run_dir)
        if done is not None and budget < done[0]:
            raise UsageError(f"--resume {run_dir} -n {args.n_timesteps}: the run has already trained {done[0]} "
                             f"timesteps (checkpoint {done[1]}); -n/--n-timesteps is the new total budget, not "
                             f"additional steps: pass -n {done[0]} or more (e.g. -n {done[0] + budget} for {budget} "
                             "more), or start a new run for a shorter budget")
        print(f"note: new total budget {budget} timesteps (was {cfg['n_timesteps']})")
        cfg["n_timesteps"] = budget
        cfg["hyperparams"]["n_timesteps"] = budget
    cfg["num_threads"] = int(args.num_threads)
    if args.max_cpu_minutes is not None:
        cfg["max_cpu_minutes"] = _cpu_minutes(args.max_cpu_minutes)
    return cfg


def _trained_timesteps(run_dir: Path) -> tuple[int, str] | None:
    """(timesteps, file) of the newest checkpoint of RUN_DIR, or None when it has none."""
    from agents.callbacks import checkpoints_newest_first

    newest = checkpoints_newest_first(run_dir)[:1]
    return (int(newest[0]["num_timesteps"]), Path(newest[0]["model_path"]).name) if newest else None


def check_run_name(name: str | None) -> str | None:
    """--run-name is one folder name inside LOG_FOLDER/ALGO: no separators, no '..', not absolute or empty."""
    if name is None:
        return None
    bad = (not name.strip() or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
           or Path(name).is_absolute() or Path(name).name != name)
    if bad:
        raise UsageError(f"--run-name {name!r} must be a single folder name inside LOG_FOLDER/ALGO (no '/', '\\', "
                         "'..', or absolute path); use --log-folder to choose where runs go")
    return name


def _cpu_minutes(value) -> float | None:
    if value is None:
        return None
    if not (value > 0 and value == value and value != float("inf")):
        raise UsageError(f"--max-cpu-minutes must be a positive number of minutes, got {value!r}")
    return float(value)
