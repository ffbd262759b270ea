"""train.py, --optimize and agents.tune on the bad inputs of issue 21: a budget below what a resumed run has done
(item 7), a --run-name outside the log folder (8), the training time of every segment (9), a bogus --storage (12),
hyperparameters and policies checked before the run folder exists (13), a bogus --metric before Ray (19)."""

from __future__ import annotations

import json
import re
import shutil

import pytest

import wide_env  # noqa: F401
from test_train import TINY, run_train, saved_timesteps
from test_train_cli import train_main


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A finished 256-step PPO run (checkpoints at 128 and 256), shared by the resume tests."""
    tmp = tmp_path_factory.mktemp("short")
    res = run_train(["--policy", "mlp", "-n", "256", "--eval-freq", "0", "--save-freq", "128", "-f", "runs",
                     "--run-name", "s", "--no-compare", *TINY], tmp)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return tmp, tmp / "runs" / "ppo" / "s"


def _copy(run_dir, name):
    copy = run_dir.parent / name
    shutil.copytree(run_dir, copy)
    return copy


def test_resume_with_a_budget_below_the_trained_steps_is_a_usage_error(short_run, monkeypatch, capsys):
    tmp, run_dir = short_run
    copy = _copy(run_dir, "below")
    before = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()}
    status, _, err = train_main(["--resume", str(copy), "-n", "128", "-v", "0"], tmp, monkeypatch, capsys)
    assert status == 2
    assert f"--resume {copy} -n 128: the run has already trained 256 timesteps (checkpoint model_256_steps.zip)" in err
    assert "-n/--n-timesteps is the new total budget, not additional steps: pass -n 256 or more" in err
    # nothing was written: status.json still says done with 256 of 256, command.txt has one line
    assert {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()} == before
    status_json = json.loads((copy / "status.json").read_text())
    assert status_json["state"] == "done" and status_json["num_timesteps"] == status_json["n_timesteps"] == 256


def test_train_time_counts_every_segment_after_a_resume(short_run):
    tmp, run_dir = short_run
    copy = _copy(run_dir, "segments")
    first = json.loads((copy / "status.json").read_text())
    at_checkpoint = json.loads((copy / "checkpoints" / "latest.json").read_text())
    assert at_checkpoint["num_timesteps"] == 256 and at_checkpoint["wall_s"] >= first["train_s"] - 0.01
    res = run_train(["--resume", str(copy), "-n", "384", "--no-compare", "-v", "0"], tmp)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert saved_timesteps(copy / "final_model.zip") == 384
    status = json.loads((copy / "status.json").read_text())
    assert status["train_s"] == pytest.approx(at_checkpoint["wall_s"] + status["segment_s"], abs=0.02)
    assert status["train_cpu_s"] >= at_checkpoint["cpu_s"] > 0
    assert status["train_s"] > status["segment_s"] > 0
    line = re.search(r"trained 384 timesteps in (\d+) s \((\d+) CPU-s; this segment (\d+) s\)", res.stdout)
    assert line, res.stdout[-2000:]
    assert int(line.group(1)) == round(status["train_s"]) and int(line.group(3)) == round(status["segment_s"])


def test_an_older_checkpoint_brings_its_own_training_time(short_run):
    from agents.callbacks import checkpoints_newest_first

    _, run_dir = short_run
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    older = checkpoints_newest_first(run_dir)[1]
    assert older["num_timesteps"] == 128
    assert older["wall_s"] == latest["times"]["128"]["wall_s"] <= latest["wall_s"]
    assert older["cpu_s"] == latest["times"]["128"]["cpu_s"] <= latest["cpu_s"]


@pytest.mark.parametrize("name", ["../../x", "../x", "/tmp/x", "a/b", "..", ".", ""])
def test_run_name_stays_inside_the_log_folder(tmp_path, monkeypatch, capsys, name):
    work = tmp_path / "w"
    work.mkdir()
    status, _, err = train_main(["--run-name", name, "-n", "64"], work, monkeypatch, capsys)
    assert status == 2
    assert f"--run-name {name!r} must be a single folder name inside LOG_FOLDER/ALGO" in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["w"]
    from agents.common import UsageError
    from agents.training import new_run_dir

    with pytest.raises(UsageError, match="--run-name"):
        new_run_dir(str(work / "runs"), "ppo", "wide_env/WideMoE-v0", name)


BAD_HYPERPARAMS = [
    (["--policy", "foo"], None, "--policy 'foo' is not a policy; choose one of expert_set, mlp, MultiInputPolicy"),
    ([], "learning_rat: 0.001\n", "unknown hyperparameter 'learning_rat'"),
    ([], "n_steps: -5\n", "n_steps must be a whole number >= 1, got -5"),
    ([], "render_mode: human\n", "unknown hyperparameter 'render_mode'"),
    ([], "policy: CnnPolicyy\n", "policy 'CnnPolicyy' is not a policy"),
    ([], "seed: 3\n", "'seed' is set by --seed, not by the hyperparameter file"),
    ([], "default:\n  policy_kwargs: {hiddn: 3}\n", "do not build a PPO model: TypeError"),
    ([], "batch_size: 0.5\n", "batch_size must be a whole number >= 1, got 0.5"),
]


@pytest.mark.parametrize("flags,conf,message", BAD_HYPERPARAMS)
def test_bad_hyperparameters_are_rejected_before_the_run_folder_exists(tmp_path, monkeypatch, capsys, flags, conf,
                                                                       message):
    argv = [*flags, "-n", "64", "--env-kwargs", "{'config': {'n_tokens': 2}}"]
    if conf is not None:
        (tmp_path / "hp.yml").write_text(conf)
        argv += ["--conf-file", "hp.yml"]
    status, _, err = train_main(argv, tmp_path, monkeypatch, capsys)
    assert status == 2 and message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # no run folder, no run number used up


def test_bogus_optuna_storage_is_a_usage_error_before_any_folder(tmp_path, capsys):
    from agents.optimize import main

    assert main(["--storage", "bogus://x", "-f", str(tmp_path / "runs"), "--n-trials", "1", "-n", "64"]) == 2
    err = capsys.readouterr().err
    assert "--storage 'bogus://x' is not a database URL Optuna can use" in err and "sqlite:///" in err
    assert not (tmp_path / "runs").exists()


def test_bogus_metric_fails_before_ray_or_optuna_start(tmp_path, capsys):
    from agents.optimize import main as optimize_main
    from agents.tune import main as tune_main

    assert tune_main(["--storage-path", str(tmp_path / "tune"), "--metric", "reward_per_stepp", "-n", "128"]) == 2
    err = capsys.readouterr().err
    assert "--metric 'reward_per_stepp' is not a reported evaluation column. Did you mean 'reward_per_step'?" in err
    assert "energy_pct_of_siftmoe" in err and "accuracy_correct" in err
    import sys

    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    assert not (tmp_path / "tune").exists()
    assert optimize_main(["--metric", "bogus", "-f", str(tmp_path / "runs"), "-n", "64"]) == 2
    assert "--metric 'bogus' is not a reported evaluation column" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_resume_runs_no_code_from_a_crafted_checkpoint(short_run):
    from test_agents_inputs import _craft

    tmp, run_dir = short_run
    copy = _copy(run_dir, "crafted")
    newest = copy / "checkpoints" / "model_256_steps.zip"
    marker = tmp / "pwned-by-checkpoint.txt"
    _craft(newest, tmp / "crafted.zip", marker)
    shutil.move(tmp / "crafted.zip", newest)
    res = run_train(["--resume", str(copy), "-n", "384", "--no-compare", "-v", "0"], tmp)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert not marker.exists()
    assert f"from {newest} at 256 of 384 timesteps" in res.stdout and "does not load" not in res.stdout
    assert saved_timesteps(copy / "final_model.zip") == 384


def test_a_resumed_model_gets_the_runs_own_schedules():
    from stable_baselines3 import A2C, PPO

    from agents.common import split_hyperparams
    from agents.training import run_schedules

    _, kwargs = split_hyperparams({"learning_rate": "lin_1e-3", "clip_range": 0.3, "n_steps": 64})
    schedules = run_schedules(PPO, kwargs)
    assert schedules["learning_rate"](0.5) == pytest.approx(5e-4)
    assert schedules["lr_schedule"](0.5) == pytest.approx(5e-4)
    assert schedules["clip_range"] == 0.3 and schedules["clip_range_vf"] is None
    defaults = run_schedules(A2C, {})
    assert defaults["learning_rate"] == 7e-4 and "clip_range" not in defaults
