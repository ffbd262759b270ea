"""Policies for the prefill environment `wide_env/WideMoEPrefill-v0`, acting on its observation.

* ``siftmoe``: the exact SiftMoE prefilling selection (:func:`baselines.prefill.solve_prefill`) on the
  observed per-load energies f_e(n) (``load_energy_cost``, energies relative to the Top-K energy;
  loads that cannot meet the deadline, ``load_deadline_probability`` 0, are unusable while deadlines are
  enforced), the per-token
  deviation tables and budgets. Exact for one-to-one placement, like the solver.
* every decoding policy (``topk``, ``wdmoe``, ``des``, ``adapmoe``, ``greedy``, ``random``) token by
  token: each prompt token becomes one decoding observation whose expert energies and latencies are
  those of a one-token load; the per-token masks form the (token, expert) action. This ignores the
  convexity of the aggregated load (which is exactly what prefilling SiftMoE exploits).
"""

from __future__ import annotations

import numpy as np

from baselines.observation import parse_observation
from baselines.prefill import solve_prefill
from wide_env.sim.observation import observation_layout, observation_slices

def is_prefill(problem) -> bool:
    return hasattr(problem, "prompt_tokens")


class PrefillPolicy:
    """Callable ``policy(obs) -> int8 action (T*E,)`` or ``(B, T*E)``; ``reset(seed)`` at episode starts."""

    def __init__(self, problem, name: str, inner=None):
        self.problem, self.name, self.inner = problem, name, inner

    def reset(self, seed: int | None = None) -> None:
        if self.inner is not None:
            self.inner.reset(seed)

    def __call__(self, obs):
        a, single = parse_observation(obs, self.problem)
        masks = self._siftmoe(a) if self.inner is None else self._per_token(a)
        action = masks.reshape(masks.shape[0], -1).astype(np.int8)
        return action[0] if single else action

    def _per_token(self, a) -> np.ndarray:
        """Run the decoding policy on B*T one-token observations."""
        T, E, K = self.problem.prompt_tokens, self.problem.n_experts, self.problem.top_k
        B = a["gate_probs"].shape[0]
        one_token = lambda key: a[key].reshape(B, E, T)[:, :, 0]  # noqa: E731  (load of one token)
        rows = {
            "gate_probs": a["gate_probs"].reshape(B * T, E),
            "channel_gain_db": np.repeat(a["channel_gain_db"], T, axis=0),
            "topk_mask": a["topk_mask"].reshape(B * T, E),
            "topk_weight": a["topk_weight"].reshape(B * T, E),
            "energy_cost": np.repeat(one_token("load_energy_cost"), T, axis=0),
            "latency_ratio": np.repeat(one_token("load_latency_ratio"), T, axis=0),
            "deadline_probability": np.repeat(one_token("load_deadline_probability"), T, axis=0),
            "deviation_table": a["deviation_table"].reshape(B * T, K * (E + 1)),
            "budget_remaining": a["budget_remaining"].reshape(B * T, 1),
            "position": np.repeat(a["position"], T, axis=0),
        }
        return np.asarray(self.inner(rows), dtype=bool).reshape(B, T, E)

    def _siftmoe(self, a) -> np.ndarray:
        T, E, K = self.problem.prompt_tokens, self.problem.n_experts, self.problem.top_k
        B = a["gate_probs"].shape[0]
        out = np.zeros((B, T, E), dtype=bool)
        for b in range(B):  # the combinatorial search runs per prompt
            f = np.zeros((E, T + 1))
            f[:, 1:] = a["load_energy_cost"][b].reshape(E, T)
            if self.problem.enforce_deadline:
                f[:, 1:] = np.where(a["load_deadline_probability"][b].reshape(E, T) > 0, f[:, 1:], np.inf)
            f = np.maximum.accumulate(f, axis=1)
            budget = a["budget_remaining"][b] * (1.0 - 1e-6)  # absorb float32 rounding of the observation
            out[b] = solve_prefill(f, a["deviation_table"][b].reshape(T, K, E + 1), budget).mask
        return out


def make_prefill_policy(name: str, problem, decode_factory, **kwargs) -> PrefillPolicy:
    """``siftmoe`` -> exact prefill solver; any other decoding policy name -> token-by-token adapter.
    ``decode_factory(problem_like, **kwargs)`` builds the decoding policy for one-token rows."""
    if name == "siftmoe":
        if kwargs:
            raise TypeError(f"prefill siftmoe takes no keyword arguments, got {sorted(kwargs)}")
        return PrefillPolicy(problem, name)
    return PrefillPolicy(problem, name, decode_factory(_DecodeLike(problem), **kwargs))


class _DecodeLike:
    """The decoding-problem facts a per-token decoding policy reads (Dict rows, never flat)."""

    def __init__(self, problem):
        self.n_layers, self.n_experts, self.top_k = problem.n_layers, problem.n_experts, problem.top_k
        self.n_nodes, self.n_tokens = problem.n_nodes, problem.prompt_tokens
        self.deadline_s, self.enforce_deadline = problem.deadline_s, problem.enforce_deadline
        self.budget_mode, self.flatten = "layer", False
        self.obs_slices = observation_slices(observation_layout(self.n_experts, self.top_k, self.n_nodes))
