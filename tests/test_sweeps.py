"""Sweep plumbing that needs no engine: search spaces, trial command lines, and early stop + resume of a run."""

from __future__ import annotations

import ast
import importlib.util
import json
import zipfile
from pathlib import Path

import pytest
import yaml

from agents.common import UsageError
from agents.search_space import Param, load_space, optuna_grid, split_sample
from agents.trials import SWEEP_OWNED_FLAGS, parse_train_args, resume_flags, run_trial, trial_argv

SMALL = ["--policy", "mlp", "--n-envs", "2", "--eval-episodes", "1", "--env-kwargs", "{'config': {'n_tokens': 4}}",
         "-v", "0", "-tb", "none", "--eval-freq", "128", "--save-freq", "128", "--no-compare"]


def test_shipped_spaces_load():
    for name in ("ppo", "a2c", "maskable_ppo", "seeds-budgets"):
        space = load_space(name)
        assert space and all(isinstance(p, Param) for p in space.values())
    grid = optuna_grid(load_space("seeds-budgets"))
    assert grid["seed"] == [0, 1, 2, 3, 4] and len(grid["env"]) == 2


@pytest.mark.parametrize("spec,match", [
    ({"values": [1, 2], "low": 1, "high": 2}, "not both"),
    ({"low": 1.0}, "both 'low' and 'high'"),
    ({"low": 0.0, "high": 1.0, "log": True}, "low > 0"),
    ({"low": 2.0, "high": 1.0}, "low < high"),
    ({"values": []}, "non-empty"),
    ({"values": [[64, 64]]}, "numbers, strings or booleans"),
    ({"lo": 1, "hi": 2}, "unknown keys"),
    ({}, "give 'values"),
    (3, "expected a mapping"),
])
def test_bad_parameters_name_the_field(spec, match):
    with pytest.raises(UsageError, match=match) as info:
        Param.from_dict("learning_rate", spec)
    assert "learning_rate" in str(info.value)


def test_unknown_space_lists_the_names(tmp_path):
    path = tmp_path / "s.yml"
    path.write_text("ppo:\n  gamma: {values: [0.0, 0.9]}\n")
    with pytest.raises(UsageError, match=r"no search space 'a2c'.*\['ppo'\]"):
        load_space("a2c", path)


def test_split_sample_routes_run_settings_and_nested_hyperparameters():
    run, hyper = split_sample({"seed": 3, "env": "wide_env/WideMoE-Stragglers-v0", "env_kwargs.config.budget.scale": 2.0,
                               "learning_rate": 1e-3, "policy_kwargs.expert_set.hidden": 64})
    assert run == {"seed": 3, "env": "wide_env/WideMoE-Stragglers-v0", "env_kwargs": {"config": {"budget": {"scale": 2.0}}}}
    assert hyper == {"learning_rate": 1e-3, "policy_kwargs": {"expert_set": {"hidden": 64}}}


def test_trial_argv_is_a_reproducible_train_command(tmp_path):
    argv = trial_argv(SMALL, {"seed": 7, "env_kwargs.config.budget.scale": 2.0, "learning_rate": 1e-3,
                              "policy_kwargs.mlp.net_arch": 32}, tmp_path, "t1")
    args = parse_train_args([a for a in argv if a not in ("-f", str(tmp_path), "--run-name", "t1")])
    assert args.seed == 7
    assert ast.literal_eval(args.env_kwargs) == {"config": {"n_tokens": 4, "budget": {"scale": 2.0}}}
    conf = yaml.safe_load(Path(args.conf_file).read_text())["default"]
    assert conf["learning_rate"] == 1e-3 and conf["policy_kwargs"]["mlp"]["net_arch"] == 32
    assert conf["policy_kwargs"]["expert_set"]["hidden"] == 32  # the YAML's other values are kept
    assert argv[-4:] == ["-f", str(tmp_path), "--run-name", "t1"]


@pytest.mark.parametrize("flag", SWEEP_OWNED_FLAGS)
def test_sweep_owned_flags_are_rejected(flag):
    with pytest.raises(UsageError, match="set by the sweep"):
        parse_train_args([flag, "x"])


def test_resume_flags_keep_only_what_resume_uses():
    assert resume_flags(["-n", "64", "-v", "0", "--no-compare", "--seed", "3", "--num-threads=1"]) == [
        "-v", "0", "--no-compare", "--num-threads=1"]


def _timesteps(zip_path) -> int:
    with zipfile.ZipFile(zip_path) as zf:
        return int(json.loads(zf.read("data"))["num_timesteps"])


def test_pruned_trial_stops_then_resumes_to_full_budget(tmp_path):
    """A listener that asks to stop after the evaluation at 256 steps: the run stops there (status
    'stopped', no final model), and running the trial again resumes it to the full budget."""
    reports = []

    def stop_at_256(metrics):
        reports.append(metrics)
        return metrics["timesteps"] == 256

    run_dir = run_trial(["-n", "512", *SMALL], {"learning_rate": 1e-3}, tmp_path, "p", stop_at_256)
    assert [r["timesteps"] for r in reports] == [0, 128, 256]
    assert all("energy_pct_of_siftmoe" in r and r["run_dir"] == str(run_dir) for r in reports)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "stopped" and 256 <= status["num_timesteps"] < 512
    assert not (run_dir / "final_model.zip").exists()
    reports.clear()
    again = run_trial(["-n", "512", *SMALL], {"learning_rate": 1e-3}, tmp_path, "p", lambda m: reports.append(m))
    assert again == run_dir
    assert _timesteps(run_dir / "final_model.zip") == 512
    assert json.loads((run_dir / "status.json").read_text())["state"] == "done"
    assert [r["timesteps"] for r in reports][-1] == 512
    assert len((run_dir / "command.txt").read_text().splitlines()) == 2


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="Ray is installed")
def test_without_ray_the_commands_say_what_to_install(tmp_path):
    from agents.tune import main as tune_main
    from baselines.evaluate import main as evaluate_main

    assert tune_main(["-n", "64"]) == 2
    with pytest.raises(SystemExit, match=r"pip install -e '\.\[ray\]'"):
        evaluate_main(["--ray", "--out", str(tmp_path)])
