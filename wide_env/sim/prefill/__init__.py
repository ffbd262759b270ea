"""Prefilling: plan (a prompt's gating and load tables) / step (numpy) / observation / simulator."""

from wide_env.sim.prefill.simulator import PrefillSimulator, PrefillState, PrefillView

__all__ = ["PrefillSimulator", "PrefillState", "PrefillView"]
