"""The single env's lean step: fresh observation rows, the validator's view of 0/1 bytes, the reused outcome buffer.
Each must give what the general batch path gives (the pinned trajectories check the whole env bit for bit)."""

import gymnasium as gym
import numpy as np
import pytest

import wide_env  # noqa: F401  (registers the ids)
from wide_env.envs.actions import validate_action
from wide_env.envs.observation_rows import ObservationRows

pytestmark = pytest.mark.filterwarnings("ignore:profile .* accuracy in info comes from the logit-effect rule")

SHORT = {"n_tokens": 3, "gating": {"accuracy": "rule"}}


@pytest.mark.parametrize("flatten", [False, True])
def test_observations_stay_as_returned_across_blocks(flatten):
    """Every observation returned is its own: later steps (more than a block of rows, and resets) change none."""
    env = gym.make("wide_env/WideMoE-v0", config={**SHORT, "flatten_observation": flatten})
    obs, _ = env.reset(seed=3)
    rng = np.random.default_rng(0)
    kept, copies = [obs], [_copy(obs)]
    for _ in range(3 * 32 + 5):
        obs, _, _, truncated, _ = env.step(rng.integers(0, 2, 8).astype(np.int8))
        kept.append(obs)
        copies.append(_copy(obs))
        if truncated:
            obs, _ = env.reset()
            kept.append(obs)
            copies.append(_copy(obs))
    for got, want in zip(kept, copies):
        np.testing.assert_array_equal(_flat(got), _flat(want))
    space = env.observation_space
    assert all(space.contains(o) for o in kept)


def test_observation_rows_do_not_overlap_and_follow_the_layout():
    slices = {"a": slice(0, 3), "b": slice(3, 4), "c": slice(4, 7)}
    rows = ObservationRows(7, slices, flatten=False, rows=4)
    taken = [rows.take() for _ in range(9)]  # three blocks
    for i, (row, obs) in enumerate(taken):
        assert row.shape == (1, 7) and row.dtype == np.float32 and row.flags.c_contiguous and row.flags.writeable
        row[0] = np.arange(7) + 10 * i
        assert list(obs) == ["a", "b", "c"]
        for key, sl in slices.items():  # each key is a view of its own row
            np.testing.assert_array_equal(obs[key], np.arange(7)[sl] + 10 * i)
    for i, (row, obs) in enumerate(taken):  # written later rows left every earlier row as it was
        np.testing.assert_array_equal(row[0], np.arange(7) + 10 * i)
        for j, (other, _) in enumerate(taken):
            assert i == j or not np.shares_memory(row, other)
    flat = ObservationRows(7, slices, flatten=True, rows=2)
    row, obs = flat.take()
    row[0] = 5.0
    assert obs.shape == (7,) and (obs == 5.0).all()


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.bool_])
def test_byte_actions_are_read_in_place_and_others_copied(dtype):
    action = np.array([0, 1, 1, 0, 0, 1, 0, 1], dtype=dtype)
    got = validate_action(action, (8,), "x")
    assert got.shape == (1, 8) and got.dtype == np.bool_ and got.flags.c_contiguous
    np.testing.assert_array_equal(got[0], action.astype(bool))
    strided = np.repeat(action, 2)[::2]  # not contiguous: copied, same values
    got = validate_action(strided, (8,), "x")
    assert got.flags.c_contiguous and not np.shares_memory(got, strided)
    np.testing.assert_array_equal(got[0], action.astype(bool))


@pytest.mark.parametrize("bad,value", [(2, "2"), (-1, "-1"), (7, "7")])
def test_byte_actions_with_other_values_raise_naming_the_value(bad, value):
    action = np.zeros(8, dtype=np.int8)
    action[5] = bad
    with pytest.raises(ValueError, match=rf"got {value} at index \(5,\)"):
        validate_action(action, (8,), "x")
    with pytest.raises(ValueError, match="action has shape"):
        validate_action(np.zeros(7, dtype=np.int8), (8,), "x")


@pytest.mark.parametrize("env_id,config", [("wide_env/WideMoE-v0", SHORT),
                                           ("wide_env/WideMoE-TokenBudget-v0", {"gating": {"accuracy": "rule"}}),
                                           ("wide_env/WideMoE-Synthetic-v0", {"n_tokens": 2})])
def test_single_step_equals_the_batch_step(env_id, config):
    """The single env's step (reused outcome buffer, fresh rows) reports what the general batch step reports
    for the same state and action: reward, truncation, every info key with its type, the observation."""
    env = gym.make(env_id, config=config).unwrapped
    ref = gym.make(env_id, config=config).unwrapped
    env.reset(seed=11)
    ref.reset(seed=11)
    rng = np.random.default_rng(1)
    for _ in range(40):
        action = rng.integers(0, 2, 8)
        obs, reward, _, truncated, info = env.step(action.astype(np.int8))
        outcome, trunc = ref._batch.step(ref.np_random, action.astype(bool)[None])
        ref_reward, ref_info = ref._batch.step_result_one(outcome)
        assert reward == ref_reward and truncated == bool(trunc[0])
        assert list(info) == list(ref_info)
        for key, value in ref_info.items():
            assert info[key] == value and type(info[key]) is type(value), key
        np.testing.assert_array_equal(_flat(obs), ref._batch.obs[0])
        if truncated:
            env.reset(seed=12)
            ref.reset(seed=12)


@pytest.mark.parametrize("clone", ["pickle", "deepcopy"])
def test_a_cloned_env_continues_like_the_original(clone):
    """A pickled or deep-copied env mid-episode steps exactly like the original, into observations of its own (its
    reused buffers are rebuilt, not copied apart from the arrays they view)."""
    import copy
    import pickle

    env = gym.make("wide_env/WideMoE-v0", config=SHORT)
    env.reset(seed=8)
    rng = np.random.default_rng(2)
    for _ in range(5):
        env.step(rng.integers(0, 2, 8).astype(np.int8))
    other = pickle.loads(pickle.dumps(env)) if clone == "pickle" else copy.deepcopy(env)
    for _ in range(2 * 32):
        action = rng.integers(0, 2, 8).astype(np.int8)
        a, b = env.step(action), other.step(action)
        assert a[1:4] == b[1:4] and a[4] == b[4]
        for key in a[0]:
            np.testing.assert_array_equal(a[0][key], b[0][key])
            assert not np.shares_memory(a[0][key], b[0][key])
        if a[3]:
            env.reset(seed=1)
            other.reset(seed=1)


def _copy(obs):
    return {k: v.copy() for k, v in obs.items()} if isinstance(obs, dict) else obs.copy()


def _flat(obs):
    return np.concatenate(list(obs.values())) if isinstance(obs, dict) else obs
