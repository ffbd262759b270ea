"""The model-state observation keys (gating.model_state = true): the router's entropy and margin and the
logit-lens confidence at the current layer of the episode's decoding stream, and the previous token's loss,
checked against an independent torch computation on the reference StreamDecoder; the same values in the single
env, the native vector env and SB3's VecEnv; the ConfigError."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import gymnasium as gym  # noqa: E402

import wide_env  # noqa: E402,F401
from wide_env.config import ConfigError  # noqa: E402
from wide_env.sim.observation import MODEL_STATE_KEYS  # noqa: E402

KEYS = tuple(MODEL_STATE_KEYS)
CFG = {"gating": {"source": "trace", "accuracy": "model", "model_state": True}, "n_tokens": 3}


def _keys(obs) -> np.ndarray:
    return np.array([float(obs[k][0]) for k in KEYS])


def _torch_keys(decoder, gates, row: int, previous_loss: float) -> np.ndarray:
    """The keys from the torch StreamDecoder's state: its router softmax at the pending layer, the LM head on
    its residual stream."""
    p = torch.from_numpy(gates.probs[row]).double()
    entropy = float(-(p * torch.log(p.clamp_min(1e-300))).sum() / np.log(p.numel()))
    top2 = torch.topk(p, 2).values
    with torch.no_grad():
        lens = torch.softmax(decoder.model.head_logits(decoder._x[row:row + 1]).double(), -1).max()
    return np.array([entropy, float(top2[0] - top2[1]), float(lens), previous_loss])


@pytest.mark.parametrize("env_id", ["wide_env/WideMoE-Switch-v0", "wide_env/WideMoE-v0"])
def test_keys_equal_an_independent_torch_computation(env_id):
    """Random executed sets over whole episodes: every observation's keys equal the torch reference decoder's
    (driven with the same effective experts), and the previous loss equals the info's measured loss (its
    delta_loss plus the full model's loss of that token)."""
    from wide_env.models.decoder import StreamDecoder

    env = gym.make(env_id, config=CFG)
    backend = env.unwrapped._batch.model
    seen = []  # the effective experts each step served with (executed and in time)
    real_before = backend.before_step

    def spy(state, executed):
        effective = real_before(state, executed)
        seen.append(effective[0].copy())
        return effective

    backend.before_step = spy
    context, sim = backend.context, env.unwrapped.sim
    ref = StreamDecoder(context.model, sim.source.mismatch, 1)
    rng = np.random.default_rng(3)
    E, L = env.action_space.n, sim.n_layers
    checked = tokens = 0
    for seed in (4, 5):
        obs, _ = env.reset(seed=seed)
        state = env.unwrapped._batch.state
        start = int(state.start[0])
        keys, values = context.prefix(start)
        ref.set_prefix(0, keys, values)
        position = start
        gates = ref.begin([0], context.token_id[[position]])
        previous = 0.0
        np.testing.assert_allclose(_keys(obs), _torch_keys(ref, gates, 0, previous), atol=2e-4)
        done = False
        while not done:
            obs, _, term, trunc, info = env.step((rng.random(E) < 0.6).astype(np.int8))
            done = term or trunc
            gates = ref.execute([0], executed=seen[-1][None])
            if gates is None:  # the token's last layer: its loss, then the next token's layer 0
                logits = ref.finish([0])[0].double()
                target = int(context.target_id[position])
                previous = float(torch.logsumexp(logits, 0) - logits[target])
                _, full_nll = context.reference(np.array([position]))
                assert info["token_complete"] == 1
                assert _keys(obs)[3] == pytest.approx(info["delta_loss"] + float(full_nll[0]), abs=1e-4)
                tokens += 1
                if done:
                    break
                position += 1
                gates = ref.begin([0], context.token_id[[position]])
            np.testing.assert_allclose(_keys(obs), _torch_keys(ref, gates, 0, previous), atol=2e-4)
            checked += 1
    assert tokens == 2 * 3 and checked == 2 * (3 * L - 1)


def _same_row(batch_obs, b: int, obs) -> None:
    # the compiled streams' float32 sums may round differently with a stream's place in the batch (SIMD lanes
    # over differently aligned rows): about one float32 ulp
    for k in KEYS:
        assert batch_obs[k][b, 0] == pytest.approx(obs[k][0], abs=1e-5), k


