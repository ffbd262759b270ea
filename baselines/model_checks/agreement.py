"""Measure the table accuracy rules against the live model on the same tokens and the same decisions.

    python -m baselines.model_checks.agreement --env wide_env/WideMoE-v0 --policies siftmoe,topk,random \
        --scales 1,2,4 --episodes 200 [--config JSON] [--seed 1000] [--out FILE.json]

Runs the env with the live backend (``gating.backend = "live"``: the checkpoint decodes every token with the
experts the policy executed; perturbed tokens' keys and values reach later tokens). Per step it records the
trace position, layer and the executed experts that met the deadline; at each token's last layer the live
outcome. Then, offline, each table rule scores the same tokens with the servers the combine rule gives the
trace's Top-K slots for the same executed experts:

* ``logit``: the logit-effect rule of :mod:`wide_env.gating.effects` (per-token sums; the frozen-routing
  changes for tokens with several perturbations when the trace has them), no context term;
* ``logit+context``: the same with the context term (``effects.CONTEXT_DECAY`` / ``CONTEXT_WEIGHT``);
* ``rerouted``: the per-token sum of the re-routed single changes (the rule without frozen-routing tables);
* ``single``: the dense tables' rule (prediction unchanged iff every single perturbation left it unchanged,
  else correct iff every one left it correct), when the trace has ``effect_*`` tables;
* ``model``: the table env's model accuracy (``gating.accuracy = "model"``), replaying the same episodes and
  actions (its observations show the trace's gating, but the actions are the live run's).

Reported per policy and scale: tokens, live accuracy, each rule's accuracy, the mean paired difference rule -
live with its 95% CI (points), and the share of tokens on which rule and live agree.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from wide_env.gating.effects import LOGIT_EFFECT_FROZEN, EffectLookup, context_after
from wide_env.models.decoder import serve_batch


def collect_live(env_id: str, config: dict, policy: str, episodes: int, seed: int) -> dict:
    """Run the live env; per step (position, layer, effective executed mask), per token the live outcome."""
    import gymnasium as gym

    import wide_env  # noqa: F401
    from baselines import make_policy

    cfg = dict(config)
    cfg["gating"] = {**cfg.get("gating", {}), "backend": "live"}
    env = gym.make(env_id, config=cfg)
    u = env.unwrapped
    pol = make_policy(policy, env)
    L = u.sim.n_layers
    steps = {k: [] for k in ("episode", "position", "layer", "executed", "action")}
    toks = {k: [] for k in ("episode", "position", "correct", "same", "nll")}
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        if hasattr(pol, "reset"):
            pol.reset(seed=seed + ep)
        done = False
        while not done:
            action = np.asarray(pol(obs)).astype(bool)
            meets = u.current_view().meets_deadline if u.sim.enforce_deadline else np.ones_like(action)
            obs, _, term, trunc, info = env.step(action.astype(np.int8))
            position = u.trace_start + info["token"]  # trace position of the token (the env's episode start + token)
            for key, value in (("episode", ep), ("position", position), ("layer", info["layer"]),
                               ("executed", action & np.asarray(meets, bool)), ("action", action)):
                steps[key].append(value)
            if info["layer"] == L - 1:
                for key, value in (("episode", ep), ("position", position), ("correct", info["accuracy_correct"]),
                                   ("same", info["accuracy_same"]), ("nll", info["live_nll"])):
                    toks[key].append(value)
            done = term or trunc
    env.close()
    return {"steps": {k: np.asarray(v) for k, v in steps.items()}, "tokens": {k: np.asarray(v) for k, v in toks.items()}}


def rule_outcomes(trace: dict, run: dict) -> dict:
    """Each rule's (correct, same) per token of a :func:`collect_live` run, from the trace's tables."""
    st, tk = run["steps"], run["tokens"]
    T, L, E = trace["gate_probs"].shape
    K = trace["topk_idx"].shape[2]
    D = trace["mismatch"].astype(np.float64)
    n_tok = len(tk["position"])
    if len(st["position"]) != n_tok * L or not (st["position"][::L] == tk["position"]).all():
        raise ValueError("every token must have exactly L steps in order")
    topk = trace["topk_idx"].astype(np.int64)[st["position"], st["layer"]]  # (steps, K)
    servers = serve_batch(D[st["layer"]], topk, st["executed"])
    out = {"perturbations": (servers != topk).sum(1).reshape(n_tok, L).sum(1)}
    lookup = EffectLookup.from_trace(trace)
    rows = lookup.rows(st["position"], st["layer"], servers)
    acc = lookup.values[rows].sum(1).reshape(n_tok, L, -1).sum(1)
    correct, same, delta_loss = lookup.decide(tk["position"], acc)
    out["logit"] = (correct, same)
    context = np.zeros(n_tok)
    for j in range(1, n_tok):  # tokens of an episode are consecutive and in order; 0 at an episode's start
        if tk["episode"][j] == tk["episode"][j - 1]:
            context[j] = context_after(context[j - 1], delta_loss[j - 1])
    out["logit+context"] = lookup.decide(tk["position"], acc, context)[:2]
    if LOGIT_EFFECT_FROZEN in trace:
        rerouted = EffectLookup.from_trace({k: v for k, v in trace.items() if k != LOGIT_EFFECT_FROZEN})
        acc_r = rerouted.values[rows].sum(1).reshape(n_tok, L, -1).sum(1)
        out["rerouted"] = rerouted.decide(tk["position"], acc_r)[:2]
    if "effect_correct" in trace:
        p, l = st["position"][:, None], st["layer"][:, None]
        k = np.arange(K)[None, :]
        corr = trace["effect_correct"][p, l, k, servers].reshape(n_tok, L * K).all(1)
        same = trace["effect_same"][p, l, k, servers].reshape(n_tok, L * K).all(1)
        full = trace["full_correct"][tk["position"]]
        out["single"] = (np.where(same, full, corr), same)
    return out


def model_outcomes(env_id: str, config: dict, run: dict, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(correct, same) per token of a :func:`collect_live` run, measured by the table env's model accuracy
    (``gating.accuracy = "model"``): the same episodes (seeds) and the same actions, replayed."""
    import gymnasium as gym

    cfg = dict(config)
    cfg["gating"] = {**cfg.get("gating", {}), "backend": "table", "accuracy": "model"}
    env = gym.make(env_id, config=cfg)
    st = run["steps"]
    correct, same = [], []
    for ep in np.unique(st["episode"]):
        env.reset(seed=seed + int(ep))
        for action in st["action"][st["episode"] == ep]:
            _, _, _, _, info = env.step(action.astype(np.int8))
            if info["token_complete"]:
                correct.append(info["accuracy_correct"])
                same.append(info["accuracy_same"])
    env.close()
    return np.asarray(correct, bool), np.asarray(same, bool)


