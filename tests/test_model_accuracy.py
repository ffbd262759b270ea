"""Model accuracy (gating.accuracy = "model", the default on the deep paper profiles): the checkpoint decodes
every token with the experts that executed in time; the figures must be the live model's for the same
selections, in the single env and in every row of the native vector env."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import gymnasium as gym  # noqa: E402

import wide_env  # noqa: E402,F401
from wide_env.config import ConfigError  # noqa: E402

ACCURACY = ("accuracy_correct", "accuracy_same", "accuracy_full", "delta_loss")


def _random_masks(env_id: str, config: dict, episodes: int, seed: int = 100, p_keep: float = 0.6) -> list[dict]:
    """Per completed token: its accuracy fields, under executed masks drawn independently of the observations
    (so two envs with different gating in their observations execute the same experts)."""
    env = gym.make(env_id, config=config)
    rng = np.random.default_rng(5)
    E = env.action_space.n
    tokens = []
    for ep in range(episodes):
        env.reset(seed=seed + ep)
        done = False
        while not done:
            _, reward, term, trunc, info = env.step((rng.random(E) < p_keep).astype(np.int8))
            if info["token_complete"]:
                tokens.append({"reward": reward, **{k: info[k] for k in ACCURACY + (
                    "reward_accuracy", "reward_energy", "reward_deviation", "reward_deadline")}})
            done = term or trunc
    return tokens


@pytest.mark.parametrize("env_id,episodes", [("wide_env/WideMoE-Switch-v0", 6), ("wide_env/WideMoE-Mixtral-v0", 3),
                                             ("wide_env/WideMoE-GptOss-v0", 3)])
def test_model_accuracy_is_the_live_models_for_the_same_selections(env_id, episodes):
    """Same seeds and executed masks: the table env's model accuracy equals the live backend's token by token
    (the live backend shows the live router's gating, which these masks ignore), though the selections
    perturb the model (accuracy well below the full model's)."""
    model = _random_masks(env_id, {"gating": {"accuracy": "model"}}, episodes)
    live = _random_masks(env_id, {"gating": {"backend": "live"}}, episodes)
    assert len(model) == len(live) > 0
    for m, lv in zip(model, live):
        assert (m["accuracy_correct"], m["accuracy_same"], m["accuracy_full"]) == \
            (lv["accuracy_correct"], lv["accuracy_same"], lv["accuracy_full"])
        assert m["delta_loss"] == pytest.approx(lv["delta_loss"], abs=1e-4)
    assert np.mean([m["accuracy_same"] for m in model]) < 0.9  # the masks do change predictions


def test_model_accuracy_matches_an_independent_replay():
    """The env's figures equal the checkpoint's full-sequence forward pass with the same executed masks
    (modeltools.live.replay_executed: a different code path from the decoder's KV-cached steps)."""
    from wide_env.modeltools.live import replay_executed
    from wide_env.models.moe_lm import load_checkpoint
    from wide_env.profiles import profile_checkpoint

    env = gym.make("wide_env/WideMoE-Mixtral-v0", config={"deadline": {"enforce": False}})
    u = env.unwrapped
    L, E, n = u.sim.n_layers, u.sim.n_experts, u.sim.n_tokens
    rng = np.random.default_rng(3)
    model, _ = load_checkpoint(profile_checkpoint("mixtral-8x7b"))
    src = u.sim.source
    for seed in (1, 2):
        env.reset(seed=seed)
        start = u.trace_start
        masks = rng.random((n, L, E)) < 0.7
        got = []
        for t in range(n):
            for layer in range(L):
                _, _, _, _, info = env.step(masks[t, layer].astype(np.int8))
            got.append((info["accuracy_correct"], info["delta_loss"]))
        window = int(np.flatnonzero(src.doc_start[: start + 1])[-1])
        ref = replay_executed(model, src.mismatch, src.token_id[window:start + n], src.target_id[window:start + n],
                              start - window, masks)
        full = replay_executed(model, src.mismatch, src.token_id[window:start + n], src.target_id[window:start + n],
                               start - window, np.ones((n, L, E), bool))
        assert [c for c, _ in got] == ref["correct"].astype(int).tolist()
        np.testing.assert_allclose([d for _, d in got], ref["nll"] - full["nll"], atol=1e-4)


def test_vector_env_rows_are_single_envs():
    """Sub-env b of the native vector env (model accuracy, one stream per row) reports what a single env
    seeded the same reports."""
    env_id, B, seeds = "wide_env/WideMoE-Switch-v0", 3, [11, 12, 13]
    cfg = {"n_tokens": 3}
    vec = gym.make_vec(env_id, num_envs=B, vectorization_mode="vector_entry_point", config=cfg)
    singles = [gym.make(env_id, config=cfg) for _ in range(B)]
    assert vec.unwrapped.problem.accuracy_source == "model"
    vec.reset(seed=seeds)
    for env, s in zip(singles, seeds):
        env.reset(seed=s)
    rng = np.random.default_rng(0)
    E = singles[0].action_space.n
    steps = singles[0].unwrapped.sim.n_layers * 3
    completed = 0
    for _ in range(steps):
        actions = (rng.random((B, E)) < 0.5).astype(np.int8)
        _, _, _, _, vinfo = vec.step(actions)
        for b, env in enumerate(singles):
            _, _, _, _, info = env.step(actions[b])
            if info["token_complete"]:
                completed += 1
                for key in ACCURACY[:3]:
                    assert vinfo[key][b] == info[key], key
                # a batched float32 pass rounds differently from a single row's (~1e-6 nats)
                assert vinfo["delta_loss"][b] == pytest.approx(info["delta_loss"], abs=1e-4)
    assert completed == B * 3


def test_same_seed_same_accuracy():
    a = _random_masks("wide_env/WideMoE-Switch-v0", {}, 2, seed=7)
    b = _random_masks("wide_env/WideMoE-Switch-v0", {}, 2, seed=7)
    assert a == b


def test_accuracy_objective_rewards_the_measured_loss():
    """reward.objective = 'accuracy' with model accuracy: the token's reward term is -weight x the measured
    loss change, and the reward is the sum of its terms."""
    cfg = {"reward": {"objective": "accuracy", "accuracy_weight": 3.0}}
    model = _random_masks("wide_env/WideMoE-Switch-v0", cfg, 2)
    live = _random_masks("wide_env/WideMoE-Switch-v0", {**cfg, "gating": {"backend": "live"}}, 2)
    for m, lv in zip(model, live):
        assert m["reward_accuracy"] == pytest.approx(-3.0 * m["delta_loss"])
        assert m["reward"] == pytest.approx(m["reward_energy"] + m["reward_deviation"] + m["reward_deadline"]
                                            + m["reward_accuracy"])
        assert m["reward_accuracy"] == pytest.approx(lv["reward_accuracy"], abs=1e-3)


def test_config_errors_name_the_field_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"gating\.accuracy.*'auto', 'rule', 'model'"):
        gym.make("wide_env/WideMoE-Switch-v0", config={"gating": {"accuracy": "exact"}})
    with pytest.raises(ConfigError, match=r"gating\.accuracy.*gating\.source = 'trace'"):
        gym.make("wide_env/WideMoE-v0", config={"gating": {"source": "synthetic", "accuracy": "model"}})
    from wide_env.profiles import profile_checkpoint, profile_trace

    with pytest.raises(ValueError, match=r"gating\.checkpoint_dir"):
        gym.make("wide_env/WideMoE-v0", config={"gating": {"trace_path": str(profile_trace("mixtral-8x7b")),
                                                           "accuracy": "model"}})
    with pytest.raises(ValueError, match=r"gating\.checkpoint_dir.*expected a checkpoint directory.*gating\.accuracy = 'rule'"):
        gym.make("wide_env/WideMoE-Mixtral-v0", config={"gating": {"checkpoint_dir": str(tmp_path / "missing")}})
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "moe_lm.json").write_text("{")
    (tmp_path / "bad" / "moe_lm.safetensors").write_bytes(b"xx")
    with pytest.raises(ValueError, match=r"gating\.checkpoint_dir.*not valid JSON"):
        gym.make("wide_env/WideMoE-Mixtral-v0", config={"gating": {"checkpoint_dir": str(tmp_path / "bad")}})
    with pytest.raises(ValueError, match=r"checkpoint.*\(L, E, K\).*use the checkpoint the trace was exported from"):
        gym.make("wide_env/WideMoE-Mixtral-v0", config={"gating": {"checkpoint_dir": profile_checkpoint("tiny")}})


