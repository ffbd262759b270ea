"""The environments of an evaluation (:mod:`baselines.evaluate`): the registered kwargs with the user's config and a
budget scale merged in, the accuracy source, and the native vector env or the single env that runs the episodes."""
from __future__ import annotations

import math

from wide_env.config import deep_merge

__all__ = ["IDEAL_TOPK", "VEC_ENV_MODES", "ACCURACY_MODES", "env_kwargs_for_scale", "resolve_vec_env",
           "accuracy_env_kwargs", "make_eval_env"]

#: how an evaluation runs its episodes (see :mod:`baselines.evaluate`)
VEC_ENV_MODES = ("auto", "native", "single")

#: policy name for ideal Top-K: Top-K routing with deadline enforcement off (late experts still count)
IDEAL_TOPK = "topk_ideal"


def env_kwargs_for_scale(env_id: str, env_kwargs: dict | None, scale: float | None) -> dict:
    """Registered kwargs + user kwargs (configs deep-merged) + the budget scale folded into the config."""
    import gymnasium as gym

    import wide_env  # noqa: F401  (registers the environments)
    from wide_env.config import WideConfig

    try:
        spec = gym.spec(env_id)
    except Exception as exc:  # gymnasium raises its own NameNotFound / NamespaceNotFound
        raise ValueError(f"unknown environment id {env_id!r}: {exc}; registered WIDE ids: "
                         f"{sorted(wide_env.ENVIRONMENTS)}") from None
    user = dict(env_kwargs or {})
    config = user.pop("config", None) or {}
    if isinstance(config, WideConfig):
        config = config.to_dict()
    if not isinstance(config, dict):
        raise TypeError(f"env_kwargs['config'] must be a dict, got {type(config).__name__}")
    merged = dict(config)
    if scale is not None:
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"budget scale must be a positive number, got {scale!r}")
        preset = user.get("preset", spec.kwargs.get("preset"))
        base = WideConfig.from_dict(merged, preset=preset).budget.scale
        merged = deep_merge(merged, {"budget": {"scale": float(base) * float(scale)}})
    return {**user, "config": merged}


def resolve_vec_env(env_id: str, kwargs: dict, mode: str) -> str:
    """"native" or "single" for ``mode`` ("auto": native when the id has a batched core)."""
    import gymnasium as gym

    if mode not in VEC_ENV_MODES:
        raise ValueError(f"vec_env must be one of {list(VEC_ENV_MODES)}, got {mode!r}")
    if mode == "single":
        return mode
    batched = gym.spec(env_id).vector_entry_point is not None
    if mode == "native" and not batched:
        raise ValueError(f"vec_env='native': {env_id} has no batched core (no vector entry point); use 'single' or "
                         "'auto'")
    return "native" if batched else "single"


ACCURACY_MODES = ("auto", "rule", "model", "live")


def accuracy_env_kwargs(env_id: str, kwargs: dict, accuracy: str) -> dict:
    """``kwargs`` with the decoding env's accuracy source set: "rule" and "model" set ``gating.accuracy``,
    "live" runs the live backend (``gating.backend = "live"``: the live router's gating in the observations),
    "auto" measures on the model wherever it can (a trace with its checkpoint, torch installed, the config's
    ``gating.accuracy`` left at "auto"): tables judge policies, so they are exact even where the env's own fast
    default is the validated rule; else the env's own source."""
    import importlib.util

    import gymnasium as gym

    from wide_env.config import WideConfig
    from wide_env.envs.model_backend import checkpoint_dir_of

    if accuracy not in ACCURACY_MODES:
        raise ValueError(f"accuracy must be one of {list(ACCURACY_MODES)}, got {accuracy!r}")
    spec = gym.spec(env_id)
    if "WideMoEEnv" not in str(spec.entry_point):  # accuracy is the decoding env's
        if accuracy in ("live", "model"):
            raise ValueError(f"accuracy={accuracy!r}: {env_id} reports no real accuracy (decoding envs only)")
        return kwargs
    if accuracy == "auto":
        config = WideConfig.from_dict(kwargs.get("config"), preset=kwargs.get("preset", spec.kwargs.get("preset")))
        g = config.gating
        if (g.source != "trace" or g.backend != "table" or g.accuracy != "auto" or checkpoint_dir_of(config) is None
                or importlib.util.find_spec("torch") is None):
            return kwargs
        accuracy = "model"
    gating = {"backend": "live"} if accuracy == "live" else {"accuracy": accuracy}
    return {**kwargs, "config": deep_merge(kwargs.get("config") or {}, {"gating": gating})}


def make_eval_env(env_id: str, kwargs: dict, mode: str, episodes: int):
    import gymnasium as gym

    if mode == "native":
        return gym.make_vec(env_id, num_envs=episodes, vectorization_mode="vector_entry_point", **kwargs)
    return gym.make(env_id, **kwargs)
