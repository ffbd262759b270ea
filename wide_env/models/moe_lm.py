"""A small byte-level decoder-only Mixture-of-Experts language model.

Every MoE layer: router logits -> softmax over E experts -> Top-K -> combine weights, either renormalised
over the Top-K (``routing = "softmax_topk_renorm"``: Mixtral; also GPT-OSS, whose softmax over the Top-K
logits is the same thing) or the raw probabilities (``"softmax_topk_raw"``: Switch, K = 1).
The layer output for one token is ``sum_k w_k * E_{i_k}(h)`` where ``h = LayerNorm(x)`` is the MoE input.
Expert outputs ``E_i(h)`` are the quantities the mismatch tables ``D_l(i, j)`` are measured on.

The forward pass accepts a *combine override*: a function ``(layer, probs, topk_idx, topk_w) -> C`` that
returns a dense ``(N, E)`` combine matrix, so that any assignment of Top-K slots to stand-in experts or to
"skip" can be expressed (``C[n, e] = sum_k w_k [phi(k) = e]``; a skipped slot contributes nothing).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, truncated or inconsistent with its config."""


ROUTINGS = ("softmax_topk_renorm", "softmax_topk_raw")


@dataclass
class MoEConfig:
    vocab_size: int = 256
    n_layer: int = 4
    d_model: int = 64
    n_head: int = 4
    n_expert: int = 8
    top_k: int = 2
    d_ff: int = 128
    block_size: int = 128
    aux_loss_coef: float = 0.01
    #: combine weights: "softmax_topk_renorm" (Mixtral, GPT-OSS) or "softmax_topk_raw" (Switch)
    routing: str = "softmax_topk_renorm"

    def __post_init__(self):
        if self.routing not in ROUTINGS:
            raise ValueError(f"MoEConfig.routing = {self.routing!r}: choose one of {list(ROUTINGS)}")
        if not 1 <= self.top_k <= self.n_expert:
            raise ValueError(f"MoEConfig.top_k = {self.top_k} must be in [1, n_expert = {self.n_expert}]")
        if self.d_model % self.n_head:
            raise ValueError(f"MoEConfig.d_model = {self.d_model} must be a multiple of n_head = {self.n_head}")

    @classmethod
    def from_dict(cls, d: dict) -> "MoEConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown MoEConfig keys: {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


CombineFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], Optional[torch.Tensor]]


