"""Pinned plans: every array of the planned chunk (costs, deadlines, Top-K energies, observation entries, ...) and
the first steps' rewards and infos, hashed bit for bit, for host maps and link models the trajectory pins
(tests/test_trajectory_pins.py) do not cover: experts on the device, a host map per layer, slotted uplinks with a
device column, the fixed-power uplink, more helpers than experts; and the prefill env's steps (it shares the
physics). A speed change to planning or the physics must leave every hash as it is (computed on 6dd376a; where
numpy's code paths differ from the pinned ones, tests/pin_runner.py says how they are computed)."""

import hashlib
import json
from dataclasses import fields

import gymnasium as gym
import numpy as np
import pin_runner
import pytest

import wide_env  # noqa: F401  (registers the ids)

pytestmark = pytest.mark.filterwarnings("ignore:profile .* accuracy in info comes from the logit-effect rule")

DEVICE = [[0, 0, 0, 0, 0, 0, 0, 1]] * 4
PER_LAYER = [[1, 2, 3, 4, 5, 6, 7, 8], [2, 3, 4, 5, 6, 7, 8, 1], [0, 1, 2, 3, 4, 5, 6, 7], [8, 7, 6, 5, 4, 3, 2, 1]]
PINS = {
    json.dumps({"placement": {"hosts": DEVICE}}): "692a9452dd9e6951",
    json.dumps({"placement": {"hosts": PER_LAYER}}): "88fe5787675ce179",
    json.dumps({"radio": {"uplink_slots": 3},
                "placement": {"hosts": [[0, 1, 2, 3, 4, 5, 6, 7]] * 4}}): "37f8207af9b28897",
    json.dumps({"radio": {"uplink_model": "fixed"}}): "b873c0eaab39704a",
    json.dumps({"placement": {"n_helpers": 10}}): "f13683b6651ac3d9",
}


def plan_digest(config: dict) -> str:
    env = gym.make("wide_env/WideMoE-v0", config={"gating": {"accuracy": "rule"}, **config}).unwrapped
    env.reset(seed=5)
    rng = np.random.default_rng(0)
    h = hashlib.sha256()
    for _ in range(3):
        plan = env.episode_batch.state.plan
        for f in fields(plan):
            value = getattr(plan, f.name)
            if value is not None:
                h.update(f.name.encode())
                h.update(np.ascontiguousarray(value).tobytes())
        for _ in range(10):
            _, reward, _, _, info = env.step(rng.integers(0, 2, 8).astype(np.int8))
            h.update(repr((reward, sorted(info.items()))).encode())
        env.reset()
    return h.hexdigest()[:16]


def prefill_digest(config: dict) -> str:
    env = gym.make("wide_env/WideMoEPrefill-v0", config=config)
    obs, _ = env.reset(seed=3)
    rng = np.random.default_rng(0)
    h = hashlib.sha256()
    for _ in range(30):
        obs, reward, _, truncated, info = env.step(rng.integers(0, 2, env.action_space.shape).astype(np.int8))
        h.update(np.concatenate([v.ravel() for v in obs.values()]).tobytes())
        h.update(repr((reward, sorted(info.items()))).encode())
        if truncated:
            env.reset()
    return h.hexdigest()[:16]


def all_digests() -> dict:
    """Every pin's digest as computed here (tests/pin_runner.py runs it where numpy's code paths are the pinned
    ones)."""
    return {**{"plan " + config: plan_digest(json.loads(config)) for config in PINS},
            **{"prefill " + config: prefill_digest(json.loads(config)) for config in PREFILL_PINS}}


@pytest.fixture(scope="module")
def got():
    return pin_runner.digests(__file__)


@pytest.mark.parametrize("config", list(PINS))
def test_plans_are_pinned(got, config):
    assert got["plan " + config] == PINS[config]


PREFILL_PINS = {
    json.dumps({}): "c64e6b48eae52492",
    json.dumps({"radio": {"link_budget": "3gpp"}}): "955f42329d37c3ba",
    json.dumps({"placement": {"hosts": [[0, 1, 2, 3, 4, 5, 6, 7]] * 4}}): "3b55ef2bd5adc755",
}


@pytest.mark.parametrize("config", list(PREFILL_PINS))
def test_prefill_steps_are_pinned(got, config):
    assert got["prefill " + config] == PREFILL_PINS[config]
