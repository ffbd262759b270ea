"""Information headroom: how much better than the deviation proxy can what a policy observes predict which skips
change the model's prediction? (issue 23: where agents do not beat the tuned Lagrangian rule, which headroom is
missing.)

The accuracy hindsight bound (:mod:`baselines.accuracy_bound`) knows, per token, which experts the prediction
needs; a causal policy only sees the observation. A learned agent can beat the Lagrangian rule at matched accuracy
only if the observation predicts a skip's effect on the prediction better than the rule's price
``lambda mu_l nu_k Delta_k`` does. This module measures that directly, for the decision the agents mostly make
(execute the Top-K set or skip its 2nd slot, the expert with the smaller combine weight):

1. **Exploration data** (:func:`collect_skip_samples`): episodes on the env where, per token, one layer chosen
   uniformly at random skips its 2nd Top-K slot with probability 1/2 and everything else runs Top-K; each token's
   outcome is whether its prediction still equals the full model's (``info["accuracy_same"]``). One perturbed
   decision per token, so each outcome belongs to one decision.
2. **Two flip models** (:func:`fit_logistic`: L2-regularised logistic regression by Newton's method), trained on
   the skipped decisions, from the features (:func:`decision_features`):
   ``"deviation"``: per layer an intercept and the skipped slot's deviation (the Lagrangian's information);
   ``"observation"``: also per layer the skipped expert's identity, the two slots' combine weights and every
   model-state key the env offers (router entropy and margin, logit-lens confidence, the previous token's loss).
   Held-out log-loss (a third of the samples) says how much each predicts; each model's L2 weight is chosen
   from :data:`L2_GRID` on a validation quarter of the other two thirds.
3. **Their skip rules on held-out test seeds** (:class:`FlipPricedSkip`): skip the 2nd slot iff the energy it
   saves (the Lagrangian's energy model, units of the median Top-K energy) exceeds ``theta x P(flip)``; sweeping
   theta traces each rule's front of energy against agreement with the full model and against accuracy. The
   ratio of the observation rule's energy to the deviation rule's at matched agreement is the information
   headroom: what richer observations buy with the same action space and an optimiser that is exact for it.

Two further checks of where headroom could come from (README "Why the agents tie"):

4. **The residual stream** (``residual=True``, ``--residual``): the ``"residual"`` features add, per layer, the
   d-dimensional hidden state of the token in progress at the decision (the decoder's residual stream after the
   layers applied so far; what the server that routes the token holds, though no observation key carries it).
   Only its held-out log-loss is reported: no policy observes it, so it has no skip rule.
5. **Compounding within a token** (:func:`skip_compounding`, ``--compounding P``): every layer skips its 2nd slot
   independently with probability P; the flip rate per number of skips in the token against the rate the
   single-skip rates predict if skips flipped the prediction independently. A per-step rule prices each skip
   on its own; a superadditive effect (more flips than independence predicts) would reward a policy that
   remembers the token's skips, a subadditive one a policy that concentrates them.

Measured on ``wide_env/WideMoE-ModelState-v0`` (README "Why the agents tie"): the observation features lower
the held-out log-loss by about a third more than the deviation term does over a constant, yet the fronts match
within a few per cent: the flips the hindsight bound avoids are not predictable from what a causal policy sees;
the residual stream predicts them no better.

    python -m baselines.information_headroom --out runs/information_headroom [--episodes 3000] \\
        [--test-episodes 200] [--residual] [--compounding 0.35]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from baselines.observation import layer_of, parse_observation, problem_of
from baselines.policy_base import Policy

__all__ = ["FEATURE_SETS", "SAMPLE_KEYS", "collect_skip_samples", "decision_features", "fit_logistic",
           "LogisticModel", "FlipPricedSkip", "information_headroom", "skip_compounding", "main"]

ENV_ID = "wide_env/WideMoE-ModelState-v0"
FEATURE_SETS = ("deviation", "observation")
#: the feature sets a flip model can be fitted on: the policies' two, and the residual stream (item 4: no rule)
FIT_FEATURE_SETS = FEATURE_SETS + ("residual",)
#: model-state keys the "observation" features use where the env offers them (docs/model.md)
_STATE_KEYS = ("router_entropy", "router_margin", "logit_lens_confidence", "previous_loss")
#: per-sample arrays :func:`collect_skip_samples` returns besides the decision's observation
SAMPLE_KEYS = ("skipped", "same")
EXPLORATION_SEED = 40_000  # away from training (0+), test (20_000+) and selection (30_000+) seeds
TEST_SEED = 20_000
THETAS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
#: L2 weights the flip models choose from (on validation samples)
L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)


def _top_two(a: dict) -> tuple[np.ndarray, np.ndarray]:
    """(B,) the Top-K experts with the largest and second-largest combine weight."""
    weight = np.where(a["topk_mask"] > 0.5, a["topk_weight"], -1.0)
    order = np.argsort(-weight, axis=1, kind="stable")
    return order[:, 0], order[:, 1]


def _check_problem(problem) -> None:
    if problem.top_k < 2:
        raise ValueError(f"information headroom studies skipping the 2nd Top-K slot: the env needs top_k >= 2, "
                         f"got top_k = {problem.top_k}")


def decision_features(a: dict, problem, features: str) -> np.ndarray:
    """(B, F) features of skipping each decision's 2nd Top-K slot (module docstring, item 2), from the parsed
    observation ``a`` (:func:`baselines.observation.parse_observation`)."""
    if features not in FIT_FEATURE_SETS:
        raise ValueError(f"features must be one of {list(FIT_FEATURE_SETS)}, got {features!r}")
    if features == "residual" and "residual" not in a:
        raise ValueError("the 'residual' features need samples collected with residual=True")
    L, E, K = problem.n_layers, problem.n_experts, problem.top_k
    B = a["position"].shape[0]
    rows = np.arange(B)
    layer = np.eye(L)[np.clip(layer_of(a, problem), 0, L - 1)]  # (B, L) one-hot
    first, second = _top_two(a)
    deviation = a["deviation_table"].reshape(B, K, E + 1)[:, 1, E]  # slot 2 skipped (budget units)
    columns = [layer, layer * deviation[:, None]]
    if features in ("observation", "residual"):
        per_layer = [np.eye(E)[second], a["topk_weight"][rows, first][:, None], a["topk_weight"][rows, second][:, None],
                     *(a[k][:, :1] for k in _STATE_KEYS if k in a)]
        if features == "residual":
            per_layer.append(a["residual"])
        x = np.concatenate(per_layer, axis=1)
        columns.append((layer[:, :, None] * x[:, None, :]).reshape(B, -1))
    return np.concatenate(columns, axis=1)


class LogisticModel:
    """P(y = 1 | x) = sigmoid(w . (x - mean) / sd + b), fitted by :func:`fit_logistic`."""

    def __init__(self, w, b, mean, sd):
        self.w, self.b, self.mean, self.sd = w, float(b), mean, sd

    def logit(self, x) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float64) - self.mean) / self.sd) @ self.w + self.b

    def predict(self, x) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logit(x)))

    def log_loss(self, x, y) -> float:
        """Mean binary cross-entropy (nats) on (x, y)."""
        z, y = self.logit(x), np.asarray(y, dtype=np.float64)
        return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_logistic(x, y, l2: float = 1e-3, iterations: int = 50, tol: float = 1e-10) -> LogisticModel:
    """L2-regularised logistic regression (the intercept unpenalised) by Newton's method on standardised
    features: minimises mean cross-entropy + l2/2 |w|^2, which is strictly convex, so Newton converges to the
    unique optimum. Constant columns are kept (sd 1) and get weight 0."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise ValueError(f"expected x (n, F) and y (n,) with n >= 1, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isin(y, (0.0, 1.0)).all()):
        raise ValueError("x must be finite and y 0 or 1")
    if not l2 > 0:
        raise ValueError(f"l2 must be > 0 (it makes the optimum unique), got {l2}")
    mean = x.mean(axis=0)
    sd = x.std(axis=0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    z = np.concatenate([(x - mean) / sd, np.ones((x.shape[0], 1))], axis=1)
    n, F = z.shape
    penalty = np.full(F, l2)
    penalty[-1] = 0.0
    theta = np.zeros(F)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(z @ theta)))
        grad = z.T @ (p - y) / n + penalty * theta
        hess = (z * (p * (1.0 - p))[:, None]).T @ z / n + np.diag(penalty + 1e-12)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if float(np.abs(step).max()) < tol:
            break
    return LogisticModel(theta[:-1], theta[-1], mean, sd)


