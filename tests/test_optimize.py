"""``train.py --optimize``: Optuna alone (skipped without optuna), two trials in two worker processes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna")

ROOT = Path(__file__).resolve().parents[1]


def test_optuna_two_trials(tmp_path):
    space = tmp_path / "space.yml"
    space.write_text("ppo:\n  learning_rate: {low: 1.0e-4, high: 1.0e-3, log: true}\n  n_epochs: {values: [1, 2]}\n")
    cmd = [sys.executable, str(ROOT / "train.py"), "--optimize", "--n-trials", "2", "--n-jobs", "2", "-f", "runs",
           "--space-file", str(space), "--search-seed", "0", "-n", "256", "--n-envs", "2", "--eval-episodes", "1",
           "--eval-freq", "128", "--save-freq", "128", "--env-kwargs", "{'config': {'n_tokens': 4}}", "-v", "0",
           "-tb", "none"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    study_dir = tmp_path / "runs" / "optuna" / "ppo_wide_env-WideMoE-v0"
    study = optuna.load_study(study_name="ppo_wide_env-WideMoE-v0", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(study_dir / "study.journal"))))
    trials = study.trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert trials[0].params != trials[1].params  # the two workers sample differently
    for t in trials:
        run = study_dir / "runs" / "ppo" / f"trial_{t.number}"
        assert sorted(t.intermediate_values) == [0, 128, 256]  # every evaluation reported
        cfg = yaml.safe_load((run / "config.yml").read_text())
        assert cfg["hyperparams"]["policy"] == "expert_set"  # the project's policy, not rl-zoo3's default MLP
        assert cfg["hyperparams"]["learning_rate"] == pytest.approx(t.params["learning_rate"])
        rows = {r["policy"]: r for r in csv.DictReader(open(run / "comparison.csv"))}
        assert {"ppo (final)", "siftmoe", "topk"} <= set(rows)  # the SiftMoE comparison is kept
        assert t.value == pytest.approx(float(rows["ppo (final)"]["reward_per_step"]))
    best = list(csv.DictReader(open(study_dir / "best_trials.csv")))
    assert [r["trial"] for r in best][-2:] == ["siftmoe", "topk"]
    assert "% SiftMoE" in res.stdout
