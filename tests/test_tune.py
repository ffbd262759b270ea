"""Ray Tune sweeps and Ray evaluation sweeps on a two-node local cluster (skipped without ``.[ray]``).

The cluster (``ray.cluster_utils.Cluster``) has two 1-CPU nodes; sweeps run as ``python -m agents.tune
--address ...`` subprocesses (the way a user joins a running cluster), so one can be interrupted."""

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

pytest.importorskip("ray.tune")

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--n-envs", "2", "--eval-episodes", "1", "--env-kwargs", "{'config': {'n_tokens': 4}}", "-v", "0",
         "-tb", "none", "--eval-freq", "128", "--save-freq", "128"]
SPACE = "ppo:\n  learning_rate: {low: 1.0e-4, high: 1.0e-3, log: true, grid: [1.0e-4, 1.0e-3]}\n"
MB = 2 ** 20


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "object_store_memory": 80 * MB, "include_dashboard": False}
    c = Cluster(initialize_head=True, connect=False, head_node_args=node)
    c.add_node(num_cpus=1, object_store_memory=80 * MB)
    c.wait_for_nodes()
    yield c
    c.shutdown()


def tune_cmd(cluster, storage, name, *extra):
    return [sys.executable, "-m", "agents.tune", "--address", cluster.address, "--storage-path", str(storage),
            "--name", name, *extra]


def env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", RAY_DEDUP_LOGS="0")


def saved_timesteps(zip_path) -> int:
    with zipfile.ZipFile(zip_path) as zf:
        return int(json.loads(zf.read("data"))["num_timesteps"])


def tune_results(exp_dir: Path) -> dict[str, list[dict]]:
    """trial folder -> the results Tune recorded (one per report)."""
    out = {}
    for path in exp_dir.glob("*/result.json"):
        out[path.parent.name] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def test_two_node_sweep(cluster, tmp_path):
    space = tmp_path / "space.yml"
    space.write_text(SPACE)
    cmd = tune_cmd(cluster, tmp_path / "sweeps", "two", "--search", "grid", "--scheduler", "fifo",
                   "--space-file", str(space), "-n", "256", *SMALL)
    res = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    exp = tmp_path / "sweeps" / "two"
    runs = sorted((exp / "runs" / "ppo").iterdir())
    runs = [r for r in runs if r.is_dir()]
    assert len(runs) == 2
    for run in runs:
        evals = list(csv.DictReader(open(run / "eval" / "eval_log.csv")))
        assert [int(float(r["timesteps"])) for r in evals] == [0, 128, 256]
        assert saved_timesteps(run / "final_model.zip") == 256
        assert (run / "comparison.csv").exists()
        assert "--run-name" in (run / "command.txt").read_text()  # an ordinary, reproducible train.py command
    results = tune_results(exp)
    assert len(results) == 2
    # every evaluation was reported (what ASHA needs), with the SiftMoE-relative columns
    for rows in results.values():
        assert [r["timesteps"] for r in rows] == [0, 128, 256]
        assert all(r["energy_pct_of_siftmoe"] > 0 and "violation_rate_above_siftmoe" in r for r in rows)
        assert any(k.startswith("accuracy_") for k in rows[-1])
    nodes = {rows[0]["node_id"] for rows in results.values()}
    assert len(nodes) == 2, f"both trials ran on one node: {nodes}"
    table = (exp / "best_trials.txt").read_text()
    assert "siftmoe" in table and "topk" in table and "learning_rate" in table
    best = list(csv.DictReader(open(exp / "best_trials.csv")))
    assert {r["trial"] for r in best} >= {"siftmoe", "topk"} and sum(r["state"] == "done" for r in best) == 2


def test_optuna_search_with_asha(cluster, tmp_path):
    """--search optuna: Optuna's sampler inside Tune (ray's OptunaSearch), ASHA on the timesteps axis."""
    space = tmp_path / "space.yml"
    space.write_text("ppo:\n  learning_rate: {low: 1.0e-4, high: 1.0e-3, log: true}\n  n_epochs: {values: [1, 2]}\n")
    cmd = tune_cmd(cluster, tmp_path / "sweeps", "tpe", "--search", "optuna", "--num-samples", "2",
                   "--search-seed", "0", "--space-file", str(space), "-n", "256", *SMALL)
    res = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    exp = tmp_path / "sweeps" / "tpe"
    settings = json.loads((exp / "sweep.json").read_text())
    assert settings["search"] == "optuna" and settings["scheduler"] == "asha" and settings["grace_period"] == 128
    configs = [json.loads((p.parent / "params.json").read_text()) for p in exp.glob("*/result.json")]
    assert len(configs) == 2 and configs[0] != configs[1]
    for c in configs:
        assert 1e-4 <= c["learning_rate"] <= 1e-3 and c["n_epochs"] in (1, 2)
    # a trial that reaches the full budget finishes its run (ASHA stops trials at max_t at once)
    finished = [rows[-1]["run_dir"] for rows in tune_results(exp).values() if rows[-1]["timesteps"] == 256]
    assert finished
    for run in map(Path, finished):
        assert (run / "comparison.csv").exists()
        assert json.loads((run / "status.json").read_text())["state"] == "done"
    assert "siftmoe" in (exp / "best_trials.txt").read_text()


