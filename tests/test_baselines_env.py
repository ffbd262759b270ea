"""Baseline policies on the WIDE decoding environments: valid actions, SiftMoE guarantees, evaluation."""
import csv
import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest

import wide_env
from baselines import make_policy, solve_decode_full
from baselines.policies import POLICIES
from baselines.evaluate import evaluate_policies
from baselines.observation import parse_observation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _kwargs(name):
    return {"seed": 0} if name == "random" else {}


@pytest.mark.parametrize("env_id", sorted(wide_env.ENVIRONMENTS))
def test_every_policy_returns_valid_actions(env_id):
    """Every observation-only policy on every registered env (the oracle and the time-spanning policies,
    built from the env for span budgets, have their own tests: test_oracle.py, test_spanning.py)."""
    env = gym.make(env_id)
    n_actions = env.action_space.n  # E for decoding, T*E for prefilling
    for name in POLICIES:
        policy = make_policy(name, env, **_kwargs(name))
        obs, _ = env.reset(seed=1)
        for _ in range(6):
            action = policy(obs)
            assert action.shape == (n_actions,) and action.dtype == np.int8
            assert set(np.unique(action)) <= {0, 1}
            assert env.action_space.contains(action)
            obs, _, term, trunc, _ = env.step(action)
            assert not term
            if trunc:  # the prefill env's episode is one prompt (L steps)
                obs, _ = env.reset()


def test_flat_observations_and_batched_observations():
    env = gym.make("wide_env/WideMoE-v0")
    flat_env = gym.make("wide_env/WideMoE-v0", config={"flatten_observation": True})
    problem = flat_env.unwrapped.problem
    assert problem.flatten
    obs, _ = env.reset(seed=3)
    flat, _ = flat_env.reset(seed=3)
    observations, flats = [], []
    for _ in range(12):
        observations.append(obs)
        flats.append(flat)
        a = make_policy("topk", env)(obs)
        obs, *_ = env.step(a)
        flat, *_ = flat_env.step(a)
    batch = {k: np.stack([o[k] for o in observations]) for k in observations[0]}
    flat_batch = np.stack(flats)
    for name in POLICIES:
        if name == "random":
            continue
        pol = make_policy(name, env)
        single = np.stack([pol(o) for o in observations])
        np.testing.assert_array_equal(single, np.stack([pol(f) for f in flats]), err_msg=name)
        np.testing.assert_array_equal(single, pol(batch), err_msg=name)
        np.testing.assert_array_equal(single, pol(flat_batch), err_msg=name)
        assert pol(batch).shape == (12, problem.n_experts)
    rnd = make_policy("random", env, seed=0)
    assert rnd(batch).shape == (12, problem.n_experts)


def test_policy_errors_name_the_problem():
    env = gym.make("wide_env/WideMoE-v0")
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        make_policy("nope", env)
    with pytest.raises(ValueError, match="unknown algorithm 'xyz'"):
        make_policy("xyz:model.zip", env)
    with pytest.raises(TypeError, match="policy 'siftmoe'"):
        make_policy("siftmoe", env, bogus=1)
    with pytest.raises(ValueError, match="threshold"):
        make_policy("wdmoe", env, threshold=2.0)
    with pytest.raises(TypeError, match="unwrapped.problem"):
        make_policy("topk", object())
    obs, _ = env.reset(seed=0)
    with pytest.raises(KeyError, match="deviation_table"):
        make_policy("topk", env)({k: v for k, v in obs.items() if k != "deviation_table"})
    with pytest.raises(ValueError, match="flat observation"):
        make_policy("topk", env)(np.zeros(5, np.float32))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_policy("ppo:/nonexistent/model.zip", env)(obs)


def _siftmoe_rollout(env, seed, margin=1e-6):
    """Steps of a SiftMoE episode with whether the policy's own problem had a budget-meeting set."""
    problem = env.unwrapped.problem
    E, K = problem.n_experts, problem.top_k
    pol = make_policy("siftmoe", env)
    obs, _ = env.reset(seed=seed)
    steps, done = [], False
    while not done:
        a, _ = parse_observation(obs, problem)
        feas = a["latency_ratio"][0] <= 1.0 if problem.enforce_deadline else np.ones(E, bool)
        met = solve_decode_full(np.where(feas, a["energy_cost"][0], 0.0), feas,
                                a["deviation_table"][0].reshape(K, E + 1),
                                pol.layer_budget(a)[0]).budget_met
        topk = a["topk_mask"][0] > 0.5
        action = pol(obs)
        obs, _, term, trunc, info = env.step(action)
        steps.append(dict(met=bool(met), topk_feasible=bool((feas | ~topk).all()), **info))
        done = term or trunc
    return steps


