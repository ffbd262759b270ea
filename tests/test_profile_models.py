"""The shipped E/K-matched models of the paper profiles: artifacts, profile wiring, exact single
perturbations against the live model, calibrated budgets, and the package-data size limit."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from wide_env import WideConfig  # noqa: E402
from wide_env.gating.effects import EffectLookup  # noqa: E402
from wide_env.gating import make_gating_source  # noqa: E402
from wide_env.gating.trace import load_trace, trace_meta  # noqa: E402
from wide_env.modeltools.live import LiveMoE  # noqa: E402
from wide_env.models.moe_lm import load_checkpoint  # noqa: E402
from wide_env.modeltools.train_moe import RECIPES  # noqa: E402
from wide_env.profiles import DATA_DIR, PROFILES, profile_checkpoint, profile_data_dir, profile_trace  # noqa: E402

PAPER = {"switch-base-8": (6, 8, 1, 768, "softmax_topk_raw"), "mixtral-8x7b": (32, 8, 2, 4096, "softmax_topk_renorm"),
         "gpt-oss-20b": (24, 32, 4, 2880, "softmax_topk_renorm")}


@pytest.fixture(scope="module", params=sorted(PAPER))
def shipped(request):
    name = request.param
    d = profile_data_dir(name)
    model, meta = load_checkpoint(d)
    return name, model, meta, load_trace(d / "moe_trace.npz")


def test_model_matches_the_profiles_routing(shipped):
    name, model, meta, tr = shipped
    L, E, K, _, routing = PAPER[name]
    cfg = model.cfg
    assert (cfg.n_layer, cfg.n_expert, cfg.top_k, cfg.routing) == (L, E, K, routing) == (
        tr["gate_probs"].shape[1], tr["gate_probs"].shape[2], tr["topk_idx"].shape[2], str(tr["routing"]))
    assert cfg == RECIPES[name].config  # the shipped checkpoint is the recipe's
    assert int(tr["d_model"]) == cfg.d_model
    prof = WideConfig.from_dict({"profile": name})
    assert (prof.model.n_layers, prof.model.n_experts, prof.model.top_k, prof.model.routing) == (L, E, K, routing)
    # the profile's shipped model, resolved at run time (configs hold no machine paths)
    assert prof.gating.source == "trace" and prof.gating.trace_path is None and prof.gating.checkpoint_dir is None
    assert profile_trace(name) == str(profile_data_dir(name) / "moe_trace.npz")
    assert profile_checkpoint(name) == str(profile_data_dir(name))
    assert make_gating_source(prof).path == profile_trace(name)
    if cfg.routing == "softmax_topk_raw":  # Switch: the combine weight is the raw router probability
        p = np.take_along_axis(tr["gate_probs"].astype(np.float32), tr["topk_idx"].astype(np.int64), -1)
        np.testing.assert_allclose(tr["topk_weight"], p, atol=2e-3)
    # provenance: same corpus split and recipe as the tiny model, accuracy above the n-gram baselines
    prov = meta["provenance"]
    tiny = json.loads((DATA_DIR / "moe_lm.json").read_text())["provenance"]
    assert prov["trace_docs"] == tiny["trace_docs"] and prov["calib_docs"] == tiny["calib_docs"]
    assert prov["steps"] == tiny["steps"] and prov["seed"] == tiny["seed"]
    assert prov["eval"]["val_acc"] > prov["baselines"]["trigram_acc"] > prov["baselines"]["bigram_acc"]


def test_trace_records_the_checkpoints_predictions(shipped):
    _, model, _, tr = shipped
    B = model.cfg.block_size
    x = torch.from_numpy(tr["token_id"][:B].astype(np.int64))[None]
    with torch.no_grad():
        logits, _ = model(x)
    pred = logits[0].argmax(-1).numpy()
    assert ((pred == tr["target_id"][:B]) == tr["full_correct"][:B]).all()


def test_single_perturbations_match_the_live_model(shipped):
    """The rule is exact for one perturbation: random (position, layer, slot, listed server) against the
    live backend with that slot served explicitly."""
    _, model, _, tr = shipped
    lk = EffectLookup.from_trace(tr)
    live = LiveMoE(model, tr["mismatch"], track_full=True)
    T, L, K = tr["topk_idx"].shape
    B = model.cfg.block_size
    rng = np.random.default_rng(0)
    for _ in range(12):
        t, l, k = int(rng.integers(T)), int(rng.integers(L)), int(rng.integers(K))
        own = int(tr["topk_idx"][t, l, k])
        listed = lk.eligible[l, own].nonzero()[0]
        s = int(rng.choice(listed[listed != own]))
        w = t - t % B
        live.reset()
        if t > w:
            live.prefill(tr["token_id"][w:t])
        gate = live.begin(int(tr["token_id"][t]))
        while gate is not None:
            served = None
            if gate.layer == l:
                assert (gate.topk_idx == tr["topk_idx"][t, l]).all()
                served = gate.topk_idx.copy()
                served[k] = s
            gate = live.execute(None, served=served)
        r = live.finish(int(tr["target_id"][t]))
        servers = tr["topk_idx"][t : t + 1, l].astype(np.int64)
        servers[0, k] = s
        correct, same, dloss = lk.decide([t], lk.fold(lk.empty(1), [t], l, servers, strict=True))
        assert (r.correct, r.same_as_full) == (bool(correct[0]), bool(same[0])), (t, l, k, s)
        assert r.nll - _full_nll(live, tr, t) == pytest.approx(dloss[0], abs=1e-2 + 1e-2 * abs(dloss[0]))


def _full_nll(live: LiveMoE, tr: dict, t: int) -> float:
    B = live.block_size
    w = t - t % B
    live.reset()
    r = live.prefill(tr["token_id"][w : t + 1])
    return float(-torch.log_softmax(torch.from_numpy(r.logits.astype(np.float64)), -1)[int(tr["target_id"][t])])


def test_calibrated_budgets(shipped):
    name, _, _, tr = shipped
    cost = tr["calibrated_accuracy_cost"]
    eps = tr["calibrated_layer_budget"]
    assert list(cost) == [0.5, 1.0, 2.0]
    assert (np.diff(eps, axis=0) >= 0).all()  # more accuracy lost, larger budget
    # the default budget is the 1-point one; the median-skip budget stays in the meta
    np.testing.assert_array_equal(tr["layer_budget"], eps[1])
    cal = trace_meta(tr)["budget_calibration"]
    unit = np.asarray(cal["median_rule_layer_budget"])
    for c, s in zip(cal["costs"], cal["scales_for_cost"]):
        np.testing.assert_allclose(eps[cal["costs"].index(c)], s * unit, rtol=1e-5)


def test_synthetic_source_keeps_the_papers_budget():
    from wide_env.envs.decode import WideMoEEnv

    for name, eps in (("switch-base-8", 200.0), ("mixtral-8x7b", 1.5), ("gpt-oss-20b", 30.0)):
        env = WideMoEEnv({"profile": name, "gating": {"source": "synthetic"}, "n_tokens": 1})
        env.reset(seed=0)
        assert env.current_view().budget == pytest.approx(eps)


def test_payload_is_the_papers_d_model():
    for name, (_, _, _, d_model, _) in PAPER.items():
        assert WideConfig.from_dict({"profile": name}).radio.payload_d_model == d_model


@pytest.mark.parametrize("env_id,profile", [("wide_env/WideMoE-Switch-v0", "switch-base-8"),
                                            ("wide_env/WideMoE-Mixtral-v0", "mixtral-8x7b"),
                                            ("wide_env/WideMoE-GptOss-v0", "gpt-oss-20b")])
def test_live_topk_gives_the_models_own_accuracy(env_id, profile):
    import gymnasium as gym

    import wide_env  # noqa: F401

    env = gym.make(env_id, config={"profile": profile, "gating": {"backend": "live"}, "n_tokens": 2,
                                   "deadline": {"enforce": False}})
    tr = load_trace(profile_data_dir(profile) / "moe_trace.npz")
    obs, _ = env.reset(seed=0)
    done, outcomes = False, []
    while not done:
        obs, _, term, trunc, info = env.step(obs["topk_mask"].astype(np.int8))
        if info["layer"] == env.unwrapped.sim.n_layers - 1:
            outcomes.append((info["accuracy_correct"], info["accuracy_same"]))
        done = term or trunc
    start = env.unwrapped.trace_start
    assert outcomes == [(int(tr["full_correct"][start + j]), 1) for j in range(2)]


def test_package_data_within_30_mb():
    total = sum(f.stat().st_size for f in DATA_DIR.rglob("*") if f.is_file())
    assert total <= 30e6, f"wide_env/data holds {total / 1e6:.1f} MB (limit: 30 MB)"
    assert set(PROFILES) == {"tiny", *PAPER}
