"""`wide_env/WideMoEPrefill-v0`: (token, expert) selection for wireless distributed MoE prefilling.

The env is a batch of one of the prefill simulator (:mod:`wide_env.sim.prefill`); the native vector envs
step B episodes with the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
import gymnasium as gym
import numpy as np
from gymnasium import spaces

from wide_env.config import WideConfig
from wide_env.envs.actions import validate_action
from wide_env.envs.batch import EpisodeBatch, EpisodeBatchHandle
from wide_env.envs.decode import observation_space_for
from wide_env.gating import make_gating_source
from wide_env.sim.prefill import PrefillSimulator
from wide_env.sim.prefill.step import FIELDS

#: the step info keys (Python numbers), besides ``layer`` and ``prompt``
INFO_KEYS = tuple(k for k in FIELDS.floats[1:] + FIELDS.ints if k not in ("layer", "prompt"))


@dataclass(frozen=True)
class PrefillProblem:
    """Static facts a policy may use (the same a learned agent could infer from the spaces)."""

    n_layers: int
    n_experts: int
    top_k: int
    n_nodes: int
    prompt_tokens: int
    n_prompts: int
    deadline_s: float
    enforce_deadline: bool
    budget_mode: str
    flatten: bool
    one_to_one: bool
    obs_slices: dict


def build_prefill_problem(sim: PrefillSimulator, flatten: bool) -> PrefillProblem:
    return PrefillProblem(
        n_layers=sim.n_layers, n_experts=sim.n_experts, top_k=sim.top_k, n_nodes=sim.n_nodes,
        prompt_tokens=sim.T, n_prompts=sim.n_prompts, deadline_s=sim.deadline, enforce_deadline=sim.enforce_deadline,
        budget_mode=sim.budget_mode, flatten=flatten, one_to_one=sim.one_to_one, obs_slices=dict(sim.obs_slices))


def prefill_entries(prompt_tokens: int, n_experts: int) -> str:
    """What one prefill action's entries mean (for the validator's messages)."""
    T, E = prompt_tokens, n_experts
    return (f"one 0/1 entry per (token, expert) pair, token-major (MultiBinary({T * E}), entry t*{E}+e = execute "
            f"expert e for token t)")


class WideMoEPrefillEnv(EpisodeBatchHandle, gym.Env):
    """
    ## Description

    Wireless distributed MoE inference (WIDE), prefilling phase. The experts of an MoE language model live
    on wireless edge helpers around a user device. A prompt of T tokens is processed one MoE layer at a
    time: for every token the router proposes its Top-K experts, and the agent decides which (token,
    expert) pairs are executed. The hidden states of all tokens routed to one helper travel in one uplink
    (u_n D bits, u_n = distinct tokens sent to helper n) within the layer deadline T_max, so the
    uplink energy tau (N0 B / g)(2^(u_n D / (B tau)) - 1) is convex in the helper's load [paper]. A Top-K
    pair that is not executed is served by the token's best executed stand-in or skipped; each token's
    deviation estimate Delta_t (SiftMoE, arXiv 2603.23888) must stay within its budget. One step = one layer.

    ## Action Space

    `MultiBinary(T*E)`, token-major: entry t*E + e = 1 executes expert e for token t. A (T, E) array is
    accepted too. Wrong shapes, dtypes or values (2, -1, NaN) raise `ValueError`. `action_masks()` gives
    sb3-contrib's MultiBinary layout (2*T*E booleans: [may be 0, may be 1] per pair); pairs whose expert
    misses the deadline even with a single token are masked to 0 while deadline enforcement is on (a
    per-pair mask cannot express load limits: heavier loads may still miss, see `load_latency_ratio`).

    ## Observation Space

    `Dict` of 1-D float32 `Box`es (or one flat `Box`, keys concatenated in this order, with
    `config={"flatten_observation": True}`; slices in `env.unwrapped.problem.obs_slices`):

    | key | shape | range | meaning |
    |-----|-------|-------|---------|
    | `gate_probs` | T*E | [0, 1] | router probabilities, token-major |
    | `topk_mask` | T*E | {0, 1} | Top-K indicator per token |
    | `topk_weight` | T*E | [0, 1] | combine weight w_{t,i} of Top-K experts, 0 elsewhere |
    | `channel_gain_db` | N | [-250, 50] | G_n h_n of each helper, dB |
    | `load_energy_cost` | E*T | [0, 1e4] | entry e*T + n-1: energy of expert e run on n tokens / Top-K energy |
    | `load_latency_ratio` | E*T | [0, 100] | entry e*T + n-1: its latency / T_max (> 1 misses the deadline) |
    | `deviation_table` | T*K*(E+1) | [0, 1e3] | token t, slot k: w D_l(S_k, j) / budget unit; last column = skip |
    | `budget_remaining` | T | [0, 1e3] | each token's budget for this step / budget unit |
    | `position` | 2 | [0, 1] | layer / (L-1), prompt / (n_prompts-1) |

    Load tables are for an expert alone on its helper: exact with the paper's one-to-one placement
    (`problem.one_to_one`); with shared helpers the env charges the helper's aggregated load.

    ## Rewards

    `r = -energy / E_topk - w_dev * mean_t([violated_t] (1 + excess_t / unit)) - w_deadline * misses`:
    E_topk = energy of executing every Top-K pair, `excess_t` = token t's deviation above its budget,
    `misses` = helpers used that are later than T_max (only while enforcement is on; their pairs are lost).
    Top-K scores about -1 per step. Every term is in `info`.

    ## Starting State

    Helper distances uniform in area over a 10-150 m annulus, fresh Nakagami fading, the first prompt
    (a window of T consecutive trace tokens, or fresh synthetic tokens).

    ## Episode End

    Never terminates; truncated after `n_prompts * L` steps. Fading (and mobility) advance once per
    prompt, and per layer too with `channel.fading_per_layer`.

    ## Info

    `energy_j`, `topk_energy_j`, `energy_uplink_j`, `energy_comm_j`, `energy_system_j` (all three scopes),
    `deviation` (max over tokens of the estimate Delta_t, model units: the binding per-token constraint),
    `deviation_mean` (mean over tokens), `weighted_deviation` (max of kappa_l Delta_t), `deviation_budget`
    (the smallest budget of any token), `budget_violated` (number of tokens over budget), `latency_s`
    (slowest helper used), `deadline_misses` (late helpers), `n_executed`, `n_lost` ((token, expert) pairs),
    `n_kept`, `n_replaced`, `n_skipped` (Top-K slots summed over tokens), `n_helpers_used`,
    `reward_energy`, `reward_deviation`, `reward_deadline`, `layer`, `prompt` (Python numbers).

    ## Arguments

    `gym.make("wide_env/WideMoEPrefill-v0", config={...}, prompt_tokens=8, n_prompts=1, render_mode=None)`;
    `config` is the same nested dict (or `WideConfig`) as WideMoE-v0's (`n_tokens` is not used here).
    Helpers run their experts sequentially (k t_load + k t_comp, t_comp per batch: memory bound) [choice].

    ## Batched core

    `env.unwrapped.episode_batch` (a `wide_env.envs.batch.EpisodeBatch`) is the batched core the env drives:
    its `sim` (the phase's simulator, `wide_env.sim.protocol.Simulator`) and `state` (the episodes) are for
    policies that need the simulator (the oracle, span statistics); read them, do not step them.

    ## Version History

    * v0: initial version.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, config: WideConfig | dict | None = None, render_mode: str | None = None,
                 prompt_tokens: int = 8, n_prompts: int = 1, preset: dict | None = None):
        self.config = WideConfig.from_dict(config, preset=preset)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode={render_mode!r} is not supported; choose one of {self.metadata['render_modes']} or None")
        self.render_mode = render_mode
        self.sim = PrefillSimulator(self.config, make_gating_source(self.config), prompt_tokens, n_prompts)
        sim = self.sim
        self.problem = build_prefill_problem(sim, self.config.flatten_observation)
        self.observation_space = observation_space_for(sim.layout, self.config.flatten_observation)
        self.action_space = spaces.MultiBinary(sim.T * sim.n_experts)
        self._action_entries = prefill_entries(sim.T, sim.n_experts)
        self._batch = EpisodeBatch(sim, 1)
        self._last: dict | None = None


    @property
    def _state(self):
        return self._batch.state

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._batch.reset_all(self.np_random)
        self._last = None
        info = {key: value[0].item() for key, value in self._batch.reset_info().items()}
        return self._observation(), info

    def step(self, action):
        batch = self._batch
        if batch.state is None:
            raise RuntimeError("call reset() before step()")
        if batch.state.done[0]:
            raise RuntimeError("the episode is over (truncated); call reset() before step()")
        T, E = self.sim.T, self.sim.n_experts
        executed = validate_action(action, (T * E,), self._action_entries, alternative=(T, E)).reshape(1, T, E)
        view = self.current_view()
        outcome, truncated = batch.step(self.np_random, executed)
        reward, info = batch.step_result_one(outcome)
        self._last = {"view": view, "executed": executed[0], "info": info}
        return self._observation(), reward, False, bool(truncated[0]), info

    def action_masks(self) -> np.ndarray:
        """sb3-contrib MultiBinary mask: (2*T*E,) bool, pairs [may be 0, may be 1] per (token, expert)."""
        return self._batch.action_masks()[0]

    def render(self):
        if self.render_mode is None:
            gym.logger.warn("render() called without a render_mode; pass render_mode='ansi' to make()")
            return None
        view = self._last["view"] if self._last else self.current_view()
        executed = self._last["executed"] if self._last else np.zeros((self.sim.T, self.sim.n_experts), bool)
        lines = [f"prompt {int(view.prompt[0])} layer {int(view.layer[0])}" + ("" if self._last else " (before acting)"),
                 "token  " + " ".join(f"{e:>2}" for e in range(self.sim.n_experts))]
        for t in range(self.sim.T):
            topk = set(view.topk_idx[0, t].tolist())
            cells = [("X" if executed[t, e] else ("*" if e in topk else ".")) for e in range(self.sim.n_experts)]
            lines.append(f"{t:>5}  " + " ".join(f"{c:>2}" for c in cells))
        if self._last:
            i = self._last["info"]
            lines.append(f"energy {i['energy_j']:.3e} J (Top-K {i['topk_energy_j']:.3e} J), max deviation "
                         f"{i['deviation']:.4g}, tokens over budget {i['budget_violated']}, helpers {i['n_helpers_used']}")
        return "\n".join(lines) + "\n"

    def _observation(self):
        flat = self._batch.obs[0]
        if self.config.flatten_observation:
            return flat
        return {key: flat[sl] for key, sl in self.sim.obs_slices.items()}

    def current_view(self):
        """The simulator's view of the current layer (batch of 1): for analytic policies and tests."""
        if self._batch.state is None:
            raise RuntimeError("call reset() first")
        return self.sim.view(self._batch.state)
