"""Record a gating trace (docs/trace-schema.md) from a Hugging Face transformers (>= 5) MoE checkpoint.

Optional extra ``hf`` (``pip install 'transformers>=5'``). Works with the transformers-5 MoE blocks whose
router module (class name ending in ``TopKRouter`` / ``TopkRouter``) returns
``(router_logits, top_k_weights, top_k_index)`` and whose sibling ``experts`` module is called as
``experts(hidden_states, top_k_index, top_k_weights)``: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3,
GPT-OSS (checked against the transformers 5.24 sources).

* ``gate_probs``: softmax of the router logits; for sigmoid routers (DeepSeek-V3: the router holds an
  ``e_score_correction_bias``) the sigmoid scores normalised to sum 1.
* ``topk_idx`` / ``topk_weight``: what the router returned, slots re-ordered by descending gate probability
  (DeepSeek-V3 returns them unsorted); the weights are the ones the experts are combined with (for
  DeepSeek-V3 including ``routed_scaling_factor``).
* ``routing``: detected from the captured weights (renormalised vs raw Top-K softmax); sigmoid routers
  are labelled ``sigmoid_topk_renorm``.
* ``mismatch``: every expert of a layer is run on the calibration hidden states routed to expert i
  (i in the token's Top-K): D_l(i, j) = mean ||E_i(x) - E_j(x)||, D_l(i, skip) = mean ||E_i(x)||.
  Shared experts (Qwen2-MoE, DeepSeek-V3) and dense layers are not part of the table: they always run.
* ``layer_budget``: median over calibration tokens of ``w_2 * ||E_{i_2}(x)||`` (K = 1: half the median of
  ``w_1 * ||E_{i_1}(x)||``), as for the shipped tiny model.
* Effect tables are **not** recorded (they need one re-run of the model per token, layer, slot and action);
  ``full_correct`` (the unperturbed model's next-token prediction) is.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

ROUTER_RE = re.compile(r"top_?k_?router$", re.IGNORECASE)


@dataclass
class MoELayer:
    name: str
    router: torch.nn.Module
    experts: torch.nn.Module
    n_experts: int
    top_k: int
    sigmoid: bool


def find_moe_layers(model: torch.nn.Module) -> list[MoELayer]:
    """The model's MoE layers in execution order (router module + sibling ``experts`` module)."""
    mods = dict(model.named_modules())
    out = []
    for name, mod in model.named_modules():
        if not ROUTER_RE.search(type(mod).__name__):
            continue
        parent = mods[name.rsplit(".", 1)[0]] if "." in name else model
        experts = getattr(parent, "experts", None)
        if experts is None:
            raise ValueError(f"router {name} ({type(mod).__name__}) has no sibling 'experts' module")
        n_exp = getattr(mod, "num_experts", None) or getattr(experts, "num_experts", None)
        top_k = getattr(mod, "top_k", None)
        if n_exp is None or top_k is None:
            raise ValueError(f"router {name}: cannot read num_experts / top_k")
        sigmoid = hasattr(mod, "e_score_correction_bias")
        out.append(MoELayer(name, mod, experts, int(n_exp), int(top_k), sigmoid))
    if not out:
        raise ValueError(f"{type(model).__name__}: no transformers-5 MoE router (class '*TopKRouter') found")
    return out


class _Capture:
    """Forward hooks on every router: store (x, logits, weights, idx) of the last forward."""

    def __init__(self, layers: list[MoELayer]):
        self.layers = layers
        self.data: list = [None] * len(layers)
        self.handles = [lay.router.register_forward_hook(self._hook(i)) for i, lay in enumerate(layers)]

    def _hook(self, i):
        def fn(mod, args, output):
            x = args[0] if args else None
            logits, w, idx = output[0], output[1], output[2]
            self.data[i] = (x.detach().reshape(-1, x.shape[-1]), logits.detach().float().reshape(idx.shape[0], -1),
                            w.detach().float(), idx.detach())
        return fn

    def close(self):
        for h in self.handles:
            h.remove()


