"""train.py as a new user meets it (issue 11): presets through every env it builds, the prefill env with the
default policy, the native batched core by default, --resume (fallback, conflicts, new budget,
--no-compare), status.json per checkpoint, hyperparams.yml as used, TensorBoard's final evaluation,
validation before the run folder exists, clear errors for non-WIDE ids and bad seeds."""

from __future__ import annotations

import json
import shutil
import zipfile

import gymnasium as gym
import numpy as np
import pytest
import yaml

import wide_env  # noqa: F401
from test_train import read_rows, run_train, saved_timesteps

SWITCH = ["--env", "wide_env/WideMoE-Switch-v0", "--env-kwargs", "{'config': {'n_tokens': 2}}"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One tiny PPO run on a preset with a user config (Switch: L = 6 decoder layers, K = 1; n_tokens 2), default policy,
    checkpoints at 128 and 256, TensorBoard on; shared by several tests."""
    tmp = tmp_path_factory.mktemp("run")
    args = [*SWITCH, "-n", "256", "--eval-freq", "128", "--save-freq", "128", "-f", "runs", "--run-name", "r",
            "--n-envs", "2", "--eval-episodes", "1", "--num-threads", "1", "-v", "0"]
    res = run_train(args, tmp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return tmp, tmp / "runs" / "ppo" / "r", res


def train_main(args, tmp_path, monkeypatch, capsys):
    """agents.run.main in this process (fast, for the error paths): (exit status, stdout, stderr)."""
    from agents.run import main

    monkeypatch.chdir(tmp_path)
    status = main(args, prog="python train.py")
    out, err = capsys.readouterr()
    return status, out, err


def test_a_preset_with_a_user_config_trains_and_evaluates_on_the_preset(finished_run):
    _, run_dir, _ = finished_run
    env_config = json.loads((run_dir / "env_config.json").read_text())
    assert env_config["profile"] == "switch-base-8" and env_config["n_tokens"] == 2
    rows = read_rows(run_dir / "comparison.csv")  # the probe env, the training VecEnv and the evaluations agree
    assert {r["policy"] for r in rows} >= {"ppo (final)", "siftmoe", "topk"}
    assert {int(r["n_layers"]) for r in rows} == {6} and {int(r["top_k"]) for r in rows} == {1}


def test_native_core_is_the_default_and_hyperparams_record_what_was_used(finished_run):
    _, run_dir, _ = finished_run
    cfg = yaml.safe_load((run_dir / "config.yml").read_text())
    hp = yaml.safe_load((run_dir / "hyperparams.yml").read_text())
    assert cfg["vec_env"] == "native"
    # the YAML says n_timesteps 122880 and n_envs 8; the run used 256 and 2
    assert hp["n_timesteps"] == cfg["n_timesteps"] == 256 == saved_timesteps(run_dir / "final_model.zip")
    assert hp["n_envs"] == 2 and hp["vec_env"] == "native"


def test_demo_budget_is_recorded_in_hyperparams():
    from agents.run_config import build_parser, resolve_config

    cfg = resolve_config(build_parser().parse_args(["--demo"]))
    assert cfg["n_timesteps"] == cfg["hyperparams"]["n_timesteps"] == 51200


def test_final_evaluation_reaches_tensorboard(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, _ = finished_run
    (events,) = (run_dir / "tb").glob("tb_*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    logged = [(e.step, e.value) for e in acc.Scalars("eval/reward_per_step")]
    evals = [(int(float(r["timesteps"])), float(r["reward_per_step"])) for r in read_rows(run_dir / "eval" / "eval_log.csv")]
    # every evaluation at its own step, the one after the last update (256) included
    assert [s for s, _ in logged] == [s for s, _ in evals] == [0, 128, 256]
    np.testing.assert_allclose([v for _, v in logged], [v for _, v in evals], rtol=1e-6)


def test_status_json_follows_each_checkpoint(tmp_path):
    from agents.callbacks import CheckpointEvalCallback

    class Model:  # what save_checkpoint uses of an SB3 model
        num_timesteps = 128

        def save(self, path):
            with zipfile.ZipFile(path, "w") as zf:
                zf.writestr("data", "{}")

    cb = CheckpointEvalCallback(tmp_path, lambda m: {}, eval_freq=0, save_freq=128, verbose=0, budget=512)
    cb.model = Model()
    cb.save_checkpoint()
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "running" and status["num_timesteps"] == 128 and status["n_timesteps"] == 512


def test_resume_rejects_conflicting_options(finished_run, monkeypatch, capsys):
    tmp, run_dir, _ = finished_run
    status, _, err = train_main(["--resume", str(run_dir), "--seed", "3", "--env", "wide_env/WideMoE-v0", "--algo",
                                 "a2c", "-v", "0"], tmp, monkeypatch, capsys)
    assert status == 2
    for option in ("--seed 3", "--env 'wide_env/WideMoE-v0'", "--algo 'a2c'", "-n/--n-timesteps"):
        assert option in err, err
    from agents.run_config import build_parser, resume_config as _resume_config

    same = build_parser().parse_args(["--resume", str(run_dir), "--seed", "0", *SWITCH])  # the run's own values
    assert _resume_config(same, run_dir)["seed"] == 0


def test_resume_falls_back_to_an_intact_checkpoint_takes_a_new_budget_and_honours_no_compare(finished_run):
    tmp, run_dir, _ = finished_run
    copy = run_dir.parent / "r_copy"
    shutil.copytree(run_dir, copy)
    newest = copy / "checkpoints" / "model_256_steps.zip"
    newest.write_bytes(newest.read_bytes()[:300])  # truncated by a crash or a full disk
    comparison = (copy / "comparison.csv").read_text()
    res = run_train(["--resume", str(copy), "-n", "384", "--no-compare", "-v", "0"], tmp)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "model_256_steps.zip does not load" in res.stdout
    assert "resuming from the older intact checkpoint" in res.stdout and "model_128_steps.zip" in res.stdout
    assert "new total budget 384" in res.stdout
    assert saved_timesteps(copy / "final_model.zip") == 384
    assert "% of SiftMoE energy" not in res.stdout and (copy / "comparison.csv").read_text() == comparison
    cfg = yaml.safe_load((copy / "config.yml").read_text())
    assert cfg["n_timesteps"] == 384 == yaml.safe_load((copy / "hyperparams.yml").read_text())["n_timesteps"]
    assert json.loads((copy / "status.json").read_text())["num_timesteps"] == 384


def test_bad_config_is_rejected_before_the_run_folder_exists(tmp_path, monkeypatch, capsys):
    status, _, err = train_main(["--env-kwargs", "{'config': {'budget': {'scale': 0}}}", "-n", "64"], tmp_path,
                                monkeypatch, capsys)
    assert status == 2
    assert "'budget.scale' = 0" in err and "ConfigError" in err
    assert not (tmp_path / "runs").exists()


def test_non_wide_env_and_bad_seed_get_clear_messages(tmp_path, monkeypatch, capsys):
    status, _, err = train_main(["--env", "CartPole-v1", "-n", "64"], tmp_path, monkeypatch, capsys)
    assert status == 2 and "'CartPole-v1' is not a WIDE environment" in err and "wide_env/WideMoE-v0" in err
    status, _, err = train_main(["--seed", "-1", "-n", "64"], tmp_path, monkeypatch, capsys)
    assert status == 2 and "--seed must be an integer in [0, 2147483647], got -1" in err
    assert not (tmp_path / "runs").exists()


def test_prefill_env_trains_with_the_default_policy(tmp_path):
    res = run_train(["--env", "wide_env/WideMoEPrefill-v0", "-n", "128", "--eval-freq", "0", "--save-freq", "0",
                     "-f", "runs", "--run-name", "p", "--n-envs", "2", "--eval-episodes", "1", "--num-threads", "1",
                     "-v", "0", "-tb", "none"], tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "has no batched core" not in res.stdout  # prefill has its native vector env too
    run_dir = tmp_path / "runs" / "ppo" / "p"
    cfg = yaml.safe_load((run_dir / "config.yml").read_text())
    assert cfg["vec_env"] == "native" and cfg["hyperparams"]["policy"] == "expert_set"
    policies = [r["policy"] for r in read_rows(run_dir / "comparison.csv")]
    assert policies[:1] == ["ppo (final)"] and "siftmoe" in policies


@pytest.mark.parametrize("kind", ["dummy", "subproc", "native"])
def test_every_vec_env_kind_keeps_the_preset_under_a_user_config(kind):
    from agents.common import make_vec_env

    venv = make_vec_env("wide_env/WideMoE-Stragglers-v0", {"config": {"n_tokens": 3}}, 2, 0, kind)
    try:
        for config in venv.get_attr("config"):
            assert config.compute.queue_delay_mean_s == 0.002 and config.n_tokens == 3
    finally:
        venv.close()


def test_prefill_masks_from_the_observation_match_the_env():
    from baselines.observation import action_masks

    env = gym.make("wide_env/WideMoEPrefill-v0", config={"compute": {"queue_delay_mean_s": 0.01, "queue_persistence": 0.9}},
                   n_prompts=3)  # persistent backlogs: some helpers are known to be too late
    obs, _ = env.reset(seed=2)
    seen = 0
    for _ in range(12):
        mask = env.unwrapped.action_masks()
        np.testing.assert_array_equal(action_masks(obs, env.unwrapped.problem), mask)
        seen += int((~mask[1::2]).sum())
        obs, _, _, trunc, _ = env.step(env.action_space.sample())
        if trunc:
            obs, _ = env.reset()
    assert seen > 0
