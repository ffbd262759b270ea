"""Issue 10, item 4: one registry per kind of name, one SB3 wrapper, one mask builder, and the observation
layout derived from wide_env.sim.observation everywhere: a key added there reaches the networks' inputs
and the analytic policies' parsed arrays without another change."""

from __future__ import annotations

from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces

import wide_env  # noqa: F401
from wide_env.sim import observation as ol

th.set_num_threads(1)


def _space(layout, flat=False):
    boxes = {k: spaces.Box(lo, hi, shape=(n,), dtype=np.float32) for k, (n, lo, hi) in layout.items()}
    if flat:
        return spaces.Box(np.concatenate([b.low for b in boxes.values()]),
                          np.concatenate([b.high for b in boxes.values()]), dtype=np.float32)
    return spaces.Dict(boxes)


LOAD = np.linspace(0.05, 0.95, 8).astype(np.float32)


@pytest.fixture
def decode_obs():
    """A real observation of the default env (taken before the layout is patched: the simulator itself
    would lay out the new key, and filling it is the simulator's job) plus the new key's values."""
    env = gym.make("wide_env/WideMoE-v0", config={"n_tokens": 2})
    obs, _ = env.reset(seed=1)
    return {**obs, "helper_load": LOAD.copy()}, env.unwrapped.problem


@pytest.fixture
def new_decode_key(decode_obs, monkeypatch):
    """A per-expert key 'helper_load' declared the way a developer would: in the layout and its metadata."""
    original = ol.observation_layout

    def layout(n_experts, top_k, n_nodes):
        out = original(n_experts, top_k, n_nodes)
        out["helper_load"] = (n_experts, 0.0, 1.0)
        return out

    monkeypatch.setattr(ol, "observation_layout", layout)
    monkeypatch.setitem(ol.OBSERVATION_AXES, "helper_load", ("expert",))
    monkeypatch.setitem(ol.OBSERVATION_SCALES, "helper_load", "fraction")
    return layout


def test_a_new_per_expert_key_reaches_the_expert_set_network(decode_obs, new_decode_key):
    from agents.networks import ExpertSetPolicy

    layout = new_decode_key(8, 2, 8)
    load = LOAD
    obs, _ = decode_obs
    policy = ExpertSetPolicy(_space(layout), spaces.MultiBinary(8), lambda _: 1e-3, n_experts=8, top_k=2, n_nodes=8)
    batch = {k: th.as_tensor(v[None]) for k, v in obs.items()}
    own, _, _ = policy.features_extractor.element_inputs(batch)
    assert own.shape[:2] == (1, 8)
    # an expert-token feature column carries exactly the new key's values
    assert any(np.allclose(own[0, :, j].numpy(), load) for j in range(own.shape[-1]))
    with th.no_grad():
        logits = policy.get_distribution(batch).distribution.logits
        batch["helper_load"] = th.as_tensor(load[::-1].copy()[None].astype(np.float32))
        changed = policy.get_distribution(batch).distribution.logits
    assert not th.allclose(logits, changed)


def test_a_new_key_reaches_the_flat_mlp_extractor(decode_obs, new_decode_key):
    from agents.networks import WideFlatExtractor

    layout = new_decode_key(8, 2, 8)
    load = LOAD
    obs, _ = decode_obs
    flat = np.concatenate([obs[k] for k in layout])
    ext = WideFlatExtractor(_space(layout, flat=True), n_experts=8, top_k=2, n_nodes=8)
    feats = ext(th.as_tensor(flat[None]))[0].numpy()
    np.testing.assert_allclose(feats[-8:], load)  # the last key in layout order, a fraction, as it is


def test_a_new_key_reaches_the_policies_parsed_arrays(decode_obs, new_decode_key):
    from baselines.observation import parse_observation
    from baselines.policies import POLICIES

    layout = new_decode_key(8, 2, 8)
    load = LOAD
    obs, real = decode_obs
    problem = SimpleNamespace(**{**real.__dict__, "obs_slices": ol.observation_slices(layout)})
    arrays, single = parse_observation(obs, problem)
    assert single and np.allclose(arrays["helper_load"][0], load)
    flat = np.concatenate([obs[k] for k in layout])
    arrays, _ = parse_observation(np.stack([flat, flat]), problem)
    assert arrays["helper_load"].shape == (2, 8) and np.allclose(arrays["helper_load"][1], load)
    for name, cls in POLICIES.items():  # every analytic policy still acts on the extended observation
        action = cls(problem)(obs)
        assert action.shape == (8,), name
    with pytest.raises(KeyError, match="helper_load"):
        parse_observation({k: v for k, v in obs.items() if k != "helper_load"}, problem)


