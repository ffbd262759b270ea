"""The accuracy rule of a trace's logit-effect tables: fold a token's perturbations, then decide.

A token is decoded through L MoE layers; at each layer every Top-K slot is served by its own expert, by a
stand-in expert, or skipped. The trace's logit-effect tables (docs/trace-schema.md) hold, for every trace
position t, layer l, slot k and every server the combine rule can choose (skip, or an expert j with
D_l(i, j) <= D_l(i, skip)), what this single perturbation changes, measured by re-running the model:

    delta  = [ dz(target), dz(competitor 1..M), d(max logit of every other byte), d(loss) ]   (later layers re-route)
    frozen = [ dz(target), dz(competitor 1..M), d(max logit of every other byte) ]            (later layers keep
                                                                                               the full model's routing)

(candidates: the target byte and the full model's M best other bytes of position t; the shipped traces have
M = 1). The accumulator of a token is the sum of its perturbations' rows, ``[delta, frozen, 1]`` (8 numbers
for M = 1; the last one counts the perturbations); a slot served by its own expert adds nothing.

    acc = sum over the token's perturbations of the rows                (fold, one layer at a time)
    logits = acc[delta part] if count <= 1 else acc[frozen part]        (decide)
    scores = base[t] + logits
    scores[full model's prediction] -= CONTEXT_WEIGHT * context          (optional context term, below)
    prediction = the candidate with the highest score ("rest" = some other byte)
    correct = prediction is the target;  same_as_full = prediction is the full model's;  delta_loss = sum of d(loss)

``base[t]`` holds the full model's candidate logits and the rest max, minus its top logit. One perturbation
uses its exact (re-routed) change, so the rule reproduces every single perturbation's outcome: the exporter
keeps every single decision at a margin of at least 1e-4 logits, so float32 and float64 sums agree. Several
perturbations add their frozen-routing changes (first-order logit additivity): with the routing of later
layers held, the changes add up well, while the re-routed single changes do not (in the 24- and 32-layer
models a single perturbation flips routing decisions downstream, and those flips do not add; measured in
docs/real-model.md). Traces without ``logit_effect_frozen`` sum the re-routed changes.

Context term. A perturbed token also changes the keys and values that later tokens attend to; the tables
(one perturbation, clean context) cannot see that. The optional context term carries one number per
episode across its tokens: ``context <- CONTEXT_DECAY * context + max(delta_loss, 0)`` after every token
(the loss its own perturbations cost, decaying), and lowers the full model's prediction by
``CONTEXT_WEIGHT * context`` (in logits). Both constants are fitted to the live model [choice]; how the
variants agree with the live model is measured in docs/real-model.md.

Everything here is numpy and batched: :class:`EffectLookup` holds the flat tables, :meth:`EffectLookup.fold`
adds a layer's rows to a batch of accumulators, :func:`decide` turns accumulators into outcomes and
:func:`context_after` carries the context term to the next token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from wide_env import rules

#: the accumulator is at most this long (the simulator's step kernel folds it one layer at a time)
MAX_ACC_DIM = rules.MAX_ACC_DIM
#: context term: per-token decay of the carried loss, and logits per nat taken from the full model's
#: prediction [choice: fitted to the live tiny model, SiftMoE and random selections, 16-token episodes;
#: validated on other policies, 64-token episodes and the three paper-profile models, docs/real-model.md]
CONTEXT_DECAY = 0.8
CONTEXT_WEIGHT = 0.2
#: keys of a trace that hold the logit-effect tables
LOGIT_EFFECT_KEYS = ("logit_effect_servers", "logit_effect_classes", "logit_effect_base", "logit_effect_delta")
LOGIT_EFFECT_FROZEN = "logit_effect_frozen"


def row_counts(servers: np.ndarray, topk_idx: np.ndarray) -> np.ndarray:
    """(T, L, K) number of table rows of each slot: the servers listed for (layer, own expert)."""
    n_srv = (np.asarray(servers) >= 0).sum(-1)  # (L, E)
    idx = np.asarray(topk_idx, np.int64)
    return n_srv[np.arange(idx.shape[1])[None, :, None], idx]


def row_offsets(servers: np.ndarray, topk_idx: np.ndarray) -> np.ndarray:
    """(T, L, K) int64 index of each slot's first row in ``logit_effect_delta`` (rows in (t, l, k, server)
    order, the servers of a slot in the order of ``logit_effect_servers``)."""
    cnt = row_counts(servers, topk_idx).reshape(-1)
    off = np.zeros(cnt.size, np.int64)
    np.cumsum(cnt[:-1], out=off[1:])
    return off.reshape(np.shape(topk_idx))


@dataclass(frozen=True)
class EffectLookup:
    """Flat lookup of a trace's logit-effect tables.

    ``values[row_offset[t, l, k] + local[l, i, s]]`` is the entry of position t, layer l, slot k (own expert
    ``i = topk_idx[t, l, k]``) served by ``s`` (expert index, or E = skip); ``local[l, i, i]`` points at the
    zero row (the last row of ``values``). A server the combine rule can never choose for (l, i) (an expert
    with D_l(i, s) > D_l(i, skip)) has no row of its own: ``local`` maps it to the skip row (``eligible`` is
    False there; ``fold(..., strict=True)`` rejects it).
    """

    values: np.ndarray  # (R + 1, C) float64 rows [delta, frozen, 1] (see the module docstring); the last row is zero
    row_offset: np.ndarray  # (T, L, K) int64
    local: np.ndarray  # (L, E, E + 1) int64; -1 = the zero row
    eligible: np.ndarray  # (L, E, E + 1) bool: the table has a row for (l, own i, server s) or s == i
    topk_idx: np.ndarray  # (T, L, K) int64: own expert of every slot
    base: np.ndarray  # (T, M + 2) float64
    classes: np.ndarray  # (T, M + 1) int64: target byte, then the competitors

    @property
    def dim(self) -> int:
        """Length C of the accumulator."""
        return self.values.shape[1]

    @classmethod
    def from_trace(cls, data: Mapping[str, np.ndarray]) -> "EffectLookup":
        """Build from a loaded trace (``load_trace``) that has the logit-effect tables."""
        missing = [k for k in LOGIT_EFFECT_KEYS if k not in data]
        if missing:
            raise KeyError(f"the trace has no logit-effect tables (missing {missing}); re-export it "
                           "(python -m wide_env.models.export) or use the live backend")
        return cls.from_arrays(data["logit_effect_servers"], data["topk_idx"], data["logit_effect_delta"],
                               data["logit_effect_base"], data["logit_effect_classes"], data.get(LOGIT_EFFECT_FROZEN))

    @classmethod
    def from_arrays(cls, servers, topk_idx, delta, base, classes, frozen=None) -> "EffectLookup":
        servers = np.asarray(servers, np.int64)
        idx = np.asarray(topk_idx, np.int64)
        L, E, _ = servers.shape
        delta = np.asarray(delta, np.float64)
        parts = [delta] + ([] if frozen is None else [np.asarray(frozen, np.float64)]) + [np.ones((len(delta), 1))]
        values = np.concatenate([np.concatenate(parts, 1), np.zeros((1, sum(p.shape[1] for p in parts)))])
        if values.shape[1] > MAX_ACC_DIM:
            raise ValueError(f"the accumulator would have {values.shape[1]} numbers (> {MAX_ACC_DIM}): too many competitors")
        zero_row = len(values) - 1
        local = np.zeros((L, E, E + 1), np.int64)  # default: the skip row (local index 0)
        eligible = np.zeros((L, E, E + 1), bool)
        for l in range(L):
            for i in range(E):
                listed = servers[l, i][servers[l, i] >= 0]
                local[l, i, listed] = np.arange(listed.size)
                eligible[l, i, listed] = True
                local[l, i, i] = -1
                eligible[l, i, i] = True
        offset = row_offsets(servers, idx)
        n_rows = int(row_counts(servers, idx).sum())
        if n_rows != zero_row:
            raise ValueError(f"logit_effect_delta has {zero_row} rows but the servers and Top-K need {n_rows}")
        return cls(values, offset, local, eligible, idx, np.asarray(base, np.float64), np.asarray(classes, np.int64))

    def row_table(self) -> np.ndarray:
        """(T, L, K, E + 1) int32: the row of every (position, layer, slot, server), for kernels that want
        one gather per step (``values[row_table[t, l, k, s]]``); same mapping as :meth:`rows`."""
        T, L, K = self.topk_idx.shape
        loc = self.local[np.arange(L)[None, :, None], self.topk_idx]  # (T, L, K, E + 1)
        rows = np.where(loc < 0, len(self.values) - 1, self.row_offset[..., None] + loc)
        return rows.astype(np.int32)

    def rows(self, position, layer, servers, strict: bool = False) -> np.ndarray:
        """Row indices (B, K) of the servers (B, K) at positions (B,) and layers (B,) (or one layer)."""
        position = np.asarray(position, np.int64)
        layer = np.broadcast_to(np.asarray(layer, np.int64), position.shape)
        servers = np.asarray(servers, np.int64)
        own = self.topk_idx[position, layer]  # (B, K)
        loc = self.local[layer[:, None], own, servers]
        if strict:
            bad = ~self.eligible[layer[:, None], own, servers]
            if bad.any():
                b, k = np.argwhere(bad)[0]
                raise ValueError(f"server {servers[b, k]} of slot {k} (own expert {own[b, k]}) at position "
                                 f"{position[b]}, layer {layer[b]} is not a choice of the combine rule")
        return np.where(loc < 0, len(self.values) - 1, self.row_offset[position, layer] + loc)

    def fold(self, acc: np.ndarray, position, layer, servers, strict: bool = False) -> np.ndarray:
        """acc (B, C) plus the rows of one layer's servers (B, K), slot by slot (the accuracy fold of
        :mod:`wide_env.rules`); returns the new accumulators."""
        out = np.array(acc, dtype=np.float64, order="C")
        rows = np.ascontiguousarray(self.rows(position, layer, servers, strict), dtype=np.int64)
        rules.fold_batch(out, self.values, rows.reshape(out.shape[0], -1))
        return out

    def empty(self, batch: int) -> np.ndarray:
        """Accumulators (batch, C) of tokens with no perturbation yet."""
        return np.zeros((batch, self.dim))

    def decide(self, position, acc: np.ndarray, context=None, weight: float = CONTEXT_WEIGHT):
        """:func:`decide` with this trace's base values of ``position`` (B,)."""
        return decide(self.base[np.asarray(position, np.int64)], acc, context, weight)


