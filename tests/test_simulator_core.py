"""The batched decoding core: chunks and re-planning, resets of some rows, channel timing, the accuracy
bookkeeping of the step kernel against the effect tables, and errors of the vector-env constructor."""

import numpy as np
import pytest

from wide_env.config import WideConfig
from wide_env.envs.decode import INFO_KEYS, WideMoEEnv
from wide_env.gating import make_gating_source
from wide_env.sim.decode import DecodeSimulator


def make_sim(**config):
    cfg = WideConfig.from_dict({"gating": {"source": "synthetic"}, **config})
    return DecodeSimulator(cfg, make_gating_source(cfg))


def test_batched_episodes_truncate_together_and_chunks_replan():
    sim = make_sim(n_tokens=5)
    rng = np.random.default_rng(1)
    state = sim.reset(rng, 1000, chunk=2)  # chunks shorter than the episode: re-planning mid-episode
    assert state.plan.chunk_tokens == 2
    steps = 0
    while True:
        sim.step(rng, state, np.ones((1000, sim.n_experts), dtype=bool))
        steps += 1
        if state.done.all():
            break
        assert not state.done.any()
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
            sim.step(rng, state, np.zeros((400, sim.n_experts), dtype=bool))
        energies.append(np.mean(total))
    assert energies[0] == pytest.approx(energies[1], abs=0.15)


def test_reset_rows_only_touches_those_rows():
    sim = make_sim()
    rng = np.random.default_rng(2)
    state = sim.reset(rng, 6)
    sim.step(rng, state, np.zeros((6, sim.n_experts), dtype=bool))
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
    track = env._state.plan.helper_positions[:, 0, 0]  # (tokens, N, 2)
    moved = np.linalg.norm(track[6] - track[0], axis=-1)
    assert (moved > 0).all() and (moved <= 6 * 5.0 * 1.5 + 1e-9).all()  # at most speed_max * time
    r = np.linalg.norm(track, axis=-1)
    assert (r >= 10.0 - 1e-9).all() and (r <= 150.0 + 1e-9).all()


def test_accuracy_bookkeeping_follows_the_accuracy_rule():
    """The kernel's accuracy of each token, step by step, against the numpy reference of the accuracy rule
    (wide_env.gating.effects: fold each layer's table rows into the token's accumulator, decide, carry the
    context term to the next token), with the servers of each step's outcome."""
    from wide_env.gating.effects import CONTEXT_DECAY, CONTEXT_WEIGHT, context_after

    cfg = WideConfig.from_dict({"n_tokens": 6})
    sim = DecodeSimulator(cfg, make_gating_source(cfg))
    lookup = sim.source.logit_effects
    assert sim.has_accuracy and CONTEXT_DECAY > 0 and CONTEXT_WEIGHT > 0
    rng = np.random.default_rng(3)
    B = 16
    state = sim.reset(rng, B)
    acc, context = lookup.empty(B), np.zeros(B)
    seen = {"several": 0, "wrong": 0}
    for _ in range(6 * sim.n_layers):
        position, layer = state.start + state.token, state.layer.copy()
        out = sim.step(rng, state, rng.random((B, sim.n_experts)) < 0.5)
        acc = lookup.fold(acc, position, layer, out.server, strict=True)
        correct, same, dloss = lookup.decide(position, acc, context)
        np.testing.assert_array_equal(out["accuracy_correct"], correct)
        np.testing.assert_array_equal(out["accuracy_same"], same)
        np.testing.assert_allclose(out["delta_loss"], dloss, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(out["accuracy_full"], lookup.base[position, 0] >= lookup.base[position].max(1))
        np.testing.assert_array_equal(out["token_complete"], layer == sim.n_layers - 1)
        seen["several"] += int((acc[:, -1] > 1.5).sum())
        seen["wrong"] += int((~correct & out["accuracy_full"].astype(bool)).sum())
        done = layer == sim.n_layers - 1  # a new token starts afresh, carrying the context term
        context[done] = context_after(context[done], dloss[done])
        acc[done] = 0.0
    assert seen["several"] > 0 and seen["wrong"] > 0  # several perturbations per token, and lost predictions


def test_a_failed_vector_env_constructor_raises_only_its_own_error():
    import gc
    import sys

    from wide_env.envs.vector import WideMoEVectorEnv

    seen = []
    hook, sys.unraisablehook = sys.unraisablehook, seen.append
    try:
        with pytest.raises(ValueError, match="num_envs"):
            WideMoEVectorEnv(0)
        with pytest.raises(ValueError, match="autoreset_mode"):
            WideMoEVectorEnv(2, autoreset_mode="sometimes")
        gc.collect()
    finally:
        sys.unraisablehook = hook
    assert not seen, [str(u.exc_value) for u in seen]  # no AttributeError from __del__ / close
