"""Gating sources: where router probabilities, Top-K sets and mismatch tables come from.

This package reads configs by duck typing and imports no config module: :mod:`wide_env.config` imports it (to
read a trace's model fields), so the imports run one way (config -> gating -> profiles).
"""

from __future__ import annotations

import os

from wide_env.gating.base import GatingSource, TokenGates, topk_from_probs
from wide_env.gating.synthetic import SyntheticGating
from wide_env.gating.trace import TraceError, TraceGating, load_trace, save_trace, validate_trace
from wide_env.profiles import DEFAULT_PROFILE, profile_trace

__all__ = ["GatingSource", "TokenGates", "SyntheticGating", "TraceGating", "TraceError", "load_trace",
           "save_trace", "validate_trace", "topk_from_probs", "make_gating_source", "trace_model_fields",
           "TRACE_MODEL_FIELDS"]

#: model fields a gating trace determines (docs/trace-schema.md); a trace source's config takes them from it
TRACE_MODEL_FIELDS = ("n_layers", "n_experts", "top_k", "d_model", "routing")

_TRACE_CACHE: dict[tuple, TraceGating] = {}


def make_gating_source(config) -> GatingSource:
    """The source a :class:`~wide_env.config.WideConfig` asks for. Traces are cached per file version
    (read-only after loading), so many envs share one copy."""
    if config.gating.source == "synthetic":
        return SyntheticGating(config.model, config.gating)
    return _cached_trace(config.gating.trace_path or profile_trace(config.profile))


def trace_model_fields(trace_path: str | None) -> tuple[str, dict]:
    """(path, the model fields a trace determines: :data:`TRACE_MODEL_FIELDS`) of the trace at ``trace_path``
    (None: the default profile's); loads it through the same cache as the envs."""
    trace = _cached_trace(trace_path or profile_trace(DEFAULT_PROFILE))
    return trace.path, {name: getattr(trace, name) for name in TRACE_MODEL_FIELDS}


def _cached_trace(path: str) -> TraceGating:
    try:
        stat = os.stat(path)
        key = (os.path.abspath(path), stat.st_mtime_ns, stat.st_size)
    except OSError:
        raise TraceError(f"trace {path}: file not found (config field 'gating.trace_path')") from None
    if key not in _TRACE_CACHE:
        _TRACE_CACHE[key] = TraceGating(path)
    return _TRACE_CACHE[key]