def test_a_new_per_token_prefill_key_is_broadcast_over_experts(monkeypatch):
    from agents.networks import ExpertSetPolicy

    original = ol.prefill_observation_layout

    def layout(T, E, K, N):
        out = original(T, E, K, N)
        out["token_importance"] = (T, 0.0, 1.0)
        return out

    env = gym.make("wide_env/WideMoEPrefill-v0", prompt_tokens=4)
    obs, _ = env.reset(seed=0)
    monkeypatch.setattr(ol, "prefill_observation_layout", layout)
    monkeypatch.setitem(ol.PREFILL_OBSERVATION_AXES, "token_importance", ("token",))
    monkeypatch.setitem(ol.OBSERVATION_SCALES, "token_importance", "fraction")
    weight = np.array([0.1, 0.4, 0.7, 0.9], np.float32)
    obs["token_importance"] = weight
    space = _space(layout(4, 8, 2, 8))
    policy = ExpertSetPolicy(space, spaces.MultiBinary(32), lambda _: 1e-3, n_experts=8, top_k=2, n_nodes=8,
                             prompt_tokens=4)
    own, pair, _ = policy.features_extractor.element_inputs({k: th.as_tensor(v[None]) for k, v in obs.items()})
    assert own.shape[:3] == (1, 4, 8) and pair.shape[:4] == (1, 4, 8, 2)
    expected = np.repeat(weight[:, None], 8, axis=1)  # element (t, e) sees token t's value
    assert any(np.allclose(own[0, :, :, j].numpy(), expected) for j in range(own.shape[-1]))


def test_axes_metadata_matches_both_layouts_and_a_key_without_it_is_named():
    for E, K, N, T in ((8, 2, 8, 4), (32, 4, 7, 3), (5, 1, 3, 1)):
        lengths = ol.axis_lengths(E, K, N, T)
        shapes = ol.key_shapes(ol.observation_layout(E, K, N), ol.OBSERVATION_AXES, lengths)
        assert shapes["deviation_table"] == (K, E + 1) and shapes["position"] == (2,)
        shapes = ol.key_shapes(ol.prefill_observation_layout(T, E, K, N), ol.PREFILL_OBSERVATION_AXES, lengths)
        assert shapes["deviation_table"] == (T, K, E + 1) and shapes["load_energy_cost"] == (E, T)
    layout = ol.observation_layout(8, 2, 8)
    layout["mystery"] = (3, 0.0, 1.0)
    with pytest.raises(KeyError, match="'mystery'.*wide_env/sim/observation.py"):
        ol.key_shapes(layout, ol.OBSERVATION_AXES, ol.axis_lengths(8, 2, 8))


def test_one_registry_per_kind_of_name():
    import agents
    import agents.common as common
    import agents.evaluation as evaluation
    import baselines.policies as policies
    from agents.registry import ALGORITHMS, TRAINABLE_ALGORITHMS
    from agents.run_config import build_parser
    from agents.sb3_policy import SB3Policy

    algo_action = next(a for a in build_parser()._actions if a.dest == "algo")
    assert tuple(algo_action.choices) == TRAINABLE_ALGORITHMS == agents.TRAINABLE_ALGORITHMS
    assert set(TRAINABLE_ALGORITHMS) < set(ALGORITHMS)
    # no second copy of the names, the deep merge or the SB3 wrapper
    for module, names in ((common, ("ALGO_NAMES", "_merge", "merge_dicts", "native_vec_factory")),
                          (policies, ("SB3_ALGOS", "SB3Policy", "REQUIRED_KEYS")),
                          (evaluation, ("AgentPolicy",)), (agents, ("ALGOS",))):
        for name in names:
            assert not hasattr(module, name), f"{module.__name__}.{name}"
    env = gym.make("wide_env/WideMoE-v0", config={"n_tokens": 2})
    assert type(policies.make_policy("ppo:missing.zip", env)) is SB3Policy
    with pytest.raises(ValueError, match=str(list(ALGORITHMS)).replace("[", r"\[").replace("]", r"\]")):
        policies.make_policy("sac:model.zip", env)


def test_sb3_policy_acts_on_prefill_batches():
    from stable_baselines3 import PPO

    from agents.common import resolve_policy
    from agents.sb3_policy import SB3Policy

    env = gym.make("wide_env/WideMoEPrefill-v0")
    pol, kw = resolve_policy("expert_set", "ppo", env.observation_space, env.unwrapped.problem, {})
    model = PPO(pol, env, n_steps=8, batch_size=8, device="cpu", policy_kwargs=kw)
    policy = SB3Policy(model, env.unwrapped.problem)
    obs, _ = env.reset(seed=0)
    assert policy(obs).shape == (64,)
    batch = {k: np.stack([v, v, v]) for k, v in obs.items()}
    actions = policy(batch)
    assert actions.shape == (3, 64) and (actions == actions[0]).all()
