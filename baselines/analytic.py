"""The causal analytic policies by class: Top-K, SiftMoE, WDMoE, DES, AdapMoE, channel-greedy and random, each
reading the parsed observation (their names and keyword arguments: :mod:`baselines.policies`)."""
from __future__ import annotations

import numpy as np

from baselines.observation import layer_of
from baselines.policy_base import Policy
from baselines.related import (adapmoe_policy, des_policy, greedy_policy, random_policy, topk_policy,
                               wdmoe_policy)
from baselines.siftmoe import solve_decode

__all__ = ["TopK", "SiftMoE", "WDMoE", "DES", "AdapMoE", "Greedy", "Random"]


class TopK(Policy):
    name = "topk"

    def select(self, a):
        return topk_policy(a["topk_mask"] > 0.5)


class SiftMoE(Policy):
    name = "siftmoe"
    uses_budget = True

    def __init__(self, problem, *, margin: float = 1e-6, allocation: str = "even"):
        super().__init__(problem)
        if not 0.0 <= margin < 1.0:
            raise ValueError(f"siftmoe margin must be in [0, 1), got {margin}")
        if allocation not in ("even", "greedy"):
            raise ValueError(f"siftmoe allocation must be 'even' or 'greedy', got {allocation!r}")
        self.margin, self.allocation = float(margin), allocation

    def layer_budget(self, a):
        rem = a["budget_remaining"][:, 0]
        if self.problem.budget_mode == "token" and self.allocation == "even":
            L = self.problem.n_layers
            layer = layer_of(a, self.problem)
            rem = rem / np.maximum(L - layer, 1)
        return rem * (1.0 - self.margin)

    def select(self, a):
        E, K = self.problem.n_experts, self.problem.top_k
        feas = self.feasible(a)
        energy = np.where(feas, a["energy_cost"], 0.0)
        table = a["deviation_table"].reshape(-1, K, E + 1)
        if table.shape[0] == 1:
            return solve_decode(energy[0], feas[0], table[0], float(self.layer_budget(a)[0]))[None]
        return solve_decode(energy, feas, table, self.layer_budget(a))


class WDMoE(Policy):
    name = "wdmoe"

    def __init__(self, problem, *, threshold: float = 0.5, respect_deadline: bool = True):
        super().__init__(problem)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"wdmoe threshold must be in [0, 1], got {threshold}")
        self.threshold, self.respect_deadline = float(threshold), bool(respect_deadline)

    def select(self, a):
        return wdmoe_policy(a["topk_weight"], a["latency_ratio"], a["topk_mask"] > 0.5, threshold=self.threshold,
                            feasible=self.feasible(a) if self.respect_deadline else None)


class DES(Policy):
    name = "des"

    def __init__(self, problem, *, gamma: float = 0.9, max_experts: int | None = None):
        super().__init__(problem)
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"des gamma must be in [0, 1], got {gamma}")
        self.gamma = float(gamma)
        self.max_experts = problem.top_k if max_experts is None else int(max_experts)
        if self.max_experts < 0:
            raise ValueError(f"des max_experts must be >= 0, got {max_experts}")

    def select(self, a):
        feas = self.feasible(a)
        return des_policy(np.where(feas, a["energy_cost"], 0.0), feas, a["gate_probs"], gamma=self.gamma,
                          max_experts=self.max_experts)


class AdapMoE(Policy):
    name = "adapmoe"

    def __init__(self, problem, *, threshold: float = 0.8):
        super().__init__(problem)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"adapmoe threshold must be in [0, 1], got {threshold}")
        self.threshold = float(threshold)

    def select(self, a):
        return adapmoe_policy(a["topk_weight"], a["topk_mask"] > 0.5, threshold=self.threshold)


class Greedy(Policy):
    name = "greedy"

    def __init__(self, problem, *, k: int | None = None, pool: str = "all"):
        super().__init__(problem)
        if pool not in ("all", "topk"):
            raise ValueError(f"greedy pool must be 'all' or 'topk', got {pool!r}")
        self.k = problem.top_k if k is None else int(k)
        if self.k < 0:
            raise ValueError(f"greedy k must be >= 0, got {k}")
        self.pool = pool

    def select(self, a):
        pool = a["topk_mask"] > 0.5 if self.pool == "topk" else None
        return greedy_policy(a["energy_cost"], self.feasible(a), self.k, pool=pool)


class Random(Policy):
    name = "random"

    def __init__(self, problem, *, p_keep: float = 0.5, seed: int | None = None):
        super().__init__(problem)
        if not 0.0 <= p_keep <= 1.0:
            raise ValueError(f"random p_keep must be in [0, 1], got {p_keep}")
        self.p_keep = float(p_keep)
        self.rng = np.random.default_rng(seed)

    def reset(self, seed=None):
        if seed is not None:
            self.rng = np.random.default_rng(seed)

    def select(self, a):
        return random_policy(self.rng, a["topk_mask"] > 0.5, p_keep=self.p_keep)