def test_decoder_streams_are_independent_and_equal_live_moe():
    """StreamDecoder: a batch of streams decodes each stream as if alone (one LiveMoE each), whatever the
    other rows hold; prefix loading equals prefilling."""
    from wide_env.models.decoder import StreamDecoder
    from wide_env.modeltools.live import LiveMoE
    from wide_env.models.moe_lm import load_checkpoint
    from wide_env.gating.trace import load_trace
    from wide_env.profiles import profile_checkpoint, profile_trace

    model, _ = load_checkpoint(profile_checkpoint("gpt-oss-20b"))
    tr = load_trace(profile_trace("gpt-oss-20b"))
    L, E = model.cfg.n_layer, model.cfg.n_expert
    dec = StreamDecoder(model, tr["mismatch"], 3)
    starts = [5, 40, 17]
    dec.prefill([0, 1, 2], [tr["token_id"][:s] for s in starts])
    rng = np.random.default_rng(1)
    lives = []
    for s in starts:
        live = LiveMoE(model, tr["mismatch"])
        live.prefill(tr["token_id"][:s])
        live.truncate(s - 1)  # prefill ran the last prefix token through step(): compare from the same context
        lives.append(live)
    dec.reset([0, 1, 2])
    dec.prefill([0, 1, 2], [tr["token_id"][:s - 1] for s in starts])
    nxt = [s - 1 for s in starts]  # each stream's next token
    for t in range(3):
        masks = rng.random((3, L, E)) < 0.6
        rows = [0, 2] if t == 1 else [0, 1, 2]  # a subset of streams steps
        logits = dec.decode(rows, [tr["token_id"][nxt[r]] for r in rows], masks[rows])
        for i, r in enumerate(rows):
            want = lives[r].step(int(tr["token_id"][nxt[r]]), masks[r]).logits
            np.testing.assert_allclose(logits[i].numpy(), want, atol=1e-4)
            nxt[r] += 1
    with pytest.raises(ValueError, match="executed must have shape"):
        dec.decode([0], [1], np.ones((1, L, E + 1), bool))


