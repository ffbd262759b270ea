"""The configuration's error type and the checks every section uses: declared ranges (:func:`_range`, each
with the reason for it), numbers, choices and flags. Every failure is a :class:`ConfigError` naming the field."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from wide_env.errors import ConfigError  # re-exported as wide_env.config.ConfigError


def _fail(path: str, value: Any, fix: str) -> None:
    raise ConfigError(f"config field '{path}' = {value!r} is invalid: {fix}")


@dataclass(frozen=True)
class Range:
    """The physical (or practical) range of a numeric config field, and why it is that range."""

    low: float
    high: float
    reason: str
    integer: bool = False

    def describe(self) -> str:
        return f"[{self.low:g}, {self.high:g}]"


def _range(default: Any, low: float, high: float, reason: str, *, integer: bool = False, items: bool = False):
    """A dataclass field with its range in the metadata (``items``: the range of each entry of a sequence)."""
    return field(default=default, metadata={"items_range" if items else "range": Range(low, high, reason, integer)})


def _plain_number(value: Any) -> Any:
    """A numpy scalar (``np.int64(8)``, ``np.float32(2)``) as the Python int or float it stands for (a sweep's
    ``for n in np.arange(...)`` gives them); bools and everything else unchanged."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, np.generic):
        return value
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def _check_number(path: str, value: Any, rng: Range) -> Any:
    """Check ``value`` against ``rng``; returns it as a plain Python number (numpy scalars are numbers too)."""
    kind = "an integer" if rng.integer else "a number"
    value = _plain_number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(path, value, f"expected {kind} in {rng.describe()}")
    if not math.isfinite(value):
        _fail(path, value, f"expected a finite number in {rng.describe()}")
    if rng.integer and not float(value).is_integer():
        _fail(path, value, f"expected an integer in {rng.describe()}")
    if not rng.low <= value <= rng.high:
        _fail(path, value, f"must be in {rng.describe()}: {rng.reason}")
    return value


def _check_ranges(section: Any, path: str) -> None:
    """Check every field of ``section`` that declares a range (None passes where the default is None)."""
    for f in fields(section):
        value = getattr(section, f.name)
        name = f"{path}.{f.name}" if path else f.name
        if value is None and f.default is None:
            continue
        if "range" in f.metadata:
            plain = _check_number(name, value, f.metadata["range"])
        elif "items_range" in f.metadata:
            if not isinstance(value, (list, tuple)):
                _fail(name, value, f"expected a list of numbers in {f.metadata['items_range'].describe()}")
            plain = type(value)(_check_number(f"{name}[{i}]", item, f.metadata["items_range"])
                                for i, item in enumerate(value))
        else:
            continue
        if plain is not value:  # store numpy scalars as the Python numbers they are (to_dict stays JSON-able)
            object.__setattr__(section, f.name, plain)


def _check_choice(path: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(path, value, f"choose one of {list(choices)}")


def _check_flag(path: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(path, value, "expected true or false")
