"""The compiled decoder runs a layer's streams together (wide_env.models.fused_kernels, fused_math): its
vectorised exp and erf against libm, a stream's numbers independent of the streams beside it, shared trace
window prefixes equal to copied ones, and the torch StreamDecoder's predictions at B > 1 with streams at
different layers."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import gymnasium as gym  # noqa: E402

import wide_env  # noqa: E402,F401
from wide_env.models import fused_math as fm  # noqa: E402
from wide_env.models.decoder import StreamDecoder  # noqa: E402
from wide_env.models.fused_decoder import FusedDecoder  # noqa: E402
from wide_env.models.moe_lm import load_checkpoint  # noqa: E402
from wide_env.profiles import profile_checkpoint  # noqa: E402

LOGIT_ATOL = 2e-4  # as tests/test_fused_decoder.py: float32 sums in another order than torch's, over L layers


def test_erf_is_libms_to_1e12():
    x = np.linspace(-7.0, 7.0, 140_001)
    got = np.array([fm.erf(v) for v in x])
    want = np.array([math.erf(v) for v in x])
    inside = np.abs(x) < 4.0
    assert np.abs(got - want)[inside].max() < 1e-12
    assert np.abs(got - want)[~inside].max() < 1.6e-8 and (np.abs(got[~inside]) == 1.0).all()


def test_exp_rounds_like_libm():
    """exp(s - top) in float32: within one unit in the last place of the correctly rounded value everywhere,
    equal to it almost everywhere (float64 inside, ~1e-15 relative)."""
    rng = np.random.default_rng(0)
    s = np.concatenate([rng.uniform(-110, 0, 4000), -rng.exponential(1.0, 4000)]).astype(np.float32)
    top = np.float32(0.0)
    got = s.copy()
    poly, bits = np.zeros(s.size), np.zeros(s.size, np.int64)
    fm.exp_shifted(got, s.size, top, poly, bits, bits.view(np.float64))
    want = np.array([np.float32(math.exp(float(v - top))) for v in s])
    ulp = np.spacing(np.maximum(np.abs(want), np.finfo(np.float32).tiny))
    assert (np.abs(got - want) <= ulp).all()
    assert (got == want).mean() > 0.999


def test_gelu_is_the_float64_gelu_rounded():
    rng = np.random.default_rng(1)
    a = (rng.standard_normal((37, 64)) * 3).astype(np.float32)
    got = a.copy()
    fm.gelu_rows(got)
    v = a.astype(np.float64)
    want = (0.5 * v * (1 + np.vectorize(math.erf)(v / math.sqrt(2)))).astype(np.float32)
    # one unit in the last place, or erf's 1e-13 where 1 + erf cancels (GELU near 0 for negative inputs; torch's
    # float32 GELU is 5e-7 off there); beyond -4 sqrt(2) erf is -1, GELU 0 where the exact one is above -1e-7
    err, ulp = np.abs(got - want), np.maximum(np.spacing(np.abs(want)), 1e-12)
    inside = a > -4.0 * math.sqrt(2)
    assert (err[inside] <= ulp[inside]).all() and (err[~inside] < 1e-7).all()
    np.testing.assert_allclose(got, torch.nn.functional.gelu(torch.from_numpy(a)).numpy(), atol=2e-6)


@pytest.mark.parametrize("rows", [1, 3, 16, 37])
def test_a_rows_product_does_not_depend_on_the_rows_beside_it(rows):
    rng = np.random.default_rng(rows)
    w = rng.standard_normal((66, 96)).astype(np.float32)  # an input count that is not a multiple of four
    b = rng.standard_normal(96).astype(np.float32)
    x = rng.standard_normal((rows, 66)).astype(np.float32)
    out = np.empty((rows, 96), np.float32)
    fm.linear_rows(x, w, b, out)
    for r in range(rows):
        alone = np.empty((1, 96), np.float32)
        fm.linear_rows(x[r:r + 1], w, b, alone)
        np.testing.assert_array_equal(out[r], alone[0])
    np.testing.assert_allclose(out, x @ w + b, rtol=1e-5, atol=1e-4)


def _model(profile):
    model, _ = load_checkpoint(profile_checkpoint(profile))
    cfg = model.cfg
    D = np.random.default_rng(0).random((cfg.n_layer, cfg.n_expert, cfg.n_expert + 1))
    D[:, np.arange(cfg.n_expert), np.arange(cfg.n_expert)] = 0.0
    return model, D


def _advance(dec, rows, masks):
    """Step ``rows`` of a decoder one layer (the others wait), as an episode whose token is the last: returns
    the rows that finished."""
    n = dec.n_streams
    stepped = np.zeros(n, bool)
    stepped[rows] = True
    nxt = dec.layer + 1
    done = nxt >= dec.L
    allowed = np.zeros((n, dec.E), bool)
    allowed[rows] = masks
    zeros = np.zeros(n, np.int64)
    finished = dec.advance(stepped, allowed, np.where(done, 0, nxt), zeros, zeros, done, zeros)
    return np.flatnonzero(finished)


@pytest.mark.parametrize("profile", ["switch-base-8", "mixtral-8x7b", "gpt-oss-20b"])
def test_streams_at_different_layers_decode_as_alone_and_as_torch(profile):
    """Six streams, three of them sharing a trace window's prefix, started at different steps (so every call
    holds streams at different layers), with random expert masks: every stream's logits are bitwise those it
    gets alone in a one-stream decoder, and the torch StreamDecoder's to float32 rounding (same prediction)."""
    model, D = _model(profile)
    cfg = model.cfg
    L, E = cfg.n_layer, cfg.n_expert
    context = gym.make({"switch-base-8": "wide_env/WideMoE-Switch-v0", "mixtral-8x7b": "wide_env/WideMoE-Mixtral-v0",
                        "gpt-oss-20b": "wide_env/WideMoE-GptOss-v0"}[profile]).unwrapped._batch.model.context
    B = 6
    batch = FusedDecoder(model, D, B, prefix_slots=2)
    alone = [FusedDecoder(model, D, 1, weights=batch.weights, prefix_slots=1) for _ in range(B)]
    ref = StreamDecoder(model, D, B)
    w0, w1 = int(context.window_starts[1]), int(context.window_starts[2])
    starts = [w0 + 3, w0 + 40, w0 + 41, w1 + 7, w1 + 60, w0 + 20]
    for row, start in enumerate(starts):
        window, keys, values = context.window_run(start)
        ref.set_prefix(row, *context.prefix(start))
        if row < 5:  # rows 0-4 read shared slots, row 5 its own copy
            batch.share_prefix(row, window, keys, values, start - window)
            alone[row].share_prefix(0, window, keys, values, start - window)
        else:
            batch.set_prefix(row, *context.prefix(start))
            alone[row].set_prefix(0, *context.prefix(start))
    assert sorted(batch._refs) == [2, 3]
    rng = np.random.default_rng(7)
    masks = rng.random((B, 3, L, E)) < 0.6
    tokens = rng.integers(0, cfg.vocab_size, (B, 3))
    done = np.zeros(B, np.int64)  # tokens finished per stream
    compared = 0
    for step in range(3 * L + 2 * B + 2):
        for row in range(B):  # stream r starts at step 2r; a stream starts its next token after its last one
            if step >= 2 * row and batch.layer[row] < 0 and done[row] < 3:
                token = [tokens[row, done[row]]]
                batch.begin([row], token)
                alone[row].begin([0], token)
                ref.begin([row], token)
        going = np.flatnonzero(batch.layer >= 0)
        if not going.size:
            break
        m = masks[going, done[going], batch.layer[going]]
        finished = _advance(batch, going, m)
        for i, row in enumerate(going):
            assert _advance(alone[row], [0], m[i:i + 1]).size == (row in finished)
            ref.execute([row], m[i:i + 1])
        for row in finished:
            np.testing.assert_array_equal(batch.logits[row], alone[row].logits[0])
            want = ref.finish([row]).numpy()[0]
            np.testing.assert_allclose(batch.logits[row], want, atol=LOGIT_ATOL)
            assert batch.logits[row].argmax() == want.argmax()
            done[row] += 1
            compared += 1
    assert compared == 3 * B


