"""Policy networks for the WIDE environments (decoding and prefill).

Both families read the observation through :func:`agents.layout.layout_spec`, i.e. through the layout
functions and per-key metadata of :mod:`wide_env.sim.observation` (axes and scale of every key), never
through key names, so a key added there reaches them unchanged. Every key is scaled to O(1) by its kind:
fractions as they are; ratios (energy / Top-K energy, latency / deadline, deviation / budget: 1 is the
threshold) as ``[log10(x + 1e-3) / 2, min(x, 3), x <= 1]``; gains in dB as ``(x + 80) / 20`` clipped to
[-5, 5] (link gains at 10-150 m lie around -40 to -90 dB) [choice].

* :class:`WideFlatExtractor` - the *plain MLP* baseline: every scaled key concatenated; SB3's MLP on top.
* :class:`ExpertSetPolicy` / :class:`MaskableExpertSetPolicy` - a *permutation-equivariant* actor-critic
  over the action's entries: one set element per expert (decoding, ``MultiBinary(E)``) or per (token,
  expert) pair (prefill, ``MultiBinary(T*E)``). Keys are routed by their axes: a key over (a subset of)
  the element axes is an element feature (broadcast over the missing axes; extra axes such as the load
  axis become feature width); a (slot, choice) table such as the deviation table is encoded per (slot k,
  expert j) pair by a shared MLP from its entry, the slot's skip entry, whether the entry beats skip and
  whether it is zero (the slot's own expert), plus the globals, then pooled (mean, max) over slots; a
  per-node key is pooled (mean, max) over nodes into the globals; any other key is global. One shared MLP
  builds each element's token; equivariant mixing blocks (DeepSets: each token updated from itself and
  the mean and max over every element axis, i.e. over experts, and for prefill also over tokens; or
  self-attention without positional encoding, ``mixer="attention"``) let elements see each other; a
  shared linear head gives one Bernoulli logit per element and the critic reads the mean and max over
  elements. For decoding no parameter depends on E, K or N, so weights trained on one profile load into
  a policy for another (:func:`transfer_policy_weights`, e.g. E=8, K=2 -> E=32, K=4).

Every transform is a fixed function of the observation (no running statistics), so a saved model needs
no VecNormalize file to act.

Helpers as experts (``nodes_are_experts=True``, default False): with the one-to-one placement (helper e hosts
expert e, the paper's and the default ``placement.hosts``) a per-node key such as ``channel_gain_db`` describes
the experts one by one, so it is routed as an element feature (expert e reads node e) instead of being pooled
over nodes: each expert then sees its own link gain, from which its energy in joules follows (``energy_cost`` is
relative to the state's Top-K energy). Only for layouts with as many nodes as experts.

Routing prior (``topk_prior`` = c > 0, default 0 = none): a fixed offset of +c on the logit of every Top-K
entry and -c on the others (read from the observation key ``PRIOR_KEY``), added after the learned head. A fresh
policy then routes like Top-K (execute probability ``sigmoid(c)`` for the Top-K experts, ``sigmoid(-c)`` for the
rest) and learns where to depart from it. Why: from an unbiased start every expert is executed half the time, and
the energy of hopeless non-Top-K experts (up to 1e4 times the Top-K energy) dominates the reward's variance; under
the real-accuracy objective, whose signal is a few nats, PPO then collapses to executing nothing.
"""

from __future__ import annotations

from typing import Any

import torch as th
from gymnasium import spaces
from torch import nn

from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

from agents.features import KeyRouting, scaled_dim, scaled_features, split_obs
from agents.layout import LayoutSpec, layout_spec

#: observation key of the routing prior (``topk_prior``): 1 for the entries the router would execute
PRIOR_KEY = "topk_mask"


class WideFlatExtractor(BaseFeaturesExtractor):
    """Scale every key to O(1) and concatenate (for the plain MLP policy)."""

    def __init__(self, observation_space: spaces.Space, n_experts: int | None = None, top_k: int | None = None,
                 n_nodes: int | None = None, prompt_tokens: int | None = None):
        spec = layout_spec(observation_space, n_experts, top_k, n_nodes, prompt_tokens)
        super().__init__(observation_space, scaled_dim(spec))
        self.spec = spec

    def forward(self, obs) -> th.Tensor:
        return scaled_features(obs, self.spec)


# ---- permutation-equivariant expert-set network ----------------------------------------------------
class _Block(nn.Module):
    """Pre-norm self-attention + feed-forward over all elements (permutation equivariant)."""

    def __init__(self, hidden: int, n_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, n_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(hidden)
        self.ff = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, hidden))

    def forward(self, x: th.Tensor) -> th.Tensor:
        shape = x.shape
        x = x.reshape(shape[0], -1, shape[-1])
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return (x + self.ff(self.norm2(x))).reshape(shape)


