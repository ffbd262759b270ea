"""Every numeric config field has a physical range named in its error; sizes are bounded; a trace source
fixes the model's sizes; bad traces (wrong Top-K, .npy under a .npz name, pickles) are TraceErrors."""

from __future__ import annotations

import dataclasses

import gymnasium as gym
import numpy as np
import pytest

import wide_env  # noqa: F401
from wide_env import ConfigError, WideConfig
from wide_env.config import _SECTIONS
from wide_env.gating import TraceError, load_trace, save_trace, validate_trace
from trace_arrays import small_trace  # tests/ is on sys.path (pytest's rootdir insertion)


def _make_reset_step(env_id: str, config: dict):
    env = gym.make(env_id, config=config)
    obs, _ = env.reset(seed=0)
    return env.step(env.action_space.sample())


# Issue 11, item 4: each of these used to give NaN/inf rewards or energies, or observations outside the space.
@pytest.mark.parametrize("config, field, bounds", [
    ({"channel": {"path_loss_exponent": 50}}, "channel.path_loss_exponent", "[1.5, 8]"),
    ({"radio": {"bandwidth_hz": 1e308}}, "radio.bandwidth_hz", "[1000, 1e+09]"),
    ({"radio": {"bandwidth_hz": 1e-300}}, "radio.bandwidth_hz", "[1000, 1e+09]"),
    ({"channel": {"noise_psd_dbm_hz": 100}}, "channel.noise_psd_dbm_hz", "[-200, -120]"),
    ({"radio": {"user_max_power_dbm": -300}}, "radio.user_max_power_dbm", "[-30, 40]"),
    ({"placement": {"r_max_m": 1e300}}, "placement.r_max_m", "[1, 10000]"),
    ({"channel": {"reference_gain_db": 1e308}}, "channel.reference_gain_db", "[-100, 30]"),
    ({"gating": {"source": "synthetic"}, "model": {"n_experts": 10**6}}, "model.n_experts", "[1, 512]"),
    ({"gating": {"source": "synthetic"}, "model": {"n_layers": 10**6}}, "model.n_layers", "[1, 128]"),
    ({"n_tokens": 10**9}, "n_tokens", "[1, 131072]"),
    ({"budget": {"scale": 0}}, "budget.scale", "[1e-06, 1e+06]"),
])
@pytest.mark.parametrize("env_id", ["wide_env/WideMoE-v0", "wide_env/WideMoEPrefill-v0"])
def test_absurd_values_are_config_errors_naming_field_range_and_reason(env_id, config, field, bounds):
    with pytest.raises(ConfigError) as err:
        _make_reset_step(env_id, config)
    msg = str(err.value)
    assert f"'{field}'" in msg and bounds in msg
    assert "[std]" in msg or "[choice]" in msg  # the reason, with its provenance tag


def test_budget_layer_weights_not_a_list_is_a_config_error():
    with pytest.raises(ConfigError, match="'budget.layer_weights' = 5 .*expected a list of numbers"):
        gym.make("wide_env/WideMoE-v0", config={"budget": {"mode": "token", "layer_weights": 5}})
    with pytest.raises(ConfigError, match=r"'budget.layer_weights\[1\]'"):
        gym.make("wide_env/WideMoE-v0", config={"budget": {"layer_weights": [1, float("nan"), 1, 1]}})
    # a zero sensitivity: deviations are reported in model units, weighted / kappa_l
    with pytest.raises(ConfigError, match=r"'budget.layer_weights\[0\]' = 0 .*> 0"):
        gym.make("wide_env/WideMoE-v0", config={"budget": {"mode": "token", "layer_weights": [0, 1, 1, 1]}})


def test_every_numeric_field_declares_a_range_and_defaults_lie_inside():
    sections = [WideConfig] + list(_SECTIONS.values())
    for cls in sections:
        for f in dataclasses.fields(cls):
            numeric = any(t in str(f.type) for t in ("int", "float", "tuple"))
            if not numeric:
                continue
            meta = f.metadata.get("range") or f.metadata.get("items_range")
            assert meta is not None, f"{cls.__name__}.{f.name} has no physical range"
            assert meta.reason and meta.low <= meta.high
            if f.default is not None and f.default is not dataclasses.MISSING and "range" in f.metadata:
                assert meta.low <= f.default <= meta.high, f"{cls.__name__}.{f.name}"
    for profile in wide_env.PROFILES:
        WideConfig.from_dict({"profile": profile})  # every profile lies inside the ranges


