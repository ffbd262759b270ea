"""The accuracy hindsight bound: exact against brute force over every executed set of a token on the shipped
model, both sides of a capped search, the plan replayed through the env, and the headroom definition."""

import itertools

import gymnasium as gym
import numpy as np
import pytest
import torch

import wide_env  # noqa: F401  (registers the envs)
from baselines.accuracy_bound import TokenSearch, accuracy_bound, episode_bound, keep_rule, selection_options
from baselines.headroom import HEADROOM_MIN_RATIO, baseline_energy_at, counts_for_agents_win, headroom

ENV = "wide_env/WideMoE-AccuracyObjective-v0"


@pytest.fixture(scope="module")
def token_case():
    """A token of seed 0's episode whose prediction is lost when no expert runs (a search with something to
    find), in the full model's context, on a search of 512 streams."""
    env = gym.make(ENV).unwrapped
    env.reset(seed=0)
    core = env.episode_batch
    part, sim = core.model, core.sim
    search = TokenSearch(part.model, sim.source.mismatch, 512)
    nothing = np.zeros((1, search.L, search.E), bool)
    for pos in range(int(core.state.start[0]), int(core.state.start[0]) + sim.n_tokens):
        search.set_context(*part.context.prefix(pos))
        full_pred, full_nll = part.context.reference(np.array([pos]))
        case = search, int(part.token_id[pos]), int(full_pred[0]), int(part.target_id[pos]), float(full_nll[0])
        if not search._kept(nothing, case[1], keep_rule(case[2], case[3], case[4], None))[0]:
            return case
    raise AssertionError("every token of the episode keeps its prediction with no expert")


def _brute_force(search, token, energy, usable, keep):
    """The least energy over every combination of every subset of the usable experts, layer by layer."""
    L, E = energy.shape
    per_layer = []
    for l in range(L):
        ids = np.flatnonzero(usable[l])
        subsets = []
        for size in range(ids.size + 1):
            for combo in itertools.combinations(ids.tolist(), size):
                m = np.zeros(E, bool)
                m[list(combo)] = True
                subsets.append(m)
        per_layer.append(subsets)
    masks = np.array([np.stack(c) for c in itertools.product(*per_layer)])
    cost = (masks * energy[None]).sum((1, 2))
    ok = search._kept(masks, token, keep)
    return float(cost[ok].min()) if ok.any() else np.inf


def test_selection_options_are_every_set_of_at_most_k():
    opts = selection_options(5, 2)
    assert opts.shape == (1 + 5 + 10, 5)
    assert not opts[0].any() and (opts.sum(1) <= 2).all()
    assert len({tuple(r) for r in opts.tolist()}) == 16


@pytest.mark.parametrize("case", range(3))
@pytest.mark.parametrize("tolerance", [None, 0.01])
def test_exact_search_equals_brute_force(token_case, case, tolerance):
    """Three usable experts per layer (8^4 = 4096 selections, every subset, K = 2 or more) with random energies:
    the search's least energy is the brute force's, and its selection keeps the prediction."""
    search, token, full_pred, target, full_nll = token_case
    rng = np.random.default_rng(case)
    L, E = search.L, search.E
    usable = np.zeros((L, E), bool)
    for l in range(L):
        usable[l, rng.choice(E, 3, replace=False)] = True
    energy = rng.exponential(1e-9, size=(L, E))
    keep = keep_rule(full_pred, target, full_nll, tolerance)
    want = _brute_force(search, token, energy, usable, keep)
    got = search.solve(token, energy, usable, keep, max_nodes=10_000)
    assert got.exact
    if np.isfinite(want):
        assert got.kept and got.upper_j == pytest.approx(want, rel=1e-12) and got.lower_j == got.upper_j
        assert not (got.masks & ~usable).any()
        assert float((got.masks * energy).sum()) == pytest.approx(got.upper_j, rel=1e-12)
        assert search._kept(got.masks[None], token, keep)[0]
    else:
        assert not got.kept and not got.masks.any()


def test_capped_search_brackets_the_least_energy(token_case):
    """Stopped after a few prefixes, lower_j <= the exact least energy <= upper_j (every expert usable)."""
    search, token, full_pred, target, full_nll = token_case
    rng = np.random.default_rng(7)
    L, E = search.L, search.E
    energy = rng.exponential(1e-9, size=(L, E))
    usable = np.ones((L, E), bool)
    keep = keep_rule(full_pred, target, full_nll, None)
    exact = search.solve(token, energy, usable, keep, max_nodes=100_000)
    capped = search.solve(token, energy, usable, keep, max_nodes=2, batch=1)
    assert exact.exact
    assert capped.lower_j <= exact.upper_j * (1 + 1e-12) and exact.upper_j <= capped.upper_j * (1 + 1e-12)
    # the greedy descent alone is a kept selection no cheaper than the optimum
    greedy = search.solve(token, energy, usable, keep, max_nodes=0)
    assert greedy.kept and greedy.upper_j >= exact.upper_j * (1 - 1e-12) and greedy.lower_j == 0.0


