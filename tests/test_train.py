"""train.py end to end (subprocesses with tiny budgets), crash safety and command-line validation."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "train.py")
# 4 tokens x 4 layers = 16 steps per episode: fast evaluations
SMALL_ENV = "{'config': {'n_tokens': 4}}"
TINY = ["--n-envs", "2", "--eval-episodes", "1", "--env-kwargs", SMALL_ENV, "--num-threads", "1", "-v", "0", "-tb", "none"]


def run_train(args, tmp_path, timeout=180, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([sys.executable, TRAIN, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)


def read_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def saved_timesteps(zip_path) -> int:
    with zipfile.ZipFile(zip_path) as zf:
        return int(json.loads(zf.read("data"))["num_timesteps"])


EXPECTED = ["command.txt", "config.yml", "hyperparams.yml", "env_config.json", "final_model.zip", "best_model.zip",
            "checkpoints/latest.json", "eval/eval_log.csv", "eval/evaluations.npz", "eval/reference.csv",
            "comparison.csv", "comparison.txt", "learning_curve.png", "status.json"]


@pytest.mark.parametrize("algo,policy", [("ppo", "mlp"), ("a2c", "mlp"), ("maskable_ppo", "expert_set")])
def test_train_end_to_end(tmp_path, algo, policy):
    budget = 256
    res = run_train(["--algo", algo, "--policy", policy, "-n", str(budget), "--eval-freq", "128", "--save-freq", "128",
                     "-f", "runs", "--run-name", "t", *TINY], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run_dir = tmp_path / "runs" / algo / "t"
    for name in EXPECTED:
        assert (run_dir / name).exists(), f"{name} missing; stdout: {res.stdout[-2000:]}"
    assert "run folder:" in res.stdout and "siftmoe" in res.stdout
    # the comparison says where its accuracy comes from (measured on the model)
    assert "accuracy: measured on the model" in (run_dir / "comparison.txt").read_text()
    rows = read_rows(run_dir / "comparison.csv")
    policies = [r["policy"] for r in rows]
    assert f"{algo} (final)" in policies and "siftmoe" in policies and "topk" in policies
    sift = next(r for r in rows if r["policy"] == "siftmoe")
    assert float(sift["energy_pct_of_siftmoe"]) == pytest.approx(100.0)
    assert saved_timesteps(run_dir / "final_model.zip") >= budget
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "done"
    assert "train.py" in (run_dir / "command.txt").read_text()
    evals = read_rows(run_dir / "eval" / "eval_log.csv")
    assert [int(float(r["timesteps"])) for r in evals][:2] == [0, 128]


def test_env_kwargs_code_is_rejected(tmp_path):
    marker = tmp_path / "pwned"
    res = run_train(["--env-kwargs", f"__import__('os').system('touch {marker}')", "-n", "64"], tmp_path, timeout=60)
    assert res.returncode == 2
    assert "--env-kwargs" in res.stderr and "literal" in res.stderr
    assert not marker.exists()
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("text", ["[1, 2]", "{'config': {'n_tokens': 4}} if True else 0", "open('x')", "{1: 2}"])
def test_parse_env_kwargs_rejects_non_dicts(text):
    from agents.common import UsageError, parse_env_kwargs

    with pytest.raises(UsageError, match="--env-kwargs"):
        parse_env_kwargs(text)


def test_parse_env_kwargs_accepts_dict_literal():
    from agents.common import parse_env_kwargs

    assert parse_env_kwargs("{'config': {'n_tokens': 8, 'budget': {'scale': 2.0}}}") == {
        "config": {"n_tokens": 8, "budget": {"scale": 2.0}}}
    assert parse_env_kwargs(None) == {}


def test_unknown_env_id_lists_registered_ids(tmp_path):
    res = run_train(["--env", "wide_env/WideMoe-v0", "-n", "64"], tmp_path, timeout=60)
    assert res.returncode == 2
    assert "unknown environment id" in res.stderr
    assert "wide_env/WideMoE-v0" in res.stderr and "wide_env/WideMoE-Mixtral-v0" in res.stderr
    assert "Did you mean" in res.stderr


def test_hyperparams_files_have_defaults():
    from agents.common import load_hyperparams

    for algo in ("ppo", "a2c", "maskable_ppo"):
        hp, source = load_hyperparams(algo, "wide_env/WideMoE-v0")
        assert "policy" in hp and "n_envs" in hp, source
        hp, source = load_hyperparams(algo, "wide_env/WideMoE-Mixtral-v0")
        assert source.endswith(":default") or source.endswith(":wide_env/WideMoE-Mixtral-v0")


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path):
    """SIGKILL after the first checkpoint, resume: the final model exists and counts exactly the budget."""
    budget = 6144  # 48 rollouts of 2 envs x 64 steps
    args = ["--algo", "ppo", "--policy", "mlp", "-n", str(budget), "--eval-freq", "0", "--save-freq", "128",
            "-f", "runs", "--run-name", "k", "--no-compare", *TINY]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, TRAIN, *args], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "runs" / "ppo" / "k"
    latest = run_dir / "checkpoints" / "latest.json"
    deadline = time.time() + 120
    try:
        while not latest.exists():
            assert proc.poll() is None, f"train.py ended before a checkpoint: {proc.stderr.read()[-2000:]}"
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = json.loads(latest.read_text())["num_timesteps"]
    assert 0 < killed_at < budget
    assert not (run_dir / "final_model.zip").exists()
    res = run_train(["--resume", str(run_dir), "--no-compare", "-v", "0"], tmp_path, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "resuming" in res.stdout
    assert saved_timesteps(run_dir / "final_model.zip") == budget
    status = json.loads((run_dir / "status.json").read_text())
    assert status["num_timesteps"] == budget and status["state"] == "done"
    assert len((run_dir / "command.txt").read_text().splitlines()) == 2


@pytest.mark.slow
def test_resume_finished_run_is_a_noop(tmp_path):
    res = run_train(["--policy", "mlp", "-n", "128", "--eval-freq", "0", "--save-freq", "128", "-f", "runs",
                     "--run-name", "d", "--no-compare", *TINY], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    run_dir = tmp_path / "runs" / "ppo" / "d"
    res = run_train(["--resume", str(run_dir), "--no-compare", "-v", "0"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming" in res.stdout
    assert saved_timesteps(run_dir / "final_model.zip") == 128
