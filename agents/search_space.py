"""Search spaces of the sweeps: ``python -m agents.tune`` (Ray Tune) and ``python train.py --optimize`` (Optuna).

A space file (default ``agents/hyperparams/search_space.yml``) maps a space name (by default the algorithm)
to parameters. A parameter name is either a run setting of ``train.py`` - ``seed``, ``env`` or
``env_kwargs.<path>`` (e.g. ``env_kwargs.config.budget.scale``) - or a hyperparameter of
``agents/hyperparams/ALGO.yml``, dotted names reaching into nested keys
(``policy_kwargs.expert_set.hidden``). A parameter is

* ``{values: [a, b, c]}`` - categorical (numbers, strings, booleans);
* ``{low: x, high: y}`` with optional ``log: true`` and ``int: true`` - a range;

and may add ``grid: [...]``, the points a grid search visits. Grid search varies only the parameters that
have a ``grid`` (others keep the YAML value), so a grid is the explicit product the user wrote; model-based
search (Optuna) uses ``values`` / ``low``-``high``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from agents.common import HYPERPARAMS_DIR, UsageError

SEARCH_SPACE_FILE = HYPERPARAMS_DIR / "search_space.yml"
RUN_SETTINGS = ("seed", "env")  # plus env_kwargs.<path>
_KEYS = {"values", "low", "high", "log", "int", "grid"}
_SCALARS = (bool, int, float, str)


@dataclass(frozen=True)
class Param:
    """One searched parameter (see the module docstring for the YAML form)."""

    name: str
    values: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    grid: tuple | None = None

    def __post_init__(self):
        where = f"search space parameter {self.name!r}"
        ranged = self.low is not None or self.high is not None
        if self.values is not None and ranged:
            raise UsageError(f"{where}: give either 'values: [...]' or 'low'/'high', not both")
        if ranged and (self.low is None or self.high is None):
            raise UsageError(f"{where}: a range needs both 'low' and 'high'")
        if self.values is None and not ranged and self.grid is None:  # grid-only (e.g. seed) is allowed
            raise UsageError(f"{where}: give 'values: [...]', 'low' and 'high', or 'grid: [...]'")
        if self.values is not None:
            if not self.values or not all(isinstance(v, _SCALARS) for v in self.values):
                raise UsageError(f"{where}: 'values' must be a non-empty list of numbers, strings or booleans, "
                                 f"got {list(self.values)!r}")
        if self.low is not None:
            if not (isinstance(self.low, (int, float)) and isinstance(self.high, (int, float))
                    and math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
                raise UsageError(f"{where}: need finite numbers low < high, got low={self.low!r}, high={self.high!r}")
            if self.log and self.low <= 0:
                raise UsageError(f"{where}: 'log: true' needs low > 0, got {self.low!r}")
            if self.integer and not (float(self.low).is_integer() and float(self.high).is_integer()):
                raise UsageError(f"{where}: 'int: true' needs integer bounds, got {self.low!r}, {self.high!r}")
        if self.grid is not None and (not self.grid or not all(isinstance(v, _SCALARS) for v in self.grid)):
            raise UsageError(f"{where}: 'grid' must be a non-empty list of numbers, strings or booleans")
        if self.name.startswith("env_kwargs") and not self.name.startswith("env_kwargs."):
            raise UsageError(f"{where}: name env_kwargs fields by path, e.g. 'env_kwargs.config.budget.scale'")

    @classmethod
    def from_dict(cls, name: str, spec: Any) -> "Param":
        if not isinstance(spec, Mapping):
            raise UsageError(f"search space parameter {name!r}: expected a mapping such as "
                             f"{{values: [32, 64]}} or {{low: 1.0e-4, high: 1.0e-2, log: true}}, got {spec!r}")
        unknown = set(spec) - _KEYS
        if unknown:
            raise UsageError(f"search space parameter {name!r}: unknown keys {sorted(unknown)}; "
                             f"allowed: {sorted(_KEYS)}")
        tup = (lambda v: None if v is None else tuple(v))
        return cls(name=name, values=tup(spec.get("values")), low=spec.get("low"), high=spec.get("high"),
                   log=bool(spec.get("log", False)), integer=bool(spec.get("int", False)), grid=tup(spec.get("grid")))

    # ---- the two engines ------------------------------------------------------------------------------
    def tune_domain(self, search: str):
        """Ray Tune's sampling domain for this parameter (``None``: not searched under ``search``)."""
        from ray import tune

        if search == "grid":
            return None if self.grid is None else tune.grid_search(list(self.grid))
        if self.values is not None:
            return tune.choice(list(self.values))
        if self.low is None:
            return None
        if self.integer:
            lo, hi = int(self.low), int(self.high) + 1  # Tune's integer upper bound is exclusive
            return tune.lograndint(lo, hi) if self.log else tune.randint(lo, hi)
        return tune.loguniform(self.low, self.high) if self.log else tune.uniform(self.low, self.high)

    def suggest(self, trial) -> Any:
        """Optuna's suggestion for this parameter (``trial.suggest_*``)."""
        if self.values is not None:
            return trial.suggest_categorical(self.name, list(self.values))
        if self.low is None:  # grid-only parameter: GridSampler fixes it through suggest_categorical
            return trial.suggest_categorical(self.name, list(self.grid))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)


