"""The native vector envs (`WideMoEVectorEnv`, `WideMoEPrefillVectorEnv`) and the SB3 adapter against the
single envs and the contracts.

Single/vector equivalence. The single env is a batch of one of the same simulator and step kernel, so:
* B = 1: the same trajectory as `gym.make` for the same seed and actions, across autoresets;
* sub-env b of a batch equals a single env with the same draws: its state taken as a batch of one and
  stepped alone gives the same rewards, infos and observations;
* with a seed list, sub-env i replays the single env seeded s_i, across autoresets;
* no cross-talk: changing the actions of the other sub-envs never changes sub-env i's trajectory;
* the same distribution: batch rows and single-env episodes agree under a two-sample KS test.
"""

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

import wide_env
from wide_env.envs.decode import INFO_KEYS
from wide_env.envs.vector import RESET_INFO_KEYS, WideMoEPrefillVectorEnv, WideMoEVectorEnv

SHORT = {"n_tokens": 2}  # 8 steps per episode with the tiny profile


def _single_action_sequence(seed, steps, E):
    return np.random.default_rng(seed).integers(0, 2, size=(steps, E)).astype(np.int8)


def _flat(obs):
    return np.concatenate([np.atleast_1d(v) for v in obs.values()], axis=-1) if isinstance(obs, dict) else obs


def _assert_close_info(single_info, vector_info, row):
    for key, value in single_info.items():
        assert vector_info["_" + key][row], key
        got = vector_info[key][row]
        if isinstance(value, int):
            assert got == value, key
        else:
            assert got == pytest.approx(value, rel=1e-12, abs=1e-300), key


# ---- registration ----------------------------------------------------------------------------------
DECODE_IDS = sorted(i for i, (entry, _) in wide_env.ENVIRONMENTS.items() if entry == "wide_env.envs.decode:WideMoEEnv")
NATIVE = {"wide_env.envs.decode:WideMoEEnv": WideMoEVectorEnv,
          "wide_env.envs.prefill:WideMoEPrefillEnv": WideMoEPrefillVectorEnv}


def test_every_registered_id_gets_its_native_vector_entry_point():
    for env_id, (entry, _) in wide_env.ENVIRONMENTS.items():
        cls = NATIVE[entry]
        assert gym.spec(env_id).vector_entry_point == f"wide_env.envs.vector:{cls.__name__}", env_id


@pytest.mark.parametrize("env_id", sorted(wide_env.ENVIRONMENTS))
def test_every_id_has_the_native_vector_entry_point(env_id):
    cls = NATIVE[wide_env.ENVIRONMENTS[env_id][0]]
    env = gym.make_vec(env_id, num_envs=3, vectorization_mode="vector_entry_point")
    assert isinstance(env, cls)
    assert env.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    single = gym.make(env_id).unwrapped
    assert env.problem == single.problem  # the preset's config reached the vector env
    assert env.single_observation_space == single.observation_space
    assert env.action_space.shape == (3,) + single.action_space.shape
    assert gym.make_vec(env_id, num_envs=2).__class__ is cls  # default mode uses it too


