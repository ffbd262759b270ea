"""A synthetic MoE router for any L, E, K [choice; shapes follow what real MoE models show].

Each token draws a latent vector u ~ N(0, I); layer l's router logits are s_l * (W_l u) / sqrt(dim)
+ small noise with fixed random W_l, so gating is token-conditioned and correlated across layers.
The logit scale s_l falls linearly from ``logit_scale_first`` to ``logit_scale_last``: gates are
peaky in early layers and flatter later, as measured on real MoE models.

Expert outputs are modelled as vectors n_i * v_i with v_i = c_l * shared + sqrt(1-c_l^2) * own_i
(unit vectors), so D_l(i, skip) = n_i and D_l(i, j) = ||n_i v_i - n_j v_j|| exactly. The shared
fraction c_l rises from ``expert_similarity_first`` to ``expert_similarity_last``: early layers hold
diverse experts (replacing one by another is worse than skipping), later layers similar ones.
"""

from __future__ import annotations

import numpy as np

from wide_env.gating.base import GatingSource, TokenGates, topk_from_probs

_LATENT_DIM = 16


class SyntheticGating(GatingSource):
    """``model``: a :class:`~wide_env.config.ModelConfig`, ``gating``: a :class:`~wide_env.config.GatingConfig`
    (read by attribute: the config imports the gating package, not the other way round)."""

    name = "synthetic"

    def __init__(self, model, gating):
        self.n_layers, self.n_experts, self.top_k = model.n_layers, model.n_experts, model.top_k
        self.d_model, self.routing = model.d_model, model.routing
        rng = np.random.default_rng(gating.model_seed)  # fixed "model": independent of episode seeds
        L, E = self.n_layers, self.n_experts
        frac = np.linspace(0.0, 1.0, L) if L > 1 else np.zeros(1)
        self.logit_scale = gating.logit_scale_first + frac * (gating.logit_scale_last - gating.logit_scale_first)
        self.router = rng.standard_normal((L, E, _LATENT_DIM)) / np.sqrt(_LATENT_DIM)
        similarity = gating.expert_similarity_first + frac * (gating.expert_similarity_last - gating.expert_similarity_first)
        dim = 64
        norms = gating.output_norm * rng.uniform(0.7, 1.3, size=(L, E))
        mismatch = np.zeros((L, E, E + 1))
        for layer in range(L):
            shared = rng.standard_normal(dim)
            shared /= np.linalg.norm(shared)
            own = rng.standard_normal((E, dim))
            own -= np.outer(own @ shared, shared)  # orthogonal to the shared direction
            own /= np.linalg.norm(own, axis=1, keepdims=True)
            c = similarity[layer]
            vectors = norms[layer, :, None] * (c * shared + np.sqrt(1.0 - c * c) * own)
            mismatch[layer, :, :E] = np.linalg.norm(vectors[:, None, :] - vectors[None, :, :], axis=-1)
            mismatch[layer, :, E] = norms[layer]
            np.fill_diagonal(mismatch[layer, :, :E], 0.0)
        self.mismatch = mismatch
        self.layer_budget = np.full(L, float(gating.synthetic_budget))

    def start(self, rng, batch, n_tokens):
        return np.zeros(batch, dtype=np.int64)

    def gates(self, positions, rng):
        batch = positions.shape[0]
        u = rng.standard_normal((batch, _LATENT_DIM))
        logits = np.einsum("led,bd->ble", self.router, u) * self.logit_scale[None, :, None]
        logits += 0.3 * rng.standard_normal(logits.shape)
        if self.routing == "sigmoid_topk_renorm":
            scores = 1.0 / (1.0 + np.exp(-logits))
            probs = scores / scores.sum(axis=-1, keepdims=True)
        else:
            logits -= logits.max(axis=-1, keepdims=True)
            probs = np.exp(logits)
            probs /= probs.sum(axis=-1, keepdims=True)
        idx, weight = topk_from_probs(probs, self.top_k, self.routing)
        return TokenGates(probs, idx, weight)
