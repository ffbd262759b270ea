"""Token credit: every layer of a token is paid the token's whole accuracy term.

With the model's accuracy (every regime's source: the shipped trace's rule is not validated for them) the env
measures a token's loss change once, at its last layer (``info["delta_loss"]`` is 0 before it), so
:class:`agents.shaping.RewardShaping` can pay the accuracy term only there. A per-layer learner (gamma = 0) then
trains the token's first L - 1 layers on energy alone; discounting (gamma 0.9) reaches back 0.9^(L-1) of it
(0.04 on Mixtral's 32 layers) and adds the later tokens' energies as noise.

With ``reward_shaping: {token_credit: true}`` the shaping records each step's accuracy term, and
:class:`TokenCredit` (a callback; :func:`token_credit_callback` adds it where the YAML asks) rewrites the rollout
before PPO's update: each step of a token gets its own energy (and budget and deadline terms) plus the sum of the
token's accuracy terms, as if gamma were 1 within a token and 0 across tokens. For a decision at layer l only
the token's accuracy and its own energy depend on it (with per-layer budgets), so the summed gradient over the
token's layers is the token objective's exact policy gradient. Advantages are then recomputed
(``RolloutBuffer.compute_returns_and_advantage``, as SB3 computed them the first time). The price is variance:
each decision also carries the noise of the token's other layers' choices. On the 4-layer AccuracyObjective at
weight 5, where per-layer shaping alone ended skipping every expert, it still ran 0.09 of Top-K's energy (29%
accuracy) after 409,600 steps, drifting down; on Mixtral's 32 layers two seeds stayed at
Top-K routing for 61,440-102,400 of 122,880 steps, so the Mixtral regime trains without it.

Where ``VecNormalize`` scales rewards after the shaping, each token's accuracy term is scaled by its last step's
factor (the buffer's reward / the shaped reward of that step). A rollout starts at a token's first layer when
``n_steps`` is a multiple of the model's layers (checked); a token cut by the rollout's end keeps the shaping's
rewards for its steps in this rollout. Training signal only: the env's reward, the monitor and every evaluation
are untouched.
"""

from __future__ import annotations

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import unwrap_vec_wrapper

__all__ = ["TokenCredit", "credit_tokens", "token_credit_callback"]


def credit_tokens(rewards: np.ndarray, shaped: np.ndarray, accuracy: np.ndarray, layer: np.ndarray,
                  complete: np.ndarray) -> np.ndarray:
    """The rollout's rewards (n_steps, n_envs) with every token's accuracy term paid at each of its layers.

    ``rewards``: as in the buffer (after any normalisation); ``shaped``: the shaping's reward of each step before
    it; ``accuracy``: the step's accuracy term inside ``shaped``; ``layer``: the step's layer; ``complete``: the
    step finished its token. Steps of a token that is not complete by the rollout's end are returned unchanged."""
    out = np.array(rewards, dtype=np.float32, copy=True)
    n_steps, n_envs = out.shape
    for env in range(n_envs):
        start = None
        for t in range(n_steps):
            if layer[t, env] == 0:
                start = t
            if complete[t, env] and start is not None:
                raw = shaped[t, env]
                scale = out[t, env] / raw if raw != 0.0 else 1.0
                steps = slice(start, t + 1)
                total = accuracy[steps, env].sum()
                out[steps, env] += np.float32(scale * (total - accuracy[steps, env]))
                start = None
    return out


class TokenCredit(BaseCallback):
    """Pays every layer of a token its whole accuracy term in each rollout, then recomputes the advantages (the
    module docstring). ``shaping``: the :class:`agents.shaping.RewardShaping` below the model's env, created with
    ``token_credit=True`` (it records the steps)."""

    def __init__(self, shaping, n_layers: int, verbose: int = 0):
        super().__init__(verbose)
        if not getattr(shaping, "records_steps", False):
            raise ValueError("TokenCredit needs the RewardShaping wrapper made with token_credit=True")
        self.shaping, self.n_layers = shaping, int(n_layers)

    def _on_training_start(self) -> None:
        n_steps = int(getattr(self.model, "n_steps", 0))
        if n_steps % self.n_layers:
            raise ValueError(f"reward_shaping.token_credit: n_steps = {n_steps} must be a multiple of the model's "
                             f"{self.n_layers} layers, so that every rollout starts at a token's first layer; "
                             f"set n_steps to {max(self.n_layers, n_steps // self.n_layers * self.n_layers)}")

    def _on_rollout_start(self) -> None:
        self.shaping.clear_records()

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        buffer = self.model.rollout_buffer
        shaped, accuracy, layer, complete = self.shaping.take_records()
        if shaped.shape != buffer.rewards.shape:
            raise RuntimeError(f"token credit: recorded {shaped.shape} steps, the rollout holds {buffer.rewards.shape}")
        buffer.rewards[:] = credit_tokens(buffer.rewards, shaped, accuracy, layer, complete)
        buffer.compute_returns_and_advantage(last_values=self.locals["values"], dones=self.locals["dones"])


def token_credit_callback(venv, n_layers: int) -> TokenCredit | None:
    """The callback for a training env whose shaping asked for token credit (None where it did not)."""
    from agents.shaping import RewardShaping

    shaping = unwrap_vec_wrapper(venv, RewardShaping)
    if shaping is None or not shaping.records_steps:
        return None
    return TokenCredit(shaping, n_layers)