# ---- B = 1 equals the single env --------------------------------------------------------------------
@pytest.mark.parametrize("config", [
    {},
    {"budget": {"mode": "token"}, "placement": {"mobility": True}, "channel": {"fading_per_layer": True}, "n_tokens": 3},
    {"profile": "switch-base-8", "channel": {"correlation": 0.7}, "n_tokens": 2, "flatten_observation": True},
])
def test_b1_vector_env_replays_the_single_env(config):
    single = gym.make("wide_env/WideMoE-v0", config=config)
    vector = gym.make_vec("wide_env/WideMoE-v0", num_envs=1, vectorization_mode="vector_entry_point", config=config)
    E = single.unwrapped.problem.n_experts
    o1, i1 = single.reset(seed=11)
    o2, i2 = vector.reset(seed=11)
    np.testing.assert_array_equal(_flat(o1), _flat(o2)[0])
    _assert_close_info(i1, i2, 0)
    steps = 2 * single.unwrapped.problem.n_layers * single.unwrapped.problem.n_tokens + 5  # > 2 episodes
    truncations = 0
    pending_reset = False
    for action in _single_action_sequence(3, steps, E):
        if pending_reset:  # vector NEXT_STEP autoreset == single env reset() with the same generator
            o1, i1 = single.reset()
            r1, t1 = 0.0, False
            pending_reset = False
        else:
            o1, r1, term1, t1, i1 = single.step(action)
            assert not term1
        o2, r2, term2, t2, i2 = vector.step(action[None])
        np.testing.assert_array_equal(_flat(o1), _flat(o2)[0])
        assert r2[0] == pytest.approx(r1, rel=1e-12, abs=1e-300)
        assert not term2[0] and t2[0] == t1
        _assert_close_info(i1, i2, 0)
        truncations += t1
        pending_reset = t1
    assert truncations == 2
    if not config:  # the default (shipped real-model trace) reports the effect-table accuracy keys
        assert {"accuracy_correct", "delta_loss", "token_complete"} <= set(vector.info_keys) & set(i1)


def test_b1_same_step_autoreset_replays_the_single_env():
    single = gym.make("wide_env/WideMoE-v0", config=SHORT)
    vector = WideMoEVectorEnv(1, config=SHORT, autoreset_mode=AutoresetMode.SAME_STEP)
    o1, _ = single.reset(seed=4)
    o2, _ = vector.reset(seed=4)
    for action in _single_action_sequence(5, 20, 8):
        o1, r1, _, t1, i1 = single.step(action)
        o2, r2, _, t2, i2 = vector.step(action[None])
        assert t2[0] == t1 and r2[0] == pytest.approx(r1, rel=1e-12, abs=1e-300)
        if t1:
            np.testing.assert_array_equal(_flat(o1), _flat(i2["final_obs"][0]))
            _assert_close_info(i1, i2["final_info"], 0)
            o1, reset_info = single.reset()
            _assert_close_info(reset_info, i2, 0)
        np.testing.assert_array_equal(_flat(o1), _flat(o2)[0])


# ---- sub-envs of a batch -----------------------------------------------------------------------------
# the simulator's state moves between envs here; the model's decoding streams do not (they are compared in
# tests/test_model_accuracy.py), so these scenarios take their accuracy from the rule
@pytest.mark.parametrize("config", [{"budget": {"mode": "token"}, "n_tokens": 3, "gating": {"accuracy": "rule"}},
                                    {"gating": {"source": "synthetic"}, "channel": {"fading_per_layer": True}},
                                    {"compute": {"queue_delay_mean_s": 0.005}, "radio": {"uplink_slots": 3},
                                     "gating": {"accuracy": "rule"}}])
@pytest.mark.filterwarnings("ignore:profile 'tiny' .in this scenario.")
def test_sub_env_b_of_a_batch_equals_a_single_env_with_the_same_draws(config):
    """The state of sub-env b, taken out as a batch of one and stepped by a single env, gives the batch's
    rewards, infos and observations (the same draws: steps inside the planned chunk draw nothing)."""
    vec = WideMoEVectorEnv(6, config=config)
    vec.reset(seed=2)
    rng = np.random.default_rng(0)
    vec.step(rng.integers(0, 2, (6, 8)))
    vec.reset(options={"reset_mask": np.array([True, False, True, False, False, False])})  # rows out of step
    singles = []
    for b in range(6):
        env = wide_env.envs.WideMoEEnv(config)
        env.reset(seed=0)
        env._batch.state = vec.episode_batch.state.take([b])
        env._batch.obs = vec.episode_batch.obs[b:b + 1].copy()
        singles.append(env)
    for _ in range(2 * vec.problem.n_layers):
        actions = rng.integers(0, 2, (6, 8))
        pending = vec.episode_batch.pending.copy()
        assert not pending.any()  # no episode ends inside these steps (n_tokens >= 3)
        obs, reward, _, trunc, info = vec.step(actions)
        for b, env in enumerate(singles):
            o, r, _, t, i = env.step(actions[b])
            assert r == reward[b] and t == trunc[b]
            for key, value in i.items():
                assert value == info[key][b], key
            np.testing.assert_array_equal(_flat(o), _flat(obs)[b])


