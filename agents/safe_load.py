"""Load a Stable-Baselines3 / sb3-contrib model zip without unpickling anything from it.

``model.save`` writes the model's settings as JSON (``data`` in the zip), and cloudpickles every setting that is
not plain JSON (the policy class, the spaces, the learning-rate and clip schedules, the rollout buffer class,
last observations, episode buffers) as a ``":serialized:"`` field. ``ALGO.load`` unpickles those fields, and a
crafted zip runs any code it likes there. Here every such field is replaced through SB3's own ``custom_objects``
(so ``cloudpickle.loads`` is never called), and the weights are read by ``torch.load(weights_only=True)``:

* classes (policy, rollout buffer, ``policy_kwargs`` entries such as ``features_extractor_class``) are taken from
  a fixed list of known classes, matched by the module and docstring the zip describes in plain text; anything
  else is refused with a :class:`ModelLoadError` naming the field;
* the spaces are rebuilt from their plain-text description (shapes; bounds unbounded, which prediction does not
  use), or taken from the training environment on ``--resume``, and checked against the environment;
* schedules written as code cannot be read back: a ``--resume`` passes the run's own values (its config.yml), an
  evaluation load (predict only, nothing is trained) gets the constant the text names or 0;
* last observations are dropped (training starts from a reset, as SB3 does for a loaded model given an
  environment), and so is the window of recent episode returns behind SB3's ``rollout/ep_rew_mean`` log (it
  restarts empty after a resume; the run's own monitor files and eval log keep every episode).
"""

from __future__ import annotations

import json
import re
import zipfile
from typing import Any

__all__ = ["ModelLoadError", "read_model_data", "detect_algorithm", "safe_custom_objects", "check_environment"]


class ModelLoadError(ValueError):
    """A model file that cannot be loaded (truncated, foreign, unsafe, or for another env); names the file."""


#: settings SB3 rebuilds itself when a loaded model trains again (SB3 resets the env when given one)
_DROPPED = ("_last_obs", "_last_episode_starts", "_last_original_obs", "ep_info_buffer", "ep_success_buffer",
            "_last_lstm_states")
#: settings that hold a schedule (a float, or a function of the remaining progress)
_SCHEDULES = ("learning_rate", "lr_schedule", "clip_range", "clip_range_vf")
_CLASS_TEXT = re.compile(r"^<class '([\w.]+)'>$")


def read_model_data(file: str, algo: str = "") -> dict:
    """The JSON settings (``data``) of a model zip, unparsed fields included; ModelLoadError naming the file."""
    try:
        with zipfile.ZipFile(file) as zf:
            return json.loads(zf.read("data"))
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the {algo + ' ' if algo else ''}model {file!r}: the file is truncated or "
                             f"not a model saved by model.save ({type(exc).__name__}: {exc}); re-save it or pick "
                             "another checkpoint") from None


# ---- known classes ------------------------------------------------------------------------------------------
def _policy_classes(algo: str) -> list[type]:
    from agents import networks
    from agents.registry import algorithm

    spec = algorithm(algo)
    out = list(dict.fromkeys(spec.load_class().policy_aliases.values()))
    if spec.trainable:  # the project's networks (train.py trains these algorithms only)
        out.append(networks.MaskableExpertSetPolicy if spec.maskable else networks.ExpertSetPolicy)
    return out


def _buffer_classes() -> list[type]:
    from sb3_contrib.common.maskable import buffers as maskable
    from sb3_contrib.common.recurrent import buffers as recurrent
    from stable_baselines3.common import buffers

    return [buffers.RolloutBuffer, buffers.DictRolloutBuffer, maskable.MaskableRolloutBuffer,
            maskable.MaskableDictRolloutBuffer, recurrent.RecurrentRolloutBuffer, recurrent.RecurrentDictRolloutBuffer]


