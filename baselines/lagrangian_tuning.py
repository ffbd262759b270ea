r"""Tuning the Lagrangian rule (:mod:`baselines.lagrangian`) per benchmark regime, on the selection seeds only.

    python -m baselines.lagrangian_tuning [--regimes token,episode,queues,accuracy] [--trials 64]
        [--episodes 100] [--front-trials 24] [--front-episodes 40] [--search-seed 0] [--out FILE]

Search: random search, then local refinement (numpy's generator seeded by ``--search-seed``; deterministic: the
same seed gives the same candidates and, the episodes being seeded, the same scores). Candidate 0 is the untuned
rule (mu = 1, nu = 1, lambda = 1, eta = 0); the next quarter of the trials draw every weight log-uniformly: mu_l in
[1/4, 4] per layer, nu_k in [1/8, 4] for the slots after the first (nu_1 = 1), lambda in [1/100, 100], and for
token and episode budgets eta = 0 with probability 1/3, else in [1/1000, 1]; the rest perturb the best candidate
so far (every weight times exp(N(0, 0.3^2)), clipped to those ranges; eta restarts or drops to 0 with
probability 1/5 each) [choice: a (1+1) evolution strategy, cheap and deterministic]; under uncertain queues (``compute.queue_delay_mean_s`` > 0) also the
chance constraint's delta in {None, 0.05, 0.2, 0.5} (None: SiftMoE's rule, any expert that may meet the deadline). Episodes: ``SELECTION_SEED + i`` (the benchmark's selection seeds, never its
test seeds), every candidate on the same ones.

Objectives:

* **budget regimes** (the regime's budget binds): the least energy per token among the candidates with no more
  budget violations and no more deadline misses than ``siftmoe`` on the same episodes at the regime's budget
  (scale 1); guard on. Accuracy is not scored, so these runs use the env's fast accuracy rule.
* **the accuracy objective** (no budget): the rule's accuracy-energy front. A candidate (mu, nu, lambda) is run at
  the budget scales :data:`FRONT_SCALES` (a scale s divides the observed deviations, so it sweeps lambda / s; guard
  off, eta = 0), practical Top-K's point is added, and the score is the mean of log E*(a) over the accuracy levels
  a = Top-K's accuracy minus 0.5, 1, 2 and 4 points on the front's lower convex envelope
  (:func:`baselines.equal_accuracy.energy_at_accuracy`; a level below the front's least-energy point counts that
  point's energy). Accuracy is measured on the model where the env can (``accuracy="auto"``), as the benchmark does.

The result (``lagrangian_tuned.json`` next to this module) holds, per regime, the policy's keyword arguments, the
objective's value, the SiftMoE reference and the tuning budget (trials x episodes, CPU seconds); the benchmark's
regimes load it with :func:`baselines.lagrangian.tuned_kwargs`.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from baselines.lagrangian import TUNED_FORMAT, TUNED_PATH

__all__ = ["FRONT_SCALES", "FRONT_LEVELS", "sample_candidate", "perturb_candidate", "tune_budget",
           "tune_front", "tune", "main"]

#: budget scales of one front candidate (lambda / s for each) and the accuracy levels below Top-K it is scored at
FRONT_SCALES = (0.25, 1.0, 4.0, 16.0)
FRONT_LEVELS = (0.005, 0.01, 0.02, 0.04)
_DELTAS = (None, 0.05, 0.2, 0.5)


def _log_uniform(rng, lo: float, hi: float, size=None):
    return np.exp(rng.uniform(math.log(lo), math.log(hi), size))


def sample_candidate(rng, n_layers: int, top_k: int, *, online: bool, queues: bool, front: bool) -> dict:
    """One random candidate's keyword arguments (module docstring); JSON-ready floats."""
    out = {"mu": [float(x) for x in _log_uniform(rng, 0.25, 4.0, n_layers)],
           "nu": [1.0] + [float(x) for x in _log_uniform(rng, 0.125, 4.0, top_k - 1)],
           "lam": float(_log_uniform(rng, 0.01, 100.0))}
    if front:
        return {**out, "eta": 0.0, "guard": False}
    out["eta"] = float(_log_uniform(rng, 1e-3, 1.0)) if online and rng.uniform() >= 1 / 3 else 0.0
    if queues:
        out["delta"] = _DELTAS[int(rng.integers(len(_DELTAS)))]
    return out


_RANGES = {"mu": (0.25, 4.0), "nu": (0.125, 4.0), "lam": (0.01, 100.0), "eta": (1e-3, 1.0)}
_SIGMA = 0.3


