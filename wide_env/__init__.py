"""wide-env: Gymnasium environments for wireless distributed Mixture-of-Experts inference (WIDE).

Importing the package registers its environments (idempotently), so both
``gym.make("wide_env/WideMoE-v0")`` after ``import wide_env`` and
``gym.make("wide_env:wide_env/WideMoE-v0")`` in a fresh process work.
"""

from wide_env.config import ConfigError, WideConfig
from wide_env.profiles import PROFILES
from wide_env.registration import ENVIRONMENTS, register_envs

__version__ = "0.1.0"

register_envs()

__all__ = ["WideConfig", "ConfigError", "PROFILES", "ENVIRONMENTS", "register_envs", "__version__"]
