"""The configuration's error type, in a module of its own: the simulator raises it too (a scenario a config
cannot build), and the simulator does not import the config package (the config validates its model names
against the simulator's registries, so imports run config -> sim)."""

from __future__ import annotations


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field and the fix."""