@pytest.mark.parametrize("env_id,config", [
    ("wide_env/WideMoE-v0", {}),
    ("wide_env/WideMoE-Mixtral-v0", {"n_tokens": 3}),
    ("wide_env/WideMoE-Switch-v0", {"n_tokens": 4}),
    ("wide_env/WideMoE-v0", {"budget": {"scale": 0.3}}),
    ("wide_env/WideMoE-v0", {"deadline": {"enforce": False}}),
])
def test_siftmoe_beats_topk_within_budget(env_id, config):
    base = gym.spec(env_id).kwargs.get("config", {})
    env = gym.make(env_id, config={**base, **config})
    n_met = 0
    total_sift, total_topk = 0.0, 0.0
    for seed in (0, 1, 2):
        for s in _siftmoe_rollout(env, seed):
            if s["met"]:
                n_met += 1
                assert s["budget_violated"] == 0, s  # never exceeds the budget when a set meets it
            if s["topk_feasible"]:  # Top-K itself meets the budget (deviation 0) and the deadline
                assert s["energy_j"] <= s["topk_energy_j"] * (1 + 1e-5), s
            assert s["deadline_misses"] == 0 or not env.unwrapped.problem.enforce_deadline
            total_sift += s["energy_j"]
            total_topk += s["topk_energy_j"]
    assert n_met > 0
    assert total_sift <= total_topk


def test_siftmoe_token_budget_mode_respects_the_token_budget():
    env = gym.make("wide_env/WideMoE-v0", config={"budget": {"mode": "token", "scale": 0.5}})
    assert env.unwrapped.problem.budget_mode == "token"
    n_met = 0
    for seed in (0, 1):
        for s in _siftmoe_rollout(env, seed):
            if s["met"]:
                n_met += 1
                assert s["budget_violated"] == 0, s
    assert n_met > 0


def test_siftmoe_energy_falls_monotonically_with_budget():
    scales = [0.25, 0.5, 1.0, 2.0, 4.0]
    rows = evaluate_policies("wide_env/WideMoE-v0", ["siftmoe", "topk"], episodes=3, seed=0,
                             budget_scales=scales, progress=False)
    sift = [r["energy_per_token_j"] for r in rows if r["policy"] == "siftmoe"]
    topk = [r["energy_per_token_j"] for r in rows if r["policy"] == "topk"]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(sift, sift[1:])), sift
    assert sift[-1] < sift[0]
    # Top-K ignores the budget and every scale replays the same channels and tokens.
    assert max(topk) == pytest.approx(min(topk), rel=1e-12)
    assert all(s <= t * (1 + 1e-6) for s, t in zip(sift, topk))


def test_evaluate_is_deterministic_and_accepts_callables():
    fixed = ("mine", lambda obs: np.asarray(obs["topk_mask"], dtype=np.int8))
    a = evaluate_policies("wide_env/WideMoE-v0", ["topk", fixed, "random"], episodes=2, seed=5, progress=False)
    b = evaluate_policies("wide_env/WideMoE-v0", ["topk", fixed, "random"], episodes=2, seed=5, progress=False)
    for ra, rb in zip(a, b):
        for key in ("energy_per_token_j", "deviation", "violation_rate"):
            assert ra[key] == rb[key]
    assert a[0]["energy_per_token_j"] == a[1]["energy_per_token_j"]  # same actions, same episodes
    with pytest.raises(ValueError, match="unknown environment id"):
        evaluate_policies("wide_env/Nope-v0", ["topk"], episodes=1)
    with pytest.raises(ValueError, match="budget scale"):
        evaluate_policies("wide_env/WideMoE-v0", ["topk"], episodes=1, budget_scales=[0.0])


def test_saved_sb3_models_are_evaluated(tmp_path):
    import torch

    torch.set_num_threads(1)
    from sb3_contrib import MaskablePPO
    from stable_baselines3 import PPO

    env = gym.make("wide_env/WideMoE-v0", config={"flatten_observation": True, "n_tokens": 2})
    PPO("MlpPolicy", env, n_steps=16, batch_size=16, seed=0, device="cpu").save(tmp_path / "ppo")
    MaskablePPO("MlpPolicy", env, n_steps=16, batch_size=16, seed=0, device="cpu").save(tmp_path / "mppo")
    # The models were trained on flat observations; the evaluation env uses Dict ones (converted).
    rows = evaluate_policies("wide_env/WideMoE-v0", [f"ppo:{tmp_path / 'ppo.zip'}",
                                                     f"maskable_ppo:{tmp_path / 'mppo.zip'}"],
                             episodes=1, seed=0, env_kwargs={"config": {"n_tokens": 2}}, progress=False,
                             budget_scales=[1.0, 2.0])
    assert len(rows) == 4
    mppo = [r for r in rows if r["policy"].startswith("maskable_ppo")]
    assert all(r["deadline_misses_per_token"] == 0 for r in mppo)  # masked experts are never executed