def _check_episodes(episodes) -> None:
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"episodes must be an integer >= 1, got {episodes!r}")


def _residual_stream(env, env_id: str):
    """The (B, d) residual stream of the env's decoding streams (model accuracy only)."""
    decoder = getattr(getattr(env.unwrapped.episode_batch, "model", None), "decoder", None)
    if decoder is None or not hasattr(decoder, "x"):
        raise ValueError(f"{env_id} decodes no tokens on the model, so it has no residual stream: the 'residual' "
                         "features need gating.accuracy = 'model' (e.g. wide_env/WideMoE-ModelState-v0)")
    return decoder.x


def collect_skip_samples(env_id: str = ENV_ID, episodes: int = 3000, seed: int = EXPLORATION_SEED,
                         env_kwargs: dict | None = None, residual: bool = False) -> dict[str, np.ndarray]:
    """Exploration data (module docstring, item 1): per token, its perturbable decision's parsed observation
    (every key of the layout, (n, size)), ``skipped`` (the 2nd slot was skipped) and ``same`` (the token's
    prediction equals the full model's); with ``residual``, also ``residual`` (n, d): the token's residual stream
    at that decision (item 4). Episode i is ``reset(seed=seed + i)``; the exploration draws come from
    ``numpy.random.default_rng(seed)``, so the data are a function of the arguments."""
    import gymnasium as gym

    import wide_env  # noqa: F401  (registers the envs)

    _check_episodes(episodes)
    env = gym.make(env_id, **(env_kwargs or {}))
    try:
        problem = problem_of(env)
        _check_problem(problem)
        stream = _residual_stream(env, env_id) if residual else None
        rng = np.random.default_rng(seed)
        rows: dict[str, list] = {k: [] for k in (*problem.obs_slices, *SAMPLE_KEYS, *(("residual",) if residual
                                                                                       else ()))}
        for episode in range(episodes):
            obs, _ = env.reset(seed=seed + episode)
            done, chosen, skip, pending = False, -1, False, None
            while not done:
                a, _ = parse_observation(obs, problem)
                layer = int(layer_of(a, problem)[0])
                if layer == 0:
                    chosen, skip = int(rng.integers(problem.n_layers)), bool(rng.random() < 0.5)
                action = (a["topk_mask"][0] > 0.5).astype(np.int8)
                if layer == chosen:
                    if skip:
                        action[_top_two(a)[1][0]] = 0
                    pending = {k: v[0] for k, v in a.items()}
                    if stream is not None:
                        pending["residual"] = np.array(stream[0], dtype=np.float64)
                obs, _, terminated, truncated, info = env.step(action)
                done = terminated or truncated
                if info.get("token_complete"):
                    if "accuracy_same" not in info:
                        raise ValueError(f"{env_id} reports no real accuracy (info['accuracy_same']): information "
                                         "headroom needs a gating trace with model or rule accuracy")
                    for k, v in pending.items():
                        rows[k].append(v)
                    rows["skipped"].append(float(skip))
                    rows["same"].append(float(info["accuracy_same"]))
        return {k: np.asarray(v, dtype=np.float64) for k, v in rows.items()}
    finally:
        env.close()


