"""Gymnasium wrappers around the wide_env environments (the layer above the env front ends; the envs never
import it): :class:`DeviationShield` and :class:`VectorDeviationShield` execute experts back until each layer
fits its deviation budget (:mod:`wide_env.wrappers.shield`)."""

from wide_env.wrappers.shield import DeviationShield, VectorDeviationShield, shield_actions

__all__ = ["DeviationShield", "VectorDeviationShield", "shield_actions"]
