"""Single-perturbation re-runs of the tiny MoE LM and the effect tables built from them (wide_env.gating.effects).

For every trace token, layer l, Top-K slot k and server a (serve the slot by expert a, or skip it when a = E), the
model is re-run from layer l of that token with only that perturbation (earlier tokens keep their unperturbed
keys/values; later layers route normally): :func:`perturbation_rows`; :func:`dense_effect_tables` and
:func:`logit_effect_tables` turn the rows into a trace's tables. :mod:`wide_env.modeltools.export` writes them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from wide_env.models.moe_lm import MoELM, combine_matrix

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
