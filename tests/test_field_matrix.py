"""The prefill / decoding field matrix: for every config field and a non-default value, each phase either runs
with an observable effect (observations, rewards or info differ from the same config without the change, same
seed and actions) or raises a ConfigError naming the field. Fields with no observable effect in a short rollout
of one phase are listed in NO_EFFECT with the reason."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import numpy as np
import pytest

from wide_env.config import ConfigError, WideConfig
from wide_env.envs.decode import WideMoEEnv
from wide_env.envs.prefill import WideMoEPrefillEnv
from wide_env.profiles import profile_trace

SYNTHETIC = {"gating": {"source": "synthetic"}}
QUEUES = {"compute": {"queue_delay_mean_s": 0.002}}
DOPPLER = {"channel": {"doppler_hz": 5.0}}
SLOW = {"channel": {"correlation": 0.9}}
THREE_GPP = {"radio": {"link_budget": "3gpp"}}  # its path loss: 3gpp_umi
LATE = {"deadline": {"deadline_s": 0.001}}
MOBILE = {"placement": {"mobility": True, "speed_max_mps": 6.0}, "channel": {"token_interval_s": 20.0}}
LOCAL = {"placement": {"hosts": [[0, 1, 2, 3, 4, 5, 6, 7]] * 4}, "radio": {"energy_scope": "system"}}

#: field -> (non-default value, settings applied to both runs so that the field matters)
VARIANTS = {
    "profile": ("switch-base-8", {}),
    "n_tokens": (5, {}),
    "flatten_observation": (True, {}),
    "model.n_layers": (3, SYNTHETIC),
    "model.n_experts": (6, SYNTHETIC),
    "model.top_k": (1, SYNTHETIC),
    "model.d_model": (256, SYNTHETIC),
    "model.routing": ("softmax_topk_raw", SYNTHETIC),
    "gating.source": ("synthetic", {}),
    "gating.trace_path": (profile_trace("mixtral-8x7b"), {}),
    "gating.backend": ("live", {}),
    "gating.accuracy": ("model", {}),
    "gating.model_state": (True, {"gating": {"accuracy": "model"}}),
    "gating.checkpoint_dir": (None, {}),  # replaced by a copy of the shipped checkpoint in the test
    "gating.output_norm": (3.0, SYNTHETIC),
    "gating.synthetic_budget": (0.1, SYNTHETIC),
    "gating.model_seed": (7, SYNTHETIC),
    "gating.logit_scale_first": (5.0, SYNTHETIC),
    "gating.logit_scale_last": (3.0, SYNTHETIC),
    "gating.expert_similarity_first": (0.9, SYNTHETIC),
    "gating.expert_similarity_last": (0.0, SYNTHETIC),
    "placement.hosts": ([[1, 1, 2, 2, 3, 3, 4, 4]] * 4, {}),
    "placement.n_helpers": (10, {}),
    "placement.r_min_m": (50.0, {}),
    "placement.r_max_m": (60.0, {}),
    "placement.mobility": (True, {"channel": {"token_interval_s": 20.0}}),
    "placement.speed_min_mps": (3.0, MOBILE),
    "placement.speed_max_mps": (3.0, {"placement": {"mobility": True}, "channel": {"token_interval_s": 20.0}}),
    "channel.fading": ("none", {}),
    "channel.path_loss": ("power_law", THREE_GPP),
    "channel.path_loss_exponent": (3.0, {}),
    "channel.reference_gain_db": (-10.0, {}),
    "channel.nakagami_m": (4.0, {}),
    "channel.correlation": (0.9, {}),
    "channel.doppler_hz": (5.0, {}),
    "channel.token_interval_s": (0.2, DOPPLER),
    "channel.fading_per_layer": (True, {}),
    "channel.noise_psd_dbm_hz": (-160.0, {}),
    "channel.carrier_ghz": (28.0, THREE_GPP),
    "channel.helper_height_m": (25.0, THREE_GPP),
    "channel.user_height_m": (5.0, THREE_GPP),
    "channel.shadowing": (False, THREE_GPP),
    "radio.link_budget": ("3gpp", {}),
    "radio.bandwidth_hz": (2e5, {}),
    "radio.uplink_model": ("fixed", {}),
    "radio.user_max_power_dbm": (-30.0, {}),
    "radio.helper_power_dbm": (20.0, {}),
    "radio.bits_per_element": (8, {}),
    "radio.energy_scope": ("system", {}),
    "radio.uplink_slots": (4, {}),
    "radio.bit_allocation": ("uniform", {"radio": {"uplink_slots": 4}}),
    "radio.payload_d_model": (512, {}),
    "radio.noise_figure_db": (3.0, THREE_GPP),
    "radio.pa_efficiency": (0.5, {"radio": {"energy_scope": "system"}}),
    "radio.circuit_power_w": (1.0, {"radio": {"energy_scope": "system"}}),
    "radio.user_min_power_dbm": (15.0, {}),
    "compute.load_time_s": (0.004, {}),
    "compute.compute_time_s": (0.003, {}),
    "compute.queue_delay_mean_s": (0.002, {}),
    "compute.queue_persistence": (0.9, QUEUES),
    "compute.helper_compute_power_w": (50.0, {"radio": {"energy_scope": "system"}}),
    "compute.local_compute_power_w": (5.0, LOCAL),
    "deadline.deadline_s": (0.004, {}),
    "deadline.enforce": (False, LATE),
    "budget.mode": ("token", {}),
    "budget.layer_budget": (0.05, {}),
    "budget.scale": (0.2, {}),
    "budget.layer_weights": ([1.0, 2.0, 3.0, 4.0], {"budget": {"mode": "token"}}),
    "reward.objective": ("accuracy", {}),
    "reward.deviation_weight": (7.0, {}),
    "reward.deadline_weight": (3.0, LATE),
    "reward.accuracy_weight": (3.0, {"reward": {"objective": "accuracy"}}),
}

#: (phase, field) -> why the field has no observable effect in a short rollout of that phase
NO_EFFECT = {
    ("prefill", "n_tokens"): "the decoding episode length; prefill episodes are sized by the env's prompt_tokens "
                             "and n_prompts arguments (one config drives both phases)",
    ("decode", "gating.checkpoint_dir"): "a copy of the shipped checkpoint measures what the shipped one does (the "
                                         "repository has one checkpoint per trace)",
}

PHASES = {"decode": lambda config: WideMoEEnv(config),
          "prefill": lambda config: WideMoEPrefillEnv(config, prompt_tokens=4, n_prompts=3)}
STEPS = {"decode": 12, "prefill": 10}


def _leaf_fields(obj, prefix: str = ""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaf_fields(value, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def _nested(dotted: str, value) -> dict:
    out = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _rollout(phase: str, config: dict) -> list:
    """Observations, rewards and infos of a seeded rollout with seeded random actions."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = PHASES[phase](config)
        rng = np.random.default_rng(5)
        obs, info = env.reset(seed=3)
        trail = [obs, info]
        for _ in range(STEPS[phase]):
            obs, reward, _, truncated, info = env.step((rng.random(env.action_space.shape) < 0.6).astype(np.int8))
            trail += [obs, reward, info]
            if truncated:
                obs, info = env.reset()
                trail += [obs, info]
    return trail


