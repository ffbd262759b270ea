"""wide-env: Gymnasium environments for wireless distributed Mixture-of-Experts inference (WIDE).

Importing the package registers its environments (idempotently), so both
``gym.make("wide_env/WideMoE-v0")`` after ``import wide_env`` and
``gym.make("wide_env:wide_env/WideMoE-v0")`` in a fresh process work.
"""

from wide_env.config import ConfigError, WideConfig
from wide_env.profiles import PROFILES
from wide_env.registration import ENVIRONMENTS, register_envs

__version__ = "0.1.0"

#: the top-level packages wide-env installs besides wide_env, and a module that only wide-env's has
SIBLING_PACKAGES = {"baselines": "siftmoe.py", "agents": "registry.py"}


def _check_sibling_packages() -> None:
    """wide-env installs ``baselines`` and ``agents`` as top-level packages (the project's layout); another
    distribution with the same names (OpenAI Baselines installs ``baselines``) overwrites or shadows them.
    Warn when either name resolves to a package that is not wide-env's (nothing is imported to check)."""
    import importlib.util
    import os
    import warnings

    ours = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name, marker in SIBLING_PACKAGES.items():
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            continue
        locations = list(spec.submodule_search_locations or [])
        if any(os.path.isfile(os.path.join(loc, marker)) for loc in locations):
            continue
        where = locations[0] if locations else spec.origin
        warnings.warn(
            f"'import {name}' resolves to {where}, which is not wide-env's {name} package (expected next to "
            f"wide_env, e.g. {os.path.join(ours, name)}): another distribution uses the same top-level name "
            f"(OpenAI Baselines installs 'baselines') and shadows or overwrote it, so wide-env's "
            f"{name} cannot be imported. Install wide-env in a virtual environment without that distribution "
            f"(pip uninstall it there), then reinstall wide-env.", UserWarning, stacklevel=3)


_check_sibling_packages()
register_envs()

__all__ = ["WideConfig", "ConfigError", "PROFILES", "ENVIRONMENTS", "register_envs", "__version__"]
