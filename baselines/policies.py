"""Observation -> action policies for the WIDE decoding environments.

``make_policy(name, env, **kwargs)`` returns a callable ``policy(obs) -> action``.  Policies use only
the observation and ``env.unwrapped.problem`` (the information a learned agent gets): ``obs`` is the
env's Dict observation (1-D arrays, or arrays with a leading batch axis) or its flat observation
(``config={"flatten_observation": True}``; split with ``problem.obs_slices``).  The action is an int8
array of shape (E,), or (B, E) for batched observations.

Derived quantities (all from the observation):

* ``feasible`` = ``deadline_probability > 0`` (the expert may meet the deadline, as far as the device
  knows: helpers' queueing delays are uncertain) while ``problem.enforce_deadline`` is on, else every expert.
  (The simulator tests ``latency <= T_max (1 + 1e-9)`` in float64; the observation is float32, so an
  expert within float32 rounding above the deadline could be misjudged - vanishingly rare.)
* ``energy`` = ``energy_cost`` (energy relative to the Top-K energy of this state; clipped by the env at
  1e4, which only matters for experts that are hopeless anyway).
* ``deviation_table`` reshaped to (K, E + 1) and ``budget_remaining``, both in budget units.

Names (``POLICY_NAMES``) and keyword arguments:

* ``topk`` - execute the Top-K set (practical Top-K under deadline enforcement; ideal Top-K when the
  env's ``deadline.enforce`` is false).
* ``siftmoe`` - exact SiftMoE decoding selection (:func:`baselines.siftmoe.solve_decode`) on the
  observed energies, deadline feasibility and deviation table.  ``margin`` (default 1e-6): the budget
  is shrunk by this relative amount to absorb float32 rounding of the observation.  In token budget
  mode the per-layer budget is the remaining token budget split over the layers left of the token,
  ``allocation="even"`` (default; layer index recovered from ``position``), or all of it,
  ``allocation="greedy"`` [our choice; the paper's SiftMoE is per layer].
* ``wdmoe`` - ``threshold`` (default 0.5) on gate weight / latency relative to the best Top-K expert;
  ``respect_deadline`` (default True) scores only feasible experts.
* ``des`` - ``gamma`` (default 0.9) gate mass, ``max_experts`` (default K); exact.
* ``adapmoe`` - ``threshold`` (default 0.8) on the top-1 share of the Top-K weight.
* ``greedy`` - ``k`` (default K) least-energy feasible experts; ``pool="all"`` (default) or ``"topk"``.
* ``random`` - ``p_keep`` (default 0.5) per Top-K expert, ``seed`` (default None); ``policy.reset(seed)``
  reseeds (the evaluator does this per episode).
* ``lagrangian`` - the tuned Lagrangian rule (:mod:`baselines.lagrangian`): per decision the set of at most K
  usable experts minimising energy (J, from the observed costs and link gains) + ``lam`` x ``mu[layer]`` x
  sum_k ``nu[k]`` Delta_k; ``eta`` > 0 moves lambda online like the span budget's dual; ``guard`` (default True)
  keeps each decision within what is left of the budget. Built from the env (:data:`ENV_POLICIES`: its energy model
  is fitted on sample episodes of the env's physics, ``stats_episodes`` default 16, ``cache_dir``); the tuned
  weights of each benchmark regime: :func:`baselines.lagrangian_tuning.tuned_kwargs`.
* ``confident_skip`` - on the model-state keys (``gating.model_state``; the ``WideMoE-ModelState-v0`` preset):
  Top-K, or only its top expert when ``logit_lens_confidence > confidence`` or ``router_margin > margin``
  (defaults tuned on the selection seeds: :mod:`baselines.model_state_tuning`).
* ``ALGO:PATH`` - a saved agent, loaded by the learned-agent plugin (:mod:`baselines.agent_plugin`; the
  ``agents`` package registers it): ALGO in :data:`agents.registry.ALGORITHMS` (``ppo``, ``a2c``,
  ``maskable_ppo``, ``recurrent_ppo``), a Stable-Baselines3 / sb3-contrib model loaded lazily on CPU;
  ``deterministic`` (default True). MaskablePPO gets :func:`baselines.observation.action_masks`, the deadline
  mask of ``env.action_masks()`` rebuilt from the observation.

The observation is parsed by key name from the env's layout (``problem.obs_slices``, built by
:mod:`wide_env.sim.observation`), so keys added there are parsed too.
"""
from __future__ import annotations