@pytest.mark.parametrize("env_id", ["wide_env/WideMoE-v0", "wide_env/WideMoE-Synthetic-v0", "wide_env/WideMoEPrefill-v0"])
def test_seed_list_makes_each_sub_env_replay_the_single_env_with_its_seed(env_id):
    seeds = [5, 17, 3]
    vec = gym.make_vec(env_id, num_envs=3, vectorization_mode="vector_entry_point", config=SHORT)
    singles = [gym.make(env_id, config=SHORT) for _ in seeds]
    obs, info = vec.reset(seed=seeds)
    for b, (env, seed) in enumerate(zip(singles, seeds)):
        o, i = env.reset(seed=seed)
        np.testing.assert_array_equal(_flat(o), _flat(obs)[b])
    rng = np.random.default_rng(1)
    n = singles[0].action_space.n
    pending = np.zeros(3, dtype=bool)
    for _ in range(3 * singles[0].unwrapped.problem.n_layers * 2 + 2):  # several episodes, autoresets included
        actions = rng.integers(0, 2, (3, n))
        obs, reward, _, trunc, info = vec.step(actions)
        for b, env in enumerate(singles):
            if pending[b]:  # NEXT_STEP autoreset: the single env resets from its own generator
                o, _ = env.reset()
                assert reward[b] == 0.0
            else:
                o, r, _, t, _ = env.step(actions[b])
                assert r == reward[b] and t == trunc[b]
            np.testing.assert_array_equal(_flat(o), _flat(obs)[b])
        pending = trunc.copy()
    vec.reset(seed=7)  # an int seed goes back to one generator for the batch
    assert vec.unwrapped._row_rngs is None


def test_batch_view_rows_equal_single_episode_views():
    for config in ({}, {"budget": {"mode": "token"}, "channel": {"fading_per_layer": True}}):
        env = WideMoEVectorEnv(5, config=config)
        env.reset(seed=0)
        for t in range(12):
            state = env.episode_batch.state
            if t == 6:
                env.reset(options={"reset_mask": np.array([False, True, False, True, False])})
            batch = env.sim.view(state)
            for i in range(5):
                one = env.sim.view(state, i)
                for name in one.__dataclass_fields__:
                    np.testing.assert_array_equal(np.asarray(getattr(batch, name))[i], getattr(one, name), err_msg=name)
            env.step(np.ones((5, 8), dtype=np.int8))


def test_other_sub_envs_actions_do_not_change_a_sub_env():
    runs = []
    for other in (0, 1):
        env = WideMoEVectorEnv(4, config=SHORT)
        env.reset(seed=9)
        rng = np.random.default_rng(1)
        trace = []
        for _ in range(30):  # > 3 episodes, autoresets included
            actions = rng.integers(0, 2, (4, 8))
            actions[1:] = other  # sub-envs 1..3 run all-0 or all-1
            obs, reward, _, trunc, info = env.step(actions)
            trace.append((_flat(obs)[0], reward[0], trunc[0], info["energy_j"][0]))
        runs.append(trace)
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a[0], b[0])
        assert a[1:] == b[1:]


def _ks_statistic(x, y):
    grid = np.sort(np.concatenate([x, y]))
    fx = np.searchsorted(np.sort(x), grid, side="right") / x.size
    fy = np.searchsorted(np.sort(y), grid, side="right") / y.size
    return np.abs(fx - fy).max()


