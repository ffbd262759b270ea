"""Native vector envs: B WIDE episodes stepped by one batched call per step (no Python loop over sub-envs).

`WideMoEVectorEnv` (decoding, the ``vector_entry_point`` of ``wide_env/WideMoE-v0`` and its presets) and
`WideMoEPrefillVectorEnv` (prefill): ``gym.make_vec(id, num_envs=B, vectorization_mode="vector_entry_point")``.
Both are :class:`BatchedVectorEnv` over an :class:`~wide_env.envs.batch.EpisodeBatch` of their simulator,
the same one the single envs use as a batch of one, so every number has the single env's meaning.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from wide_env.config import WideConfig
from wide_env.envs.actions import validate_action
from wide_env.envs.batch import EpisodeBatch, EpisodeBatchHandle
from wide_env.envs.decode import build_problem, observation_space_for
from wide_env.envs.prefill import build_prefill_problem, prefill_entries
from wide_env.gating import make_gating_source
from wide_env.sim.decode import DecodeSimulator
from wide_env.sim.prefill import PrefillSimulator

#: info keys a (re)set decoding sub-env reports (the single env's ``reset`` info)
RESET_INFO_KEYS = DecodeSimulator.RESET_INFO_KEYS


class BatchedVectorEnv(EpisodeBatchHandle, VectorEnv):
    """The Gymnasium vector-env contract (autoreset modes, vector info with masks, seeding) over an
    :class:`EpisodeBatch`; subclasses choose the simulator, the spaces and the action layout."""

    metadata = {"render_modes": [], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def _setup(self, sim, num_envs, make_problem: Callable, single_action_space, to_executed: Callable, render_mode,
               autoreset_mode, max_episode_steps) -> None:
        if render_mode is not None:
            raise ValueError(f"render_mode={render_mode!r}: the native vector env does not render; use None, or "
                             f"gym.make_vec(..., vectorization_mode='sync', render_mode=...) to render sub-envs")
        try:
            mode = AutoresetMode(autoreset_mode)
        except ValueError:
            raise ValueError(f"autoreset_mode={autoreset_mode!r}; choose one of {[m for m in AutoresetMode]}") from None
        self._batch = EpisodeBatch(sim, num_envs, max_episode_steps)
        self.sim = sim
        self.config = sim.config
        self.num_envs = self._batch.num_envs
        self.render_mode = None
        self.autoreset_mode = mode
        self.metadata = {**type(self).metadata, "autoreset_mode": mode}
        self.problem = make_problem(self._batch)
        #: every step's info keys (the single env's)
        self.info_keys = self._batch.info_keys
        self.single_observation_space = observation_space_for(sim.layout, self.config.flatten_observation)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.single_action_space = single_action_space
        self.action_space = batch_space(single_action_space, self.num_envs)
        self._to_executed = to_executed
        self._row_rngs: list | None = None  # per-sub-env generators after reset(seed=[...])
        self._all_true = np.ones(self.num_envs, dtype=bool)
        self._all_true.flags.writeable = False
        self._all_true_masks = {"_" + key: self._all_true for key in self.info_keys}


    @property
    def max_episode_steps(self) -> int | None:
        return self._batch.max_episode_steps

    @property
    def _rng(self):
        """The generator(s) the next draws come from: one for the batch, or one per sub-env."""
        return self._row_rngs if self._row_rngs is not None else self.np_random

    # ---- Gymnasium API ---------------------------------------------------------------------------
    def reset(self, *, seed: int | list | None = None, options: dict[str, Any] | None = None):
        """Reset every sub-env (or those in ``options["reset_mask"]``); returns (observations, info).
        ``seed``: an int (one generator for the batch), a list of ``num_envs`` ints (one per sub-env, each
        replaying the single env with that seed) or None (continue the current generators)."""
        if isinstance(seed, (list, tuple)):
            if len(seed) != self.num_envs or not all(s is None or (isinstance(s, numbers.Integral) and
                                                                   not isinstance(s, bool)) for s in seed):
                raise ValueError(f"seed list must hold {self.num_envs} ints or None (one per sub-env), got {seed!r}")
            super().reset(seed=None)
            self._row_rngs = [np.random.default_rng(s) for s in seed]
        elif seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise ValueError(f"seed must be an int, a list of {self.num_envs} ints (one per sub-env) or None, "
                             f"got {seed!r}")
        else:
            super().reset(seed=seed)
            if seed is not None:
                self._row_rngs = None
        core = self._batch
        mask = None if options is None else options.get("reset_mask")
        if mask is None:
            core.reset_all(self._rng)
            mask = self._all_true
        else:
            mask = np.asarray(mask)
            if mask.shape != (self.num_envs,) or mask.dtype != np.bool_:
                raise ValueError(f"options['reset_mask'] has shape {mask.shape} and dtype {mask.dtype}; expected a "
                                 f"({self.num_envs},) bool array (True = reset that sub-env)")
            if core.state is None:
                if not mask.all():
                    raise ValueError("options['reset_mask'] must be all True at the first reset (no episode exists yet)")
                core.reset_all(self._rng)
            elif mask.any():
                core.reset_rows(self._rng, np.flatnonzero(mask))
        info = core.reset_info()
        for key in core.reset_info_keys:
            info["_" + key] = mask
        return self._package(core.obs), info

    def step(self, actions):
        """Step every sub-env; returns (observations, rewards, terminations, truncations, info)."""
        core = self._batch
        if core.state is None:
            raise RuntimeError("call reset() before step()")
        executed = self._to_executed(actions)
        mode = self.autoreset_mode
        rng = self._rng
        pending = core.pending
        if mode == AutoresetMode.NEXT_STEP and pending.any():
            resets = pending.copy()
            if resets.all():  # lockstep batches end together: just a new episode everywhere
                core.reset_all(rng)
                info = core.reset_info()
                for key in core.only_step_keys:
                    info[key] = np.zeros(self.num_envs, dtype=np.int64 if key in core.int_keys else np.float64)
                masks = {key: (resets if key in core.reset_info_keys else ~resets) for key in core.info_keys}
                return self._finish(core.obs, np.zeros(self.num_envs), np.zeros(self.num_envs, bool), info, masks)
            outcome, truncated = core.step(rng, executed)
            rows = np.flatnonzero(resets)
            core.reset_rows(rng, rows)
            info = core.step_info(outcome)
            fresh = core.reset_info()
            for key in core.reset_info_keys:
                info[key][rows] = fresh[key][rows]
            for key in core.only_step_keys:
                info[key][rows] = 0
            keep = ~resets
            masks = {key: (self._all_true if key in core.reset_info_keys else keep) for key in core.info_keys}
            reward = outcome.column("reward").copy()
            reward[rows] = 0.0
            truncated[rows] = False
            core.pending = truncated.copy()
            return self._finish(core.obs, reward, truncated, info, masks)

        if mode == AutoresetMode.DISABLED and pending.any():
            raise RuntimeError(f"sub-envs {np.flatnonzero(pending).tolist()} are truncated and autoreset_mode is "
                               f"DISABLED; call reset(options={{'reset_mask': mask}}) before step()")
        outcome, truncated = core.step(rng, executed)
        info = core.step_info(outcome)
        masks = None  # every sub-env reports every key
        reward = outcome.column("reward").copy()
        if mode == AutoresetMode.SAME_STEP and truncated.any():
            rows = np.flatnonzero(truncated)
            final_flat = core.obs[rows]
            final_obs = np.full(self.num_envs, None, dtype=object)
            for j, row in enumerate(rows):
                final_obs[row] = self._package(final_flat[j])
            final_info = {}
            for key in core.info_keys:
                final_info[key] = np.where(truncated, info[key], 0).astype(info[key].dtype, copy=False)
                final_info["_" + key] = truncated
            core.reset_rows(rng, rows)
            fresh = core.reset_info()
            for key in core.reset_info_keys:
                info[key] = np.where(truncated, fresh[key], info[key])
            for key in core.only_step_keys:
                info[key] = np.where(truncated, 0, info[key]).astype(info[key].dtype, copy=False)
            keep = ~truncated
            masks = {key: (self._all_true if key in core.reset_info_keys else keep) for key in core.info_keys}
            info["final_obs"], info["_final_obs"] = final_obs, truncated.copy()
            info["final_info"], info["_final_info"] = final_info, truncated.copy()
            core.pending[:] = False
        else:
            core.pending = truncated.copy()
        return self._finish(core.obs, reward, truncated, info, masks)

    def action_masks(self) -> np.ndarray:
        """sb3-contrib MultiBinary masks: (num_envs, 2A) bool, pairs [may be 0, may be 1] per action entry;
        entries that cannot meet the deadline are masked to 0 while deadline enforcement is on."""
        return self._batch.action_masks()

    def current_view(self):
        """The simulator's batched view of the current layer (for analytic policies and tests)."""
        if self._batch.state is None:
            raise RuntimeError("call reset() before current_view()")
        return self.sim.view(self._batch.state)

    def render(self):
        gym.logger.warn(f"{type(self).__name__} does not render; use gym.make_vec(..., vectorization_mode='sync', "
                        "render_mode='ansi') to render sub-envs")
        return None

    def close_extras(self, **kwargs: Any) -> None:
        core = getattr(self, "_batch", None)  # absent when the constructor failed
        if core is not None:
            core.state = None

    # ---- helpers ---------------------------------------------------------------------------------
    def _package(self, flat: np.ndarray):
        """Flat float32 observation(s) -> the space's structure (Dict entries are views of ``flat``)."""
        if self.config.flatten_observation:
            return flat
        return {key: flat[..., sl] for key, sl in self.sim.obs_slices.items()}

    def _finish(self, obs_flat, reward, truncated, info, masks):
        if masks is None:
            info.update(self._all_true_masks)
        else:
            for key, mask in masks.items():
                info["_" + key] = mask
        terminated = np.zeros(self.num_envs, dtype=bool)
        return self._package(obs_flat), reward, terminated, truncated, info


