"""`WideMoEVectorEnv`: B WIDE decoding episodes stepped by one batched numpy call per step.

The ``vector_entry_point`` of ``wide_env/WideMoE-v0`` and its presets:
``gym.make_vec("wide_env/WideMoE-v0", num_envs=B, vectorization_mode="vector_entry_point")``.
It drives the same :class:`~wide_env.sim.decode.DecodeSimulator` as the single env, so every number
(observation, reward, info) has the single env's meaning; only the packaging differs.
"""

from __future__ import annotations

import numbers
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from wide_env.config import WideConfig
from wide_env.envs.decode import ACCURACY_KEYS, INFO_KEYS, INT_INFO_KEYS, build_problem, observation_space_for
from wide_env.gating import make_gating_source
from wide_env.sim.decode import DecodeSimulator, DecodeState, LayerView

#: info keys a (re)set sub-env reports (the single env's ``reset`` info); also present after every step.
RESET_INFO_KEYS = ("layer", "token", "topk_energy_j", "deviation_budget")
#: the info keys of every step, in order (the single env's); sources with effect tables (the shipped
#: real-model trace) add ACCURACY_KEYS (see ``_BatchedDecode.info_keys``).
STEP_INFO_KEYS = INFO_KEYS + ("layer", "token")


def validate_actions(actions: Any, num_envs: int, n_experts: int) -> np.ndarray:
    """Turn a batch of actions into a (B, E) bool array, or raise ValueError saying what was expected."""
    arr = np.asarray(actions)
    expected = (num_envs, n_experts)
    if arr.shape != expected:
        hint = ""
        if arr.shape == (n_experts,):
            hint = "; this is one sub-env's action: stack one row per sub-env (for num_envs=1 pass action[None])"
        raise ValueError(f"actions have shape {arr.shape}; expected shape {expected}: one row of {n_experts} 0/1 "
                         f"entries per sub-env (MultiBinary({expected}), 1 = execute){hint}")
    if arr.dtype == np.bool_:
        return arr
    if arr.dtype == np.int8 or arr.dtype == np.uint8:  # MultiBinary's own dtype: 0/1 bytes are bools already
        if not (arr.view(np.uint8) > 1).any():
            return arr.view(np.bool_)
    elif not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"actions have dtype {arr.dtype}; expected shape {expected} of int8/bool/int/float 0 or 1")
    ok = (arr == 0) | (arr == 1)
    if not ok.all():
        where = tuple(int(i) for i in np.argwhere(~ok)[0])
        raise ValueError(f"action entries must be 0 or 1 (got {arr[where]!r} at index {where}); expected shape "
                         f"{expected} of 0/1")
    return arr.astype(bool)


