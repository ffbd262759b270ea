"""The agents side of issue 21: model zips load without unpickling (item 1), a model loaded with the wrong
algorithm prefix or on another env says so (items 15, 16)."""

from __future__ import annotations

import base64
import json
import pickle
import zipfile

import gymnasium as gym
import numpy as np
import pytest

import wide_env  # noqa: F401
from agents.common import resolve_policy

SMALL = {"config": {"n_tokens": 2}}


class _WritesAFile:
    """A pickle that, when loaded, writes ``path`` (what a crafted model zip would do)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('code from the zip ran')",)


def _save_model(path, algo="ppo", policy="expert_set", env_id="wide_env/WideMoE-v0", env_kwargs=SMALL,
                learning_rate=3e-4):
    from agents.registry import algorithm

    env = gym.make(env_id, **env_kwargs)
    problem = env.unwrapped.problem
    pol, kwargs = resolve_policy(policy, algo, env.observation_space, problem, {})
    extra = {"n_steps": 8, "batch_size": 8} if algo != "a2c" else {"n_steps": 8}
    model = algorithm(algo).load_class()(pol, env, policy_kwargs=kwargs, learning_rate=learning_rate, device="cpu",
                                         **extra)
    model.save(path)
    return model, env


def _craft(src, dst, marker):
    """A copy of the model zip ``src`` whose every cloudpickled field runs code that writes ``marker``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            payload = zin.read(item.filename)
            if item.filename == "data":
                data = json.loads(payload)
                for value in data.values():
                    if isinstance(value, dict) and ":serialized:" in value:
                        value[":serialized:"] = base64.b64encode(pickle.dumps(_WritesAFile(marker))).decode()
                payload = json.dumps(data).encode()
            zout.writestr(item, payload)


@pytest.mark.parametrize("policy", ["expert_set", "mlp"])
def test_a_crafted_zip_runs_no_code_and_still_evaluates(tmp_path, policy):
    from baselines.evaluate import evaluate_policies
    from stable_baselines3 import PPO

    model, env = _save_model(tmp_path / "ppo.zip", policy=policy, learning_rate=lambda p: 3e-4 * p)
    marker = tmp_path / "pwned.txt"
    _craft(tmp_path / "ppo.zip", tmp_path / "crafted.zip", marker)
    with pytest.raises(Exception):  # the crafted zip is effective: SB3's own load runs its code
        PPO.load(tmp_path / "crafted.zip", device="cpu")
    assert marker.exists()
    marker.unlink()

    rows = evaluate_policies("wide_env/WideMoE-v0", [f"ppo:{tmp_path / 'crafted.zip'}", "topk"], episodes=2, seed=3,
                             progress=False, env_kwargs=SMALL)
    assert not marker.exists()
    assert rows[0]["policy"].startswith("ppo:") and np.isfinite(rows[0]["reward_per_step"])
    # the same weights act the same as the model that was saved
    from agents.sb3_policy import SB3Policy, load_model

    loaded = load_model("ppo", str(tmp_path / "crafted.zip"), env.unwrapped.problem)
    obs, _ = env.reset(seed=0)
    problem = env.unwrapped.problem
    np.testing.assert_array_equal(SB3Policy(loaded, problem)(obs), SB3Policy(model, problem)(obs))
    assert not marker.exists()


def test_loading_never_calls_cloudpickle(tmp_path, monkeypatch):
    import stable_baselines3.common.save_util as save_util

    from agents.sb3_policy import load_model

    _, env = _save_model(tmp_path / "a2c.zip", algo="a2c", policy="mlp")

    def refuse(*args, **kwargs):
        raise AssertionError("cloudpickle.loads called on the model zip")

    monkeypatch.setattr(save_util.cloudpickle, "loads", refuse)
    model = load_model("a2c", str(tmp_path / "a2c.zip"), env.unwrapped.problem)
    assert type(model).__name__ == "A2C"
    assert type(model.policy.optimizer).__name__ == "RMSprop"  # policy_kwargs' optimizer_class, from the known list


def test_an_unknown_class_in_the_zip_is_refused_naming_the_field(tmp_path):
    from agents.sb3_policy import ModelLoadError, load_model

    _, env = _save_model(tmp_path / "ppo.zip", policy="mlp")
    with zipfile.ZipFile(tmp_path / "ppo.zip") as zin, zipfile.ZipFile(tmp_path / "odd.zip", "w") as zout:
        for item in zin.infolist():
            payload = zin.read(item.filename)
            if item.filename == "data":
                data = json.loads(payload)
                data["policy_kwargs"]["features_extractor_class"] = "<class 'os.system'>"
                payload = json.dumps(data).encode()
            zout.writestr(item, payload)
    with pytest.raises(ModelLoadError, match=r"policy_kwargs\.features_extractor_class is the class 'os\.system'"):
        load_model("ppo", str(tmp_path / "odd.zip"), env.unwrapped.problem)


def test_a_maskable_model_loaded_as_ppo_names_the_right_prefix(tmp_path):
    from agents.sb3_policy import ModelLoadError, load_model

    _, env = _save_model(tmp_path / "m.zip", algo="maskable_ppo")
    with pytest.raises(ModelLoadError, match=r"holds a maskable_ppo model \(MaskablePPO\), not a ppo one; load it "
                                             r"as maskable_ppo:"):
        load_model("ppo", str(tmp_path / "m.zip"), env.unwrapped.problem)
    _save_model(tmp_path / "p.zip", algo="ppo")
    with pytest.raises(ModelLoadError, match=r"holds a ppo model \(PPO\), not a a2c one; load it as ppo:"):
        load_model("a2c", str(tmp_path / "p.zip"), env.unwrapped.problem)


def test_a_model_for_16_experts_on_an_8_expert_env_names_both_shapes(tmp_path):
    from baselines.policies import make_policy

    from agents.sb3_policy import ModelLoadError

    _save_model(tmp_path / "e16.zip", env_id="wide_env/WideMoE-Synthetic-v0",
                env_kwargs={"config": {"n_tokens": 2, "model": {"n_experts": 16}}})
    env = gym.make("wide_env/WideMoE-Synthetic-v0", **SMALL)
    policy = make_policy(f"ppo:{tmp_path / 'e16.zip'}", env)
    obs, _ = env.reset(seed=0)
    with pytest.raises(ModelLoadError) as err:
        policy(obs)
    text = str(err.value)
    assert "its action is MultiBinary(16), the env's MultiBinary(8) (8 experts" in text
    assert "gate_probs: (16,) vs (8,)" in text and "Unexpected observation shape" not in text


def test_a_model_saved_by_an_older_version_of_the_policy_class_still_loads(tmp_path):
    from agents.sb3_policy import load_model

    _, env = _save_model(tmp_path / "ppo.zip")
    with zipfile.ZipFile(tmp_path / "ppo.zip") as zin, zipfile.ZipFile(tmp_path / "old.zip", "w") as zout:
        for item in zin.infolist():
            payload = zin.read(item.filename)
            if item.filename == "data":
                data = json.loads(payload)
                data["policy_class"]["_a_method_that_was_removed"] = "<function f at 0x0>"
                payload = json.dumps(data).encode()
            zout.writestr(item, payload)
    model = load_model("ppo", str(tmp_path / "old.zip"), env.unwrapped.problem)
    assert type(model.policy).__name__ == "ExpertSetPolicy"