def test_shared_prefix_slots_are_reused_and_run_out_with_a_clear_error():
    model, D = _model("switch-base-8")
    cfg = model.cfg
    hd = cfg.d_model // cfg.n_head
    run = lambda n: (np.random.default_rng(n).standard_normal((cfg.n_layer, cfg.n_head, n, hd)),) * 2  # noqa: E731
    dec = FusedDecoder(model, D, 3, prefix_slots=2)
    dec.share_prefix(0, "a", *run(10), 4)
    dec.share_prefix(1, "a", *run(10), 9)  # the same window: no new slot
    assert list(dec._refs) == [2, 0] and dec.length[1] == 9
    dec.share_prefix(2, "b", *run(12), 5)
    assert list(dec._refs) == [2, 1]
    with pytest.raises(RuntimeError, match="prefix slots are in use"):
        _two_windows_one_slot(model, D, run)
    dec.reset([0, 1])  # window a's slot is free again: window c takes it
    dec.share_prefix(0, "c", *run(8), 2)
    assert list(dec._refs) == [1, 1] and dec._window_of == ["c", "b"]
    with pytest.raises(ValueError, match="prefix length n must be in"):
        dec.share_prefix(0, "c", *run(8), 9)
    # a slot copies its window's positions as far as its streams need them: a longer prefix later extends it
    dec.share_prefix(1, "c", *run(8), 7)
    assert dec._loaded[0] == 7 and dec.length[1] == 7
    np.testing.assert_array_equal(dec._shared_keys[0, :, :, :, :7], run(8)[0].transpose(0, 1, 3, 2)[..., :7].astype(np.float32))


