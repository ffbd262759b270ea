"""Presets keep their settings when a user passes config=..., in gym.make and gym.make_vec; unknown env
keyword arguments raise TypeError (Python's convention)."""
import gymnasium as gym, wide_env, pytest
def test_preset_survives_user_config():
    env = gym.make("wide_env/WideMoE-Mixtral-v0", config={"budget": {"scale": 2}})
    cfg = env.unwrapped.config
    assert cfg.profile == "mixtral-8x7b" and cfg.budget.scale == 2
    env = gym.make("wide_env/WideMoE-Stragglers-v0", config={"n_tokens": 3})
    assert env.unwrapped.config.compute.queue_delay_mean_s == 0.002
    v = gym.make_vec("wide_env/WideMoE-Stragglers-v0", num_envs=2, vectorization_mode="vector_entry_point", config={"n_tokens": 3})
    assert v.config.compute.queue_delay_mean_s == 0.002 and v.config.n_tokens == 3
def test_unknown_kwarg_is_type_error():
    with pytest.raises(TypeError):
        gym.make("wide_env/WideMoE-v0", frameskip=4)