class _BatchedDecode:
    """The batched stepping logic shared by the Gymnasium vector env and the SB3 adapter.

    Holds the simulator, the batched state, the current (lockstep) view, per-row episode step counts
    and the autoreset flags. All randomness comes from the generator passed in."""

    def __init__(self, num_envs: int, config: WideConfig, max_episode_steps: int | None):
        if isinstance(num_envs, bool) or not isinstance(num_envs, numbers.Integral) or num_envs < 1:
            raise ValueError(f"num_envs must be an integer >= 1, got {num_envs!r}")
        if max_episode_steps is not None and (isinstance(max_episode_steps, bool) or
                                              not isinstance(max_episode_steps, numbers.Integral) or
                                              max_episode_steps < 1):
            raise ValueError(f"max_episode_steps must be an integer >= 1 or None, got {max_episode_steps!r}")
        if config.gating.backend != "table":
            raise ValueError(f"config field 'gating.backend' is {config.gating.backend!r}: the live backend runs the "
                             f"model per episode and is single-env only; use 'table' (effect tables) here, or "
                             f"gym.make_vec(..., vectorization_mode='sync') for live sub-envs")
        self.num_envs = int(num_envs)
        self.config = config
        self.sim = DecodeSimulator(config, make_gating_source(config))
        self.has_accuracy = bool(self.sim.has_accuracy)
        #: every step's info keys, in the single env's order
        self.info_keys = STEP_INFO_KEYS + (ACCURACY_KEYS if self.has_accuracy else ())
        #: keys a step reports but a reset does not
        self.only_step_keys = tuple(k for k in self.info_keys if k not in RESET_INFO_KEYS)
        self._int_keys = tuple(k for k in self.info_keys if k in INT_INFO_KEYS)
        self._aliased_keys = tuple(k for k in self.info_keys if k in ("topk_energy_j", "deviation_budget"))
        self.max_episode_steps = None if max_episode_steps is None else int(max_episode_steps)
        self.state: DecodeState | None = None
        self.view: LayerView | None = None
        self.elapsed = np.zeros(self.num_envs, dtype=np.int64)
        self.pending = np.zeros(self.num_envs, dtype=bool)  # episode over at the previous step

    # ---- resets ----------------------------------------------------------------------------------
    def reset_all(self, rng: np.random.Generator) -> None:
        self.state = self.sim.reset(rng, self.num_envs)
        self.elapsed[:] = 0
        self.pending[:] = False
        self.view = self.sim.view(self.state)

    def reset_rows(self, rng: np.random.Generator, rows: np.ndarray) -> None:
        """Reset rows (index array); the whole batch goes through ``sim.reset`` (same draws, no copies)."""
        if rows.size == self.num_envs:
            self.state = self.sim.reset(rng, self.num_envs)
        else:
            self.sim.reset_rows(rng, self.state, rows)
        self.elapsed[rows] = 0
        self.pending[rows] = False
        self.view = self.sim.view(self.state)

    # ---- one step --------------------------------------------------------------------------------
    def evaluate_and_advance(self, rng: np.random.Generator, executed: np.ndarray):
        """Evaluate ``executed`` at every row's current layer and advance every row.
        Returns (outcomes, step layer, step token, truncated) with (B,) arrays; the view is stale after."""
        view = self.view
        out = self.sim.evaluate(view, executed)
        layer, token = view.layer, view.token  # lockstep views hold copies; sim.view aliases the state's
        if layer is self.state.layer or token is self.state.token:
            layer, token = layer.copy(), token.copy()
        if self.has_accuracy:  # the single env's order: evaluate, record accuracy, advance
            out.update(self.sim.record_accuracy(self.state, out["server"]))
        truncated = self.sim.advance(rng, self.state, out["weighted_deviation"]).copy()
        if self.max_episode_steps is not None:
            self.elapsed += 1
            truncated |= self.elapsed >= self.max_episode_steps
        return out, layer, token, truncated

    def refresh_view(self) -> None:
        self.view = self.sim.view(self.state)

    def observation_flat(self) -> np.ndarray:
        return self.sim.observation(self.view)

    def action_masks(self) -> np.ndarray:
        """(B, 2E) bool: sb3-contrib MultiBinary pairs [may be 0, may be 1] per expert."""
        if self.view is None:
            raise RuntimeError("call reset() before action_masks()")
        B, E = self.num_envs, self.sim.n_experts
        masks = np.ones((B, E, 2), dtype=bool)
        if self.sim.enforce_deadline:
            masks[:, :, 1] = self.view.meets_deadline
        return masks.reshape(B, 2 * E)

    def step_info(self, out: dict, layer: np.ndarray, token: np.ndarray) -> dict[str, np.ndarray]:
        """The single env's step info as (B,) arrays (int64 for counters, float64 otherwise; copies)."""
        out["layer"], out["token"] = layer, token
        info = {key: out[key] for key in self.info_keys}
        for key in self._int_keys:
            if info[key].dtype != np.int64:  # flags come out of the simulator as bool
                info[key] = info[key].astype(np.int64)
        for key in self._aliased_keys:  # may alias the token plan or the state: copy
            info[key] = np.array(info[key], dtype=np.float64)
        return info

    def reset_info(self) -> dict[str, np.ndarray]:
        """The single env's reset info for every row, read at the current view (copies)."""
        v = self.view
        return {"layer": np.array(v.layer, dtype=np.int64), "token": np.array(v.token, dtype=np.int64),
                "topk_energy_j": np.array(v.topk_energy, dtype=np.float64),
                "deviation_budget": np.array(v.budget, dtype=np.float64)}


