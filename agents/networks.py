"""Policy networks for the WIDE decoding environments.

Two families, both acting on the env's ``Dict`` observation (or its flat ``Box`` twin, split with the
layout of :mod:`wide_env.sim.observation`):

* :class:`WideFlatExtractor` - the *plain MLP* baseline: every key scaled to O(1) (log energies, clipped
  latency ratios and deviations, channel gains in tens of dB) and concatenated; SB3's MLP on top.
* :class:`ExpertSetPolicy` / :class:`MaskableExpertSetPolicy` - a *permutation-equivariant* actor-critic.
  Experts are exchangeable: each expert j is a token built by one shared MLP from its own features
  (gate prob, Top-K flag and weight, energy cost, latency ratio, deadline feasibility), its column of the
  deviation table pooled over the K Top-K slots (each (slot k, expert j) pair is encoded by a shared MLP
  from ``w_k D(S_k, j)``, the slot's skip cost ``w_k D(S_k, skip)``, whether j is S_k itself, and the
  budget; mean and max over k) and the broadcast globals (budget remaining, position). A few
  equivariant mixing blocks over the expert tokens (DeepSets, the default: each token is updated from
  itself and the mean and max over all tokens; or self-attention without positional encoding,
  ``mixer="attention"``) let
  experts see each other (who can stand in for whom); a shared linear head gives one Bernoulli logit per
  expert, and the critic reads the mean and max over experts. No parameter depends on E or K, so weights
  trained on one profile load into a policy for another (:func:`transfer_policy_weights`, e.g. E=8, K=2
  -> E=32, K=4).

Every transform is a fixed function of the observation (no running statistics), so a saved model needs
no VecNormalize file to act.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from torch import nn

from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

OBS_KEYS = ("gate_probs", "topk_mask", "topk_weight", "channel_gain_db", "energy_cost", "latency_ratio",
            "deadline_probability", "deviation_table", "budget_remaining", "position")


# ---- observation handling ------------------------------------------------------------------------
def layout_sizes(observation_space: spaces.Space, n_experts: int | None = None, top_k: int | None = None,
                 n_nodes: int | None = None) -> tuple[int, int, int]:
    """(E, K, N) from a Dict observation space, or from the explicit sizes for a flat Box."""
    if isinstance(observation_space, spaces.Dict):
        E = observation_space["gate_probs"].shape[0]
        N = observation_space["channel_gain_db"].shape[0]
        K = observation_space["deviation_table"].shape[0] // (E + 1)
        return E, K, N
    if None in (n_experts, top_k, n_nodes):
        raise ValueError("a flat (Box) WIDE observation needs n_experts, top_k and n_nodes in policy_kwargs "
                         "(train.py fills them from env.unwrapped.problem)")
    return int(n_experts), int(top_k), int(n_nodes)


def split_obs(obs, E: int, K: int, N: int) -> dict[str, th.Tensor]:
    """Dict of (B, size) tensors from a Dict batch or a flat (B, D) batch."""
    if isinstance(obs, dict):
        return obs
    sizes = (E, E, E, N, E, E, E, K * (E + 1), 1, 2)
    out, offset = {}, 0
    for key, size in zip(OBS_KEYS, sizes):
        out[key] = obs[:, offset:offset + size]
        offset += size
    return out


def _log_energy(x: th.Tensor) -> th.Tensor:
    return th.log10(x.clamp(min=0.0) + 1e-3) / 2.0  # [-1.5, 2]


def scaled_features(o: dict[str, th.Tensor], E: int, K: int) -> th.Tensor:
    """The plain MLP's input: every observation key scaled to O(1), concatenated (B, D')."""
    energy = o["energy_cost"]
    lat = o["latency_ratio"]
    table = o["deviation_table"]
    parts = [
        o["gate_probs"], o["topk_mask"], o["topk_weight"],
        ((o["channel_gain_db"] + 80.0) / 20.0).clamp(-5.0, 5.0),
        _log_energy(energy), energy.clamp(max=3.0),
        lat.clamp(max=3.0), (lat <= 1.0).float(), o["deadline_probability"],
        th.log1p(table), table.clamp(max=3.0),
        th.log1p(o["budget_remaining"]), o["position"],
    ]
    return th.cat(parts, dim=-1)


def scaled_dim(E: int, K: int, N: int) -> int:
    return 3 * E + N + 5 * E + 2 * K * (E + 1) + 1 + 2


class WideFlatExtractor(BaseFeaturesExtractor):
    """Scale every key to O(1) and concatenate (for the plain MLP policy)."""

    def __init__(self, observation_space: spaces.Space, n_experts: int | None = None, top_k: int | None = None,
                 n_nodes: int | None = None):
        E, K, N = layout_sizes(observation_space, n_experts, top_k, n_nodes)
        super().__init__(observation_space, scaled_dim(E, K, N))
        self.E, self.K, self.N = E, K, N

    def forward(self, obs) -> th.Tensor:
        return scaled_features(split_obs(obs, self.E, self.K, self.N), self.E, self.K)


# ---- permutation-equivariant expert-set network ----------------------------------------------------
N_OWN = 9  # per-expert own features
N_PAIR = 7  # per (slot, expert) pair features
N_GLOBAL = 3  # budget remaining, layer position, token position


def expert_set_inputs(o: dict[str, th.Tensor], E: int, K: int) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
    """(own (B, E, N_OWN), pair (B, K, E, N_PAIR), globals (B, N_GLOBAL)); no parameter depends on E or K."""
    energy, lat = o["energy_cost"], o["latency_ratio"]
    feasible = (lat <= 1.0).float()
    own = th.stack([o["gate_probs"], o["topk_mask"], o["topk_weight"], _log_energy(energy), energy.clamp(max=3.0),
                    lat.clamp(max=3.0), feasible, o["deadline_probability"], o["gate_probs"] * E / 8.0], dim=-1)
    B = energy.shape[0]
    table = o["deviation_table"].reshape(B, K, E + 1)
    dev, skip = table[..., :E], table[..., E:]  # (B, K, E), (B, K, 1)
    # slot k's own expert S_k: the Top-K expert with zero deviation in row k (D(i, i) = 0)
    masked = dev + (1.0 - o["topk_mask"]).unsqueeze(1) * 1e6
    self_idx = masked.argmin(dim=-1, keepdim=True)  # (B, K, 1)
    is_self = th.zeros_like(dev).scatter_(-1, self_idx, 1.0)
    budget = o["budget_remaining"].unsqueeze(-1)  # (B, 1, 1)
    skip_b = skip.expand_as(dev)
    pair = th.stack([th.log1p(dev), dev.clamp(max=3.0), th.log1p(skip_b), is_self,
                     (dev < skip_b).float(), (dev <= budget).float(), (skip_b <= budget).float()], dim=-1)
    glob = th.cat([th.log1p(o["budget_remaining"]), o["position"]], dim=-1)
    return own, pair, glob


class _Block(nn.Module):
    """Pre-norm self-attention + feed-forward over the expert axis (permutation equivariant)."""

    def __init__(self, hidden: int, n_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, n_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(hidden)
        self.ff = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, hidden))

    def forward(self, x: th.Tensor) -> th.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.ff(self.norm2(x))


class _DeepSetsBlock(nn.Module):
    """x_j <- x_j + MLP([x_j, mean_k x_k, max_k x_k]) (permutation equivariant, cheaper than attention)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.ff = nn.Sequential(nn.Linear(3 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, hidden))

    def forward(self, x: th.Tensor) -> th.Tensor:
        h = self.norm(x)
        ctx = th.cat([h.mean(dim=1, keepdim=True), h.max(dim=1, keepdim=True).values], dim=-1).expand(-1, h.shape[1], -1)
        return x + self.ff(th.cat([h, ctx], dim=-1))


