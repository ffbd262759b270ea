"""The plan's compiled fills (wide_env.sim.decode.plan_fill) against numpy's reference, bit for bit."""

import numpy as np
import pytest

from wide_env.sim.decode.plan_fill import expert_keys_into, topk_energy_into
from wide_env.sim.decode.plan import observed_energy_cost
from wide_env.sim.observation import MAX_ENERGY_COST, MAX_LATENCY_RATIO
from wide_env.sim.physics import topk_reference


def random_plan(rng, C, L, Lc, n, E, K):
    energy = rng.lognormal(-3.0, 2.0, (C, Lc, n, E))
    energy[rng.random(energy.shape) < 0.05] = 1e9  # costs beyond the observation's box: clipped
    topk_idx = np.argsort(rng.random((C, L, n, E)), axis=-1)[..., :K]
    knowable = np.stack([rng.exponential(0.01, (C, Lc, n, E)), rng.random((C, Lc, n, E))], axis=-2)
    knowable[..., 0, :][rng.random((C, Lc, n, E)) < 0.05] = 10.0  # latencies beyond 100 deadlines: clipped
    return energy, topk_idx, knowable


@pytest.mark.parametrize("Lc", [1, 3])
@pytest.mark.parametrize("K", [1, 2, 4])
def test_compiled_fills_equal_numpy_bit_for_bit(Lc, K):
    rng = np.random.default_rng(Lc * 10 + K)
    C, L, n, E, deadline = 4, 3, 5, 8, 0.01
    energy, topk_idx, knowable = random_plan(rng, C, L, Lc, n, E, K)
    topk = np.empty((C, L, n, 2))
    topk_energy_into(energy, topk_idx, topk[..., 0])  # a strided view, as the plan passes it
    want_energy, want_reference = topk_reference(energy, topk_idx)
    assert topk[..., 0].tobytes() == want_energy.tobytes()

    got = np.empty((C, L, n, 3, E), dtype=np.float32)
    expert_keys_into(energy, want_reference, knowable, deadline, MAX_ENERGY_COST, MAX_LATENCY_RATIO, got)
    want = np.empty_like(got)
    want[..., 0, :] = np.minimum(observed_energy_cost(energy, None, 0, topk_idx, want_reference), MAX_ENERGY_COST)
    want[..., 1, :] = np.minimum(knowable[..., 0, :] / deadline, MAX_LATENCY_RATIO)
    want[..., 2, :] = knowable[..., 1, :]
    assert got.tobytes() == want.tobytes()
    assert (got[..., 0, :] == MAX_ENERGY_COST).any() and (got[..., 1, :] == MAX_LATENCY_RATIO).any()


HOSTS = {
    "one_to_one": "one_to_one",
    # most Top-K sets run on the device: no radio energy, numpy's fallback reference (mean energy, or 1 J)
    "device": [[0, 0, 0, 0, 0, 0, 0, 1]] * 4,
    # another host map per layer: one cost table per layer (Lc = L)
    "per_layer": [[1, 2, 3, 4, 5, 6, 7, 8], [2, 3, 4, 5, 6, 7, 8, 1], [0, 1, 2, 3, 4, 5, 6, 7], [8, 7, 6, 5, 4, 3, 2, 1]],
}


@pytest.mark.parametrize("hosts", list(HOSTS))
def test_planned_top_k_energy_and_expert_keys_follow_numpy(hosts):
    from wide_env.config import WideConfig
    from wide_env.gating import make_gating_source
    from wide_env.sim.decode import DecodeSimulator

    cfg = WideConfig.from_dict({"placement": {"hosts": HOSTS[hosts]}})
    sim = DecodeSimulator(cfg, make_gating_source(cfg))
    plan = sim.reset(np.random.default_rng(4), 6).plan
    scn = sim.scenario
    energy = plan.costs[..., scn.scope_index, :]
    assert energy.shape[1] == (4 if hosts == "per_layer" else 1)
    topk_energy, reference = topk_reference(energy, plan.topk_idx)
    if hosts == "device":
        assert (topk_energy == 0).any()  # the fallback branch ran
    assert plan.topk[..., 0].tobytes() == topk_energy.tobytes()
    assert plan.topk[..., 1].tobytes() == reference.tobytes()
    cost = observed_energy_cost(energy, None, scn.scope_index, plan.topk_idx, reference)
    assert plan.obs_expert[..., 0, :].tobytes() == np.minimum(cost, MAX_ENERGY_COST).astype(np.float32).tobytes()
    meets = np.broadcast_to(plan.deadline_probability, plan.obs_expert[..., 2, :].shape)
    assert plan.obs_expert[..., 2, :].tobytes() == meets.astype(np.float32).tobytes()
