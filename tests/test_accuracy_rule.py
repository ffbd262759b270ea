"""The logit-effect accuracy rule (wide_env.gating.effects): exact for single perturbations, additive for
several, its trace schema, and the batched live replay it is measured against."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from wide_env.gating.effects import EffectLookup, context_after, decide  # noqa: E402
from wide_env.gating.trace import TraceError, load_trace, validate_trace  # noqa: E402
from wide_env.modeltools.corpus import synthetic_corpus  # noqa: E402
from wide_env.modeltools.export import eligible_servers, export_trace  # noqa: E402
from wide_env.modeltools.live import DEFAULT_TRACE, LiveMoE, replay_executed  # noqa: E402
from wide_env.models.moe_lm import MoEConfig, MoELM  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An untrained small model (its effects are large and varied), exported with dense and logit tables."""
    tmp = tmp_path_factory.mktemp("rule")
    corpus = synthetic_corpus(tmp / "corpus", n_docs=6, n_bytes=12_000)
    torch.manual_seed(3)
    model = MoELM(MoEConfig(n_layer=3, d_model=32, n_head=2, n_expert=6, top_k=2, d_ff=32, block_size=32)).eval()
    dense, logit = tmp / "dense.npz", tmp / "logit.npz"
    export_trace(model, corpus, dense, n_trace_tokens=256, n_calib_tokens=256, effects="dense")
    export_trace(model, corpus, logit, n_trace_tokens=256, n_calib_tokens=256, effects="logit", frozen=True)
    return {"model": model, "dense": load_trace(dense), "logit": load_trace(logit), "corpus": corpus}


def _single_perturbation_mismatches(tr: dict) -> tuple[int, int]:
    """Brute force: every (position, layer, slot, listed server) alone; the rule vs the dense tables."""
    lk = EffectLookup.from_trace(tr)
    T, L, K = tr["topk_idx"].shape
    E = tr["gate_probs"].shape[2]
    pos = np.arange(T)
    checked = bad = 0
    for l in range(L):
        for k in range(K):
            own = tr["topk_idx"][:, l, k].astype(np.int64)
            for s in range(E + 1):
                listed = lk.eligible[l, own, s] & (own != s)
                if not listed.any():
                    continue
                t = pos[listed]
                servers = tr["topk_idx"][t, l].astype(np.int64)
                servers[:, k] = s
                correct, same, dloss = lk.decide(t, lk.fold(lk.empty(t.size), t, l, servers, strict=True))
                wrong = ((correct != tr["effect_correct"][t, l, k, s]) | (same != tr["effect_same"][t, l, k, s])
                         | (dloss != tr["effect_dloss"][t, l, k, s].astype(np.float64)))
                bad += int(wrong.sum())
                checked += int(t.size)
    return checked, bad


def test_single_perturbations_reproduce_the_dense_tables(exported):
    checked, bad = _single_perturbation_mismatches(exported["dense"])
    assert checked > 1000 and bad == 0


def test_shipped_tiny_trace_single_perturbations_exact():
    checked, bad = _single_perturbation_mismatches(load_trace(DEFAULT_TRACE))
    assert checked > 100_000 and bad == 0


def test_logit_only_export_has_the_dense_exports_logit_tables(exported):
    """Re-running only the combine rule's servers gives the same rows as selecting them from every server."""
    d, g = exported["dense"], exported["logit"]
    assert "logit_effect_frozen" in g and "logit_effect_frozen" not in d
    for key in ("logit_effect_servers", "logit_effect_classes", "logit_effect_base"):
        assert np.array_equal(d[key], g[key]), key
    np.testing.assert_allclose(d["logit_effect_delta"].astype(np.float32), g["logit_effect_delta"].astype(np.float32),
                               atol=2e-3, rtol=2e-3)
    assert not any(k.startswith("effect_") for k in g)


def test_servers_are_exactly_the_combine_rules_choices(exported):
    tr = exported["dense"]
    D = tr["mismatch"].astype(np.float64)
    L, E = D.shape[:2]
    srv = eligible_servers(D)
    for l in range(L):
        for i in range(E):
            listed = set(srv[l, i][srv[l, i] >= 0].tolist())
            expect = {E} | {j for j in range(E) if j != i and D[l, i, j] <= D[l, i, E]}
            assert listed == expect
    # every server the combine rule picks for random executed sets is listed
    from wide_env.modeltools.live import serve_map

    lk = EffectLookup.from_trace(tr)
    rng = np.random.default_rng(0)
    for _ in range(500):
        t, l = int(rng.integers(tr["topk_idx"].shape[0])), int(rng.integers(L))
        topk = tr["topk_idx"][t, l].astype(np.int64)
        phi = serve_map(D[l], topk, rng.random(E) < 0.3)
        assert lk.eligible[l, topk, phi].all()


