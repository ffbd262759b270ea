"""Shared pieces of the training entry point: hyperparameters, env ids, env kwargs, policies, VecEnvs."""

from __future__ import annotations

import ast
import copy
import os
from pathlib import Path
from typing import Callable

import gymnasium as gym

from agents.registry import TRAINABLE_ALGORITHMS, algorithm
from wide_env.config import deep_merge

HYPERPARAMS_DIR = Path(__file__).resolve().parent / "hyperparams"
DEFAULT_ENV = "wide_env/WideMoE-v0"
#: VecEnv kinds of --vec-env; "native" = wide_env's batched core (make_native_vec_env)
VEC_ENV_KINDS = ("native", "dummy", "subproc")

# hyperparameter keys that are not constructor arguments of the algorithm
_RUN_KEYS = ("n_envs", "n_timesteps", "policy", "normalize", "eval_freq", "eval_episodes", "save_freq",
             "vec_env", "env_kwargs", "reward_shaping", "shield")


class UsageError(ValueError):
    """A user error on the command line; train.py prints the message and exits with status 2."""


def algo_class(name: str):
    """The SB3 / sb3-contrib class of a trainable algorithm (see :data:`agents.registry.ALGORITHMS`)."""
    if str(name).lower() not in TRAINABLE_ALGORITHMS:
        raise UsageError(f"unknown algorithm {name!r}; choose one of {list(TRAINABLE_ALGORITHMS)}")
    return algorithm(name).load_class()


# ---- command-line values --------------------------------------------------------------------------
def parse_env_kwargs(text: str | dict | None) -> dict:
    """A Python dict literal (``ast.literal_eval``, never ``eval``) -> dict; anything else is rejected."""
    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        return copy.deepcopy(text)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        raise UsageError(
            f"--env-kwargs must be a Python dict literal such as \"{{'config': {{'n_tokens': 8}}}}\"; "
            f"{text!r} is not a literal (only strings, numbers, tuples, lists, dicts, sets, booleans and None "
            f"are allowed; no names, calls or expressions): {type(exc).__name__}: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError(f"--env-kwargs must be a dict literal, got a {type(value).__name__}: {text!r}; "
                         "example: \"{'config': {'n_tokens': 8}}\"")
    if not all(isinstance(k, str) for k in value):
        raise UsageError(f"--env-kwargs keys must be strings (keyword arguments of gym.make), got {list(value)}")
    return value


def registered_wide_ids() -> list[str]:
    import wide_env  # noqa: F401  (registers)

    return sorted(k for k in gym.registry if k.startswith("wide_env/"))


