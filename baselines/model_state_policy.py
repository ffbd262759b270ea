"""``confident_skip``: the analytic rule on the model-state observation keys (``gating.model_state = true``, the
``wide_env/WideMoE-ModelState-v0`` preset; docs/model.md#model-state-observations).

Per decision: execute the Top-K set, except when the token in progress looks easy - its logit-lens confidence
exceeds ``confidence`` or the live router's top-1/top-2 margin exceeds ``margin`` - then execute only the Top-K
expert with the largest combine weight (the 2nd and later Top-K slots are skipped). Deadlines are handled as
``topk`` handles them (the env serves what arrives in time). A threshold of 1 never fires (both keys are <= 1).

The thresholds are tuned on the selection seeds (30000 onwards, not the benchmark's test seeds) by
:func:`baselines.model_state_tuning.tune`: a grid of (confidence, margin) pairs, each scored by the preset's
mean reward per step (the accuracy objective: energy against the measured loss); :data:`TUNED` is its result
(``python -m baselines.model_state_tuning``; docs/model.md#model-state-observations gives the run).
"""
from __future__ import annotations

import numpy as np

from baselines.policy_base import Policy
from wide_env.sim.observation import MODEL_STATE_KEYS

__all__ = ["ConfidentSkip", "ENV_ID", "TUNED"]

#: the preset the rule is made for
ENV_ID = "wide_env/WideMoE-ModelState-v0"
#: the thresholds baselines.model_state_tuning.tune chose on ENV_ID (the defaults)
TUNED = {"confidence": 0.5, "margin": 0.2}


class ConfidentSkip(Policy):
    """Top-K, or only its top expert when the logit lens or the router margin says the token is easy."""

    name = "confident_skip"

    def __init__(self, problem, *, confidence: float = TUNED["confidence"], margin: float = TUNED["margin"]):
        super().__init__(problem)
        missing = [key for key in MODEL_STATE_KEYS if key not in getattr(problem, "obs_slices", {})]
        if missing:
            raise ValueError(f"policy 'confident_skip' reads the model-state observation keys {missing}: make the "
                             "env with config gating.model_state = true and gating.accuracy = 'model' (the "
                             f"{ENV_ID} preset)")
        for label, value in (("confidence", confidence), ("margin", margin)):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"confident_skip {label} must be in [0, 1] (1: never skip on it), got {value}")
        self.confidence, self.margin = float(confidence), float(margin)

    def select(self, a):
        topk = a["topk_mask"] > 0.5
        weight = np.where(topk, a["topk_weight"], -1.0)
        top = np.zeros_like(topk)
        top[np.arange(topk.shape[0]), weight.argmax(1)] = True
        easy = (a["logit_lens_confidence"][:, 0] > self.confidence) | (a["router_margin"][:, 0] > self.margin)
        return np.where(easy[:, None], topk & top, topk)