def test_fold_is_a_sum_and_decide_without_perturbation_is_the_full_model(exported):
    tr = exported["logit"]
    lk = EffectLookup.from_trace(tr)
    T, L, K = tr["topk_idx"].shape
    E = tr["gate_probs"].shape[2]
    pos = np.arange(T)
    rng = np.random.default_rng(1)
    correct, same, dloss = lk.decide(pos, lk.empty(T))
    assert (correct == tr["full_correct"]).all() and same.all() and (dloss == 0).all()
    servers = []
    for l in range(L):  # skip a random slot at every layer (skip is always listed)
        s = tr["topk_idx"][:, l].astype(np.int64)
        s[np.arange(T), rng.integers(K, size=T)] = E
        servers.append(s)
    forward = lk.empty(T)
    for l in range(L):
        forward = lk.fold(forward, pos, l, servers[l])
    backward = lk.empty(T)
    for l in reversed(range(L)):
        backward = lk.fold(backward, pos, l, servers[l])
    np.testing.assert_allclose(forward, backward, atol=1e-12)
    rows = np.concatenate([lk.rows(pos, l, servers[l]) for l in range(L)], 1)
    np.testing.assert_allclose(forward, lk.values[rows].sum(1), atol=1e-12)
    table = lk.row_table()  # the dense (T, L, K, E+1) form gives the same rows
    for l in range(L):
        assert (table[pos[:, None], l, np.arange(K)[None, :], servers[l]] == lk.rows(pos, l, servers[l])).all()
    assert forward.shape[1] == 8  # [delta (4), frozen (3), count]
    np.testing.assert_array_equal(forward[:, -1], (np.stack(servers, 1) != tr["topk_idx"]).sum((1, 2)))


def test_frozen_rows_are_re_runs_with_the_later_routing_held(exported):
    """logit_effect_frozen: the single perturbation re-run with every later layer keeping the full model's
    Top-K and weights (recomputed here through the model's combine override)."""
    from wide_env.models.moe_lm import combine_matrix

    tr, model = exported["logit"], exported["model"]
    lk = EffectLookup.from_trace(tr)
    T, L, K = tr["topk_idx"].shape
    E = tr["gate_probs"].shape[2]
    B = model.cfg.block_size
    n = tr["logit_effect_base"].shape[1]
    rng = np.random.default_rng(2)
    for _ in range(12):
        t, l, k = int(rng.integers(T)), int(rng.integers(L)), int(rng.integers(K))
        w = t - t % B
        x = torch.from_numpy(tr["token_id"][w : t + 1].astype(np.int64))[None]
        rec: dict = {}
        with torch.no_grad():
            full = model(x, record=rec)[0][0, -1].double()
        routing = [(la["idx"][-1], la["w"][-1]) for la in rec["layers"]]

        def combine(layer, probs, idx, weight):
            C = combine_matrix(idx, weight, E).clone()
            if layer >= l:  # the perturbed layer and, held, every later one
                own, w_ = routing[layer]
                phi = own.clone()
                if layer == l:
                    phi[k] = E  # skip slot k
                c = torch.zeros(E + 1, dtype=w_.dtype).index_add_(0, phi, w_)
                C[-1] = c[:E].to(C.dtype)
            return C

        with torch.no_grad():
            pert = model(x, combine=combine)[0][0, -1].double()
        cls = tr["logit_effect_classes"][t].astype(np.int64)
        rest = np.delete(np.arange(pert.numel()), cls)

        def scores(z):
            z = z.numpy()
            return np.concatenate([z[cls], [z[rest].max()]])

        servers = tr["topk_idx"][t : t + 1, l].astype(np.int64)
        servers[0, k] = E
        row = lk.values[lk.rows([t], l, servers)[0, k]]
        np.testing.assert_allclose(row[n + 1 : 2 * n + 1], scores(pert) - scores(full), atol=2e-2, rtol=1e-2)


def test_strict_rejects_servers_the_combine_rule_never_chooses(exported):
    tr = exported["dense"]
    lk = EffectLookup.from_trace(tr)
    E = tr["gate_probs"].shape[2]
    cells = np.argwhere(~lk.eligible)  # (l, own, server) with no row
    if cells.size == 0:
        pytest.skip("every server is choosable in this model")
    l, own, s = cells[0]
    t = np.flatnonzero(tr["topk_idx"][:, l, 0] == own)
    if t.size == 0:
        pytest.skip("no token has that expert in slot 0")
    servers = tr["topk_idx"][t[:1], l].astype(np.int64)
    servers[0, 0] = s
    with pytest.raises(ValueError, match="combine rule"):
        lk.rows(t[:1], l, servers, strict=True)
    skip = servers.copy()
    skip[0, 0] = E
    assert (lk.rows(t[:1], l, servers) == lk.rows(t[:1], l, skip)).all()  # scored as a skip