def test_batch_rows_and_single_envs_have_the_same_distribution():
    n = 150
    cfg = {"n_tokens": 1}
    vec = WideMoEVectorEnv(n, config=cfg)
    obs, _ = vec.reset(seed=0)
    batch_gain = obs["channel_gain_db"][:, 0].copy()
    batch_cost = obs["energy_cost"].sum(axis=1)
    single = wide_env.envs.WideMoEEnv(cfg)
    single_gain, single_cost = [], []
    single.reset(seed=1)
    for _ in range(n):
        o, _ = single.reset()
        single_gain.append(o["channel_gain_db"][0])
        single_cost.append(o["energy_cost"].sum())
    critical = 1.95 * np.sqrt(2.0 / n)  # two-sample KS at alpha = 0.001
    assert _ks_statistic(batch_gain, np.array(single_gain)) < critical
    assert _ks_statistic(batch_cost, np.array(single_cost)) < critical
    assert not np.array_equal(batch_gain[:10], np.array(single_gain[:10]))  # different streams


# ---- autoreset contracts -------------------------------------------------------------------------------
def test_next_step_autoreset_returns_reset_obs_zero_reward_and_ignores_the_action():
    results = []
    for fill in (0, 1):
        env = gym.make_vec("wide_env/WideMoE-v0", num_envs=3, vectorization_mode="vector_entry_point", config=SHORT)
        env.reset(seed=5)
        for t in range(8):
            obs, reward, term, trunc, info = env.step(np.ones((3, 8), dtype=np.int8))
            assert trunc.all() == (t == 7) and not term.any()
        obs, reward, term, trunc, info = env.step(np.full((3, 8), fill, dtype=np.int8))  # the autoreset step
        assert (reward == 0).all() and not term.any() and not trunc.any()
        assert (info["layer"] == 0).all() and (info["token"] == 0).all() and info["_layer"].all()
        assert (obs["position"] == 0).all()
        for key in INFO_KEYS:
            assert info["_" + key].all() == (key in RESET_INFO_KEYS), key
        nxt = env.step(np.ones((3, 8), dtype=np.int8))
        results.append((_flat(obs), _flat(nxt[0]), nxt[1]))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)  # the autoreset step's action changed nothing


def test_next_step_autoreset_with_sub_envs_out_of_step():
    env = WideMoEVectorEnv(3, config=SHORT)
    env.reset(seed=1)
    for _ in range(3):
        env.step(np.ones((3, 8), dtype=np.int8))
    env.reset(options={"reset_mask": np.array([False, True, False])})  # sub-env 1 restarts, 3 steps behind
    truncated_at = {}
    for t in range(14):
        before = env.episode_batch.pending.copy()
        obs, reward, _, trunc, info = env.step(np.ones((3, 8), dtype=np.int8))
        for i in np.flatnonzero(before):
            assert reward[i] == 0 and not trunc[i] and obs["position"][i, 0] == 0
            assert not info["_energy_j"][i] and info["energy_j"][i] == 0 and info["_layer"][i]
        for i in np.flatnonzero(~before):
            assert info["_energy_j"][i]
        for i in np.flatnonzero(trunc):
            truncated_at.setdefault(int(i), []).append(t)
    assert truncated_at == {0: [4, 13], 2: [4, 13], 1: [7]}


def _reported(info):
    return {k for k in info if not k.startswith("_") and np.asarray(info["_" + k]).any()}


def test_same_step_autoreset_contract_and_sync_parity():
    native = WideMoEVectorEnv(2, config=SHORT, autoreset_mode=AutoresetMode.SAME_STEP)
    sync = gym.make_vec("wide_env/WideMoE-v0", num_envs=2, vectorization_mode="sync", config=SHORT,
                        vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP})
    native.reset(seed=0)
    sync.reset(seed=0)
    for t in range(8):
        a = np.ones((2, 8), dtype=np.int8)
        no, nr, _, nt, ni = native.step(a)
        so, sr, _, st, si = sync.step(a)
        assert nt.tolist() == st.tolist() == [t == 7] * 2
    assert _reported(ni) == _reported(si)  # sync omits keys no sub-env reports; native keeps them, masked
    assert _reported(ni["final_info"]) == _reported(si["final_info"])
    assert (no["position"] == 0).all()  # already the reset observation
    assert ni["_final_obs"].all() and ni["final_obs"][0]["position"][0] == 1.0  # last layer
    for key in _reported(si) - {"final_obs", "final_info"}:
        np.testing.assert_array_equal(ni["_" + key], si["_" + key], err_msg=key)
        assert ni[key].dtype == si[key].dtype, key
    for key in native.info_keys:
        assert ni["final_info"][key].dtype == si["final_info"][key].dtype, key


