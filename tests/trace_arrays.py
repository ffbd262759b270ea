"""One builder of small, valid trace arrays for the trace-validation tests (random gating, a mismatch table with a
zero diagonal, per-layer budgets); each test file picks the dtype, d_model and optional fields it checks."""

import numpy as np


def small_trace(T=30, L=2, E=4, K=2, seed=0, *, weight_dtype=np.float32, d_model=16, tokens=True,
                doc_starts=None, full_correct=False) -> dict:
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((T, L, E))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    idx = np.argsort(-probs, -1)[..., :K]
    w = np.take_along_axis(probs, idx, -1)
    mismatch = rng.uniform(0.5, 2.0, (L, E, E + 1))
    mismatch[:, np.arange(E), np.arange(E)] = 0
    arrays = dict(schema_version=np.array(1), gate_probs=probs.astype(np.float32), topk_idx=idx.astype(np.int16),
                  topk_weight=(w / w.sum(-1, keepdims=True)).astype(weight_dtype),
                  mismatch=mismatch.astype(np.float32), layer_budget=np.full(L, 0.4, np.float32),
                  d_model=np.array(d_model), routing=np.array("softmax_topk_renorm"))
    if tokens:
        arrays.update(token_id=rng.integers(0, 256, T), target_id=rng.integers(0, 256, T))
    if doc_starts is not None:
        doc_start = np.zeros(T, bool)
        doc_start[list(doc_starts)] = True
        arrays["doc_start"] = doc_start
    if full_correct:
        arrays["full_correct"] = rng.random(T) < 0.5
    return arrays
