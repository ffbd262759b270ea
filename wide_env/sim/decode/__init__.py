"""Decoding: plan (numpy, per chunk of tokens) / step (one compiled kernel) / state / views."""

from wide_env.sim.decode.kernel import FLOAT_FIELDS, INT_FIELDS
from wide_env.sim.decode.plan import TokenPlan
from wide_env.sim.decode.simulator import DecodeSimulator
from wide_env.sim.decode.state import DecodeState
from wide_env.sim.outcome import Outcome
from wide_env.sim.decode.view import LayerView

__all__ = ["DecodeSimulator", "DecodeState", "Outcome", "LayerView", "TokenPlan", "FLOAT_FIELDS", "INT_FIELDS"]