class FlipPricedSkip(Policy):
    """Top-K, with the 2nd slot skipped where the energy it saves exceeds ``theta x P(flip)`` (module docstring,
    item 3). ``model``: a :class:`LogisticModel` on :func:`decision_features` ``features``; ``stats``: the energy
    model (:class:`baselines.span_stats.SpanStatistics`). ``history_factors`` (g_0, g_1, ...; item 5): the rule
    remembers how many 2nd slots it skipped in each row's token in progress, n, and prices the next skip at
    ``theta x P(flip) x g_min(n, len - 1)`` (causal: only its own past actions; a subadditive compounding makes
    later skips in a token cheaper)."""

    name = "flip_priced_skip"

    def __init__(self, problem, *, model: LogisticModel, features: str, stats, theta: float,
                 history_factors=None):
        super().__init__(problem)
        _check_problem(problem)
        if not (np.isfinite(theta) and theta >= 0):
            raise ValueError(f"theta must be a finite number >= 0, got {theta!r}")
        self.model, self.features, self.stats, self.theta = model, features, stats, float(theta)
        self.history_factors = None
        if history_factors is not None:
            g = np.asarray(history_factors, dtype=np.float64)
            if g.ndim != 1 or g.size == 0 or not (np.isfinite(g).all() and (g >= 0).all()):
                raise ValueError(f"history_factors must be a non-empty list of finite numbers >= 0, got "
                                 f"{history_factors!r}")
            self.history_factors = g
        self._skipped = None  # per row: 2nd slots skipped in the token in progress

    def reset(self, seed: int | None = None) -> None:
        self._skipped = None

    def select(self, a):
        topk = a["topk_mask"] > 0.5
        rows = np.arange(topk.shape[0])
        second = _top_two(a)[1]
        saving = self.stats.energy_of(a["energy_cost"], a["channel_gain_db"])[rows, second]
        price = self.theta * self.model.predict(decision_features(a, self.problem, self.features))
        if self.history_factors is not None:
            if self._skipped is None or self._skipped.size != rows.size:
                self._skipped = np.zeros(rows.size, dtype=np.int64)
            self._skipped[layer_of(a, self.problem) == 0] = 0  # a token starts
            price = price * self.history_factors[np.minimum(self._skipped, self.history_factors.size - 1)]
        skip = saving > price
        if self.history_factors is not None:
            self._skipped += skip
        out = topk.copy()
        out[rows[skip], second[skip]] = False
        return out


