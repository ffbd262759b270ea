"""The whole configuration tree (:class:`WideConfig`): a profile's overrides, a preset and the user's dicts merged
and validated, with a trace source's model fields taken from the trace."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from wide_env.config.checks import ConfigError, _check_flag, _check_ranges, _fail, _range
from wide_env.config.merge import deep_merge
from wide_env.config.sections import (_SECTIONS, BudgetConfig, ChannelConfig, ComputeConfig, DeadlineConfig,
                                      GatingConfig, ModelConfig, PlacementConfig, RadioConfig, RewardConfig)
from wide_env.gating import TRACE_MODEL_FIELDS, trace_model_fields
from wide_env.profiles import DEFAULT_PROFILE, PROFILES, profile_trace


@dataclass(frozen=True)
class WideConfig:
    """A complete WIDE scenario. Build it with :meth:`from_dict` (profile + overrides)."""

    profile: str = DEFAULT_PROFILE
    #: tokens per episode; an episode has n_tokens * L steps
    n_tokens: int = _range(16, 1, 131072, "a decoding session longer than a 128k-token context window is not "
                           "one episode [choice]", integer=True)
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
        if self.profile not in PROFILES:
            _fail("profile", self.profile, f"unknown profile; choose one of {sorted(PROFILES)}")
        _check_ranges(self, "")
        _check_flag("flatten_observation", self.flatten_observation)
        for name, cls in _SECTIONS.items():
            section = getattr(self, name)
            if not isinstance(section, cls):
                _fail(name, section, f"expected a {cls.__name__} or a dict of its fields")
        self.model.validate()
        self.gating.validate()
        if self.gating.source == "trace":
            self._check_model_against_trace()
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

    def _check_model_against_trace(self) -> None:
        """With a trace source the model's sizes are the trace's: a value that disagrees is an error."""
        path, recorded = trace_model_fields(self.gating.trace_path or profile_trace(self.profile))
        for name in TRACE_MODEL_FIELDS:
            value = getattr(self.model, name)
            if value != recorded[name]:
                _fail(f"model.{name}", value,
                      f"it disagrees with the gating trace {path} (gating.trace_path), which has {name} = "
                      f"{recorded[name]!r}: with gating.source = 'trace' the model comes from the trace; drop "
                      f"'model.{name}', or use gating.source = 'synthetic' for other sizes")

    # ---- construction from plain data -------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | "WideConfig" | None = None, *,
                  preset: Mapping[str, Any] | None = None, **overrides: Any) -> "WideConfig":
        """Profile defaults, then a registered env's ``preset`` (a nested dict), then ``data``, then keyword
        ``overrides`` (all nested dicts, JSON-able): each level merges over the one before, key by key."""
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
        _model_from_trace(full, merged)
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


def _model_from_trace(full: dict[str, Any], given: Mapping[str, Any]) -> None:
    """With a trace source, the model fields the user did not give come from the trace (not the profile)."""
    gating, model = full.get("gating"), full.get("model", {})
    if not (isinstance(gating, Mapping) and gating.get("source") == "trace" and isinstance(model, Mapping)):
        return
    trace_path = gating.get("trace_path")
    if trace_path is not None and not isinstance(trace_path, str):
        return  # GatingConfig.validate names the field
    if trace_path is None and full.get("profile") in PROFILES:
        trace_path = profile_trace(full["profile"])

    explicit = given.get("model", {}) if isinstance(given.get("model"), Mapping) else {}
    _, recorded = trace_model_fields(trace_path)
    full["model"] = {**model, **{k: v for k, v in recorded.items() if k not in explicit}}


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
    if name == "budget" and isinstance(value.get("layer_weights"), list):
        value["layer_weights"] = tuple(value["layer_weights"])
    hosts = value.get("hosts") if name == "placement" else None
    if isinstance(hosts, (list, tuple)) and all(isinstance(r, (list, tuple)) for r in hosts):
        value["hosts"] = tuple(tuple(r) for r in hosts)
    return cls(**value)
