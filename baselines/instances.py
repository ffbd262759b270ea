"""Random decoding instances shaped like the WIDE environment's observations (tests and benchmarks).

Gate probabilities are Dirichlet; the Top-K slots carry Mixtral-style renormalised weights (raw
probability for K = 1); the deviation table is ``w_k * D(i_k, .)`` for a random mismatch matrix whose
skip column is the expert's output norm and whose off-diagonal stand-in distances are comparable to it
(some stand-ins beat skipping, most do not); energies are log-normal (fading channels); latency ratios
are log-normal around 0.6 and experts with ratio > 1 are infeasible.
"""
from __future__ import annotations

import numpy as np

__all__ = ["random_decode_instances"]


def random_decode_instances(rng: np.random.Generator, B: int, E: int, K: int, *,
                            budget_scale: float = 0.5, deadline_sigma: float = 0.35) -> dict:
    rows = np.arange(B)[:, None]
    gate = rng.dirichlet(np.full(E, 0.3), size=B)
    gate = np.maximum(gate, 1e-12)
    gate /= gate.sum(axis=1, keepdims=True)
    topk = np.argsort(-gate, axis=1, kind="stable")[:, :K]
    w = gate[rows, topk]
    if K > 1:
        w = w / w.sum(axis=1, keepdims=True)
    topk_mask = np.zeros((B, E), dtype=bool)
    topk_mask[rows, topk] = True
    topk_weight = np.zeros((B, E))
    topk_weight[rows, topk] = w

    norms = rng.uniform(0.8, 1.2, size=(B, E))
    D = norms[:, :, None] * rng.uniform(0.6, 1.8, size=(B, E, E))
    D[:, np.arange(E), np.arange(E)] = 0.0
    D = np.concatenate([D, norms[:, :, None]], axis=2)          # (B, E, E + 1)
    dev = w[:, :, None] * D[rows, topk]                           # (B, K, E + 1)

    energy = rng.lognormal(0.0, 1.0, size=(B, E))
    latency_ratio = rng.lognormal(np.log(0.6), deadline_sigma, size=(B, E))
    feasible = latency_ratio <= 1.0
    budget = budget_scale * dev[:, :, E].sum(axis=1)
    return dict(gate_probs=gate, topk_mask=topk_mask, topk_weight=topk_weight, deviation_table=dev,
                energy=energy, latency_ratio=latency_ratio, feasible=feasible, budget=budget)