def check_env_id(env_id: str) -> str:
    """Return the id if registered; otherwise raise UsageError listing the registered WIDE ids."""
    import wide_env  # noqa: F401

    if env_id in gym.registry:
        return env_id
    try:  # "module:id" form or a namespace import
        gym.spec(env_id)
        return env_id
    except Exception:
        pass
    ids = registered_wide_ids()
    import difflib

    close = difflib.get_close_matches(env_id, ids, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UsageError(f"unknown environment id {env_id!r}.{hint} Registered wide_env ids:\n  " + "\n  ".join(ids))


def env_slug(env_id: str) -> str:
    return env_id.replace("/", "-").replace(":", "-")


# ---- hyperparameters ------------------------------------------------------------------------------
def load_hyperparams(algo: str, env_id: str, conf_file: str | None = None) -> tuple[dict, str]:
    """(hyperparameters, source) for ``env_id`` from ``conf_file`` or ``agents/hyperparams/{algo}.yml``.

    Files are keyed by env id; ``default`` applies to ids not listed, and an env entry is merged over
    ``default`` (nested dicts merged key by key)."""
    import yaml

    path = Path(conf_file) if conf_file else HYPERPARAMS_DIR / f"{algo}.yml"
    if not path.exists():
        raise UsageError(f"hyperparameter file {str(path)!r} does not exist")
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of env id -> hyperparameters")
    if conf_file and not any(isinstance(v, dict) for v in data.values()):
        data = {"default": data}  # a flat file: the hyperparameters themselves
    base = copy.deepcopy(data.get("default") or {})
    if env_id in data:
        base = deep_merge(base, copy.deepcopy(data[env_id] or {}))
        source = f"{path}:{env_id}"
    elif "default" in data:
        source = f"{path}:default"
    else:
        raise UsageError(f"{path} has no entry for {env_id!r} and no 'default' entry; keys: {sorted(data)}")
    return base, source


def _schedule(value):
    """'lin_3e-4' -> linear decay from 3e-4 to 0 (rl-zoo convention); numbers pass through."""
    if isinstance(value, str) and value.startswith("lin_"):
        start = float(value[4:])

        def linear(progress_remaining: float) -> float:
            return progress_remaining * start

        return linear
    return value


def split_hyperparams(hp: dict) -> tuple[dict, dict]:
    """(run settings, algorithm constructor kwargs) with schedules resolved."""
    run = {k: hp[k] for k in _RUN_KEYS if k in hp}
    algo_kwargs = {k: _schedule(v) for k, v in hp.items() if k not in _RUN_KEYS}
    return run, algo_kwargs


def policy_sizes(problem) -> dict:
    """The sizes the networks need to read a WIDE observation (flat or Dict; prefill adds prompt_tokens)."""
    sizes = dict(n_experts=int(problem.n_experts), top_k=int(problem.top_k), n_nodes=int(problem.n_nodes))
    if hasattr(problem, "prompt_tokens"):
        sizes["prompt_tokens"] = int(problem.prompt_tokens)
    return sizes


def resolve_policy(policy: str, algo: str, observation_space, problem, policy_kwargs: dict | None):
    """Policy name in the YAML -> (SB3 policy class or name, policy_kwargs).

    ``expert_set``: the permutation-equivariant network; ``mlp``: SB3's MLP over the scaled observation
    (both in :data:`agents.registry.NETWORKS`); any other string is passed to SB3 unchanged
    (``MultiInputPolicy``, ``MlpPolicy``)."""
    from agents.networks import ExpertSetPolicy, MaskableExpertSetPolicy, WideFlatExtractor

    kwargs = copy.deepcopy(policy_kwargs or {})
    sizes = policy_sizes(problem) if problem is not None else {}
    flat = not isinstance(observation_space, gym.spaces.Dict)
    if policy == "expert_set":
        kwargs.update(sizes)
        return (MaskableExpertSetPolicy if algorithm(algo).maskable else ExpertSetPolicy), kwargs
    if policy == "mlp":
        fe = dict(kwargs.pop("features_extractor_kwargs", {}) or {})
        fe.update(sizes)
        kwargs["features_extractor_class"] = WideFlatExtractor
        kwargs["features_extractor_kwargs"] = fe
        return ("MlpPolicy" if flat else "MultiInputPolicy"), kwargs
    if "activation_fn" in kwargs and isinstance(kwargs["activation_fn"], str):
        import torch.nn as nn

        kwargs["activation_fn"] = getattr(nn, kwargs["activation_fn"])
    return policy, kwargs


# ---- environments ---------------------------------------------------------------------------------
def make_env_fn(env_id: str, env_kwargs: dict, seed: int, rank: int, shield: bool = False) -> Callable[[], gym.Env]:
    def _init():
        import wide_env  # noqa: F401  (registers in subprocesses)

        env = gym.make(env_id, **copy.deepcopy(env_kwargs))
        if shield:
            from wide_env.wrappers import DeviationShield

            env = DeviationShield(env)
        env.reset(seed=seed + rank)
        env.action_space.seed(seed + rank)
        return env

    return _init


def has_native_core(env_id: str) -> bool:
    """True when ``env_id`` has wide_env's batched core (a vector entry point, so make_native_vec_env works)."""
    import wide_env  # noqa: F401  (registers)

    return gym.spec(env_id).vector_entry_point is not None


def make_vec_env(env_id: str, env_kwargs: dict, n_envs: int, seed: int, kind: str = "native",
                 monitor_path: str | None = None, shield: bool = False):
    """A VecEnv of ``n_envs`` episodes wrapped in VecMonitor (episode returns for SB3's logger).

    ``native``: wide_env's batched core (one generator seeded with ``seed`` drives every sub-env);
    ``dummy`` / ``subproc``: ``n_envs`` copies of ``gym.make(env_id, **env_kwargs)``, sub-env i seeded
    with ``seed + i``. ``shield``: every action is shielded (:mod:`agents.shielding`)."""
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecMonitor

    if kind == "native":
        if not has_native_core(env_id):
            raise UsageError(f"--vec-env native: {env_id} has no batched core (no vector entry point); "
                             "use --vec-env dummy or subproc")
        from wide_env.integrations.sb3_vec import make_native_vec_env

        venv = make_native_vec_env(env_id, n_envs, seed, env_kwargs)
        if shield:
            from agents.shielding import ShieldedVecEnv

            venv = ShieldedVecEnv(venv)
    elif kind == "subproc":
        venv = SubprocVecEnv([make_env_fn(env_id, env_kwargs, seed, i, shield) for i in range(n_envs)])
    elif kind == "dummy":
        venv = DummyVecEnv([make_env_fn(env_id, env_kwargs, seed, i, shield) for i in range(n_envs)])
    else:
        raise UsageError(f"--vec-env must be one of {list(VEC_ENV_KINDS)}, got {kind!r}")
    venv.seed(seed)
    if monitor_path:
        os.makedirs(os.path.dirname(monitor_path), exist_ok=True)
    return VecMonitor(venv, filename=monitor_path)