def test_disabled_autoreset_requires_a_masked_reset():
    env = WideMoEVectorEnv(2, config={"n_tokens": 1}, autoreset_mode="Disabled")
    env.reset(seed=0)
    for _ in range(4):
        env.step(np.zeros((2, 8), dtype=np.int8))
    with pytest.raises(RuntimeError, match="reset_mask"):
        env.step(np.zeros((2, 8), dtype=np.int8))
    obs, info = env.reset(options={"reset_mask": np.array([True, True])})
    assert info["_layer"].all()
    env.step(np.zeros((2, 8), dtype=np.int8))


def test_max_episode_steps_truncates_early():
    env = gym.make_vec("wide_env/WideMoE-v0", num_envs=2, vectorization_mode="vector_entry_point", max_episode_steps=3)
    env.reset(seed=0)
    flags = [env.step(np.ones((2, 8), dtype=np.int8))[3].all() for _ in range(7)]
    assert flags == [False, False, True, False, False, False, True]


# ---- parity with SyncVectorEnv, actions, masks ---------------------------------------------------------
@pytest.mark.parametrize("flatten", [False, True])
def test_native_and_sync_give_the_same_shapes_and_info_keys(flatten):
    kw = {"config": {"flatten_observation": flatten, **SHORT}}
    native = gym.make_vec("wide_env/WideMoE-v0", num_envs=4, vectorization_mode="vector_entry_point", **kw)
    sync = gym.make_vec("wide_env/WideMoE-v0", num_envs=4, vectorization_mode="sync", **kw)
    assert native.observation_space == sync.observation_space
    assert native.action_space == sync.action_space

    (no, ni), (so, si) = native.reset(seed=0), sync.reset(seed=0)
    for t in range(10):  # includes the truncation (t = 7) and the autoreset step (t = 8)
        assert native.observation_space.contains(no)
        pairs = [(no, so)] if flatten else [(no[k], so[k]) for k in so]
        assert flatten or set(no) == set(so)
        for a, b in pairs:
            assert a.shape == b.shape and a.dtype == b.dtype
        assert _reported(ni) == _reported(si)
        for key in _reported(si):
            assert ni[key].dtype == si[key].dtype and ni[key].shape == si[key].shape, key
        actions = np.ones((4, 8), dtype=np.int8)
        no, nr, nterm, ntr, ni = native.step(actions)
        so, sr, sterm, strc, si = sync.step(actions)
        assert ntr.tolist() == strc.tolist() and nterm.tolist() == sterm.tolist()


@pytest.mark.parametrize("bad, match", [
    (np.ones(8, dtype=np.int8), r"expected shape \(4, 8\).*one sub-env's action"),
    (np.ones((4, 7), dtype=np.int8), r"expected shape \(4, 8\)"),
    (np.full((4, 8), 2), r"0 or 1.*expected shape \(4, 8\)"),
    (np.full((4, 8), -1), r"0 or 1"),
    (np.full((4, 8), np.nan), r"0 or 1"),
    (np.full((4, 8), "1"), r"dtype"),
])
def test_bad_actions_raise_value_error_naming_the_shape(bad, match):
    env = WideMoEVectorEnv(4)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=match):
        env.step(bad)
    env.step(np.ones((4, 8), dtype=bool))  # still usable
    env.step(np.ones((4, 8), dtype=np.float32))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_envs"):
        WideMoEVectorEnv(0)
    with pytest.raises(ValueError, match="render_mode"):
        WideMoEVectorEnv(2, render_mode="ansi")
    with pytest.raises(ValueError, match="autoreset_mode"):
        WideMoEVectorEnv(2, autoreset_mode="sometimes")
    with pytest.raises(ValueError, match="budget.scale|unknown config field"):
        WideMoEVectorEnv(2, config={"budget": {"scale": 0.0}, "bogus": 1})
    env = WideMoEVectorEnv(2)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.ones((2, 8)))
    with pytest.raises(ValueError, match="seed"):
        env.reset(seed=[1, 2, 3])  # one per sub-env
    with pytest.raises(ValueError, match="seed"):
        env.reset(seed=1.5)
    with pytest.raises(ValueError, match="reset_mask"):
        env.reset(seed=0, options={"reset_mask": np.array([1, 0])})


