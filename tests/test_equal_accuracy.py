"""Energy at equal real accuracy (baselines.equal_accuracy) on hand-made curves and paired samples."""

from __future__ import annotations

import numpy as np
import pytest

from baselines.equal_accuracy import (accuracy_energy_front, energy_at_accuracy, episode_matrix, mix_at_accuracy,
                                      paired_energy_ratio)


def test_front_is_the_lower_convex_envelope_from_the_cheapest_to_the_most_accurate_point():
    # (accuracy, energy): p2 lies above the chord p1-p3 (not used by a mixing baseline), p5 costs more than p4
    # for less accuracy, p6 repeats p3's accuracy at a higher energy
    acc = [0.20, 0.30, 0.35, 0.40, 0.44, 0.42, 0.40]
    eng = [0.0, 2.0, 4.5, 5.0, 10.0, 11.0, 7.0]
    front = accuracy_energy_front(eng, acc)
    assert front.index.tolist() == [0, 1, 3, 4]
    assert front.accuracy.tolist() == [0.20, 0.30, 0.40, 0.44]
    assert front.energy.tolist() == [0.0, 2.0, 5.0, 10.0]


def test_points_left_of_the_cheapest_point_are_not_on_the_front():
    # more energy for less accuracy than the cheapest point: never chosen
    front = accuracy_energy_front([3.0, 1.0, 2.0], [0.1, 0.3, 0.4])
    assert front.index.tolist() == [1, 2]


def test_interpolation_between_two_vertices_and_the_mixing_shares():
    front = accuracy_energy_front([0.0, 2.0, 5.0, 10.0], [0.20, 0.30, 0.40, 0.44])
    point = energy_at_accuracy(front, 0.37)
    # between (0.30, 2) and (0.40, 5): lambda = 0.7 of the upper vertex
    assert point.status == "interpolated"
    assert point.energy == pytest.approx(0.3 * 2.0 + 0.7 * 5.0)
    assert point.weights == pytest.approx({1: 0.3, 2: 0.7})
    # the mixture's violation rate mixes alike
    assert mix_at_accuracy(point, [0.5, 0.1, 0.2, 0.0]) == pytest.approx(0.3 * 0.1 + 0.7 * 0.2)
    exact = energy_at_accuracy(front, 0.40)
    assert exact.energy == 5.0 and exact.weights == {2: 1.0}


def test_out_of_range_targets_are_flagged_not_extrapolated():
    front = accuracy_energy_front([1.0, 2.0], [0.3, 0.4])
    above = energy_at_accuracy(front, 0.41)
    below = energy_at_accuracy(front, 0.29)
    assert above.status == "above" and above.energy == float("inf") and not above.weights
    assert below.status == "below" and np.isnan(below.energy)
    assert np.isnan(mix_at_accuracy(below, [0.0, 0.0]))


def test_bad_curves_are_rejected():
    with pytest.raises(ValueError, match="equal length"):
        accuracy_energy_front([1.0, 2.0], [0.3])
    with pytest.raises(ValueError, match="finite"):
        accuracy_energy_front([1.0, np.nan], [0.3, 0.4])


def _paired_samples(n=40, seed=1):
    """Episodes with large shared effects: episode i scales every policy's energy by c_i and shifts every
    policy's accuracy by b_i (same channels, same tokens); the policies differ by fixed amounts."""
    rng = np.random.default_rng(seed)
    c = rng.uniform(0.2, 3.0, n)
    b = rng.uniform(-0.2, 0.2, n)
    e_settings, d_settings = np.array([4.0, 2.0]), np.array([0.05, -0.05])
    base_e = c[None] * e_settings[:, None]
    base_a = 0.4 + b[None] + d_settings[:, None]
    agent_e = c * 2.4
    agent_a = 0.4 + b + 0.02  # lambda = (0.02 + 0.05) / 0.1 = 0.7 of the way from the cheap setting to the rich one
    return agent_e, agent_a, base_e, base_a, c


def test_paired_ratio_matches_the_hand_computation_and_pairing_removes_the_shared_noise():
    agent_e, agent_a, base_e, base_a, c = _paired_samples()
    res = paired_energy_ratio(agent_e, agent_a, base_e, base_a, n_boot=300, seed=0)
    expected = 2.4 / (0.7 * 4.0 + 0.3 * 2.0)
    assert res["status"] == "interpolated"
    assert res["ratio"] == pytest.approx(expected)
    assert res["baseline_energy"] == pytest.approx(c.mean() * (0.7 * 4.0 + 0.3 * 2.0))
    # every paired replicate shifts agent and baseline alike: the ratio is the same in each, the CI a point
    assert res["ci_low"] == pytest.approx(expected) and res["ci_high"] == pytest.approx(expected)
    # without pairing (the agent's episodes shuffled against the baseline's) the interval is wide
    perm = np.random.default_rng(5).permutation(len(agent_e))
    unpaired = paired_energy_ratio(agent_e[perm], agent_a, base_e, base_a, n_boot=300, seed=0)
    assert unpaired["ci_high"] - unpaired["ci_low"] > 0.1


def test_paired_ratio_reports_out_of_range_replicates():
    agent_e, agent_a, base_e, base_a, _ = _paired_samples()
    res = paired_energy_ratio(agent_e, agent_a + 0.2, base_e, base_a, n_boot=100)
    # the baseline cannot reach the agent's accuracy: the ratio is bounded by its most accurate setting's energy
    assert res["status"] == "above" and res["ratio"] == pytest.approx(2.4 / 4.0)
    assert res["ci_low"] == pytest.approx(0.6) and res["ci_high"] == pytest.approx(0.6)
    low = paired_energy_ratio(agent_e, agent_a - 0.2, base_e, base_a, n_boot=100)
    assert low["status"] == "below" and np.isnan(low["ratio"]) and low["out_of_range"] == 1.0


def test_paired_ratio_needs_the_same_episodes():
    agent_e, agent_a, base_e, base_a, _ = _paired_samples()
    with pytest.raises(ValueError, match="same episodes"):
        paired_energy_ratio(agent_e[:-1], agent_a[:-1], base_e, base_a)


def _record(policy, scale, seed, energy, acc, tokens=4):
    return {"policy": policy, "budget_scale": scale, "seed": seed, "energy_j": energy * tokens, "tokens": tokens,
            "accuracy_correct": acc}


def test_episode_matrix_orders_by_scale_and_seed_and_checks_the_pairing():
    rows = [_record("b", 2.0, 1, 1.0, 0.3), _record("b", 1.0, 1, 3.0, 0.5), _record("b", 2.0, 0, 2.0, 0.2),
            _record("b", 1.0, 0, 4.0, 0.4), _record("a", 1.0, 0, 9.0, 0.9)]
    energy, scales = episode_matrix(rows, "b", "energy_per_token")
    assert scales == [1.0, 2.0] and energy.tolist() == [[4.0, 3.0], [2.0, 1.0]]
    acc, _ = episode_matrix(rows, "b", "accuracy_correct")
    assert acc.tolist() == [[0.4, 0.5], [0.2, 0.3]]
    with pytest.raises(ValueError, match="not the same episodes"):
        episode_matrix(rows + [_record("b", 2.0, 7, 1.0, 0.1)], "b", "energy_per_token")
    with pytest.raises(ValueError, match="no episodes"):
        episode_matrix(rows, "c", "energy_per_token")
