"""baselines.information_headroom: the exploration data, the flip models' fit and features, the skip rule."""
import json

import gymnasium as gym
import numpy as np
import pytest

import wide_env  # noqa: F401
from baselines.information_headroom import (ENV_ID, L2_GRID, FlipPricedSkip, LogisticModel, collect_skip_samples,
                                            decision_features, fit_logistic, information_headroom,
                                            skip_compounding)
from baselines.lagrangian import energy_model_config
from baselines.observation import parse_observation, problem_of
from baselines.span_stats import span_statistics


@pytest.fixture(scope="module")
def samples():
    return collect_skip_samples(ENV_ID, episodes=12, seed=123)


@pytest.fixture(scope="module")
def env():
    e = gym.make(ENV_ID)
    yield e
    e.close()


def test_logistic_fit_is_the_regularised_optimum_and_recovers_the_weights():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100_000, 3)) * [1.0, 2.0, 0.5] + [0.0, 1.0, -1.0]
    w_true, b_true = np.array([1.5, -0.5, 2.0]), -1.0
    y = (rng.random(100_000) < 1 / (1 + np.exp(-(x @ w_true + b_true)))).astype(float)
    l2 = 1e-3
    model = fit_logistic(x, y, l2=l2)
    # back in raw units the weights are close to the generating ones
    w_raw = model.w / model.sd
    b_raw = model.b - (model.mean / model.sd) @ model.w
    np.testing.assert_allclose(w_raw, w_true, atol=0.1)
    assert abs(b_raw - b_true) < 0.1
    # first-order optimality of the objective it states (standardised features, unpenalised intercept)
    z = (x - model.mean) / model.sd
    p = model.predict(x)
    np.testing.assert_allclose(z.T @ (p - y) / len(y) + l2 * model.w, 0.0, atol=1e-8)
    assert abs(np.mean(p - y)) < 1e-8
    # no other weights do better on the same objective
    def objective(w, b):
        zz = z @ w + b
        return np.mean(np.logaddexp(0, zz) - y * zz) + l2 / 2 * w @ w
    best = objective(model.w, model.b)
    for _ in range(20):
        assert objective(model.w + rng.normal(scale=0.01, size=3), model.b + rng.normal(scale=0.01)) > best


def test_logistic_constant_column_and_bad_input():
    x = np.column_stack([np.ones(50), np.arange(50.0)])
    y = (np.arange(50) > 25).astype(float)
    model = fit_logistic(x, y)
    assert model.w[0] == 0.0 and np.isfinite(model.log_loss(x, y))
    with pytest.raises(ValueError, match="y 0 or 1"):
        fit_logistic(x, y * 2)
    with pytest.raises(ValueError, match="l2 must be > 0"):
        fit_logistic(x, y, l2=0.0)
    with pytest.raises(ValueError, match=r"expected x \(n, F\)"):
        fit_logistic(x[:, 0], y)


def test_samples_one_per_token_deterministic_and_half_skipped(samples, env):
    problem = problem_of(env)
    assert samples["same"].shape == (12 * problem.n_tokens,)
    assert set(np.unique(samples["same"])) <= {0.0, 1.0}
    assert 0.3 < samples["skipped"].mean() < 0.7
    # the perturbed layer is uniform over the layers
    layers = np.rint(samples["position"][:, 0] * (problem.n_layers - 1))
    assert set(np.unique(layers)) == set(range(problem.n_layers))
    again = collect_skip_samples(ENV_ID, episodes=12, seed=123)
    for key, value in samples.items():
        np.testing.assert_array_equal(again[key], value)
    with pytest.raises(ValueError, match="episodes must be an integer >= 1"):
        collect_skip_samples(ENV_ID, episodes=0)


def test_features_layer_blocks(samples, env):
    problem = problem_of(env)
    L, E, K = problem.n_layers, problem.n_experts, problem.top_k
    a = {k: samples[k] for k in problem.obs_slices}
    dev = decision_features(a, problem, "deviation")
    obs = decision_features(a, problem, "observation")
    n = samples["same"].size
    assert dev.shape == (n, 2 * L)
    assert obs.shape == (n, 2 * L + L * (E + 2 + 4))  # expert one-hot, two weights, four model-state keys
    layer = np.rint(a["position"][:, 0] * (L - 1)).astype(int)
    np.testing.assert_array_equal(dev[np.arange(n), layer], 1.0)
    assert dev[:, :L].sum() == n
    # the deviation column of the decision's own layer is the 2nd slot's skip deviation
    skip_dev = a["deviation_table"].reshape(n, K, E + 1)[:, 1, E]
    np.testing.assert_allclose(dev[np.arange(n), L + layer], skip_dev)
    np.testing.assert_array_equal(obs[:, :2 * L], dev)
    with pytest.raises(ValueError, match="features must be one of"):
        decision_features(a, problem, "everything")


