"""Issue 21, round two of a new user's bad inputs: checkpoint integrity (4), trace ranges (5), corrupt compressed
traces (10), token ids outside the model's vocabulary (11), an unreachable Ray address (14), evaluate --seed -1
(17), benchmark --cpu-minutes 0 (18) and numpy scalars in configs (20)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import wide_env  # noqa: F401
from wide_env import ConfigError, WideConfig
from wide_env.gating import TraceError, load_trace, save_trace, validate_trace
from wide_env.gating.base import LAYER_BUDGET_RANGE
from wide_env.profiles import profile_checkpoint, profile_trace
from trace_arrays import small_trace  # tests/ is on sys.path (pytest's rootdir insertion)

ROOT = str(Path(__file__).resolve().parents[1])
DATA = Path(ROOT) / "wide_env" / "data"


def _run(module, args, cwd, timeout=120):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


# ---- 4: checkpoint integrity ---------------------------------------------------------------------------
def test_every_shipped_checkpoint_records_the_sha256_of_its_weights():
    from wide_env.models.moe_lm import HASH_KEY, weights_sha256

    jsons = sorted(DATA.glob("**/moe_lm.json"))
    assert len(jsons) == 4
    for cpath in jsons:
        meta = json.loads(cpath.read_text())
        assert meta[HASH_KEY] == weights_sha256(cpath.with_suffix(".safetensors")), cpath


def test_a_checkpoint_with_4_kib_zeroed_is_refused_naming_the_file(tmp_path):
    from wide_env.models.moe_lm import CheckpointError, load_checkpoint

    d = tmp_path / "ck"
    shutil.copytree(profile_checkpoint("tiny"), d, ignore=shutil.ignore_patterns("*.npz"))
    w = d / "moe_lm.safetensors"
    data = bytearray(w.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(4096)  # inside the tensors: still parses, still finite
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"ck/moe_lm\.safetensors: corrupt or changed after saving: its SHA-256"):
        load_checkpoint(d)


def test_checkpoint_hash_is_written_at_save_and_required_at_load(tmp_path):
    from wide_env.models.moe_lm import (HASH_KEY, CheckpointError, MoEConfig, MoELM, add_weights_hash,
                                        load_checkpoint, save_checkpoint)

    model = MoELM(MoEConfig(n_layer=1, d_model=16, n_head=2, n_expert=4, top_k=2, d_ff=16, block_size=8))
    save_checkpoint(model, tmp_path / "ck")
    cpath = tmp_path / "ck" / "moe_lm.json"
    meta = json.loads(cpath.read_text())
    assert len(meta[HASH_KEY]) == 64
    load_checkpoint(tmp_path / "ck")
    del meta[HASH_KEY]  # a json written before checkpoints carried a hash
    cpath.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"moe_lm\.json: has no 'weights_sha256' entry.*add_weights_hash"):
        load_checkpoint(tmp_path / "ck")
    meta[HASH_KEY] = "abc"
    cpath.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="'weights_sha256' = 'abc' is not a hex SHA-256"):
        load_checkpoint(tmp_path / "ck")
    add_weights_hash(tmp_path / "ck")  # the documented way to accept trusted weights
    load_checkpoint(tmp_path / "ck")


# ---- 5, 10, 11: traces -----------------------------------------------------------------------------------
def _small_trace(T=30, L=2, E=4, K=2, seed=0):
    return small_trace(T, L, E, K, seed, weight_dtype=np.float16)


def test_trace_topk_weight_must_be_a_combine_weight():
    arrays = _small_trace()
    validate_trace(arrays)  # float16 weights of exactly 1 and their rounding pass
    arrays["topk_weight"] = arrays["topk_weight"].astype(np.float32)
    arrays["topk_weight"][3, 1, 0] = 6e4
    with pytest.raises(TraceError, match=r"'topk_weight' must be combine weights in \[0, 1\].*token 3, layer 1, "
                                         r"slot 0 has 60000"):
        validate_trace(arrays, source="t.npz")
    arrays["topk_weight"][3, 1, 0] = 1.01
    with pytest.raises(TraceError, match="'topk_weight'"):
        validate_trace(arrays)


def test_trace_topk_weight_may_reach_the_routers_scaling_factor():
    """DeepSeek's routers multiply their weights by routed_scaling_factor (recorded in meta.sigmoid_router by
    the HF recorder): weights up to that factor are combine weights, beyond it they are not."""
    import json

    arrays = _small_trace()
    arrays["topk_weight"] = arrays["topk_weight"].astype(np.float32)
    arrays["topk_weight"][3, 1, 0] = 2.4
    arrays["meta"] = np.array(json.dumps({"sigmoid_router": {"routed_scaling_factor": 2.5}}))
    validate_trace(arrays)
    arrays["topk_weight"][3, 1, 0] = 2.6
    with pytest.raises(TraceError, match=r"'topk_weight' must be combine weights in \[0, 2\.5\].*routed_scaling_factor"):
        validate_trace(arrays, source="t.npz")


@pytest.mark.parametrize("value", [1e-30, 1e-13, 1e13])
def test_trace_layer_budget_follows_the_configs_range(value):
    arrays = _small_trace()
    arrays["layer_budget"] = np.array([0.4, value], np.float64)
    with pytest.raises(TraceError, match=r"trace t\.npz: 'layer_budget' must be in \[1e-12, 1e\+12\] \(the range of "
                                         r"the config field budget\.layer_budget\); layer 1"):
        validate_trace(arrays, source="t.npz")
    # the same constant bounds the config field
    low, high = LAYER_BUDGET_RANGE
    with pytest.raises(ConfigError, match="budget.layer_budget"):
        WideConfig.from_dict({"budget": {"layer_budget": value}})
    arrays["layer_budget"] = np.array([low, high])
    validate_trace(arrays)


def test_a_corrupt_compressed_trace_names_the_file(tmp_path):
    path = tmp_path / "t.npz"
    save_trace(path, **_small_trace(T=400))
    with zipfile.ZipFile(path) as archive:
        member = archive.getinfo("gate_probs.npy")
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[member.header_offset + 26:member.header_offset + 30])
    start = member.header_offset + 30 + name_len + extra_len  # the member's deflate stream
    data[start] = 0x07  # a final block of the reserved type 3: zlib.error, "invalid block type"
    path.write_bytes(bytes(data))
    with pytest.raises(TraceError,
                       match=r"t\.npz: not a readable \.npz archive \(error: Error -3 .*invalid block type"):
        load_trace(path)


def test_negative_token_ids_are_refused_at_load(tmp_path):
    arrays = _small_trace()
    arrays["target_id"][4] = -1
    with pytest.raises(TraceError, match=r"'target_id' must hold token ids >= 0.*position 4 has -1"):
        validate_trace(arrays)


@pytest.fixture(scope="module")
def out_of_vocabulary_trace(tmp_path_factory):
    """The tiny profile's trace with one token id beyond the model's 256-byte vocabulary."""
    with np.load(profile_trace("tiny")) as archive:
        arrays = {k: archive[k] for k in archive.files}
    arrays["token_id"] = arrays["token_id"].astype(np.int64)
    arrays["token_id"][7] = 300
    path = tmp_path_factory.mktemp("oov") / "oov.npz"
    np.savez(path, **arrays)
    return path


def test_out_of_vocabulary_token_ids_name_the_field_and_the_vocabulary(out_of_vocabulary_trace):
    pytest.importorskip("torch")
    import gymnasium as gym

    config = {"gating": {"source": "trace", "trace_path": str(out_of_vocabulary_trace), "accuracy": "model",
                         "checkpoint_dir": str(profile_checkpoint("tiny"))}}
    with pytest.raises(TraceError, match=r"trace field 'token_id' has token id 300 at position 7, outside the "
                                         r"checkpoint's vocabulary \[0, 256\) \(vocab_size = 256\)"):
        env = gym.make("wide_env/WideMoE-v0", config=config)
        env.reset(seed=0)


def test_trace_context_checks_target_ids_too():
    pytest.importorskip("torch")
    from wide_env.models.moe_lm import MoEConfig, MoELM
    from wide_env.models.trace_context import TraceContext

    model = MoELM(MoEConfig(vocab_size=16, n_layer=1, d_model=16, n_head=2, n_expert=4, d_ff=16, block_size=8))
    with pytest.raises(TraceError, match=r"'target_id' has token id 16 at position 2.*vocab_size = 16"):
        TraceContext(model, np.zeros(5, np.int64), np.array([1, 2, 16, 3, 4]), None)
    with pytest.raises(TraceError, match=r"'token_id' has token id -3 at position 0"):
        TraceContext(model, np.array([-3, 0, 0]), np.zeros(3, np.int64), None)


# ---- 14: an unreachable Ray address --------------------------------------------------------------------
def test_an_address_where_nothing_listens_fails_at_once_naming_it(tmp_path, capsys):
    pytest.importorskip("ray")
    from baselines.sweep import RayConnectError, connect_ray

    t0 = time.monotonic()
    with pytest.raises(RayConnectError, match=r"--address '127\.0\.0\.1:1': no Ray cluster answers at .*:1 "
                                              r"\(.*refused\).*ray start --head"):
        connect_ray("127.0.0.1:1")
    assert time.monotonic() - t0 < 10
    pytest.importorskip("ray.tune")
    from agents.tune import main

    assert main(["--storage-path", str(tmp_path), "--address", "127.0.0.1:1", "-n", "64"]) == 2
    err = capsys.readouterr().err
    assert "python -m agents.tune: error: --address '127.0.0.1:1': no Ray cluster answers" in err


def _silent_listener():
    """A socket that accepts connections and never answers (a firewall, a hung service)."""
    listener = socket.socket()
    listener.bind(("0.0.0.0", 0))  # Ray maps 127.0.0.1 to the node's address: listen on both
    listener.listen(8)
    return listener


def test_an_address_that_never_answers_fails_within_the_timeout():
    pytest.importorskip("ray")
    from baselines.sweep import RayConnectError, connect_ray

    listener = _silent_listener()
    port = listener.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(RayConnectError, match=rf"--address '127\.0\.0\.1:{port}': no Ray cluster answered at .* "
                                              r"within 3 s"):
        connect_ray(f"127.0.0.1:{port}", timeout_s=3.0)
    assert time.monotonic() - t0 < 8
    http = socket.socket()
    http.bind(("0.0.0.0", 0))
    http.listen(1)

    import threading

    def answer_like_http():
        conn, _ = http.accept()
        conn.recv(64)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.close()

    threading.Thread(target=answer_like_http, daemon=True).start()
    with pytest.raises(RayConnectError, match="something listens at .* but it is not a Ray cluster"):
        connect_ray(f"127.0.0.1:{http.getsockname()[1]}", timeout_s=3.0)
    listener.close()
    http.close()


def test_evaluate_ray_with_a_bad_address_exits_2_and_honours_sigterm(tmp_path):
    pytest.importorskip("ray")
    proc = _run("baselines.evaluate", ["--ray", "--address", "127.0.0.1:1", "--episodes", "1", "--out",
                                       str(tmp_path / "o")], tmp_path, timeout=90)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: --address '127.0.0.1:1': no Ray cluster answers" in proc.stderr
    assert "Traceback" not in proc.stderr
    listener = _silent_listener()
    listener.settimeout(90)
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    child = subprocess.Popen([sys.executable, "-m", "baselines.evaluate", "--ray", "--address", address,
                              "--episodes", "1", "--out", str(tmp_path / "p")],
                             cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        conn, _ = listener.accept()  # the child is waiting for an answer that never comes
        child.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        child.wait(timeout=10)
        assert time.monotonic() - t0 < 10 and child.returncode != 0
        conn.close()
    finally:
        if child.poll() is None:
            child.kill()
        listener.close()


# ---- 17, 18: CLI flags -------------------------------------------------------------------------------------
def test_evaluate_negative_seed_names_the_flag(tmp_path):
    proc = _run("baselines.evaluate", ["--seed", "-1", "--out", str(tmp_path / "o")], tmp_path, timeout=60)
    assert proc.returncode == 2
    assert "argument --seed: must be >= 0" in proc.stderr and "got -1" in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", ["0", "-2", "nan", "inf"])
def test_benchmark_cpu_minutes_names_the_flag_before_any_regime(tmp_path, value):
    from baselines.benchmark import main, run_benchmark

    with pytest.raises(SystemExit) as info:
        main(["--out", str(tmp_path / "b"), "--quick", "--cpu-minutes", value])
    assert info.value.code == 2
    assert not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match=r"cpu_minutes \(--cpu-minutes\) = .*positive number of minutes"):
        run_benchmark(tmp_path / "c", quick=True, cpu_minutes=float(value))
    assert not (tmp_path / "c").exists()


def test_benchmark_cpu_minutes_message(tmp_path, capsys):
    from baselines.benchmark import main

    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "b"), "--cpu-minutes", "0"])
    err = capsys.readouterr().err
    assert "argument --cpu-minutes: must be a finite number of minutes > 0" in err and "--max-cpu-minutes" not in err


# ---- 20: numpy scalars are numbers ------------------------------------------------------------------------
def test_numpy_scalars_are_numbers_in_configs():
    import gymnasium as gym

    cfg = WideConfig.from_dict({"n_tokens": np.int64(8), "budget": {"scale": np.float32(2)}})
    assert cfg.n_tokens == 8 and type(cfg.n_tokens) is int
    assert cfg.budget.scale == 2.0 and type(cfg.budget.scale) is float
    json.dumps(cfg.to_dict())  # stored as plain Python numbers
    assert cfg.replace(budget={"scale": np.float32(2)}) == cfg
    for n in np.arange(2, 4):  # the sweep that broke
        env = gym.make("wide_env/WideMoE-v0", config={"n_tokens": n})
        env.reset(seed=0)
        assert env.unwrapped.config.n_tokens == int(n)
        env.close()
    hosts = np.tile(np.arange(1, 9), (4, 1))
    assert WideConfig.from_dict({"placement": {"hosts": hosts.tolist()}}) == \
        WideConfig.from_dict({"placement": {"hosts": [list(r) for r in hosts]}})


@pytest.mark.parametrize("config, field", [
    ({"n_tokens": True}, "n_tokens"),
    ({"n_tokens": np.bool_(True)}, "n_tokens"),
    ({"budget": {"scale": True}}, "budget.scale"),
    ({"budget": {"scale": np.float32("nan")}}, "budget.scale"),
    ({"n_tokens": np.float64(8.5)}, "n_tokens"),
    ({"placement": {"hosts": [[True] * 8] * 4}}, "placement.hosts"),
])
def test_bools_and_bad_numpy_values_are_still_rejected(config, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        WideConfig.from_dict(config)
