"""The step rule (wide_env.rules) against brute force, and its callers against it: the action validator,
the Simulator protocol, the accuracy source's errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from wide_env.config import ConfigError
from wide_env import rules


def _brute_serve(table, allowed):
    """Every server choice of every slot enumerated: the least sum, then the lexicographically least choice
    (lowest index first, skip = E last)."""
    K, W = table.shape
    E = W - 1
    options = [j for j in range(E) if allowed[j]] + [E]
    best = None
    for choice in itertools.product(options, repeat=K):
        cost = [table[k, j] for k, j in enumerate(choice)]
        key = (sum(cost), choice)
        if best is None or key < best:
            best = key
    return best


def test_serve_slots_is_the_least_deviation_with_ties_to_the_lowest_index():
    rng = np.random.default_rng(0)
    for _ in range(300):
        K, E = int(rng.integers(1, 4)), int(rng.integers(1, 5))
        table = rng.integers(0, 4, size=(K, E + 1)).astype(np.float64)  # small integers: many ties
        allowed = rng.random(E) < 0.5
        server = np.empty(K, dtype=np.int64)
        total = rules.serve_slots(table, (), allowed, server)
        want_total, want_server = _brute_serve(table, allowed)
        assert total == pytest.approx(want_total) and tuple(server.tolist()) == want_server
        # the batched wrapper is the same rule
        got_total, got_server = rules.serve_slots_batch(table[None], allowed[None])
        assert got_total[0] == total and got_server[0].tolist() == server.tolist()


def test_an_allowed_own_expert_is_kept_and_skip_wins_only_when_smaller():
    table = np.array([[0.0, 0.5, 0.5], [0.3, 0.0, 0.3]])  # slot 0 owns expert 0, slot 1 expert 1; skip = 0.5, 0.3
    server = np.empty(2, dtype=np.int64)
    assert rules.serve_slots(table, (), np.array([True, True]), server) == 0.0 and server.tolist() == [0, 1]
    assert rules.serve_slots(table, (), np.array([False, True]), server) == pytest.approx(0.5)
    assert server.tolist() == [1, 1]  # a tie between expert 1 and skip (0.5) goes to the expert
    assert rules.serve_slots(table, (), np.array([False, False]), server) == pytest.approx(0.8) and server.tolist() == [2, 2]


def test_the_violation_edge_is_1e_9_budget_units():
    unit = 2.0
    assert rules.violation(1.0 + 0.99e-9 * unit, 1.0, unit) == (False, 0.0)
    violated, overrun = rules.violation(1.0 + 1.01e-9 * unit, 1.0, unit)
    assert violated and overrun == pytest.approx(1.0 + 1.01e-9)
    assert rules.violation(3.0, 1.0, unit) == (True, 2.0)  # excess 2 = one unit: 1 + 1
    assert rules.budget_left(1.0, 1.5) == 0.0 and rules.budget_left(1.0, 0.25) == 0.75
    # the numpy wrappers apply the same function elementwise
    d = np.array([1.0, 1.0 + 2e-9 * unit, 3.0])
    assert rules.violated_of(d, 1.0, unit).tolist() == [False, True, True]
    np.testing.assert_array_equal(rules.overrun_of(d, 1.0, unit), [rules.violation(x, 1.0, unit)[1] for x in d])
    np.testing.assert_array_equal(rules.budget_left_of(np.array([1.0, -1.0]), 0.5), [0.5, 0.0])


def test_compose_reward_sums_its_terms_for_scalars_and_arrays():
    assert rules.compose_reward(-1.0, -2.0, -0.5, -0.25) == -3.75
    terms = [np.arange(3.0) * i for i in range(1, 5)]
    np.testing.assert_array_equal(rules.compose_reward(*terms), terms[0] + terms[1] + terms[2] + terms[3])
    assert rules.REWARD_TERMS == ("reward_energy", "reward_deviation", "reward_deadline", "reward_accuracy")


def test_the_accuracy_fold_adds_rows_and_decide_picks_the_best_candidate():
    values = np.array([[1.0, 0.0, 0.0, 0.5, 1.0], [0.0, 2.0, 0.0, 0.25, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    acc = np.zeros(rules.MAX_ACC_DIM)
    slot_rows = np.array([0, 1, 2, 2, 2, 2])  # K = 2 slots, 3 servers each
    rules.fold_slots(acc, values, slot_rows, np.array([1, 0]), 3)  # slot 0 -> row 1, slot 1 -> row 2 (zero)
    np.testing.assert_array_equal(acc[:5], values[1])
    base = np.array([0.0, -1.0, -3.0])  # the target leads
    assert rules.decide(base, acc, 5, 0.0, 0.2) == (False, False, 0.25)  # competitor 1 gains 2 logits: wrong
    assert rules.decide(base, np.zeros(8), 5, 0.0, 0.2) == (True, True, 0.0)
    assert rules.decide(base, np.zeros(8), 5, 10.0, 0.2)[:2] == (False, False)  # the context term lowers the full model


def test_one_action_validator_for_every_front_end():
    from wide_env.envs.actions import validate_action

    out = validate_action(np.array([1, 0, 1], dtype=np.int8), (3,), "one entry per expert")
    assert out.dtype == bool and out.shape == (1, 3) and out.tolist() == [[True, False, True]]
    assert validate_action(np.ones((2, 2, 3)), (6,), "x", alternative=(2, 3), num_envs=2).shape == (2, 6)
    big = np.ones((4, 100), dtype=np.int8)
    assert validate_action(big, (100,), "x", num_envs=4).all()
    for bad, match in [(np.ones(4), r"action has shape \(4,\); expected shape \(3,\)"),
                       (np.array([0, 2, 1]), r"0 or 1 \(got 2 at index \(1,\)\).*expected shape \(3,\)"),
                       (np.array([0.0, np.nan, 1.0]), r"0 or 1 \(got nan"),
                       (np.array(["1", "0", "1"]), r"dtype <U1; expected shape \(3,\)")]:
        with pytest.raises(ValueError, match=match):
            validate_action(bad, (3,), "one entry per expert")
    with pytest.raises(ValueError, match=r"actions have shape \(3,\); expected shape \(2, 3\).*one sub-env's action"):
        validate_action(np.ones(3), (3,), "x", num_envs=2)
    with pytest.raises(ValueError, match=r"got -1 at index \(1, 99\)"):
        big[1, 99] = -1
        validate_action(big, (100,), "x", num_envs=4)


def test_both_simulators_satisfy_the_simulator_protocol():
    import gymnasium as gym

    from wide_env.sim.protocol import Simulator

    for env_id in ("wide_env/WideMoE-v0", "wide_env/WideMoEPrefill-v0"):
        env = gym.make(env_id)
        assert isinstance(env.unwrapped.sim, Simulator)
        assert env.unwrapped.episode_batch.sim is env.unwrapped.sim
        env.reset(seed=0)
        assert env.unwrapped.episode_batch.state is not None
    vec = gym.make_vec("wide_env/WideMoE-v0", num_envs=2, vectorization_mode="vector_entry_point")
    assert isinstance(vec.unwrapped.episode_batch.sim, Simulator)


def test_an_explicit_accuracy_request_that_cannot_be_honoured_is_a_config_error(tmp_path):
    import gymnasium as gym

    from wide_env.profiles import profile_trace

    with pytest.raises(ConfigError, match=r"gating\.accuracy.*'rule'.*logit-effect tables"):
        gym.make("wide_env/WideMoE-v0", config={"gating": {"source": "synthetic", "accuracy": "rule"}})
    data = dict(np.load(profile_trace("tiny")))
    for key in ("token_id", "target_id"):
        data.pop(key, None)
    np.savez(tmp_path / "no_text.npz", **data)
    with pytest.raises(ConfigError, match=r"gating\.accuracy.*'model'.*token_id"):
        gym.make("wide_env/WideMoE-v0", config={"gating": {"trace_path": str(tmp_path / "no_text.npz"),
                                                           "accuracy": "model"}})
    with pytest.raises(ConfigError, match=r"gating\.accuracy.*prefill"):
        gym.make("wide_env/WideMoEPrefill-v0", config={"gating": {"accuracy": "rule"}})