def load_space(name: str, path: str | Path | None = None) -> dict[str, Param]:
    """The space ``name`` of the YAML file ``path`` (default: the shipped ``search_space.yml``)."""
    import yaml

    path = Path(path) if path else SEARCH_SPACE_FILE
    if not path.exists():
        raise UsageError(f"search space file {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or name not in data:
        names = sorted(data) if isinstance(data, dict) else []
        raise UsageError(f"{path} has no search space {name!r}; spaces there: {names} (pick one with --space)")
    entries = data[name] or {}
    if not isinstance(entries, dict) or not entries:
        raise UsageError(f"{path}: space {name!r} must map parameter names to their ranges")
    return {k: Param.from_dict(k, v) for k, v in entries.items()}


def tune_param_space(space: Mapping[str, Param], search: str) -> dict:
    """Ray Tune's ``param_space`` (flat, dotted names) for ``search`` ('grid' or a sampler such as 'optuna')."""
    out = {name: p.tune_domain(search) for name, p in space.items()}
    out = {k: v for k, v in out.items() if v is not None}
    if not out:
        kind = "a 'grid' list" if search == "grid" else "'values' or 'low'/'high'"
        raise UsageError(f"no parameter of the search space has {kind}; nothing to search with --search {search}")
    return out


def optuna_grid(space: Mapping[str, Param]) -> dict[str, list]:
    """Optuna's GridSampler search space: every parameter with a ``grid``."""
    grid = {name: list(p.grid) for name, p in space.items() if p.grid is not None}
    if not grid:
        raise UsageError("--sampler grid: no parameter of the search space has a 'grid' list")
    return grid


def split_sample(sample: Mapping[str, Any]) -> tuple[dict, dict]:
    """A flat sample -> (run settings {seed, env, env_kwargs: nested}, nested hyperparameter overrides)."""
    run: dict[str, Any] = {}
    hyper: dict[str, Any] = {}
    for name, value in sample.items():
        if name in RUN_SETTINGS:
            run[name] = value
        elif name.startswith("env_kwargs."):
            _set_path(run.setdefault("env_kwargs", {}), name.split(".")[1:], value)
        else:
            _set_path(hyper, name.split("."), value)
    return run, hyper


def _set_path(d: dict, path: list[str], value: Any) -> None:
    for key in path[:-1]:
        d = d.setdefault(key, {})
        if not isinstance(d, dict):
            raise UsageError(f"search space parameter {'.'.join(path)!r} reaches into a non-mapping at {key!r}")
    d[path[-1]] = copy.deepcopy(value)
