"""The sections of a WIDE configuration, one frozen dataclass each, with their fields' ranges and checks
(docs/model.md#config-reference)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from wide_env.config.checks import _check_choice, _check_flag, _check_ranges, _fail, _range
from wide_env.gating.base import LAYER_BUDGET_RANGE, LAYER_BUDGET_REASON


# Reasons shared by several fields.
_SECONDS = "per-layer times beyond a minute are not edge inference [choice]"
_POWER_W = "an 8-GPU server draws about 10 kW [std]"
_MODEL_UNITS = "hidden-state norms of real models are O(1)-O(1e3) in the model's own units [choice]"
_DISTANCE = ("the path gain A d^-alpha holds in the far field, beyond its 1 m reference distance, and an edge "
             "cell is smaller than 10 km [std]")
_SPEED = "0-100 m/s spans standing users to high-speed trains [std]"
_WEIGHT = "the energy term is about -1 per step; larger weights drown it beyond float32 precision [choice]"


@dataclass(frozen=True)
class ModelConfig:
    """The MoE model whose experts are distributed. With a trace gating source these come from the trace
    (values given here must agree with it)."""

    n_layers: int = _range(4, 1, 128, "MoE language models have at most about 100 MoE layers (Qwen3-235B: 94); "
                           "more only costs memory and time [choice]", integer=True)
    n_experts: int = _range(8, 1, 512, "the largest routers have 384-512 experts per layer (Kimi K2, Qwen3-Next); "
                            "the env's tables grow as E^2 [choice]", integer=True)
    top_k: int = _range(2, 1, 32, "routers pick 1-10 experts per token; deviation tables grow as K (E + 1) [choice]",
                        integer=True)
    d_model: int = _range(64, 1, 65536, "hidden sizes of released LLMs are at most 16384; it sets the payload "
                          "d_model x bits_per_element of one expert call [choice]", integer=True)
    #: "softmax_topk_renorm" (Mixtral: Top-K weights renormalised) or "softmax_topk_raw" (Switch).
    routing: str = "softmax_topk_renorm"

    def validate(self, path: str = "model") -> None:
        _check_ranges(self, path)
        if self.top_k > self.n_experts:
            _fail(f"{path}.top_k", self.top_k, f"top_k (K) must be <= n_experts (E = {self.n_experts})")
        _check_choice(f"{path}.routing", self.routing,
                      ("softmax_topk_renorm", "softmax_topk_raw", "sigmoid_topk_renorm"))


@dataclass(frozen=True)
class GatingConfig:
    """Where gating scores and mismatch tables come from."""

    #: "synthetic" (any L, E, K) or "trace" (a recorded .npz, see docs/trace-schema.md).
    source: str = "synthetic"
    #: path of the trace (.npz) when source == "trace"; None = the profile's shipped trace (wide_env/data/...).
    trace_path: str | None = None
    #: "table": the trace's gating (accuracy per gating.accuracy); "live": run the shipped checkpoint
    #: (torch) token by token with the executed experts, so later layers' gates and the next-token outcome
    #: are real (needs the trace the checkpoint exported; single and vector envs).
    backend: str = "table"
    #: where info's real-accuracy figures come from (docs/model.md#accuracy-sources): "rule" (the trace's
    #: logit-effect rule, numpy), "model" (the checkpoint decodes every token with the experts that executed in
    #: time: what the live model gives for them; torch; the observations keep the trace's gating) or "auto"
    #: (the rule where it is validated against the live model, profile tiny's shipped trace; elsewhere the
    #: model when torch is installed). The live backend measures accuracy itself.
    accuracy: str = "auto"
    #: add the model-state observation keys (docs/model.md#model-state-observations): the router's entropy and
    #: margin and the logit-lens confidence at the current layer of the episode's decoding stream, and the previous
    #: token's loss; needs gating.accuracy = "model" (the stream that measures accuracy supplies them).
    model_state: bool = False
    #: directory of the checkpoint the live backend and the model accuracy run (moe_lm.safetensors +
    #: moe_lm.json); None = the profile's shipped model.
    checkpoint_dir: str | None = None
    #: synthetic: typical norm of one expert's output, i.e. D(i, skip) [choice; sets the deviation scale].
    output_norm: float = _range(1.0, 1e-6, 1e6, _MODEL_UNITS)
    #: synthetic: per-layer deviation budget eps_l in the same units as output_norm [paper value per profile].
    synthetic_budget: float = _range(0.5, 1e-6, 1e6, _MODEL_UNITS)
    #: synthetic: seed of the fixed model tables (router weights, mismatch), independent of episode seeds.
    model_seed: int = _range(0, 0, 2**63 - 1, "numpy seeds are non-negative 64-bit integers", integer=True)
    #: synthetic: router logit scale in the first and last layer (peaky early, flatter late) [choice].
    logit_scale_first: float = _range(2.0, 0.0, 100.0, "router logits scaled beyond 100 give one-hot gates already "
                                      "[choice]")
    logit_scale_last: float = _range(0.8, 0.0, 100.0, "router logits scaled beyond 100 give one-hot gates already "
                                     "[choice]")
    #: synthetic: cosine similarity shared by experts' outputs in the first and last layer [choice].
    expert_similarity_first: float = _range(0.2, -1.0, 1.0, "a cosine similarity")
    expert_similarity_last: float = _range(0.7, -1.0, 1.0, "a cosine similarity")

    def validate(self, path: str = "gating") -> None:
        _check_choice(f"{path}.source", self.source, ("synthetic", "trace"))
        _check_choice(f"{path}.backend", self.backend, ("table", "live"))
        _check_choice(f"{path}.accuracy", self.accuracy, ("auto", "rule", "model"))
        if self.accuracy == "model" and self.source != "trace":
            _fail(f"{path}.accuracy", self.accuracy, "the model decodes a trace's text: set gating.source = 'trace' "
                  "(or gating.accuracy = 'auto')")
        _check_flag(f"{path}.model_state", self.model_state)
        if self.model_state and (self.accuracy != "model" or self.backend != "table"):
            _fail(f"{path}.model_state", self.model_state,
                  "the model-state keys come from the model that measures accuracy: set gating.accuracy = 'model' "
                  "(with gating.backend = 'table'), or drop gating.model_state")
        if self.backend == "live" and self.source != "trace":
            _fail(f"{path}.backend", self.backend, "the live backend replays a trace's text: set gating.source = 'trace'")
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, str):
            _fail(f"{path}.checkpoint_dir", self.checkpoint_dir, "expected a directory path string or None")
        if self.trace_path is not None and not isinstance(self.trace_path, str):
            _fail(f"{path}.trace_path", self.trace_path, "expected a file path string or None")
        if self.trace_path is not None and self.source != "trace":
            _fail(f"{path}.trace_path", self.trace_path,
                  f"a trace is only read with gating.source = 'trace', but gating.source = {self.source!r}; "
                  "set gating.source to 'trace' or drop gating.trace_path")
        _check_ranges(self, path)


@dataclass(frozen=True)
class PlacementConfig:
    """Which node hosts which expert, and where the helpers are."""

    #: "one_to_one" [paper]: helper e hosts expert e of every layer (N = E, no local experts).
    #: Or an explicit host map: a list of L lists of E node indices (0 = the user device, 1..N helpers).
    hosts: Any = "one_to_one"
    #: number of helpers N; None = E for one_to_one, max(host map) otherwise.
    n_helpers: int | None = _range(None, 1, 1024, "helpers within radio range of one device; the observation "
                                   "has one entry per helper [choice]", integer=True)
    #: helper distances uniform in area over an annulus [r_min, r_max] per episode [choice; paper: GPS traces].
    r_min_m: float = _range(10.0, 1.0, 1.0e4, _DISTANCE)
    r_max_m: float = _range(150.0, 1.0, 1.0e4, _DISTANCE)
    #: pedestrian random-waypoint mobility of helpers, advanced by the token interval [choice].
    mobility: bool = False
    speed_min_mps: float = _range(0.5, 0.0, 100.0, _SPEED)
    speed_max_mps: float = _range(1.5, 0.0, 100.0, _SPEED)

    def validate(self, model: ModelConfig, path: str = "placement") -> None:
        if isinstance(self.hosts, str):
            _check_choice(f"{path}.hosts", self.hosts, ("one_to_one",))
        else:
            try:
                rows = [list(r) for r in self.hosts]
            except TypeError:
                _fail(f"{path}.hosts", self.hosts, "expected 'one_to_one' or L lists of E node indices")
            if len(rows) != model.n_layers or any(len(r) != model.n_experts for r in rows):
                _fail(f"{path}.hosts", self.hosts,
                      f"expected {model.n_layers} lists (layers) of {model.n_experts} node indices (experts)")
            for r in rows:
                for v in r:
                    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 0:
                        _fail(f"{path}.hosts", self.hosts, "node indices must be integers >= 0 (0 = user device)")
            if any(isinstance(v, np.integer) for r in rows for v in r):  # numpy ints are integers: store them plain
                object.__setattr__(self, "hosts", tuple(tuple(int(v) for v in r) for r in rows))
        _check_ranges(self, path)
        if self.n_helpers is not None:
            if not isinstance(self.hosts, str) and max(max(r) for r in self.hosts) > self.n_helpers:
                _fail(f"{path}.n_helpers", self.n_helpers, "the host map uses a helper index above n_helpers")
        elif not isinstance(self.hosts, str) and max(max(r) for r in self.hosts) > 1024:
            _fail(f"{path}.hosts", self.hosts, "node indices must be <= 1024 (the range of placement.n_helpers)")
        if self.r_max_m < self.r_min_m:
            _fail(f"{path}.r_max_m", self.r_max_m, f"must be >= r_min_m ({self.r_min_m})")
        _check_flag(f"{path}.mobility", self.mobility)
        if self.speed_max_mps < self.speed_min_mps:
            _fail(f"{path}.speed_max_mps", self.speed_max_mps, "must be >= speed_min_mps")


@dataclass(frozen=True)
class ChannelConfig:
    """Large-scale path loss and Nakagami-m fading with AR(1) time correlation."""

    #: small-scale fading model by name (wide_env.sim.channel.FADING_MODELS): "nakagami" [paper] or "none"
    fading: str = "nakagami"
    #: large-scale path loss by name (wide_env.sim.pathloss.PATH_LOSS_MODELS): "power_law" [paper] or
    #: "3gpp_umi" [std: TR 38.901 UMi street canyon]; None = the one radio.link_budget implies
    path_loss: str | None = None
    path_loss_exponent: float = _range(4.0, 1.5, 8.0, "measured path-loss exponents run from 1.6 (indoor line of "
                                       "sight) to about 6 (obstructed, in buildings) [std]")  # alpha [paper]
    #: A = 1 (0 dB) [paper]; set e.g. -30 for a 1 m reference loss [choice]
    reference_gain_db: float = _range(0.0, -100.0, 30.0, "the path gain at 1 m: free space gives -12 dB at 100 MHz "
                                      "and -68 dB at 60 GHz, antenna gains add at most a few tens of dB [std]")
    nakagami_m: float = _range(2.0, 0.5, 64.0, "Nakagami fading is defined for m >= 0.5 (m = 1 is Rayleigh); "
                               "beyond m = 64 there is practically no fading [std]")  # [paper]
    #: AR(1) correlation of the complex fading components between successive tokens; 0 = i.i.d. per token
    #: (fast fading, default [choice]), 1 = static over the episode (slow fading). Ignored if doppler_hz is set.
    correlation: float = _range(0.0, 0.0, 1.0, "a correlation coefficient between 0 (i.i.d.) and 1 (static)")
    #: if set, correlation = J0(2 pi f_D dt) (Jakes) with dt = token_interval_s [std].
    doppler_hz: float | None = _range(None, 0.0, 1.0e4, "500 km/h at 6 GHz is a 2.8 kHz Doppler shift [std]")
    #: time between tokens (s), used by Jakes' correlation and mobility [choice].
    token_interval_s: float = _range(0.05, 1e-4, 60.0, "time between generated tokens, 0.1 ms to a minute [choice]")
    #: advance the fading at every layer too, not only per token [choice; default per token].
    fading_per_layer: bool = False
    noise_psd_dbm_hz: float = _range(-174.0, -200.0, -120.0, "thermal noise kT is -174 dBm/Hz at 290 K (-200 is "
                                     "0.7 K); receiver noise figures add at most a few tens of dB [std]")  # N0 [paper]
    #: 3gpp_umi: carrier frequency (GHz) [choice: 3.5 GHz, NR band n78], antenna heights (m) [std: UMi BS
    #: 10 m, UE 1.5 m], and log-normal shadow fading per link and episode (sigma 4 / 7.82 dB LOS / NLOS) [std]
    carrier_ghz: float = _range(3.5, 0.5, 100.0, "TR 38.901's channel models cover 0.5-100 GHz [std]")
    helper_height_m: float = _range(10.0, 1.5, 150.0, "from a device at hand height to a rooftop [std]")
    user_height_m: float = _range(1.5, 1.5, 22.5, "TR 38.901 UMi's user heights run 1.5-22.5 m [std]")
    shadowing: bool = True

    def validate(self, path: str = "channel") -> None:
        from wide_env.sim.channel import FADING_MODELS
        from wide_env.sim.pathloss import PATH_LOSS_MODELS

        _check_ranges(self, path)
        _check_choice(f"{path}.fading", self.fading, tuple(FADING_MODELS))
        if self.path_loss is not None:
            _check_choice(f"{path}.path_loss", self.path_loss, tuple(PATH_LOSS_MODELS))
        if self.helper_height_m <= self.user_height_m:
            _fail(f"{path}.helper_height_m", self.helper_height_m,
                  f"the 3gpp_umi model needs the helpers above the user (user_height_m = {self.user_height_m})")
        _check_flag(f"{path}.shadowing", self.shadowing)
        _check_flag(f"{path}.fading_per_layer", self.fading_per_layer)
        if not float(2 * self.nakagami_m).is_integer() and self.effective_correlation() not in (0.0, 1.0):
            _fail(f"{path}.nakagami_m", self.nakagami_m,
                  "correlated fading is built from 2m Gaussian components: use a multiple of 0.5, "
                  "or correlation 0 (i.i.d.) / 1 (static)")

    def effective_correlation(self) -> float:
        if self.doppler_hz is None:
            return float(self.correlation)
        from wide_env.sim.units import bessel_j0

        return float(min(1.0, abs(bessel_j0(2 * math.pi * self.doppler_hz * self.token_interval_s))))


@dataclass(frozen=True)
class RadioConfig:
    """Links between the user device and the helpers (orthogonal, one per helper)."""

    #: "paper": the SiftMoE paper's settings (A d^-alpha, no noise figure, radiated energy only, no least
    #: output power); "3gpp": a realistic link budget (3GPP UMi path loss, device noise figure, amplifier
    #: efficiency and circuit power, least output power). Fields below left at None follow the link budget.
    link_budget: str = "paper"
    bandwidth_hz: float = _range(1.0e6, 1.0e3, 1.0e9, "per-link bandwidths run from kHz (narrowband IoT) to "
                                 "hundreds of MHz (5G NR FR2: 400 MHz) [std]")  # B per link [paper, per profile]
    #: "inversion": least-energy power over the whole window (default) [std]; "fixed": p_max, t = D / r.
    uplink_model: str = "inversion"
    user_max_power_dbm: float = _range(23.0, -30.0, 40.0, "user devices transmit from -20 dBm (Bluetooth LE) to "
                                       "23-30 dBm (handsets, Wi-Fi) [std]")  # p_max [choice]
    helper_power_dbm: float = _range(38.0, -30.0, 60.0, "access points transmit 20-30 dBm, macro base stations "
                                     "46-49 dBm [std]")  # P_h [paper]
    bits_per_element: int = _range(16, 1, 64, "hidden-state elements take 1 (binary) to 64 (float64) bits [std]",
                                   integer=True)  # BF16 hidden state [paper]
    #: energy counted by the objective: "uplink" (user radio, default), "comm" (+ downlink), "system" (+ compute).
    energy_scope: str = "uplink"
    #: split the uplink window into S slots with i.i.d. fading each [paper's fast-fading case]; 1 = one window.
    uplink_slots: int = _range(1, 1, 64, "the causal bit allocation is solved per slot; 64 slots resolve the "
                               "fading within a window [choice]", integer=True)
    #: bits per slot when uplink_slots > 1: "dp" (causal dynamic programming [paper]) or "uniform".
    bit_allocation: str = "dp"
    #: width of the hidden state sent over the air; None = the model's d_model. Lets a paper profile keep the
    #: paper model's payload with gating recorded from a smaller model [choice, labelled per profile].
    payload_d_model: int | None = _range(None, 1, 65536, "hidden sizes of released LLMs are at most 16384 [choice]",
                                         integer=True)
    #: receivers' noise figure, dB; None = 0 (paper) / 9 dB (3gpp: device-class receiver [std])
    noise_figure_db: float | None = _range(None, 0.0, 30.0, "receiver noise figures run 1-15 dB [std]")
    #: the device amplifier's efficiency; None = 1 (paper: radiated energy) / 0.35 (3gpp [choice: 30-40% typical])
    pa_efficiency: float | None = _range(None, 0.01, 1.0, "an amplifier's efficiency is a fraction [std]")
    #: power the device's transmit chain draws while sending, W; None = 0 (paper) / 0.1 (3gpp [choice])
    circuit_power_w: float | None = _range(None, 0.0, 10.0, "a device's transmit chain draws tens to hundreds of "
                                           "mW [std]")
    #: the device's least output power, dBm; None = none (paper) / -40 dBm (3gpp [std: TS 38.101-1 6.3.1])
    user_min_power_dbm: float | None = _range(None, -100.0, 40.0, "UE minimum output powers are about -40 dBm [std]")

    def validate(self, path: str = "radio") -> None:
        _check_ranges(self, path)
        _check_choice(f"{path}.link_budget", self.link_budget, ("paper", "3gpp"))
        if self.user_min_power_dbm is not None and self.user_min_power_dbm > self.user_max_power_dbm:
            _fail(f"{path}.user_min_power_dbm", self.user_min_power_dbm,
                  f"must be <= radio.user_max_power_dbm ({self.user_max_power_dbm})")
        _check_choice(f"{path}.uplink_model", self.uplink_model, ("inversion", "fixed"))
        _check_choice(f"{path}.energy_scope", self.energy_scope, ("uplink", "comm", "system"))
        _check_choice(f"{path}.bit_allocation", self.bit_allocation, ("dp", "uniform"))
        if self.uplink_slots > 1 and self.uplink_model != "inversion":
            _fail(f"{path}.uplink_slots", self.uplink_slots, "slotted uplinks need uplink_model 'inversion'")


@dataclass(frozen=True)
class ComputeConfig:
    """Expert loading and computation on helpers and on the device [choice, per profile]."""

    load_time_s: float = _range(0.002, 0.0, 60.0, _SECONDS)  # load the expert's weights (overlaps the uplink [paper])
    compute_time_s: float = _range(0.0005, 0.0, 60.0, _SECONDS)  # run the expert for one token
    #: mean of a helper's queueing delay per token (helpers shared with other users) [choice]: drawn with the
    #: token's plan but hidden from the policy, which sees only P(meeting the deadline) (uncertain queues).
    queue_delay_mean_s: float = _range(0.0, 0.0, 60.0, _SECONDS)
    #: backlog persistence rho in [0, 1): q_t = rho q_(t-1) + (1 - rho) e_t, e_t ~ Exp(mean); 0 = i.i.d. [choice]
    queue_persistence: float = _range(0.0, 0.0, 0.99, "a correlation below 1: rho = 1 would freeze the backlog "
                                      "[choice]")
    helper_compute_power_w: float = _range(300.0, 0.0, 1.0e4, _POWER_W)  # counted in the "system" scope [choice]
    local_compute_power_w: float = _range(30.0, 0.0, 1.0e4, _POWER_W)  # P_gpu of the user device [choice]

    def validate(self, path: str = "compute") -> None:
        _check_ranges(self, path)


@dataclass(frozen=True)
class DeadlineConfig:
    deadline_s: float = _range(0.01, 1e-6, 60.0, "a per-layer deadline between a microsecond and a minute "
                               "[choice]")  # T_max per layer [paper, per profile]
    #: False = "ideal" operation: late experts still count (ideal Top-K); True = late experts are lost.
    enforce: bool = True

    def validate(self, path: str = "deadline") -> None:
        _check_ranges(self, path)
        _check_flag(f"{path}.enforce", self.enforce)


@dataclass(frozen=True)
class BudgetConfig:
    """Deviation budget: per layer (paper), one per token across its layers, or one per episode (a long-term
    average over all its layer-steps) [choice]."""

    mode: str = "layer"  # "layer" [paper], "token" or "episode"
    #: per-layer eps_l in the model's hidden-state units; None = the gating source's own budget.
    layer_budget: float | None = _range(None, *LAYER_BUDGET_RANGE, LAYER_BUDGET_REASON)
    #: multiplies every budget (sweeps of the accuracy-energy trade-off).
    scale: float = _range(1.0, 1e-6, 1e6, "it multiplies the budget, which is the unit of the observation's "
                          "deviations: 0 leaves no unit, and sweeps span a few decades [choice]")
    #: token/episode modes: layer sensitivities kappa_l (L numbers); None = all 1. Token budget =
    #: scale * sum_l kappa_l eps_l; episode budget = n_tokens * token budget.
    layer_weights: tuple | None = _range(None, 1e-6, 1e6, "layer sensitivities kappa_l weigh deviations (1 is "
                                         "neutral); > 0 since deviations are reported as weighted / kappa_l [choice]",
                                         items=True)

    def validate(self, model: ModelConfig, path: str = "budget") -> None:
        _check_choice(f"{path}.mode", self.mode, ("layer", "token", "episode"))
        _check_ranges(self, path)
        if self.layer_weights is not None:
            if len(self.layer_weights) != model.n_layers:
                _fail(f"{path}.layer_weights", self.layer_weights, f"expected {model.n_layers} numbers (one per layer)")


@dataclass(frozen=True)
class RewardConfig:
    """r = -energy/E_topk - deadline_weight * misses, plus the objective's term: "deviation" (the proxy):
    - deviation_weight * [violated] * (1 + excess/budget); "accuracy": - accuracy_weight * the token's real
    loss increase (nats) at its last layer (needs a gating source with effect tables, or the live backend)."""

    objective: str = "deviation"
    deviation_weight: float = _range(2.0, 0.0, 1e6, _WEIGHT)  # [choice]
    deadline_weight: float = _range(0.5, 0.0, 1e6, _WEIGHT)  # [choice]
    #: per nat of loss increase [choice: a skipped expert costs about 0.05 nat]
    accuracy_weight: float = _range(10.0, 0.0, 1e6, _WEIGHT)

    def validate(self, path: str = "reward") -> None:
        _check_ranges(self, path)
        _check_choice(f"{path}.objective", self.objective, ("deviation", "accuracy"))


_SECTIONS = {
    "model": ModelConfig, "gating": GatingConfig, "placement": PlacementConfig, "channel": ChannelConfig,
    "radio": RadioConfig, "compute": ComputeConfig, "deadline": DeadlineConfig, "budget": BudgetConfig,
    "reward": RewardConfig,
}