def test_flip_priced_skip_ends(env):
    problem = problem_of(env)
    stats = span_statistics(energy_model_config(env.unwrapped.config), 4)
    model = LogisticModel(np.zeros(2 * problem.n_layers), 0.0, np.zeros(2 * problem.n_layers),
                          np.ones(2 * problem.n_layers))  # P(flip) = 1/2 everywhere
    never = FlipPricedSkip(problem, model=model, features="deviation", stats=stats, theta=1e12)
    always = FlipPricedSkip(problem, model=model, features="deviation", stats=stats, theta=0.0)
    obs, _ = env.reset(seed=5)
    for _ in range(12):
        a, _ = parse_observation(obs, problem)
        topk = (obs["topk_mask"] > 0.5)
        np.testing.assert_array_equal(never(obs).astype(bool), topk)
        skipped = topk & ~always(obs).astype(bool)
        assert skipped.sum() == 1  # exactly the expert with the smaller combine weight
        weights = np.where(topk, obs["topk_weight"], -1)
        assert obs["topk_weight"][skipped][0] == np.sort(weights)[-2]
        obs, *_ = env.step(never(obs))
    with pytest.raises(ValueError, match="theta must be a finite number >= 0"):
        FlipPricedSkip(problem, model=model, features="deviation", stats=stats, theta=-1.0)


def test_information_headroom_end_to_end_small():
    result = information_headroom(episodes=40, test_episodes=3, thetas=(0.0, 1e12), n_boot=20)
    assert set(result["log_loss"]) == {"constant", "deviation", "observation"}
    assert set(result["l2"]) == {"deviation", "observation"} and set(result["l2"].values()) <= set(L2_GRID)
    assert [r["policy"] for r in result["rules"]] == ["topk", "deviation theta=0", "deviation theta=1e+12",
                                                      "observation theta=0", "observation theta=1e+12"]
    topk, dev_skip, dev_never = result["rules"][:3]
    # theta huge: never skip (Top-K's energy); theta 0: skip every 2nd slot (less energy)
    assert dev_never["energy_per_token_j"] == pytest.approx(topk["energy_per_token_j"])
    assert dev_skip["energy_per_token_j"] < topk["energy_per_token_j"]
    assert len(result["energy_ratio_at_agreement"]) == len(result["levels"]) == len(result["ci95"])


def test_residual_samples_are_the_decoders_stream_and_extend_the_observation_features():
    data = collect_skip_samples(ENV_ID, episodes=3, seed=7, residual=True)
    plain = collect_skip_samples(ENV_ID, episodes=3, seed=7)
    for key, value in plain.items():  # recording the stream changes nothing else
        np.testing.assert_array_equal(data[key], value)
    env = gym.make(ENV_ID)
    problem = problem_of(env)
    decoder = env.unwrapped.episode_batch.model.decoder
    d = decoder.x.shape[1]
    n = data["same"].size
    assert data["residual"].shape == (n, d) and np.isfinite(data["residual"]).all()
    # the first sample is the stream at the first token's perturbed layer: replay the same actions to it
    rng = np.random.default_rng(7)
    chosen, skip = int(rng.integers(problem.n_layers)), bool(rng.random() < 0.5)
    obs, _ = env.reset(seed=7)
    for layer in range(chosen):
        obs, *_ = env.step((obs["topk_mask"] > 0.5).astype(np.int8))
    np.testing.assert_array_equal(data["residual"][0], np.asarray(decoder.x[0], np.float64))
    env.close()
    a = {k: data[k] for k in (*problem.obs_slices, "residual")}
    obs_features = decision_features(a, problem, "observation")
    res = decision_features(a, problem, "residual")
    L, E = problem.n_layers, problem.n_experts
    assert res.shape == (n, 2 * L + L * (E + 2 + 4 + d))
    layer = np.rint(a["position"][:, 0] * (L - 1)).astype(int)
    block = res[:, 2 * L:].reshape(n, L, E + 2 + 4 + d)
    np.testing.assert_array_equal(block[np.arange(n), layer, E + 6:], data["residual"])
    np.testing.assert_array_equal(res[:, :2 * L], obs_features[:, :2 * L])
    with pytest.raises(ValueError, match="need samples collected with residual=True"):
        decision_features(plain, problem, "residual")
    with pytest.raises(ValueError, match="has no residual stream"):
        collect_skip_samples("wide_env/WideMoE-v0", episodes=1, residual=True)


def test_skip_compounding_counts_and_independence_prediction():
    result = skip_compounding(ENV_ID, episodes=20, probability=0.5, seed=11)
    env = gym.make(ENV_ID)
    problem = problem_of(env)
    env.close()
    assert result["tokens"] == 20 * problem.n_tokens
    assert sum(r["tokens"] for r in result["rows"]) == result["tokens"]
    assert all(0 <= r["skips"] <= problem.n_layers and 0.0 <= r["flip_rate"] <= 1.0 for r in result["rows"])
    zero = next(r for r in result["rows"] if r["skips"] == 0)
    assert zero["independent"] == pytest.approx(zero["flip_rate"]) == pytest.approx(result["no_skip_flip_rate"])
    one = next(r for r in result["rows"] if r["skips"] == 1)
    # with one skip the independence prediction is the single-skip rates themselves, averaged over the tokens
    assert one["independent"] == pytest.approx(one["flip_rate"])
    assert skip_compounding(ENV_ID, episodes=20, probability=0.5, seed=11)["rows"] == result["rows"]
    with pytest.raises(ValueError, match=r"probability must be in \(0, 1\)"):
        skip_compounding(ENV_ID, episodes=1, probability=1.0)


