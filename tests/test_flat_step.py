"""The vector step's cheaper data paths keep every number: the slot tables the kernel derives (wide_env.rules.
slot_table) and the plan's derived deviation tables equal the gathered ones bit for bit, a plan's derived table
follows writes to its Top-K sets (assign, take, concat), and the vector info's arrays are the step's own columns."""

import gymnasium as gym
import numpy as np
import pytest

import wide_env  # noqa: F401  (registers the ids)
from wide_env import rules
from wide_env.sim.decode.plan import assign_plan, concat_plans, take_plan
from wide_env.sim.gating_rows import position_gating_rows

pytestmark = pytest.mark.filterwarnings("ignore:profile .* accuracy in info comes from the logit-effect rule")


def _old_slot_table(mismatch, layer, topk_idx, topk_weight):
    """The numpy formula the rule replaced (a take of kappa_l D_l rows times the weights): the reference."""
    E = mismatch.shape[1]
    rows = np.asarray(layer)[..., None] * E + topk_idx
    return np.take(mismatch.reshape(-1, E + 1), rows, axis=0) * topk_weight[..., None]


@pytest.mark.parametrize("weight_dtype", [np.float64, np.float32])
def test_slot_table_equals_the_numpy_formula_bit_for_bit(weight_dtype):
    rng = np.random.default_rng(3)
    L, E, K, R = 5, 8, 3, 4000
    mismatch = rng.lognormal(0.0, 2.0, (L, E, E + 1))
    layer = rng.integers(0, L, R)
    topk_idx = np.argsort(rng.random((R, E)), axis=1)[:, :K]
    topk_weight = rng.random((R, K)).astype(weight_dtype)
    got = rules.slot_table_batch(mismatch, layer, topk_idx, topk_weight)
    assert got.shape == (R, K, E + 1) and got.dtype == np.float64
    assert got.tobytes() == _old_slot_table(mismatch, layer, topk_idx, topk_weight).tobytes()
    one = np.empty((K, E + 1))
    rules.slot_table(mismatch, layer[7], topk_idx, topk_weight.astype(np.float64), (7,), one)  # the kernel's call
    assert one.tobytes() == got[7].tobytes()


def _vector(num_envs=6, seed=1):
    env = gym.make_vec("wide_env/WideMoE-v0", num_envs=num_envs, vectorization_mode="vector_entry_point")
    env.reset(seed=seed)
    return env


def test_a_trace_plan_derives_the_gathered_deviation_tables():
    env = _vector()
    sim, state = env.episode_batch.sim, env.episode_batch.state
    plan = state.plan
    assert "_deviation_table" not in plan.__dict__ or plan.__dict__["_deviation_table"] is None  # none gathered
    C, L, n = plan.topk_idx.shape[:3]
    positions = state.start + np.minimum(state.chunk_start + np.arange(C)[:, None], sim.n_tokens - 1)
    table = position_gating_rows(sim.scenario.source, sim.scenario.weighted_mismatch)
    want = table.deviation_table.take((positions[:, None, :] * L + np.arange(L)[:, None]).reshape(-1), axis=0)
    assert plan.deviation_table.tobytes() == want.tobytes()
    assert plan.deviation_table.shape == (C, L, n) + want.shape[1:]
    env.close()


def test_derived_tables_follow_take_concat_and_assign():
    env = _vector()
    core = env.episode_batch
    plan = core.state.plan
    full = plan.deviation_table.copy()
    taken = take_plan(plan, [4, 1])
    assert taken.deviation_table.tobytes() == full[:, :, [4, 1]].tobytes()
    joined = concat_plans([take_plan(plan, [0]), take_plan(plan, [5, 2])])
    assert joined.deviation_table.tobytes() == full[:, :, [0, 5, 2]].tobytes()
    assign_plan(plan, np.array([0, 3]), take_plan(plan, [2, 5]))  # rows 0 and 3 now hold rows 2 and 5's tokens
    assert plan.deviation_table[:, :, [0, 3]].tobytes() == full[:, :, [2, 5]].tobytes()
    assert plan.deviation_table[:, :, [1, 2, 4, 5]].tobytes() == full[:, :, [1, 2, 4, 5]].tobytes()
    env.close()


def test_vector_info_arrays_are_fresh_columns_of_each_step():
    env = _vector(num_envs=5)
    rng = np.random.default_rng(0)
    _, _, _, _, first = env.step(rng.integers(0, 2, (5, 8)).astype(np.int8))
    kept = {key: np.array(value) for key, value in first.items() if not key.startswith("_")}
    _, _, _, _, second = env.step(rng.integers(0, 2, (5, 8)).astype(np.int8))
    for key, value in kept.items():  # the next step wrote elsewhere: the first step's info is unchanged
        assert np.array_equal(first[key], value), key
        assert not np.shares_memory(first[key], second[key]), key
    floats = [k for k in env.info_keys if second[k].dtype == np.float64]
    ints = [k for k in env.info_keys if second[k].dtype == np.int64]
    assert len(floats) + len(ints) == len(env.info_keys) and all(second[k].shape == (5,) for k in env.info_keys)
    before = {key: second[key].copy() for key in env.info_keys}
    second["energy_j"][:] = -1.0  # a user's write to one key changes no other key
    assert all(np.array_equal(second[k], before[k]) for k in env.info_keys if k != "energy_j")
    env.close()