class ExpertSetExtractor(BaseFeaturesExtractor):
    """Observation -> per-expert embeddings, flattened to (B, E * hidden)."""

    def __init__(self, observation_space: spaces.Space, hidden: int = 64, pair_hidden: int = 32, n_blocks: int = 2,
                 n_heads: int = 4, mixer: str = "deepsets", n_experts: int | None = None, top_k: int | None = None,
                 n_nodes: int | None = None):
        E, K, N = layout_sizes(observation_space, n_experts, top_k, n_nodes)
        super().__init__(observation_space, E * hidden)
        self.E, self.K, self.N, self.hidden = E, K, N, hidden
        self.pair_net = nn.Sequential(nn.Linear(N_PAIR + N_GLOBAL, pair_hidden), nn.ReLU(),
                                      nn.Linear(pair_hidden, pair_hidden), nn.ReLU())
        self.token_net = nn.Sequential(nn.Linear(N_OWN + 2 * pair_hidden + N_GLOBAL, hidden), nn.ReLU(),
                                       nn.Linear(hidden, hidden))
        if mixer not in ("deepsets", "attention"):
            raise ValueError(f"mixer must be 'deepsets' or 'attention', got {mixer!r}")
        make = (lambda: _Block(hidden, n_heads)) if mixer == "attention" else (lambda: _DeepSetsBlock(hidden))
        self.blocks = nn.ModuleList([make() for _ in range(n_blocks)])
        self.norm = nn.LayerNorm(hidden)

    def tokens(self, obs) -> th.Tensor:
        o = split_obs(obs, self.E, self.K, self.N)
        own, pair, glob = expert_set_inputs(o, self.E, self.K)
        B, K, E, _ = pair.shape
        g_pair = glob[:, None, None, :].expand(B, K, E, N_GLOBAL)
        p = self.pair_net(th.cat([pair, g_pair], dim=-1))  # (B, K, E, P)
        pooled = th.cat([p.mean(dim=1), p.max(dim=1).values], dim=-1)  # (B, E, 2P)
        x = self.token_net(th.cat([own, pooled, glob[:, None, :].expand(B, E, N_GLOBAL)], dim=-1))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, obs) -> th.Tensor:
        return self.tokens(obs).flatten(1)