def _gate_probs(logits: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    if sigmoid:
        s = logits.sigmoid()
        return s / s.sum(-1, keepdim=True)
    return torch.softmax(logits, -1)


@torch.no_grad()
def expert_outputs(lay: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """(N, E, d): every expert of the layer applied to every row of x (unit weight)."""
    outs = []
    ones = torch.ones(x.shape[0], 1, dtype=x.dtype)
    for j in range(lay.n_experts):
        idx = torch.full((x.shape[0], 1), j, dtype=torch.long)
        outs.append(lay.experts(x, idx, ones).float())
    return torch.stack(outs, 1)


def _sorted_slots(probs: torch.Tensor, w: torch.Tensor, idx: torch.Tensor):
    order = torch.argsort(probs.gather(1, idx), dim=1, descending=True, stable=True)
    return idx.gather(1, order), w.gather(1, order)


def tokenize(text: str, tokenizer=None, vocab_size: Optional[int] = None) -> np.ndarray:
    """Token ids of the text: with a tokenizer its ids (no special tokens), else UTF-8 bytes modulo the
    vocabulary size (enough to exercise a random-initialised model offline)."""
    if tokenizer is not None:
        return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int64)
    b = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int64)
    return b % int(vocab_size) if vocab_size else b


@torch.no_grad()
def record_trace(model, text: str | Path, out_path: str | Path | None = None, tokenizer=None,
                 calib_text: str | Path | None = None, calib_fraction: float = 0.5, window: int = 128,
                 max_tokens: Optional[int] = None, batch: int = 4, meta: Optional[dict] = None) -> dict:
    """Run ``model`` on the text file ``text``, write the trace to ``out_path`` (if given) and
    return the arrays. Calibration tokens come from ``calib_text`` or else from the first
    ``calib_fraction`` of the text; the trace tokens are the rest. Both are cut into windows of ``window``
    tokens (each window is one context; ``doc_start`` marks window starts)."""
    from wide_env.gating.trace import save_trace, validate_trace

    model.eval()
    cfg = model.config

    def _read(t):
        p = Path(t)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: text file not found")
        return p.read_text(encoding="utf-8", errors="replace")

    vocab = getattr(cfg, "vocab_size", None)
    ids = tokenize(_read(text), tokenizer, vocab)
    if calib_text is not None:
        cal_ids, tr_ids = tokenize(_read(calib_text), tokenizer, vocab), ids
    else:
        cut = int(len(ids) * calib_fraction)
        cal_ids, tr_ids = ids[:cut], ids[cut:]
    if max_tokens:
        tr_ids = tr_ids[: max_tokens + 1]

    def _wins(a):
        n = (len(a) - 1) // window
        if n < 1:
            raise ValueError(f"text too short: need more than {window} tokens per part, got {len(a)}")
        return np.stack([a[i * window : i * window + window + 1] for i in range(n)])

    cal_w, tr_w = _wins(cal_ids), _wins(tr_ids)
    layers = find_moe_layers(model)
    L = len(layers)
    E, K = layers[0].n_experts, layers[0].top_k
    if any(l.n_experts != E or l.top_k != K for l in layers):
        raise ValueError("MoE layers with different E or K are not supported by the trace schema")
    cap = _Capture(layers)
    try:
        # ---- calibration: mismatch tables
        sums = np.zeros((L, E, E + 1))
        cnt = np.zeros((L, E))
        w2 = [[] for _ in range(L)]
        for s in range(0, len(cal_w), batch):
            model(input_ids=torch.from_numpy(cal_w[s : s + batch, :-1]))
            for l, lay in enumerate(layers):
                x, logits, w, idx = cap.data[l]
                probs = _gate_probs(logits, lay.sigmoid)
                idx, w = _sorted_slots(probs, w, idx)
                eo = expert_outputs(lay, x).double()
                tab = torch.cat([torch.cdist(eo, eo), eo.norm(dim=-1)[..., None]], -1).numpy()
                sel = np.zeros((x.shape[0], E))
                np.put_along_axis(sel, idx.numpy(), 1.0, axis=1)
                sums[l] += np.einsum("ne,nef->ef", sel, tab)
                cnt[l] += sel.sum(0)
                k2 = 1 if K >= 2 else 0
                nrm = eo.norm(dim=-1).numpy()
                w2[l].append(w[:, k2].double().numpy() * nrm[np.arange(len(idx)), idx[:, k2].numpy()])
        overall = sums.sum(1) / max(cnt.sum(1).max(), 1)
        D = np.where(cnt[..., None] > 0, sums / np.maximum(cnt[..., None], 1), overall[:, None, :])
        D[:, np.arange(E), np.arange(E)] = 0.0
        budget = np.array([np.median(np.concatenate(w2[l])) * (1.0 if K >= 2 else 0.5) for l in range(L)])
        budget = np.maximum(budget, 1e-12)
        # ---- trace
        P, I, W, F, tok, tgt = [], [], [], [], [], []
        renorm_err = raw_err = 0.0
        for s in range(0, len(tr_w), batch):
            wb = torch.from_numpy(tr_w[s : s + batch])
            out = model(input_ids=wb[:, :-1])
            B, T = wb[:, :-1].shape
            ps, iis, ws = [], [], []
            for l, lay in enumerate(layers):
                _, logits, w, idx = cap.data[l]
                probs = _gate_probs(logits, lay.sigmoid)
                idx, w = _sorted_slots(probs, w, idx)
                pk = probs.gather(1, idx)
                renorm_err = max(renorm_err, float((w - pk / pk.sum(1, keepdim=True)).abs().max()))
                raw_err = max(raw_err, float((w - pk).abs().max()))
                ps.append(probs.reshape(B, T, E))
                iis.append(idx.reshape(B, T, K))
                ws.append(w.reshape(B, T, K))
            P.append(torch.stack(ps, 2)); I.append(torch.stack(iis, 2)); W.append(torch.stack(ws, 2))
            F.append((out.logits.argmax(-1) == wb[:, 1:]).reshape(-1))
            tok.append(wb[:, :-1].reshape(-1)); tgt.append(wb[:, 1:].reshape(-1))
    finally:
        cap.close()
    if layers[0].sigmoid:
        routing = "sigmoid_topk_renorm"
    else:
        routing = "softmax_topk_renorm" if renorm_err <= raw_err else "softmax_topk_raw"
    gp = torch.cat(P).reshape(-1, L, E).numpy()
    ds = np.zeros(tr_w[:, :-1].shape, bool)
    ds[:, 0] = True
    info = {
        "source": "wide_env.modeltools.hf_recorder",
        "model_type": getattr(cfg, "model_type", type(model).__name__),
        "model_class": type(model).__name__,
        "moe_layers": [l.name for l in layers],
        "window": window,
        "calib_tokens": int(cal_w[:, :-1].size),
        "calib_routed_count": cnt.astype(int).tolist(),
        "tokenizer": None if tokenizer is None else getattr(tokenizer, "name_or_path", type(tokenizer).__name__),
        "routing_check": {"max_err_vs_renorm": renorm_err, "max_err_vs_raw": raw_err},
        "layer_budget_rule": "median over calibration tokens of w_2 * ||E_{i_2}(x)|| (K=1: 0.5 * median w_1 ||E_{i_1}(x)||)",
        "effects": "not recorded (full_correct only)",
        **(meta or {}),
    }
    if layers[0].sigmoid:
        info["sigmoid_router"] = {"norm_topk_prob": bool(getattr(layers[0].router, "norm_topk_prob", True)),
                                  "routed_scaling_factor": float(getattr(layers[0].router, "routed_scaling_factor", 1.0))}
    arrays = dict(
        schema_version=np.array(1, np.int64),
        gate_probs=gp.astype(np.float32),
        topk_idx=torch.cat(I).reshape(-1, L, K).numpy().astype(np.int64),
        topk_weight=torch.cat(W).reshape(-1, L, K).numpy().astype(np.float32),
        mismatch=D.astype(np.float32),
        layer_budget=budget.astype(np.float32),
        d_model=np.array(int(cfg.hidden_size), np.int64),
        routing=np.array(routing),
        token_id=torch.cat(tok).numpy().astype(np.int64),
        target_id=torch.cat(tgt).numpy().astype(np.int64),
        doc_start=ds.reshape(-1),
        full_correct=torch.cat(F).numpy().astype(bool),
        meta=np.array(json.dumps(info)),
    )
    if out_path is not None:
        save_trace(out_path, **arrays)
    return validate_trace(arrays, source=str(out_path or "<recorded>"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Record a WIDE gating trace from a Hugging Face MoE model")
    ap.add_argument("--model", required=True, help="local model directory (or hub id if you have network)")
    ap.add_argument("--text", required=True, help="text file")
    ap.add_argument("--out", required=True)
    ap.add_argument("--calib-text", default=None)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    arr = record_trace(model, args.text, args.out, tokenizer=tok, calib_text=args.calib_text, window=args.window,
                       max_tokens=args.max_tokens, meta={"model": args.model})
    print(f"wrote {args.out}: T={arr['gate_probs'].shape[0]} L={arr['gate_probs'].shape[1]} "
          f"E={arr['gate_probs'].shape[2]} K={arr['topk_idx'].shape[2]} routing={arr['routing']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
