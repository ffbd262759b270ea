"""Functions that build a dict of fixed keys as one dict display (``{'a': x[0], 'b': x[3:5]}``), for the single
env's every step: CPython builds a display of constant keys in one go (BUILD_CONST_KEY_MAP), about a fifth cheaper
than ``dict(zip(keys, values))`` for the step info's 30 keys and than a comprehension of slices for the
observation's. The keys are the env's own names (its outcome fields and observation layout), never user input.
"""

from __future__ import annotations

from typing import Callable


def dict_function(params: str, items: list[tuple[str, str]], prefix: str = "") -> Callable:
    """``def f(<params>): return <prefix>{key: expression, ...}`` compiled once; ``items``: (key, expression)
    in the dict's order, expressions over the parameters (indices and slices with literal bounds)."""
    for key, _ in items:
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"dict_function takes identifier keys, got {key!r}")
    display = ", ".join(f"{key!r}: {expression}" for key, expression in items)
    namespace: dict = {}
    exec(f"def f({params}):\n    return {prefix}{{{display}}}\n", namespace)  # noqa: S102  (fixed names, see above)
    return namespace["f"]
