"""Fast fading within an uplink (wide_env.sim.slots) and the fast-fading SiftMoE baseline."""

import numpy as np
import pytest

from wide_env.sim import slots
from wide_env.sim.physics import inversion_energy
from wide_env.sim.units import dbm_to_watt

N0 = float(dbm_to_watt(-174.0))
B_HZ = 1.0e5
TAU = 0.0095
M = 2.0


def test_quadrature_matches_gamma_moments():
    h, w = slots.gamma_quadrature(M, 48)
    assert w.sum() == pytest.approx(1.0)
    assert (w * h).sum() == pytest.approx(1.0, rel=1e-12)  # mean 1
    assert (w * h * h).sum() == pytest.approx(1.0 + 1.0 / M, rel=1e-10)  # E[h^2] = 1 + 1/m
    h3, w3 = slots.gamma_quadrature(3.5, 32)
    assert (w3 * h3).sum() == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("m", [1.0, 0.5])
def test_m_at_most_one_raises_clear_error(m):
    with pytest.raises(ValueError, match="nakagami_m"):
        slots.expected_inverse_gain(m)
    with pytest.raises(ValueError, match="E\\[1/h\\] is infinite"):
        slots.surrogate_energy(1024.0, TAU, 1e-8, B_HZ, N0, m)
    with pytest.raises(ValueError, match="infinite"):
        slots.expected_energy_dp(1024.0, TAU, 1e-8, B_HZ, N0, m, 4)
    # realised uniform energies need no expectation: fine for Rayleigh
    out = slots.realised_uniform(1024.0, TAU, 1e-8, np.full(4, 0.7), B_HZ, N0)
    assert np.isfinite(out.energy)


def test_surrogate_equals_uniform_expectation_for_any_slots():
    G = np.array([1e-4, 1e-6, 2e-9])
    sur = slots.surrogate_energy(1024.0, TAU, G, B_HZ, N0, M)
    assert np.allclose(sur, 2.0 * inversion_energy(1024.0, TAU, G, B_HZ, N0))  # E[1/h] = 2 for m = 2
    for S in (1, 2, 5, 16):
        assert np.allclose(slots.expected_energy_uniform(1024.0, TAU, G, B_HZ, N0, M, S), sur, rtol=1e-12)


def test_single_slot_reduces_to_single_window_inversion_exactly():
    rng = np.random.default_rng(0)
    G = rng.uniform(10, 150, size=50) ** -4.0
    h = rng.gamma(M, 1 / M, size=(50, 1))
    for policy in ("uniform", "dp"):
        out = slots.allocate_bits(policy, 2048.0, TAU, G, h, B_HZ, N0, M)
        np.testing.assert_array_equal(out.energy, inversion_energy(2048.0, TAU, G * h[:, 0], B_HZ, N0))
        np.testing.assert_array_equal(out.bits[:, 0], 2048.0)
    assert np.array_equal(slots.expected_energy_dp(2048.0, TAU, G, B_HZ, N0, M, 1),
                          slots.expected_energy_uniform(2048.0, TAU, G, B_HZ, N0, M, 1))


def test_dp_expected_energy_never_above_uniform_over_a_grid():
    d = np.array([10.0, 40.0, 90.0, 150.0])
    bits = np.array([16.0, 256.0, 1024.0, 4096.0])  # spectral loads D S / (B tau) from 0.005 to 33 bit/s/Hz
    G = d[:, None] ** -4.0
    for S in (2, 3, 4, 8):
        for tau in (0.01, 0.07):
            uni = slots.expected_energy_uniform(bits[None, :], tau, G, B_HZ, N0, M, S)
            dp = slots.expected_energy_dp(bits[None, :], tau, G, B_HZ, N0, M, S)
            assert dp.shape == (4, 4)
            assert np.all(dp <= uni)
            assert np.all(dp < 0.95 * uni)  # fast fading with m = 2 always leaves a real saving


def test_dp_saving_grows_with_slots_and_vanishes_for_near_static_fading():
    G = 1e-8
    saving = [1 - slots.expected_energy_dp(1024.0, TAU, G, B_HZ, N0, M, S)
              / slots.expected_energy_uniform(1024.0, TAU, G, B_HZ, N0, M, S) for S in (2, 4, 8)]
    assert saving[0] < saving[1] < saving[2]
    hi = slots.expected_energy_dp(1024.0, TAU, G, B_HZ, N0, 400.0, 4)
    uni = slots.expected_energy_uniform(1024.0, TAU, G, B_HZ, N0, 400.0, 4)
    assert hi <= uni and hi > 0.97 * uni  # m = 400: gains barely vary, little to gain