def test_search_leaves_the_context_unchanged(token_case):
    search, token, full_pred, target, full_nll = token_case
    before = search.decoder.length.copy()
    logits = search._decode(np.ones((1, search.L, search.E), bool), token)
    search.solve(token, np.ones((search.L, search.E)), np.ones((search.L, search.E), bool),
                 keep_rule(full_pred, target, full_nll, None), max_nodes=50)
    assert np.array_equal(search.decoder.length, before)
    assert torch.equal(search._decode(np.ones((1, search.L, search.E), bool), token), logits)


@pytest.fixture(scope="module")
def short_episode():
    env = gym.make(ENV, config={"n_tokens": 4}).unwrapped
    return env, episode_bound(env, seed=3, max_nodes=300)


def test_replayed_plan_gives_the_env_energy_and_accuracy(short_episode):
    """The plan's energy (the tables' objective-scope J of its sets) is the env's energy_j summed over the
    replayed episode; its kept tokens are the env's accuracy_same; the same seed gives the same plan."""
    env, bound = short_episode
    env.reset(seed=3)
    tables = env.episode_batch.sim.episode_tables(env.episode_batch.state, 0)
    T = tables.energy.shape[0]
    assert bound.masks.shape == tables.energy.shape
    own = float((bound.masks * tables.energy).sum()) / T
    assert bound.energy_per_token_j == pytest.approx(own, rel=1e-12)
    kept = [s.kept for s in bound.tokens]
    assert bound.accuracy_same == pytest.approx(np.mean(kept))
    assert bound.lost == T - sum(kept)
    assert sum(s.upper_j for s in bound.tokens if s.kept) / T == pytest.approx(own, rel=1e-12)
    assert bound.energy_per_token_j < bound.topk_energy_per_token_j
    again = episode_bound(env, seed=3, max_nodes=300)
    assert np.array_equal(again.masks, bound.masks)


def test_late_experts_are_never_chosen():
    """With deadlines enforced and some experts late, the plan executes only on-time experts."""
    env = gym.make("wide_env/WideMoE-Stragglers-v0", config={"n_tokens": 2, "gating": {"accuracy": "model"}}).unwrapped
    bound = episode_bound(env, seed=1, max_nodes=50)
    env.reset(seed=1)
    tables = env.episode_batch.sim.episode_tables(env.episode_batch.state, 0)
    assert tables.enforce_deadline
    assert not (bound.masks & ~tables.meets_deadline).any()


@pytest.mark.filterwarnings("ignore:profile 'tiny'")
def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="tolerance"):
        accuracy_bound(ENV, seeds=[0], tolerance=-1.0)
    with pytest.raises(ValueError, match="max_nodes"):
        accuracy_bound(ENV, seeds=[0], max_nodes=True)
    with pytest.raises(ValueError, match="gating.accuracy"):
        accuracy_bound(ENV, {"gating": {"accuracy": "rule"}}, seeds=[0])


# ---- headroom ------------------------------------------------------------------------------------------------
def test_headroom_ratio_and_the_five_percent_rule():
    assert headroom(2.0e-9, 1.0e-9) == pytest.approx(2.0)
    assert np.allclose(headroom([1.0, 3.0], [1.0, 2.0]), [1.0, 1.5])
    assert headroom(1.0, 0.0) == np.inf
    assert HEADROOM_MIN_RATIO == 1.05
    assert counts_for_agents_win(1.05) and counts_for_agents_win(np.inf)
    assert not counts_for_agents_win(1.049) and not counts_for_agents_win(float("nan"))
    with pytest.raises(ValueError, match="energies must be >= 0"):
        headroom(-1.0, 1.0)


def test_baseline_energy_at_matched_accuracy():
    """Two settings over two episodes: points (acc 0.4, 1 J) and (0.6, 3 J); at 0.5 the front mixes them."""
    energy = np.array([[1.0, 1.0], [3.0, 3.0]])
    accuracy = np.array([[0.3, 0.5], [0.6, 0.6]])
    assert baseline_energy_at(energy, accuracy, 0.5) == (pytest.approx(2.0), "interpolated")
    assert baseline_energy_at(energy, accuracy, 0.7) == (3.0, "above")
    e, status = baseline_energy_at(energy, accuracy, 0.1)
    assert status == "below" and np.isnan(e)


def test_regime_headroom_cli_on_a_short_episode(capsys):
    """The CLI's JSON: the bound, Top-K and SiftMoE on the same episode; headroom = the best baseline's energy at
    the bound's accuracy / the bound's energy, and the 5% rule applied to it."""
    import json

    from baselines.accuracy_bound import main

    main(["--env", ENV, "--config", '{"n_tokens": 2}', "--episodes", "1", "--scales", "0.5,1", "--max-nodes", "200"])
    out = json.loads(capsys.readouterr().out)
    best = out["best_causal"]
    assert best == "siftmoe" and out["episodes"] == 1
    e_best = out["baseline_energy_at_bound_accuracy_j"][best]
    assert out["headroom"] == pytest.approx(e_best / out["bound_energy_per_token_j"])
    assert out["counts_for_agents_win"] == (out["headroom"] >= HEADROOM_MIN_RATIO)
    assert 0 <= out["bound_energy_per_token_j"] <= out["topk_energy_per_token_j"]
    assert out["bound_cpu_s_per_episode"] > 0
