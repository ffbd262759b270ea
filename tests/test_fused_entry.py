"""The compiled decoder's calls at B = 1 (wide_env.models.fused_layout, FusedDecoder.bind): views carved from the
packed buffers alias them, the bound call through the compiled entry equals the dispatched one bitwise, and a
model-accuracy env's decoder survives pickling and deep copies (its views are rebuilt, not copied apart)."""

import copy
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import gymnasium as gym  # noqa: E402
from numba import njit  # noqa: E402

import wide_env  # noqa: E402,F401
from wide_env.models import fused_layout as fl  # noqa: E402
from wide_env.models.fused_decoder import FusedDecoder  # noqa: E402
from wide_env.models.moe_lm import load_checkpoint  # noqa: E402
from wide_env.profiles import profile_checkpoint  # noqa: E402


def _decoder(profile="mixtral-8x7b", n=3):
    model, _ = load_checkpoint(profile_checkpoint(profile))
    cfg = model.cfg
    D = np.random.default_rng(0).random((cfg.n_layer, cfg.n_expert, cfg.n_expert + 1))
    D[:, np.arange(cfg.n_expert), np.arange(cfg.n_expert)] = 0.0
    return model, D, FusedDecoder(model, D, n, prefix_slots=2)


@njit
def _mark(fbuf, fm, ibuf, im, wbuf, wm):
    """Write through the compiled views: x[1, 2] = 7, layer[2] = 5, logits[0, 3] = -1; read W's shapes."""
    S = fl.streams(fbuf, fm, ibuf, im)
    W = fl.weights(wbuf, wm)
    S[2][1, 2] = 7.0
    S[9][2] = 5
    S[14][0, 3] = -1.0
    return W[3].shape, W[8].shape, S[0].shape, S[10].shape


def test_compiled_views_alias_the_packed_buffers():
    model, _, dec = _decoder()
    qkv_w, w1 = fl.views(*dec.weights)[3], fl.views(*dec.weights)[8]
    shapes = _mark(*dec._floats, *dec._ints, *dec.weights)
    assert shapes == (qkv_w.shape, w1.shape, dec.keys.shape, dec._shared_keys.shape)
    assert dec.x[1, 2] == 7.0 and dec.layer[2] == 5 and dec.logits[0, 3] == -1.0
    assert dec.x.sum() == 7.0  # nothing else written


def test_bound_advance_equals_the_dispatched_one():
    """Two decoders, the same contexts, tokens and masks over two tokens: advance() and bind() + advance_bound()
    give bitwise the same logits, finished rows and positions."""
    model, D, a = _decoder()
    b = FusedDecoder(model, D, 3, weights=a.weights, prefix_slots=2)
    cfg = model.cfg
    L, E, n = cfg.n_layer, cfg.n_expert, 3
    rng = np.random.default_rng(1)
    H, hd = cfg.n_head, cfg.d_model // cfg.n_head
    keys = rng.standard_normal((L, H, 20, hd)).astype(np.float32)
    values = rng.standard_normal((L, H, 20, hd)).astype(np.float32)
    token_id = rng.integers(0, cfg.vocab_size, 64)
    for dec in (a, b):
        for row, p in enumerate((5, 12, 20)):
            dec.share_prefix(row, "w", keys, values, p)
        dec.begin(np.arange(n), token_id[:n], np.arange(n))
    stepped, allowed = np.ones(n, bool), np.zeros((n, E), bool)
    layer, start, token, done = (np.zeros(n, np.int64), np.arange(n, dtype=np.int64), np.zeros(n, np.int64),
                                 np.zeros(n, bool))
    b.bind(stepped, allowed, layer, start, token, done, token_id)
    finished = 0
    for t in range(2):
        for l in range(L):
            allowed[:] = rng.random((n, E)) < 0.6
            layer[:] = (l + 1) % L
            token[:] = t + (l + 1 == L)
            done[:] = t == 1 and l + 1 == L
            got_a = a.advance(stepped, allowed, layer, start, token, done, token_id).copy()
            got_b = b.advance_bound()
            np.testing.assert_array_equal(got_a, got_b)
            assert a.n_finished == b.n_finished == got_a.sum()
            finished += b.n_finished
            np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.logits, b.logits)
        np.testing.assert_array_equal(a.finished_at, b.finished_at)
    assert finished == 2 * n
    layer[:] = 3  # out of step: refused with the dispatched call's error
    b.begin([0], token_id[:1])
    with pytest.raises(RuntimeError, match="stream 0 is at layer 0"):
        b.advance_bound()