class _DeepSetsBlock(nn.Module):
    """x_j <- x_j + MLP([x_j, mean and max along every element axis]) (permutation equivariant per axis:
    over experts; for prefill also over tokens)."""

    def __init__(self, hidden: int, n_axes: int = 1):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.ff = nn.Sequential(nn.Linear((1 + 2 * n_axes) * hidden, 2 * hidden), nn.ReLU(),
                                nn.Linear(2 * hidden, hidden))

    def forward(self, x: th.Tensor) -> th.Tensor:  # (B, *elements, H)
        h = self.norm(x)
        parts = [h]
        for dim in range(1, h.dim() - 1):
            parts += [h.mean(dim=dim, keepdim=True).expand_as(h), h.max(dim=dim, keepdim=True).values.expand_as(h)]
        return x + self.ff(th.cat(parts, dim=-1))


class ExpertSetExtractor(BaseFeaturesExtractor):
    """Observation -> one embedding per action entry (expert, or (token, expert)), flattened to
    (B, n_elements * hidden) in the action's order."""

    def __init__(self, observation_space: spaces.Space, hidden: int = 64, pair_hidden: int = 32, n_blocks: int = 2,
                 n_heads: int = 4, mixer: str = "deepsets", n_experts: int | None = None, top_k: int | None = None,
                 n_nodes: int | None = None, prompt_tokens: int | None = None, topk_prior: float = 0.0,
                 nodes_are_experts: bool = False):
        spec = layout_spec(observation_space, n_experts, top_k, n_nodes, prompt_tokens)
        self.topk_prior = _check_prior(topk_prior, spec)
        # with a prior, the features end with one prior logit per element (read by PerElementHead)
        super().__init__(observation_space, spec.n_elements * (hidden + (1 if self.topk_prior else 0)))
        self.spec, self.hidden = spec, hidden
        self.routing = KeyRouting(spec, bool(nodes_are_experts))
        r = self.routing
        self.pair_net = None
        pooled = 0
        if r.pair:
            self.pair_net = nn.Sequential(nn.Linear(r.n_pair + r.n_global, pair_hidden), nn.ReLU(),
                                          nn.Linear(pair_hidden, pair_hidden), nn.ReLU())
            pooled = 2 * pair_hidden
        self.token_net = nn.Sequential(nn.Linear(r.n_element + pooled + r.n_global, hidden), nn.ReLU(),
                                       nn.Linear(hidden, hidden))
        if mixer not in ("deepsets", "attention"):
            raise ValueError(f"mixer must be 'deepsets' or 'attention', got {mixer!r}")
        n_axes = len(spec.element_axes)
        make = (lambda: _Block(hidden, n_heads)) if mixer == "attention" else (lambda: _DeepSetsBlock(hidden, n_axes))
        self.blocks = nn.ModuleList([make() for _ in range(n_blocks)])
        self.norm = nn.LayerNorm(hidden)

    def element_inputs(self, obs) -> tuple[th.Tensor, th.Tensor | None, th.Tensor]:
        """(element features (B, *elements, F_e), (slot, choice) pair features (B, *elements, K, F_p) or
        None, global features (B, F_g)): what the network is built from."""
        return self.routing.inputs(obs)

    def tokens(self, obs) -> th.Tensor:
        """(B, *elements, hidden) embeddings."""
        own, pair, glob = self.element_inputs(obs)
        B, shape = glob.shape[0], self.spec.element_shape
        g = glob.reshape(B, *([1] * len(shape)), -1).expand(B, *shape, glob.shape[-1])
        parts = [own]
        if pair is not None:  # encode each (element, slot) pair, then pool over slots
            p = self.pair_net(th.cat([pair, g.unsqueeze(-2).expand(*pair.shape[:-1], glob.shape[-1])], dim=-1))
            parts.append(th.cat([p.mean(dim=-2), p.max(dim=-2).values], dim=-1))
        x = self.token_net(th.cat(parts + [g], dim=-1))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, obs) -> th.Tensor:
        x = self.tokens(obs).flatten(1)
        if not self.topk_prior:
            return x
        o = split_obs(obs, self.spec)
        prior = self.topk_prior * (2.0 * (o[PRIOR_KEY] > 0.5).float() - 1.0)
        return th.cat([x, prior.reshape(x.shape[0], -1)], dim=-1)


def _check_prior(value, spec: LayoutSpec) -> float:
    c = float(value)
    if not (c >= 0 and c == c and c != float("inf")):
        raise ValueError(f"topk_prior must be a finite logit offset >= 0 (0: no prior), got {value!r}")
    if c:
        key = next((k for k in spec.keys if k.name == PRIOR_KEY), None)
        if key is None or tuple(k for k in key.shape) != spec.element_shape:
            raise ValueError(f"topk_prior needs the observation key {PRIOR_KEY!r} with one entry per action entry "
                             f"{spec.element_shape}; this layout has {[k.name for k in spec.keys]}")
    return c