def topk_route(router_logits: torch.Tensor, k: int, routing: str = "softmax_topk_renorm"):
    """Softmax over experts, Top-K (descending), combine weights renormalised over the Top-K or raw.
    Returns (probs, idx, w)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    w, idx = torch.topk(probs, k, dim=-1)  # sorted descending
    if routing == "softmax_topk_renorm":
        w = w / w.sum(dim=-1, keepdim=True)
    return probs, idx, w


def combine_matrix(idx: torch.Tensor, w: torch.Tensor, n_expert: int) -> torch.Tensor:
    """Dense (..., E) combine matrix of the unperturbed Top-K mixture."""
    c = torch.zeros(*idx.shape[:-1], n_expert, dtype=w.dtype, device=w.device)
    return c.scatter_add_(-1, idx, w)


class Experts(nn.Module):
    """E independent GELU MLPs d_model -> d_ff -> d_model, evaluated densely (all experts)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        E, d, f = cfg.n_expert, cfg.d_model, cfg.d_ff
        self.w1 = nn.Parameter(torch.randn(E, d, f) / math.sqrt(d))
        self.b1 = nn.Parameter(torch.zeros(E, f))
        self.w2 = nn.Parameter(torch.randn(E, f, d) / math.sqrt(f) * 0.5)
        self.b2 = nn.Parameter(torch.zeros(E, d))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: (N, d) -> (N, E, d): every expert's output for every row."""
        a = F.gelu(torch.einsum("nd,edf->nef", h, self.w1) + self.b1)
        return torch.einsum("nef,efd->ned", a, self.w2) + self.b2

    def sparse(self, h: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Top-K mixture sum_k w_k E_{idx_k}(h), computing each expert only on its routed rows."""
        out = torch.zeros_like(h)
        flat_e = idx.reshape(-1)
        rows = torch.arange(h.shape[0], device=h.device).repeat_interleave(idx.shape[-1])
        flat_w = w.reshape(-1)
        for e in range(self.w1.shape[0]):
            sel = (flat_e == e).nonzero(as_tuple=True)[0]
            if sel.numel() == 0:
                continue
            r = rows[sel]
            y = self.one(e, h[r]) * flat_w[sel, None]
            out = out.index_add(0, r, y)
        return out

    def one(self, e: int, h: torch.Tensor) -> torch.Tensor:
        return F.gelu(h @ self.w1[e] + self.b1[e]) @ self.w2[e] + self.b2[e]


class Block(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.router = nn.Linear(cfg.d_model, cfg.n_expert, bias=False)
        self.experts = Experts(cfg)

    # --- attention helpers (shared by the batched forward, the exporter and the live backend) ---
    def qkv_heads(self, x: torch.Tensor):
        """x: (..., T, d) -> q, k, v each (..., H, T, hd)."""
        H = self.cfg.n_head
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        shp = q.shape[:-1] + (H, q.shape[-1] // H)
        return tuple(t.reshape(shp).transpose(-3, -2) for t in (q, k, v))

    def attn_out(self, y: torch.Tensor) -> torch.Tensor:
        """y: (..., H, T, hd) -> (..., T, d) projected."""
        y = y.transpose(-3, -2)
        return self.proj(y.reshape(y.shape[:-2] + (-1,)))

    def moe_route(self, h: torch.Tensor):
        return topk_route(self.router(h), self.cfg.top_k, self.cfg.routing)


class MoELM(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.block_size, cfg.d_model)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, idx: torch.Tensor, combine: Optional[CombineFn] = None, record: Optional[dict] = None):
        """idx: (B, T) bytes. Returns (logits (B,T,V), aux_loss).

        ``combine(layer, probs, topk_idx, topk_w)`` may return a (B*T, E) combine matrix replacing the
        Top-K mixture at that layer (None = unchanged). ``record`` (a dict) receives per-layer tensors:
        ``x_in``, ``r`` (residual after attention), ``h`` (MoE input), ``probs``, ``idx``, ``w``,
        ``k``/``v`` (attention keys/values, (B,H,T,hd)), ``eo`` (all expert outputs (B*T,E,d)).
        """
        B, T = idx.shape
        cfg = self.cfg
        if T > cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {cfg.block_size}")
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        aux = x.new_zeros(())
        for l, blk in enumerate(self.blocks):
            q, k, v = blk.qkv_heads(x)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            r = x + blk.attn_out(y)
            h = blk.ln2(r).reshape(B * T, -1)
            probs, tidx, tw = blk.moe_route(h)
            if combine is None and record is None:
                moe = blk.experts.sparse(h, tidx, tw.to(h.dtype)).reshape(B, T, -1)
            else:
                eo = blk.experts(h)  # (N, E, d)
                C = combine(l, probs, tidx, tw) if combine is not None else None
                if C is None:
                    C = combine_matrix(tidx, tw, cfg.n_expert)
                moe = torch.einsum("ne,ned->nd", C.to(eo.dtype), eo).reshape(B, T, -1)
            if record is not None:
                record.setdefault("layers", []).append(
                    dict(x_in=x, r=r, h=h, probs=probs, idx=tidx, w=tw, k=k, v=v, eo=eo)
                )
            x = r + moe
            if self.training and cfg.aux_loss_coef > 0:
                # Switch/Mixtral load-balancing loss: E * sum_e f_e * P_e
                sel = torch.zeros_like(probs).scatter_(-1, tidx, 1.0)
                f = sel.mean(0) / cfg.top_k
                P = probs.mean(0)
                aux = aux + cfg.n_expert * (f * P).sum()
        logits = self.head(self.ln_f(x))
        return logits, aux

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_f(x))


# ----------------------------------------------------------------------------------------------------
# checkpoint I/O: fp16 safetensors + JSON config
# ----------------------------------------------------------------------------------------------------
WEIGHTS_NAME = "moe_lm.safetensors"
CONFIG_NAME = "moe_lm.json"


def save_checkpoint(model: MoELM, out_dir: str | Path, provenance: Optional[dict] = None) -> tuple[Path, Path]:
    """Write ``moe_lm.safetensors`` (fp16) and ``moe_lm.json`` (config, provenance and the weights file's SHA-256,
    which :func:`load_checkpoint` verifies)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    wpath, cpath = out / WEIGHTS_NAME, out / CONFIG_NAME
    save_file(sd, str(wpath), metadata={"format": "pt", "dtype": "float16"})
    meta = {"config": model.cfg.to_dict(), "provenance": provenance or {}, HASH_KEY: weights_sha256(wpath)}
    cpath.write_text(json.dumps(meta, indent=1))
    return wpath, cpath


#: the checkpoint json's entry holding the hex SHA-256 of the safetensors file (required: every shipped
#: checkpoint has it; a json without it is refused, see :func:`add_weights_hash`)
HASH_KEY = "weights_sha256"


def weights_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def add_weights_hash(path: str | Path) -> str:
    """Record the current SHA-256 of a checkpoint's weights in its json (for a checkpoint written before the json
    held one, or weights you changed on purpose and trust). Returns the hash."""
    wpath, cpath = _resolve(path)
    meta = json.loads(cpath.read_text())
    meta[HASH_KEY] = weights_sha256(wpath)
    cpath.write_text(json.dumps(meta, indent=1))
    return meta[HASH_KEY]


def _verify_weights_hash(wpath: Path, cpath: Path, meta: dict) -> None:
    expected = meta.get(HASH_KEY)
    fix = (f"if you trust these weights, record their hash with python -c \"from wide_env.models.moe_lm import "
           f"add_weights_hash; add_weights_hash('{cpath.parent}')\"")
    if expected is None:
        raise CheckpointError(f"{cpath}: has no '{HASH_KEY}' entry, so {wpath.name} cannot be checked for corruption "
                              f"(checkpoints are saved with it by save_checkpoint); re-save the checkpoint, or {fix}")
    if not isinstance(expected, str) or len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise CheckpointError(f"{cpath}: '{HASH_KEY}' = {expected!r} is not a hex SHA-256 (64 lowercase hex digits); "
                              f"re-save the checkpoint, or {fix}")
    actual = weights_sha256(wpath)
    if actual != expected:
        raise CheckpointError(f"{wpath}: corrupt or changed after saving: its SHA-256 is {actual}, but {cpath.name} "
                              f"records {expected}; re-download or re-export the checkpoint, or {fix}")


def _resolve(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.is_dir():
        return p / WEIGHTS_NAME, p / CONFIG_NAME
    if p.suffix == ".safetensors":
        return p, p.with_suffix(".json")
    if p.suffix == ".json":
        return p.with_suffix(".safetensors"), p
    raise CheckpointError(f"{p}: expected a checkpoint directory, a .safetensors or a .json file")


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[MoELM, dict]:
    """Load (model, meta) from a directory (or either file). Raises CheckpointError naming the file: for a missing,
    corrupt or inconsistent file, and for weights whose SHA-256 differs from the json's ``weights_sha256`` (or a
    json without one)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    wpath, cpath = _resolve(path)
    for f in (wpath, cpath):
        if not f.is_file():
            raise CheckpointError(f"{f}: checkpoint file not found")
    try:
        meta = json.loads(cpath.read_text())
        cfg = MoEConfig.from_dict(meta["config"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cpath}: config is not valid JSON ({e})") from e
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{cpath}: config has no valid 'config' entry ({e})") from e
    _verify_weights_hash(wpath, cpath, meta)
    try:
        sd = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{wpath}: corrupt or truncated safetensors file ({e})") from e
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten: leave the caller's torch RNG alone
        model = MoELM(cfg)
    ref = model.state_dict()
    missing = sorted(set(ref) - set(sd))
    extra = sorted(set(sd) - set(ref))
    if missing or extra:
        raise CheckpointError(f"{wpath}: tensors do not match config {cpath.name} (missing {missing[:5]}, unexpected {extra[:5]})")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(ref[k].shape):
            raise CheckpointError(f"{wpath}: tensor {k!r} has shape {tuple(v.shape)}, config expects {tuple(ref[k].shape)}")
        if not torch.isfinite(v.float()).all():
            raise CheckpointError(f"{wpath}: tensor {k!r} contains non-finite values")
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()})
    model.to(dtype).eval()
    return model, meta


def round_to_fp16(model: MoELM) -> MoELM:
    """Round parameters through float16 (what the shipped checkpoint stores), in place."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.float16).to(p.dtype))
    return model
