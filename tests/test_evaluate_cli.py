"""baselines.evaluate as a new user meets it (issues 10 and 11): episodes of a policy as one batch on the
native vector env by default (identical for every policy), presets through every path, --max-steps 0,
truncated model files, the --help example, and a base install without torch or SB3."""

from __future__ import annotations

import csv
import os
import subprocess
import warnings
import sys

import numpy as np
import pytest

import wide_env  # noqa: F401
from baselines.evaluate import build_parser, evaluate_policies

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _evaluate_cli(args, cwd, extra_env=None, timeout=180):
    env = {**os.environ, "PYTHONPATH": ROOT, **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "baselines.evaluate", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _episodes(policies, mode, env_id="wide_env/WideMoE-v0", config=None, scales=None, episodes=4):
    recs: list = []
    rows = evaluate_policies(env_id, policies, episodes=episodes, seed=7, progress=False, vec_env=mode,
                             env_kwargs={"config": {"n_tokens": 2, **(config or {})}}, budget_scales=scales,
                             episode_rows=recs)
    return rows, recs


def test_native_batch_is_the_default_and_every_policy_sees_the_same_episodes():
    rows, recs = _episodes(["topk", "siftmoe", "random"], "auto")
    assert {r["vec_env"] for r in rows} == {"native"} and len(recs) == 3 * 4
    # the Top-K energy of an episode depends only on its channel and token draws, never on the actions
    per_policy = {p: [r["topk_energy_j"] for r in recs if r["policy"] == p] for p in ("topk", "siftmoe", "random")}
    assert per_policy["topk"] == per_policy["siftmoe"] == per_policy["random"]
    assert len(set(per_policy["topk"])) == 4  # four different episodes
    assert [r["episode"] for r in recs if r["policy"] == "topk"] == [0, 1, 2, 3]
    assert [r["seed"] for r in recs if r["policy"] == "topk"] == [7, 8, 9, 10]  # sub-env i seeded 7 + i
    _, again = _episodes(["topk", "siftmoe", "random"], "native")
    assert [r["energy_j"] for r in again] == [r["energy_j"] for r in recs]  # deterministic
    # batch row i is the episode of gym.make(...).reset(seed=7 + i): both modes see the same episodes
    _, single = _episodes(["topk", "siftmoe"], "single")
    assert [r["seed"] for r in single if r["policy"] == "topk"] == [7, 8, 9, 10]
    for key in ("topk_energy_j", "energy_j", "deviation", "deadline_misses"):
        assert [r[key] for r in single] == pytest.approx([r[key] for r in recs if r["policy"] != "random"]), key


def test_batch_and_single_modes_report_the_same_metrics():
    for mode in ("native", "single"):
        rows, recs = _episodes(["topk", "siftmoe"], mode)
        by = {r["policy"]: r for r in rows}
        assert by["topk"]["energy_rel_topk"] == pytest.approx(1.0)
        assert by["siftmoe"]["energy_rel_topk"] < 1.0 and by["siftmoe"]["violation_rate"] == 0.0
        assert all(r["steps"] == 2 * 4 and r["tokens"] == 2 for r in recs)
        assert 0.0 <= by["topk"]["accuracy_correct"] <= 1.0


@pytest.mark.parametrize("mode", ["native", "single"])
def test_a_preset_keeps_its_settings_in_every_evaluation_path(mode):
    """Stragglers (2 ms helper queueing) with a user config, topk_ideal and budget scales included, gives
    exactly what the default id with that queueing written out gives, and not what the default id gives."""
    policies, scales = ["topk", "topk_ideal", "siftmoe"], [0.5, 2.0]
    # 2 ms queues against a 10 ms deadline miss a few % of calls: enough episodes that some do
    preset, _ = _episodes(policies, mode, "wide_env/WideMoE-Stragglers-v0", scales=scales, episodes=16)
    explicit, _ = _episodes(policies, mode, config={"compute": {"queue_delay_mean_s": 0.002}}, scales=scales,
                            episodes=16)
    plain, _ = _episodes(policies, mode, scales=scales, episodes=16)
    for a, b, c in zip(preset, explicit, plain):
        assert (a["policy"], a["budget_scale"]) == (b["policy"], b["budget_scale"])
        assert a["energy_per_token_j"] == b["energy_per_token_j"] and a["deviation"] == b["deviation"]
    assert any(a["deadline_misses_per_token"] != c["deadline_misses_per_token"] for a, c in zip(preset, plain))


def test_max_steps_zero_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="max_steps must be an integer >= 1"):
        evaluate_policies("wide_env/WideMoE-v0", ["topk"], episodes=1, max_steps=0, progress=False)
    proc = _evaluate_cli(["--max-steps", "0", "--out", str(tmp_path / "o")], tmp_path, timeout=60)
    assert proc.returncode == 2 and "--max-steps: must be >= 1, got 0" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_a_truncated_model_file_is_named(tmp_path):
    import gymnasium as gym
    from stable_baselines3 import PPO

    env = gym.make("wide_env/WideMoE-v0", config={"n_tokens": 2})
    path = tmp_path / "model.zip"
    PPO("MultiInputPolicy", env, n_steps=8, batch_size=8, device="cpu").save(path)
    path.write_bytes(path.read_bytes()[:2000])
    proc = _evaluate_cli(["--policies", f"ppo:{path}", "--episodes", "1", "--budget-scales", "1", "--out",
                          str(tmp_path / "o"), "--env-kwargs", "{'config': {'n_tokens': 2}}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"cannot load the ppo model '{path}'" in proc.stderr and "truncated" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_example_keeps_its_line_breaks():
    text = build_parser().format_help()
    assert "--seed 0 \\\n        --out runs/eval" in text


def test_base_install_without_torch_or_sb3_writes_every_output(tmp_path):
    """torch, stable_baselines3 and sb3_contrib made unimportable: the analytic evaluation still finishes and
    draws tradeoff.png (matplotlib is a base dependency)."""
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(
        "import sys\nfor name in ('torch', 'stable_baselines3', 'sb3_contrib'):\n    sys.modules[name] = None\n")
    proc = _evaluate_cli(["--episodes", "2", "--budget-scales", "1,2", "--out", str(tmp_path / "o"), "--env-kwargs",
                          "{'config': {'n_tokens': 2}}"], tmp_path,
                         extra_env={"PYTHONPATH": os.pathsep.join([str(block), ROOT])})
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("results.csv", "episodes.csv", "tradeoff.png"):
        assert (tmp_path / "o" / name).stat().st_size > 0
    with open(tmp_path / "o" / "episodes.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 2 * 2 * 2  # per-episode rows: 2 policies x 2 scales x 2


def test_batched_observations_through_a_saved_maskable_agent():
    """The SB3 wrapper acts on a whole batch: its masks come from the batch's observations."""
    import gymnasium as gym
    from sb3_contrib import MaskablePPO

    from agents.common import resolve_policy
    from agents.sb3_policy import SB3Policy

    config = {"n_tokens": 2, "compute": {"queue_delay_mean_s": 0.01}}
    env = gym.make("wide_env/WideMoE-v0", config=config)
    pol, kw = resolve_policy("expert_set", "maskable_ppo", env.observation_space, env.unwrapped.problem, {})
    model = MaskablePPO(pol, env, n_steps=16, batch_size=16, device="cpu", policy_kwargs=kw)
    venv = gym.make_vec("wide_env/WideMoE-v0", num_envs=6, vectorization_mode="vector_entry_point", config=config)
    obs, _ = venv.reset(seed=0)
    policy = SB3Policy(model, env.unwrapped.problem, deterministic=False)
    for _ in range(4):
        masks = venv.unwrapped.action_masks()
        action = policy(obs)
        assert action.shape == (6, 8) and not np.any(action[~masks[:, 1::2]])
        obs, *_ = venv.step(action)


@pytest.fixture
def fresh_accuracy_warnings(monkeypatch):
    """The unvalidated-rule warning comes once per profile and process: start from none given."""
    monkeypatch.setattr("wide_env.envs.accuracy_source._WARNED_UNVALIDATED", set())


def test_evaluation_measures_accuracy_on_the_model(fresh_accuracy_warnings):
    """auto: measured on the model wherever it can (tables judge policies), unless the config chose a source;
    'live' runs the live backend; 'rule' forces the rule; all on the batched core; rows and the printed table
    say which."""
    pytest.importorskip("torch")
    from baselines.evaluate import evaluate_policies

    small = {"config": {"n_tokens": 2}}
    tiny = evaluate_policies("wide_env/WideMoE-v0", ["topk"], episodes=2, env_kwargs=small, progress=False)
    assert tiny[0]["source_of_accuracy"] == "model" and tiny[0]["vec_env"] == "native"  # tables are exact
    fast = evaluate_policies("wide_env/WideMoE-v0", ["topk"], episodes=2, progress=False, accuracy="auto",
                             env_kwargs={"config": {"n_tokens": 2, "gating": {"accuracy": "rule"}}})
    assert fast[0]["source_of_accuracy"] == "rule"  # a config's own choice stays
    model = evaluate_policies("wide_env/WideMoE-Mixtral-v0", ["topk"], episodes=2, env_kwargs=small, progress=False)
    assert model[0]["source_of_accuracy"] == "model" and model[0]["vec_env"] == "native"
    live = evaluate_policies("wide_env/WideMoE-Mixtral-v0", ["topk"], episodes=2, env_kwargs=small, progress=False,
                             accuracy="live")
    assert live[0]["source_of_accuracy"] == "live" and live[0]["vec_env"] == "native"
    # Top-K executes the live Top-K: the model's own accuracy, whichever way it is measured
    assert model[0]["accuracy_correct"] == live[0]["accuracy_correct"] == model[0]["accuracy_full"]
    with pytest.warns(UserWarning, match="NOT validated.*gating.accuracy = 'model'"):
        rule = evaluate_policies("wide_env/WideMoE-Mixtral-v0", ["topk"], episodes=2, env_kwargs=small,
                                 progress=False, accuracy="rule")
    assert rule[0]["source_of_accuracy"] == "rule_unvalidated" and rule[0]["vec_env"] == "native"
    with pytest.raises(ValueError, match="accuracy must be one of"):
        evaluate_policies("wide_env/WideMoE-v0", ["topk"], episodes=1, accuracy="guess")
    with pytest.raises(ValueError, match="reports no real accuracy"):
        evaluate_policies("wide_env/WideMoEPrefill-v0", ["topk"], episodes=1, accuracy="model")


def test_envs_say_where_their_accuracy_comes_from(fresh_accuracy_warnings):
    """The problem names the accuracy source: the validated rule (tiny), the model (the deep profiles, torch
    installed), or a rule not validated against the live model, which warns (once per profile) and says so."""
    import gymnasium as gym

    assert gym.make("wide_env/WideMoE-v0").unwrapped.problem.accuracy_source == "rule"
    assert gym.make("wide_env/WideMoE-v0", config={"budget": {"scale": 4.0}, "n_tokens": 4}
                    ).unwrapped.problem.accuracy_source == "rule"  # the scenario the rule was validated in
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for env_id in ("wide_env/WideMoE-Realistic-v0", "wide_env/WideMoE-Stragglers-v0",
                       "wide_env/WideMoE-TokenBudget-v0", "wide_env/WideMoE-EpisodeBudget-v0",
                       "wide_env/WideMoE-AccuracyObjective-v0"):  # tiny, but lost experts or spanning budgets
            assert gym.make(env_id).unwrapped.problem.accuracy_source == "model", env_id
        for config in ({"budget": {"scale": 8.0}}, {"radio": {"bandwidth_hz": 2e5}}):
            assert gym.make("wide_env/WideMoE-v0", config=config).unwrapped.problem.accuracy_source == "model"
        assert gym.make("wide_env/WideMoE-Switch-v0").unwrapped.problem.accuracy_source == "model"
        vec = gym.make_vec("wide_env/WideMoE-GptOss-v0", num_envs=2, vectorization_mode="vector_entry_point")
        assert vec.unwrapped.problem.accuracy_source == "model"
    rule = {"gating": {"accuracy": "rule"}}
    for make in (lambda: gym.make("wide_env/WideMoE-Switch-v0", config=rule),
                 lambda: gym.make_vec("wide_env/WideMoE-GptOss-v0", num_envs=2, config=rule,
                                      vectorization_mode="vector_entry_point")):
        with pytest.warns(UserWarning, match="accuracy in info comes from .* NOT validated"):
            env = make()
        assert env.unwrapped.problem.accuracy_source == "rule_unvalidated"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gym.make("wide_env/WideMoE-Switch-v0", config=rule).unwrapped.problem.accuracy_source == \
            "rule_unvalidated"
    synthetic = gym.make("wide_env/WideMoE-Mixtral-v0", config={"gating": {"source": "synthetic"}})
    assert synthetic.unwrapped.problem.accuracy_source == "none"