@pytest.mark.parametrize("config", [{"deadline": {"enforce": False}}, {"profile": "mixtral-8x7b", "n_tokens": 2,
                                                                       "deadline": {"enforce": False}}])
def test_topk_mask_actions_give_zero_deviation(config):
    env = gym.make_vec("wide_env/WideMoE-v0", num_envs=16, vectorization_mode="vector_entry_point", config=config)
    obs, _ = env.reset(seed=3)
    K = env.unwrapped.problem.top_k
    steps = 2 * env.unwrapped.problem.n_layers * env.unwrapped.problem.n_tokens + 2
    for _ in range(steps):
        obs, reward, _, _, info = env.step(obs["topk_mask"].astype(np.int8))
        stepped = info["_energy_j"]
        assert (info["deviation"][stepped] == 0).all() and (info["n_kept"][stepped] == K).all()
        np.testing.assert_allclose(info["energy_j"][stepped], info["topk_energy_j"][stepped], rtol=1e-12)
        np.testing.assert_allclose(reward[stepped], -1.0, rtol=1e-12)


def test_action_masks_match_the_deadline_probability_and_setting():
    for enforce in (True, False):
        env = WideMoEVectorEnv(8, config={"compute": {"queue_delay_mean_s": 0.01, "queue_persistence": 0.9},
                                          "deadline": {"enforce": enforce}})
        obs, _ = env.reset(seed=0)
        masked = 0
        for _ in range(10):
            masks = env.action_masks()
            assert masks.shape == (8, 16) and masks.dtype == bool and masks[:, 0::2].all()
            expected = obs["deadline_probability"] > 0 if enforce else np.ones((8, 8), bool)
            np.testing.assert_array_equal(masks[:, 1::2], expected)
            masked += int((~masks).sum())
            obs, *_ = env.step(np.ones((8, 8), dtype=np.int8))
        assert (masked > 0) == enforce


def test_seeding_is_reproducible_and_observations_are_fresh():
    a, b = WideMoEVectorEnv(3), WideMoEVectorEnv(3)
    oa, _ = a.reset(seed=123)
    ob, _ = b.reset(seed=123)
    kept = {k: v.copy() for k, v in oa.items()}
    for _ in range(10):
        act = np.ones((3, 8), dtype=np.int8)
        ra, rb = a.step(act), b.step(act)
        np.testing.assert_array_equal(_flat(ra[0]), _flat(rb[0]))
        np.testing.assert_array_equal(ra[1], rb[1])
    for k in kept:  # earlier observations are not overwritten by later steps
        np.testing.assert_array_equal(kept[k], oa[k])
    oc, _ = WideMoEVectorEnv(3).reset(seed=124)
    assert not np.array_equal(_flat(oa), _flat(oc))


# ---- SB3 adapter -----------------------------------------------------------------------------------------
sb3 = pytest.importorskip("stable_baselines3")