def test_evaluate_cli_end_to_end(tmp_path):
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "baselines.evaluate", "--env", "wide_env/WideMoE-v0",
           "--policies", "topk,siftmoe,wdmoe,des,adapmoe,greedy,random", "--episodes", "2", "--seed", "0",
           "--out", str(out), "--env-kwargs", "{'config': {'n_tokens': 3}}", "--budget-scales", "0.5,1,2",
           "--policy-kwargs", "{'wdmoe': {'threshold': 0.3}}", "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr
    assert "siftmoe" in proc.stdout and "energy/token" in proc.stdout
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 7 * 3
    assert {r["policy"] for r in rows} == set(POLICIES)
    assert {float(r["budget_scale"]) for r in rows} == {0.5, 1.0, 2.0}
    for r in rows:
        assert int(r["episodes"]) == 2 and int(r["steps"]) == 2 * 3 * 4
        assert float(r["energy_per_token_j"]) >= 0 and 0 <= float(r["violation_rate"]) <= 1
    sift = sorted((float(r["budget_scale"]), float(r["energy_per_token_j"])) for r in rows if r["policy"] == "siftmoe")
    assert sift[0][1] >= sift[1][1] >= sift[2][1]
    with open(out / "episodes.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 7 * 3 * 2
    png = (out / "tradeoff.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_evaluate_cli_reports_bad_arguments(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "baselines.evaluate", "--out", str(tmp_path),
                           "--env-kwargs", "{oops"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode != 0 and "--env-kwargs" in proc.stderr


def test_practical_topk_loses_accuracy_under_a_tight_deadline():
    """Stragglers (helper queueing) against a tight deadline: practical Top-K loses late experts, which
    costs real accuracy and deviation; ideal Top-K (enforcement off, same seeds) does not; SiftMoE spends
    less energy than practical Top-K and, executing fewer experts, loses fewer of them. The queueing delay
    is unknown when deciding (the observation holds only P(meeting the deadline)), so SiftMoE cannot avoid
    every miss."""
    from baselines.evaluate import evaluate_policies

    rows = evaluate_policies("wide_env/WideMoE-Stragglers-v0", ["topk", "topk_ideal", "siftmoe"], episodes=100,
                             seed=0, env_kwargs={"config": {"compute": {"queue_delay_mean_s": 0.004}}}, progress=False)
    by = {r["policy"]: r for r in rows}
    practical, ideal, sift = by["topk"], by["topk_ideal"], by["siftmoe"]
    assert practical["deadline_misses_per_token"] > 0.1
    assert ideal["deviation"] == 0.0 and practical["deviation"] > 0.0
    assert practical["accuracy_same"] < ideal["accuracy_same"] == 1.0
    # 1,600 tokens: losing late experts costs next-byte accuracy (about 4 points on these seeds)
    assert practical["accuracy_correct"] < ideal["accuracy_correct"] - 0.01
    assert sift["energy_per_token_j"] < practical["energy_per_token_j"]
    assert 0.0 < sift["deadline_misses_per_token"] < practical["deadline_misses_per_token"]


def test_realistic_preset_practical_topk_misses_deadlines():
    """WideMoE-Realistic-v0 (3GPP link budget, 7B-class payload, uncertain queues): some Top-K experts are out
    of reach before the decision and others arrive late, so practical Top-K misses deadlines and loses real
    accuracy against ideal Top-K; SiftMoE at a small budget keeps practical Top-K's accuracy (experts out of
    reach are lost to every policy) at a fraction of its energy."""
    import gymnasium as gym

    from baselines.evaluate import evaluate_policies

    env = gym.make("wide_env/WideMoE-Realistic-v0")
    ratios, probabilities = [], []
    for seed in range(20):
        obs, _ = env.reset(seed=seed)
        done = False
        while not done:
            top = obs["topk_mask"] > 0
            ratios += obs["latency_ratio"][top].tolist()
            probabilities += obs["deadline_probability"][top].tolist()
            obs, _, terminated, truncated, _ = env.step(obs["topk_mask"].astype(np.int8))
            done = terminated or truncated
    ratios, probabilities = np.array(ratios), np.array(probabilities)
    assert 0.03 < np.mean(ratios > 1.0) < 0.3  # out of reach before deciding: p_max binds at the cell edge
    assert np.all(probabilities[ratios > 1.0] == 0.0)
    assert np.mean((probabilities > 0.0) & (probabilities < 0.95)) > 0.05  # and queues make others uncertain

    rows = evaluate_policies("wide_env/WideMoE-Realistic-v0", ["topk", "topk_ideal", "siftmoe"], episodes=100,
                             seed=1000, budget_scales=[0.05], progress=False)
    by = {r["policy"]: r for r in rows}
    practical, ideal, sift = by["topk"], by["topk_ideal"], by["siftmoe"]
    assert practical["deadline_misses_per_token"] > 1.0 and ideal["accuracy_same"] == 1.0
    assert practical["accuracy_correct"] < ideal["accuracy_correct"] - 0.03  # 1,600 tokens: about 4.6 points
    assert abs(sift["accuracy_correct"] - practical["accuracy_correct"]) < 0.01
    assert sift["energy_per_token_j"] < 0.25 * practical["energy_per_token_j"]
    assert sift["deadline_misses_per_token"] < 0.25 * practical["deadline_misses_per_token"]