class WideMoEVectorEnv(BatchedVectorEnv):
    """
    ## Description

    `num_envs` independent episodes of `wide_env/WideMoE-v0` (wireless distributed MoE decoding, one
    MoE layer of one token per step) advanced by one batched numpy call per `step`: there is no Python
    loop over sub-envs. Each sub-env has exactly the single env's dynamics, observation, reward and
    info (same simulator and step kernel, see `WideMoEEnv`). Seeding:

    * `reset(seed=s)` (an int) or no seed: ONE generator, `np_random`, drives the whole batch (the fastest);
      with `num_envs=1` the trajectory equals `gym.make("wide_env/WideMoE-v0")` for the same seed and
      actions, including across resets; for `num_envs > 1` sub-env i is not the single env seeded `s + i`
      (SyncVectorEnv's convention), only distributed like it.
    * `reset(seed=[s_0, ..., s_{B-1}])` (a list, as `SyncVectorEnv` takes): sub-env i gets its own generator
      seeded `s_i` and replays `gym.make(...)` reset with `s_i` exactly, across autoresets too, until a reset
      with an int seed. Every sub-env then plans a single env's chunk of tokens (more memory for large B)
      and plans separately (slower resets).

    ## Action Space

    `MultiBinary((num_envs, E))`: row i is sub-env i's `MultiBinary(E)` action (1 = execute expert e).
    bool, integer or float arrays of 0/1 are accepted; another shape (e.g. one sub-env's `(E,)`) or
    values other than 0/1 (2, -1, NaN) raise `ValueError` naming the expected shape.
    `action_masks()` returns a `(num_envs, 2E)` bool array in sb3-contrib's MultiBinary layout.

    ## Observation Space

    The single env's space batched with `gymnasium.vector.utils.batch_space`: a `Dict` whose entries
    are `(num_envs, size)` float32 arrays (keys and ranges as in `WideMoEEnv`), or one
    `(num_envs, D)` float32 `Box` with `config={"flatten_observation": True}`. Dict entries are
    views into one fresh `(num_envs, D)` array per call (never aliased with the env's state).

    ## Rewards

    `(num_envs,)` float64, as in `WideMoEEnv`: `-energy / E_topk - deviation penalty - deadline penalty`.

    ## Episode End

    Sub-envs never terminate (`terminated` is always False); they are truncated after
    `n_tokens * L` steps (the env's own truncation, no `TimeLimit` wrapper), or earlier after
    `max_episode_steps` steps when that argument is given.

    ## Autoreset

    `metadata["autoreset_mode"]`, set by the `autoreset_mode` argument:

    * `AutoresetMode.NEXT_STEP` (default, as Gymnasium's `CartPoleVectorEnv`): the step after a
      sub-env's truncation resets it: that step returns its reset observation, reward 0,
      terminated False, truncated False, its reset info, and ignores its action.
    * `AutoresetMode.SAME_STEP`: a truncated sub-env is reset inside the same step: the returned
      observation is the reset one; `info["final_obs"]` (object array, one single-env observation per
      truncated sub-env, None elsewhere) and `info["final_info"]` (dict of arrays + `_key` masks)
      hold the last step's, with masks `info["_final_obs"]`, `info["_final_info"]`.
    * `AutoresetMode.DISABLED`: stepping a truncated sub-env raises `RuntimeError`; reset it with
      `reset(options={"reset_mask": mask})`.

    `reset(options={"reset_mask": mask})` (a `(num_envs,)` bool array) resets only those sub-envs in
    any mode.

    ## Info

    A dict of `(num_envs,)` arrays following Gymnasium's vector-info convention: every key `k` has a
    bool mask `info["_k"]` saying which sub-envs report it. Step keys are the single env's (`env.info_keys`:
    the step outcome's fields by name, `wide_env.sim.decode.kernel.FLOAT_FIELDS` and `INT_FIELDS`; int64
    counters, float64 otherwise). `reset` reports `RESET_INFO_KEYS`. Every step key is always present; in a step where
    some sub-envs were reset, those sub-envs report the reset keys (with reset values) and their masks
    are False for the other keys (values 0), exactly like `SyncVectorEnv` of the single env.

    ## Arguments

    `gym.make_vec("wide_env/WideMoE-v0", num_envs=B, vectorization_mode="vector_entry_point",
    config={...})`, or `WideMoEVectorEnv(num_envs=B, config=None, autoreset_mode=AutoresetMode.NEXT_STEP,
    max_episode_steps=None, preset=None)`; `config` is the single env's nested dict (or `WideConfig`).
    `render_mode` must be None (use `SyncVectorEnv` of the single env to render).

    ## Batched core

    `env.unwrapped.episode_batch` (a `wide_env.envs.batch.EpisodeBatch`) is the batched core the env drives:
    its `sim` (the phase's simulator, `wide_env.sim.protocol.Simulator`) and `state` (the episodes) are for
    policies that need the simulator (the oracle, span statistics); read them, do not step them.
    """

    def __init__(self, num_envs: int = 1, config: WideConfig | dict | None = None, render_mode: str | None = None,
                 autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP, max_episode_steps: int | None = None,
                 preset: dict | None = None):
        config = WideConfig.from_dict(config, preset=preset)
        sim = DecodeSimulator(config, make_gating_source(config))
        E = sim.n_experts
        entries = f"one 0/1 entry per expert (MultiBinary({E}), 1 = execute)"
        self._setup(sim, num_envs, lambda core: build_problem(sim, config.flatten_observation, core.accuracy_source),
                    spaces.MultiBinary(E), lambda actions: validate_action(actions, (E,), entries, num_envs=self.num_envs),
                    render_mode, autoreset_mode, max_episode_steps)


