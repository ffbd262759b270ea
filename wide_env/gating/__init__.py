"""Gating sources: where router probabilities, Top-K sets and mismatch tables come from."""

from __future__ import annotations

import os

from wide_env.gating.base import GatingSource, TokenGates, topk_from_probs
from wide_env.gating.synthetic import SyntheticGating
from wide_env.gating.trace import TraceError, TraceGating, load_trace, save_trace, validate_trace

__all__ = ["GatingSource", "TokenGates", "SyntheticGating", "TraceGating", "TraceError", "load_trace",
           "save_trace", "validate_trace", "topk_from_probs", "make_gating_source", "default_trace_path"]

_TRACE_CACHE: dict[tuple, TraceGating] = {}


def default_trace_path() -> str:
    """The trace shipped with the package (recorded from the project's own trained MoE model)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "moe_trace.npz")


def make_gating_source(config) -> GatingSource:
    """The source a :class:`~wide_env.config.WideConfig` asks for. Traces are cached per file version
    (read-only after loading), so many envs share one copy."""
    if config.gating.source == "synthetic":
        return SyntheticGating(config.model, config.gating)
    path = config.gating.trace_path or default_trace_path()
    try:
        stat = os.stat(path)
        key = (os.path.abspath(path), stat.st_mtime_ns, stat.st_size)
    except OSError:
        raise TraceError(f"trace {path}: file not found (config field 'gating.trace_path')") from None
    if key not in _TRACE_CACHE:
        _TRACE_CACHE[key] = TraceGating(path)
    return _TRACE_CACHE[key]