def test_information_headroom_residual_reports_its_log_loss_only():
    result = information_headroom(episodes=40, test_episodes=2, thetas=(1e12,), n_boot=5, residual=True)
    assert set(result["log_loss"]) == {"constant", "deviation", "observation", "residual"}
    assert np.isfinite(result["log_loss"]["residual"]) and result["l2"]["residual"] in L2_GRID
    assert not any(r["policy"].startswith("residual") for r in result["rules"])  # no policy observes the stream


def test_flip_priced_skip_history_factors_remember_the_tokens_skips(env):
    problem = problem_of(env)
    L = problem.n_layers
    stats = span_statistics(energy_model_config(env.unwrapped.config), 4)
    half = LogisticModel(np.zeros(2 * L), 0.0, np.zeros(2 * L), np.ones(2 * L))  # P(flip) = 1/2
    plain = FlipPricedSkip(problem, model=half, features="deviation", stats=stats, theta=1e6)
    same = FlipPricedSkip(problem, model=half, features="deviation", stats=stats, theta=1e6, history_factors=[1.0])
    # after the token's first skip every later 2nd slot is free; the first skip only where the saving beats theta/2
    free = FlipPricedSkip(problem, model=half, features="deviation", stats=stats, theta=0.0,
                          history_factors=[1.0, 0.0])
    never_then_free = FlipPricedSkip(problem, model=half, features="deviation", stats=stats, theta=1e12,
                                     history_factors=[1.0, 0.0])
    obs, _ = env.reset(seed=9)
    for step in range(3 * L):
        np.testing.assert_array_equal(plain(obs), same(obs))
        topk = obs["topk_mask"] > 0.5
        assert (topk & ~free(obs).astype(bool)).sum() == 1  # theta 0: skips at once, then free
        np.testing.assert_array_equal(never_then_free(obs).astype(bool), topk)  # never a first skip
        obs, *_ = env.step(topk.astype(np.int8))
    # the count restarts with each token: theta huge after a first skip forced at layer 0 only
    forced = FlipPricedSkip(problem, model=half, features="deviation", stats=stats, theta=1e12,
                            history_factors=[1.0, 0.0])
    obs, _ = env.reset(seed=9)
    forced._skipped = np.ones(1, np.int64)
    for step in range(2 * L):
        if step % L == 0:
            # a token starts: the count carried from the last token (1) is cleared, so no skip at theta huge ...
            np.testing.assert_array_equal(forced(obs).astype(bool), obs["topk_mask"] > 0.5)
            assert forced._skipped.tolist() == [0]
            forced._skipped[:] = 1  # ... pretend one happened: the token's later layers skip their 2nd slot
        else:
            skipped = (obs["topk_mask"] > 0.5) & ~forced(obs).astype(bool)
            assert skipped.sum() == 1
        obs, *_ = env.step((obs["topk_mask"] > 0.5).astype(np.int8))
    forced.reset()
    assert forced._skipped is None
    with pytest.raises(ValueError, match="history_factors must be a non-empty list"):
        FlipPricedSkip(problem, model=half, features="deviation", stats=stats, theta=1.0, history_factors=[])
    with pytest.raises(ValueError, match="history_factors must be a non-empty list"):
        FlipPricedSkip(problem, model=half, features="deviation", stats=stats, theta=1.0, history_factors=[-1.0])


def test_marginal_factors():
    from baselines.information_headroom import _marginal_factors

    rows = [{"skips": c, "tokens": t, "flip_rate": f} for c, t, f in
            [(0, 1000, 0.01), (1, 1000, 0.05), (2, 1000, 0.07), (3, 500, 0.10), (4, 10, 0.5)]]
    assert _marginal_factors(rows) == pytest.approx([1.0, 0.5, 0.75])  # 4 skips: too few tokens
    assert _marginal_factors(rows[:1]) == [1.0]
    assert _marginal_factors([{"skips": 0, "tokens": 999, "flip_rate": 0.1},
                              {"skips": 1, "tokens": 999, "flip_rate": 0.1}]) == [1.0]


def test_cli_compounding_writes_its_files_and_rejects_bad_factors(tmp_path, capsys):
    from baselines.information_headroom import main

    result = main(["--episodes", "4", "--compounding", "0.3", "--out", str(tmp_path)])
    assert (tmp_path / "skip_compounding.md").read_text().startswith("skips compounding on")
    assert json.loads((tmp_path / "skip_compounding.json").read_text())["rows"] == result["rows"]
    assert "CPU-s" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--history-factors", "1,a"])
    assert "--history-factors: comma-separated numbers" in capsys.readouterr().err