def test_vector_env_and_sb3_rows_are_single_envs():
    """Row b of the native vector env observes exactly what a single env seeded the same observes (a batch of
    one is a row of the batch, to float32 rounding), through whole episodes and a reset of one row; SB3's VecEnv observes what the
    native vector env does for the same seed."""
    from wide_env.integrations.sb3_vec import make_native_vec_env

    env_id, B, seeds = "wide_env/WideMoE-Switch-v0", 3, [11, 12, 13]
    vec = gym.make_vec(env_id, num_envs=B, vectorization_mode="vector_entry_point", config=CFG)
    singles = [gym.make(env_id, config=CFG) for _ in range(B)]
    vobs, _ = vec.reset(seed=seeds)
    sobs = [env.reset(seed=s)[0] for env, s in zip(singles, seeds)]
    rng = np.random.default_rng(0)
    E = singles[0].action_space.n
    losses = []
    for _ in range(singles[0].unwrapped.sim.n_layers * 3):  # whole episodes
        for b in range(B):
            _same_row(vobs, b, sobs[b])
        losses.append(vobs["previous_loss"][:, 0])
        actions = (rng.random((B, E)) < 0.5).astype(np.int8)
        vobs = vec.step(actions)[0]
        sobs = [env.step(actions[b])[0] for b, env in enumerate(singles)]
    for b in range(B):
        _same_row(vobs, b, sobs[b])
    assert np.max(losses) > 0 and vobs["previous_loss"].min() > 0  # tokens completed: their losses observed
    vobs, _ = vec.reset(seed=[None, 21, None], options={"reset_mask": np.array([False, True, False])})
    one = singles[1]
    obs = one.reset(seed=21)[0]
    assert obs["previous_loss"][0] == 0.0
    for _ in range(6):
        _same_row(vobs, 1, obs)
        actions = (rng.random((B, E)) < 0.5).astype(np.int8)
        vobs = vec.step(actions)[0]
        obs = one.step(actions[1])[0]

    native = gym.make_vec(env_id, num_envs=2, vectorization_mode="vector_entry_point", config=CFG)
    venv = make_native_vec_env(env_id, n_envs=2, seed=3, env_kwargs={"config": CFG})
    a, n = venv.reset(), native.reset(seed=3)[0]
    for _ in range(7):
        for k in KEYS:
            np.testing.assert_array_equal(a[k], n[k])
        actions = (rng.random((2, E)) < 0.5).astype(np.int8)
        a, n = venv.step(actions)[0], native.step(actions)[0]


def test_model_state_needs_model_accuracy():
    """gating.model_state without gating.accuracy = 'model' is a ConfigError naming the field and the fix; off,
    the layout has no model-state keys."""
    for gating in ({"model_state": True}, {"source": "trace", "accuracy": "rule", "model_state": True},
                   {"source": "trace", "backend": "live", "accuracy": "model", "model_state": True}):
        with pytest.raises(ConfigError, match=r"gating\.model_state.*gating\.accuracy = 'model'"):
            gym.make("wide_env/WideMoE-v0", config={"gating": gating})
    with pytest.raises(ConfigError, match=r"gating\.model_state"):
        gym.make("wide_env/WideMoE-v0", config={"gating": {"source": "trace", "accuracy": "model",
                                                           "model_state": "yes"}})
    plain = gym.make("wide_env/WideMoE-v0", config={"gating": {"source": "trace", "accuracy": "model"}})
    assert not set(KEYS) & set(plain.observation_space.spaces)
    flat = gym.make("wide_env/WideMoE-v0", config={**CFG, "flatten_observation": True})
    assert flat.observation_space.shape[0] == sum(b.shape[0] for b in plain.observation_space.spaces.values()) + 4
    assert list(flat.unwrapped.problem.obs_slices)[-4:] == list(KEYS)


