"""Configs: validation names the field; traces: schema validation, corrupt files, replay windows."""

import json

import numpy as np
import pytest

from wide_env import ConfigError, WideConfig
from wide_env.envs.decode import WideMoEEnv
from wide_env.gating import SyntheticGating, TraceError, TraceGating, load_trace, save_trace, validate_trace


@pytest.mark.parametrize("config, field", [
    ({"model": {"top_k": 9}}, "model.top_k"),
    ({"radio": {"bandwidth_hz": -1.0}}, "radio.bandwidth_hz"),
    ({"profile": "nope"}, "profile"),
    ({"channel": {"nakagami_m": 0.0}}, "channel.nakagami_m"),
    ({"channel": {"nakagami_m": -2}}, "channel.nakagami_m"),
    ({"channel": {"nakagami_m": 1.3, "correlation": 0.5}}, "channel.nakagami_m"),
    ({"placement": {"r_min_m": 50.0, "r_max_m": 20.0}}, "placement.r_max_m"),
    ({"radio": {"uplink_model": "magic"}}, "radio.uplink_model"),
    ({"budget": {"mode": "sentence"}}, "budget.mode"),
    ({"budget": {"layer_weights": [1.0, 2.0]}}, "budget.layer_weights"),
    ({"n_tokens": 0}, "n_tokens"),
    ({"deadline": {"deadline_s": float("nan")}}, "deadline.deadline_s"),
    ({"radio": {"bandwith_hz": 1e6}}, "radio.bandwith_hz"),
    ({"colour": "red"}, "colour"),
    ({"placement": {"hosts": [[1] * 8] * 3}}, "placement.hosts"),
])
def test_invalid_configs_raise_naming_the_field(config, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        WideMoEEnv(config)


def test_config_round_trips_through_json_and_profiles_apply():
    cfg = WideConfig.from_dict({"profile": "mixtral-8x7b", "budget": {"scale": 2.0}})
    assert cfg.model.n_layers == 32 and cfg.radio.bandwidth_hz == 2e6 and cfg.deadline.deadline_s == 0.074
    again = WideConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert cfg.replace(budget={"scale": 3.0}).budget.scale == 3.0
    with pytest.raises(Exception):
        cfg.n_tokens = 5  # frozen


def test_local_experts_cost_no_radio_energy():
    hosts = [[0, 0, 1, 2, 3, 4, 5, 6]] * 4
    env = WideMoEEnv({"placement": {"hosts": hosts}, "gating": {"source": "synthetic"}})
    env.reset(seed=0)
    view = env.current_view()
    assert env.problem.n_nodes == 6
    assert view.energy_scopes[0, 0] == 0.0 and view.energy_scopes[1, 1] == 0.0  # uplink, comm
    assert view.energy_scopes[2, 0] > 0.0  # system scope counts the device's compute
    assert (view.energy[2:] > 0).all()


def test_synthetic_gates_are_peakier_in_early_layers():
    src = SyntheticGating(WideConfig().model, WideConfig().gating)
    gates = src.gates(np.zeros(4000, dtype=np.int64), np.random.default_rng(0))
    top1 = gates.probs.max(axis=-1).mean(axis=0)  # (L,)
    assert np.all(np.diff(top1) < 0)
    # later layers hold more similar experts: replacing beats skipping more often
    E = src.n_experts
    better = (src.mismatch[:, :, :E] + np.eye(E) * 1e9 < src.mismatch[:, :, E:]).mean(axis=(1, 2))
    assert better[-1] > better[0]


def _trace_arrays(T=40, L=2, E=4, K=2, effects=True, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((T, L, E))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    idx = np.argsort(-probs, -1)[..., :K]
    w = np.take_along_axis(probs, idx, -1)
    w = w / w.sum(-1, keepdims=True)
    mismatch = rng.uniform(0.5, 2.0, (L, E, E + 1))
    mismatch[:, np.arange(E), np.arange(E)] = 0
    out = dict(schema_version=np.array(1), gate_probs=probs.astype(np.float32), topk_idx=idx.astype(np.int16),
               topk_weight=w.astype(np.float32), mismatch=mismatch.astype(np.float32),
               layer_budget=np.full(L, 0.4, np.float32), d_model=np.array(32), routing=np.array("softmax_topk_renorm"),
               doc_start=np.zeros(T, bool), meta=np.array(json.dumps({"made_by": "test"})))
    out["doc_start"][[0, 25]] = True
    if effects:
        out["effect_correct"] = rng.random((T, L, K, E + 1)) < 0.8
        out["effect_dloss"] = rng.standard_normal((T, L, K, E + 1)).astype(np.float16)
    return out


def test_trace_save_load_round_trip_and_env_runs_on_it(tmp_path):
    path = tmp_path / "t.npz"
    save_trace(path, **_trace_arrays())
    data = load_trace(path)
    assert data["gate_probs"].shape == (40, 2, 4)
    env = WideMoEEnv({"gating": {"source": "trace", "trace_path": str(path)}, "n_tokens": 10,
                      "model": {"n_layers": 2, "n_experts": 4, "top_k": 2}})
    obs, _ = env.reset(seed=0)
    assert obs["gate_probs"].shape == (4,)
    total = 0
    for _ in range(20):
        obs, _, _, trunc, _ = env.step(obs["topk_mask"].astype(np.int8))
        total += 1
    assert trunc and total == 20


def test_trace_windows_stay_inside_one_document(tmp_path):
    path = tmp_path / "t.npz"
    save_trace(path, **_trace_arrays())
    src = TraceGating(path)
    starts = src.valid_starts(10)
    assert set(starts.tolist()) == set(range(0, 16)) | set(range(25, 31))
    with pytest.raises(ValueError, match="n_tokens"):
        src.valid_starts(30)


@pytest.mark.parametrize("mutate, key", [
    (lambda a: a.pop("mismatch"), "mismatch"),
    (lambda a: a.update(gate_probs=a["gate_probs"] * 2), "gate_probs"),
    (lambda a: a.update(topk_idx=a["topk_idx"] + 10), "topk_idx"),
    (lambda a: a.update(topk_weight=a["topk_weight"][:, :, :1]), "topk_weight"),
    (lambda a: a.update(mismatch=a["mismatch"] + 1.0), "mismatch"),
    (lambda a: a.update(layer_budget=-a["layer_budget"]), "layer_budget"),
    (lambda a: a.update(schema_version=np.array(2)), "schema_version"),
    (lambda a: a.update(routing=np.array("random")), "routing"),
    (lambda a: a.update(effect_correct=a["effect_correct"][:-1]), "effect_correct"),
    (lambda a: a.update(meta=np.array("{not json")), "meta"),
    (lambda a: a.update(extra=np.zeros(3)), "extra"),
])
def test_wrong_schema_raises_naming_the_key(tmp_path, mutate, key):
    arrays = _trace_arrays()
    mutate(arrays)
    with pytest.raises(TraceError, match=f"'{key}'"):
        validate_trace(arrays)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(TraceError, match="bad.npz"):
        load_trace(path)


def test_corrupt_truncated_pickled_or_missing_files_raise(tmp_path):
    good = tmp_path / "good.npz"
    save_trace(good, **_trace_arrays())
    blob = good.read_bytes()
    trunc = tmp_path / "trunc.npz"
    trunc.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(TraceError, match="trunc.npz"):
        load_trace(trunc)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip archive at all")
    with pytest.raises(TraceError, match="garbage.npz"):
        load_trace(garbage)
    pickled = tmp_path / "pickled.npz"
    arrays = _trace_arrays()
    arrays["meta"] = np.array([{"x": 1}], dtype=object)
    np.savez(pickled, **arrays)
    with pytest.raises(TraceError, match="pickled.npz"):
        load_trace(pickled)
    with pytest.raises(TraceError, match="not found"):
        load_trace(tmp_path / "missing.npz")
    with pytest.raises(TraceError, match="gating.trace_path"):
        WideMoEEnv({"gating": {"source": "trace", "trace_path": str(tmp_path / "missing.npz")}})