class WideMoEVectorEnv(VectorEnv):
    """
    ## Description

    `num_envs` independent episodes of `wide_env/WideMoE-v0` (wireless distributed MoE decoding, one
    MoE layer of one token per step) advanced by one batched numpy call per `step`: there is no Python
    loop over sub-envs. Each sub-env has exactly the single env's dynamics, observation, reward and
    info (same simulator, see `WideMoEEnv`). All randomness comes from ONE generator, `np_random`,
    seeded by `reset(seed=...)`; with `num_envs=1` the trajectory equals `gym.make("wide_env/WideMoE-v0")`
    for the same seed and actions, including across resets.

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
    bool mask `info["_k"]` saying which sub-envs report it. Step keys are the single env's:
    `energy_j`, `topk_energy_j`, `energy_uplink_j`, `energy_comm_j`, `energy_system_j`, `deviation`,
    `weighted_deviation`, `deviation_budget`, `budget_violated`, `latency_s`, `deadline_misses`,
    `n_executed`, `n_lost`, `n_kept`, `n_replaced`, `n_skipped`, `reward_energy`, `reward_deviation`,
    `reward_deadline`, `layer`, `token` (int64 counters, float64 otherwise). `reset` reports `layer`,
    `token`, `topk_energy_j`, `deviation_budget`. Every step key is always present; in a step where
    some sub-envs were reset, those sub-envs report the reset keys (with reset values) and their masks
    are False for the other keys (values 0), exactly like `SyncVectorEnv` of the single env.

    ## Arguments

    `gym.make_vec("wide_env/WideMoE-v0", num_envs=B, vectorization_mode="vector_entry_point",
    config={...})`, or `WideMoEVectorEnv(num_envs=B, config=None, autoreset_mode=AutoresetMode.NEXT_STEP,
    max_episode_steps=None, preset=None)`; `config` is the single env's nested dict (or `WideConfig`).
    `render_mode` must be None (use `SyncVectorEnv` of the single env to render).
    """

    metadata = {"render_modes": [], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, num_envs: int = 1, config: WideConfig | dict | None = None, render_mode: str | None = None,
                 autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP, max_episode_steps: int | None = None,
                 preset: dict | None = None):
        if render_mode is not None:
            raise ValueError(f"render_mode={render_mode!r}: the native vector env does not render; use None, or "
                             f"gym.make_vec(..., vectorization_mode='sync', render_mode=...) to render sub-envs")
        try:
            mode = AutoresetMode(autoreset_mode)
        except ValueError:
            raise ValueError(f"autoreset_mode={autoreset_mode!r}; choose one of {[m for m in AutoresetMode]}") from None
        self._core = _BatchedDecode(num_envs, WideConfig.from_dict(config, preset=preset), max_episode_steps)
        self.num_envs = self._core.num_envs
        self.config = self._core.config
        self.sim = self._core.sim
        self.render_mode = None
        self.autoreset_mode = mode
        self.metadata = {**type(self).metadata, "autoreset_mode": mode}
        self.problem = build_problem(self.sim, self.config.flatten_observation)
        #: every step's info keys (the single env's, including ``accuracy_*`` with effect tables)
        self.info_keys = self._core.info_keys
        self.single_observation_space = observation_space_for(self.sim.layout, self.config.flatten_observation)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.single_action_space = spaces.MultiBinary(self.sim.n_experts)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._all_true = np.ones(self.num_envs, dtype=bool)
        self._all_true.flags.writeable = False
        self._all_true_masks = {"_" + key: self._all_true for key in self.info_keys}

    @property
    def max_episode_steps(self) -> int | None:
        return self._core.max_episode_steps

    # ---- Gymnasium API ---------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Reset every sub-env (or those in ``options["reset_mask"]``); returns (observations, info)."""
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise ValueError(f"seed must be an int or None (one generator drives the whole batch), got {seed!r}")
        super().reset(seed=seed)
        core = self._core
        mask = None if options is None else options.get("reset_mask")
        if mask is None:
            core.reset_all(self.np_random)
            mask = self._all_true
        else:
            mask = np.asarray(mask)
            if mask.shape != (self.num_envs,) or mask.dtype != np.bool_:
                raise ValueError(f"options['reset_mask'] has shape {mask.shape} and dtype {mask.dtype}; expected a "
                                 f"({self.num_envs},) bool array (True = reset that sub-env)")
            if core.state is None:
                if not mask.all():
                    raise ValueError("options['reset_mask'] must be all True at the first reset (no episode exists yet)")
                core.reset_all(self.np_random)
            elif mask.any():
                core.reset_rows(self.np_random, np.flatnonzero(mask))
        info = core.reset_info()
        for key in RESET_INFO_KEYS:
            info["_" + key] = mask
        return self._package(core.observation_flat()), info

    def step(self, actions):
        """Step every sub-env; returns (observations, rewards, terminations, truncations, info)."""
        core = self._core
        if core.state is None:
            raise RuntimeError("call reset() before step()")
        executed = validate_actions(actions, self.num_envs, self.sim.n_experts)
        mode = self.autoreset_mode
        rng = self.np_random
        pending = core.pending
        if mode == AutoresetMode.NEXT_STEP and pending.any():
            resets = pending.copy()
            if resets.all():  # lockstep batches end together: just a new episode everywhere
                core.reset_rows(rng, np.arange(self.num_envs))
                info = core.reset_info()
                for key in core.only_step_keys:
                    info[key] = np.zeros(self.num_envs, dtype=np.int64 if key in INT_INFO_KEYS else np.float64)
                masks = {key: (resets if key in RESET_INFO_KEYS else ~resets) for key in core.info_keys}
                return self._finish(core.observation_flat(), np.zeros(self.num_envs), np.zeros(self.num_envs, bool),
                                    info, masks)
            out, layer, token, truncated = core.evaluate_and_advance(rng, executed)
            rows = np.flatnonzero(resets)
            core.reset_rows(rng, rows)
            info = core.step_info(out, layer, token)
            fresh = core.reset_info()
            for key in RESET_INFO_KEYS:
                info[key][rows] = fresh[key][rows]
            for key in core.only_step_keys:
                info[key][rows] = 0
            keep = ~resets
            masks = {key: (self._all_true if key in RESET_INFO_KEYS else keep) for key in core.info_keys}
            reward = out["reward"].copy()
            reward[rows] = 0.0
            truncated[rows] = False
            core.pending = truncated.copy()
            return self._finish(core.observation_flat(), reward, truncated, info, masks)

        if mode == AutoresetMode.DISABLED and pending.any():
            raise RuntimeError(f"sub-envs {np.flatnonzero(pending).tolist()} are truncated and autoreset_mode is "
                               f"DISABLED; call reset(options={{'reset_mask': mask}}) before step()")
        out, layer, token, truncated = core.evaluate_and_advance(rng, executed)
        core.refresh_view()
        info = core.step_info(out, layer, token)
        masks = None  # every sub-env reports every key
        reward = out["reward"]
        if mode == AutoresetMode.SAME_STEP and truncated.any():
            rows = np.flatnonzero(truncated)
            final_flat = core.observation_flat()[rows]
            final_obs = np.full(self.num_envs, None, dtype=object)
            for j, row in enumerate(rows):
                final_obs[row] = self._package(final_flat[j])
            final_info = {}
            for key in core.info_keys:
                final_info[key] = np.where(truncated, info[key], 0).astype(info[key].dtype, copy=False)
                final_info["_" + key] = truncated
            core.reset_rows(rng, rows)
            fresh = core.reset_info()
            for key in RESET_INFO_KEYS:
                info[key] = np.where(truncated, fresh[key], info[key])
            for key in core.only_step_keys:
                info[key] = np.where(truncated, 0, info[key]).astype(info[key].dtype, copy=False)
            keep = ~truncated
            masks = {key: (self._all_true if key in RESET_INFO_KEYS else keep) for key in core.info_keys}
            info["final_obs"], info["_final_obs"] = final_obs, truncated.copy()
            info["final_info"], info["_final_info"] = final_info, truncated.copy()
            obs_flat = core.observation_flat()
            core.pending[:] = False
        else:
            obs_flat = core.observation_flat()
            core.pending = truncated.copy()
        return self._finish(obs_flat, reward, truncated, info, masks)

    def action_masks(self) -> np.ndarray:
        """sb3-contrib MultiBinary masks: (num_envs, 2E) bool, pairs [may be 0, may be 1] per expert;
        experts that cannot meet the deadline are masked to 0 while deadline enforcement is on."""
        return self._core.action_masks()

    def current_view(self) -> LayerView | None:
        """The simulator's batched view of the current layer (for analytic policies and tests)."""
        return self._core.view

    def render(self):
        gym.logger.warn("WideMoEVectorEnv does not render; use gym.make_vec(..., vectorization_mode='sync', "
                        "render_mode='ansi') to render sub-envs")
        return None

    def close_extras(self, **kwargs: Any) -> None:
        self._core.state = None
        self._core.view = None

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
