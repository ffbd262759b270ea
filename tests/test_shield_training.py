"""train.py's shield option (agents/shielding.py): training VecEnvs and evaluations under the deviation shield."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from agents.common import UsageError, make_vec_env
from agents.shielding import ShieldedPolicy, shield_setting, shielded_factory

TOKEN_ENV = {"config": {"n_tokens": 3, "budget": {"mode": "token"}}}


def _random_rollout(venv, steps: int, seed: int) -> tuple[int, int]:
    """(violations, steps) of random actions on an SB3 VecEnv."""
    rng = np.random.default_rng(seed)
    venv.reset()
    violated = 0
    n = venv.action_space.n
    for _ in range(steps):
        _, _, _, infos = venv.step(rng.integers(0, 2, (venv.num_envs, n), dtype=np.int8))
        violated += sum(int(info["budget_violated"]) for info in infos)
    return violated, steps * venv.num_envs


@pytest.mark.parametrize("kind", ["native", "dummy"])
def test_shielded_training_vec_envs_never_violate(kind):
    steps = 3 * 4 + 5  # past an episode end (autoreset)
    bare = make_vec_env("wide_env/WideMoE-v0", TOKEN_ENV, 3, seed=1, kind=kind)
    assert _random_rollout(bare, steps, 1)[0] > 0  # random actions violate: the check can fail
    shielded = make_vec_env("wide_env/WideMoE-v0", TOKEN_ENV, 3, seed=1, kind=kind, shield=True)
    assert _random_rollout(shielded, steps, 1)[0] == 0


def test_shielded_policy_in_the_evaluation_path():
    from baselines.rollout import evaluate_policies

    rng = np.random.default_rng(0)

    def random_policy(obs):
        batch = np.asarray(obs["gate_probs"]).shape[:-1]
        return rng.integers(0, 2, batch + (8,), dtype=np.int8)

    rows = evaluate_policies("wide_env/WideMoE-v0", [("random", random_policy),
                                                     ("shielded", shielded_factory(random_policy))],
                             episodes=3, seed=0, env_kwargs=TOKEN_ENV, progress=False, accuracy="rule")
    by = {r["policy"]: r for r in rows}
    assert by["random"]["violation_rate"] > 0
    assert by["shielded"]["violation_rate"] == 0


def test_shielded_policy_keeps_single_env_shapes():
    import gymnasium as gym

    env = gym.make("wide_env/WideMoE-v0", config={"n_tokens": 2, "budget": {"mode": "token"}})
    obs, _ = env.reset(seed=0)
    policy = ShieldedPolicy(lambda o: np.zeros(8, dtype=np.int8), env)
    action = policy(obs)
    assert action.shape == (8,) and action.dtype == np.int8
    _, _, _, _, info = env.step(action)
    assert info["budget_violated"] == 0


def test_shield_setting_must_be_a_bool():
    assert shield_setting(True) is True
    with pytest.raises(ValueError, match="shield must be true or false"):
        shield_setting("yes", "ppo.yml")


def test_train_rejects_a_non_bool_shield_and_resuming_into_it(tmp_path):
    from agents.run_config import check_hyperparams, resume_config

    with pytest.raises(UsageError, match="shield must be true or false"):
        check_hyperparams({"shield": "yes"}, "my.yml", "ppo", None)
    (tmp_path / "config.yml").write_text("algo: ppo\nhyperparams: {n_envs: 2}\n")
    args = argparse.Namespace(algo=None, env=None, env_kwargs=None, seed=None, n_envs=None, vec_env=None,
                              eval_freq=None, eval_episodes=None, eval_seed=None, save_freq=None,
                              tensorboard_log=None, conf_file=None, policy=None, log_folder=None, run_name=None,
                              demo=False, shield=True)
    with pytest.raises(UsageError, match="--shield"):
        resume_config(args, tmp_path)


@pytest.mark.slow
def test_train_with_shield_end_to_end(tmp_path):
    from tests.test_train import TINY, read_rows, run_train

    env = "{'config': {'n_tokens': 4, 'budget': {'mode': 'token'}}}"
    args = [a if a != "{'config': {'n_tokens': 4}}" else env for a in TINY]
    res = run_train(["--algo", "ppo", "--policy", "mlp", "-n", "256", "--eval-freq", "128", "--save-freq", "128",
                     "-f", "runs", "--run-name", "s", "--shield", *args], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run_dir = tmp_path / "runs" / "ppo" / "s"
    assert "shield: true" in (run_dir / "config.yml").read_text()
    rows = {r["policy"]: r for r in read_rows(run_dir / "comparison.csv")}
    assert float(rows["ppo (final, shielded)"]["violation_rate"]) == 0.0
    assert all(float(r["violation_rate"]) == 0.0 for r in read_rows(run_dir / "eval" / "eval_log.csv"))
