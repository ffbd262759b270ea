"""WIDE observations as the analytic policies and saved agents read them: parsed by key name from the env's
layout (``problem.obs_slices``, built by :mod:`wide_env.sim.observation`), and the action masks rebuilt
from them (numpy only)."""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["problem_of", "parse_observation", "layer_of", "feasible_actions", "action_masks"]


def problem_of(env) -> Any:
    """``env.unwrapped.problem`` with a clear error when the env is not a WIDE env."""
    problem = getattr(getattr(env, "unwrapped", env), "problem", None)
    if problem is None:
        raise TypeError(f"{env!r} has no 'unwrapped.problem'; pass a WIDE environment "
                        "(e.g. gym.make('wide_env/WideMoE-v0'))")
    return problem


def parse_observation(obs, problem) -> tuple[dict[str, np.ndarray], bool]:
    """Observation (dict or flat, single or batched) -> (dict of float64 (B, size) arrays, one per key of the
    env's layout ``problem.obs_slices``, single). Keys are taken by name from the layout, so a key added to
    the layout (wide_env/sim/observation.py) is parsed too."""
    slices = problem.obs_slices
    if isinstance(obs, dict):
        missing = [k for k in slices if k not in obs]
        if missing:
            raise KeyError(f"observation lacks keys {missing}; this env's observation layout has keys {list(slices)}")
        arrays = {k: np.asarray(obs[k], dtype=np.float64) for k in slices}
    else:
        flat = np.asarray(obs, dtype=np.float64)
        total = max(sl.stop for sl in slices.values())
        if flat.ndim not in (1, 2) or flat.shape[-1] != total:
            raise ValueError(f"flat observation has shape {flat.shape}; expected ({total},) or (B, {total}) "
                             "as laid out by problem.obs_slices")
        arrays = {k: flat[..., sl] for k, sl in slices.items()}
    single = next(iter(arrays.values())).ndim == 1
    if single:
        arrays = {k: v[None] for k, v in arrays.items()}
    for key, sl in slices.items():
        if arrays[key].shape[-1] != sl.stop - sl.start:
            raise ValueError(f"observation key {key!r} has {arrays[key].shape[-1]} entries; this env's layout "
                             f"(problem.obs_slices) has {sl.stop - sl.start}")
    return arrays, single


def layer_of(arrays: dict[str, np.ndarray], problem) -> np.ndarray:
    """(B,) int64 the MoE layer of each decision, from the observation's ``position`` (layer / (L - 1) first)."""
    L = problem.n_layers
    return np.rint(arrays["position"][:, 0] * max(L - 1, 1)).astype(np.int64)


def feasible_actions(arrays: dict[str, np.ndarray], problem) -> np.ndarray:
    """(B, n_actions) bool: the action entries that may be 1, from a parsed observation. While deadline
    enforcement is on, an expert that cannot meet the deadline (``deadline_probability`` 0: the helpers'
    queueing is uncertain, so this is what the device can rule out) may not run (prefill: at a load of one
    token, for every token); this is ``env.action_masks()``'s rule, rebuilt from the observation."""
    if "load_deadline_probability" in arrays:  # prefill: (B, E * T) expert-major loads -> (B, T * E) pairs
        T, E = problem.prompt_tokens, problem.n_experts
        one_token = arrays["load_deadline_probability"].reshape(-1, E, T)[:, :, 0]
        ok = one_token > 0 if problem.enforce_deadline else np.ones(one_token.shape, dtype=bool)
        return np.repeat(ok[:, None, :], T, axis=1).reshape(-1, T * E)
    p = arrays["deadline_probability"]
    return p > 0 if problem.enforce_deadline else np.ones(p.shape, dtype=bool)


def action_masks(obs, problem) -> np.ndarray:
    """sb3-contrib's MultiBinary masks, (2 n,) or (B, 2 n): pairs [may be 0, may be 1] per action entry."""
    arrays, single = parse_observation(obs, problem)
    may = feasible_actions(arrays, problem)
    masks = np.stack([np.ones_like(may), may], axis=-1).reshape(may.shape[0], -1)
    return masks[0] if single else masks