from typing import Callable

from baselines.agent_plugin import INSTALL_HINT, AgentPluginUnavailable, agent_plugin
from baselines.analytic import DES, AdapMoE, Greedy, Random, SiftMoE, TopK, WDMoE
from baselines.lagrangian import make_lagrangian
from baselines.model_state_policy import ConfidentSkip
from baselines.observation import problem_of
from baselines.policy_base import SPAN_POLICY_NAMES, Policy
from baselines.prefill_policies import is_prefill, make_prefill_policy
from baselines.spanning import make_span_policy

__all__ = ["POLICIES", "ENV_POLICIES", "MODEL_STATE_POLICIES", "POLICY_NAMES", "SPAN_POLICY_NAMES", "make_policy"]


#: the analytic policies by name (the registry; ``algo:PATH`` loads a saved agent instead)
POLICIES: dict[str, Callable[..., Policy]] = {
    "topk": TopK, "siftmoe": SiftMoE, "wdmoe": WDMoE, "des": DES, "adapmoe": AdapMoE, "greedy": Greedy,
    "random": Random,
}
#: analytic policies that read only the observation but are built from the env (``builder(env, **kwargs)``): their
#: energy model is fitted on the env's physics, so they cannot be made from ``problem`` alone like :data:`POLICIES`
ENV_POLICIES: dict[str, Callable[..., Policy]] = {"lagrangian": make_lagrangian}
#: analytic policies that read the opt-in model-state keys (gating.model_state): only envs with them
MODEL_STATE_POLICIES: dict[str, Callable[..., Policy]] = {"confident_skip": ConfidentSkip}
POLICY_NAMES = tuple(POLICIES) + tuple(ENV_POLICIES) + tuple(MODEL_STATE_POLICIES) + SPAN_POLICY_NAMES


def make_policy(name: str, env, **kwargs) -> Policy:
    """Build policy ``name`` (see the module docstring) for ``env`` (a WIDE env, wrapped or not)."""
    problem = problem_of(env)
    if not isinstance(name, str):
        raise TypeError(f"policy name must be a string, got {name!r}")
    if ":" in name:  # a saved agent: the agents plugin loads it (torch and SB3 only when the model is first used)
        algo, path = name.split(":", 1)
        try:
            return agent_plugin().load_policy(algo.strip().lower(), path.strip(), problem, **kwargs)
        except ValueError as exc:
            raise ValueError(f"{exc} as 'algo:path' in {name!r}") from None
    key = name.strip().lower()
    if key in SPAN_POLICY_NAMES:  # the oracle and the time-spanning policies are built from the env itself
        return make_span_policy(key, env, **kwargs)
    if key in ENV_POLICIES:
        try:
            return ENV_POLICIES[key](env, **kwargs)
        except TypeError as exc:
            raise TypeError(f"bad keyword arguments for policy {key!r}: {exc}") from None
    if key in MODEL_STATE_POLICIES:
        return MODEL_STATE_POLICIES[key](problem, **kwargs)
    if key not in POLICIES:
        try:
            saved = f"'algo:path.zip' with algo in {list(agent_plugin().algorithms)}"
        except AgentPluginUnavailable:
            saved = f"'algo:path.zip' (saved agents; {INSTALL_HINT} installs the algorithms)"
        raise ValueError(f"unknown policy {name!r}; choose one of {list(POLICY_NAMES)} or {saved}")
    try:
        if is_prefill(problem):
            return make_prefill_policy(key, problem, POLICIES[key], **kwargs)
        return POLICIES[key](problem, **kwargs)
    except TypeError as exc:
        raise TypeError(f"bad keyword arguments for policy {key!r}: {exc}") from None
