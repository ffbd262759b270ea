"""Adapters of the WIDE environments for other RL libraries (optional dependencies, imported on demand).

* :mod:`wide_env.integrations.rllib` - RLlib's new API stack (``pip install "ray[rllib]"``).
* :mod:`wide_env.integrations.sb3_vec` - a Stable-Baselines3 ``VecEnv`` over the batched cores (``pip install
  stable-baselines3``); it leaves torch's thread count to the caller.
"""
