"""Library code sets no process-wide torch thread count (issue 22, item 1): the agents' torch calls run on one
thread inside a local limit that restores the caller's setting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import pytest

import wide_env  # noqa: F401  (registers the ids)

ROOT = Path(__file__).resolve().parents[1]


def test_importing_the_libraries_keeps_the_callers_thread_count():
    code = ("import torch; torch.set_num_threads(3)\n"
            "import agents.sb3_policy, agents.training, agents.evaluation, agents.plugin, agents.shielding\n"
            "import baselines.policies, baselines.rollout, baselines.spanning, baselines.span_report\n"
            "import wide_env.wrappers\n"
            "print(torch.get_num_threads())")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "3"


def test_sb3_policy_runs_on_one_thread_and_restores_the_callers(tmp_path):
    import torch
    from stable_baselines3 import PPO

    from agents.sb3_policy import SB3Policy, load_model

    env = gym.make("wide_env/WideMoE-v0", config={"n_tokens": 2, "flatten_observation": True})
    problem = env.unwrapped.problem
    PPO("MlpPolicy", env, n_steps=8, batch_size=8, device="cpu").save(tmp_path / "m.zip")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = load_model("ppo", str(tmp_path / "m.zip"), problem)
        assert torch.get_num_threads() == 2
        seen = []
        predict = model.predict

        def spy(*args, **kwargs):
            seen.append(torch.get_num_threads())
            return predict(*args, **kwargs)

        model.predict = spy
        obs, _ = env.reset(seed=0)
        action = SB3Policy(model, problem)(obs)
        assert action.shape == (problem.n_experts,)
        assert seen == [1] and torch.get_num_threads() == 2
        with pytest.raises(ValueError):  # an error inside the limit restores the caller's setting too
            SB3Policy(model, problem)(obs[:3])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