def test_agreement_tool_scores_the_model_on_the_live_runs_selections():
    """python -m baselines.model_checks.agreement: the model column (the table env replaying the live run's episodes
    and actions) agrees with the live model on every token; the rules are scored on the same tokens."""
    from wide_env.gating import make_gating_source
    from wide_env.gating.trace import load_trace
    from baselines.model_checks.agreement import collect_live, model_outcomes, summarize

    env_id, cfg = "wide_env/WideMoE-Switch-v0", {"budget": {"scale": 4.0}}
    run = collect_live(env_id, cfg, "siftmoe", 4, 1000)
    trace = load_trace(make_gating_source(gym.make(env_id).unwrapped.config).path)
    res = summarize(trace, run, model_outcomes(env_id, cfg, run, 1000))
    assert res["tokens"] == 32
    assert res["model"]["diff_pts"] == 0.0 and res["model"]["agree_pct"] == 100.0
    assert res["live_acc_pts"] < res["full_acc_pts"]  # SiftMoE at 4x its budget does cost accuracy
    assert {"logit", "logit+context"} <= set(res)


@pytest.mark.parametrize("env_id", ["wide_env/WideMoE-v0", "wide_env/WideMoE-Mixtral-v0"])
def test_live_gating_vector_rows_are_single_live_envs(env_id):
    """gating.backend = 'live' in the native vector env: each row's observations (the live router's gating),
    rewards and measured figures equal a single live env's with the same seed and actions: through a whole
    episode, then after a partial reset that leaves the rows at different layers."""
    cfg = {"gating": {"backend": "live"}, "n_tokens": 2}
    B, seeds = 3, [21, 22, 23]
    vec = gym.make_vec(env_id, num_envs=B, vectorization_mode="vector_entry_point", config=cfg)
    assert vec.unwrapped.problem.accuracy_source == "live"
    singles = [gym.make(env_id, config=cfg) for _ in range(B)]
    rng = np.random.default_rng(4)
    E = singles[0].action_space.n
    L = singles[0].unwrapped.sim.n_layers
    completed = 0

    def compare(vobs, obs, b):
        for key in obs:
            np.testing.assert_allclose(vobs[key][b], obs[key], atol=1e-5, err_msg=key)

    def step_all():
        nonlocal completed
        actions = (rng.random((B, E)) < 0.6).astype(np.int8)
        vobs, vrew, _, _, vinfo = vec.step(actions)
        for b, env in enumerate(singles):
            obs, reward, _, _, info = env.step(actions[b])
            compare(vobs, obs, b)
            assert vrew[b] == pytest.approx(reward, rel=1e-5, abs=1e-7)
            assert vinfo["measured_deviation"][b] == pytest.approx(info["measured_deviation"], abs=1e-4)
            if info["token_complete"]:
                completed += 1
                assert (vinfo["accuracy_correct"][b], vinfo["accuracy_same"][b]) == \
                    (info["accuracy_correct"], info["accuracy_same"])
                for key in ("delta_loss", "live_nll", "live_deviation"):
                    assert vinfo[key][b] == pytest.approx(info[key], abs=1e-4), key
            else:
                assert info["live_nll"] == vinfo["live_nll"][b] == 0.0

    vobs, _ = vec.reset(seed=seeds)
    for b, env in enumerate(singles):
        compare(vobs, env.reset(seed=seeds[b])[0], b)
    for _ in range(2 * L):  # one whole episode
        step_all()
    vec.reset(seed=[s + 100 for s in seeds])
    for b, env in enumerate(singles):
        env.reset(seed=seeds[b] + 100)
    for _ in range(3):
        step_all()
    rows = np.array([True, False, True])  # rows 0 and 2 restart (their generators go on); row 1 is at layer 3
    vobs, _ = vec.reset(options={"reset_mask": rows})
    for b in np.flatnonzero(rows):
        compare(vobs, singles[b].reset()[0], b)
    for _ in range(L):
        step_all()
    assert completed >= 2 * B + 1


