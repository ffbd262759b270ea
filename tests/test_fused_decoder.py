"""The compiled decoder model accuracy runs (wide_env.models.fused_decoder) against the torch reference
(StreamDecoder), and the model backend's torch calls at one thread whatever the caller's setting."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import gymnasium as gym  # noqa: E402

import wide_env  # noqa: E402,F401
from wide_env.models.decoder import ContextFull, StreamDecoder  # noqa: E402
from wide_env.models.fused_decoder import FusedDecoder  # noqa: E402
from wide_env.models.moe_lm import Block, MoELM, load_checkpoint  # noqa: E402
from wide_env.profiles import profile_checkpoint  # noqa: E402

# Float32 logits agree to reordered float32 sums: torch's BLAS and these loops add in different orders, at
# every one of up to 32 layers (each rounding ~6e-8 relative, logits of magnitude ~10). Measured: at most
# 2.2e-5 over 400 tokens per profile; the bound leaves 10x. The env's accuracy is compared at 1e-4 nats.
LOGIT_ATOL = 2e-4
PROFILES = {"switch-base-8": "Switch", "mixtral-8x7b": "Mixtral", "gpt-oss-20b": "GptOss"}


def _decoders(profile: str, streams: int, seed: int = 0):
    model, _ = load_checkpoint(profile_checkpoint(profile))
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    D = rng.random((cfg.n_layer, cfg.n_expert, cfg.n_expert + 1))
    D[:, np.arange(cfg.n_expert), np.arange(cfg.n_expert)] = 0.0  # an expert serves its own slot exactly
    return model, D, StreamDecoder(model, D, streams), FusedDecoder(model, D, streams), rng


@pytest.mark.parametrize("profile", PROFILES)
def test_fused_decoder_equals_the_torch_decoder_layer_by_layer_over_many_tokens(profile):
    """Same context, tokens and masks: every layer's Top-K and routing agree with torch's, the residual stream
    and router probabilities to float32 rounding, and every token's prediction is the same."""
    model, D, ref, fast, rng = _decoders(profile, 3)
    L, E = model.cfg.n_layer, model.cfg.n_expert
    context = gym.make(f"wide_env/WideMoE-{PROFILES[profile]}-v0").unwrapped._batch.model.context
    rows = np.arange(3)
    for row in rows:  # start from trace windows' full-model contexts of different lengths, as the env does
        keys, values = context.prefix(int(context.window_starts[row]) + 5 * int(row))
        ref.set_prefix(int(row), keys, values)
        fast.set_prefix(int(row), keys, values)
    n_tokens = 40 if L <= 8 else 12
    same = worst = 0.0
    for _ in range(n_tokens):
        tokens = rng.integers(0, model.cfg.vocab_size, 3)
        masks = rng.random((3, L, E)) < 0.6
        gates = ref.begin(rows, tokens)
        fast.begin(rows, tokens)
        stepped, zeros = np.ones(3, bool), np.zeros(3, np.int64)
        for layer in range(L):
            np.testing.assert_array_equal(fast.topk_idx, gates.topk_idx)
            np.testing.assert_allclose(fast.probs, gates.probs, atol=1e-5)
            np.testing.assert_allclose(fast.topk_weight, gates.topk_weight, atol=1e-5)
            gates = ref.execute(rows, masks[:, layer])
            done = layer + 1 == L
            fast.advance(stepped, np.ascontiguousarray(masks[:, layer]), np.full(3, 0 if done else layer + 1),
                         zeros, zeros, np.full(3, done), zeros)
            np.testing.assert_array_equal(fast.finished, np.full(3, done))
            if not done:
                np.testing.assert_allclose(fast.x, ref._x[:, 0].numpy(), atol=1e-4)
        want = ref.finish(rows).numpy()
        got = fast.logits[rows]
        worst = max(worst, float(np.abs(got - want).max()))
        same += (got.argmax(1) == want.argmax(1)).sum()
        np.testing.assert_array_equal(fast.length, ref.length)
    assert worst < LOGIT_ATOL
    assert same == 3 * n_tokens


