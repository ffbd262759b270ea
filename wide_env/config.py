"""Frozen, validated configuration of a WIDE scenario.

Every section is a frozen dataclass; :meth:`WideConfig.from_dict` builds the whole tree from plain,
JSON-able dicts (so ``gym.make(id, config={...})`` and YAML files work), starting from a named
profile (:mod:`wide_env.profiles`) and overriding only the keys given. Every invalid value raises
:class:`ConfigError` (a ``ValueError``) naming the field and how to fix it.

Every field, its unit, default and provenance ([paper], [std], [choice], as tagged below) is documented in
docs/model.md (section "Configuration reference", docs/model.md#config-reference).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field and the fix."""


def _fail(path: str, value: Any, fix: str) -> None:
    raise ConfigError(f"config field '{path}' = {value!r} is invalid: {fix}")


def _check_number(path: str, value: Any, *, low: float | None = None, high: float | None = None,
                  low_open: bool = False, integer: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        _fail(path, value, "expected " + ("an integer" if integer else "a number"))
    if not math.isfinite(value):
        _fail(path, value, "expected a finite number")
    if low is not None and (value <= low if low_open else value < low):
        _fail(path, value, f"must be {'>' if low_open else '>='} {low}")
    if high is not None and value > high:
        _fail(path, value, f"must be <= {high}")


def _check_choice(path: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(path, value, f"choose one of {list(choices)}")


@dataclass(frozen=True)
class ModelConfig:
    """The MoE model whose experts are distributed. With a trace gating source these come from the trace."""

    n_layers: int = 4
    n_experts: int = 8
    top_k: int = 2
    d_model: int = 64
    #: "softmax_topk_renorm" (Mixtral: Top-K weights renormalised) or "softmax_topk_raw" (Switch).
    routing: str = "softmax_topk_renorm"

    def validate(self, path: str = "model") -> None:
        _check_number(f"{path}.n_layers", self.n_layers, low=1, integer=True)
        _check_number(f"{path}.n_experts", self.n_experts, low=1, integer=True)
        _check_number(f"{path}.top_k", self.top_k, low=1, integer=True)
        _check_number(f"{path}.d_model", self.d_model, low=1, integer=True)
        if self.top_k > self.n_experts:
            _fail(f"{path}.top_k", self.top_k, f"top_k (K) must be <= n_experts (E = {self.n_experts})")
        _check_choice(f"{path}.routing", self.routing,
                      ("softmax_topk_renorm", "softmax_topk_raw", "sigmoid_topk_renorm"))


@dataclass(frozen=True)
class GatingConfig:
    """Where gating scores and mismatch tables come from."""

    #: "synthetic" (any L, E, K) or "trace" (a recorded .npz, see docs/trace-schema.md).
    source: str = "synthetic"
    #: path of the trace (.npz) when source == "trace"; None = the trace shipped with the package.
    trace_path: str | None = None
    #: "table": accuracy from the trace's effect tables (numpy only); "live": run the shipped checkpoint
    #: (torch) token by token with the executed experts, so later layers' gates and the next-token outcome
    #: are real (needs the trace the checkpoint exported; single env only).
    backend: str = "table"
    #: directory of the live backend's checkpoint (moe_lm.safetensors + moe_lm.json); None = shipped.
    checkpoint_dir: str | None = None
    #: synthetic: typical norm of one expert's output, i.e. D(i, skip) [choice; sets the deviation scale].
    output_norm: float = 1.0
    #: synthetic: per-layer deviation budget eps_l in the same units as output_norm [paper value per profile].
    synthetic_budget: float = 0.5
    #: synthetic: seed of the fixed model tables (router weights, mismatch), independent of episode seeds.
    model_seed: int = 0
    #: synthetic: router logit scale in the first and last layer (peaky early, flatter late) [choice].
    logit_scale_first: float = 2.0
    logit_scale_last: float = 0.8
    #: synthetic: cosine similarity shared by experts' outputs in the first and last layer [choice].
    expert_similarity_first: float = 0.2
    expert_similarity_last: float = 0.7

    def validate(self, path: str = "gating") -> None:
        _check_choice(f"{path}.source", self.source, ("synthetic", "trace"))
        _check_choice(f"{path}.backend", self.backend, ("table", "live"))
        if self.backend == "live" and self.source != "trace":
            _fail(f"{path}.backend", self.backend, "the live backend replays a trace's text: set gating.source = 'trace'")
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, str):
            _fail(f"{path}.checkpoint_dir", self.checkpoint_dir, "expected a directory path string or None")
        if self.trace_path is not None and not isinstance(self.trace_path, str):
            _fail(f"{path}.trace_path", self.trace_path, "expected a file path string or None")
        _check_number(f"{path}.output_norm", self.output_norm, low=0, low_open=True)
        _check_number(f"{path}.synthetic_budget", self.synthetic_budget, low=0, low_open=True)
        _check_number(f"{path}.model_seed", self.model_seed, low=0, integer=True)
        _check_number(f"{path}.logit_scale_first", self.logit_scale_first, low=0)
        _check_number(f"{path}.logit_scale_last", self.logit_scale_last, low=0)
        _check_number(f"{path}.expert_similarity_first", self.expert_similarity_first, low=-1, high=1)
        _check_number(f"{path}.expert_similarity_last", self.expert_similarity_last, low=-1, high=1)


@dataclass(frozen=True)
class PlacementConfig:
    """Which node hosts which expert, and where the helpers are."""

    #: "one_to_one" [paper]: helper e hosts expert e of every layer (N = E, no local experts).
    #: Or an explicit host map: a list of L lists of E node indices (0 = the user device, 1..N helpers).
    hosts: Any = "one_to_one"
    #: number of helpers N; None = E for one_to_one, max(host map) otherwise.
    n_helpers: int | None = None
    #: helper distances uniform in area over an annulus [r_min, r_max] per episode [choice; paper: GPS traces].
    r_min_m: float = 10.0
    r_max_m: float = 150.0
    #: pedestrian random-waypoint mobility of helpers, advanced by the token interval [choice].
    mobility: bool = False
    speed_min_mps: float = 0.5
    speed_max_mps: float = 1.5

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
                    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                        _fail(f"{path}.hosts", self.hosts, "node indices must be integers >= 0 (0 = user device)")
        if self.n_helpers is not None:
            _check_number(f"{path}.n_helpers", self.n_helpers, low=1, integer=True)
            if not isinstance(self.hosts, str) and max(max(r) for r in self.hosts) > self.n_helpers:
                _fail(f"{path}.n_helpers", self.n_helpers, "the host map uses a helper index above n_helpers")
        _check_number(f"{path}.r_min_m", self.r_min_m, low=0, low_open=True)
        _check_number(f"{path}.r_max_m", self.r_max_m, low=0, low_open=True)
        if self.r_max_m < self.r_min_m:
            _fail(f"{path}.r_max_m", self.r_max_m, f"must be >= r_min_m ({self.r_min_m})")
        if not isinstance(self.mobility, bool):
            _fail(f"{path}.mobility", self.mobility, "expected true or false")
        _check_number(f"{path}.speed_min_mps", self.speed_min_mps, low=0)
        _check_number(f"{path}.speed_max_mps", self.speed_max_mps, low=0)
        if self.speed_max_mps < self.speed_min_mps:
            _fail(f"{path}.speed_max_mps", self.speed_max_mps, "must be >= speed_min_mps")

    def host_map(self, model: ModelConfig) -> list[list[int]]:
        """The host map as L lists of E node indices."""
        if isinstance(self.hosts, str):
            return [[e + 1 for e in range(model.n_experts)] for _ in range(model.n_layers)]
        return [list(map(int, r)) for r in self.hosts]

    def helper_count(self, model: ModelConfig) -> int:
        if self.n_helpers is not None:
            return int(self.n_helpers)
        return max(1, max(max(r) for r in self.host_map(model)))


@dataclass(frozen=True)
class ChannelConfig:
    """Large-scale path loss and Nakagami-m fading with AR(1) time correlation."""

    #: small-scale fading model by name (wide_env.sim.channel.FADING_MODELS): "nakagami" [paper] or "none"
    fading: str = "nakagami"
    #: large-scale path loss by name (wide_env.sim.pathloss.PATH_LOSS_MODELS): "power_law" [paper] or
    #: "3gpp_umi" [std: TR 38.901 UMi street canyon]; None = the one radio.link_budget implies
    path_loss: str | None = None
    path_loss_exponent: float = 4.0  # alpha [paper]
    reference_gain_db: float = 0.0  # A = 1 (0 dB) [paper]; set e.g. -30 for a 1 m reference loss [choice]
    nakagami_m: float = 2.0  # [paper]; m = 1 is Rayleigh
    #: AR(1) correlation of the complex fading components between successive tokens; 0 = i.i.d. per token
    #: (fast fading, default [choice]), 1 = static over the episode (slow fading). Ignored if doppler_hz is set.
    correlation: float = 0.0
    #: if set, correlation = J0(2 pi f_D dt) (Jakes) with dt = token_interval_s [std].
    doppler_hz: float | None = None
    #: time between tokens (s), used by Jakes' correlation and mobility [choice].
    token_interval_s: float = 0.05
    #: advance the fading at every layer too, not only per token [choice; default per token].
    fading_per_layer: bool = False
    noise_psd_dbm_hz: float = -174.0  # N0 [paper]
    #: 3gpp_umi: carrier frequency (GHz) [choice: 3.5 GHz, NR band n78], antenna heights (m) [std: UMi BS
    #: 10 m, UE 1.5 m], and log-normal shadow fading per link and episode (sigma 4 / 7.82 dB LOS / NLOS) [std]
    carrier_ghz: float = 3.5
    helper_height_m: float = 10.0
    user_height_m: float = 1.5
    shadowing: bool = True

    def validate(self, path: str = "channel") -> None:
        from wide_env.sim.channel import FADING_MODELS
        from wide_env.sim.pathloss import PATH_LOSS_MODELS

        _check_choice(f"{path}.fading", self.fading, tuple(FADING_MODELS))
        if self.path_loss is not None:
            _check_choice(f"{path}.path_loss", self.path_loss, tuple(PATH_LOSS_MODELS))
        _check_number(f"{path}.carrier_ghz", self.carrier_ghz, low=0.5, high=100.0)  # TR 38.901 covers 0.5-100 GHz
        _check_number(f"{path}.helper_height_m", self.helper_height_m, low=1.5, high=150.0)
        _check_number(f"{path}.user_height_m", self.user_height_m, low=1.5, high=22.5)  # TR 38.901 UMi range
        if self.helper_height_m <= self.user_height_m:
            _fail(f"{path}.helper_height_m", self.helper_height_m,
                  f"the 3gpp_umi model needs the helpers above the user (user_height_m = {self.user_height_m})")
        if not isinstance(self.shadowing, bool):
            _fail(f"{path}.shadowing", self.shadowing, "expected true or false")
        _check_number(f"{path}.path_loss_exponent", self.path_loss_exponent, low=0, low_open=True)
        _check_number(f"{path}.reference_gain_db", self.reference_gain_db)
        _check_number(f"{path}.nakagami_m", self.nakagami_m, low=0, low_open=True)
        if self.nakagami_m < 0.5:
            _fail(f"{path}.nakagami_m", self.nakagami_m, "Nakagami fading needs m >= 0.5 (m = 1 is Rayleigh)")
        _check_number(f"{path}.correlation", self.correlation, low=0, high=1)
        if self.doppler_hz is not None:
            _check_number(f"{path}.doppler_hz", self.doppler_hz, low=0)
        _check_number(f"{path}.token_interval_s", self.token_interval_s, low=0, low_open=True)
        if not isinstance(self.fading_per_layer, bool):
            _fail(f"{path}.fading_per_layer", self.fading_per_layer, "expected true or false")
        _check_number(f"{path}.noise_psd_dbm_hz", self.noise_psd_dbm_hz)
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
    bandwidth_hz: float = 1.0e6  # B per link [paper, per profile]
    #: "inversion": least-energy power over the whole window (default) [std]; "fixed": p_max, t = D / r.
    uplink_model: str = "inversion"
    user_max_power_dbm: float = 23.0  # p_max [choice]
    helper_power_dbm: float = 38.0  # P_h [paper]
    bits_per_element: int = 16  # BF16 hidden state [paper]
    #: width of the hidden state sent over the air; None = the model's d_model. Lets a paper profile keep the
    #: paper model's payload with gating recorded from a smaller model [choice, labelled per profile].
    payload_d_model: int | None = None
    #: energy counted by the objective: "uplink" (user radio, default), "comm" (+ downlink), "system" (+ compute).
    energy_scope: str = "uplink"
    #: split the uplink window into S slots with i.i.d. fading each [paper's fast-fading case]; 1 = one window.
    uplink_slots: int = 1
    #: bits per slot when uplink_slots > 1: "dp" (causal dynamic programming [paper]) or "uniform".
    bit_allocation: str = "dp"
    #: receivers' noise figure, dB; None = 0 (paper) / 9 dB (3gpp: device-class receiver [std])
    noise_figure_db: float | None = None
    #: the device amplifier's efficiency; None = 1 (paper: radiated energy) / 0.35 (3gpp [choice: 30-40% typical])
    pa_efficiency: float | None = None
    #: power the device's transmit chain draws while sending, W; None = 0 (paper) / 0.1 (3gpp [choice])
    circuit_power_w: float | None = None
    #: the device's least output power, dBm; None = none (paper) / -40 dBm (3gpp [std: TS 38.101-1 6.3.1])
    user_min_power_dbm: float | None = None

    def validate(self, path: str = "radio") -> None:
        _check_choice(f"{path}.link_budget", self.link_budget, ("paper", "3gpp"))
        _check_number(f"{path}.bandwidth_hz", self.bandwidth_hz, low=0, low_open=True)
        if self.noise_figure_db is not None:
            _check_number(f"{path}.noise_figure_db", self.noise_figure_db, low=0, high=30)
        if self.pa_efficiency is not None:
            _check_number(f"{path}.pa_efficiency", self.pa_efficiency, low=0.01, high=1)
        if self.circuit_power_w is not None:
            _check_number(f"{path}.circuit_power_w", self.circuit_power_w, low=0, high=10)
        if self.user_min_power_dbm is not None:
            _check_number(f"{path}.user_min_power_dbm", self.user_min_power_dbm, low=-100, high=self.user_max_power_dbm)
        _check_choice(f"{path}.uplink_model", self.uplink_model, ("inversion", "fixed"))
        _check_number(f"{path}.user_max_power_dbm", self.user_max_power_dbm)
        _check_number(f"{path}.helper_power_dbm", self.helper_power_dbm)
        _check_number(f"{path}.bits_per_element", self.bits_per_element, low=1, integer=True)
        if self.payload_d_model is not None:
            _check_number(f"{path}.payload_d_model", self.payload_d_model, low=1, high=1_000_000, integer=True)
        _check_choice(f"{path}.energy_scope", self.energy_scope, ("uplink", "comm", "system"))
        _check_number(f"{path}.uplink_slots", self.uplink_slots, low=1, high=64, integer=True)
        _check_choice(f"{path}.bit_allocation", self.bit_allocation, ("dp", "uniform"))
        if self.uplink_slots > 1 and self.uplink_model != "inversion":
            _fail(f"{path}.uplink_slots", self.uplink_slots, "slotted uplinks need uplink_model 'inversion'")


@dataclass(frozen=True)
class ComputeConfig:
    """Expert loading and computation on helpers and on the device [choice, per profile]."""

    load_time_s: float = 0.002  # load the expert's weights (overlaps the uplink [paper])
    compute_time_s: float = 0.0005  # run the expert for one token
    #: mean of a helper's queueing delay per token (helpers shared with other users) [choice]: drawn with the
    #: token's plan but hidden from the policy, which sees only P(meeting the deadline) (uncertain queues).
    queue_delay_mean_s: float = 0.0
    #: backlog persistence rho in [0, 1): q_t = rho q_(t-1) + (1 - rho) e_t, e_t ~ Exp(mean); 0 = i.i.d. [choice]
    queue_persistence: float = 0.0
    helper_compute_power_w: float = 300.0  # counted in the "system" scope [choice]
    local_compute_power_w: float = 30.0  # P_gpu of the user device for local experts [choice]

    def validate(self, path: str = "compute") -> None:
        for name in ("load_time_s", "compute_time_s", "queue_delay_mean_s",
                     "helper_compute_power_w", "local_compute_power_w"):
            _check_number(f"{path}.{name}", getattr(self, name), low=0)
        _check_number(f"{path}.queue_persistence", self.queue_persistence, low=0, high=0.99)


@dataclass(frozen=True)
class DeadlineConfig:
    deadline_s: float = 0.01  # T_max per layer [paper, per profile]
    #: False = "ideal" operation: late experts still count (ideal Top-K); True = late experts are lost.
    enforce: bool = True

    def validate(self, path: str = "deadline") -> None:
        _check_number(f"{path}.deadline_s", self.deadline_s, low=0, low_open=True)
        if not isinstance(self.enforce, bool):
            _fail(f"{path}.enforce", self.enforce, "expected true or false")


@dataclass(frozen=True)
class BudgetConfig:
    """Deviation budget: per layer (paper), one per token across its layers, or one per episode (a long-term
    average over all its layer-steps) [choice]."""

    mode: str = "layer"  # "layer" [paper], "token" or "episode"
    #: per-layer eps_l in the model's hidden-state units; None = the gating source's own budget.
    layer_budget: float | None = None
    #: multiplies every budget (sweeps of the accuracy-energy trade-off).
    scale: float = 1.0
    #: token/episode modes: layer sensitivities kappa_l (L numbers); None = all 1. Token budget =
    #: scale * sum_l kappa_l eps_l; episode budget = n_tokens * token budget.
    layer_weights: tuple | None = None

    def validate(self, model: ModelConfig, path: str = "budget") -> None:
        _check_choice(f"{path}.mode", self.mode, ("layer", "token", "episode"))
        if self.layer_budget is not None:
            _check_number(f"{path}.layer_budget", self.layer_budget, low=0, low_open=True)
        _check_number(f"{path}.scale", self.scale, low=0)
        if self.layer_weights is not None:
            if len(self.layer_weights) != model.n_layers:
                _fail(f"{path}.layer_weights", self.layer_weights, f"expected {model.n_layers} numbers (one per layer)")
            for i, w in enumerate(self.layer_weights):
                _check_number(f"{path}.layer_weights[{i}]", w, low=0)


@dataclass(frozen=True)
class RewardConfig:
    """r = -energy/E_topk - deadline_weight * misses, plus the objective's term: "deviation" (the proxy):
    - deviation_weight * [violated] * (1 + excess/budget); "accuracy": - accuracy_weight * the token's real
    loss increase (nats) at its last layer (needs a gating source with effect tables, or the live backend)."""

    objective: str = "deviation"
    deviation_weight: float = 2.0  # [choice]
    deadline_weight: float = 0.5  # [choice]
    accuracy_weight: float = 10.0  # per nat of loss increase [choice: a skipped expert costs ~0.05 nat]

    def validate(self, path: str = "reward") -> None:
        _check_choice(f"{path}.objective", self.objective, ("deviation", "accuracy"))
        _check_number(f"{path}.deviation_weight", self.deviation_weight, low=0)
        _check_number(f"{path}.deadline_weight", self.deadline_weight, low=0)
        _check_number(f"{path}.accuracy_weight", self.accuracy_weight, low=0, high=1e6)


_SECTIONS = {
    "model": ModelConfig, "gating": GatingConfig, "placement": PlacementConfig, "channel": ChannelConfig,
    "radio": RadioConfig, "compute": ComputeConfig, "deadline": DeadlineConfig, "budget": BudgetConfig,
    "reward": RewardConfig,
}


@dataclass(frozen=True)
class WideConfig:
    """A complete WIDE scenario. Build it with :meth:`from_dict` (profile + overrides)."""

    profile: str = "tiny"
    n_tokens: int = 16  # tokens per episode; an episode has n_tokens * L steps
    flatten_observation: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    gating: GatingConfig = field(default_factory=GatingConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    channel: ChannelConfig = field(default_factory=ChannelConfig)
    radio: RadioConfig = field(default_factory=RadioConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    deadline: DeadlineConfig = field(default_factory=DeadlineConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        from wide_env.profiles import PROFILES

        if self.profile not in PROFILES:
            _fail("profile", self.profile, f"unknown profile; choose one of {sorted(PROFILES)}")
        _check_number("n_tokens", self.n_tokens, low=1, integer=True)
        if not isinstance(self.flatten_observation, bool):
            _fail("flatten_observation", self.flatten_observation, "expected true or false")
        for name, cls in _SECTIONS.items():
            section = getattr(self, name)
            if not isinstance(section, cls):
                _fail(name, section, f"expected a {cls.__name__} or a dict of its fields")
        self.model.validate()
        self.gating.validate()
        self.placement.validate(self.model)
        self.channel.validate()
        self.radio.validate()
        if self.radio.uplink_slots > 1 and self.channel.fading == "nakagami" and self.channel.nakagami_m <= 1:
            _fail("radio.uplink_slots", self.radio.uplink_slots,
                  "slotted uplinks select experts by E[1/h] = m/(m-1), finite only for channel.nakagami_m > 1")
        self.compute.validate()
        self.deadline.validate()
        self.budget.validate(self.model)
        self.reward.validate()

    # ---- construction from plain data -------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | "WideConfig" | None = None, *,
                  preset: Mapping[str, Any] | None = None, **overrides: Any) -> "WideConfig":
        """Profile defaults, then a registered env's ``preset`` (a nested dict), then ``data``, then keyword
        ``overrides`` (all nested dicts, JSON-able): each level merges over the one before, key by key."""
        from wide_env.profiles import PROFILES

        if isinstance(data, WideConfig):
            data = data.to_dict()
        merged: dict[str, Any] = {}
        for src in (preset or {}, data or {}, overrides):
            if not isinstance(src, Mapping):
                raise ConfigError(f"config must be a dict (or WideConfig), got {type(src).__name__}")
            merged = deep_merge(merged, src)
        profile = merged.get("profile", cls.profile)
        if profile not in PROFILES:
            _fail("profile", profile, f"unknown profile; choose one of {sorted(PROFILES)}")
        full = deep_merge(PROFILES[profile], merged)
        full["profile"] = profile
        kwargs: dict[str, Any] = {}
        top_fields = {f.name for f in fields(cls)}
        for key, value in full.items():
            if key not in top_fields:
                raise ConfigError(f"unknown config field '{key}'; valid fields: {sorted(top_fields)}")
            if key in _SECTIONS:
                kwargs[key] = _section_from(key, _SECTIONS[key], value)
            else:
                kwargs[key] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict that :meth:`from_dict` turns back into an equal config."""
        out = dataclasses.asdict(self)
        if out["budget"]["layer_weights"] is not None:
            out["budget"]["layer_weights"] = list(out["budget"]["layer_weights"])
        return out

    def replace(self, **changes: Any) -> "WideConfig":
        """A copy with nested changes, e.g. ``cfg.replace(budget={"scale": 2.0})``."""
        return WideConfig.from_dict(deep_merge(self.to_dict(), changes))


def _section_from(name: str, cls: type, value: Any):
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        _fail(name, value, f"expected a dict with keys from {[f.name for f in fields(cls)]}")
    valid = {f.name for f in fields(cls)}
    for key in value:
        if key not in valid:
            raise ConfigError(f"unknown config field '{name}.{key}'; valid fields of '{name}': {sorted(valid)}")
    value = dict(value)
    if name == "budget" and value.get("layer_weights") is not None:
        value["layer_weights"] = tuple(value["layer_weights"])
    if name == "placement" and not isinstance(value.get("hosts", "one_to_one"), str):
        value["hosts"] = tuple(tuple(r) for r in value["hosts"])
    return cls(**value)


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``update`` merged over ``base`` key by key (nested mappings merged, everything else replaced; a
    dataclass section becomes its dict). The project's one deep merge: configs, presets, hyperparameters."""
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in base.items()}
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            out[key] = dataclasses.asdict(value)
        else:
            out[key] = value
    return out
