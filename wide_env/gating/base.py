"""The gating-source interface: what the simulator needs from an MoE model.

A source describes a model (L layers, E experts, Top-K, d_model), holds its mismatch tables
D_l(i, j) (shape (L, E, E+1), last column = skip) and per-layer deviation budgets in the model's own
units, and produces per-token gating: router probabilities, Top-K indices (descending probability)
and combine weights, for a batch of episodes. Sources are numpy only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

#: the range of a per-layer deviation budget eps_l (model hidden-state units): it is the unit of the observation's
#: deviations, so it must be > 0, and beyond these bounds deviations in that unit leave float32's range. The
#: config field ``budget.layer_budget`` and a trace's ``layer_budget`` are checked against it (one constant).
LAYER_BUDGET_RANGE = (1e-12, 1e12)
LAYER_BUDGET_REASON = ("eps_l in the model's hidden-state units; it is the unit of the observation's deviations, "
                       "so it must be > 0 [choice]")
#: combine weights are fractions in [0, 1]; a trace may store them in float16, whose rounding near 1 is 2^-11
TOPK_WEIGHT_SLACK = 2.0 ** -10


@dataclass
class TokenGates:
    """Gating of one token in all layers for a batch: probs (B, L, E), topk_idx (B, L, K), topk_weight (B, L, K)."""

    probs: np.ndarray
    topk_idx: np.ndarray
    topk_weight: np.ndarray


class GatingSource(ABC):
    """Base class. Subclasses set the attributes below and implement :meth:`start` and :meth:`gates`."""

    name: str = "source"
    n_layers: int
    n_experts: int
    top_k: int
    d_model: int
    routing: str
    mismatch: np.ndarray  # (L, E, E+1) float64
    layer_budget: np.ndarray  # (L,) float64, eps_l in the model's units
    #: real accuracy: the accuracy rule's tables (:class:`wide_env.gating.effects.EffectLookup`), or None
    logit_effects = None
    has_effects: bool = False
    #: True when gating depends only on the position (a recorded trace), never on the generator: then
    #: :meth:`all_gates` returns every position's gating and simulators may precompute per-position tables.
    positional: bool = False

    @abstractmethod
    def start(self, rng: np.random.Generator, batch: int, n_tokens: int) -> np.ndarray:
        """Start positions (B,) of new episodes of ``n_tokens`` tokens."""

    @abstractmethod
    def gates(self, positions: np.ndarray, rng: np.random.Generator) -> TokenGates:
        """Gating of the tokens at ``positions`` (B,) (start + token index) in every layer."""

    def all_gates(self) -> TokenGates:
        """Gating of every position, (T, L, ...) arrays; only for ``positional`` sources."""
        raise NotImplementedError(f"{type(self).__name__} draws gating at random: it has no per-position table")

    def describe(self) -> dict:
        return {"source": self.name, "n_layers": self.n_layers, "n_experts": self.n_experts,
                "top_k": self.top_k, "d_model": self.d_model, "routing": self.routing}


def topk_from_probs(probs: np.ndarray, k: int, routing: str):
    """Top-K indices (descending) and combine weights from probabilities (..., E)."""
    idx = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
    top = np.take_along_axis(probs, idx, axis=-1)
    if routing == "softmax_topk_raw":
        weight = top
    else:
        weight = top / np.maximum(top.sum(axis=-1, keepdims=True), 1e-30)
    return idx, weight