@pytest.mark.parametrize("flat", [False, True])
def test_the_expert_set_network_reads_the_keys_as_per_token_context(flat):
    """The expert-set network finds the keys in a real model-state observation (Dict, or flat by its size),
    routes them to the globals every expert token sees, and its action logits move with them."""
    from gymnasium import spaces

    from agents.layout import layout_spec
    from agents.networks import ExpertSetPolicy

    env = gym.make("wide_env/WideMoE-v0", config={**CFG, "flatten_observation": flat})
    problem = env.unwrapped.problem
    sizes = dict(n_experts=problem.n_experts, top_k=problem.top_k, n_nodes=problem.n_nodes)
    obs, _ = env.reset(seed=2)
    spec = layout_spec(env.observation_space, **sizes)
    assert [k.name for k in spec.keys][-4:] == list(KEYS)
    plain = layout_spec(gym.make("wide_env/WideMoE-v0", config={**CFG, "flatten_observation": flat,
                                                                "gating": {"model_state": False}}).observation_space,
                        **sizes)
    assert not set(KEYS) & {k.name for k in plain.keys}
    policy = ExpertSetPolicy(env.observation_space, spaces.MultiBinary(problem.n_experts), lambda _: 1e-3, **sizes)
    ext = policy.features_extractor
    assert [k.name for k in ext.routing.glob][-4:] == list(KEYS)  # globals: broadcast to every expert token

    def batch(o):
        return torch.as_tensor(o[None]) if flat else {k: torch.as_tensor(v[None]) for k, v in o.items()}

    with torch.no_grad():
        _, _, glob = ext.element_inputs(batch(obs))
        values = _keys(obs if not flat else {k: obs[sl] for k, sl in problem.obs_slices.items()})
        for v in values[:3]:  # the fractions enter the globals as they are
            assert np.isclose(glob[0].numpy(), v, atol=1e-6).any()
        logits = policy.get_distribution(batch(obs)).distribution.logits
        other = obs.copy() if flat else dict(obs)
        if flat:
            other[problem.obs_slices["router_margin"]] = 1.0 - other[problem.obs_slices["router_margin"]]
        else:
            other["router_margin"] = 1.0 - obs["router_margin"]
        changed = policy.get_distribution(batch(other)).distribution.logits
    assert not torch.allclose(logits, changed)



def test_preset_and_its_rule_confident_skip():
    """The ModelState preset observes the keys with the model's accuracy; confident_skip executes exactly the Top-K
    set, or only its largest-weight expert where a key crosses its threshold (checked entry by entry), is Top-K
    with thresholds of 1, and refuses an env without the keys or thresholds outside [0, 1]."""
    from baselines.policies import POLICY_NAMES, make_policy

    assert "confident_skip" in POLICY_NAMES
    env = gym.make("wide_env/WideMoE-ModelState-v0", config={"n_tokens": 4})
    problem = env.unwrapped.problem
    assert problem.accuracy_source == "model" and set(KEYS) <= set(env.observation_space.spaces)
    obs, _ = env.reset(seed=9)
    observations = []
    for _ in range(4 * problem.n_layers):
        observations.append(obs)
        obs = env.step(obs["topk_mask"].astype(np.int8))[0]
    batch = {k: np.stack([o[k] for o in observations]) for k in observations[0]}
    topk = make_policy("topk", env)
    np.testing.assert_array_equal(make_policy("confident_skip", env, confidence=1.0, margin=1.0)(batch), topk(batch))
    theta, theta_m = 0.3, 0.5
    rule = make_policy("confident_skip", env, confidence=theta, margin=theta_m)
    actions = rule(batch)
    easy_rows = 0
    for o, action in zip(observations, actions):
        mask = o["topk_mask"] > 0.5
        if o["logit_lens_confidence"][0] > theta or o["router_margin"][0] > theta_m:
            easy_rows += 1
            assert action.sum() == 1 and mask[action.argmax()]
            assert o["topk_weight"][action.argmax()] == o["topk_weight"][mask].max()
        else:
            np.testing.assert_array_equal(action, mask.astype(np.int8))
    assert 0 < easy_rows < len(observations)  # both branches are exercised
    np.testing.assert_array_equal(np.stack([rule(o) for o in observations]), actions)  # batched = one by one
    with pytest.raises(ValueError, match=r"gating\.model_state = true"):
        make_policy("confident_skip", gym.make("wide_env/WideMoE-v0"))
    with pytest.raises(ValueError, match="confidence must be in"):
        make_policy("confident_skip", env, confidence=1.5)


def test_confident_skip_trades_energy_for_loss_on_the_selection_seeds():
    """On the same selection episodes, skipping the 2nd slot on easy tokens uses less energy than Top-K and keeps
    most of the full model's predictions; the tuning rows are sorted by the preset's reward."""
    from baselines.model_state_tuning import tune

    rows = tune(episodes=2, grid=(0.5, 1.0), env_kwargs={"config": {"n_tokens": 4}})
    assert [r["reward_per_step"] for r in rows] == sorted((r["reward_per_step"] for r in rows), reverse=True)
    by = {(r["confidence"], r["margin"]): r for r in rows}
    assert by[(1.0, 1.0)]["energy_rel_topk"] == pytest.approx(1.0)
    assert by[(1.0, 1.0)]["accuracy_same"] == 1.0
    assert by[(0.5, 0.5)]["energy_rel_topk"] < by[(1.0, 0.5)]["energy_rel_topk"] < 1.0
    assert by[(0.5, 0.5)]["accuracy_same"] > 0.5