def _same(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return type(a) is type(b) and a.shape == b.shape and np.array_equal(a, b, equal_nan=True)
    return type(a) is type(b) and (a == b or (a != a and b != b))


def test_every_config_field_has_a_variant():
    fields = list(_leaf_fields(WideConfig.from_dict({})))
    assert sorted(VARIANTS) == sorted(fields), "list a non-default value of every config field in VARIANTS"


@pytest.mark.parametrize("phase", sorted(PHASES))
@pytest.mark.parametrize("field", sorted(VARIANTS))
def test_a_field_is_implemented_or_rejected(field, phase, tmp_path):
    value, context = VARIANTS[field]
    if field == "gating.checkpoint_dir":
        import shutil

        from wide_env.profiles import profile_checkpoint

        src = profile_checkpoint("tiny")
        for name in ("moe_lm.json", "moe_lm.safetensors"):
            shutil.copy(f"{src}/{name}", tmp_path / name)
        value, context = str(tmp_path), {"gating": {"accuracy": "model"}}
    changed = _merge(context, _nested(field, value))
    assert WideConfig.from_dict(changed) != WideConfig.from_dict(context), f"{field}: the variant is the default"
    try:
        baseline = _rollout(phase, context)
    except ConfigError:  # the setting the field acts in is rejected in this phase: so is the field
        with pytest.raises(ConfigError):
            _rollout(phase, changed)
        return
    try:
        variant = _rollout(phase, changed)
    except ConfigError as exc:
        assert field in str(exc), f"{phase}: the ConfigError for {field} = {value!r} does not name it: {exc}"
        return
    if (phase, field) in NO_EFFECT:
        assert _same(variant, baseline), f"{phase}: {field} now has an effect: drop it from NO_EFFECT"
    else:
        assert not _same(variant, baseline), f"{phase}: {field} = {value!r} is accepted but changes nothing"
