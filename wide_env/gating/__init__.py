"""Gating sources: where router probabilities, Top-K sets and mismatch tables come from."""

from __future__ import annotations

import os

from wide_env.gating.base import GatingSource, TokenGates, topk_from_probs
from wide_env.gating.synthetic import SyntheticGating
from wide_env.gating.trace import TraceError, TraceGating, load_trace, save_trace, validate_trace

__all__ = ["GatingSource", "TokenGates", "SyntheticGating", "TraceGating", "TraceError", "load_trace",
           "save_trace", "validate_trace", "topk_from_probs", "make_gating_source", "default_trace_path",
           "trace_model_fields"]

_TRACE_CACHE: dict[tuple, TraceGating] = {}


def default_trace_path() -> str:
    """The trace shipped with the package (recorded from the project's own trained MoE model)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "moe_trace.npz")


def profile_trace(profile: str) -> str:
    """The profile's shipped trace (:func:`wide_env.profiles.profile_trace`)."""
    from wide_env.profiles import profile_trace as trace_of

    return trace_of(profile)


def make_gating_source(config) -> GatingSource:
    """The source a :class:`~wide_env.config.WideConfig` asks for. Traces are cached per file version
    (read-only after loading), so many envs share one copy."""
    if config.gating.source == "synthetic":
        return SyntheticGating(config.model, config.gating)
    return _cached_trace(config.gating.trace_path or profile_trace(config.profile))


def trace_model_fields(trace_path: str | None) -> tuple[str, dict]:
    """(path, the model fields a trace determines: n_layers, n_experts, top_k, d_model, routing) of the trace
    at ``trace_path`` (None: the shipped one); loads it through the same cache as the envs."""
    trace = _cached_trace(trace_path)
    return trace.path, {"n_layers": trace.n_layers, "n_experts": trace.n_experts, "top_k": trace.top_k,
                        "d_model": trace.d_model, "routing": trace.routing}


def _cached_trace(trace_path: str | None) -> TraceGating:
    path = trace_path or default_trace_path()
    try:
        stat = os.stat(path)
        key = (os.path.abspath(path), stat.st_mtime_ns, stat.st_size)
    except OSError:
        raise TraceError(f"trace {path}: file not found (config field 'gating.trace_path')") from None
    if key not in _TRACE_CACHE:
        _TRACE_CACHE[key] = TraceGating(path)
    return _TRACE_CACHE[key]
