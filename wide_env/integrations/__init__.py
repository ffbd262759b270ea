"""Adapters of the WIDE environments for other RL libraries (optional dependencies, imported on demand).

* :mod:`wide_env.integrations.rllib` - RLlib's new API stack (``pip install "ray[rllib]"``).
"""
