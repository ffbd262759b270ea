"""The project's one deep merge of nested dicts: configs, presets, hyperparameters."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``update`` merged over ``base`` key by key (nested mappings merged, everything else replaced; a
    dataclass section becomes its dict). The project's one deep merge: configs, presets, hyperparameters."""
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in base.items()}
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            out[key] = dataclasses.asdict(value)
        else:
            out[key] = value
    return out