class WideMoEPrefillVectorEnv(BatchedVectorEnv):
    """
    ## Description

    `num_envs` independent episodes of `wide_env/WideMoEPrefill-v0` (one MoE layer over a prompt of T tokens per
    step, (token, expert) actions) advanced by one batched numpy call per `step`, with the single env's
    dynamics, observation, reward and info (same simulator, see `WideMoEPrefillEnv`). Seeding, autoreset
    modes, `reset_mask`, info masks and `max_episode_steps` as in `WideMoEVectorEnv`.

    ## Action Space

    `MultiBinary((num_envs, T*E))`, row i token-major as the single env's (a `(num_envs, T, E)` array is
    accepted too). `action_masks()` returns `(num_envs, 2*T*E)` bools in sb3-contrib's MultiBinary layout.

    ## Arguments

    `gym.make_vec("wide_env/WideMoEPrefill-v0", num_envs=B, vectorization_mode="vector_entry_point",
    config={...}, prompt_tokens=8, n_prompts=1)`.
    """

    def __init__(self, num_envs: int = 1, config: WideConfig | dict | None = None, render_mode: str | None = None,
                 prompt_tokens: int = 8, n_prompts: int = 1,
                 autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP, max_episode_steps: int | None = None,
                 preset: dict | None = None):
        config = WideConfig.from_dict(config, preset=preset)
        sim = PrefillSimulator(config, make_gating_source(config), prompt_tokens, n_prompts)
        T, E = sim.T, sim.n_experts
        entries = prefill_entries(T, E)

        def to_executed(actions):
            return validate_action(actions, (T * E,), entries, alternative=(T, E),
                                   num_envs=self.num_envs).reshape(self.num_envs, T, E)

        self._setup(sim, num_envs, lambda core: build_prefill_problem(sim, config.flatten_observation),
                    spaces.MultiBinary(T * E),
                    to_executed, render_mode, autoreset_mode, max_episode_steps)
