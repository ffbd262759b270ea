"""The batched numpy core: batched and single-episode paths agree; plans and chunks behave."""

import numpy as np
import pytest

from wide_env.config import WideConfig
from wide_env.envs.decode import INFO_KEYS, WideMoEEnv
from wide_env.gating import make_gating_source
from wide_env.sim.decode import DecodeSimulator


def make_sim(**config):
    cfg = WideConfig.from_dict({"gating": {"source": "synthetic"}, **config})
    return DecodeSimulator(cfg, make_gating_source(cfg))


@pytest.mark.parametrize("config", [
    {}, {"deadline": {"enforce": False}}, {"compute": {"queue_delay_mean_s": 0.01}},
    {"budget": {"mode": "token", "layer_weights": [1.0, 2.0, 0.5, 1.0]}}, {"profile": "gpt-oss-20b"},
    {"radio": {"energy_scope": "system"}}, {"placement": {"hosts": [[0, 1, 2, 3, 0, 1, 2, 3]] * 4}},
])
def test_python_fast_path_equals_batched_evaluate(config):
    sim = make_sim(**config)
    rng = np.random.default_rng(0)
    state = sim.reset(rng, 16)
    E = sim.n_experts
    for _ in range(3 * sim.n_layers):
        executed = rng.random((16, E)) < 0.3
        view = sim.view(state)
        batched = sim.evaluate(view, executed)
        for b in range(16):
            lists = sim.plan_lists(state, b)
            one = sim.view(state, b)
            single = sim.evaluate_one(lists, one.token - int(state.chunk_start[b]), one.layer,
                                      executed[b].astype(int).tolist(), float(one.budget), float(one.budget_unit))
            for key in INFO_KEYS + ("reward",):
                assert single[key] == pytest.approx(float(batched[key][b]), rel=1e-12, abs=1e-15), key
            assert single["server"] == batched["server"][b].tolist()
        sim.advance(rng, state, batched["weighted_deviation"])


def test_batched_episodes_truncate_together_and_chunks_replan():
    sim = make_sim(n_tokens=5)
    rng = np.random.default_rng(1)
    state = sim.reset(rng, 1000)  # chunk smaller than the episode: re-planning must happen mid-episode
    assert state.chunk_tokens < 5 or sim.chunk_size(1000) == 5
    steps = 0
    while True:
        out, done = sim.step(rng, state, np.ones((1000, sim.n_experts), dtype=bool))
        steps += 1
        if done.all():
            break
        assert not done.any()
    assert steps == 5 * sim.n_layers


def test_chunked_and_unchunked_plans_have_the_same_statistics():
    # Same physics whatever the chunking: mean Top-K energy per layer-step over many episodes
    sim = make_sim(n_tokens=8)
    energies = []
    for chunk in (1, 8):
        rng = np.random.default_rng(5)
        state = sim.reset(rng, 400, chunk=chunk)
        total = []
        for _ in range(8 * sim.n_layers):
            view = sim.view(state)
            total.append(np.log(view.topk_energy))
            sim.advance(rng, state, np.zeros(400))
        energies.append(np.mean(total))
    assert energies[0] == pytest.approx(energies[1], abs=0.15)


def test_reset_rows_only_touches_those_rows():
    sim = make_sim()
    rng = np.random.default_rng(2)
    state = sim.reset(rng, 6)
    sim.advance(rng, state, np.zeros(6))
    before = sim.view(state)
    probs = before.probs.copy()
    sim.reset_rows(rng, state, np.array([1, 4]))
    after = sim.view(state)
    keep = [0, 2, 3, 5]
    assert np.array_equal(after.probs[keep], probs[keep])
    assert (state.layer[[1, 4]] == 0).all() and (state.layer[keep] == 1).all()


def test_fading_per_layer_changes_channel_within_a_token():
    env = WideMoEEnv({"channel": {"fading_per_layer": True}})
    obs, _ = env.reset(seed=0)
    gains = [obs["channel_gain_db"]]
    for _ in range(3):
        obs, *_ = env.step(np.zeros(8, dtype=np.int8))
        gains.append(obs["channel_gain_db"])
    assert all(not np.array_equal(gains[0], g) for g in gains[1:])
    env = WideMoEEnv({})
    obs, _ = env.reset(seed=0)
    first = obs["channel_gain_db"]
    obs, *_ = env.step(np.zeros(8, dtype=np.int8))
    assert np.array_equal(first, obs["channel_gain_db"])  # per-token fading: same h in every layer


def test_mobility_moves_helpers_within_annulus():
    env = WideMoEEnv({"placement": {"mobility": True}, "channel": {"token_interval_s": 5.0}})
    env.reset(seed=0)
    track = env._state.plan.helper_positions[..., 0]  # (tokens, N, 2)
    moved = np.linalg.norm(track[6] - track[0], axis=-1)
    assert (moved > 0).all() and (moved <= 6 * 5.0 * 1.5 + 1e-9).all()  # at most speed_max * time
    r = np.linalg.norm(track, axis=-1)
    assert (r >= 10.0 - 1e-9).all() and (r <= 150.0 + 1e-9).all()


def test_python_accuracy_path_equals_batched_record_accuracy():
    cfg = WideConfig.from_dict({})
    sim = DecodeSimulator(cfg, make_gating_source(cfg))
    assert sim.has_accuracy
    rng = np.random.default_rng(3)
    batched, single = sim.reset(rng, 8), sim.reset(np.random.default_rng(3), 8)
    for _ in range(3 * sim.n_layers):
        executed = rng.random((8, sim.n_experts)) < 0.4
        view = sim.view(batched)
        out = sim.evaluate(view, executed)
        acc = sim.record_accuracy(batched, out["server"])
        for b in range(8):
            one = sim.record_accuracy_one(single, out["server"][b].tolist(), view.topk_idx[b].tolist(), b)
            for key, value in one.items():
                assert value == pytest.approx(float(acc[key][b])), key
        sim.advance(rng, batched, out["weighted_deviation"])
        sim.advance(rng, single, out["weighted_deviation"])  # same draws: `single` mirrors `batched`