def _front_ratio(energy_a, agree_a, energy_b, agree_b, levels) -> list[float]:
    """E_a / E_b at each agreement level, both on their lower convex fronts (NaN outside either's range)."""
    from baselines.equal_accuracy import accuracy_energy_front, energy_at_accuracy

    fa, fb = accuracy_energy_front(energy_a, agree_a), accuracy_energy_front(energy_b, agree_b)
    out = []
    for level in levels:
        pa, pb = energy_at_accuracy(fa, level), energy_at_accuracy(fb, level)
        ok = pa.status == "interpolated" and pb.status == "interpolated" and pb.energy > 0
        out.append(float(pa.energy / pb.energy) if ok else float("nan"))
    return out


def information_headroom(env_id: str = ENV_ID, *, episodes: int = 3000, test_episodes: int = 200,
                         thetas=THETAS, seed: int = EXPLORATION_SEED, test_seed: int = TEST_SEED,
                         levels=(0.90, 0.93, 0.95, 0.97), n_boot: int = 1000, env_kwargs: dict | None = None,
                         residual: bool = False, history_factors=None) -> dict:
    """The whole measurement (module docstring): log-losses, both rules' fronts on the test seeds and the
    observation rule's energy / the deviation rule's at matched agreement ``levels``, with a 95% percentile
    bootstrap CI over the (paired) test episodes; ``residual``: also the residual stream's log-loss (item 4);
    ``history_factors``: also the deviation rule that remembers its skips (item 5), its energy / the deviation
    rule's at the same levels (``history_ratio_at_agreement``, ``history_ci95``)."""
    import gymnasium as gym

    from baselines.lagrangian import energy_model_config
    from baselines.rollout import evaluate_policies
    from baselines.span_stats import span_statistics

    t0, c0 = time.perf_counter(), time.process_time()
    data = collect_skip_samples(env_id, episodes, seed, env_kwargs, residual=residual)
    env = gym.make(env_id, **(env_kwargs or {}))
    problem, config = problem_of(env), env.unwrapped.config
    env.close()
    skipped = data["skipped"] > 0.5
    a = {k: data[k][skipped] for k in (*problem.obs_slices, *(("residual",) if residual else ()))}
    flip = 1.0 - data["same"][skipped]
    n = flip.size
    if n < 10 or flip.min() == flip.max():
        raise ValueError(f"{n} skipped decisions with {int(flip.sum())} flips: too few to fit flip models; raise "
                         "episodes")
    order = np.random.default_rng(seed).permutation(n)
    train, held = order[: 2 * n // 3], order[2 * n // 3:]
    result = {"env_id": env_id, "episodes": episodes, "samples": int(n), "flip_rate": float(flip.mean()),
              "log_loss": {"constant": float(np.mean(-(flip[held] * np.log(flip[train].mean())
                                                       + (1 - flip[held]) * np.log(1 - flip[train].mean()))))}}
    models, result["l2"] = {}, {}
    fit_part, check_part = train[: 3 * train.size // 4], train[3 * train.size // 4:]
    for features in FEATURE_SETS + (("residual",) if residual else ()):
        x = decision_features(a, problem, features)
        # the regularisation chosen on a validation part of the training samples (the observation features are
        # many: hundreds on a 32-layer model), then the held-out third scored and the rule fitted on everything
        l2 = min(L2_GRID, key=lambda c: fit_logistic(x[fit_part], flip[fit_part], l2=c).log_loss(x[check_part],
                                                                                                 flip[check_part]))
        result["l2"][features] = l2
        result["log_loss"][features] = fit_logistic(x[train], flip[train], l2=l2).log_loss(x[held], flip[held])
        if features in FEATURE_SETS:  # the rules use every sample (no policy observes the residual stream)
            models[features] = fit_logistic(x, flip, l2=l2)
    stats = span_statistics(energy_model_config(config), 16)
    policies = ["topk"]
    families = {f: (f, None) for f in FEATURE_SETS}  # label -> (features, history factors)
    if history_factors is not None:
        families["history"] = ("deviation", history_factors)
    for family, (features, factors) in families.items():
        for theta in thetas:
            def factory(env, features=features, theta=theta, factors=factors):
                return FlipPricedSkip(problem_of(env), model=models[features], features=features, stats=stats,
                                      theta=theta, history_factors=factors)
            factory.is_policy_factory = True
            policies.append((f"{family} theta={theta:g}", factory))
    episode_rows: list[dict] = []
    rows = evaluate_policies(env_id, policies, episodes=test_episodes, seed=test_seed, env_kwargs=env_kwargs,
                             episode_rows=episode_rows)
    result["rules"] = [{k: r[k] for k in ("policy", "energy_per_token_j", "accuracy_correct", "accuracy_same")}
                       for r in rows]
    # (policy, episode) energy per token and agreement; each rule's front holds Top-K and its thetas
    labels = [r["policy"] for r in rows]
    energy = np.zeros((len(labels), test_episodes))
    agree = np.zeros_like(energy)
    for rec in episode_rows:
        i = labels.index(rec["policy"])
        energy[i, rec["episode"]] = rec["energy_j"] / max(rec["tokens"], 1)
        agree[i, rec["episode"]] = rec["accuracy_same"]
    members = {f: [0] + [i for i, lab in enumerate(labels) if lab.startswith(f + " ")] for f in families}

    def ratios(episodes, family):
        e, g = energy[:, episodes].mean(axis=1), agree[:, episodes].mean(axis=1)
        num, dev = members[family], members["deviation"]
        return _front_ratio(e[num], g[num], e[dev], g[dev], levels)

    result["levels"] = list(levels)
    for family, key in (("observation", ""), ("history", "history_")):
        if family not in families:
            continue
        rng = np.random.default_rng(seed)
        boot = np.array([ratios(rng.integers(test_episodes, size=test_episodes), family) for _ in range(n_boot)])
        result[f"{key or 'energy_'}ratio_at_agreement"] = ratios(np.arange(test_episodes), family)
        with np.errstate(all="ignore"):
            result[f"{key}ci95"] = [[float(np.nanpercentile(boot[:, j], q)) if np.isfinite(boot[:, j]).any()
                                     else float("nan") for q in (2.5, 97.5)] for j in range(len(levels))]
    result["wall_s"], result["cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    return result


def skip_compounding(env_id: str = ENV_ID, episodes: int = 3000, probability: float = 0.35,
                     seed: int = EXPLORATION_SEED, env_kwargs: dict | None = None) -> dict:
    """Compounding of skips within a token (module docstring, item 5). Every layer's decision runs Top-K and
    skips its 2nd slot with ``probability``, independently (draws from ``numpy.random.default_rng(seed)``; episode
    i is ``reset(seed=seed + i)``). Returns per number of skips c in a token: the tokens, their flip rate (the
    prediction differs from the full model's) with a 95% normal CI, and the rate if each skipped layer l flipped
    independently with its single-skip excess q_l: 1 - (1 - f_0) prod_{l skipped} (1 - q_l), where f_0 is the
    flip rate of tokens with no skip (flips the budget-free env makes anyway, e.g. infeasible experts) and
    1 - q_l = (1 - f_l) / (1 - f_0), f_l the rate of tokens whose only skip is at layer l."""
    import gymnasium as gym

    import wide_env  # noqa: F401  (registers the envs)

    _check_episodes(episodes)
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {probability!r}")
    t0 = time.process_time()
    env = gym.make(env_id, **(env_kwargs or {}))
    try:
        problem = problem_of(env)
        _check_problem(problem)
        L = problem.n_layers
        rng = np.random.default_rng(seed)
        skips, flips, token = [], [], np.zeros(L, bool)
        for episode in range(episodes):
            obs, _ = env.reset(seed=seed + episode)
            done = False
            while not done:
                a, _ = parse_observation(obs, problem)
                layer = int(layer_of(a, problem)[0])
                if layer == 0:
                    token[:] = False
                action = (a["topk_mask"][0] > 0.5).astype(np.int8)
                if rng.random() < probability:
                    action[_top_two(a)[1][0]] = 0
                    token[layer] = True
                obs, _, terminated, truncated, info = env.step(action)
                done = terminated or truncated
                if info.get("token_complete"):
                    if "accuracy_same" not in info:
                        raise ValueError(f"{env_id} reports no real accuracy (info['accuracy_same'])")
                    skips.append(token.copy())
                    flips.append(1.0 - float(info["accuracy_same"]))
    finally:
        env.close()
    skips, flips = np.asarray(skips), np.asarray(flips)
    count = skips.sum(axis=1)
    f0 = float(flips[count == 0].mean()) if (count == 0).any() else 0.0
    single = np.array([flips[(count == 1) & skips[:, l]].mean() if ((count == 1) & skips[:, l]).any() else np.nan
                       for l in range(L)])
    keep = (1.0 - single) / (1.0 - f0)  # 1 - q_l
    independent = 1.0 - (1.0 - f0) * np.prod(np.where(skips, keep, 1.0), axis=1)
    rows = []
    for c in range(L + 1):
        m = count == c
        if not m.any():
            continue
        rate = float(flips[m].mean())
        half = 1.96 * np.sqrt(rate * (1 - rate) / m.sum())
        rows.append({"skips": c, "tokens": int(m.sum()), "flip_rate": rate, "ci95": [rate - half, rate + half],
                     "independent": float(np.nanmean(independent[m]))})
    return {"env_id": env_id, "episodes": episodes, "probability": probability, "tokens": int(flips.size),
            "no_skip_flip_rate": f0, "single_skip_flip_rate": single.tolist(), "rows": rows,
            "history_factors": _marginal_factors(rows), "cpu_s": time.process_time() - t0}


#: tokens a count of skips needs before its flip rate sets a history factor
_MIN_TOKENS = 200


def _marginal_factors(rows: list[dict]) -> list[float]:
    """g_n = (f_(n+1) - f_n) / (f_1 - f_0): the extra flips of a token's (n+1)-th skip relative to its first's,
    for the counts with at least :data:`_MIN_TOKENS` tokens (clipped at 0; [1.0] where f_1 <= f_0): the history
    factors of :class:`FlipPricedSkip` that price a skip at its marginal flips."""
    rate = {r["skips"]: r["flip_rate"] for r in rows if r["tokens"] >= _MIN_TOKENS}
    if 0 not in rate or 1 not in rate or rate[1] <= rate[0]:
        return [1.0]
    first = rate[1] - rate[0]
    factors, n = [1.0], 1
    while n + 1 in rate:
        factors.append(max(0.0, (rate[n + 1] - rate[n]) / first))
        n += 1
    return factors


def _compounding_table(result: dict) -> str:
    lines = [f"skips compounding on {result['env_id']}: {result['tokens']} tokens, each layer skips its 2nd slot "
             f"with probability {result['probability']:g}",
             "| skips in the token | tokens | flip rate (95% CI) | if independent |", "|---|---|---|---|"]
    lines += [f"| {r['skips']} | {r['tokens']} | {r['flip_rate']:.4f} ({r['ci95'][0]:.4f}-{r['ci95'][1]:.4f}) | "
              f"{r['independent']:.4f} |" for r in result["rows"]]
    lines.append("marginal flips of a token's n-th skip / its first's (history factors): "
                 + ",".join(f"{g:.3g}" for g in result["history_factors"]))
    return "\n".join(lines)


def _table(result: dict) -> str:
    ll = result["log_loss"]
    residual = (f", residual stream {ll['residual']:.4f} (L2 {result['l2']['residual']:g})" if "residual" in ll
                else "")
    lines = [f"information headroom on {result['env_id']}: {result['samples']} skipped decisions, flip rate "
             f"{result['flip_rate']:.4f}",
             f"held-out log-loss: constant {ll['constant']:.4f}, deviation {ll['deviation']:.4f}, observation "
             f"{ll['observation']:.4f} (L2 {result['l2']['deviation']:g} and {result['l2']['observation']:g})"
             + residual,
             "| rule | energy/token (J) | accuracy | same as full model |", "|---|---|---|---|"]
    lines += [f"| {r['policy']} | {r['energy_per_token_j']:.4e} | {r['accuracy_correct']:.4f} | "
              f"{r['accuracy_same']:.4f} |" for r in result["rules"]]
    lines.append("observation rule / deviation rule energy at agreement with the full model "
                 + ", ".join(f"{lv:.2f}: {x:.3f} ({lo:.3f}-{hi:.3f})" for lv, x, (lo, hi)
                             in zip(result["levels"], result["energy_ratio_at_agreement"], result["ci95"])))
    if "history_ratio_at_agreement" in result:
        lines.append("history rule / deviation rule energy at agreement with the full model "
                     + ", ".join(f"{lv:.2f}: {x:.3f} ({lo:.3f}-{hi:.3f})" for lv, x, (lo, hi)
                                 in zip(result["levels"], result["history_ratio_at_agreement"],
                                        result["history_ci95"])))
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m baselines.information_headroom", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default=ENV_ID)
    parser.add_argument("--episodes", type=int, default=3000,
                        help="exploration episodes (seeds 40000+; one sample per token: deep models with few tokens "
                             "per episode need more)")
    parser.add_argument("--test-episodes", type=int, default=200, help="test episodes (seeds 20000+)")
    parser.add_argument("--residual", action="store_true",
                        help="also fit a flip model on the residual stream at the decision (model accuracy only)")
    parser.add_argument("--compounding", type=float, default=None, metavar="P",
                        help="instead: the compounding of skips within a token, every layer skipping its 2nd slot "
                             "with probability P (writes skip_compounding.json / .md)")
    parser.add_argument("--history-factors", default=None, metavar="G0,G1,...",
                        help="also the deviation rule that prices a token's n-th skip x G_n (e.g. the factors "
                             "--compounding prints)")
    parser.add_argument("--out", type=Path, default=None, help="directory for information_headroom.json / .md")
    args = parser.parse_args(argv)
    factors = None
    if args.history_factors is not None:
        try:
            factors = [float(g) for g in args.history_factors.split(",")]
        except ValueError:
            parser.error(f"--history-factors: comma-separated numbers, got {args.history_factors!r}")
    if args.compounding is not None:
        result = skip_compounding(args.env, episodes=args.episodes, probability=args.compounding)
        name, table, took = "skip_compounding", _compounding_table(result), f"{result['cpu_s']:.0f} CPU-s"
    else:
        result = information_headroom(args.env, episodes=args.episodes, test_episodes=args.test_episodes,
                                      residual=args.residual, history_factors=factors)
        name, table = "information_headroom", _table(result)
        took = f"{result['wall_s']:.0f} s wall, {result['cpu_s']:.0f} CPU-s"
    print(table)
    print(took)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
        (args.out / f"{name}.md").write_text(table + "\n")
    return result


if __name__ == "__main__":
    main()
