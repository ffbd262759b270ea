"""The learned-agent plugin baselines discovers (:mod:`baselines.agent_plugin`; entry point ``wide_env.agents`` in
pyproject.toml): saved Stable-Baselines3 / sb3-contrib models as policies, and train.py's training in process.

Importing this module imports neither torch nor Stable-Baselines3: a model is loaded when a policy first acts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from agents.registry import ALGORITHMS, algorithm

__all__ = ["SB3Agents", "PLUGIN"]


class SB3Agents:
    """:class:`baselines.agent_plugin.AgentPlugin` over the algorithms of :mod:`agents.registry`."""

    algorithms = tuple(ALGORITHMS)

    def load_policy(self, algo: str, path: str, problem: Any, **kwargs: Any):
        from agents.sb3_policy import SB3Policy

        algorithm(algo)  # ValueError naming the known algorithms
        return SB3Policy.from_path(path, problem, algo=algo, **kwargs)

    def train(self, argv: list[str]) -> Path:
        from agents.run_config import build_parser
        from agents.training import train

        return train(build_parser("python train.py").parse_args(argv), argv)


PLUGIN = SB3Agents()
