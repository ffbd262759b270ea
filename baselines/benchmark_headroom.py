"""Each regime's headroom in the benchmark (:mod:`baselines.benchmark`): the best causal baseline's energy at the
accuracy hindsight bound's accuracy over the bound's energy (:mod:`baselines.headroom`), on the first test episodes.

The bound (:func:`baselines.accuracy_bound.accuracy_bound`) runs on the regime's env as the policies do (the same
config, the model's accuracy, the deadlines realised in hindsight) and ignores the deviation budget: at matched
accuracy the budget is the baselines' knob, not the agents' limit. Its plan is realisable, so its energy is at
least the least energy that keeps the predictions and the headroom is at most the true one. A regime under 5%
(:data:`baselines.headroom.HEADROOM_MIN_RATIO`) does not count for "agents win"."""

from __future__ import annotations

import time

import numpy as np

from baselines.accuracy_bound import accuracy_bound
from baselines.benchmark_regimes import Regime
from baselines.benchmark_scoring import baseline_curve
from baselines.headroom import baseline_energy_at, counts_for_agents_win, headroom

__all__ = ["regime_headroom"]


def regime_headroom(regime: Regime, test: list[dict], best: str, *, episodes: int, max_nodes: int,
                    config: dict | None = None) -> dict:
    """The headroom of ``regime`` on its first ``episodes`` test episodes (``test``: the benchmark's test episode
    rows, whose baseline ``best`` is the chosen best causal baseline); ``config``: the regime's config merged over
    the preset. Returns the ratio, how the baseline's energy was read (``energy_at_accuracy``'s status), whether
    the regime counts for "agents win", and the bound's own figures (J per token, accuracy, CPU seconds)."""
    seeds = sorted({int(r["seed"]) for r in test if r["policy"] == "topk"})[:episodes]
    if not seeds:
        raise ValueError(f"regime {regime.name!r}: no Top-K test episodes to bound")
    cpu0 = time.process_time()
    bounds = accuracy_bound(regime.env_id, config, seeds, max_nodes=max_nodes)
    cpu = time.process_time() - cpu0
    chosen = set(seeds)
    curve = baseline_curve([r for r in test if int(r["seed"]) in chosen], best)
    e_bound = float(np.mean([b.energy_per_token_j for b in bounds]))
    a_bound = float(np.mean([b.accuracy_correct for b in bounds]))
    e_best, status = baseline_energy_at(curve["energy"], curve["accuracy"], a_bound)
    ratio = headroom(e_best, e_bound)
    return {"regime": regime.name, "baseline": best, "episodes": len(seeds), "headroom": ratio,
            "baseline_energy_at_bound_accuracy_j": e_best, "baseline_status": status,
            "counts_for_agents_win": counts_for_agents_win(ratio), "bound_energy_per_token_j": e_bound,
            "bound_accuracy": a_bound, "bound_exact_share": float(np.mean([b.exact_share for b in bounds])),
            "bound_lost_tokens": int(sum(b.lost for b in bounds)), "bound_max_nodes": int(max_nodes),
            "bound_cpu_s": cpu}
