"""Stable-Baselines3 ``VecEnv`` over the batched WIDE cores (no Python loop over sub-envs per step).

    from wide_env.integrations.sb3_vec import make_native_vec_env
    venv = make_native_vec_env("wide_env/WideMoE-v0", n_envs=64, seed=0, env_kwargs={"config": {...}})
    PPO("MultiInputPolicy", venv)          # or sb3_contrib.MaskablePPO: env_method("action_masks") works

A drop-in for ``make_vec_env(env_id, n_envs, seed, env_kwargs=..., vec_env_cls=DummyVecEnv)``: same
spaces, same SB3 step contract (same-step autoreset, ``infos[i]["terminal_observation"]``,
``infos[i]["TimeLimit.truncated"]``, the single env's info keys as Python numbers). Differences, by design:
one generator drives the whole batch (``seed(s)`` seeds it; DummyVecEnv seeds sub-env i with ``s + i``),
so for the same seed the trajectories differ from DummyVecEnv's (same distribution); and attributes
such as ``problem`` or ``config`` are shared by all sub-envs (read-only through ``set_attr``).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import gymnasium as gym
import numpy as np
from gymnasium.utils import seeding
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvStepReturn

from wide_env.config import WideConfig
from wide_env.envs.vector import BatchedVectorEnv, WideMoEPrefillVectorEnv, WideMoEVectorEnv

#: vector entry points of registered ids -> the native vector env class the adapter drives
NATIVE_VECTOR_ENVS = {"wide_env.envs.vector:WideMoEVectorEnv": WideMoEVectorEnv,
                      "wide_env.envs.vector:WideMoEPrefillVectorEnv": WideMoEPrefillVectorEnv}
#: attributes shared by every sub-env of the batched core; ``set_attr`` refuses to change them.
SHARED_ATTRIBUTES = ("problem", "config", "sim", "render_mode", "observation_space", "action_space", "metadata",
                     "spec", "np_random", "unwrapped")


class _SubEnv:
    """What ``get_attr``/``set_attr``/``env_method`` see as sub-env ``index`` (a handle, no own state
    except attributes set through ``set_attr``)."""

    def __init__(self, owner: "WideMoESB3VecEnv", index: int):
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_index", index)

    problem = property(lambda self: self._owner.problem)
    config = property(lambda self: self._owner.config)
    sim = property(lambda self: self._owner.sim)
    render_mode = property(lambda self: None)
    observation_space = property(lambda self: self._owner.observation_space)
    action_space = property(lambda self: self._owner.action_space)
    metadata = property(lambda self: {"render_modes": []})
    spec = property(lambda self: None)
    np_random = property(lambda self: self._owner.np_random)
    unwrapped = property(lambda self: self)

    def action_masks(self) -> np.ndarray:
        """(2A,) bool: sb3-contrib MultiBinary pairs [may be 0, may be 1] for this sub-env."""
        return self._owner._core.action_masks()[self._index]

    def current_view(self):
        """The simulator's view of this sub-env's current layer (unbatched)."""
        core = self._owner._core
        if core.state is None:
            raise RuntimeError("call reset() before current_view()")
        return core.sim.view(core.state, self._index)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in SHARED_ATTRIBUTES or name in ("action_masks", "current_view"):
            raise AttributeError(
                f"cannot set '{name}' on one sub-env: the native vector env's sub-envs share one batched core "
                f"('{name}' is common to all of them); build a new env, e.g. make_native_vec_env(env_id, n_envs, "
                f"env_kwargs={{'config': {{...}}}})")
        object.__setattr__(self, name, value)


class WideMoESB3VecEnv(VecEnv):
    """SB3 ``VecEnv`` of ``num_envs`` WIDE episodes stepped in one batched call (decoding by default;
    ``vector_cls=WideMoEPrefillVectorEnv`` for prefill).

    Observation/action spaces are the single env's (``Dict`` of float32 Boxes or a flat Box;
    ``MultiBinary``); ``step`` returns (obs batch, float32 rewards (B,), bool dones (B,), list of B
    info dicts). Episodes never terminate and are truncated after their length (or ``max_episode_steps``);
    a finished sub-env is reset in the same step (SB3 convention): its info holds ``terminal_observation``
    (the single env's last observation) and ``TimeLimit.truncated`` (True). Every info holds
    ``TimeLimit.truncated`` and the keys in ``info_keys`` (None, the default: all of the single env's step
    keys, as Python numbers; ``()`` skips building them, which is faster at large B).
    ``env_method("action_masks")`` returns the per-sub-env masks for MaskablePPO. ``seed(s)`` seeds the one
    generator of the batch at the next ``reset()``.
    """

    def __init__(self, num_envs: int = 1, config: WideConfig | dict | None = None, render_mode: str | None = None,
                 max_episode_steps: int | None = None, info_keys: Iterable[str] | None = None,
                 preset: dict | None = None, vector_cls: type[BatchedVectorEnv] = WideMoEVectorEnv,
                 **vector_kwargs: Any):
        if render_mode is not None:
            raise ValueError(f"render_mode={render_mode!r}: the native vector env does not render; use None, or "
                             f"make_vec_env(..., vec_env_cls=DummyVecEnv) to render sub-envs")
        self._vector = vector_cls(num_envs, config=config, max_episode_steps=max_episode_steps, preset=preset,
                                  **vector_kwargs)
        self._core = self._vector.episode_batch
        info_keys = self._core.info_keys if info_keys is None else tuple(info_keys)
        unknown = [k for k in info_keys if k not in self._core.info_keys]
        if unknown:
            raise ValueError(f"info_keys {unknown} are not step info keys of this env; choose from "
                             f"{list(self._core.info_keys)} (or None for all, () for none)")
        self.config = self._vector.config
        self.sim = self._vector.sim
        self.problem = self._vector.problem
        self.info_keys = info_keys
        self._subenvs = [_SubEnv(self, i) for i in range(self._core.num_envs)]
        self._np_random: np.random.Generator | None = None
        self._pending_seed: int | None = None
        self._actions: np.ndarray | None = None
        super().__init__(self._core.num_envs, self._vector.single_observation_space, self._vector.single_action_space)

    @property
    def episode_batch(self):
        """The batched core this VecEnv drives (:class:`wide_env.envs.batch.EpisodeBatch`; read it, do not step
        it), as the Gymnasium front ends' ``episode_batch``: for wrappers such as the deviation shield."""
        return self._core

    # ---- seeding ---------------------------------------------------------------------------------
    @property
    def np_random(self) -> np.random.Generator:
        """The one generator of the batch (seeded randomly on first use unless ``seed`` was called)."""
        if self._np_random is None:
            self._np_random, _ = seeding.np_random(self._pending_seed)
            self._pending_seed = None
        return self._np_random

    def seed(self, seed: int | None = None) -> Sequence[int | None]:
        """Seed the batch's generator at the next ``reset()``. Returns ``[seed] * num_envs``: the sub-envs
        share that one seeded generator (there are no per-sub-env seeds)."""
        if seed is None:
            seed = int(np.random.randint(0, np.iinfo(np.uint32).max, dtype=np.uint32))
        self._pending_seed = int(seed)
        self._seeds = [self._pending_seed] * self.num_envs
        return list(self._seeds)

    # ---- VecEnv API ------------------------------------------------------------------------------
    def reset(self):
        if any(self._options):
            raise ValueError("set_options(...) is not supported by the native vector env (its reset takes no "
                             "options); clear them with set_options(None)")
        if self._pending_seed is not None:
            self._np_random, _ = seeding.np_random(self._pending_seed)
            self._pending_seed = None
        self._core.reset_all(self.np_random)
        self.reset_infos = _rows_to_dicts(self._core.reset_info(), self.num_envs)
        self._reset_seeds()
        self._reset_options()
        return self._package(self._core.obs)

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self) -> VecEnvStepReturn:
        core = self._core
        if core.state is None:
            raise RuntimeError("call reset() before step()")
        if self._actions is None:
            raise RuntimeError("call step_async(actions) before step_wait()")
        executed = self._vector._to_executed(self._actions)
        self._actions = None
        rng = self.np_random
        out, dones = core.step(rng, executed)
        rewards = out.column("reward").astype(np.float32)
        if self.info_keys:
            columns = core.step_info(out)
            infos = _rows_to_dicts({k: columns[k] for k in self.info_keys}, self.num_envs)
            for info, trunc in zip(infos, dones.tolist()):
                info["TimeLimit.truncated"] = trunc
        else:
            infos = [{"TimeLimit.truncated": trunc} for trunc in dones.tolist()]
        if dones.any():
            rows = np.flatnonzero(dones)
            final = core.obs[rows]
            for j, i in enumerate(rows.tolist()):
                infos[i]["terminal_observation"] = self._package(final[j])
            core.reset_rows(rng, rows)
            fresh = _rows_to_dicts({k: v[rows] for k, v in core.reset_info().items()}, rows.size)
            for j, i in enumerate(rows.tolist()):
                self.reset_infos[i] = fresh[j]
        return self._package(core.obs), rewards, dones, infos

    def close(self) -> None:
        self._core.state = None

    def action_masks(self) -> np.ndarray:
        """(num_envs, 2E) bool masks of the whole batch (MaskablePPO reads them via env_method)."""
        return self._core.action_masks()

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return [getattr(self._subenvs[i], attr_name) for i in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        for i in self._get_indices(indices):
            setattr(self._subenvs[i], attr_name, value)

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs) -> list[Any]:
        idx = list(self._get_indices(indices))
        if method_name == "action_masks" and not method_args and not method_kwargs:  # one batched call
            masks = self._core.action_masks()
            return list(masks[idx])
        return [getattr(self._subenvs[i], method_name)(*method_args, **method_kwargs) for i in idx]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]

    def get_images(self) -> Sequence[np.ndarray | None]:
        return [None for _ in range(self.num_envs)]

    # ---- helpers ---------------------------------------------------------------------------------
    def _package(self, flat: np.ndarray):
        if self.config.flatten_observation:
            return flat
        return {key: flat[..., sl] for key, sl in self.sim.obs_slices.items()}