def test_interrupted_sweep_restores_to_full_budget(cluster, tmp_path):
    budget, every = 8192, 512  # 64 rollouts of 2 envs x 64 steps: long enough to interrupt
    space = tmp_path / "space.yml"
    space.write_text(SPACE)
    storage = tmp_path / "sweeps"
    cmd = tune_cmd(cluster, storage, "int", "--search", "grid", "--scheduler", "fifo", "--space-file", str(space),
                   "-n", str(budget), *SMALL, "--eval-freq", str(every), "--save-freq", str(every))
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=log, stderr=subprocess.STDOUT)
    exp = storage / "int"
    deadline = time.time() + 300
    try:
        # a run's first evaluation row is written when it is reported to Tune
        while not any(p.stat().st_size > 0 for p in exp.glob("runs/ppo/*/eval/eval_log.csv")):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            assert time.time() < deadline, "no report within 300 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves its state and stops the trials
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    runs = [r for r in (exp / "runs" / "ppo").iterdir() if r.is_dir()]
    assert runs and not any((r / "final_model.zip").exists() for r in runs), "a trial finished before the interrupt"
    res = subprocess.run(tune_cmd(cluster, storage, "int", "--restore"), cwd=tmp_path, env=env(),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    runs = [r for r in (exp / "runs" / "ppo").iterdir() if r.is_dir()]
    assert len(runs) == 2
    resumed = 0
    for run in runs:
        assert saved_timesteps(run / "final_model.zip") == budget
        assert json.loads((run / "status.json").read_text())["state"] == "done"
        steps = [int(float(r["timesteps"])) for r in csv.DictReader(open(run / "eval" / "eval_log.csv"))]
        assert steps == list(range(0, budget + 1, every))
        resumed += len((run / "command.txt").read_text().splitlines()) == 2  # started, then --resume
    assert resumed >= 1
    assert "siftmoe" in (exp / "best_trials.txt").read_text()


def test_ray_evaluation_equals_local(cluster, tmp_path):
    """``baselines.evaluate --ray`` writes the numbers of a local run (episodes spread over both nodes)."""
    common = ["--policies", "topk,siftmoe", "--episodes", "3", "--seed", "5", "--budget-scales", "0.5,2",
              "--env-kwargs", "{'config': {'n_tokens': 4}}", "--no-progress"]
    local = subprocess.run([sys.executable, "-m", "baselines.evaluate", *common, "--out", str(tmp_path / "local"),
                            "--env", "wide_env/WideMoE-v0"], cwd=tmp_path, env=env(), capture_output=True, text=True,
                           timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    dist = subprocess.run([sys.executable, "-m", "baselines.evaluate", *common, "--out", str(tmp_path / "ray"),
                           "--env", "wide_env/WideMoE-v0,wide_env/WideMoE-Stragglers-v0", "--ray",
                           "--address", cluster.address, "--chunk-episodes", "2"],
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert dist.returncode == 0, dist.stdout[-3000:] + dist.stderr[-3000:]
    for name in ("results.csv", "episodes.csv"):
        a = list(csv.DictReader(open(tmp_path / "local" / name)))
        b = list(csv.DictReader(open(tmp_path / "ray" / "wide_env-WideMoE-v0" / name)))
        assert len(a) == len(b) > 0
        for ra, rb in zip(a, b):
            assert ra.keys() == rb.keys()
            differ = {k for k in ra if ra[k] != rb[k]} - {"decision_time_us", "decision_s"}
            assert not differ, f"{name}: {differ} differ: {[(ra[k], rb[k]) for k in differ]}"
    assert (tmp_path / "ray" / "wide_env-WideMoE-v0" / "tradeoff.png").exists()
    stragglers = list(csv.DictReader(open(tmp_path / "ray" / "wide_env-WideMoE-Stragglers-v0" / "results.csv")))
    assert [(r["policy"], float(r["budget_scale"])) for r in stragglers] == [
        ("topk", 0.5), ("siftmoe", 0.5), ("topk", 2.0), ("siftmoe", 2.0)]


def test_usage_errors_before_ray_starts(tmp_path, capsys):
    from agents.tune import main

    storage = ["--storage-path", str(tmp_path)]
    assert main([*storage, "--run-name", "x"]) == 2
    assert "set by the sweep" in capsys.readouterr().err
    assert main([*storage, "--name", "none", "--restore"]) == 2
    assert "nothing to restore" in capsys.readouterr().err
    assert main([*storage, "--space", "nope"]) == 2
    assert "no search space 'nope'" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "sweep.json").write_text("{}")
    assert main([*storage, "--name", "taken", "-n", "128"]) == 2
    assert "--restore --name taken" in capsys.readouterr().err