class _SetHeads(nn.Module):
    """SB3 'mlp_extractor': actor latent = per-expert embeddings; critic latent = mean and max over experts."""

    def __init__(self, hidden: int, n_experts: int):
        super().__init__()
        self.hidden = hidden
        self.latent_dim_pi = n_experts * hidden
        self.latent_dim_vf = 2 * hidden

    def forward_actor(self, features: th.Tensor) -> th.Tensor:
        return features

    def forward_critic(self, features: th.Tensor) -> th.Tensor:
        x = features.reshape(features.shape[0], -1, self.hidden)
        return th.cat([x.mean(dim=1), x.max(dim=1).values], dim=-1)

    def forward(self, features: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        return self.forward_actor(features), self.forward_critic(features)


class PerExpertHead(nn.Module):
    """(B, E * hidden) -> (B, E * n_out) logits with one shared linear map. n_out = 1: Bernoulli logit per
    expert (SB3); n_out = 2: [logit of 0, logit of 1] per expert (sb3-contrib's maskable MultiBinary)."""

    def __init__(self, hidden: int, n_out: int = 1):
        super().__init__()
        self.hidden = hidden
        self.linear = nn.Linear(hidden, n_out)

    def forward(self, latent: th.Tensor) -> th.Tensor:
        return self.linear(latent.reshape(latent.shape[0], -1, self.hidden)).flatten(1)


class _ExpertSetMixin:
    """Replaces SB3's E-sized heads by E-independent ones (shared per-expert logit head, pooled critic)."""

    _head_outputs = 1

    def __init__(self, observation_space, action_space, lr_schedule, *, hidden: int = 64, pair_hidden: int = 32,
                 n_blocks: int = 2, n_heads: int = 4, mixer: str = "deepsets", n_experts: int | None = None, top_k: int | None = None,
                 n_nodes: int | None = None, **kwargs: Any):
        if not isinstance(action_space, spaces.MultiBinary):
            raise ValueError(f"the expert-set policy needs a MultiBinary(E) action space, got {action_space}")
        self._set_hidden = hidden
        kwargs.setdefault("features_extractor_class", ExpertSetExtractor)
        kwargs["features_extractor_kwargs"] = dict(hidden=hidden, pair_hidden=pair_hidden, n_blocks=n_blocks,
                                                   n_heads=n_heads, mixer=mixer, n_experts=n_experts, top_k=top_k,
                                                   n_nodes=n_nodes, **kwargs.get("features_extractor_kwargs") or {})
        self._set_kwargs = dict(hidden=hidden, pair_hidden=pair_hidden, n_blocks=n_blocks, n_heads=n_heads,
                                mixer=mixer, n_experts=n_experts, top_k=top_k, n_nodes=n_nodes)
        kwargs.pop("net_arch", None)
        super().__init__(observation_space, action_space, lr_schedule, net_arch=[], **kwargs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.pop("net_arch", None)
        data.pop("features_extractor_class", None)
        data.pop("features_extractor_kwargs", None)
        data.update(self._set_kwargs)
        return data

    def _build_mlp_extractor(self) -> None:
        E = self.action_space.n if isinstance(self.action_space.n, int) else int(np.prod(self.action_space.n))
        self.mlp_extractor = _SetHeads(self._set_hidden, E)

    def _build(self, lr_schedule) -> None:
        super()._build(lr_schedule)
        H = self._set_hidden
        self.action_net = PerExpertHead(H, self._head_outputs)
        self.value_net = nn.Sequential(nn.Linear(2 * H, H), nn.ReLU(), nn.Linear(H, 1))
        if self.ortho_init:
            self.action_net.apply(lambda m: self.init_weights(m, gain=0.01))
            self.value_net.apply(lambda m: self.init_weights(m, gain=1.0))
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)


class ExpertSetPolicy(_ExpertSetMixin, ActorCriticPolicy):
    """Permutation-equivariant actor-critic for PPO / A2C (MultiBinary Bernoulli actions)."""


def _maskable_base():
    from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy

    return MaskableActorCriticPolicy


class MaskableExpertSetPolicy(_ExpertSetMixin, _maskable_base()):
    """Permutation-equivariant actor-critic for MaskablePPO."""

    _head_outputs = 2


def transfer_policy_weights(src_policy: nn.Module, dst_policy: nn.Module) -> None:
    """Copy an expert-set policy's weights into another built for a different E / K (shapes are E-free)."""
    dst_policy.load_state_dict(src_policy.state_dict(), strict=True)


def count_parameters(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


__all__ = ["WideFlatExtractor", "ExpertSetExtractor", "ExpertSetPolicy", "MaskableExpertSetPolicy",
           "PerExpertHead", "transfer_policy_weights", "scaled_features", "expert_set_inputs", "count_parameters"]
