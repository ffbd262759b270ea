"""The step kernel's looked-up entry (wide_env.sim.decode.kernel_entry): used only for the usual buffer types, and a
step through it equals the same step through numba's dispatcher, whatever buffers the caller hands in."""

import copy

import numpy as np
import pytest

from wide_env.config import WideConfig
from wide_env.gating import make_gating_source
from wide_env.sim.decode import DecodeSimulator
from wide_env.sim.decode import simulator as simulator_module
from wide_env.compiled_entry import KernelEntries, types_key
from wide_env.sim.decode.kernel_entry import usual_outcome, usual_step_buffers
from wide_env.sim.decode.state import empty_outcome


def make_sim(**config):
    cfg = WideConfig.from_dict({"gating": {"source": "synthetic"}, **config})
    return DecodeSimulator(cfg, make_gating_source(cfg))


def test_only_the_usual_buffer_types_are_usual():
    executed, obs = np.zeros((2, 8), bool), np.zeros((2, 5), np.float32)
    assert usual_step_buffers(executed, obs)
    readonly = executed.copy()
    readonly.flags.writeable = False
    for e, o in [(executed[0], obs), (executed.astype(np.int8), obs), (readonly, obs), (np.zeros((8, 2), bool).T, obs),
                 (executed, obs.astype(np.float64)), (executed, obs[:, ::2]), (executed, obs[0])]:
        assert not usual_step_buffers(e, o)
    out = empty_outcome(2, 2)
    assert usual_outcome(out)
    bad = empty_outcome(2, 2)
    bad.values = np.asfortranarray(bad.values)
    assert not usual_outcome(bad)
    a = np.zeros((3, 4))
    assert types_key([a]) == types_key([np.ones((5, 2))])
    assert types_key([a]) != types_key([a[:, ::2]]) != types_key([a.astype(np.float32)])


@pytest.mark.parametrize("how", ["fortran_obs", "readonly_executed", "int_executed", "rows", "fresh_out"])
def test_a_step_with_other_buffers_equals_the_usual_step(how):
    """The same state stepped with the usual buffers (through the looked-up entry after the first step) and with
    other buffers (through the dispatcher) gives the same outcomes, observations and states."""
    sim = make_sim(n_tokens=3)
    state = sim.reset(np.random.default_rng(4), 3, chunk=2)  # chunks shorter than the episode: replans too
    other = copy.deepcopy(state)
    rng_a, rng_b = np.random.default_rng(9), np.random.default_rng(9)
    actions = np.random.default_rng(1).integers(0, 2, (3 * sim.n_layers, 3, sim.n_experts)).astype(bool)
    out = sim.outcome_buffer(3)
    for t, action in enumerate(actions):
        obs_a = np.empty((3, sim.obs_size), np.float32)
        got = sim.step(rng_a, state, action.copy(), obs_a, out=out)
        assert simulator_module._STEP_ENTRIES.get(state.kernel_args[5]) is not None  # learnt after the first step
        obs_b = np.asfortranarray(np.empty((3, sim.obs_size), np.float32)) if how == "fortran_obs" else \
            np.empty((3, sim.obs_size), np.float32)
        executed = action.copy()
        if how == "readonly_executed":
            executed.flags.writeable = False
        elif how == "int_executed":
            executed = executed.astype(np.int64)
        rows = np.ones(3, bool) if how == "rows" else None
        want = sim.step(rng_b, other, executed, obs_b, rows=rows, out=None if how == "fresh_out" else
                        sim.outcome_buffer(3))
        np.testing.assert_array_equal(got.values, want.values)
        np.testing.assert_array_equal(got.counts, want.counts)
        np.testing.assert_array_equal(obs_a, obs_b)
        np.testing.assert_array_equal(state.counters, other.counters)
        np.testing.assert_array_equal(state.amounts, other.amounts)
    assert state.done.all() and other.done.all()


def test_a_plain_function_has_no_entries():
    """Without numba's JIT (NUMBA_DISABLE_JIT=1 makes the kernel a plain function) nothing is learnt: every call
    goes to the function itself."""
    entries = KernelEntries(lambda *args: 0)
    key = entries.key_id(types_key([np.zeros(3)]))
    assert entries.key_id(types_key([np.ones(3)])) == key
    entries.learn(key, (1, np.zeros(3)))
    assert entries.get(key) is None


def test_the_table_describes_the_arrays_and_step_one_equals_step(monkeypatch):
    """kernel_table: the table holds each array's address and axis lengths, and the single env's step through it
    (DecodeSimulator.step_one, after its warm-up steps through the usual entry) equals the dispatcher's step, replans
    included (chunks shorter than the episode)."""
    from wide_env.sim.decode import kernel_table

    monkeypatch.setattr(kernel_table, "_warm", [3])  # three steps through the usual entry, then the table
    sim = make_sim(n_tokens=5)
    state = sim.reset(np.random.default_rng(4), 1, chunk=2)
    other = copy.deepcopy(state)
    plan, packed, consts, rows, replan, _ = sim._kernel_args(state)
    out = sim.outcome_buffer(1)
    arrays = plan + packed + consts + (rows, out.values, out.counts, replan)
    assert kernel_table.fits(arrays) and not kernel_table.fits(arrays[:-1] + (replan.astype(np.int64),))
    table = kernel_table.table_of(plan, packed, consts, rows, out.values, out.counts, replan)
    for row, a in zip(table, arrays):
        assert row[0] == a.ctypes.data and tuple(row[1:1 + a.ndim]) == a.shape and not row[1 + a.ndim:].any()
    rng_a, rng_b = np.random.default_rng(9), np.random.default_rng(9)
    actions = np.random.default_rng(1).integers(0, 2, (5 * sim.n_layers, 1, sim.n_experts)).astype(bool)
    other_out = sim.outcome_buffer(1)
    for t, action in enumerate(actions):
        obs_a, obs_b = np.empty((1, sim.obs_size), np.float32), np.empty((1, sim.obs_size), np.float32)
        sim.step_one(rng_a, state, action.copy(), obs_a, out)
        assert (sim._one[2] is None) == (t < 3)  # warming up, then the table's entry
        want = sim.step(rng_b, other, action.copy(), obs_b, out=other_out)
        np.testing.assert_array_equal(out.values, want.values)
        np.testing.assert_array_equal(out.counts, want.counts)
        np.testing.assert_array_equal(obs_a, obs_b)
        np.testing.assert_array_equal(state.counters, other.counters)
        np.testing.assert_array_equal(state.amounts, other.amounts)
    assert sim._one[2] is not None  # the table's entry was used
    assert state.done.all() and other.done.all()
