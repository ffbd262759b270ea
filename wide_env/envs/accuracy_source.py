"""Where a decoding env's real-accuracy figures come from, resolved once per env (docs/model.md#accuracy-sources).

:func:`resolve_accuracy_source` is the one place: the env front ends' batch (:mod:`wide_env.envs.batch`) calls
it at construction, attaches the model backend it names and reports it in ``problem.accuracy_source``. An explicit
request that the config or the gating source cannot honour (``gating.accuracy = "rule"`` or ``"model"`` without
effect tables, ``"model"`` without the trace's token ids or a checkpoint) is a ConfigError naming the field and
the fix, never a silent "none".
"""

from __future__ import annotations

import importlib.util
import warnings

from wide_env.config import ConfigError
from wide_env.profiles import accuracy_rule_validated, profile_checkpoint

#: what each accuracy source means, for tables and plots
ACCURACY_SOURCES = {"live": "measured on the live model (gating.backend = 'live')",
                    "model": "measured on the model: the checkpoint decodes each token with the executed experts "
                             "(exactly what the live model gives for them)",
                    "rule": "the logit-effect rule of the trace (agrees with the live model, docs/real-model.md)",
                    "rule_unvalidated": "the logit-effect rule of the trace, NOT validated for this profile, trace "
                                        "or scenario (measured: +1 to +4 points on tiny's scenarios with lost "
                                        "experts or token / episode budgets, up to +20 on the deep paper-profile "
                                        "models; docs/real-model.md); gating.accuracy = 'model' measures it (needs "
                                        "torch and the trace's checkpoint)",
                    "none": "not available for this gating source"}

_WARNED_UNVALIDATED: set[str] = set()


def checkpoint_dir_of(config) -> str | None:
    """The checkpoint the model accuracy and the live backend run: ``gating.checkpoint_dir``, else the
    profile's shipped model for the profile's shipped trace; None for a user's trace without a checkpoint."""
    if config.gating.checkpoint_dir is not None:
        return config.gating.checkpoint_dir
    return profile_checkpoint(config.profile) if config.gating.trace_path is None else None


def accuracy_source_of(config, source=None) -> str:
    """Where a decoding config's accuracy figures come from (a key of :data:`ACCURACY_SOURCES`; ``source`` the
    gating source, for "auto": the model needs its text), warning once per profile where they come from a
    rule not validated against the live model."""
    g = config.gating
    if g.backend == "live":
        return "live"
    if g.accuracy == "model":
        return "model"
    validated = accuracy_rule_validated(config)
    if g.accuracy == "auto" and not validated and importlib.util.find_spec("torch") is not None \
            and checkpoint_dir_of(config) is not None \
            and getattr(source, "token_id", None) is not None and getattr(source, "target_id", None) is not None:
        return "model"
    if validated:
        return "rule"
    if config.profile not in _WARNED_UNVALIDATED:  # once per profile and process: envs are made by the hundred
        _WARNED_UNVALIDATED.add(config.profile)
        warnings.warn(f"profile {config.profile!r} (in this scenario): accuracy in info comes from "
                      f"{ACCURACY_SOURCES['rule_unvalidated']}", UserWarning, stacklevel=3)
    return "rule_unvalidated"


def resolve_accuracy_source(sim) -> str:
    """The accuracy source of a simulator's episodes (a key of :data:`ACCURACY_SOURCES`); "none" for the prefill
    simulator and for sources without effect tables under ``gating.accuracy = "auto"``. Raises ConfigError
    where an explicit request cannot be honoured."""
    if not hasattr(sim, "has_accuracy"):
        return "none"  # the prefill simulator (its construction rejects the accuracy fields)
    config, source = sim.config, sim.source
    g = config.gating
    has_text = getattr(source, "token_id", None) is not None and getattr(source, "target_id", None) is not None
    if g.backend == "live":
        if not has_text:
            raise ConfigError("config field 'gating.backend' = 'live' replays a trace's text: the trace has no "
                              "'token_id' / 'target_id' (re-export it with python -m wide_env.models.export) or use "
                              "gating.backend = 'table'")
        return "live"
    if not sim.has_accuracy:
        if g.accuracy != "auto":
            raise ConfigError(f"config field 'gating.accuracy' = {g.accuracy!r} needs a gating trace with logit-effect "
                              "tables (the shipped traces have them; re-export a trace with python -m "
                              "wide_env.models.export); this source has none: set gating.accuracy = 'auto' (no "
                              "accuracy figures)")
        return "none"
    resolved = accuracy_source_of(config, source)
    if resolved == "model":
        if not has_text:
            raise ConfigError("config field 'gating.accuracy' = 'model' decodes the trace's text: the trace has no "
                              "'token_id' / 'target_id' (re-export it with python -m wide_env.models.export) or set "
                              "gating.accuracy = 'rule'")
        if checkpoint_dir_of(config) is None:
            raise ConfigError("config field 'gating.accuracy' = 'model' with a user's trace (gating.trace_path) needs "
                              "gating.checkpoint_dir: the checkpoint the trace was exported from (or set "
                              "gating.accuracy = 'rule')")
    return resolved
