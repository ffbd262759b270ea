"""Export a gating trace (docs/trace-schema.md) from the tiny MoE LM.

* mismatch tables ``D_l(i, j)`` / ``D_l(i, skip)`` measured on *calibration* tokens (held-out calibration
  document, disjoint from the trace tokens): "routed to i" = i is one of the token's Top-K experts;
* ``layer_budget``: eps_l = median over calibration tokens of ``w_2 * D_l(i_2, skip)`` (the table estimate of
  skipping the token's 2nd expert; with K = 1: half the median of ``w_1 * D_l(i_1, skip)``);
* per-token effect tables, exact: for every trace token, layer l, Top-K slot k and action a (serve the slot
  by expert a, or skip it when a = E), the model is re-run from layer l of that token with only that
  perturbation (earlier tokens keep their unperturbed keys/values; later layers route normally).

    python -m wide_env.models.export --ckpt wide_env/data --corpus DIR --out wide_env/data/moe_trace.npz
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .corpus import chunk_starts, load_docs, split_docs, to_array
from .moe_lm import MoELM, combine_matrix


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


def _budget_from_table(D: np.ndarray, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
    """eps_l = median_t w_{t,2} D_l(i_{t,2}, skip) over the given tokens (idx, w: (N, L, K))."""
    L, E = D.shape[0], D.shape[1]
    k = 1 if idx.shape[-1] >= 2 else 0
    scale = 1.0 if idx.shape[-1] >= 2 else 0.5
    return np.array([np.median(w[:, l, k] * D[l, idx[:, l, k], E]) * scale for l in range(L)], np.float32)


@torch.no_grad()
def continue_from(model: MoELM, layer: int, xq: torch.Tensor, pos: torch.Tensor, cache: list) -> torch.Tensor:
    """Run query tokens from the residual stream *after* MoE layer ``layer`` to the logits.

    xq: (W, Q, d) residual streams of Q query tokens in each of W windows; pos: (Q,) their positions;
    cache[m] = (K, V) of the unperturbed model at layer m, each (W, H, T, hd). Each query attends to the
    cached keys of positions < pos and to its own (recomputed) key. Later layers use normal Top-K routing.
    """
    cfg = model.cfg
    x = xq
    T = cache[0][0].shape[2]
    keymask = torch.arange(T)[None, :] < pos[:, None]  # (Q, T)
    neg = torch.finfo(x.dtype).min
    for m in range(layer + 1, cfg.n_layer):
        blk = model.blocks[m]
        Kc, Vc = cache[m]
        q, k, v = blk.qkv_heads(x)  # (W, H, Q, hd)
        scale = q.shape[-1] ** -0.5
        sc = torch.einsum("whqd,whtd->whqt", q, Kc) * scale
        sc = sc.masked_fill(~keymask, neg)
        ss = (q * k).sum(-1, keepdim=True) * scale
        a = torch.softmax(torch.cat([sc, ss], dim=-1), dim=-1)
        y = torch.einsum("whqt,whtd->whqd", a[..., :T], Vc) + a[..., T:] * v
        r = x + blk.attn_out(y)
        h = blk.ln2(r)
        W, Q, d = h.shape
        hf = h.reshape(W * Q, d)
        _, tidx, tw = blk.moe_route(hf)
        x = r + blk.experts.sparse(hf, tidx, tw.to(hf.dtype)).reshape(W, Q, d)
    return model.head_logits(x)


@torch.no_grad()
def trace_windows(model: MoELM, windows: np.ndarray, effects: bool = True, batch: int = 2) -> dict:
    """Gate probs, Top-K, full predictions and (optionally) exact per-token effect tables for windows."""
    cfg = model.cfg
    L, E, K, V = cfg.n_layer, cfg.n_expert, cfg.top_k, cfg.vocab_size
    A = E + 1
    out = {k: [] for k in ("gate_probs", "topk_idx", "topk_weight", "full_pred", "full_logp_y", "effect_correct",
                           "effect_same", "effect_dloss", "effect_kl")}
    for s in range(0, len(windows), batch):
        wb = torch.from_numpy(windows[s : s + batch])
        x, y = wb[:, :-1], wb[:, 1:]
        W, T = x.shape
        rec: dict = {}
        logits, _ = model(x, record=rec)
        lays = rec["layers"]
        logp = F.log_softmax(logits.double(), -1)  # (W, T, V)
        pred = logits.argmax(-1)
        out["gate_probs"].append(torch.stack([la["probs"].reshape(W, T, E) for la in lays], 2))
        idx = torch.stack([la["idx"].reshape(W, T, K) for la in lays], 2)  # (W, T, L, K)
        wts = torch.stack([la["w"].reshape(W, T, K) for la in lays], 2)
        out["topk_idx"].append(idx)
        out["topk_weight"].append(wts)
        out["full_pred"].append(pred)
        lpy = logp.gather(-1, y[..., None])[..., 0]
        out["full_logp_y"].append(lpy)
        if not effects:
            continue
        cache = [(la["k"], la["v"]) for la in lays]
        corr = torch.zeros(W, T, L, K, A, dtype=torch.bool)
        same = torch.zeros_like(corr)
        dls = torch.zeros(W, T, L, K, A)
        kls = torch.zeros(W, T, L, K, A)
        pos = torch.arange(T).repeat_interleave(K * A)  # query order: (t, k, a)
        for l, la in enumerate(lays):
            eo = la["eo"].reshape(W, T, E, -1)  # (W, T, E, d)
            x_out = la["r"] + torch.einsum("wte,wted->wtd", combine_matrix(idx[:, :, l], wts[:, :, l], E).to(eo.dtype), eo)
            own = eo.gather(2, idx[:, :, l, :, None].expand(-1, -1, -1, eo.shape[-1]))  # (W, T, K, d)
            alt = torch.cat([eo, torch.zeros_like(eo[:, :, :1])], 2)  # (W, T, A, d): action outputs
            delta = wts[:, :, l, :, None, None].to(eo.dtype) * (alt[:, :, None] - own[:, :, :, None])  # (W,T,K,A,d)
            xq = (x_out[:, :, None, None] + delta).reshape(W, T * K * A, -1)
            lg = continue_from(model, l, xq, pos, cache).double().reshape(W, T, K, A, V)
            lp = F.log_softmax(lg, -1)
            lp_full = logp[:, :, None, None]
            corr[:, :, l] = lg.argmax(-1) == y[:, :, None, None]
            same[:, :, l] = lg.argmax(-1) == pred[:, :, None, None]
            dls[:, :, l] = (lpy[:, :, None, None] - lp.gather(-1, y[:, :, None, None, None].expand(-1, -1, K, A, 1))[..., 0]).float()
            kls[:, :, l] = (lp_full.exp() * (lp_full - lp)).sum(-1).clamp_min(0).float()
        # own-expert action: exactly "unchanged" (schema)
        own_mask = F.one_hot(idx, A).bool()  # (W, T, L, K, A)
        fc = (pred == y)[:, :, None, None, None].expand_as(own_mask)
        corr = torch.where(own_mask, fc, corr)
        same = same | own_mask
        dls = dls.masked_fill(own_mask, 0.0)
        kls = kls.masked_fill(own_mask, 0.0)
        for k_, v_ in (("effect_correct", corr), ("effect_same", same), ("effect_dloss", dls), ("effect_kl", kls)):
            out[k_].append(v_)
    res = {}
    for k, v in out.items():
        if v:
            t = torch.cat(v, 0)
            res[k] = t.reshape((-1,) + tuple(t.shape[2:])).numpy()
    res["token_id"] = windows[:, :-1].reshape(-1)
    res["target_id"] = windows[:, 1:].reshape(-1)
    ds = np.zeros(windows[:, :-1].shape, bool)
    ds[:, 0] = True
    res["doc_start"] = ds.reshape(-1)
    res["full_correct"] = res["full_pred"] == res["target_id"]
    return res


def effect_summary(tr: dict, D: np.ndarray) -> dict:
    """The three headline effect sizes (accuracy in points) from the effect tables."""
    corr, dls = tr["effect_correct"], tr["effect_dloss"].astype(np.float64)
    idx = tr["topk_idx"]
    Tn, L, K, A = corr.shape
    E = A - 1
    base = float(tr["full_correct"].mean())
    out = {"full_acc": base, "n_tokens": int(Tn)}
    out["skip_slot_acc_drop_pts"] = {f"layer{l}": [round(100 * (base - corr[:, l, k, E].mean()), 3) for k in range(K)] for l in range(L)}
    out["skip_slot_dloss"] = {f"layer{l}": [round(float(dls[:, l, k, E].mean()), 4) for k in range(K)] for l in range(L)}
    if K >= 2:
        out["skip_2nd_all_layers_mean_drop_pts"] = round(100 * (base - corr[:, :, 1, E].mean()), 3)
    out["skip_layer0_top1_acc"] = round(float(corr[:, 0, 0, E].mean()), 4)
    # replace by most similar expert (argmin_{j != i} D_l(i, j)) vs skip
    rep = {}
    for l in range(L):
        Dl = D[l, :, :E].copy()
        np.fill_diagonal(Dl, np.inf)
        best = Dl.argmin(1)  # (E,)
        for k in range(K):
            i = idx[:, l, k]
            j = best[i]
            c_rep = corr[np.arange(Tn), l, k, j]
            d_rep = dls[np.arange(Tn), l, k, j]
            c_skip = corr[:, l, k, E]
            d_skip = dls[:, l, k, E]
            rep[f"layer{l}_slot{k}"] = {
                "acc_replace": round(float(c_rep.mean()), 4),
                "acc_skip": round(float(c_skip.mean()), 4),
                "dloss_replace": round(float(d_rep.mean()), 4),
                "dloss_skip": round(float(d_skip.mean()), 4),
                "frac_tokens_replace_lower_loss": round(float((d_rep < d_skip).mean()), 4),
                "frac_table_prefers_replace": round(float((D[l, i, j] < D[l, i, E]).mean()), 4),
            }
    out["replace_most_similar_vs_skip"] = rep
    return out


def export_trace(model: MoELM, corpus_dir: str | Path, out_path: str | Path, provenance: dict | None = None,
                 n_trace_tokens: int = 16384, n_calib_tokens: int = 16384, effects: bool = True) -> dict:
    """Compute and write the trace; returns {'summary': ..., 'calib': ...}."""
    from wide_env.gating.trace import save_trace

    model.eval()
    cfg = model.cfg
    docs = load_docs(corpus_dir)
    sp = split_docs(docs)
    t0 = time.time()
    cal_w, cal_where = _windows(docs, sp.calib, cfg.block_size, n_calib_tokens)
    cal = mismatch_tables(model, cal_w)
    tr_w, tr_where = _windows(docs, sp.trace, cfg.block_size, n_trace_tokens)
    tr = trace_windows(model, tr_w, effects=effects)
    summary = effect_summary(tr, cal["mismatch"]) if effects else {"full_acc": float(tr["full_correct"].mean())}
    meta = {
        "model": "wide_env tiny byte-level MoE LM (wide_env/models/moe_lm.py)",
        "model_config": cfg.to_dict(),
        "checkpoint": "moe_lm.safetensors (fp16) + moe_lm.json",
        "provenance": provenance or {},
        "calibration": {"docs": sp.calib, "windows": len(cal_w), "tokens": int(cal_w[:, :-1].size),
                         "routed_to_i": "expert i is in the token's Top-K (either slot)",
                         "routed_count": cal["routed_count"].tolist(), "unrouted_fallback_all_tokens": cal["unrouted"]},
        "trace": {"docs": sp.trace, "windows": [f"{n}@{s}" for n, s in tr_where], "window_len": cfg.block_size,
                  "doc_start": "True at the first token of every window; the model sees only that window as context"},
        "layer_budget_rule": "eps_l = median over calibration tokens of w_2 * ||E_{i_2}(x)|| (the weighted deviation of "
                             "skipping the token's 2nd expert); K = 1: half the median of w_1 * ||E_{i_1}(x)||",
        "effects": "exact re-run of the model with one perturbation (slot k of layer l served by expert a or skipped), "
                   "other tokens' keys/values and all other layers' Top-K routing as in the full model",
        "effect_summary": summary,
        "export_time_s": None,
    }
    T = tr["gate_probs"].shape[0]
    arrays = dict(
        schema_version=np.array(1, np.int64),
        gate_probs=tr["gate_probs"].astype(np.float16),
        topk_idx=tr["topk_idx"].astype(np.int16),
        topk_weight=tr["topk_weight"].astype(np.float32),
        mismatch=cal["mismatch"],
        layer_budget=cal["layer_budget"],
        d_model=np.array(cfg.d_model, np.int64),
        routing=np.array("softmax_topk_renorm" if cfg.top_k > 1 else "softmax_topk_raw"),
        token_id=tr["token_id"].astype(np.int16),
        target_id=tr["target_id"].astype(np.int16),
        doc_start=tr["doc_start"],
        full_correct=tr["full_correct"],
    )
    # fp16 rounding can leave rows summing to 1 +- 4e-3 at most; fine for the 1e-2 schema tolerance
    if effects:
        arrays.update(effect_correct=tr["effect_correct"], effect_same=tr["effect_same"],
                      effect_dloss=tr["effect_dloss"].astype(np.float16), effect_kl=tr["effect_kl"].astype(np.float16))
    meta["export_time_s"] = round(time.time() - t0, 1)
    arrays["meta"] = np.array(json.dumps(meta))
    assert T == arrays["token_id"].shape[0]
    save_trace(out_path, **arrays)
    return {"summary": summary, "calib": cal, "meta": meta}


def main(argv=None) -> int:
    from .moe_lm import load_checkpoint

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--trace-tokens", type=int, default=16384)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--no-effects", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from .corpus import fetch_shakespeare

    model, meta = load_checkpoint(args.ckpt)
    corpus = args.corpus or str(fetch_shakespeare())
    t0 = time.time()
    info = export_trace(model, corpus, args.out, provenance=meta.get("provenance"), n_trace_tokens=args.trace_tokens,
                        n_calib_tokens=args.calib_tokens, effects=not args.no_effects)
    print(f"export {time.time() - t0:.1f}s", json.dumps(info["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
