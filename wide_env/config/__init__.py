"""Frozen, validated configuration of a WIDE scenario.

The package's modules, each with one job: :mod:`~wide_env.config.checks` (the error type, the declared ranges
and the checks every section uses), :mod:`~wide_env.config.sections` (the section dataclasses),
:mod:`~wide_env.config.wide_config` (:class:`WideConfig`: the whole tree, built from a profile and dicts) and
:mod:`~wide_env.config.merge` (the project's one deep merge). Import from ``wide_env.config``.

Every section is a frozen dataclass; :meth:`WideConfig.from_dict` builds the whole tree from plain,
JSON-able dicts (so ``gym.make(id, config={...})`` and YAML files work), starting from a named
profile (:mod:`wide_env.profiles`) and overriding only the keys given. Every invalid value raises
:class:`ConfigError` (a ``ValueError``) naming the field and how to fix it. Every numeric field declares
its physical range and the reason for it (``checks._range``), checked at construction; the ranges bound the
sizes too, so an absurd value is an error naming the limit, not a NaN, an inf or a MemoryError later.

Every field, its unit, default and provenance ([paper], [std], [choice], as tagged in ``sections.py``) is
documented in docs/model.md (section "Configuration reference", docs/model.md#config-reference).
"""

from wide_env.config.checks import ConfigError, Range
from wide_env.config.merge import deep_merge
from wide_env.config.sections import (_SECTIONS, BudgetConfig, ChannelConfig, ComputeConfig, DeadlineConfig,
                                      GatingConfig, ModelConfig, PlacementConfig, RadioConfig, RewardConfig)
from wide_env.config.wide_config import WideConfig

__all__ = ["ConfigError", "Range", "deep_merge", "WideConfig", "ModelConfig", "GatingConfig", "PlacementConfig",
           "ChannelConfig", "RadioConfig", "ComputeConfig", "DeadlineConfig", "BudgetConfig", "RewardConfig",
           "_SECTIONS"]
