"""Pinned trajectories: short runs of the single env, the native vector env (with autoresets, per-row seeds and
mid-episode re-planning), hashed bit for bit (observations, rewards, flags, every info key
with its type or dtype). A speed change to the simulator core must leave every hash as it is; a change of the
dynamics must update the pins on purpose (and say so). Where numpy's code paths differ from the pinned ones,
tests/pin_runner.py says how they are computed."""

import hashlib
import json

import gymnasium as gym
import numpy as np
import pin_runner
import pytest

import wide_env  # noqa: F401  (registers the ids)
from wide_env.sim.decode import plan as plan_module

# the rule is not validated on every scenario pinned here: the figures are pinned, not endorsed
pytestmark = pytest.mark.filterwarnings("ignore:profile .* accuracy in info comes from the logit-effect rule")


#: info keys added after the pins were computed (the shield's Safety-Gymnasium costs, tests/test_shield.py pins
#: their values); every other key must hash as on 90d1541
LATER_KEYS = frozenset({"cost", "cost_budget", "cost_deadline", "_cost", "_cost_budget", "_cost_deadline"})


class Digest:
    def __init__(self):
        self.h = hashlib.sha256()

    def add(self, value):
        if isinstance(value, dict):
            for key in value:  # insertion order is part of the contract
                if key in LATER_KEYS:
                    continue
                self.h.update(repr(key).encode())
                self.add(value[key])
        elif isinstance(value, np.ndarray):
            if value.dtype == object:
                for item in value:
                    self.add(item)
            else:
                self.h.update(f"{value.dtype}{value.shape}".encode())
                self.h.update(np.ascontiguousarray(value).tobytes())
        elif isinstance(value, tuple):  # a step's or reset's results, item by item
            for item in value:
                self.add(item)
        elif value is None:
            self.h.update(b"None")
        else:
            self.h.update(f"{type(value).__name__}:{value!r}".encode())

    def hexdigest(self) -> str:
        return self.h.hexdigest()[:16]


# the accuracy rule everywhere: the model backend's measured figures are pinned by its own exactness tests
RULE = {"gating": {"accuracy": "rule"}}


def single_env_digest(env_id: str, config: dict | None, steps: int, seed: int) -> str:
    env = gym.make(env_id, config={**RULE, **(config or {})})
    rng = np.random.default_rng(seed + 100)
    d = Digest()
    obs, info = env.reset(seed=seed)
    d.add(obs), d.add(info)
    n = env.action_space.n
    for _ in range(steps):
        obs, reward, terminated, truncated, info = env.step(rng.integers(0, 2, n).astype(np.int8))
        for item in (obs, reward, terminated, truncated, info):
            d.add(item)
        if truncated:
            obs, info = env.reset()
            d.add(obs), d.add(info)
    return d.hexdigest()


def vector_env_digest(env_id: str, config: dict | None, num_envs: int, steps: int, seed, autoreset="NextStep") -> str:
    env = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="vector_entry_point", config=config,
                       autoreset_mode=autoreset)
    rng = np.random.default_rng(7)
    d = Digest()
    obs, info = env.reset(seed=seed)
    d.add(obs), d.add(info)
    n = env.single_action_space.n
    for _ in range(steps):
        for item in env.step(rng.integers(0, 2, (num_envs, n)).astype(np.int8)):
            d.add(item)
    return d.hexdigest()


SINGLE = {
    ("wide_env/WideMoE-v0", None): "2cfd4b9e0d414a57",
    ("wide_env/WideMoE-v0", '{"flatten_observation": true}'): "d12f16ea26b9308d",
    ("wide_env/WideMoE-EpisodeBudget-v0", None): "c7582e697add12f8",
    ("wide_env/WideMoE-Realistic-v0", None): "2a514f5f8d5a625d",
    ("wide_env/WideMoE-Synthetic-v0", '{"gating": {"accuracy": "auto"}, "placement": {"mobility": true}}'): "a58a34f7dd791568",
    ("wide_env/WideMoE-AccuracyObjective-v0", None): "e3814bbafd5b2ff3",
}


VECTOR = {
    # one generator, lockstep autoreset (every row at once), short plan chunks: re-planning mid-episode
    ("flat", 5, "int", "NextStep", 8): "1587e55ee8d81a2a",
    # per-row generators, rows out of step after a masked reset, same-step autoreset
    ("dict", 3, "list", "SameStep", None): "fb920f834067da17",
    ("flat", 4, "list", "NextStep", 40): "09bc93975227fefc",
}


def _vector_digest(layout, num_envs, seeding, autoreset, plan_steps) -> str:
    saved = plan_module.PLAN_LAYER_STEPS
    if plan_steps is not None:  # chunks of a few tokens: the batch re-plans mid-episode
        plan_module.PLAN_LAYER_STEPS = plan_steps
    try:
        config = {**RULE, "flatten_observation": layout == "flat", "budget": {"mode": "token"}}
        seed = 5 if seeding == "int" else [20 + i for i in range(num_envs)]
        return vector_env_digest("wide_env/WideMoE-v0", config, num_envs, steps=150, seed=seed, autoreset=autoreset)
    finally:
        plan_module.PLAN_LAYER_STEPS = saved


def _rows_out_of_step_digest() -> str:
    env = gym.make_vec("wide_env/WideMoE-v0", num_envs=4, vectorization_mode="vector_entry_point",
                       config={**RULE, "flatten_observation": True})
    rng = np.random.default_rng(3)
    d = Digest()
    d.add(env.reset(seed=9))
    for t in range(150):
        d.add(env.step(rng.integers(0, 2, (4, 8)).astype(bool)))
        if t in (10, 37):
            d.add(env.reset(options={"reset_mask": np.array([True, False, t == 37, False])}))
    return d.hexdigest()


def all_digests() -> dict:
    """Every pin's digest as computed here (tests/pin_runner.py runs it where numpy's code paths are the pinned
    ones)."""
    out = {f"single {env_id} {config}": single_env_digest(env_id, None if config is None else json.loads(config),
                                                          steps=140, seed=11) for env_id, config in SINGLE}
    out.update({f"vector {key}": _vector_digest(*key) for key in VECTOR})
    out["rows out of step"] = _rows_out_of_step_digest()
    return out


@pytest.fixture(scope="module")
def got():
    return pin_runner.digests(__file__)


@pytest.mark.parametrize("env_id,config", list(SINGLE))
def test_single_env_trajectory_is_pinned(got, env_id, config):
    assert got[f"single {env_id} {config}"] == SINGLE[env_id, config]


@pytest.mark.parametrize("layout,num_envs,seeding,autoreset,plan_steps", list(VECTOR))
def test_vector_env_trajectory_is_pinned(got, layout, num_envs, seeding, autoreset, plan_steps):
    assert got[f"vector {(layout, num_envs, seeding, autoreset, plan_steps)}"] == VECTOR[
        layout, num_envs, seeding, autoreset, plan_steps]


def test_vector_env_with_rows_out_of_step_is_pinned(got):
    assert got["rows out of step"] == "b24c80f7665a135e"
