"""Baseline expert-selection policies for the WIDE environments.

Pure solvers (numpy only, no environment needed):

* :func:`solve_decode` / :func:`solve_decode_full` - exact SiftMoE decoding selection.
* :mod:`baselines.related` - Top-K, WDMoE, DES (exact), AdapMoE-like, channel-greedy, random.

Environment-facing: :func:`make_policy` (observation -> action) and :mod:`baselines.evaluate`.
"""
from baselines.siftmoe import SiftSolution, deviation_of, energy_of, solve_decode, solve_decode_full
from baselines.related import (adapmoe_policy, des_policy, des_solve, greedy_policy, random_policy,
                               topk_policy, wdmoe_policy)

__all__ = ["SiftSolution", "deviation_of", "energy_of", "solve_decode", "solve_decode_full",
           "adapmoe_policy", "des_policy", "des_solve", "greedy_policy", "random_policy", "topk_policy",
           "wdmoe_policy", "make_policy", "POLICY_NAMES"]


def __getattr__(name):  # lazy: importing baselines must not import gymnasium/the environment
    if name in ("make_policy", "POLICY_NAMES"):
        from baselines import policies
        return getattr(policies, name)
    raise AttributeError(f"module 'baselines' has no attribute {name!r}")
