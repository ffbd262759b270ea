"""`wide_env/WideMoE-v0`: expert selection for wireless distributed MoE decoding, one MoE layer per step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from wide_env.config import WideConfig
from wide_env.gating import make_gating_source
from wide_env.sim.decode import DecodeSimulator
from wide_env.sim.observation import split_observation

INFO_KEYS = (
    "energy_j", "topk_energy_j", "energy_uplink_j", "energy_comm_j", "energy_system_j", "deviation",
    "weighted_deviation", "deviation_budget", "budget_violated", "latency_s", "deadline_misses", "n_executed",
    "n_lost", "n_kept", "n_replaced", "n_skipped", "reward_energy", "reward_deviation", "reward_deadline",
)
_INT_KEYS = {"deadline_misses", "n_executed", "n_lost", "n_kept", "n_replaced", "n_skipped", "budget_violated"}


@dataclass(frozen=True)
class DecodeProblem:
    """Static facts a policy may use (the same a learned agent could infer from the spaces)."""

    n_layers: int
    n_experts: int
    top_k: int
    n_nodes: int
    n_tokens: int
    deadline_s: float
    enforce_deadline: bool
    budget_mode: str
    flatten: bool
    obs_slices: dict


def validate_action(action: Any, n_experts: int) -> np.ndarray:
    """Turn an action into a (E,) bool mask, or raise ValueError saying what was expected."""
    arr = np.asarray(action)
    if arr.shape != (n_experts,):
        raise ValueError(f"action has shape {arr.shape}; expected shape ({n_experts},): one 0/1 entry per expert "
                         f"(MultiBinary({n_experts}), 1 = execute)")
    if arr.dtype == np.bool_:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"action has dtype {arr.dtype}; expected int8/bool/int/float entries equal to 0 or 1")
    if not np.all((arr == 0) | (arr == 1)):
        bad = arr[~((arr == 0) | (arr == 1))][0]
        raise ValueError(f"action entries must be 0 or 1 (got {bad!r}); expected shape ({n_experts},) of 0/1")
    return arr == 1


class WideMoEEnv(gym.Env):
    """
    ## Description

    Wireless distributed MoE inference (WIDE), decoding phase. The experts of an MoE language model live
    on wireless edge helpers around a user device. For every generated token and every MoE layer the
    router proposes its Top-K experts; the agent decides which experts are actually executed. Each
    executed remote expert costs one uplink/downlink round trip (radio energy, latency); a Top-K expert
    that is not executed is served by the best executed stand-in or skipped, which perturbs the layer
    output by the deviation bound of the SiftMoE paper (arXiv 2603.23888). One step = one MoE layer of
    one token; channels fade per token (fast fading) and gating follows the token.

    ## Action Space

    `MultiBinary(E)`: entry e = 1 executes expert e of the current layer, 0 leaves it out. A non-executed
    Top-K expert i is served by phi(i) = the executed j minimising D_l(i, j), or skipped when
    D_l(i, skip) is smaller. Executing a non-Top-K expert only makes sense as a stand-in.
    Wrong shapes, dtypes or values (2, -1, NaN) raise `ValueError`. `action_masks()` gives sb3-contrib's
    MultiBinary layout (2E booleans: [may be 0, may be 1] per expert); experts that cannot meet the
    deadline are masked to 0 while deadline enforcement is on.

    ## Observation Space

    `Dict` of 1-D float32 `Box`es (or one flat `Box`, keys concatenated in this order, with
    `config={"flatten_observation": True}`; slices in `env.unwrapped.problem.obs_slices`):

    | key | shape | range | meaning |
    |-----|-------|-------|---------|
    | `gate_probs` | E | [0, 1] | router probabilities of the layer |
    | `topk_mask` | E | {0, 1} | Top-K indicator |
    | `topk_weight` | E | [0, 1] | combine weight w_i of Top-K experts, 0 elsewhere |
    | `channel_gain_db` | N | [-250, 50] | G_n h_n of each helper, dB (fast fading, this token) |
    | `energy_cost` | E | [0, 1e4] | energy of executing expert e now / Top-K energy of this state |
    | `latency_ratio` | E | [0, 100] | expert latency T_e / T_max (> 1 misses the deadline) |
    | `deviation_table` | K(E+1) | [0, 1e3] | row k: w_k D_l(S_k, j) / budget unit, j = 0..E-1, last = skip |
    | `budget_remaining` | 1 | [0, 1e3] | budget left for this step / budget unit |
    | `position` | 2 | [0, 1] | layer / (L-1), token / (n_tokens-1) |

    Budget unit: eps_l (per-layer mode) or the token budget (per-token mode; deviations weighted by kappa_l).

    ## Rewards

    `r = -energy / E_topk - w_dev * [violated] * (1 + excess / unit) - w_deadline * misses`, where E_topk
    is the energy of executing the Top-K set on the same state, `excess` the deviation above the budget
    and `misses` the executed experts later than T_max (only while deadline enforcement is on). Every
    term is in `info` (`reward_energy`, `reward_deviation`, `reward_deadline`). Top-K scores about -1 per step.

    ## Starting State

    Helper distances uniform in area over a 10-150 m annulus, fresh Nakagami fading, a random window of
    the gating trace (or fresh synthetic tokens).

    ## Episode End

    Never terminates; truncated after `n_tokens * L` steps (configurable `n_tokens`).

    ## Info

    Every step: `energy_j`, `topk_energy_j`, `energy_uplink_j`, `energy_comm_j`, `energy_system_j`,
    `deviation` (Delta_l, model units), `weighted_deviation` (kappa_l Delta_l), `deviation_budget`,
    `budget_violated`, `latency_s`, `deadline_misses`, `n_executed`, `n_lost`, `n_kept`, `n_replaced`,
    `n_skipped`, `reward_energy`, `reward_deviation`, `reward_deadline`, `layer`, `token` (Python numbers).

    ## Arguments

    `gym.make("wide_env/WideMoE-v0", config={...}, render_mode=None)`; `config` is a nested dict (or
    `WideConfig`) over a profile: `profile` ("tiny" default, "switch-base-8", "mixtral-8x7b",
    "gpt-oss-20b"), `n_tokens`, `flatten_observation`, and sections `model`, `gating`, `placement`,
    `channel`, `radio`, `compute`, `deadline`, `budget`, `reward` (see README's configuration table).
    Provenance: L, E, K, d_model, B, T_max, eps per profile, alpha = 4, A = 1, m = 2, N0 = -174 dBm/Hz,
    P_h = 38 dBm, 16-bit payloads and one-to-one placement come from the SiftMoE paper; the annulus,
    p_max = 23 dBm, per-token i.i.d. fading, load/compute/queue times, energy scope, synthetic gating and
    the reward weights are our choices.

    ## Version History

    * v0: initial version.
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}

    def __init__(self, config: WideConfig | dict | None = None, render_mode: str | None = None, **overrides: Any):
        self.config = WideConfig.from_dict(config, **overrides)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode={render_mode!r} is not supported; choose one of {self.metadata['render_modes']} or None")
        self.render_mode = render_mode
        self.sim = DecodeSimulator(self.config, make_gating_source(self.config))
        sim = self.sim
        self._layout = sim.layout
        self.problem = DecodeProblem(
            n_layers=sim.n_layers, n_experts=sim.n_experts, top_k=sim.top_k, n_nodes=sim.n_nodes,
            n_tokens=sim.n_tokens, deadline_s=sim.deadline, enforce_deadline=sim.enforce_deadline,
            budget_mode=sim.budget_mode, flatten=self.config.flatten_observation,
            obs_slices=dict(sim.obs_slices))
        boxes = {key: spaces.Box(low, high, shape=(size,), dtype=np.float32) for key, (size, low, high) in self._layout.items()}
        if self.config.flatten_observation:
            self.observation_space = spaces.Box(
                np.concatenate([b.low for b in boxes.values()]), np.concatenate([b.high for b in boxes.values()]),
                dtype=np.float32)
        else:
            self.observation_space = spaces.Dict(boxes)
        self.action_space = spaces.MultiBinary(sim.n_experts)
        self._state = None
        self._view = None
        self._last: dict | None = None

    # ---- Gymnasium API ---------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._state = self.sim.reset(self.np_random, 1)
        self._view = self.sim.view(self._state, 0)
        self._last = None
        info = {"layer": 0, "token": 0, "topk_energy_j": float(self._view.topk_energy),
                "deviation_budget": float(self._view.budget)}
        return self._observation(), info

    def step(self, action):
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        if self._state.done[0]:
            raise RuntimeError("the episode is over (truncated); call reset() before step()")
        executed = validate_action(action, self.sim.n_experts)
        view = self._view
        out = self.sim.evaluate(view, executed)
        truncated = bool(self.sim.advance(self.np_random, self._state, out["weighted_deviation"])[0])
        info = {key: (int(out[key]) if key in _INT_KEYS else float(out[key])) for key in INFO_KEYS}
        info["layer"] = view.layer
        info["token"] = view.token
        self._last = {"view": view, "executed": executed, "info": info, "server": out["server"]}
        self._view = self.sim.view(self._state, 0)
        return self._observation(), float(out["reward"]), False, truncated, info

    def action_masks(self) -> np.ndarray:
        """sb3-contrib MultiBinary mask: (2E,) bool, pairs [may be 0, may be 1] per expert."""
        if self._view is None:
            raise RuntimeError("call reset() before action_masks()")
        may_execute = self._view.meets_deadline if self.sim.enforce_deadline else np.ones(self.sim.n_experts, bool)
        return np.stack([np.ones(self.sim.n_experts, dtype=bool), may_execute], axis=1).reshape(-1)

    def render(self):
        if self.render_mode is None:
            gym.logger.warn("render() called without a render_mode; pass render_mode='ansi' or 'rgb_array' to make()")
            return None
        from wide_env.envs import rendering

        if self.render_mode == "ansi":
            return rendering.render_text(self)
        return rendering.render_rgb(self)

    def close(self):
        from wide_env.envs import rendering

        rendering.close(self)

    # ---- helpers ---------------------------------------------------------------------------------
    def _observation(self):
        flat = self.sim.observation(self._view)
        if self.config.flatten_observation:
            return flat
        return split_observation(flat, self.sim.obs_slices)

    def current_view(self):
        """The simulator's view of the current layer (unbatched): for analytic policies and tests."""
        return self._view
