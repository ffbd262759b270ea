"""Gymnasium registration of the WIDE environments and their presets (idempotent)."""

from __future__ import annotations

import gymnasium as gym

# id -> (entry point, JSON-able kwargs). One preset per paper profile.
ENVIRONMENTS = {
    "wide_env/WideMoE-v0": ("wide_env.envs.decode:WideMoEEnv", {}),
    "wide_env/WideMoE-Switch-v0": ("wide_env.envs.decode:WideMoEEnv", {"config": {"profile": "switch-base-8"}}),
    "wide_env/WideMoE-Mixtral-v0": ("wide_env.envs.decode:WideMoEEnv", {"config": {"profile": "mixtral-8x7b"}}),
    "wide_env/WideMoE-GptOss-v0": ("wide_env.envs.decode:WideMoEEnv", {"config": {"profile": "gpt-oss-20b"}}),
    "wide_env/WideMoE-Synthetic-v0": ("wide_env.envs.decode:WideMoEEnv", {"config": {"gating": {"source": "synthetic"}}}),
}


def register_envs() -> None:
    for env_id, (entry_point, kwargs) in ENVIRONMENTS.items():
        if env_id in gym.registry:
            continue
        gym.register(id=env_id, entry_point=entry_point, kwargs=kwargs, disable_env_checker=False)