def test_sb3_adapter_step_contract_matches_the_same_step_vector_env():
    from wide_env.integrations.sb3_vec import make_native_vec_env

    venv = make_native_vec_env("wide_env/WideMoE-v0", n_envs=3, seed=8, env_kwargs={"config": SHORT})
    ref = WideMoEVectorEnv(3, config=SHORT, autoreset_mode=AutoresetMode.SAME_STEP)
    obs = venv.reset()
    robs, _ = ref.reset(seed=8)
    np.testing.assert_array_equal(_flat(obs), _flat(robs))
    assert venv.reset_infos[0]["layer"] == 0
    for t in range(10):
        actions = np.ones((3, 8), dtype=np.float32)
        obs, rewards, dones, infos = venv.step(actions)
        robs, rrew, _, rtr, rinfo = ref.step(actions)
        np.testing.assert_array_equal(_flat(obs), _flat(robs))
        assert rewards.dtype == np.float32 and dones.dtype == bool
        np.testing.assert_allclose(rewards, rrew.astype(np.float32))
        assert dones.tolist() == rtr.tolist() == [t == 7] * 3
        for i, info in enumerate(infos):
            assert info["TimeLimit.truncated"] == (t == 7)
            assert ("terminal_observation" in info) == (t == 7)
            if t == 7:
                np.testing.assert_array_equal(_flat(info["terminal_observation"]), _flat(rinfo["final_obs"][i]))
                assert info["energy_j"] == rinfo["final_info"]["energy_j"][i]
            else:
                assert set(info) == set(venv.info_keys) | {"TimeLimit.truncated"}
                assert isinstance(info["n_kept"], int) and isinstance(info["energy_j"], float)


def test_sb3_adapter_attributes_seed_and_errors():
    from wide_env.integrations.sb3_vec import WideMoESB3VecEnv, make_native_vec_env

    venv = make_native_vec_env("wide_env/WideMoE-Switch-v0", n_envs=2, info_keys=())
    assert venv.get_attr("problem")[0].n_layers == 6 and venv.get_attr("render_mode") == [None, None]  # Switch decodes 6 MoE layers
    assert venv.has_attr("action_masks") and not venv.has_attr("no_such_attribute")
    with pytest.raises(AttributeError, match="share one batched core"):
        venv.set_attr("problem", None)
    venv.set_attr("curriculum_level", 3, indices=[1])
    assert venv.get_attr("curriculum_level", indices=1) == [3]
    assert venv.seed(5) == [5, 5]
    first = venv.reset()
    assert venv.env_method("action_masks")[1].shape == (16,)
    assert venv.env_method("current_view", indices=0)[0].layer == 0
    venv.seed(5)
    np.testing.assert_array_equal(_flat(venv.reset()), _flat(first))
    obs, _, _, infos = venv.step(np.zeros((2, 8)))
    assert infos[0] == {"TimeLimit.truncated": False}
    with pytest.raises(ValueError, match=r"expected shape \(2, 8\)"):
        venv.step(np.zeros(8))
    with pytest.raises(ValueError, match="native batched core"):
        make_native_vec_env("CartPole-v1", 2)
    with pytest.raises(ValueError, match="info_keys"):
        WideMoESB3VecEnv(2, info_keys=("energy",))


def test_sb3_ppo_and_maskable_ppo_learn_on_the_adapter_with_wrappers():
    import torch

    torch.set_num_threads(1)
    from sb3_contrib import MaskablePPO
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecCheckNan, VecMonitor

    from wide_env.integrations.sb3_vec import make_native_vec_env

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        venv = VecCheckNan(VecMonitor(make_native_vec_env(n_envs=4, seed=0, env_kwargs={"config": SHORT})),
                           raise_exception=True)
        model = PPO("MultiInputPolicy", venv, n_steps=32, batch_size=32, n_epochs=2, seed=0)
        model.learn(256)
        assert model.num_timesteps >= 256 and len(model.ep_info_buffer) > 0
        assert model.ep_info_buffer[0]["l"] == 8
    tight = {"compute": {"queue_delay_mean_s": 0.01}, **SHORT}
    venv = VecMonitor(make_native_vec_env(n_envs=4, seed=0, env_kwargs={"config": tight}))
    model = MaskablePPO("MultiInputPolicy", venv, n_steps=32, batch_size=32, n_epochs=2, seed=0)
    model.learn(256)
    assert model.num_timesteps >= 256
    obs = venv.reset()
    masks = np.stack(venv.env_method("action_masks"))
    actions, _ = model.predict(obs, action_masks=masks, deterministic=True)
    assert (actions[~masks[:, 1::2]] == 0).all()  # masked experts are never executed
