"""Physics sanity: fading statistics, rate/energy formulas, monotonicity, the deviation estimate."""

import math

import numpy as np
import pytest

from wide_env.sim.channel import NakagamiFading, draw_distances
from wide_env.sim.pathloss import path_gain
from wide_env.sim.physics import LinkParameters, inversion_energy, node_costs, shannon_rate
from wide_env.sim.deviation import deviation_estimate, serve_slots, slot_deviation_table
from wide_env.sim.units import bessel_j0, dbm_to_watt


@pytest.mark.parametrize("m", [1.0, 2.0, 3.5])
def test_nakagami_gain_has_unit_mean_and_inverse_mean(m):
    rng = np.random.default_rng(0)
    fading = NakagamiFading(m, 0.0)
    h = fading.gain(fading.init(rng, (400_000,)))
    assert abs(h.mean() - 1.0) < 0.01
    assert abs(h.var() - 1.0 / m) < 0.02  # Gamma(m, 1/m) variance
    if m > 1:
        # E[1/h] = m / (m - 1); heavy tail for small m, so compare loosely
        assert abs(np.mean(1.0 / h) - m / (m - 1)) / (m / (m - 1)) < 0.05


@pytest.mark.parametrize("m", [1.0, 2.0, 3.0])
def test_uncorrelated_gain_follows_the_gamma_law(m):
    """Without correlation, integer m draws the gain as a sum of exponentials: compare its whole
    distribution with numpy's Gamma(m, 1/m) sampler (two-sample Kolmogorov-Smirnov distance)."""
    rng = np.random.default_rng(5)
    ours = np.sort(NakagamiFading(m, 0.0).init(rng, (200_000,))[:, 0])
    reference = np.sort(rng.gamma(m, 1.0 / m, size=200_000))
    grid = np.quantile(reference, np.linspace(0.001, 0.999, 999))
    ks = np.abs(np.searchsorted(ours, grid) - np.searchsorted(reference, grid)).max() / 200_000
    assert ks < 0.01  # the 1% critical value at these sizes is about 0.005


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_ar1_lag1_correlation_matches_rho(rho):
    rng = np.random.default_rng(1)
    fading = NakagamiFading(2.0, rho)
    state = fading.init(rng, (50_000,))
    nxt = fading.advance(rng, state)
    # each Gaussian component is AR(1) with correlation rho; the power gain then has correlation rho^2
    # (without correlation the state is the Gamma-distributed gain itself)
    if rho > 0:
        comp = np.corrcoef(state[..., 0], nxt[..., 0])[0, 1]
        assert abs(comp - rho) < 0.02
    power = np.corrcoef(fading.gain(state), fading.gain(nxt))[0, 1]
    assert abs(power - rho * rho) < 0.02
    assert abs(fading.gain(nxt).mean() - 1.0) < 0.02  # stationary
    assert abs(fading.gain(nxt).var() - 0.5) < 0.03  # Gamma(2, 1/2)


def test_static_fading_when_rho_is_one():
    rng = np.random.default_rng(2)
    fading = NakagamiFading(2.0, 1.0)
    state = fading.init(rng, (10,))
    assert np.array_equal(fading.advance(rng, state), state)


def test_jakes_correlation_uses_bessel_j0():
    assert abs(bessel_j0(0.0) - 1.0) < 1e-12
    assert abs(bessel_j0(2.404825557695773)) < 1e-9  # first zero of J0


def test_rate_and_inversion_energy_match_formula_at_known_distance():
    d, alpha = 100.0, 4.0
    g = path_gain(d, alpha) * 1.0  # h = 1
    assert g == pytest.approx(1e-8)
    n0 = dbm_to_watt(-174.0)  # W/Hz
    assert n0 == pytest.approx(3.981e-21, rel=1e-3)
    B, bits, tau = 1e6, 65536.0, 0.05
    rate = shannon_rate(0.2, g, B, n0)
    assert rate == pytest.approx(B * math.log2(1 + 0.2 * 1e-8 / (n0 * B)))
    energy = inversion_energy(bits, tau, g, B, n0)
    assert energy == pytest.approx(tau * (n0 * B / g) * (2 ** (bits / (B * tau)) - 1))
    # sending at exactly that power for tau delivers exactly the bits
    power = energy / tau
    assert shannon_rate(power, g, B, n0) * tau == pytest.approx(bits)


def _costs(gain, bits=65536.0, model="inversion"):
    link = LinkParameters(bits=bits, bandwidth_hz=1e6, noise_psd_w_hz=float(dbm_to_watt(-174.0)), user_max_power_w=0.2,
                          helper_power_w=float(dbm_to_watt(38.0)), deadline_s=0.1, load_time_s=0.01,
                          compute_time_s=0.001, helper_compute_power_w=300.0, local_compute_power_w=30.0,
                          uplink_model=model)
    return node_costs(np.asarray(gain, float), link)