def _ci95(x: np.ndarray) -> float:
    return float(1.96 * x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def summarize(trace: dict, run: dict, model: tuple | None = None) -> dict:
    """Per rule (and ``model``: :func:`model_outcomes`, when given): accuracy, paired difference from the live
    model with its 95% CI, and the share of tokens on which they agree."""
    tk = run["tokens"]
    live = tk["correct"].astype(bool)
    res = {"tokens": int(len(live)), "live_acc_pts": 100 * float(live.mean()),
           "full_acc_pts": 100 * float(trace["full_correct"][tk["position"]].mean())}
    rules = rule_outcomes(trace, run)
    if model is not None:
        rules["model"] = model
    res["perturbations_per_token"] = float(rules.pop("perturbations").mean())
    for name, (correct, _) in rules.items():
        diff = correct.astype(np.float64) - live
        res[name] = {"acc_pts": 100 * float(correct.mean()), "diff_pts": 100 * float(diff.mean()),
                     "ci95_pts": 100 * _ci95(diff), "agree_pct": 100 * float((correct == live).mean())}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", default="wide_env/WideMoE-v0")
    ap.add_argument("--config", default="{}", help="JSON config merged over the env's preset")
    ap.add_argument("--policies", default="siftmoe,topk,random")
    ap.add_argument("--scales", default="1,2,4")
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import gymnasium as gym
    import torch

    import wide_env  # noqa: F401
    from wide_env.config import deep_merge
    from wide_env.gating import make_gating_source
    from wide_env.gating.trace import load_trace

    torch.set_num_threads(1)
    base = deep_merge(dict(gym.spec(args.env).kwargs.get("config") or {}), json.loads(args.config))
    results = {}
    for policy in args.policies.split(","):
        for scale in (float(s) for s in args.scales.split(",")):
            cfg = deep_merge(base, {"budget": {"scale": scale}})
            t0 = time.time()
            run = collect_live(args.env, cfg, policy, args.episodes, args.seed)
            env = gym.make(args.env, config=cfg)
            trace = load_trace(make_gating_source(env.unwrapped.config).path)
            env.close()
            res = summarize(trace, run, model_outcomes(args.env, cfg, run, args.seed))
            res["seconds"] = round(time.time() - t0, 1)
            results[f"{policy}@{scale:g}"] = res
            line = f"{policy:8s} scale {scale:<4g} tokens {res['tokens']:5d} live {res['live_acc_pts']:6.2f}"
            for name in ("model", "logit", "logit+context", "rerouted", "single"):
                if name in res:
                    r = res[name]
                    line += f" | {name} {r['diff_pts']:+.2f}+-{r['ci95_pts']:.2f} (agree {r['agree_pct']:.1f}%)"
            print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