def test_context_term():
    base = np.array([[0.0, -0.5, -2.0], [-0.3, 0.0, -1.0]])  # token 0: full model correct; token 1: wrong
    acc = np.zeros((2, 5))  # [target, competitor, rest, loss, count]
    assert [list(x) for x in decide(base, acc, context=np.zeros(2))[:2]] == [[True, False], [True, True]]
    correct, same, _ = decide(base, acc, context=np.array([3.0, 3.0]), weight=0.2)  # 0.6 logits off the prediction
    assert list(correct) == [False, True] and list(same) == [False, False]
    np.testing.assert_allclose(context_after(np.array([1.0, 1.0]), np.array([0.5, -0.2]), decay=0.8), [1.3, 0.8])


def test_several_perturbations_use_the_frozen_routing_sums():
    base = np.array([[0.0, -1.0, -3.0]])
    one = np.array([[-2.0, 0.0, 0.0, 0.3, -0.5, 0.0, 0.0, 1.0]])  # alone, the re-routed change flips it
    assert not decide(base, one)[0][0]  # one perturbation: the exact (re-routed) change
    two = np.array([[-2.0, 0.0, 0.0, 0.3, -0.5, 0.0, 0.0, 2.0]])
    correct, same, dloss = decide(base, two)
    assert correct[0] and same[0] and dloss[0] == pytest.approx(0.3)  # two: the frozen-routing sums
    with pytest.raises(ValueError, match="accumulators"):
        decide(base, np.zeros((1, 6)))


# ---------------------------------------------------------------------------------------------- schema
def _bad(tr: dict, **changes) -> dict:
    out = dict(tr)
    for k, v in changes.items():
        if v is None:
            out.pop(k)
        else:
            out[k] = v
    return out


def test_schema_rejects_inconsistent_logit_tables(exported):
    tr = exported["logit"]
    validate_trace(tr)
    with pytest.raises(TraceError, match="logit_effect_delta.*required"):
        validate_trace(_bad(tr, logit_effect_delta=None))
    srv = tr["logit_effect_servers"].copy()
    L, E, S = srv.shape
    D = tr["mismatch"].copy()
    j = next(j for j in range(1, E) if j not in srv[0, 0])
    D[0, 0, j] = 0.5 * D[0, 0, E]  # now the combine rule can serve expert 0's slot by j, which has no rows
    with pytest.raises(TraceError, match="combine rule can choose"):
        validate_trace(_bad(tr, mismatch=D))
    srv3 = srv.copy()
    srv3[0, 0, 0] = 0  # own expert instead of skip first
    with pytest.raises(TraceError, match="logit_effect_servers"):
        validate_trace(_bad(tr, logit_effect_servers=srv3))
    with pytest.raises(TraceError, match="logit_effect_delta.*shape"):
        validate_trace(_bad(tr, logit_effect_delta=tr["logit_effect_delta"][:-1]))
    cls = tr["logit_effect_classes"].copy()
    cls[:, [0, 1]] = cls[:, [1, 0]]
    with pytest.raises(TraceError, match="target"):
        validate_trace(_bad(tr, logit_effect_classes=cls))
    base = tr["logit_effect_base"].copy()
    base[:, 0] = 0.0
    base[:, 1] = 0.0
    with pytest.raises(TraceError, match="logit_effect_base"):
        validate_trace(_bad(tr, logit_effect_base=base))
    with pytest.raises(TraceError, match="calibrated_layer_budget.*required"):
        validate_trace(_bad(tr, calibrated_accuracy_cost=np.array([0.5, 1.0])))
    with pytest.raises(TraceError, match="calibrated_accuracy_cost"):
        validate_trace(_bad(tr, calibrated_accuracy_cost=np.array([1.0, 0.5]),
                            calibrated_layer_budget=np.ones((2, L), np.float32)))


# ---------------------------------------------------------------------------------------------- replay
def test_batched_replay_equals_the_live_backend():
    live = LiveMoE.from_files(track_full=True)
    tr = load_trace(DEFAULT_TRACE)
    rng = np.random.default_rng(0)
    L, E = live.L, live.E
    for _ in range(2):
        w = 128 * int(rng.integers(0, 100))
        start, n = int(rng.integers(1, 100)), 10
        executed = rng.random((n, L, E)) < 0.4
        tokens, targets = tr["token_id"][w : w + start + n], tr["target_id"][w : w + start + n]
        got = replay_executed(live.model, live.D, tokens, targets, start, executed)
        live.reset()
        live.prefill(tokens[:start])
        for j in range(n):
            r = live.step(int(tokens[start + j]), executed=executed[j], target=int(targets[start + j]))
            assert r.correct == got["correct"][j] and r.same_as_full == got["same_as_full"][j]
            assert (r.served == got["served"][j]).all()
            assert r.nll == pytest.approx(got["nll"][j], abs=1e-3)
