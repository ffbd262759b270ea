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
def continue_from(model: MoELM, layer: int, xq: torch.Tensor, pos: torch.Tensor, cache: list,
                  routing: list | None = None) -> torch.Tensor:
    """Run query tokens from the residual stream *after* MoE layer ``layer`` to the logits.

    xq: (W, Q, d) residual streams of Q query tokens in each of W windows; pos: (Q,) their positions;
    cache[m] = (K, V) of the unperturbed model at layer m, each (W, H, T, hd). Each query attends to the
    cached keys of positions < pos and to its own (recomputed) key. Later layers route normally, or, with
    ``routing[m] = (idx, w)`` ((W, T, K) each: the full model's Top-K and weights), keep the full model's
    routing of the query's position (the experts still see the perturbed hidden state).
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
        if routing is None:
            _, tidx, tw = blk.moe_route(hf)
        else:
            tidx, tw = (a[:, pos].reshape(W * Q, -1) for a in routing[m])
        x = r + blk.experts.sparse(hf, tidx, tw.to(hf.dtype)).reshape(W, Q, d)
    return model.head_logits(x)


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


# ----------------------------------------------------------------------------------------------------
# single-perturbation re-runs: dense effect tables and logit-effect tables (wide_env.gating.effects)
# ----------------------------------------------------------------------------------------------------
#: competitor classes per position besides the target (the rule's vector: target, competitors, rest, dloss)
N_COMPETITORS = 1
#: after rounding the entries to float16, every single-perturbation decision keeps at least this margin
#: (logits) between the winning score and the best other one, so float32 and float64 sums decide alike
DECISION_MARGIN = 1e-4


def all_servers(n_layer: int, n_expert: int) -> np.ndarray:
    """(L, E, E) every server but the own expert per (layer, own expert): skip (E) first, then j != i."""
    E = n_expert
    one = np.array([[E] + [j for j in range(E) if j != i] for i in range(E)], np.int16)
    return np.broadcast_to(one, (n_layer, E, E)).copy()


def eligible_servers(mismatch: np.ndarray) -> np.ndarray:
    """(L, E, S) int16 servers with table rows per (layer, own expert i), padded with -1: skip (E) first,
    then every j != i with D_l(i, j) <= D_l(i, skip), ascending. The combine rule (slot i served by the
    executed j minimising D_l(i, j), or skipped when D_l(i, skip) is smaller) chooses no other server."""
    D = np.asarray(mismatch, np.float64)
    L, E = D.shape[:2]
    lists = [[[E] + [j for j in range(E) if j != i and D[l, i, j] <= D[l, i, E]] for i in range(E)] for l in range(L)]
    S = max(len(x) for row in lists for x in row)
    out = np.full((L, E, S), -1, np.int16)
    for l in range(L):
        for i in range(E):
            out[l, i, : len(lists[l][i])] = lists[l][i]
    return out


def _candidate_scores(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(N, M+2): logits (N, V) of the classes (N, M+1), then the max over every other class."""
    rest = logits.scatter(-1, classes, float("-inf")).amax(-1, keepdim=True)
    return torch.cat([logits.gather(-1, classes), rest], -1)