# Issue 11, item 2: sizes given with a trace source used to be ignored silently.
def test_model_size_that_disagrees_with_the_trace_is_an_error_naming_both():
    with pytest.raises(ConfigError) as err:
        gym.make("wide_env/WideMoE-v0", config={"model": {"n_experts": 16}})
    msg = str(err.value)
    assert "'model.n_experts' = 16" in msg and "moe_trace.npz" in msg and "n_experts = 8" in msg
    assert "gating.trace_path" in msg
    # agreeing values and the profile's own sizes are fine; the config reports the trace's sizes
    env = gym.make("wide_env/WideMoE-v0", config={"model": {"n_experts": 8, "top_k": 2}})
    assert env.action_space.n == 8 and env.unwrapped.config.model.n_experts == 8


def test_trace_path_with_synthetic_source_names_both_fields():
    with pytest.raises(ConfigError) as err:
        gym.make("wide_env/WideMoE-Synthetic-v0", config={"gating": {"trace_path": "my_trace.npz"}})
    assert "'gating.trace_path'" in str(err.value) and "gating.source = 'synthetic'" in str(err.value)


def _trace(T=30, L=2, E=6, K=2, seed=0):
    return small_trace(T, L, E, K, seed, d_model=32, tokens=False)


def test_a_custom_trace_sets_the_model_sizes(tmp_path):
    path = tmp_path / "t.npz"
    save_trace(path, **_trace(L=3, E=6, K=2))
    env = gym.make("wide_env/WideMoE-v0", config={"gating": {"trace_path": str(path)}, "n_tokens": 4})
    cfg = env.unwrapped.config
    assert (cfg.model.n_layers, cfg.model.n_experts, cfg.model.top_k, cfg.model.d_model) == (3, 6, 2, 32)
    assert env.action_space.n == 6


# Issue 11, item 3: a trace whose topk_idx is not the Top-K of gate_probs, in descending order, used to load.
def test_topk_idx_must_be_the_descending_topk_of_gate_probs(tmp_path):
    arrays = _trace()
    swapped = arrays["topk_idx"][..., ::-1].copy()  # ascending order
    with pytest.raises(TraceError, match="'topk_idx'.*descending"):
        validate_trace({**arrays, "topk_idx": swapped})
    wrong = arrays["topk_idx"].copy()
    probs = arrays["gate_probs"]
    wrong[0, 0, 1] = int(np.argsort(probs[0, 0])[0])  # the least likely expert instead of the second
    with pytest.raises(TraceError, match="'topk_idx'.*Top-K of gate_probs"):
        validate_trace({**arrays, "topk_idx": wrong})
    path = tmp_path / "wrong.npz"
    np.savez(path, **{**arrays, "topk_idx": wrong})
    with pytest.raises(TraceError, match="wrong.npz"):
        load_trace(path)
    # sigmoid routers select with a bias outside the scores (DeepSeek-V3): only the order is checked
    biased = wrong.copy()
    biased[0, 0] = np.argsort(-probs[0, 0])[[0, 2]]  # descending, but not the Top-2
    validate_trace({**arrays, "topk_idx": biased, "routing": np.array("sigmoid_topk_renorm")})


# Issue 11, item 9: a .npy file named .npz, and no error may suggest allow_pickle.
def test_npy_under_npz_name_and_pickles_are_trace_errors_without_allow_pickle_advice(tmp_path):
    npy = tmp_path / "gates.npz"
    with open(npy, "wb") as fh:
        np.save(fh, np.zeros((4, 2, 8), np.float32))
    with pytest.raises(TraceError, match=r"gates.npz: a single NumPy array \(.npy\)") as err:
        load_trace(npy)
    assert "allow_pickle" not in str(err.value)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, **{**_trace(), "meta": np.array([{"x": 1}], dtype=object)})
    with pytest.raises(TraceError, match="pickled.npz: holds Python objects") as err:
        load_trace(pickled)
    assert "allow_pickle" not in str(err.value)
    with pytest.raises(TraceError, match="gates.npz"):
        gym.make("wide_env/WideMoE-v0", config={"gating": {"trace_path": str(npy)}})