@pytest.mark.parametrize("model", ["inversion", "fixed"])
def test_energy_grows_with_distance_and_payload(model):
    distances = np.array([10.0, 30.0, 60.0, 100.0, 150.0])
    costs = _costs(path_gain(distances, 4.0), model=model)
    assert np.all(np.diff(costs.uplink_energy) > 0)
    assert np.all(np.diff(costs.latency) >= 0)
    small, big = _costs(path_gain(100.0, 4.0), bits=1e4, model=model), _costs(path_gain(100.0, 4.0), bits=1e5, model=model)
    assert big.uplink_energy > small.uplink_energy


def test_inversion_infeasible_link_falls_back_to_max_power_and_misses_deadline():
    costs = _costs(np.array([1e-20]))  # hopeless channel
    assert costs.uplink_power[0] == pytest.approx(0.2)
    assert costs.latency[0] > 0.1


def test_inversion_feasible_latency_equals_deadline():
    costs = _costs(path_gain(np.array([50.0]), 4.0))
    assert costs.latency[0] == pytest.approx(0.1)
    assert costs.uplink_power[0] < 0.2


def test_distances_are_uniform_in_area_inside_annulus():
    d = draw_distances(np.random.default_rng(0), (200_000,), 10.0, 150.0)
    assert d.min() >= 10.0 and d.max() <= 150.0
    # P(d <= r) = (r^2 - rmin^2) / (rmax^2 - rmin^2)
    assert np.mean(d <= 80.0) == pytest.approx((80**2 - 100) / (150**2 - 100), abs=0.005)


def test_deviation_estimate_matches_hand_computation():
    # one layer, E = 3 experts, K = 2; D[i, j], last column = skip
    mismatch = np.array([[[0.0, 2.0, 5.0, 3.0],
                          [1.5, 0.0, 4.0, 2.5],
                          [6.0, 1.0, 0.0, 4.0]]])
    topk_idx = np.array([[0, 1]])
    weight = np.array([[0.7, 0.3]])
    table = slot_deviation_table(mismatch, np.array([0]), topk_idx, weight)
    cases = {
        (1, 1, 0): 0.0,  # Top-K executed
        (1, 0, 0): 0.3 * 1.5,  # slot 1 (expert 1) served by expert 0: D(1,0)=1.5 < skip 2.5
        (0, 1, 0): 0.7 * 2.0,  # slot 0 served by expert 1: D(0,1)=2.0 < skip 3.0
        (0, 0, 0): 0.7 * 3.0 + 0.3 * 2.5,  # both skipped
        (0, 0, 1): 0.7 * 3.0 + 0.3 * 2.5,  # expert 2 is a worse stand-in than skipping for both
    }
    for mask, expected in cases.items():
        executed = np.array([mask], dtype=bool)
        assert deviation_estimate(table, executed)[0] == pytest.approx(expected)
    _, server = serve_slots(table, np.array([[1, 0, 0]], dtype=bool))
    assert server.tolist() == [[0, 0]]
    _, server = serve_slots(table, np.array([[0, 0, 1]], dtype=bool))
    assert server.tolist() == [[3, 3]]  # 3 = skip


@pytest.mark.parametrize("rho", [0.0, 0.6, 0.95, 1.0])
def test_batched_fading_sequence_has_the_ar1_law(rho):
    """sequence() draws many steps at once; it must keep the stationary law and lag-1 correlation rho."""
    rng = np.random.default_rng(4)
    fading = NakagamiFading(2.0, rho)
    start = fading.init(rng, (20_000,))
    states, last = fading.sequence(rng, start, 6)
    correlated = 0.0 < rho < 1.0  # 2m = 4 Gaussian components; otherwise the state is the gain itself
    assert states.shape == (6, 20_000, 4 if correlated else 1) and np.array_equal(last, states[-1])
    chain = np.concatenate([start[None], states])
    gains = fading.gain(chain)
    for t in range(6):
        if correlated:
            assert abs(chain[t + 1, :, 0].std() - 1.0) < 0.02  # stationary components
            assert abs(np.corrcoef(chain[t, :, 0], chain[t + 1, :, 0])[0, 1] - rho) < 0.02
        elif rho == 0.0:
            assert abs(np.corrcoef(gains[t], gains[t + 1])[0, 1]) < 0.03
        else:
            assert np.array_equal(chain[t + 1], chain[t])
        assert abs(gains[t + 1].var() - 0.5) < 0.03  # stationary Gamma(2, 1/2) gain
    assert abs(fading.gain(states).mean() - 1.0) < 0.02