def _winner_slot(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(N,) slot 0..M+1 of the model's prediction (argmax) among [classes..., rest]."""
    hit = logits.argmax(-1, keepdim=True) == classes
    return torch.where(hit.any(-1), hit.to(torch.uint8).argmax(-1), torch.full_like(hit[:, 0], classes.shape[-1], dtype=torch.long))


@torch.no_grad()
def perturbation_rows(model: MoELM, windows: np.ndarray, servers: np.ndarray, n_competitors: int = N_COMPETITORS,
                      frozen: bool = False) -> dict:
    """Re-run the model once per single perturbation of every token of the windows (W, block+1).

    A perturbation is (token t, layer l, slot k, server s): slot k of layer l is served by expert s or
    skipped (s = E), everything else as in the full model: earlier tokens keep their unperturbed keys and
    values, later layers route normally (``continue_from``; batched per window and layer). ``servers``
    (L, E, S) lists the servers per (layer, own expert), padded with -1. Rows are in (t, l, k, server)
    order. Candidates of token t: its target y, the full model's ``n_competitors`` best other classes, and
    "rest" (the best of all other classes).

    Returns float64 ``delta`` (R, M+3) (change of each candidate's logit, of the rest max, of the loss),
    ``winner`` (R,) (the candidate slot the perturbed model predicts), when asked ``frozen`` (R, M+2) (the
    candidates' and rest's logit changes when the later layers keep the full model's routing; the rule sums
    these for tokens with several perturbations), per-row ``position``, ``layer``, ``slot``, ``server``, and per-token ``classes`` (T, M+1),
    ``base`` (T, M+2) (the full model's candidate logits and rest max minus its top logit), ``topk_idx``.
    """
    cfg = model.cfg
    L, E, K = cfg.n_layer, cfg.n_expert, cfg.top_k
    M = n_competitors
    servers = np.asarray(servers, np.int64)
    n_srv = (servers >= 0).sum(-1)  # (L, E)
    out = {k: [] for k in ("delta", "winner", "frozen", "position", "layer", "slot", "server", "classes", "base",
                           "topk_idx")}
    for w in range(len(windows)):
        wb = torch.from_numpy(windows[w : w + 1])
        x, y = wb[:, :-1], wb[0, 1:]
        T = x.shape[1]
        rec: dict = {}
        logits, _ = model(x, record=rec)
        lays = rec["layers"]
        z = logits[0].double()  # (T, V)
        comp = z.scatter(-1, y[:, None], float("-inf")).topk(M, -1).indices  # best non-target classes
        classes = torch.cat([y[:, None], comp], -1)  # (T, M+1)
        full = _candidate_scores(z, classes)  # (T, M+2)
        logp_full = F.log_softmax(z, -1)
        cache = [(la["k"], la["v"]) for la in lays]
        idx = torch.stack([la["idx"][:T] for la in lays], 1)  # (T, L, K)
        wts = torch.stack([la["w"][:T] for la in lays], 1)
        full_routing = [(la["idx"][None], la["w"][None]) for la in lays]  # (1, T, K) per layer
        out["classes"].append(classes.numpy())
        out["base"].append((full - z.amax(-1, keepdim=True)).numpy())
        out["topk_idx"].append(idx.numpy())
        parts = []
        for l, la in enumerate(lays):
            own = idx[:, l].numpy()  # (T, K)
            cnt = n_srv[l][own]  # (T, K) rows per slot
            tk = np.repeat(np.arange(T * K), cnt.reshape(-1))
            t_np, k_np = tk // K, tk % K
            first = np.repeat(np.cumsum(cnt.reshape(-1)) - cnt.reshape(-1), cnt.reshape(-1))
            s_np = servers[l, own[t_np, k_np], np.arange(tk.size) - first]
            t_, k_, s_ = (torch.from_numpy(a) for a in (t_np, k_np, s_np))
            eo = la["eo"]  # (T, E, d)
            x_out = la["r"][0] + torch.einsum("te,ted->td", combine_matrix(idx[:, l], wts[:, l], E).to(eo.dtype), eo)
            alt = torch.cat([eo, torch.zeros_like(eo[:, :1])], 1)  # (T, E+1, d): output of each server
            xq = x_out[t_] + wts[t_, l, k_, None].to(eo.dtype) * (alt[t_, s_] - eo[t_, idx[t_, l, k_]])
            lg = continue_from(model, l, xq[None], t_, cache)[0].double()  # (Q, V)
            logp = F.log_softmax(lg, -1)
            dloss = logp_full[t_, y[t_]] - logp[torch.arange(len(t_)), y[t_]]
            d = torch.cat([_candidate_scores(lg, classes[t_]) - full[t_], dloss[:, None]], -1)
            row = dict(delta=d.numpy(), winner=_winner_slot(lg, classes[t_]).numpy(), position=w * T + t_np,
                       layer=np.full(t_np.size, l), slot=k_np, server=s_np)
            if frozen:
                lg_frozen = continue_from(model, l, xq[None], t_, cache, routing=full_routing)[0].double()
                row["frozen"] = (_candidate_scores(lg_frozen, classes[t_]) - full[t_]).numpy()
            parts.append(row)
        order = np.lexsort((np.concatenate([p["layer"] for p in parts]), np.concatenate([p["position"] for p in parts])))
        for key in parts[0]:  # (l, t, k, s) -> (t, l, k, s): a stable sort by (t, l)
            out[key].append(np.concatenate([p[key] for p in parts])[order])
    return {k: np.concatenate(v) for k, v in out.items() if v}


def dense_effect_tables(rows: dict, full_correct: np.ndarray, n_expert: int) -> dict:
    """effect_correct / effect_same / effect_dloss (T, L, K, E+1) from rows of every server (``all_servers``);
    the own-expert action is exactly "unchanged" (schema). (The schema's optional effect_kl is not written:
    nothing reads it, and it would cost 2 MB in the tiny trace.)"""
    T, L, K = rows["topk_idx"].shape
    A = n_expert + 1
    full_slot = np.where(full_correct, 0, 1)
    correct = np.repeat(np.asarray(full_correct, bool)[:, None, None, None], L * K * A).reshape(T, L, K, A)
    same = np.ones((T, L, K, A), bool)
    dloss = np.zeros((T, L, K, A))  # float64, rounded once to float16 (as the logit-effect tables are)
    at = (rows["position"], rows["layer"], rows["slot"], rows["server"])
    correct[at] = rows["winner"] == 0
    same[at] = rows["winner"] == full_slot[rows["position"]]
    dloss[at] = rows["delta"][:, -1]
    return {"effect_correct": correct, "effect_same": same, "effect_dloss": dloss.astype(np.float16)}


def logit_effect_tables(rows: dict, servers: np.ndarray, margin: float = DECISION_MARGIN) -> dict:
    """The trace's logit_effect_{servers, classes, base, delta, frozen} from rows computed for ``servers`` or for
    a superset of them (e.g. every server, for the dense tables too): rows of other servers are dropped.

    Entries are rounded to float16; then, for every row (one perturbation) whose rounded entries would not
    put the perturbed model's prediction ahead of every other candidate by ``margin``, the prediction's
    entry is raised by float16 steps until they do (the same on the base: the full model's prediction
    leads by ``margin``). So the rule reproduces every single perturbation exactly. Returns the arrays and
    ``info`` (rows, rows nudged, largest change from rounding and nudging)."""
    servers = np.asarray(servers, np.int16)
    L, E, _ = servers.shape
    listed = np.zeros((L, E, E + 1), bool)
    for l in range(L):
        for i in range(E):
            listed[l, i, servers[l, i][servers[l, i] >= 0]] = True
    own = rows["topk_idx"][rows["position"], rows["layer"], rows["slot"]]
    keep = listed[rows["layer"], own, rows["server"]]
    base = rows["base"].copy()
    n = base.shape[1]
    full_slot = base.argmax(1)
    others = np.arange(n)[None, :] != full_slot[:, None]
    base[others] = np.minimum(base[others], -margin)
    base = base.astype(np.float32)
    exact = rows["delta"][keep]
    delta = exact.astype(np.float16)
    if not np.isfinite(delta).all():
        raise RuntimeError("a logit-effect entry overflows float16")
    nudged = _enforce_margin(base[rows["position"][keep]], delta[:, :n], rows["winner"][keep], margin)
    out = {"logit_effect_servers": servers, "logit_effect_classes": rows["classes"].astype(np.int16),
           "logit_effect_base": base, "logit_effect_delta": delta}
    if "frozen" in rows:
        frozen = rows["frozen"][keep].astype(np.float16)
        if not np.isfinite(frozen).all():
            raise RuntimeError("a frozen-routing logit-effect entry overflows float16")
        out["logit_effect_frozen"] = frozen
    return {**out,
            "info": {"rows": int(keep.sum()), "rows_nudged": int(nudged),
                     "max_abs_change": float(np.abs(delta.astype(np.float64) - exact).max()) if len(exact) else 0.0}}


def _enforce_margin(base: np.ndarray, delta: np.ndarray, winner: np.ndarray, margin: float) -> int:
    """Raise ``delta[r, winner[r]]`` (a float16 view, edited in place) by float16 steps until
    ``base + delta`` (float64) puts slot ``winner[r]`` ahead of every other slot by ``margin``; returns the
    number of rows changed. base (R, C) float32, one row per row of delta."""
    rows = np.arange(len(delta))
    changed = np.zeros(len(delta), bool)
    for _ in range(64):  # float16 steps: a handful at most
        score = base.astype(np.float64) + delta.astype(np.float64)
        win = score[rows, winner].copy()
        score[rows, winner] = -np.inf
        bad = np.flatnonzero(win < score.max(1) + margin)
        if bad.size == 0:
            return int(changed.sum())
        changed[bad] = True
        need = score[bad].max(1) + margin - base[bad, winner[bad]].astype(np.float64)
        v = np.maximum(need, delta[bad, winner[bad]].astype(np.float64)).astype(np.float16)
        delta[bad, winner[bad]] = np.where(v.astype(np.float64) < need, np.nextafter(v, np.float16(np.inf)), v)
    raise RuntimeError("could not give every single perturbation the decision margin")


def effect_summary(rows: dict, full_correct: np.ndarray, D: np.ndarray) -> dict:
    """Headline effect sizes (accuracy in points) of single perturbations, from perturbation rows."""
    T, L, K = rows["topk_idx"].shape
    E = D.shape[1]
    base = float(np.mean(full_correct))
    correct = rows["winner"] == 0
    dloss = rows["delta"][:, -1]
    out = {"full_acc": base, "n_tokens": int(T)}
    skip = rows["server"] == E

    def at(l, k, extra):
        sel = (rows["layer"] == l) & (rows["slot"] == k) & extra
        return correct[sel], dloss[sel], rows["position"][sel]

    out["skip_slot_acc_drop_pts"] = {f"layer{l}": [round(100 * (base - at(l, k, skip)[0].mean()), 3) for k in range(K)] for l in range(L)}
    out["skip_slot_dloss"] = {f"layer{l}": [round(float(at(l, k, skip)[1].mean()), 4) for k in range(K)] for l in range(L)}
    if K >= 2:
        out["skip_2nd_all_layers_mean_drop_pts"] = round(100 * (base - np.mean([at(l, 1, skip)[0].mean() for l in range(L)])), 3)
    out["skip_layer0_top1_acc"] = round(float(at(0, 0, skip)[0].mean()), 4)
    # replace by the most similar expert (argmin_{j != i} D_l(i, j)) vs skip, on the tokens that have its row
    rep = {}
    own = rows["topk_idx"][rows["position"], rows["layer"], rows["slot"]]
    for l in range(L):
        Dl = D[l, :, :E].astype(np.float64).copy()
        np.fill_diagonal(Dl, np.inf)
        best = Dl.argmin(1)
        for k in range(K):
            c_rep, d_rep, p_rep = at(l, k, rows["server"] == best[own])
            if p_rep.size == 0:
                continue
            c_skip, d_skip, p_skip = at(l, k, skip)
            pick = np.searchsorted(p_skip, p_rep)  # skip rows of the same tokens (one per token, sorted)
            rep[f"layer{l}_slot{k}"] = {
                "tokens": int(p_rep.size),
                "acc_replace": round(float(c_rep.mean()), 4),
                "acc_skip": round(float(c_skip[pick].mean()), 4),
                "dloss_replace": round(float(d_rep.mean()), 4),
                "dloss_skip": round(float(d_skip[pick].mean()), 4),
                "frac_tokens_replace_lower_loss": round(float((d_rep < d_skip[pick]).mean()), 4),
            }
    out["replace_most_similar_vs_skip"] = rep
    return out


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
    from .moe_lm import load_checkpoint

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
    from .corpus import fetch_shakespeare

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
