"""The expert-set network (:mod:`agents.networks`) as an RLlib new-API-stack torch ``RLModule`` for PPO.

The module is built from the same layers as SB3's :class:`agents.networks.ExpertSetPolicy`, not a copy of
them: :class:`~agents.networks.ExpertSetExtractor` (one token per action entry from the flat observation's
keys, DeepSets or attention mixing, the Top-K prior), :class:`~agents.networks.PerElementHead` (one shared
Bernoulli logit per entry), :class:`~agents.networks.SetHeads` and :func:`~agents.networks.critic_head` (the
critic on the mean and max over entries). It reads the flat observation of
``wide_env.integrations.rllib.register()``'s envs (``MultiDiscrete([2] * n)`` actions) and is configured by
``model_config`` (:func:`expert_set_spec` fills it from the env).

Why here and not in ``wide_env.integrations``: the network reads the observation through ``agents.layout``
and the deadline mask through ``baselines.observation``; ``wide_env`` imports neither (the layer contract in
``pyproject.toml``), so the RLlib module sits with the SB3 policy it shares its layers with.

Deadline masks: the ``may be 1`` half of ``env.action_masks()`` is rebuilt from the observation by the one
rule that the SB3 agents use (:func:`baselines.observation.feasible_actions`: an expert whose deadline
probability is 0 may not run while deadlines are enforced), and an entry that may not run gets the logit
``FLOAT_MIN`` for "execute", so it is never sampled, in exploration, inference and training alike.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces

from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import TorchMultiCategorical
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule
from ray.rllib.utils.torch_utils import FLOAT_MIN

from agents.common import policy_sizes
from agents.networks import ExpertSetExtractor, PerElementHead, SetHeads, critic_head
from baselines.observation import feasible_actions, problem_of

__all__ = ["ExpertSetRLModule", "DeadlineMaskRule", "expert_set_spec", "NETWORK_KEYS"]

#: the network's options in ``model_config`` (those of :class:`agents.networks.ExpertSetExtractor`)
NETWORK_KEYS = ("hidden", "pair_hidden", "n_blocks", "n_heads", "mixer", "topk_prior", "nodes_are_experts")
#: the layout's sizes in ``model_config`` (:func:`agents.common.policy_sizes`)
SIZE_KEYS = ("n_experts", "top_k", "n_nodes", "prompt_tokens")
_RLLIB_DEFAULT_KEYS = frozenset(f.name for f in dataclasses.fields(DefaultModelConfig))


@dataclass(frozen=True)
class DeadlineMaskRule:
    """What :func:`baselines.observation.feasible_actions` reads of a WIDE problem (picklable, so RLlib can
    ship it to its EnvRunners inside ``model_config``)."""

    n_experts: int
    enforce_deadline: bool
    prompt_tokens: int | None = None

    @classmethod
    def of(cls, problem) -> "DeadlineMaskRule":
        return cls(int(problem.n_experts), bool(problem.enforce_deadline),
                   int(problem.prompt_tokens) if hasattr(problem, "prompt_tokens") else None)


class ExpertSetRLModule(TorchRLModule, ValueFunctionAPI):
    """Permutation-equivariant actor-critic over the action's entries (RLlib PPO, ``MultiDiscrete([2] * n)``).

    ``model_config`` keys: the layout sizes ``n_experts``, ``top_k``, ``n_nodes`` (``prompt_tokens`` for
    prefill), the network options of :data:`NETWORK_KEYS` (defaults of :class:`ExpertSetExtractor`) and
    ``mask`` (a :class:`DeadlineMaskRule`, or None: no deadline mask)."""

    def setup(self):
        # an algorithm merges its defaults (RLlib's DefaultModelConfig fields, e.g. PPO's vf_share_layers) into
        # model_config: they describe RLlib's default networks, not this one
        cfg = {k: v for k, v in dict(self.model_config or {}).items() if k not in _RLLIB_DEFAULT_KEYS}
        unknown = sorted(set(cfg) - set(NETWORK_KEYS) - set(SIZE_KEYS) - {"mask"})
        if unknown:
            raise ValueError(f"model_config: unknown keys {unknown}; the expert-set module takes {list(NETWORK_KEYS)}, "
                             f"the sizes {list(SIZE_KEYS)} and 'mask' (use expert_set_spec(env) to fill them)")
        missing = [k for k in SIZE_KEYS[:3] if k not in cfg]
        if missing:
            raise ValueError(f"model_config lacks the layout sizes {missing}; build the spec with expert_set_spec(env), "
                             "which reads them from env.unwrapped.problem")
        self.encoder = ExpertSetExtractor(self.observation_space, **{k: cfg[k] for k in NETWORK_KEYS + SIZE_KEYS
                                                                       if k in cfg})
        n, hidden = self.encoder.spec.n_elements, self.encoder.hidden
        space = self.action_space
        if not (isinstance(space, spaces.MultiDiscrete) and space.shape == (n,) and np.all(space.nvec == 2)):
            raise ValueError(f"the expert-set module needs MultiDiscrete([2] * {n}) actions (one per action entry of "
                             f"the observation layout), got {space}; make the env with "
                             "wide_env.integrations.rllib (register / make_env)")
        prior = n if self.encoder.topk_prior else 0
        self.heads = SetHeads(hidden, n, prior=bool(prior))
        self.pi = PerElementHead(hidden, 1, prior)
        self.vf = critic_head(hidden)
        mask = cfg.get("mask")
        if mask is not None and not isinstance(mask, DeadlineMaskRule):
            raise ValueError(f"model_config['mask'] must be a DeadlineMaskRule (DeadlineMaskRule.of(problem)) or None, "
                             f"got {mask!r}")
        self.mask_rule = mask
        self._slices = {k.name: k.flat for k in self.encoder.spec.keys}
        # SB3's orthogonal initialisation of the same layers (ActorCriticPolicy with ortho_init): a near-zero
        # learned logit, so a fresh module acts by the Top-K prior alone
        from stable_baselines3.common.policies import ActorCriticPolicy

        for module, gain in ((self.encoder, math.sqrt(2)), (self.pi, 0.01), (self.vf, 1.0)):
            module.apply(lambda m, g=gain: ActorCriticPolicy.init_weights(m, gain=g))
        # one categorical over {skip, execute} per entry, its logits [0, Bernoulli logit]
        self.action_dist_cls = TorchMultiCategorical.get_partial_dist_cls(input_lens=[2] * n)

    # ---- the forward passes --------------------------------------------------------------------------
    def may_execute(self, obs: th.Tensor) -> th.Tensor | None:
        """(B, n) bool: the entries that may be 1 (``env.action_masks()``'s rule), None without a mask rule."""
        if self.mask_rule is None:
            return None
        flat = obs.detach().cpu().numpy()
        arrays = {name: flat[:, sl] for name, sl in self._slices.items()}
        return th.from_numpy(np.ascontiguousarray(feasible_actions(arrays, self.mask_rule))).to(obs.device)

    def execute_logits(self, obs: th.Tensor, features: th.Tensor) -> th.Tensor:
        """(B, n) Bernoulli logits of "execute", FLOAT_MIN where the deadline mask forbids it."""
        logits = self.pi(self.heads.forward_actor(features))
        may = self.may_execute(obs)
        return logits if may is None else th.where(may, logits, th.full_like(logits, FLOAT_MIN))

    def _outputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        obs = batch[Columns.OBS].float()
        features = self.encoder(obs)
        logits = self.execute_logits(obs, features)
        pairs = th.stack([th.zeros_like(logits), logits], dim=-1).flatten(1)  # [skip, execute] per entry
        return {Columns.ACTION_DIST_INPUTS: pairs, Columns.EMBEDDINGS: features}

    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        out = self._outputs(batch)
        out.pop(Columns.EMBEDDINGS)
        return out

    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return self._outputs(batch)  # the embeddings go to compute_values: one encoder pass per minibatch

    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> th.Tensor:
        if embeddings is None:
            embeddings = self.encoder(batch[Columns.OBS].float())
        return self.vf(self.heads.forward_critic(embeddings)).squeeze(-1)


def expert_set_spec(env, **network: Any) -> RLModuleSpec:
    """The RLModuleSpec of the expert-set module for ``env`` (a WIDE env, single or vector, as
    ``wide_env.integrations.rllib`` makes it): layout sizes and the deadline mask rule from
    ``env.unwrapped.problem``, network options (:data:`NETWORK_KEYS`) from ``network``."""
    unknown = sorted(set(network) - set(NETWORK_KEYS))
    if unknown:
        raise ValueError(f"unknown expert-set options {unknown}; choose from {list(NETWORK_KEYS)}")
    problem = problem_of(env)
    config = {**policy_sizes(problem), **network, "mask": DeadlineMaskRule.of(problem)}
    return RLModuleSpec(module_class=ExpertSetRLModule, model_config=config)