def decide(base: np.ndarray, acc: np.ndarray, context=None, weight: float = CONTEXT_WEIGHT):
    """Outcomes of tokens from their base values (B, n) and accumulators: (B, n + 2) ``[delta, count]`` or
    (B, 2n + 2) ``[delta, frozen, count]`` (n = M + 2 candidate columns); ``context`` (B,) the episode's carried
    loss before this token (:func:`context_after`; None = no context term).

    Returns (correct (B,) bool, same_as_full (B,) bool, delta_loss (B,) float64). Ties go to the lower
    candidate slot (the target first)."""
    base = np.asarray(base, np.float64)
    acc = np.asarray(acc, np.float64)
    n = base.shape[-1]
    if acc.shape[-1] not in (n + 2, 2 * n + 2):
        raise ValueError(f"accumulators must have {n + 2} or {2 * n + 2} numbers for {n} candidate columns, got {acc.shape[-1]}")
    lead = np.broadcast_shapes(base.shape[:-1], acc.shape[:-1])
    base = np.ascontiguousarray(np.broadcast_to(base, lead + (n,))).reshape(-1, n)
    acc = np.ascontiguousarray(np.broadcast_to(acc, lead + acc.shape[-1:])).reshape(base.shape[0], -1)
    ctx = np.zeros(base.shape[0]) if context is None else \
        np.ascontiguousarray(np.broadcast_to(np.asarray(context, np.float64), lead)).reshape(-1)
    correct, same = np.empty(base.shape[0], bool), np.empty(base.shape[0], bool)
    delta_loss = np.empty(base.shape[0])
    rules.decide_batch(base, acc, ctx, float(weight), correct, same, delta_loss)  # the accuracy rule's decision
    return correct.reshape(lead), same.reshape(lead), delta_loss.reshape(lead)


def context_after(context, delta_loss, decay: float = CONTEXT_DECAY) -> np.ndarray:
    """The context term carried to the next token of the same episode, after a token whose perturbations
    cost ``delta_loss`` (B,) (:func:`decide`'s third output): ``decay * context + max(delta_loss, 0)``. Start
    every episode at 0 (its context before the first decoded token is the full model's)."""
    return decay * np.asarray(context, np.float64) + np.maximum(np.asarray(delta_loss, np.float64), 0.0)