def _kwarg_classes() -> dict[str, type]:
    """Classes a ``policy_kwargs`` entry may name, by ``module.qualname``: the project's networks, SB3's feature
    extractors, torch's activations and optimizers."""
    import inspect

    import torch
    from stable_baselines3.common import torch_layers
    from stable_baselines3.common.sb2_compat import rmsprop_tf_like

    from agents import networks

    out = {}
    for module in (networks, torch_layers, torch.nn.modules.activation, torch.optim, rmsprop_tf_like):
        for obj in vars(module).values():
            if inspect.isclass(obj) and issubclass(obj, (torch.nn.Module, torch.optim.Optimizer)):
                out[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return out


def _match(desc: dict, candidates: list[type]) -> type | None:
    """The class among ``candidates`` that the zip's plain-text description of a class names: same module, same
    docstring and the same own attributes; failing that (a model saved by an older version of the class), the one
    candidate with that module and docstring."""
    own = {k for k in desc if not k.startswith(":")}
    same = [c for c in candidates
            if c.__module__ == desc.get("__module__") and vars(c).get("__doc__") == desc.get("__doc__")]
    exact = [c for c in same if set(vars(c)) == own]
    found = exact or same
    return found[0] if len(found) == 1 else None


def _class_of(field: str, desc: dict, candidates: list[type], file: str) -> type:
    cls = _match(desc, candidates)
    if cls is not None:
        return cls
    raise ModelLoadError(f"cannot load the model {file!r} safely: its {field!r} is a pickled class from "
                         f"{desc.get('__module__')!r} that is none of the known ones "
                         f"({', '.join(c.__name__ for c in candidates)}); unpickling it could run code from the file, "
                         "so it is not loaded")


def detect_algorithm(data: dict) -> str | None:
    """The registry name of the algorithm that saved ``data`` (by its policy class), or None when unknown."""
    from agents.registry import ALGORITHMS

    desc = data.get("policy_class")
    if not isinstance(desc, dict):
        return None
    matches = [name for name in ALGORITHMS if _match(desc, _policy_classes(name)) is not None]
    if {"ppo", "a2c"} <= set(matches):  # the same policy classes: PPO has a clip range, A2C none
        matches.remove("a2c" if "clip_range" in data else "ppo")
    return matches[0] if len(matches) == 1 else None


# ---- spaces -------------------------------------------------------------------------------------------------
_BOX_TEXT = re.compile(r"'([^']+)': Box\(.*?, \((\d+(?:, \d+)*),?\), (\w+)\)")


def _described_spaces(data: dict, file: str):
    """(observation space, action space) from the zip's plain-text description: shapes and dtypes, unbounded."""
    import numpy as np
    from gymnasium import spaces

    obs, act = data.get("observation_space") or {}, data.get("action_space") or {}
    bad = f"cannot load the model {file!r}: its {{}} is not a WIDE space (a Dict or Box of float32 observations, " \
          "a MultiBinary action); it is not a model trained on a wide_env environment"
    if "MultiBinary" not in str(act.get(":type:")) or not isinstance(act.get("n"), int):
        raise ModelLoadError(bad.format(f"action space ({act.get(':type:')})"))
    action = spaces.MultiBinary(int(act["n"]))
    kind = str(obs.get(":type:"))
    if "spaces.box.Box" in kind and isinstance(obs.get("_shape"), list):
        return spaces.Box(-np.inf, np.inf, tuple(obs["_shape"]), dtype=np.dtype(obs.get("dtype", "float32"))), action
    if "spaces.dict.Dict" in kind and isinstance(obs.get("spaces"), str):
        text = obs["spaces"]
        boxes = {key: spaces.Box(-np.inf, np.inf, tuple(int(n) for n in shape.split(", ")), dtype=np.dtype(dtype))
                 for key, shape, dtype in _BOX_TEXT.findall(text)}
        if boxes and len(boxes) == text.count("Box("):
            return spaces.Dict(boxes), action
    raise ModelLoadError(bad.format(f"observation space ({kind})"))


def _shapes(space) -> dict | tuple:
    from gymnasium import spaces

    if isinstance(space, spaces.Dict):
        return {k: tuple(s.shape) for k, s in space.spaces.items()}
    return tuple(space.shape)


def check_environment(observation_space, action_space, problem, algo: str, file: str) -> None:
    """ModelLoadError naming both sides when a model's spaces do not fit the env of ``problem`` (another expert
    count, layer or node count, or prefill prompt length)."""
    from gymnasium import spaces

    slices = problem.obs_slices
    env_dict = {k: (sl.stop - sl.start,) for k, sl in slices.items()}
    env_flat = (sum(n for (n,) in env_dict.values()),)
    env_action = (int(problem.n_experts) * int(getattr(problem, "prompt_tokens", 1)),)
    model_obs = _shapes(observation_space)
    env_obs = env_dict if isinstance(observation_space, spaces.Dict) else env_flat
    if model_obs == env_obs and tuple(action_space.shape) == env_action:
        return
    if isinstance(model_obs, dict):
        keys = sorted(set(model_obs) | set(env_obs))
        differ = {k: (model_obs.get(k), env_obs.get(k)) for k in keys if model_obs.get(k) != env_obs.get(k)}
        obs_text = "observation keys differ (key: model shape vs env shape): " + ", ".join(
            f"{k}: {m} vs {e}" for k, (m, e) in differ.items())
    else:
        obs_text = f"observation shape {model_obs} vs the env's {env_obs}"
    raise ModelLoadError(
        f"the {algo} model {file!r} was trained on another environment: its action is MultiBinary({action_space.n}), "
        f"the env's MultiBinary({env_action[0]}) ({problem.n_experts} experts, top-k {problem.top_k}, "
        f"{problem.n_nodes} nodes); {obs_text}. Evaluate it on the environment it was trained on (same n_experts, "
        "top_k, n_nodes and observation keys), or train a model for this one")


# ---- the replacements ---------------------------------------------------------------------------------------
def _schedule_from_text(desc: dict) -> float | None:
    """The constant of a FloatSchedule(ConstantSchedule(val=X)) from its plain-text description, else None."""
    text = desc.get("value_schedule") if isinstance(desc, dict) else None
    m = re.fullmatch(r"ConstantSchedule\(val=([-+0-9.eE]+|inf|nan)\)", str(text))
    return float(m.group(1)) if m else None


def _policy_kwargs(desc: dict, file: str) -> dict:
    known = _kwarg_classes()
    out = {}
    for key, value in desc.items():
        if key.startswith(":"):
            continue
        m = _CLASS_TEXT.match(value) if isinstance(value, str) else None
        if m:
            if m.group(1) not in known:
                raise ModelLoadError(f"cannot load the model {file!r} safely: policy_kwargs.{key} is the class "
                                     f"{m.group(1)!r}, none of the known networks, activations or optimizers; "
                                     "unpickling it could run code from the file, so it is not loaded")
            value = known[m.group(1)]
        elif isinstance(value, str) and value.startswith("<"):
            raise ModelLoadError(f"cannot load the model {file!r} safely: policy_kwargs.{key} is stored as a pickle "
                                 f"({value[:60]}) that is not loaded (it could run code from the file)")
        out[key] = value
    return out


def safe_custom_objects(data: dict, algo: str, file: str, *, observation_space=None, action_space=None,
                        schedules: dict | None = None) -> dict:
    """``custom_objects`` for ``ALGO.load`` replacing every ``:serialized:`` field of ``data`` (so SB3 unpickles
    nothing). ``observation_space`` / ``action_space``: the training env's (a resume); default: rebuilt from the
    zip's description. ``schedules``: trusted values of the schedule settings (a resume's config.yml)."""
    schedules = dict(schedules or {})
    described_obs, described_act = _described_spaces(data, file)
    objects: dict[str, Any] = {"observation_space": observation_space or described_obs,
                               "action_space": action_space or described_act}
    for key, desc in data.items():
        if key in objects or not (isinstance(desc, dict) and ":serialized:" in desc):
            continue
        if key == "policy_class":
            objects[key] = _class_of(key, desc, _policy_classes(algo), file)
        elif key == "rollout_buffer_class":
            objects[key] = _class_of(key, desc, _buffer_classes(), file)
        elif key == "policy_kwargs":
            objects[key] = _policy_kwargs(desc, file)
        elif key in _DROPPED:
            objects[key] = None
        elif key in _SCHEDULES:
            if key in schedules:
                objects[key] = schedules[key]
            else:  # predict only: the optimizer's own state (lr included) is loaded from policy.optimizer.pth
                value = _schedule_from_text(desc)
                objects[key] = 0.0 if value is None else value
        else:
            raise ModelLoadError(f"cannot load the model {file!r} safely: its setting {key!r} is stored as a pickle "
                                 f"({desc.get(':type:')}) that is not loaded (it could run code from the file); "
                                 "re-save the model with this project's train.py")
    missing = [k for k, v in data.items() if isinstance(v, dict) and ":serialized:" in v and k not in objects]
    assert not missing, missing  # every pickled field has a replacement: SB3 unpickles nothing
    return objects
