"""Hugging Face MoE recorder on tiny random-initialised configs (built offline from config objects)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
transformers = pytest.importorskip("transformers")

from wide_env.gating.trace import load_trace  # noqa: E402
from wide_env.modeltools.hf_recorder import expert_outputs, find_moe_layers, record_trace  # noqa: E402

COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256)


def _configs():
    t = transformers
    out = {
        "mixtral": lambda: t.MixtralConfig(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, **COMMON),
        "qwen2_moe": lambda: t.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                              num_experts=4, num_experts_per_tok=2, **COMMON),
        "qwen3_moe": lambda: t.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                                              num_experts_per_tok=2, head_dim=8, **COMMON),
        "olmoe": lambda: t.OlmoeConfig(intermediate_size=32, num_experts=4, num_experts_per_tok=2, **COMMON),
        "deepseek_v3": lambda: t.DeepseekV3Config(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4,
                                                  num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                                                  n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                                                  qk_nope_head_dim=8, v_head_dim=8,
                                                  **{**COMMON, "num_hidden_layers": 3, "num_key_value_heads": 4}),
        "gpt_oss": lambda: t.GptOssConfig(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                                          sliding_window=64, **COMMON),
    }
    return out


EXPECTED_ROUTING = {"mixtral": "softmax_topk_renorm", "qwen2_moe": "softmax_topk_raw", "qwen3_moe": "softmax_topk_raw",
                    "olmoe": "softmax_topk_raw", "deepseek_v3": "sigmoid_topk_renorm", "gpt_oss": "softmax_topk_renorm"}


def _model(name):
    torch.manual_seed(0)
    cfg = _configs()[name]()
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # spread the routers so Top-K is not a near-tie (random init is ~uniform)
        for lay in find_moe_layers(model):
            lay.router.weight.normal_(0, 1.0)
    return model


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()
    p = tmp_path_factory.mktemp("txt") / "text.txt"
    p.write_text(" ".join(rng.choice(words, 900)))
    return p


@pytest.mark.parametrize("name", sorted(EXPECTED_ROUTING))
def test_recorder_valid_trace(name, text_file, tmp_path):
    model = _model(name)
    out = tmp_path / f"{name}.npz"
    record_trace(model, text_file, out, window=32)
    tr = load_trace(out)  # schema validation
    layers = find_moe_layers(model)
    T, L, E = tr["gate_probs"].shape
    K = tr["topk_idx"].shape[2]
    assert (L, E, K) == (len(layers), layers[0].n_experts, layers[0].top_k)
    assert str(tr["routing"]) == EXPECTED_ROUTING[name]
    assert int(tr["d_model"]) == model.config.hidden_size
    # slots ordered by descending probability
    p = np.take_along_axis(tr["gate_probs"], tr["topk_idx"], -1)
    assert (np.diff(p, axis=-1) <= 1e-7).all()
    assert (tr["mismatch"][..., :E] > 0).sum() >= L * E * (E - 1) * 0.9  # off-diagonal populated
    assert json.loads(str(tr["meta"]))["model_type"] == model.config.model_type


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_recorded_topk_reproduces_moe_output(name, text_file):
    """sum_k w_k E_{i_k}(x) from the recorded Top-K and from single-expert calls equals the experts module's
    own output inside the model's forward: indices, weights and expert calls are the model's."""
    model = _model(name)
    layers = find_moe_layers(model)
    lay = layers[-1]
    seen = {}

    def hook(mod, args, out):
        seen["x"], seen["idx"], seen["w"], seen["y"] = args[0], args[1], args[2], out

    h = lay.experts.register_forward_hook(hook)
    ids = torch.randint(0, 128, (1, 24))
    with torch.no_grad():
        model(input_ids=ids)
        h.remove()
        arr = record_trace(model, text_file, None, window=24)
        eo = expert_outputs(lay, seen["x"])
    y = (seen["w"][..., None] * eo.gather(1, seen["idx"][..., None].expand(-1, -1, eo.shape[-1]))).sum(1)
    assert torch.allclose(y, seen["y"].float(), atol=1e-5)
    assert arr["topk_idx"].shape[1] == len(layers)


def test_recorder_mismatch_definition(text_file):
    """Recompute D_0(i, j) = mean over calibration tokens with i in Top-K of ||E_i(x) - E_j(x)|| by hand."""
    from wide_env.modeltools.hf_recorder import tokenize

    model = _model("qwen3_moe")
    arr = record_trace(model, text_file, None, window=32, calib_fraction=0.5)
    lay = find_moe_layers(model)[0]
    ids = tokenize(text_file.read_text(), None, model.config.vocab_size)
    cal = ids[: int(len(ids) * 0.5)]
    n = (len(cal) - 1) // 32
    got = {}
    h = lay.router.register_forward_hook(lambda m, a, o: got.update(x=a[0].reshape(-1, a[0].shape[-1]), idx=o[2]))
    xs, idxs = [], []
    with torch.no_grad():
        for w in range(n):
            model(input_ids=torch.from_numpy(cal[w * 32 : w * 32 + 32])[None])
            xs.append(got["x"]); idxs.append(got["idx"])
    h.remove()
    x, idx = torch.cat(xs), torch.cat(idxs).numpy()
    E = lay.n_experts
    with torch.no_grad():
        outs = np.stack([lay.experts(x, torch.full((len(x), 1), j), torch.ones(len(x), 1)).double().numpy() for j in range(E)], 1)
    for i in range(E):
        rows = (idx == i).any(1)
        assert rows.sum() > 0
        dev = np.linalg.norm(outs[rows, i][:, None] - outs[rows], axis=-1).mean(0)
        assert np.allclose(arr["mismatch"][0, i, :E], dev, rtol=1e-4, atol=1e-7)
        assert arr["mismatch"][0, i, E] == pytest.approx(np.linalg.norm(outs[rows, i], axis=-1).mean(), rel=1e-4)
    assert np.allclose(np.diagonal(arr["mismatch"][:, :, :-1], axis1=1, axis2=2), 0)
    assert (arr["layer_budget"] > 0).all()


def test_recorder_missing_text(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        record_trace(_model("mixtral"), tmp_path / "nope.txt", None)
