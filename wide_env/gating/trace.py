"""Recorded gating traces (`.npz`, schema in docs/trace-schema.md): validation, loading, saving, replay.

Files are read with ``allow_pickle=False``; every schema violation raises :class:`TraceError` naming
the file, the key and what was expected, so a corrupt or foreign file never half-loads.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
import zlib
from typing import Any, Mapping

import numpy as np

from wide_env.gating.base import LAYER_BUDGET_RANGE, TOPK_WEIGHT_SLACK, GatingSource, TokenGates

SCHEMA_VERSION = 1
ROUTINGS = ("softmax_topk_renorm", "softmax_topk_raw", "sigmoid_topk_renorm")
EFFECT_KEYS = ("effect_correct", "effect_same", "effect_dloss", "effect_kl")
#: the accuracy rule's tables (wide_env.gating.effects); all or none
LOGIT_EFFECT_KEYS = ("logit_effect_servers", "logit_effect_classes", "logit_effect_base", "logit_effect_delta")
#: optional: the same rows with the later layers' routing frozen (the rule's sums for several perturbations)
LOGIT_EFFECT_FROZEN = "logit_effect_frozen"
#: per-layer budgets at which SiftMoE loses the listed accuracy (points); both or none
CALIBRATION_KEYS = ("calibrated_accuracy_cost", "calibrated_layer_budget")
#: longest accumulator of the logit-effect rule (target, competitors, rest, loss)
MAX_LOGIT_EFFECT_DIM = 8
REQUIRED_KEYS = ("schema_version", "gate_probs", "topk_idx", "topk_weight", "mismatch", "layer_budget", "d_model", "routing")
OPTIONAL_KEYS = (("token_id", "target_id", "doc_start", "full_correct", "meta") + EFFECT_KEYS + LOGIT_EFFECT_KEYS
                 + (LOGIT_EFFECT_FROZEN,) + CALIBRATION_KEYS)


class TraceError(ValueError):
    """A trace file that does not follow the schema."""


def _err(source: str, key: str, problem: str) -> TraceError:
    return TraceError(f"trace {source}: '{key}' {problem} (see docs/trace-schema.md)")


def validate_trace(arrays: Mapping[str, np.ndarray], source: str = "<arrays>") -> dict[str, np.ndarray]:
    """Check ``arrays`` against the schema; return them as a dict (unknown keys are rejected)."""
    data = {k: np.asarray(v) for k, v in arrays.items()}
    for key in REQUIRED_KEYS:
        if key not in data:
            raise _err(source, key, "is missing")
    unknown = sorted(set(data) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise _err(source, unknown[0], f"is not a schema key; allowed: {sorted(REQUIRED_KEYS + OPTIONAL_KEYS)}")
    version = data["schema_version"]
    if version.shape != () or not np.issubdtype(version.dtype, np.integer) or int(version) != SCHEMA_VERSION:
        raise _err(source, "schema_version", f"must be the integer {SCHEMA_VERSION}, got {version!r}")

    probs = data["gate_probs"]
    if probs.ndim != 3 or not np.issubdtype(probs.dtype, np.floating):
        raise _err(source, "gate_probs", f"must be a float array (T, L, E), got {probs.dtype} {probs.shape}")
    T, L, E = probs.shape
    if min(T, L, E) < 1:
        raise _err(source, "gate_probs", f"has an empty axis: shape {probs.shape}")
    p32 = probs.astype(np.float32)
    if not np.isfinite(p32).all() or (p32 < 0).any():
        raise _err(source, "gate_probs", "must be finite and >= 0")
    if np.abs(p32.sum(axis=-1) - 1.0).max() > 1e-2:
        raise _err(source, "gate_probs", "rows must sum to 1 (within 1e-2)")

    idx = data["topk_idx"]
    if idx.ndim != 3 or idx.shape[:2] != (T, L) or not np.issubdtype(idx.dtype, np.integer):
        raise _err(source, "topk_idx", f"must be an integer array (T, L, K) = ({T}, {L}, K), got {idx.dtype} {idx.shape}")
    K = idx.shape[2]
    if not 1 <= K <= E:
        raise _err(source, "topk_idx", f"K = {K} must be in [1, E = {E}]")
    if (idx < 0).any() or (idx >= E).any():
        raise _err(source, "topk_idx", f"indices must be in [0, {E})")
    if K > 1 and (np.diff(np.sort(idx, axis=-1), axis=-1) == 0).any():
        raise _err(source, "topk_idx", "indices must be distinct within a (token, layer)")
    _check_topk_matches_probs(p32, idx.astype(np.int64), str(data["routing"]) if "routing" in data else "", source)

    weight = data["topk_weight"]
    if weight.shape != (T, L, K) or not np.issubdtype(weight.dtype, np.floating):
        raise _err(source, "topk_weight", f"must be a float array of shape ({T}, {L}, {K}), got {weight.dtype} {weight.shape}")
    w64 = weight.astype(np.float64)
    if not np.isfinite(w64).all():
        raise _err(source, "topk_weight", "must be finite")
    scale = _routed_scaling_factor(data)
    outside = (w64 < 0) | (w64 > scale * (1 + TOPK_WEIGHT_SLACK))
    if outside.any():
        t, layer, k = (int(i) for i in np.argwhere(outside)[0])
        raise _err(source, "topk_weight", f"must be combine weights in [0, {scale:g}] (the router's probabilities"
                   f"{'' if scale == 1 else ' times its routed_scaling_factor, meta.sigmoid_router'}; float16 slack "
                   f"{TOPK_WEIGHT_SLACK:.3g}); token {t}, layer {layer}, slot {k} has {w64[t, layer, k]:.6g}: store the "
                   "router's Top-K weights (renormalised or raw probabilities), not logits or scaled values")

    mismatch = data["mismatch"]
    if mismatch.shape != (L, E, E + 1) or not np.issubdtype(mismatch.dtype, np.floating):
        raise _err(source, "mismatch", f"must be a float array of shape ({L}, {E}, {E + 1}), got {mismatch.dtype} {mismatch.shape}")
    if not np.isfinite(mismatch).all() or (mismatch < 0).any():
        raise _err(source, "mismatch", "must be finite and >= 0")
    if np.abs(mismatch[:, np.arange(E), np.arange(E)]).max() > 1e-6:
        raise _err(source, "mismatch", "must have D_l(i, i) = 0 on the diagonal")

    budget = data["layer_budget"]
    if budget.shape != (L,) or not np.issubdtype(budget.dtype, np.floating) or not np.isfinite(budget).all() or (budget <= 0).any():
        raise _err(source, "layer_budget", f"must be {L} finite floats > 0")
    low, high = LAYER_BUDGET_RANGE
    b64 = budget.astype(np.float64)
    if (b64 < low).any() or (b64 > high).any():
        layer = int(np.flatnonzero((b64 < low) | (b64 > high))[0])
        raise _err(source, "layer_budget", f"must be in [{low:g}, {high:g}] (the range of the config field "
                   f"budget.layer_budget); layer {layer} has {b64[layer]:.6g}: re-export the trace with budgets in the "
                   "units of its mismatch table")
    d_model = data["d_model"]
    if d_model.shape != () or not np.issubdtype(d_model.dtype, np.integer) or int(d_model) < 1:
        raise _err(source, "d_model", "must be a positive integer scalar")
    routing = data["routing"]
    if routing.shape != () or routing.dtype.kind != "U" or str(routing) not in ROUTINGS:
        raise _err(source, "routing", f"must be one of {list(ROUTINGS)} as a 0-d string array")

    for key in ("token_id", "target_id"):
        if key in data and (data[key].shape != (T,) or not np.issubdtype(data[key].dtype, np.integer)):
            raise _err(source, key, f"must be an integer array of shape ({T},)")
        if key in data and (data[key] < 0).any():
            at = int(np.flatnonzero(data[key] < 0)[0])
            raise _err(source, key, f"must hold token ids >= 0 (the model's vocabulary indices); position {at} has "
                       f"{int(data[key][at])}")
    for key in ("doc_start", "full_correct"):
        if key in data and (data[key].shape != (T,) or data[key].dtype != np.bool_):
            raise _err(source, key, f"must be a bool array of shape ({T},)")
    present = [k for k in EFFECT_KEYS if k in data]
    if present and "effect_correct" not in data:
        raise _err(source, "effect_correct", "is required when any effect table is present")
    for key in present:
        arr = data[key]
        if arr.shape != (T, L, K, E + 1):
            raise _err(source, key, f"must have shape ({T}, {L}, {K}, {E + 1}), got {arr.shape}")
        if key in ("effect_correct", "effect_same") and arr.dtype != np.bool_:
            raise _err(source, key, f"must be bool, got {arr.dtype}")
        if key in ("effect_dloss", "effect_kl") and (not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr.astype(np.float32)).all()):
            raise _err(source, key, "must be finite floats")
    _validate_logit_effects(data, source, T, L, E, K)
    _validate_calibration(data, source, L)
    if "meta" in data:
        if data["meta"].shape != () or data["meta"].dtype.kind != "U":
            raise _err(source, "meta", "must be a 0-d string array holding JSON")
        try:
            json.loads(str(data["meta"]))
        except json.JSONDecodeError as exc:
            raise _err(source, "meta", f"is not valid JSON ({exc})") from None
    return data


#: tolerance of the Top-K checks: probabilities stored in lower precision than the router computed them
TOPK_TOLERANCE = 1e-4


def _check_topk_matches_probs(probs: np.ndarray, idx: np.ndarray, routing: str, source: str) -> None:
    """``topk_idx`` lists experts in descending ``gate_probs`` order and, for softmax routers, is their Top-K.

    Sigmoid routers (``sigmoid_topk_renorm``, e.g. DeepSeek-V3) select with a load-balancing bias that is
    not part of the scores, so only their order is checked."""
    top = np.take_along_axis(probs, idx, axis=-1)  # (T, L, K)
    rises = np.diff(top, axis=-1) > TOPK_TOLERANCE
    if rises.any():
        t, layer, k = (int(i) for i in np.argwhere(rises)[0])
        raise _err(source, "topk_idx", f"must list the Top-K experts in descending gate_probs order; token {t}, layer "
                   f"{layer}: slot {k} has probability {top[t, layer, k]:.6g} < slot {k + 1}'s {top[t, layer, k + 1]:.6g}")
    if routing.startswith("sigmoid"):
        return
    others = probs.copy()
    np.put_along_axis(others, idx, -np.inf, axis=-1)
    beaten = others.max(axis=-1) > top.min(axis=-1) + TOPK_TOLERANCE
    if beaten.any():
        t, layer = (int(i) for i in np.argwhere(beaten)[0])
        outside = int(others[t, layer].argmax())
        raise _err(source, "topk_idx", f"must be the Top-K of gate_probs for softmax routing; token {t}, layer {layer}: "
                   f"expert {outside} (probability {probs[t, layer, outside]:.6g}) is not among {idx[t, layer].tolist()} "
                   f"(lowest {top[t, layer].min():.6g})")


def _validate_logit_effects(data: dict, source: str, T: int, L: int, E: int, K: int) -> None:
    """The logit-effect tables (schema: docs/trace-schema.md; rule: wide_env/gating/effects.py)."""
    present = [k for k in LOGIT_EFFECT_KEYS if k in data]
    if not present:
        if LOGIT_EFFECT_FROZEN in data:
            raise _err(source, LOGIT_EFFECT_FROZEN, f"needs the logit-effect tables {list(LOGIT_EFFECT_KEYS)}")
        return
    if len(present) != len(LOGIT_EFFECT_KEYS):
        missing = [k for k in LOGIT_EFFECT_KEYS if k not in data]
        raise _err(source, missing[0], f"is required when any of {list(LOGIT_EFFECT_KEYS)} is present")
    servers = data["logit_effect_servers"]
    if servers.ndim != 3 or servers.shape[:2] != (L, E) or not np.issubdtype(servers.dtype, np.integer) \
            or not 1 <= servers.shape[2] <= E:
        raise _err(source, "logit_effect_servers", f"must be an integer array (L, E, S) = ({L}, {E}, S) with 1 <= S <= {E}, "
                   f"got {servers.dtype} {servers.shape}")
    srv = servers.astype(np.int64)
    if (srv < -1).any() or (srv > E).any():
        raise _err(source, "logit_effect_servers", f"entries must be expert indices, {E} (skip) or -1 (padding)")
    valid = srv >= 0
    if (np.diff(valid.astype(np.int8), axis=-1) > 0).any():
        raise _err(source, "logit_effect_servers", "padding (-1) must come after the servers of a (layer, expert) row")
    if (srv[..., 0] != E).any():
        raise _err(source, "logit_effect_servers", f"every (layer, expert) row must start with the skip server {E}")
    listed = np.zeros((L, E, E + 1), bool)
    li, ii, si = np.nonzero(valid)
    if np.bincount(((li * E + ii) * (E + 1) + srv[li, ii, si]), minlength=L * E * (E + 1)).max(initial=0) > 1:
        raise _err(source, "logit_effect_servers", "servers must be distinct within a (layer, expert) row")
    listed[li, ii, srv[li, ii, si]] = True
    if listed[:, np.arange(E), np.arange(E)].any():
        raise _err(source, "logit_effect_servers", "a row must not list its own expert (it changes nothing)")
    D = data["mismatch"].astype(np.float64)
    choosable = D[:, :, :E] <= D[:, :, E:]
    choosable[:, np.arange(E), np.arange(E)] = False
    if (choosable & ~listed[:, :, :E]).any():
        l, i, j = np.argwhere(choosable & ~listed[:, :, :E])[0]
        raise _err(source, "logit_effect_servers", f"misses server {j} of layer {l}, expert {i}: the combine rule can "
                   f"choose it (D[{l}, {i}, {j}] <= D[{l}, {i}, skip]); re-export the tables with this trace's mismatch")
    classes = data["logit_effect_classes"]
    if classes.ndim != 2 or classes.shape[0] != T or not np.issubdtype(classes.dtype, np.integer) \
            or not 1 <= classes.shape[1] <= MAX_LOGIT_EFFECT_DIM - 2:
        raise _err(source, "logit_effect_classes", f"must be an integer array (T, M + 1) = ({T}, M + 1) with "
                   f"M + 3 <= {MAX_LOGIT_EFFECT_DIM}, got {classes.dtype} {classes.shape}")
    n_cls = classes.shape[1]
    if (classes < 0).any() or (n_cls > 1 and (np.diff(np.sort(classes, axis=-1), axis=-1) == 0).any()):
        raise _err(source, "logit_effect_classes", "class ids must be >= 0 and distinct within a position")
    if "target_id" in data and (classes[:, 0] != data["target_id"]).any():
        raise _err(source, "logit_effect_classes", "column 0 must be the target (target_id)")
    base = data["logit_effect_base"]
    if base.shape != (T, n_cls + 1) or not np.issubdtype(base.dtype, np.floating):
        raise _err(source, "logit_effect_base", f"must be a float array of shape ({T}, {n_cls + 1}), got {base.dtype} {base.shape}")
    b64 = base.astype(np.float64)
    zero = b64 == 0
    if not np.isfinite(b64).all() or (b64 > 0).any() or (zero.sum(axis=1) != 1).any() or zero[:, 2:].any():
        raise _err(source, "logit_effect_base", "must be finite and < 0 except one 0 per row (the full model's top logit), "
                   "in column 0 (the target) or 1 (the best competitor)")
    if "full_correct" in data and ((b64[:, 0] == 0) != data["full_correct"]).any():
        raise _err(source, "logit_effect_base", "the target leads (0 in column 0) exactly where full_correct is True")
    from wide_env.gating.effects import row_counts

    n_rows = int(row_counts(srv, data["topk_idx"]).sum())
    delta = data["logit_effect_delta"]
    if delta.shape != (n_rows, n_cls + 2) or not np.issubdtype(delta.dtype, np.floating):
        raise _err(source, "logit_effect_delta", f"must be a float array of shape ({n_rows}, {n_cls + 2}) (one row per "
                   f"slot and listed server of every position), got {delta.dtype} {delta.shape}")
    if not np.isfinite(delta.astype(np.float32)).all():
        raise _err(source, "logit_effect_delta", "must be finite")
    if LOGIT_EFFECT_FROZEN in data:
        frozen = data[LOGIT_EFFECT_FROZEN]
        if frozen.shape != (n_rows, n_cls + 1) or not np.issubdtype(frozen.dtype, np.floating) \
                or not np.isfinite(frozen.astype(np.float32)).all():
            raise _err(source, LOGIT_EFFECT_FROZEN, f"must be finite floats of shape ({n_rows}, {n_cls + 1}) (the rows of "
                       f"logit_effect_delta without the loss column), got {frozen.dtype} {frozen.shape}")


def _validate_calibration(data: dict, source: str, L: int) -> None:
    present = [k for k in CALIBRATION_KEYS if k in data]
    if not present:
        return
    if len(present) != len(CALIBRATION_KEYS):
        missing = [k for k in CALIBRATION_KEYS if k not in data]
        raise _err(source, missing[0], f"is required when any of {list(CALIBRATION_KEYS)} is present")
    cost = data["calibrated_accuracy_cost"]
    if cost.ndim != 1 or cost.size < 1 or not np.issubdtype(cost.dtype, np.floating) or not np.isfinite(cost).all() \
            or (cost <= 0).any() or (np.diff(cost) <= 0).any():
        raise _err(source, "calibrated_accuracy_cost", "must be increasing accuracy costs in points > 0, shape (n,)")
    eps = data["calibrated_layer_budget"]
    if eps.shape != (cost.size, L) or not np.issubdtype(eps.dtype, np.floating) or not np.isfinite(eps).all() or (eps <= 0).any():
        raise _err(source, "calibrated_layer_budget", f"must be finite floats > 0 of shape ({cost.size}, {L})")


def load_trace(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load and validate a trace; raises :class:`TraceError` for missing, corrupt or wrong-schema files."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TraceError(f"trace {path}: file not found")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as fh:
            npy = fh.read(6) == b"\x93NUMPY"
        what = "a single NumPy array (.npy) under a .npz name" if npy else "not a .npz (zip) archive"
        raise TraceError(f"trace {path}: {what}; a trace is an .npz archive of named arrays (docs/trace-schema.md): "
                         "write it with wide_env.gating.save_trace or numpy.savez")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except ValueError as exc:
        if "pickle" not in str(exc):
            raise TraceError(f"trace {path}: not a readable .npz archive ({type(exc).__name__}: {exc}); "
                             "re-export it or check the download") from None
        # never suggest allow_pickle=True: loading pickles from a data file runs arbitrary code
        raise TraceError(f"trace {path}: holds Python objects (object arrays), which wide-env never loads; store "
                         "plain numeric, bool and string arrays (docs/trace-schema.md)") from None
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:  # zlib.error: a corrupt compressed member
        raise TraceError(f"trace {path}: not a readable .npz archive ({type(exc).__name__}: {exc}); "
                         "re-export it or check the download") from None
    return validate_trace(arrays, source=path)


def save_trace(path: str | os.PathLike, compress: bool = True, **arrays: Any) -> None:
    """Validate and write a trace. ``meta`` may be a dict (stored as JSON)."""
    if isinstance(arrays.get("meta"), Mapping):
        arrays["meta"] = np.array(json.dumps(arrays["meta"], sort_keys=True))
    for key in ("routing",):
        if key in arrays and isinstance(arrays[key], str):
            arrays[key] = np.array(arrays[key])
    data = validate_trace(arrays, source=os.fspath(path))
    (np.savez_compressed if compress else np.savez)(path, **data)


def _routed_scaling_factor(data: Mapping[str, np.ndarray]) -> float:
    """The factor a router multiplies its Top-K weights by (DeepSeek's ``routed_scaling_factor``, recorded by
    wide_env.modeltools.hf_recorder in ``meta.sigmoid_router``); 1 where the trace records none. A malformed
    ``meta`` counts as none here: its own check names it."""
    try:
        factor = float(trace_meta(data).get("sigmoid_router", {}).get("routed_scaling_factor", 1.0))
    except (ValueError, TypeError, AttributeError):
        return 1.0
    return factor if math.isfinite(factor) and factor >= 1.0 else 1.0


def trace_meta(data: Mapping[str, np.ndarray]) -> dict:
    return json.loads(str(data["meta"])) if "meta" in data else {}


class TraceGating(GatingSource):
    """Replays a recorded trace: each episode reads ``n_tokens`` consecutive tokens (inside one document)."""

    name = "trace"
    positional = True

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        data = load_trace(self.path)
        self.probs = np.clip(data["gate_probs"].astype(np.float32), 0.0, 1.0)  # float16 rounding may pass 1
        self.topk_idx = data["topk_idx"].astype(np.int64)
        self.topk_weight = data["topk_weight"].astype(np.float64)
        self.mismatch = data["mismatch"].astype(np.float64)
        self.layer_budget = data["layer_budget"].astype(np.float64)
        self.n_tokens_total, self.n_layers, self.n_experts = self.probs.shape
        self.top_k = self.topk_idx.shape[2]
        self.d_model = int(data["d_model"])
        self.routing = str(data["routing"])
        self.doc_start = data.get("doc_start")
        self.token_id = data.get("token_id")
        self.target_id = data.get("target_id")
        self.full_correct = data.get("full_correct")
        self.effects = {k: data[k] for k in EFFECT_KEYS if k in data}  # dense single-perturbation tables (analysis)
        if all(k in data for k in LOGIT_EFFECT_KEYS):  # the accuracy rule's tables
            from wide_env.gating.effects import EffectLookup

            self.logit_effects = EffectLookup.from_trace(data)
        self.has_effects = self.logit_effects is not None
        self.meta = trace_meta(data)
        self._valid_starts: dict[int, np.ndarray] = {}

    def valid_starts(self, n_tokens: int) -> np.ndarray:
        if n_tokens not in self._valid_starts:
            T = self.n_tokens_total
            if n_tokens > T:
                raise ValueError(f"config field 'n_tokens' = {n_tokens} exceeds the trace length {T} of {self.path}; "
                                 "lower n_tokens")
            starts = np.arange(T - n_tokens + 1)
            if self.doc_start is not None:
                # a window may begin at a document start but must not contain a later one
                boundaries = np.concatenate([[0], np.cumsum(self.doc_start.astype(np.int64))])
                inside = boundaries[starts + n_tokens] - boundaries[starts + 1] == 0
                starts = starts[inside]
                if starts.size == 0:
                    raise ValueError(f"no document in {self.path} holds {n_tokens} tokens; lower n_tokens")
            self._valid_starts[n_tokens] = starts
        return self._valid_starts[n_tokens]

    def start(self, rng, batch, n_tokens):
        starts = self.valid_starts(n_tokens)
        if batch == 1:  # the single env's reset: numpy's scalar draw gives the same number and leaves the generator in
            i = rng.integers(0, starts.size)  # the same state as size=1, without the sized draw's overhead
            return starts[i:i + 1].copy()
        return starts[rng.integers(0, starts.size, size=batch)]

    def gates(self, positions, rng):
        return TokenGates(self.probs[positions], self.topk_idx[positions], self.topk_weight[positions])

    def all_gates(self):
        return TokenGates(self.probs, self.topk_idx, self.topk_weight)

    def describe(self):
        out = super().describe()
        out.update(path=self.path, n_trace_tokens=self.n_tokens_total)
        return out