def _rows_to_dicts(columns: dict[str, np.ndarray], n: int) -> list[dict[str, Any]]:
    """dict of (n,) arrays -> n dicts of Python numbers (one C-level ``tolist`` per key)."""
    if not columns:
        return [{} for _ in range(n)]
    keys = list(columns)
    return [dict(zip(keys, row)) for row in zip(*(columns[k].tolist() for k in keys))]


def make_native_vec_env(env_id: str = "wide_env/WideMoE-v0", n_envs: int = 1, seed: int | None = None,
                        env_kwargs: dict[str, Any] | None = None, **adapter_kwargs: Any) -> WideMoESB3VecEnv:
    """The native batched counterpart of SB3's ``make_vec_env(env_id, n_envs, seed, env_kwargs=env_kwargs)``.

    ``env_kwargs`` update the registered kwargs of ``env_id`` exactly as ``gym.make`` does (a preset's settings
    stay: the user's ``config`` merges over them). ``adapter_kwargs`` go to :class:`WideMoESB3VecEnv`
    (``info_keys``, ``max_episode_steps``). ``seed`` seeds the batch's one generator (None: random). Raises
    ValueError for ids without a native core."""
    import wide_env  # noqa: F401  (registers the ids)

    spec = gym.spec(env_id)
    vector_cls = NATIVE_VECTOR_ENVS.get(spec.vector_entry_point)
    if vector_cls is None:
        raise ValueError(f"env_id {env_id!r} has no native batched core (vector_entry_point="
                         f"{spec.vector_entry_point!r}); use a WIDE id such as 'wide_env/WideMoE-v0', or "
                         f"SB3's make_vec_env with DummyVecEnv/SubprocVecEnv")
    kwargs = dict(spec.kwargs)
    kwargs.update(env_kwargs or {})
    if spec.max_episode_steps is not None:
        adapter_kwargs.setdefault("max_episode_steps", spec.max_episode_steps)
    venv = WideMoESB3VecEnv(n_envs, vector_cls=vector_cls, **kwargs, **adapter_kwargs)
    if seed is not None:
        venv.seed(seed)
    return venv
