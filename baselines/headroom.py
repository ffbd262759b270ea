"""A regime's headroom: how much energy the best causal baseline could still save, at matched accuracy, against
the accuracy hindsight bound (:mod:`baselines.accuracy_bound`).

Definition.  ``headroom = E_causal*(a) / E_bound`` (a ratio, >= 1 where the bound is cheaper), with

* ``E_bound``: the bound's energy per token (J, the env's ``energy_j`` summed over the episode / its tokens, the
  replayed plan; means over the episodes) and ``a`` its measured accuracy (``accuracy_correct``, the mean);
* ``E_causal*(a)``: for each causal baseline, the energy of its accuracy-energy front at ``a``
  (:func:`baselines.equal_accuracy.energy_at_accuracy`: the lower convex envelope of its budget settings and
  practical Top-K, on the same episodes); where ``a`` is above its most accurate point, that point's energy (it
  needs at least that and still falls short: conservative); the least over the baselines.

The bound's plan is realisable, so ``E_bound`` is at least the least energy that keeps the predictions: this
headroom is at most the true one (conservative: a regime reported with headroom has it).

A regime whose headroom is under 5% (``headroom < HEADROOM_MIN_RATIO`` = 1.05: the bound saves less than 1 in 21
joules of the best causal baseline) is reported as such and does not count for "agents win"
(:func:`counts_for_agents_win`).
"""

from __future__ import annotations

import time

import numpy as np

from baselines.equal_accuracy import accuracy_energy_front, energy_at_accuracy, episode_matrix

__all__ = ["HEADROOM_MIN_RATIO", "headroom", "counts_for_agents_win", "baseline_energy_at", "regime_headroom"]

#: the least headroom (best causal energy / bound energy) for a regime to count for "agents win"
HEADROOM_MIN_RATIO = 1.05


def headroom(best_causal_energy, bound_energy):
    """``best_causal_energy / bound_energy`` (J per token each, at matched accuracy), elementwise; inf where the
    bound spends nothing and the baseline something, NaN where both spend nothing."""
    b, e = (np.asarray(x, dtype=np.float64) for x in (best_causal_energy, bound_energy))
    if (b < 0).any() or (e < 0).any():
        raise ValueError(f"energies must be >= 0 J per token, got best_causal_energy={best_causal_energy!r}, "
                         f"bound_energy={bound_energy!r}")
    with np.errstate(divide="ignore", invalid="ignore"):
        out = b / e
    return float(out) if out.ndim == 0 else out


def counts_for_agents_win(headroom_ratio, minimum: float = HEADROOM_MIN_RATIO) -> bool:
    """Whether a regime with this headroom counts for "agents win": at least ``minimum`` (NaN: no)."""
    return bool(float(headroom_ratio) >= minimum)  # NaN compares False


def baseline_energy_at(energy, accuracy, target: float) -> tuple[float, str]:
    """A baseline's energy per token at accuracy ``target`` from its settings' per-episode values (S, n) (means
    over the episodes make the points): (energy, status) with status as in
    :func:`~baselines.equal_accuracy.energy_at_accuracy`; "above" gives the most accurate point's energy."""
    front = accuracy_energy_front(np.atleast_2d(energy).mean(axis=1), np.atleast_2d(accuracy).mean(axis=1))
    point = energy_at_accuracy(front, target)
    if point.status == "above":
        return float(front.energy[-1]), "above"
    return float(point.energy), point.status


def regime_headroom(env_id: str, config: dict | None = None, seed: int = 0, episodes: int = 3,
                    baselines=("siftmoe",), budget_scales=(0.25, 0.5, 1.0, 2.0, 4.0), tolerance: float | None = None,
                    max_nodes: int = 4000) -> dict:
    """The bound, practical Top-K and each baseline's front on the episodes ``seed .. seed + episodes - 1``
    (``gym.make(env_id, config=config).reset(seed=s)``), and the headroom (module docstring). Returns a dict of
    J-per-token energies, accuracies, per-baseline energy at the bound's accuracy, ``headroom``,
    ``counts_for_agents_win`` and the bound's CPU seconds per episode."""
    from baselines.accuracy_bound import accuracy_bound
    from baselines.rollout import evaluate_policies

    seeds = list(range(int(seed), int(seed) + int(episodes)))
    t0 = time.process_time()
    bound = accuracy_bound(env_id, config, seeds, tolerance=tolerance, max_nodes=max_nodes)
    bound_cpu = time.process_time() - t0
    rows: list[dict] = []
    kwargs = {"config": dict(config or {})}
    evaluate_policies(env_id, ["topk"], episodes=len(seeds), seed=seeds[0], env_kwargs=kwargs, vec_env="single",
                      accuracy="model", episode_rows=rows, progress=False)
    evaluate_policies(env_id, list(baselines), episodes=len(seeds), seed=seeds[0], env_kwargs=kwargs,
                      budget_scales=list(budget_scales), vec_env="single", accuracy="model", episode_rows=rows,
                      progress=False)
    topk_e, _ = episode_matrix(rows, "topk", "energy_per_token")
    topk_a, _ = episode_matrix(rows, "topk", "accuracy_correct")
    e_bound = float(np.mean([b.energy_per_token_j for b in bound]))
    a_bound = float(np.mean([b.accuracy_correct for b in bound]))
    at = {}
    for name in baselines:
        e, _ = episode_matrix(rows, name, "energy_per_token")
        a, _ = episode_matrix(rows, name, "accuracy_correct")
        at[name] = baseline_energy_at(np.vstack([topk_e, e]), np.vstack([topk_a, a]), a_bound)
    best = min(at, key=lambda k: at[k][0] if np.isfinite(at[k][0]) else np.inf)
    ratio = headroom(at[best][0], e_bound)
    return {"env": env_id, "episodes": len(seeds), "bound_energy_per_token_j": e_bound,
            "bound_lower_per_token_j": float(np.mean([b.lower_per_token_j for b in bound])),
            "bound_accuracy": a_bound, "bound_accuracy_same": float(np.mean([b.accuracy_same for b in bound])),
            "bound_exact_share": float(np.mean([b.exact_share for b in bound])),
            "bound_lost_tokens": int(sum(b.lost for b in bound)),
            "bound_cpu_s_per_episode": bound_cpu / len(seeds),
            "topk_energy_per_token_j": float(topk_e.mean()), "topk_accuracy": float(topk_a.mean()),
            "baseline_energy_at_bound_accuracy_j": {k: v[0] for k, v in at.items()},
            "baseline_status": {k: v[1] for k, v in at.items()}, "best_causal": best,
            "headroom": ratio, "counts_for_agents_win": counts_for_agents_win(ratio)}