def perturb_candidate(rng, kwargs: dict, *, online: bool, queues: bool) -> dict:
    """A neighbour of candidate ``kwargs`` (module docstring); JSON-ready floats."""
    def move(x, field):
        lo, hi = _RANGES[field]
        return float(np.clip(x * math.exp(rng.normal(0.0, _SIGMA)), lo, hi))

    out = dict(kwargs)
    out["mu"] = [move(x, "mu") for x in kwargs["mu"]]
    out["nu"] = [1.0] + [move(x, "nu") for x in kwargs["nu"][1:]]
    out["lam"] = move(kwargs["lam"], "lam")
    if online:
        u = rng.uniform()
        if u < 0.2:
            out["eta"] = float(_log_uniform(rng, *_RANGES["eta"]))
        elif u < 0.4:
            out["eta"] = 0.0
        else:
            out["eta"] = move(kwargs["eta"], "eta") if kwargs["eta"] > 0 else 0.0
    if queues and rng.uniform() < 0.2:
        out["delta"] = _DELTAS[int(rng.integers(len(_DELTAS)))]
    return out


def _candidate(rng, t: int, trials: int, best, problem, *, online: bool, queues: bool, front: bool) -> dict:
    """Trial t's keyword arguments: untuned, random (the first quarter) or a neighbour of ``best``."""
    if t == 0:
        return _untuned(problem.n_layers, problem.top_k, front)
    if t <= max(1, trials // 4) or best is None:
        return sample_candidate(rng, problem.n_layers, problem.top_k, online=online, queues=queues, front=front)
    return perturb_candidate(rng, best, online=online, queues=queues)


def _untuned(n_layers: int, top_k: int, front: bool) -> dict:
    out = {"mu": [1.0] * n_layers, "nu": [1.0] * top_k, "lam": 1.0, "eta": 0.0}
    return {**out, "guard": False} if front else out


def _factory(name: str, kwargs: dict):
    from baselines.policies import make_policy

    def build(env):
        return make_policy(name, env, **kwargs)

    build.is_policy_factory = True
    return build


def _run(env_id: str, name: str, kwargs: dict, *, episodes: int, seed: int, config, scales=None,
         accuracy: str = "rule") -> list[dict]:
    """Per-(scale) summaries with the episodes' summed violations and misses (``violations``, ``misses``)."""
    from baselines.rollout import evaluate_policies

    rows = []
    summaries = evaluate_policies(env_id, [(name, _factory(name, kwargs))], episodes=episodes, seed=seed,
                                  budget_scales=scales, progress=False, episode_rows=rows, accuracy=accuracy,
                                  env_kwargs={"config": config} if config else None)
    for s in summaries:
        recs = [r for r in rows if r["budget_scale"] == s["budget_scale"]]
        s["violations"] = int(round(sum(r["budget_violated"] for r in recs)))
        s["misses"] = int(round(sum(r["deadline_misses"] for r in recs)))
    return summaries


def _problem(env_id: str, config):
    """The env's problem and whether its helpers' queues are uncertain (then delta is searched too)."""
    import gymnasium as gym

    env = gym.make(env_id, **({"config": config} if config else {}))
    try:
        return env.unwrapped.problem, env.unwrapped.config.compute.queue_delay_mean_s > 0
    finally:
        env.close()


def tune_budget(env_id: str, *, trials: int, episodes: int, seed: int, search_seed: int, config=None) -> dict:
    """The least-energy candidate with no more violations and misses than siftmoe (module docstring)."""
    problem, queues = _problem(env_id, config)
    online = problem.budget_mode in ("token", "episode")
    ref = _run(env_id, "siftmoe", {}, episodes=episodes, seed=seed, config=config)[0]
    rng = np.random.default_rng(search_seed)
    best, history = None, []
    for t in range(trials):
        kwargs = _candidate(rng, t, trials, best and best[1], problem, online=online, queues=queues, front=False)
        s = _run(env_id, "lagrangian", kwargs, episodes=episodes, seed=seed, config=config)[0]
        ok = s["violations"] <= ref["violations"] and s["misses"] <= ref["misses"]
        key = (not ok, s["energy_per_token_j"])
        history.append({"trial": t, "energy_per_token_j": s["energy_per_token_j"], "violations": s["violations"],
                        "misses": s["misses"], "admissible": ok})
        if best is None or key < best[0]:
            best = (key, kwargs, s)
    _, kwargs, s = best
    return {"kwargs": kwargs, "objective": "least energy with no more violations and misses than siftmoe",
            "selection": {"energy_per_token_j": s["energy_per_token_j"], "violations": s["violations"],
                          "misses": s["misses"], "siftmoe_energy_per_token_j": ref["energy_per_token_j"],
                          "siftmoe_violations": ref["violations"], "siftmoe_misses": ref["misses"],
                          "energy_vs_siftmoe": s["energy_per_token_j"] / ref["energy_per_token_j"]},
            "history": history}


def front_score(energy, accuracy, topk_accuracy: float) -> float:
    """Mean log energy of a front's lower envelope at Top-K's accuracy minus :data:`FRONT_LEVELS` (module
    docstring); ``energy``/``accuracy`` include Top-K's point."""
    from baselines.equal_accuracy import accuracy_energy_front, energy_at_accuracy

    front = accuracy_energy_front(energy, accuracy)
    logs = []
    for level in FRONT_LEVELS:
        point = energy_at_accuracy(front, topk_accuracy - level)
        e = float(front.energy[0]) if point.status == "below" else point.energy
        logs.append(math.log(e))
    return float(np.mean(logs))


def tune_front(env_id: str, *, trials: int, episodes: int, seed: int, search_seed: int, config=None) -> dict:
    """The candidate whose lambda sweep has the least mean log energy at the accuracy levels (module docstring)."""
    problem, _ = _problem(env_id, config)
    acc_key = "accuracy_correct"
    topk = _run(env_id, "topk", {}, episodes=episodes, seed=seed, config=config, accuracy="auto")[0]
    if acc_key not in topk:
        raise ValueError(f"{env_id} reports no {acc_key}: the accuracy objective needs a gating source with accuracy")
    rng = np.random.default_rng(search_seed)
    best, history = None, []
    for t in range(trials):
        kwargs = _candidate(rng, t, trials, best and best[1], problem, online=False, queues=False, front=True)
        rows = _run(env_id, "lagrangian", kwargs, episodes=episodes, seed=seed, config=config, scales=FRONT_SCALES,
                    accuracy="auto")
        energy = [topk["energy_per_token_j"]] + [r["energy_per_token_j"] for r in rows]
        accuracy = [topk[acc_key]] + [r[acc_key] for r in rows]
        score = front_score(energy, accuracy, topk[acc_key])
        history.append({"trial": t, "score": score, "points": [[e, a] for e, a in zip(energy[1:], accuracy[1:])]})
        if best is None or score < best[0]:
            best = (score, kwargs, energy, accuracy)
    score, kwargs, energy, accuracy = best
    return {"kwargs": kwargs, "objective": "mean log energy at Top-K accuracy minus "
                                           f"{', '.join(f'{100 * x:g}' for x in FRONT_LEVELS)} points",
            "selection": {"score": score, "topk_accuracy": topk[acc_key], "topk_energy_per_token_j":
                          topk["energy_per_token_j"], "scales": list(FRONT_SCALES),
                          "front": [[e, a] for e, a in zip(energy[1:], accuracy[1:])]},
            "history": history}


def tune(regimes, *, trials: int, episodes: int, front_trials: int, front_episodes: int, search_seed: int = 0,
         path=None) -> dict:
    """Tune every regime of ``regimes`` (names of :data:`baselines.benchmark_regimes.REGIMES`) and write the JSON
    (the regimes already in the file and not tuned now are kept)."""
    from baselines.benchmark_regimes import REGIMES, SELECTION_SEED

    path = TUNED_PATH if path is None else Path(path)
    unknown = [r for r in regimes if r not in REGIMES]
    if unknown:
        raise ValueError(f"unknown regimes {unknown}; choose from {list(REGIMES)}")
    data = {"format": TUNED_FORMAT, "regimes": {}}
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("format") == TUNED_FORMAT:
            data["regimes"].update(old.get("regimes", {}))
    for name in regimes:
        regime = REGIMES[name]
        cpu0, wall0 = time.process_time(), time.time()
        if regime.budget_binding:
            n_trials, n_episodes = trials, episodes
            result = tune_budget(regime.env_id, trials=trials, episodes=episodes, seed=SELECTION_SEED,
                                 search_seed=search_seed)
        else:
            n_trials, n_episodes = front_trials, front_episodes
            result = tune_front(regime.env_id, trials=front_trials, episodes=front_episodes, seed=SELECTION_SEED,
                                search_seed=search_seed)
        result["budget"] = {"trials": n_trials, "episodes": n_episodes, "seeds": [SELECTION_SEED,
                                                                                  SELECTION_SEED + n_episodes - 1],
                            "search_seed": search_seed, "cpu_s": time.process_time() - cpu0,
                            "wall_s": time.time() - wall0}
        result["env_id"] = regime.env_id
        data["regimes"][name] = result
        print(f"{name}: {json.dumps(result['kwargs'])}  {json.dumps(result['selection'])}  "
              f"({result['budget']['cpu_s']:.0f} CPU-s)", flush=True)
        path.write_text(json.dumps(data, indent=1) + "\n")
    return data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m baselines.lagrangian_tuning", description=__doc__.split("\n\n")[0])
    ap.add_argument("--regimes", default="token,episode,queues,accuracy")
    ap.add_argument("--trials", type=int, default=64, help="candidates per budget regime")
    ap.add_argument("--episodes", type=int, default=100, help="selection episodes per candidate (budget regimes)")
    ap.add_argument("--front-trials", type=int, default=24, help="candidates of the accuracy objective")
    ap.add_argument("--front-episodes", type=int, default=40, help="selection episodes per front point")
    ap.add_argument("--search-seed", type=int, default=0)
    ap.add_argument("--out", default=str(TUNED_PATH))
    args = ap.parse_args(argv)
    for field in ("trials", "episodes", "front_trials", "front_episodes"):
        if getattr(args, field) < 1:
            ap.error(f"--{field.replace('_', '-')} must be >= 1, got {getattr(args, field)}")
    tune([r.strip() for r in args.regimes.split(",") if r.strip()], trials=args.trials, episodes=args.episodes,
         front_trials=args.front_trials, front_episodes=args.front_episodes, search_seed=args.search_seed,
         path=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