@pytest.mark.parametrize("S", [2, 4, 8])
def test_realised_dp_beats_uniform_on_average_and_matches_its_expectation(S):
    rng = np.random.default_rng(123)
    n = 20000
    G = 90.0 ** -4.0
    h = slots.draw_slot_fading(rng, (n,), M, S)
    dp = slots.allocate_bits("dp", 1024.0, TAU, G, h, B_HZ, N0, M)
    uni = slots.allocate_bits("uniform", 1024.0, TAU, G, h, B_HZ, N0, M)
    assert dp.energy.mean() <= uni.energy.mean()
    expected = slots.expected_energy_dp(1024.0, TAU, G, B_HZ, N0, M, S)
    se = dp.energy.std() / np.sqrt(n)
    assert abs(dp.energy.mean() - expected) < 4 * se + 0.01 * expected


def test_allocations_sum_to_payload_and_are_nonnegative_and_causal():
    rng = np.random.default_rng(5)
    G = rng.uniform(10, 150, size=(30, 4)) ** -4.0
    bits = rng.choice([0.0, 16.0, 1024.0, 65536.0], size=(30, 4))
    h = slots.draw_slot_fading(rng, (30, 4), M, 6)
    out = slots.allocate_bits("dp", bits, TAU, G, h, B_HZ, N0, M)
    assert out.bits.shape == (30, 4, 6)
    assert (out.bits >= 0).all()
    np.testing.assert_allclose(out.bits.sum(axis=-1), bits, rtol=1e-12, atol=0)
    assert (out.energy[bits == 0] == 0).all()
    # causality: changing the future gains never changes the first slot's decision
    h2 = h.copy()
    h2[..., 1:] = rng.gamma(M, 1 / M, size=h2[..., 1:].shape)
    out2 = slots.allocate_bits("dp", bits, TAU, G, h2, B_HZ, N0, M)
    np.testing.assert_allclose(out.bits[..., 0], out2.bits[..., 0], rtol=1e-12)  # (up to the final rescaling)
    # a good current slot gets more bits than a bad one
    one = slots.allocate_bits("dp", 1024.0, TAU, 1e-8, np.array([[3.0, 1, 1, 1], [0.1, 1, 1, 1]]), B_HZ, N0, M)
    assert one.bits[0, 0] > 1024.0 / 4 > one.bits[1, 0]


def test_slot_count_validated():
    with pytest.raises(ValueError, match="uplink_slots"):
        slots.expected_energy_uniform(1024.0, TAU, 1e-8, B_HZ, N0, M, 0)
    with pytest.raises(ValueError, match="bit_allocation"):
        slots.allocate_bits("greedy", 1024.0, TAU, 1e-8, np.ones(3), B_HZ, N0, M)


def test_fast_fading_siftmoe_selects_with_surrogate_and_dp_saves_energy():
    from baselines.fast_fading import siftmoe_fast_fading
    from baselines.reference import brute_force_decode

    rng = np.random.default_rng(0)
    Bn, E, K, S = 40, 6, 2, 4
    G = rng.uniform(10, 150, size=(Bn, E)) ** -4.0
    dev = rng.uniform(0.0, 1.0, size=(Bn, K, E + 1))
    budget = np.full(Bn, 0.6)
    h = rng.gamma(M, 1 / M, size=(Bn, E, S))
    kw = dict(bits=1024.0, bandwidth_hz=B_HZ, noise_psd_w_hz=N0, m=M)
    dp = siftmoe_fast_fading(G, TAU, dev, budget, h, allocation="dp", **kw)
    uni = siftmoe_fast_fading(G, TAU, dev, budget, h, allocation="uniform", **kw)
    np.testing.assert_array_equal(dp.mask, uni.mask)  # selection does not depend on the allocation
    sur = slots.surrogate_energy(1024.0, TAU, G, B_HZ, N0, M)
    for b in range(Bn):  # the selection is the exact optimum of the surrogate problem
        best = brute_force_decode(sur[b], np.ones(E, bool), dev[b], budget[b])[0]
        assert np.where(dp.mask[b], sur[b], 0).sum() == pytest.approx(best, rel=1e-9)
    assert (dp.expected_energy <= uni.expected_energy).all()
    assert dp.expected_energy.sum() < 0.9 * uni.expected_energy.sum()
    np.testing.assert_allclose(uni.expected_energy, np.where(dp.mask, sur, 0).sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(dp.outcome.bits.sum(axis=-1), np.where(dp.mask, 1024.0, 0.0), rtol=1e-12)