def test_decode_helper_equals_the_torch_decode():
    model, D, ref, fast, rng = _decoders("mixtral-8x7b", 2, seed=4)
    L, E = model.cfg.n_layer, model.cfg.n_expert
    for _ in range(5):
        tokens, masks = rng.integers(0, 256, 2), rng.random((2, L, E)) < 0.5
        want = ref.decode([0, 1], tokens, masks).numpy()
        got = fast.decode([0, 1], tokens, masks)
        np.testing.assert_allclose(got, want, atol=LOGIT_ATOL)
        assert (got.argmax(1) == want.argmax(1)).all()


def test_fused_decoder_refuses_what_the_torch_decoder_refuses():
    model, D, _, fast, _ = _decoders("switch-base-8", 2)
    cfg = model.cfg
    with pytest.raises(ValueError, match="mismatch must have shape"):
        FusedDecoder(model, D[:, :, :-1], 2)
    with pytest.raises(ValueError, match="n_streams"):
        FusedDecoder(model, D, 0)
    with pytest.raises(ValueError, match="token ids must be in"):
        fast.begin([0], [cfg.vocab_size])
    with pytest.raises(ValueError, match="prefix keys/values must be"):
        fast.set_prefix(0, np.zeros((1, 1, 3, 16)), np.zeros((1, 1, 3, 16)))
    # out of step with the episode: the env says layer 3 while the stream applies layer 0 -> layer 1
    fast.begin([0], [1])
    with pytest.raises(RuntimeError, match="stream 0 is at layer"):
        z = np.zeros(2, np.int64)
        fast.advance(np.array([True, False]), np.ones((2, cfg.n_expert), bool), np.array([3, 0]), z, z,
                     np.zeros(2, bool), z)
    # a full context
    hd = cfg.d_model // cfg.n_head
    full = np.zeros((cfg.n_layer, cfg.n_head, cfg.block_size, hd), np.float32)
    fast.set_prefix(1, full, full)
    with pytest.raises(ContextFull, match="context is full"):
        fast.begin([1], [0])


def test_model_accuracy_keeps_each_streams_current_layer():
    """The env's decoder advances a layer per step: the stream is at the episode's layer, with that layer's
    router output (the Top-K of its probabilities) and the residual stream exposed."""
    env = gym.make("wide_env/WideMoE-Switch-v0")
    env.reset(seed=3)
    u = env.unwrapped
    decoder, state = u._batch.model.decoder, u._batch.state
    rng = np.random.default_rng(0)
    for _ in range(2 * u.sim.n_layers + 1):
        env.step((rng.random(u.sim.n_experts) < 0.5).astype(np.int8))
        assert decoder.layer[0] == state.layer[0]
        top = np.argsort(-decoder.probs[0], kind="stable")[: u.sim.top_k]
        assert sorted(decoder.topk_idx[0]) == sorted(top)
        assert np.isfinite(decoder.x[0]).all() and np.abs(decoder.x[0]).max() > 0


@pytest.mark.parametrize("setting", [{"accuracy": "model"}, {"backend": "live"}])
def test_model_backend_runs_torch_at_one_thread_and_restores_the_callers(monkeypatch, setting):
    """A user's script at torch's default (here 2) threads: every torch forward the backend runs (trace
    windows, live layers) sees one thread, and the caller's count is back after each reset and step."""
    seen = []

    def spy(original):
        def wrapped(*args, **kwargs):
            seen.append(torch.get_num_threads())
            return original(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(MoELM, "forward", spy(MoELM.forward))
    monkeypatch.setattr(Block, "qkv_heads", spy(Block.qkv_heads))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        env = gym.make("wide_env/WideMoE-Switch-v0", config={"gating": setting, "n_tokens": 2})
        assert torch.get_num_threads() == 2
        rng = np.random.default_rng(1)
        for seed in range(3):  # episodes in new trace windows: the full model runs them at reset
            env.reset(seed=100 + seed)
            assert torch.get_num_threads() == 2
            for _ in range(env.unwrapped.sim.n_layers * 2):
                env.step((rng.random(env.action_space.n) < 0.5).astype(np.int8))
                assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}