class SetHeads(nn.Module):
    """Actor latent = per-element embeddings (and the prior logits, last); critic latent = mean and max over
    elements. SB3's 'mlp_extractor' of the expert-set policy, and the RLlib module's split
    (:mod:`agents.rllib_module`)."""

    def __init__(self, hidden: int, n_elements: int, prior: bool = False):
        super().__init__()
        self.hidden, self.n_elements = hidden, n_elements
        self.latent_dim_pi = n_elements * hidden + (n_elements if prior else 0)
        self.latent_dim_vf = 2 * hidden

    def forward_actor(self, features: th.Tensor) -> th.Tensor:
        return features

    def forward_critic(self, features: th.Tensor) -> th.Tensor:
        x = features[:, :self.n_elements * self.hidden].reshape(features.shape[0], -1, self.hidden)
        return th.cat([x.mean(dim=1), x.max(dim=1).values], dim=-1)

    def forward(self, features: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        return self.forward_actor(features), self.forward_critic(features)


def critic_head(hidden: int) -> nn.Sequential:
    """The value head on the critic latent of :class:`SetHeads` (2 * hidden -> 1)."""
    return nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))


class PerElementHead(nn.Module):
    """(B, n * hidden) -> (B, n * n_out) logits with one shared linear map. n_out = 1: Bernoulli logit per
    action entry (SB3); n_out = 2: [logit of 0, logit of 1] per entry (sb3-contrib's maskable MultiBinary).
    With ``n_prior`` = n the latent ends with n fixed prior logits, added to each entry's logit of 1."""

    def __init__(self, hidden: int, n_out: int = 1, n_prior: int = 0):
        super().__init__()
        self.hidden, self.n_prior = hidden, n_prior
        self.linear = nn.Linear(hidden, n_out)

    def forward(self, latent: th.Tensor) -> th.Tensor:
        B = latent.shape[0]
        if not self.n_prior:
            return self.linear(latent.reshape(B, -1, self.hidden)).flatten(1)
        logits = self.linear(latent[:, :-self.n_prior].reshape(B, -1, self.hidden))
        prior = latent[:, -self.n_prior:]
        if logits.shape[-1] == 1:
            logits = logits + prior.unsqueeze(-1)
        else:  # [logit of 0, logit of 1]: the same log-odds shift
            logits = logits + th.stack([-0.5 * prior, 0.5 * prior], dim=-1)
        return logits.flatten(1)


class _ExpertSetMixin:
    """Replaces SB3's action-sized heads by size-independent ones (shared per-element logit head, pooled critic)."""

    _head_outputs = 1

    def __init__(self, observation_space, action_space, lr_schedule, *, hidden: int = 64, pair_hidden: int = 32,
                 n_blocks: int = 2, n_heads: int = 4, mixer: str = "deepsets", n_experts: int | None = None,
                 top_k: int | None = None, n_nodes: int | None = None, prompt_tokens: int | None = None,
                 topk_prior: float = 0.0, nodes_are_experts: bool = False, **kwargs: Any):
        if not isinstance(action_space, spaces.MultiBinary) or not isinstance(action_space.n, int):
            raise ValueError(f"the expert-set policy needs a MultiBinary(n) action space, got {action_space}")
        self._set_hidden = hidden
        self._set_kwargs = dict(hidden=hidden, pair_hidden=pair_hidden, n_blocks=n_blocks, n_heads=n_heads,
                                mixer=mixer, n_experts=n_experts, top_k=top_k, n_nodes=n_nodes,
                                prompt_tokens=prompt_tokens)
        # only when set are they constructor parameters: models saved before them load unchanged
        if topk_prior:
            self._set_kwargs["topk_prior"] = float(topk_prior)
        if nodes_are_experts:
            self._set_kwargs["nodes_are_experts"] = True
        kwargs.setdefault("features_extractor_class", ExpertSetExtractor)
        kwargs["features_extractor_kwargs"] = dict(self._set_kwargs, **kwargs.get("features_extractor_kwargs") or {})
        kwargs.pop("net_arch", None)
        super().__init__(observation_space, action_space, lr_schedule, net_arch=[], **kwargs)
        n_elements = self.features_extractor.spec.n_elements
        if n_elements != action_space.n:
            raise ValueError(f"the observation layout has {n_elements} action entries but the action space is "
                             f"{action_space}")

    @property
    def _has_prior(self) -> bool:
        return bool(self._set_kwargs.get("topk_prior"))

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.pop("net_arch", None)
        data.pop("features_extractor_class", None)
        data.pop("features_extractor_kwargs", None)
        data.update(self._set_kwargs)
        return data

    def _build_mlp_extractor(self) -> None:
        self.mlp_extractor = SetHeads(self._set_hidden, self.action_space.n, prior=self._has_prior)

    def _build(self, lr_schedule) -> None:
        super()._build(lr_schedule)
        H = self._set_hidden
        self.action_net = PerElementHead(H, self._head_outputs, self.action_space.n if self._has_prior else 0)
        self.value_net = critic_head(H)
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
           "SetHeads", "PerElementHead", "critic_head", "transfer_policy_weights", "count_parameters", "PRIOR_KEY"]
