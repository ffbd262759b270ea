"""train.py's ``shield: true``: the agent trains and is evaluated under the deviation shield.

The rule is :func:`wide_env.wrappers.shield.shield_actions` (execute the least-energy missing on-time Top-K
experts until the layer fits its budget left). Here it is applied where an agent meets an env:

* :class:`ShieldedVecEnv`: SB3's native VecEnv (training); dummy / subproc VecEnvs wrap each sub-env in
  :class:`wide_env.wrappers.DeviationShield` instead (:func:`agents.common.make_vec_env`). The learner stores
  the action it proposed; the env executes the shielded one (the agent learns what its proposals lead to).
* :func:`shielded_factory`: a policy factory for :func:`baselines.rollout.evaluate_policies` (evaluations and
  the final comparison), so the agent is scored on what it executes in training.
"""

from __future__ import annotations

import numpy as np
from stable_baselines3.common.vec_env import VecEnvWrapper

from wide_env.envs.actions import validate_action
from wide_env.wrappers.shield import decoding_batch, shield_actions

_ENTRIES = "one 0/1 entry per expert"


def shield_setting(value, source: str = "hyperparameters") -> bool:
    """The ``shield`` run setting as a bool; a ValueError naming the key for anything but true / false."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{source}: shield must be true or false (train under the deviation shield), got {value!r}")
    return bool(value)


class ShieldedVecEnv(VecEnvWrapper):
    """An SB3 VecEnv over wide_env's native decoding core whose actions are shielded before each step."""

    def __init__(self, venv):
        super().__init__(venv)
        self._batch = decoding_batch(venv.unwrapped)
        self._shape = (self._batch.sim.n_experts,)

    def step_async(self, actions: np.ndarray) -> None:
        executed = validate_action(actions, self._shape, _ENTRIES, num_envs=self.num_envs)
        self.venv.step_async(shield_actions(self._batch, executed).astype(np.int8))

    def step_wait(self):
        return self.venv.step_wait()

    def reset(self):
        return self.venv.reset()


class ShieldedPolicy:
    """``policy(obs) -> action`` whose actions are shielded on ``env``'s current layer (single or vector env)."""

    def __init__(self, policy, env):
        self.policy = policy
        self._batch = decoding_batch(env)
        self._shape = (self._batch.sim.n_experts,)
        self.name = getattr(policy, "name", "agent")

    def reset(self, seed: int | None = None) -> None:
        if hasattr(self.policy, "reset"):
            self.policy.reset(seed)

    def __call__(self, obs):
        action = np.asarray(self.policy(obs))
        single = action.shape == self._shape
        num_envs = None if single else self._batch.num_envs
        executed = validate_action(action, self._shape, _ENTRIES, num_envs=num_envs)
        shielded = shield_actions(self._batch, executed).astype(np.int8)
        return shielded[0] if single else shielded


def shielded_factory(policy):
    """A policy factory (``env -> policy``, :func:`baselines.rollout.evaluate_policies`) of ``policy`` under the
    shield of the env it is evaluated on."""

    def build(env):
        return ShieldedPolicy(policy, env)

    build.is_policy_factory = True
    return build