def test_bind_refuses_arrays_of_the_wrong_shape():
    _, _, dec = _decoder()
    n, E = dec.n_streams, dec.E
    ok = dict(stepped=np.ones(n, bool), allowed=np.ones((n, E), bool), env_layer=np.zeros(n, np.int64),
              env_start=np.zeros(n, np.int64), env_token=np.zeros(n, np.int64), env_done=np.zeros(n, bool),
              token_id=np.zeros(10, np.int64))
    dec.bind(**ok)
    with pytest.raises(ValueError, match=r"allowed must be an array of shape \(3, 8\)"):
        dec.bind(**{**ok, "allowed": np.ones((n, E + 1), bool)})
    with pytest.raises(ValueError, match="env_done must be an array of shape"):
        dec.bind(**{**ok, "env_done": [False] * n})
    with pytest.raises(ValueError, match="token_id must be a 1-d array"):
        dec.bind(**{**ok, "token_id": np.zeros((2, 5), np.int64)})


def test_a_pickled_or_copied_model_accuracy_env_decodes_like_the_original():
    """Mid-episode, then after a reset with the same seed: a pickled and a deep-copied env report what the
    original reports (their decoders' Python-side writes, e.g. a new episode's context, reach the kernel)."""
    env = gym.make("wide_env/WideMoE-Mixtral-v0", config={"n_tokens": 2})
    env.reset(seed=5)
    rng = np.random.default_rng(0)
    for _ in range(20):
        env.step((rng.random(8) < 0.5).astype(np.int8))
    actions = (rng.random((60, 8)) < 0.5).astype(np.int8)
    runs = []
    for clone in (pickle.loads(pickle.dumps(env)), copy.deepcopy(env), env):
        got = [clone.step(a)[4] for a in actions[:12]]  # to the end of the first episode's first token
        clone.reset(seed=9)
        got += [clone.step(a)[4] for a in actions[12:]]  # the new episode's first token
        runs.append([(i["accuracy_correct"], i["accuracy_same"], i["delta_loss"]) for i in got if i["token_complete"]])
    assert len(runs[2]) == 2
    assert runs[0] == runs[2] and runs[1] == runs[2]


@pytest.mark.parametrize("E,K", [(8, 1), (8, 2), (32, 4), (5, 5)])
def test_gate_top_k_is_the_stable_descending_order(E, K):
    """The router's gate on logits with many ties: probabilities are the float64 softmax rounded to float32, the
    Top-K the first K of a stable descending sort (the first of equal probabilities first), the combine weights
    the Top-K probabilities (renormalised in float32 when asked)."""
    from wide_env.models.fused_kernels import _gate

    rng = np.random.default_rng(E * 10 + K)
    for trial in range(200):
        logits = (rng.integers(-3, 3, E) * 0.5).astype(np.float32)  # few distinct values: ties everywhere
        probs, idx, w, ex = np.zeros(E, np.float32), np.zeros(K, np.int64), np.zeros(K, np.float32), np.zeros(E)
        renorm = bool(trial % 2)
        _gate(logits, probs, idx, w, K, E, renorm, ex)
        z = np.exp(logits.astype(np.float64) - logits.max())
        np.testing.assert_array_equal(probs, (z / z.sum()).astype(np.float32))
        want = np.argsort(-probs, kind="stable")[:K]
        np.testing.assert_array_equal(idx, want)
        top = probs[want]
        wsum = np.float32(0.0)
        for p in top:
            wsum = np.float32(wsum + p)
        np.testing.assert_array_equal(w, top / wsum if renorm else top)
