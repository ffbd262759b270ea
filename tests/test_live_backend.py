"""The live backend (the shipped checkpoint run inside the env) agrees with the table backend."""

import numpy as np
import pytest

pytest.importorskip("torch")

from wide_env.envs.decode import WideMoEEnv  # noqa: E402


@pytest.fixture(scope="module")
def envs():
    return WideMoEEnv({"gating": {"backend": "live"}, "n_tokens": 3}), WideMoEEnv({"n_tokens": 3})


def test_topk_everywhere_reproduces_the_trace(envs):
    live, table = envs
    for seed in (0, 1):
        obs_live, _ = live.reset(seed=seed)
        obs_table, _ = table.reset(seed=seed)
        truncated = False
        while not truncated:
            for key in obs_live:  # live router outputs equal the recorded (float16) gates
                np.testing.assert_allclose(obs_live[key], obs_table[key], atol=2e-3, rtol=1e-3, err_msg=key)
            action = obs_table["topk_mask"].astype(np.int8)
            obs_live, r_live, _, truncated, info_live = live.step(action)
            obs_table, r_table, _, _, info_table = table.step(action)
            assert r_live == pytest.approx(r_table, rel=1e-3)
            if info_live["token_complete"]:
                assert info_live["accuracy_same"] == 1
                assert info_live["accuracy_correct"] == info_table["accuracy_correct"] == info_table["accuracy_full"]


@pytest.mark.parametrize("seed", range(6))
def test_single_perturbation_matches_effect_tables(envs, seed):
    live, table = envs
    rng = np.random.default_rng(seed)
    layer = int(rng.integers(0, 4))
    obs_live, _ = live.reset(seed=seed)
    obs_table, _ = table.reset(seed=seed)
    for step in range(4):  # token 0 only: later tokens would see the perturbed token's keys and values
        action = obs_live["topk_mask"].astype(np.int8)  # live Top-K (re-routed after a perturbation)
        if step == layer:
            topk = np.flatnonzero(action)
            action[topk[seed % 2]] = 0  # leave one Top-K expert out: served by the other or skipped
        obs_live, _, _, _, info_live = live.step(action)
        obs_table, _, _, _, info_table = table.step(action if step <= layer else obs_table["topk_mask"].astype(np.int8))
    assert info_live["token_complete"] == info_table["token_complete"] == 1
    assert info_live["accuracy_correct"] == info_table["accuracy_correct"]
    assert info_live["accuracy_same"] == info_table["accuracy_same"]


def test_live_backend_rejects_synthetic_source():
    from wide_env import ConfigError

    with pytest.raises(ConfigError, match="gating.backend"):
        WideMoEEnv({"gating": {"source": "synthetic", "backend": "live"}})


def test_measured_deviation_sits_next_to_the_estimate(envs):
    """With the live backend every step reports the layer output's real deviation from the full Top-K
    model's (measured_deviation): zero when the Top-K set runs, positive when a slot is skipped."""
    live, _ = envs
    obs, _ = live.reset(seed=4)
    obs, _, _, _, info = live.step(obs["topk_mask"].astype(np.int8))
    assert info["measured_deviation"] == pytest.approx(0.0, abs=1e-5) and info["deviation"] == 0.0
    action = obs["topk_mask"].astype(np.int8)
    action[np.flatnonzero(action)[-1]] = 0  # skip the 2nd Top-K expert
    _, _, _, _, info = live.step(action)
    assert info["measured_deviation"] > 0.0 and info["deviation"] > 0.0
