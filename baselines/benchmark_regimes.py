"""The regimes of the benchmark (:mod:`baselines.benchmark`): each regime's env and causal analytic baselines, the
seeds, budget scales and run sizes, and the table's columns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from baselines.lagrangian import tuned_kwargs

__all__ = ["Baseline", "Regime", "REGIMES", "SCALES", "QUICK", "FULL", "TABLE_COLUMNS", "ROLES", "TEST_SEED",
           "SELECTION_SEED", "TRAIN_SEED", "WIN_RATIO", "SEEDS", "AgentRun", "agent_runs"]

#: budget scales swept for the baselines' accuracy-energy curves (x0.125: Top-K accuracy; x16 skips nearly every
#: expert under a budget, but the tuned Lagrangian rule's lambda / scale needs x24-x64 to reach the accuracy
#: objective's agents: measured, x16 0.4196 and x24 0.3968 accuracy where PPO at weight 20 has 0.3966) [choice]
SCALES = (0.125, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 8.0, 16.0, 24.0, 32.0, 64.0)
TEST_SEED = 20_000  # held-out episodes (train.py evaluates on 10_000 + i, span statistics use 10**6 + i)
SELECTION_SEED = 30_000
TRAIN_SEED = 0  # the first training seed; seed i of --seeds N trains with TRAIN_SEED + i
#: training seeds per agent (issue 23: RL results on one seed are not results) [choice: the issue's minimum]
SEEDS = 5
#: the energy saving at equal accuracy that counts as a win (issue 13: at least 10% less energy)
WIN_RATIO = 0.9


class Baseline(NamedTuple):
    """A causal analytic baseline of a regime: ``make_policy(policy, env, **kwargs)``, run on the regime's env with
    ``config`` merged over the regime's config and its preset (None: as registered; e.g. another budget mode for the accuracy objective,
    whose agent has no budget). The env's channels and tokens do not depend on the budget mode, so every baseline
    sees the same episodes."""

    label: str
    policy: str
    kwargs: dict = {}
    config: dict | None = None


@dataclass(frozen=True)
class Regime:
    name: str
    env_id: str
    what: str
    #: causal analytic baselines swept over the budget scales
    baselines: tuple[Baseline, ...]
    #: the regime's objective has a deviation budget (False for the accuracy objective: violations are reported,
    #: not compared)
    budget_binding: bool = True
    #: trade-off weights the agents train at, one agent per weight and seed: the YAML entry's
    #: ``reward_shaping.accuracy_weight`` replaced (train.py --hyperparams); () = the entry's own weight only.
    #: The agents' accuracy-energy front is the lower convex envelope of their points (and Top-K).
    weights: tuple[float, ...] = ()
    #: the weight of the table's PPO row (the YAML entry's own; must be one of ``weights``)
    headline_weight: float | None = None
    #: config merged over the preset for the training and every policy (e.g. the model's accuracy)
    config: dict | None = None
    #: train.py --hyperparams KEY=VALUE overrides of the YAML entry (a preset without a tuned entry of its own)
    hyperparams: tuple[str, ...] = ()

    def __post_init__(self):
        if self.weights and self.headline_weight not in self.weights:
            raise ValueError(f"regime {self.name!r}: headline_weight {self.headline_weight!r} must be one of its "
                             f"weights {self.weights}")


class AgentRun(NamedTuple):
    """One trained agent of a regime: its training seed and trade-off weight (None: the YAML entry's)."""

    seed: int
    weight: float | None
    headline: bool  # at the table's weight (the PPO row pools these over the seeds)

    def run_name(self, regime: str) -> str:
        """The run folder's name under runs/ppo: the regime's name for what ``python train.py --env PRESET``
        trains (seed 0, the YAML's weight), suffixed by what differs from it."""
        return "".join((regime, "" if self.headline else f"_w{self.weight:g}",
                        "" if self.seed == TRAIN_SEED else f"_s{self.seed}"))


def agent_runs(regime: "Regime", n_seeds: int) -> list[AgentRun]:
    """The regime's agents: every weight (or the YAML's) at training seeds TRAIN_SEED .. TRAIN_SEED + n_seeds - 1."""
    weights = regime.weights or (None,)
    return [AgentRun(TRAIN_SEED + i, w, w == regime.headline_weight) for w in weights for i in range(n_seeds)]


_LAYER, _TOKEN, _EPISODE = ({"budget": {"mode": m}} for m in ("layer", "token", "episode"))
_TOKEN_SPAN = (Baseline("siftmoe even", "siftmoe"), Baseline("siftmoe greedy", "siftmoe", {"allocation": "greedy"}),
               Baseline("siftmoe_sdp", "siftmoe_sdp"), Baseline("siftmoe_dpp", "siftmoe_dpp"))
_EPISODE_SPAN = (Baseline("siftmoe_span even", "siftmoe_span"), Baseline("siftmoe (per-token even)", "siftmoe"),
                 Baseline("siftmoe_span greedy", "siftmoe_span", {"allocation": "greedy"}),
                 Baseline("siftmoe_sdp", "siftmoe_sdp"), Baseline("siftmoe_dpp", "siftmoe_dpp"))
#: the tuned Lagrangian rule of a regime (baselines/lagrangian_tuned.json, tuned on the selection seeds): its budget
#: scale scales the budget it guards and, the observed deviations being in budget units, divides lambda
_LAGRANGIAN = "lagrangian (tuned)"
REGIMES = {
    "token": Regime("token", "wide_env/WideMoE-TokenBudget-v0", "token budget (one deviation budget per token)",
                    (*_TOKEN_SPAN, Baseline(_LAGRANGIAN, "lagrangian", tuned_kwargs("token")))),
    "episode": Regime("episode", "wide_env/WideMoE-EpisodeBudget-v0",
                      "episode budget with time-correlated fading",
                      (*_EPISODE_SPAN, Baseline(_LAGRANGIAN, "lagrangian", tuned_kwargs("episode")))),
    # the chance constraint at several tolerated miss probabilities: the risk-aware baselines an agent must beat
    "queues": Regime("queues", "wide_env/WideMoE-Realistic-v0",
                     "uncertain persistent helper queues on the 3GPP link (per-layer budget)",
                     (Baseline("siftmoe", "siftmoe"), Baseline("siftmoe_cc", "siftmoe_cc"),
                      Baseline("siftmoe_cc delta=0.2", "siftmoe_cc", {"delta": 0.2}),
                      Baseline("siftmoe_cc delta=0.5", "siftmoe_cc", {"delta": 0.5}),
                      Baseline(_LAGRANGIAN, "lagrangian", tuned_kwargs("queues")))),
    # the agent has no budget: every budget mode's baselines compete (same episodes)
    "accuracy": Regime("accuracy", "wide_env/WideMoE-AccuracyObjective-v0",
                       "real-accuracy objective (baselines with layer, token and episode budgets)",
                       (Baseline("siftmoe (layer budget)", "siftmoe", {}, _LAYER),
                        *(b._replace(label=f"{b.label} (token budget)", config=_TOKEN) for b in _TOKEN_SPAN),
                        *(b._replace(label=f"{b.label} (episode budget)", config=_EPISODE) for b in _EPISODE_SPAN
                          if b.policy != "siftmoe"),
                        # no budget of its own: the scales sweep lambda / scale (guard off) on the preset's env
                        Baseline("lagrangian (tuned, lambda sweep)", "lagrangian", tuned_kwargs("accuracy"))),
                       budget_binding=False,
                       # x1, x2 and x4 the YAML entry's 20: from about 5 points below Top-K's accuracy up to near it
                       # [choice; measured on selection seeds 30000-30099, seed 0: at 20, 0.27 of Top-K's energy at
                       # 5.5 points less accuracy; at 5 the agent drifts towards skipping every expert]
                       weights=(20.0, 40.0, 80.0), headline_weight=20.0),
    # the SiftMoE paper's setting (Mixtral-8x7B routing, payload, bandwidth, deadline; per-layer budget) with the
    # model's accuracy; it has no tuned YAML entry, so the per-layer regimes' settings (the queues regime's: a
    # contextual bandit starting at Top-K routing, joules, the layer's real loss increase) [choice]
    "mixtral": Regime("mixtral", "wide_env/WideMoE-Mixtral-v0",
                      "paper preset: Mixtral-8x7B routing and the paper's radio, per-layer budget, model accuracy",
                      (Baseline("siftmoe", "siftmoe"), Baseline(_LAGRANGIAN, "lagrangian", tuned_kwargs("mixtral"))),
                      config={"gating": {"accuracy": "model"}},
                      hyperparams=("policy_kwargs.expert_set={hidden: 32, pair_hidden: 16, n_blocks: 1, "
                                   "topk_prior: 3.0, nodes_are_experts: true}", "gamma=0.0", "gae_lambda=0.0",
                                   "reward_shaping={accuracy_weight: 20.0, energy: absolute, violation_weight: 2.0}",
                                   "n_timesteps=122880")),
}

#: --quick: a smoke run that exercises every step and writes every file, on tiny budgets (two seeds: the IQM and
#: the bootstrap over seeds run, with nothing to trim)
QUICK = {"timesteps": 1024, "test_episodes": 4, "selection_episodes": 3, "scales": (0.5, 1.0, 4.0, 16.0),
         "n_boot": 200, "stats_episodes": 4, "seeds": 2, "bound_episodes": 1, "bound_max_nodes": 0}
#: the accuracy hindsight bound (headroom) on the first ``bound_episodes`` test episodes, each token's exact search
#: capped at ``bound_max_nodes`` prefixes (0: the greedy descent alone; an upper bound on the least energy either
#: way) [choice: about 2.6 CPU-s per tiny episode, 15 on Mixtral's 32 layers at 300 nodes]
FULL = {"test_episodes": 200, "selection_episodes": 50, "scales": SCALES, "n_boot": 2000, "stats_episodes": 32,
        "seeds": SEEDS, "bound_episodes": 20, "bound_max_nodes": 300}

#: columns of benchmark.csv, in order. The PPO row pools the headline agents of every seed: energy, accuracy,
#: violations and misses over all their episodes, ``eq_acc_*`` the IQM over seeds with its stratified bootstrap CI
#: (:mod:`baselines.benchmark_fronts`), ``train_*`` summed over every agent of the regime
TABLE_COLUMNS = ("regime", "env", "role", "policy", "budget_scale", "episodes", "seeds", "energy_per_token_j",
                 "energy_per_token_ci95", "energy_rel_topk", "accuracy", "accuracy_ci95", "violation_rate",
                 "deadline_misses_per_token", "gap_closed", "eq_acc_ratio", "eq_acc_ci_low", "eq_acc_ci_high",
                 "eq_acc_status", "eq_acc_verdict", "baseline_violation_rate_at_acc", "baseline_misses_at_acc", "wins",
                 "train_runs", "train_timesteps", "train_cpu_s", "train_wall_s", "train_cpu_cap_hit", "headroom",
                 "headroom_counts")
ROLES = ("topk", "topk_ideal", "best_analytic", "ppo", "oracle")
