"""`wide_env/WideMoE-v0`: expert selection for wireless distributed MoE decoding, one MoE layer per step.

The env is a batch of one of the decoding simulator (:mod:`wide_env.sim.decode`): the vector envs
(:mod:`wide_env.envs.vector`, :mod:`wide_env.integrations.sb3_vec`) step B episodes with the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
import gymnasium as gym
import numpy as np
from gymnasium import spaces

from wide_env.config import WideConfig
from wide_env.envs.actions import validate_action
from wide_env.envs.batch import EpisodeBatch, EpisodeBatchHandle
from wide_env.envs.observation_rows import ObservationRows
from wide_env.gating import make_gating_source
from wide_env.sim.decode import DecodeSimulator

#: extra info keys when the gating source has effect tables (the shipped real model's trace)
ACCURACY_KEYS = DecodeSimulator.ACCURACY_KEYS

#: the step info keys of every decoding source besides ``layer`` and ``token``: the step outcome's fields
#: (wide_env.sim.decode.kernel.FLOAT_FIELDS / INT_FIELDS) but the reward and the accuracy keys
INFO_KEYS = tuple(k for k in DecodeSimulator.outcome_fields.floats[1:] + DecodeSimulator.outcome_fields.ints
                  if k not in ACCURACY_KEYS + ("layer", "token"))

#: info keys holding counts or flags (Python ints in the single env's info, int64 in the vector env's)
INT_INFO_KEYS = frozenset(DecodeSimulator.outcome_fields.ints)


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
    #: where the real-accuracy figures come from (wide_env.envs.accuracy_source.ACCURACY_SOURCES): "live" (the live
    #: backend), "model" (the checkpoint decodes each token with the executed experts), "rule" (the trace's
    #: accuracy rule, wide_env.gating.effects, validated against the live model), "rule_unvalidated" (the same
    #: rule where it is not validated) or "none" (a source without accuracy)
    accuracy_source: str = "none"


def build_problem(sim: DecodeSimulator, flatten: bool, accuracy_source: str) -> DecodeProblem:
    """The static facts of a decoding simulator that policies may use; ``accuracy_source`` as its episode batch
    resolved it (:attr:`wide_env.envs.batch.EpisodeBatch.accuracy_source`)."""
    return DecodeProblem(
        n_layers=sim.n_layers, n_experts=sim.n_experts, top_k=sim.top_k, n_nodes=sim.n_nodes, n_tokens=sim.n_tokens,
        deadline_s=sim.deadline, enforce_deadline=sim.enforce_deadline, budget_mode=sim.budget_mode, flatten=flatten,
        obs_slices=dict(sim.obs_slices),
        accuracy_source=accuracy_source)


def observation_space_for(layout, flatten: bool) -> spaces.Space:
    """A Dict of 1-D float32 Boxes (one per layout key), or one flat Box in layout order."""
    boxes = {key: spaces.Box(low, high, shape=(size,), dtype=np.float32) for key, (size, low, high) in layout.items()}
    if flatten:
        return spaces.Box(np.concatenate([b.low for b in boxes.values()]),
                          np.concatenate([b.high for b in boxes.values()]), dtype=np.float32)
    return spaces.Dict(boxes)


class WideMoEEnv(EpisodeBatchHandle, gym.Env):
    """
    ## Description

    Wireless distributed MoE inference (WIDE), decoding phase. The experts of an MoE language model live
    on wireless edge helpers around a user device. For every generated token and every MoE layer the
    router proposes its Top-K experts; the agent decides which experts are actually executed. Each
    executed remote expert costs one uplink/downlink round trip (radio energy, latency); a Top-K expert
    that is not executed is served by the best executed stand-in or skipped, which perturbs the layer
    output by an estimated deviation (the SiftMoE paper's triangle-inequality rule on calibration-mean
    mismatch tables, arXiv 2603.23888: an estimate, not a per-token bound). One step = one MoE layer of
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

    With `gating.model_state = true` (and `gating.accuracy = "model"`) four keys follow, from the episode's own
    decoding stream: `router_entropy` (1, [0, 1]: the live router's entropy at the current layer / log E),
    `router_margin` (1, [0, 1]: its top-1 minus top-2 probability), `logit_lens_confidence` (1, [0, 1]: max softmax
    probability of the LM head on the residual stream so far), `previous_loss` (1, [0, 100]: the previous token's
    loss, nats; 0 at the first token).

    Budget unit: eps_l (per-layer mode) or the token budget (per-token mode; deviations weighted by kappa_l).

    ## Rewards

    `r = -energy / E_topk - w_dev * [violated] * (1 + excess / unit) - w_deadline * misses`, where E_topk
    is the energy of executing the Top-K set on the same state, `excess` the deviation above the budget
    and `misses` the executed experts later than T_max (only while deadline enforcement is on). Every
    term is in `info` (`reward_energy`, `reward_deviation`, `reward_deadline`). Top-K scores about -1 per step.

    ## Starting State

    Helper distances uniform in area over a 10-150 m annulus, fresh Nakagami fading, a random window of
    `n_tokens` consecutive tokens of the gating trace inside one document (default: 16,384 held-out
    tokens of Shakespeare recorded from the project's own 4-layer, 8-expert, top-2 byte-level MoE), or
    fresh synthetic tokens.

    ## Episode End

    Never terminates; truncated after `n_tokens * L` steps (configurable `n_tokens`).

    ## Info

    Every step: `energy_j`, `topk_energy_j`, `energy_uplink_j`, `energy_comm_j`, `energy_system_j`,
    `deviation` (the estimate Delta_l, model units), `weighted_deviation` (kappa_l Delta_l), `deviation_budget`,
    `budget_violated`, `latency_s`, `deadline_misses`, `n_executed`, `n_lost`, `n_kept`, `n_replaced`,
    `n_skipped`, `reward_energy`, `reward_deviation`, `reward_deadline`, `cost`, `cost_budget`, `cost_deadline`
    (Safety-Gymnasium-style constraint costs: the budget's excess in budget units, the enforced deadline misses,
    their sum; docs/model.md#shield), `layer`, `token` (Python numbers).
    With a gating trace that has logit-effect tables (every shipped model) also: `accuracy_correct` (the
    token's next-byte prediction is correct under the executed experts), `accuracy_same` (it equals the
    full Top-K model's), `accuracy_full` (the full model is correct), `delta_loss` (the token's loss change,
    nats), `reward_accuracy` and `token_complete` (1 at a token's last layer, where the values are final;
    before that they are the rule's running estimate, or with accuracy measured on the model ("model", "live")
    placeholders: correct, same, full 1, loss 0). Where the final values come from is
    `env.unwrapped.problem.accuracy_source` (`gating.accuracy`, docs/model.md#accuracy-sources): "rule" (the
    accuracy rule of `wide_env.gating.effects`, validated against the live model on profile tiny) or "model"
    (the default on the other shipped models: the checkpoint decodes each token with the experts that
    executed, torch; docs/model.md#model-accuracy). With `config={"gating": {"backend": "live"}}` the shipped
    checkpoint also supplies the observed gating (live router outputs), and `measured_deviation` is the real
    layer-output deviation next to the estimate.

    ## Arguments

    `gym.make("wide_env/WideMoE-v0", config={...}, render_mode=None)`; `config` is a nested dict (or
    `WideConfig`) over a profile: `profile` ("tiny" default: the shipped real trace; "switch-base-8",
    "mixtral-8x7b", "gpt-oss-20b": the paper's payload, bandwidth and deadline with shipped models of the
    paper models' routing; `gating.source = "synthetic"` for the paper's sizes), `n_tokens`, `flatten_observation`, and sections `model`, `gating`, `placement`,
    `channel`, `radio`, `compute`, `deadline`, `budget`, `reward` (every field: docs/model.md#config-reference).
    Provenance: L, E, K, d_model, B, T_max, eps per profile, alpha = 4, A = 1, m = 2, N0 = -174 dBm/Hz,
    P_h = 38 dBm, 16-bit payloads and one-to-one placement come from the SiftMoE paper; the annulus,
    p_max = 23 dBm, per-token i.i.d. fading, load/compute/queue times, energy scope, synthetic gating and
    the reward weights are our choices. Deviation budgets of the default trace are in the model's own
    units: eps_l = the median weighted deviation of skipping a token's 2nd expert on calibration text.

    ## Batched core

    `env.unwrapped.episode_batch` (a `wide_env.envs.batch.EpisodeBatch`) is the batched core the env drives:
    its `sim` (the phase's simulator, `wide_env.sim.protocol.Simulator`) and `state` (the episodes) are for
    policies that need the simulator (the oracle, span statistics); read them, do not step them.

    ## Version History

    * v0: initial version (accuracy rule, model accuracy, uncertain queues, slotted p_max, episode budgets and
      the accuracy objective were added within v0 before any release).
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}

    def __init__(self, config: WideConfig | dict | None = None, render_mode: str | None = None,
                 preset: dict | None = None):
        self.config = WideConfig.from_dict(config, preset=preset)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode={render_mode!r} is not supported; choose one of {self.metadata['render_modes']} or None")
        self.render_mode = render_mode
        self.sim = DecodeSimulator(self.config, make_gating_source(self.config))
        sim = self.sim
        self._action_shape = (sim.n_experts,)
        self._action_entries = f"one 0/1 entry per expert (MultiBinary({sim.n_experts}), 1 = execute)"
        self._batch = EpisodeBatch(sim, 1)
        self.problem = build_problem(sim, self.config.flatten_observation, self._batch.accuracy_source)
        self.observation_space = observation_space_for(sim.layout, self.config.flatten_observation)
        self.action_space = spaces.MultiBinary(sim.n_experts)
        self._rows = ObservationRows(sim.obs_size, sim.obs_slices, self.config.flatten_observation)
        self._last: dict | None = None


    @property
    def _state(self):
        return self._batch.state

    # ---- Gymnasium API ---------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        batch = self._batch
        batch.reset_all(self.np_random)
        self._last = None
        return self._observation(), self.sim.reset_info_one(batch.state)

    def step(self, action):
        batch = self._batch
        state = batch.state
        if state is None:
            raise RuntimeError("call reset() before step()")
        if state.flags[0, 0]:  # done
            raise RuntimeError("the episode is over (truncated); call reset() before step()")
        executed = validate_action(action, self._action_shape, self._action_entries)
        if self.render_mode is not None:
            self._last = {"view": self.current_view(), "executed": executed[0].tolist()}
        row, observation = self._rows.take()  # a fresh row: earlier observations stay as they were
        reward, truncated, info = batch.step_one(self._np_random, executed, row)  # reset() made the generator
        if self._last is not None:
            self._last["info"] = info
        return observation, reward, False, truncated, info

    def action_masks(self) -> np.ndarray:
        """sb3-contrib MultiBinary mask: (2E,) bool, pairs [may be 0, may be 1] per expert."""
        return self._batch.action_masks()[0]

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
        flat = self._batch.obs[0]
        if self.config.flatten_observation:
            return flat
        # views into this step's fresh array: nothing is shared with earlier or later observations
        return self._rows.split(flat)

    @property
    def trace_start(self) -> int:
        """The trace position of the episode's token 0 (token t is position ``trace_start + t``; a synthetic
        source numbers its tokens the same way)."""
        if self._batch.state is None:
            raise RuntimeError("call reset() first")
        return int(self._batch.state.start[0])

    def current_view(self):
        """The simulator's view of the current layer (unbatched): for analytic policies and tests."""
        if self._batch.state is None:
            raise RuntimeError("call reset() first")
        return self.sim.view(self._batch.state, 0)
