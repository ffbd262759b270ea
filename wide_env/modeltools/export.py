"""Export a gating trace (docs/trace-schema.md) from the tiny MoE LM.

* mismatch tables ``D_l(i, j)`` / ``D_l(i, skip)`` measured on *calibration* tokens (held-out calibration
  document, disjoint from the trace tokens): "routed to i" = i is one of the token's Top-K experts;
* ``layer_budget``: eps_l = median over calibration tokens of ``w_2 * D_l(i_2, skip)`` (the table estimate of
  skipping the token's 2nd expert; with K = 1: half the median of ``w_1 * D_l(i_1, skip)``);
* per-token effect tables, exact: for every trace token, layer l, Top-K slot k and action a (serve the slot
  by expert a, or skip it when a = E), the model is re-run from layer l of that token with only that
  perturbation (earlier tokens keep their unperturbed keys/values; later layers route normally).

    python -m wide_env.modeltools.export --ckpt wide_env/data --corpus DIR --out wide_env/data/moe_trace.npz
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from wide_env.modeltools.corpus import chunk_starts, load_docs, split_docs, to_array
from wide_env.models.moe_lm import MoELM
from wide_env.modeltools.effect_tables import (all_servers, dense_effect_tables, effect_summary, eligible_servers,
                                               logit_effect_tables, perturbation_rows)


def _windows(docs: dict[str, bytes], names: list[str], block: int, n_tokens: int) -> tuple[np.ndarray, list]:
    """n_tokens // block windows of block+1 bytes spread evenly over the named documents (round robin)."""
    n_win = max(1, n_tokens // block)
    per = [n_win // len(names) + (1 if i < n_win % len(names) else 0) for i in range(len(names))]
    out, where = [], []
    for nm, k in zip(names, per):
        a = to_array(docs[nm])
        for s in chunk_starts(len(a), block, k):
            out.append(a[s : s + block + 1])
            where.append((nm, int(s)))
    if len(out) < n_win:
        raise ValueError(f"documents {names} are too short for {n_win} windows of {block} tokens")
    return np.stack(out), where


@torch.no_grad()
def mismatch_tables(model: MoELM, windows: np.ndarray, batch: int = 16) -> dict:
    """D (L, E, E+1) float32, routed counts (L, E), layer_budget (L,), and per-token arrays for checks."""
    cfg = model.cfg
    L, E, K = cfg.n_layer, cfg.n_expert, cfg.top_k
    sums = np.zeros((L, E, E + 1))
    cnt = np.zeros((L, E))
    all_sums = np.zeros((L, E, E + 1))
    n_all = 0
    w2skip = [[] for _ in range(L)]
    for s in range(0, len(windows), batch):
        x = torch.from_numpy(windows[s : s + batch, :-1])
        rec: dict = {}
        model(x, record=rec)
        for l, lay in enumerate(rec["layers"]):
            eo = lay["eo"].double()  # (N, E, d)
            dist = torch.cdist(eo, eo)  # (N, E, E): ||E_i(x) - E_j(x)||
            nrm = eo.norm(dim=-1)  # (N, E)
            tab = torch.cat([dist, nrm[:, :, None]], dim=-1).numpy()  # (N, E, E+1)
            sel = np.zeros((tab.shape[0], E), bool)
            idx = lay["idx"].numpy()
            np.put_along_axis(sel, idx, True, axis=1)
            sums[l] += np.einsum("ne,nef->ef", sel.astype(np.float64), tab)
            cnt[l] += sel.sum(0)
            all_sums[l] += tab.sum(0)
            w = lay["w"].double().numpy()
            kk = 1 if K >= 2 else 0
            w2skip[l].append(w[:, kk] * nrm.numpy()[np.arange(len(idx)), idx[:, kk]])
        n_all += x.numel()
    D = np.where(cnt[..., None] > 0, sums / np.maximum(cnt[..., None], 1), all_sums / n_all)
    D[:, np.arange(E), np.arange(E)] = 0.0
    # budget from the *table* estimate of skipping the 2nd expert at each calibration token
    budget = np.zeros(L)
    for l in range(L):
        w = np.concatenate(w2skip[l])  # w_2 * ||E_{i2}(x)|| per token (measured, not table)
        budget[l] = np.median(w) * (1.0 if K >= 2 else 0.5)
    return {"mismatch": D.astype(np.float32), "routed_count": cnt.astype(np.int64), "layer_budget": budget.astype(np.float32),
            "unrouted": [(l, e) for l in range(L) for e in range(E) if cnt[l, e] == 0]}


@torch.no_grad()
def trace_windows(model: MoELM, windows: np.ndarray, batch: int = 2) -> dict:
    """Gate probs, Top-K, combine weights and the full model's predictions for the windows (W, block+1)."""
    cfg = model.cfg
    L, E, K = cfg.n_layer, cfg.n_expert, cfg.top_k
    out = {k: [] for k in ("gate_probs", "topk_idx", "topk_weight", "full_pred")}
    for s in range(0, len(windows), batch):
        wb = torch.from_numpy(windows[s : s + batch])
        x = wb[:, :-1]
        W, T = x.shape
        rec: dict = {}
        logits, _ = model(x, record=rec)
        lays = rec["layers"]
        out["gate_probs"].append(torch.stack([la["probs"].reshape(W, T, E) for la in lays], 2))
        out["topk_idx"].append(torch.stack([la["idx"].reshape(W, T, K) for la in lays], 2))  # (W, T, L, K)
        out["topk_weight"].append(torch.stack([la["w"].reshape(W, T, K) for la in lays], 2))
        out["full_pred"].append(logits.argmax(-1))
    res = {}
    for k, v in out.items():
        t = torch.cat(v, 0)
        res[k] = t.reshape((-1,) + tuple(t.shape[2:])).numpy()
    res["token_id"] = windows[:, :-1].reshape(-1)
    res["target_id"] = windows[:, 1:].reshape(-1)
    ds = np.zeros(windows[:, :-1].shape, bool)
    ds[:, 0] = True
    res["doc_start"] = ds.reshape(-1)
    res["full_correct"] = res["full_pred"] == res["target_id"]
    return res


#: which single-perturbation tables an export writes
EFFECTS = ("dense", "logit", "none")


def export_trace(model: MoELM, corpus_dir: str | Path, out_path: str | Path, provenance: dict | None = None,
                 n_trace_tokens: int = 16384, n_calib_tokens: int = 16384, effects: str = "dense",
                 frozen: bool = False, model_name: str = "wide_env byte-level MoE LM (wide_env/models/moe_lm.py)") -> dict:
    """Compute and write the trace; returns {'summary', 'calib', 'meta'}.

    ``effects``: "dense" = the dense effect tables (every server of every slot, ``effect_*``) and the
    logit-effect tables (``logit_effect_*``, the servers the combine rule can choose); "logit" = the
    logit-effect tables only (re-runs only those servers: far cheaper for many experts); "none".
    ``frozen`` adds ``logit_effect_frozen`` (the rule's sums for several perturbations; the deep models need
    them, docs/real-model.md)."""
    from wide_env.gating.trace import save_trace

    if effects not in EFFECTS:
        raise ValueError(f"effects = {effects!r}: choose one of {list(EFFECTS)}")
    model.eval()
    cfg = model.cfg
    L, E = cfg.n_layer, cfg.n_expert
    docs = load_docs(corpus_dir)
    sp = split_docs(docs)
    t0 = time.time()
    cal_w, cal_where = _windows(docs, sp.calib, cfg.block_size, n_calib_tokens)
    cal = mismatch_tables(model, cal_w)
    tr_w, tr_where = _windows(docs, sp.trace, cfg.block_size, n_trace_tokens)
    tr = trace_windows(model, tr_w)
    eligible = eligible_servers(cal["mismatch"])
    summary = {"full_acc": float(tr["full_correct"].mean()), "n_tokens": int(tr["full_correct"].size)}
    tables: dict = {}
    if effects != "none":
        dense = effects == "dense"
        rows = perturbation_rows(model, tr_w, all_servers(L, E) if dense else eligible, frozen=frozen)
        if not (rows["topk_idx"] == tr["topk_idx"]).all():
            raise RuntimeError("the per-window re-run routed differently from the batched trace forward")
        summary = effect_summary(rows, tr["full_correct"], cal["mismatch"])
        if dense:
            tables.update(dense_effect_tables(rows, tr["full_correct"], E))
        logit = logit_effect_tables(rows, eligible)
        summary["logit_effect_tables"] = logit.pop("info")
        tables.update(logit)
    meta = {
        "model": model_name,
        "model_config": cfg.to_dict(),
        "checkpoint": "moe_lm.safetensors (fp16) + moe_lm.json",
        "provenance": provenance or {},
        "calibration": {"docs": sp.calib, "windows": len(cal_w), "tokens": int(cal_w[:, :-1].size),
                         "routed_to_i": "expert i is in the token's Top-K (any slot)",
                         "routed_count": cal["routed_count"].tolist(), "unrouted_fallback_all_tokens": cal["unrouted"]},
        "trace": {"docs": sp.trace, "windows": [f"{n}@{s}" for n, s in tr_where], "window_len": cfg.block_size,
                  "doc_start": "True at the first token of every window; the model sees only that window as context"},
        "layer_budget_rule": "eps_l = median over calibration tokens of w_2 * ||E_{i_2}(x)|| (the weighted deviation of "
                             "skipping the token's 2nd expert); K = 1: half the median of w_1 * ||E_{i_1}(x)||",
        "effects": {"dense": "effect_*: exact re-run of the model with one perturbation (slot k of layer l served by "
                             "expert a or skipped), other tokens' keys/values and all other layers' Top-K routing as in "
                             "the full model", "logit": "logit_effect_*: the same re-runs for the servers the combine "
                             "rule can choose; rule in wide_env/gating/effects.py"}.get(effects, "none"),
        "effect_summary": summary,
        "export_time_s": None,
    }
    arrays = dict(
        schema_version=np.array(1, np.int64),
        gate_probs=tr["gate_probs"].astype(np.float16),
        topk_idx=tr["topk_idx"].astype(np.int16),
        topk_weight=tr["topk_weight"].astype(np.float16),
        mismatch=cal["mismatch"],
        layer_budget=cal["layer_budget"],
        d_model=np.array(cfg.d_model, np.int64),
        routing=np.array(cfg.routing),
        token_id=tr["token_id"].astype(np.int16),
        target_id=tr["target_id"].astype(np.int16),
        doc_start=tr["doc_start"],
        full_correct=tr["full_correct"],
        **tables,
    )
    # fp16 rounding can leave rows summing to 1 +- 4e-3 at most; fine for the 1e-2 schema tolerance
    meta["export_time_s"] = round(time.time() - t0, 1)
    arrays["meta"] = np.array(json.dumps(meta))
    save_trace(out_path, **arrays)
    return {"summary": summary, "calib": cal, "meta": meta}


def refresh_effects(model: MoELM, trace_path: str | Path, out_path: str | Path, effects: str = "dense",
                    frozen: bool = False) -> dict:
    """Recompute a trace's effect tables from its own text and keep everything else (gating arrays, mismatch,
    budgets) byte for byte; raises if the model does not route the trace's tokens as recorded."""
    from wide_env.gating.trace import EFFECT_KEYS, LOGIT_EFFECT_FROZEN, LOGIT_EFFECT_KEYS, load_trace, save_trace, trace_meta

    if effects not in ("dense", "logit"):
        raise ValueError(f"effects = {effects!r}: choose 'dense' or 'logit'")
    tr = load_trace(trace_path)
    B = model.cfg.block_size
    T = tr["token_id"].shape[0]
    starts = np.flatnonzero(tr["doc_start"])
    if T % B or not np.array_equal(starts, np.arange(0, T, B)):
        raise ValueError(f"{trace_path}: refresh needs the exporter's layout (windows of {B} tokens, doc_start at each)")
    windows = np.concatenate([tr["token_id"].reshape(-1, B), tr["target_id"].reshape(-1, B)[:, -1:]], 1).astype(np.int64)
    if not np.array_equal(windows[:, 1:].reshape(-1), tr["target_id"].astype(np.int64)):
        raise ValueError(f"{trace_path}: target_id is not the next token_id inside each window")
    t0 = time.time()
    L, E = model.cfg.n_layer, model.cfg.n_expert
    eligible = eligible_servers(tr["mismatch"])
    dense = effects == "dense"
    rows = perturbation_rows(model, windows, all_servers(L, E) if dense else eligible, frozen=frozen)
    if not np.array_equal(rows["topk_idx"], tr["topk_idx"]):
        raise RuntimeError(f"{trace_path}: the model routes the trace's tokens differently from the recorded topk_idx")
    full = tr["full_correct"]
    arrays = {k: v for k, v in tr.items() if k not in EFFECT_KEYS + LOGIT_EFFECT_KEYS + (LOGIT_EFFECT_FROZEN,)}
    summary = effect_summary(rows, full, tr["mismatch"])
    if dense:
        arrays.update(dense_effect_tables(rows, full, E))
    logit = logit_effect_tables(rows, eligible)
    summary["logit_effect_tables"] = logit.pop("info")
    arrays.update(logit)
    meta = trace_meta(tr)
    meta["effect_summary"] = summary
    meta["effects_refreshed"] = {"effects": effects, "frozen": frozen, "seconds": round(time.time() - t0, 1)}
    arrays["meta"] = np.array(json.dumps(meta))
    save_trace(out_path, **arrays)
    return summary


def main(argv=None) -> int:
    from wide_env.models.moe_lm import load_checkpoint

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--refresh", default=None, metavar="TRACE",
                    help="recompute the effect tables of this trace (keeping its gating arrays) instead of exporting")
    ap.add_argument("--trace-tokens", type=int, default=16384)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--effects", choices=EFFECTS, default="dense",
                    help="dense: effect_* and logit_effect_* tables; logit: logit_effect_* only (many experts); none")
    ap.add_argument("--frozen", action="store_true", help="also logit_effect_frozen (frozen-routing sums; deep models)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from wide_env.modeltools.corpus import fetch_shakespeare

    model, meta = load_checkpoint(args.ckpt)
    if args.refresh:
        summary = refresh_effects(model, args.refresh, args.out, args.effects, args.frozen)
        print(json.dumps(summary.get("logit_effect_tables")))
        return 0
    corpus = args.corpus or str(fetch_shakespeare())
    t0 = time.time()
    info = export_trace(model, corpus, args.out, provenance=meta.get("provenance"), n_trace_tokens=args.trace_tokens,
                        n_calib_tokens=args.calib_tokens, effects=args.effects, frozen=args.frozen)
    print(f"export {time.time() - t0:.1f}s", json.dumps(info["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