def test_checkers_sb3_vec_env_and_clones_with_the_model_inside():
    """The live env and the model-accuracy env pass Gymnasium's and SB3's checkers; SB3's native VecEnv runs the
    live backend; a pickled / deep-copied env continues exactly like the original (streams and caches too)."""
    import copy
    import pickle
    import warnings

    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    from wide_env.integrations.sb3_vec import make_native_vec_env

    live = {"config": {"gating": {"backend": "live"}, "n_tokens": 2}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for kwargs in (live, {"config": {"n_tokens": 2}}):
            check_env(gym.make("wide_env/WideMoE-Switch-v0", **kwargs).unwrapped, skip_render_check=True)
        sb3_check_env(gym.make("wide_env/WideMoE-Switch-v0", **live).unwrapped, warn=True)
    venv = make_native_vec_env("wide_env/WideMoE-Switch-v0", n_envs=2, seed=3, env_kwargs=live)
    venv.reset()
    E = venv.action_space.n
    for _ in range(2 * 6):
        _, _, _, infos = venv.step(np.ones((2, E), dtype=np.int8))
    assert all(info["accuracy_same"] == 1 for info in infos)  # every expert runs: the full model's prediction
    env = gym.make("wide_env/WideMoE-Mixtral-v0", **live)
    env.reset(seed=5)
    rng = np.random.default_rng(0)
    for _ in range(36):  # into the second of two 32-layer tokens
        env.step((rng.random(8) < 0.5).astype(np.int8))
    actions = (rng.random((28, 8)) < 0.5).astype(np.int8)  # to the episode's end
    runs = []
    for clone in (env, pickle.loads(pickle.dumps(env)), copy.deepcopy(env)):
        runs.append([clone.step(a)[4]["measured_deviation"] for a in actions])
    np.testing.assert_allclose(runs[1], runs[0], atol=1e-6)
    np.testing.assert_allclose(runs[2], runs[0], atol=1e-6)


@pytest.mark.parametrize("objective", ["deviation", "accuracy"])
def test_single_env_token_report_is_the_batched_report_bit_for_bit(objective):
    """The single env reports a completed token through its own one-row path (Python numbers, no index arrays);
    it must write exactly what the batched report writes for the same logits and position, and return the same
    loss, which is numpy's log-softmax of the logits (to rounding)."""
    env = gym.make("wide_env/WideMoE-Mixtral-v0", config={"reward": {"objective": objective}})
    env.reset(seed=4)
    batch = env.unwrapped.episode_batch
    backend = batch.model
    assert backend._one
    rng = np.random.default_rng(0)
    n = len(backend.target_id)
    for position in rng.integers(0, n, 12).tolist() + [0, n - 1]:
        logits = (rng.standard_normal(backend.decoder.V) * 3).astype(np.float32)
        logits[int(backend.target_id[position])] += rng.choice([0.0, 9.0])  # some predictions correct
        one, many = batch._outcome_buffer(), batch._outcome_buffer()
        for out in (one, many):
            out.values[:], out.counts[:] = -7.0, -7
        nll_one = backend._report_one(one, position, logits[None])
        nll_many = backend._report(many, np.array([0]), np.array([position]), logits[None])
        assert nll_one == nll_many[0]
        x = logits.astype(np.float64)
        want = x.max() + np.log(np.exp(x - x.max()).sum()) - x[int(backend.target_id[position])]
        assert nll_one == pytest.approx(want, rel=1e-12, abs=1e-12)
        np.testing.assert_array_equal(one.values, many.values)
        np.testing.assert_array_equal(one.counts, many.counts)
        assert not (one.values == -7.0).all()


def test_token_losses_are_numpys_argmax_and_log_softmax():
    from wide_env.models.fused_math import token_losses

    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((6, 50)) * 4).astype(np.float32)
    logits[2, [7, 30]] = logits[2].max() + 1.0  # equal maxima: the first is the prediction
    target = rng.integers(0, 50, 6)
    pred, nll = np.empty(6, np.int64), np.empty(6)
    token_losses(logits, target, pred, nll)
    x = logits.astype(np.float64)
    np.testing.assert_array_equal(pred, x.argmax(-1))
    assert pred[2] == 7
    want = -(x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)))
    np.testing.assert_allclose(nll, want[np.arange(6), target], rtol=1e-12, atol=1e-12)
