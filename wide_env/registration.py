"""Gymnasium registration of the WIDE environments and their presets (idempotent)."""

from __future__ import annotations

import gymnasium as gym

# id -> (entry point, JSON-able kwargs). A preset's settings are registered under the keyword ``preset`` (a
# config dict), not ``config``: gym.make(id, config=...) replaces registered kwargs, and the envs merge the
# user's config over the preset, so a preset keeps its settings whatever the user passes.
ENVIRONMENTS = {
    "wide_env/WideMoE-v0": ("wide_env.envs.decode:WideMoEEnv", {}),
    "wide_env/WideMoE-Switch-v0": ("wide_env.envs.decode:WideMoEEnv", {"preset": {"profile": "switch-base-8"}}),
    "wide_env/WideMoE-Mixtral-v0": ("wide_env.envs.decode:WideMoEEnv", {"preset": {"profile": "mixtral-8x7b"}}),
    "wide_env/WideMoE-GptOss-v0": ("wide_env.envs.decode:WideMoEEnv", {"preset": {"profile": "gpt-oss-20b"}}),
    "wide_env/WideMoE-Stragglers-v0": ("wide_env.envs.decode:WideMoEEnv",
                                       {"preset": {"compute": {"queue_delay_mean_s": 0.002}}}),
    # 3GPP UMi link budget, a deployed model's payload over 10 MHz links, a 6 ms layer deadline and persistent,
    # uncertain helper queues on the shipped model: practical Top-K misses deadlines (docs/model.md#presets)
    "wide_env/WideMoE-Realistic-v0": ("wide_env.envs.decode:WideMoEEnv", {"preset": {
        "radio": {"link_budget": "3gpp", "payload_d_model": 4096, "bandwidth_hz": 1.0e7},
        "compute": {"queue_delay_mean_s": 0.0015, "queue_persistence": 0.7},
        "deadline": {"deadline_s": 0.006}}}),
    "wide_env/WideMoEPrefill-v0": ("wide_env.envs.prefill:WideMoEPrefillEnv", {"prompt_tokens": 8, "n_prompts": 1}),
    "wide_env/WideMoE-Synthetic-v0": ("wide_env.envs.decode:WideMoEEnv", {"preset": {"gating": {"source": "synthetic"}}}),
    # the regimes of baselines.benchmark (docs/model.md, "Profiles and registered presets")
    "wide_env/WideMoE-TokenBudget-v0": ("wide_env.envs.decode:WideMoEEnv", {"preset": {"budget": {"mode": "token"}}}),
    "wide_env/WideMoE-EpisodeBudget-v0": ("wide_env.envs.decode:WideMoEEnv",
                                          {"preset": {"budget": {"mode": "episode"}, "channel": {"doppler_hz": 2.0}}}),
    "wide_env/WideMoE-AccuracyObjective-v0": ("wide_env.envs.decode:WideMoEEnv",
                                              {"preset": {"reward": {"objective": "accuracy"},
                                                          "budget": {"mode": "token"}}}),
    # the accuracy objective measured on the model, with the model-state keys (what a per-step rule on the
    # trace's gating cannot see; baselines.model_state_policy is its analytic rule)
    "wide_env/WideMoE-ModelState-v0": ("wide_env.envs.decode:WideMoEEnv",
                                       {"preset": {"reward": {"objective": "accuracy"}, "budget": {"mode": "token"},
                                                   "gating": {"source": "trace", "accuracy": "model",
                                                              "model_state": True}}}),
}
# single-env entry point -> its batched vector env (gym.make_vec(..., vectorization_mode="vector_entry_point")).
VECTOR_ENTRY_POINTS = {"wide_env.envs.decode:WideMoEEnv": "wide_env.envs.vector:WideMoEVectorEnv",
                       "wide_env.envs.prefill:WideMoEPrefillEnv": "wide_env.envs.vector:WideMoEPrefillVectorEnv"}


def register_envs() -> None:
    for env_id, (entry_point, kwargs) in ENVIRONMENTS.items():
        if env_id in gym.registry:
            continue
        gym.register(id=env_id, entry_point=entry_point, vector_entry_point=VECTOR_ENTRY_POINTS.get(entry_point),
                     kwargs=kwargs, disable_env_checker=False)