def test_a_stream_keeps_the_windows_it_visited_in_spare_slots():
    """One stream with three slots: a window visited before is shared again without its keys (share_loaded), and
    a new window takes the least recently used free slot (an unused one first)."""
    model, D = _model("switch-base-8")
    cfg = model.cfg
    hd = cfg.d_model // cfg.n_head
    run = lambda n: (np.random.default_rng(n).standard_normal((cfg.n_layer, cfg.n_head, n, hd)),) * 2  # noqa: E731
    dec = FusedDecoder(model, D, 1, prefix_slots=3)
    assert not dec.share_loaded(0, "a", 0)  # no slot holds a yet
    for window in "abc":
        dec.share_prefix(0, window, *run(10), 6)
    assert dec._window_of == ["a", "b", "c"] and list(dec._refs) == [0, 0, 1]
    assert dec.share_loaded(0, "a", 4)  # positions it holds: shared, nothing copied
    assert list(dec._refs) == [1, 0, 0] and dec.length[0] == 4 and dec._slot[0] == 0
    assert not dec.share_loaded(0, "a", 7)  # more positions than it holds: share_prefix copies them
    dec.share_prefix(0, "d", *run(10), 6)  # b's slot is the least recently used free one
    assert dec._window_of == ["a", "d", "c"]
    dec.share_prefix(0, "a", *run(10), 8)  # a again, with more positions: copied on top
    assert dec._loaded[0] == 8 and dec._window_of == ["a", "d", "c"]
    np.testing.assert_array_equal(dec._shared_keys[0, :, :, :, :8], run(10)[0].transpose(0, 1, 3, 2)[..., :8].astype(np.float32))


def test_single_model_env_keeps_every_window_of_the_shipped_traces():
    """A single env on Mixtral keeps all of its trace's windows (32 MiB of slots): no window ever gives up its
    slot, so a new episode copies at most the positions its window's slot does not hold yet."""
    env = gym.make("wide_env/WideMoE-Mixtral-v0")
    backend = env.unwrapped.episode_batch.model
    dec, context = backend.decoder, backend.context
    assert dec._refs.size == len(context.window_starts) == 32
    slot_of = {}
    for seed in range(200):
        env.reset(seed=seed)
        window = context.window(env.unwrapped.trace_start)
        assert slot_of.setdefault(window, int(dec._slot[0])) == dec._slot[0]
    assert len(slot_of) == 32


def _two_windows_one_slot(model, D, run):
    dec = FusedDecoder(model, D, 2, prefix_slots=1)
    dec.share_prefix(0, "a", *run(3), 1)
    dec.share_prefix(1, "b", *run(3), 1)


def test_vector_env_streams_share_their_windows():
    """ModelAccuracy points each row at a slot of its trace window: one slot per window in use."""
    env = gym.make_vec("wide_env/WideMoE-Mixtral-v0", num_envs=12, vectorization_mode="vector_entry_point")
    env.reset(seed=3)
    u = env.unwrapped
    dec, state = u._batch.model.decoder, u._batch.state
    context = u._batch.model.context
    windows = [context.window(int(s)) for s in state.start]
    assert dec._refs.sum() == 12
    assert len({int(s) for s in dec._slot}) == len(set(windows))
    for row, w in enumerate(windows):
        assert dec._window_of[dec._slot[row]] == w
        assert dec.length[row] == state.start[row] - w
