r"""Evaluate expert-selection policies on a WIDE environment, on identical episodes.

    python -m baselines.evaluate --env wide_env/WideMoE-v0 --policies topk,siftmoe --episodes 20 --seed 0 \
        --out runs/eval [--env-kwargs "{'config': {'n_tokens': 8}}"] [--budget-scales 0.25,0.5,1,2,4] \
        [--policy-kwargs "{'wdmoe': {'threshold': 0.3}}"] [--vec-env auto|native|single] [--no-progress]

(also installed as ``wide-evaluate``). Policies: the names of :data:`baselines.policies.POLICY_NAMES`
and saved SB3 models ``ALGO:PATH`` with ALGO in :data:`agents.registry.ALGORITHMS` (``ppo``, ``a2c``,
``maskable_ppo``, ``recurrent_ppo``; loaded lazily, on CPU).

Every policy sees the same episodes, and the environment's randomness (channels, gating) does not depend
on the actions, so the channel and token realisations are identical across policies and budget scales:

* ``--vec-env native`` (the default, ``auto``, for ids with wide_env's batched core): the episodes of a
  policy run as one batch on the native vector env (``gym.make_vec(id, num_envs=episodes,
  vectorization_mode="vector_entry_point")``), reset with the seeds ``[seed, ..., seed + episodes - 1]``:
  sub-env ``i`` replays ``gym.make(id).reset(seed=seed + i)`` exactly.
* ``--vec-env single`` (``auto`` for ids without a batched core): one env, episode
  ``i`` is ``env.reset(seed=seed + i)``. Both modes see the same episodes (a policy with its own randomness,
  ``random``, draws differently: once per batch, or once per episode).

A budget scale ``s`` multiplies the env's own ``budget.scale`` (config key ``budget.scale``); it is
applied through the env config, over the registered preset.

Outputs: a table on stdout, ``OUT/results.csv`` (one row per policy and budget scale),
``OUT/episodes.csv`` (one row per episode: ``episode`` i, ``seed`` = seed + i) and ``OUT/tradeoff.png`` (accuracy, when the env's info reports
``accuracy_*`` keys, and deviation vs energy per token, one curve per policy across the scales).
"""
from __future__ import annotations

import argparse
import ast
import csv
import math
import os
import sys
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from baselines.policies import Policy, make_policy
from wide_env.config import deep_merge

__all__ = ["evaluate_policies", "summarize", "write_csv", "write_outputs", "plot_tradeoff", "format_table", "main",
           "VEC_ENV_MODES"]

# Two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30; beyond that the normal 1.96 is used
# (error < 2%).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def ci95(values) -> float:
    """Half-width of the 95% confidence interval of the mean (Student t); NaN for fewer than 2 values."""
    v = np.asarray(values, dtype=np.float64)
    n = v.size
    if n < 2:
        return float("nan")
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    return float(t * v.std(ddof=1) / math.sqrt(n))


#: policy name for ideal Top-K: Top-K routing with deadline enforcement off (late experts still count)
IDEAL_TOPK = "topk_ideal"


def _env_kwargs_for_scale(env_id: str, env_kwargs: dict | None, scale: float | None) -> dict:
    """Registered kwargs + user kwargs (configs deep-merged) + the budget scale folded into the config."""
    import gymnasium as gym

    import wide_env  # noqa: F401  (registers the environments)
    from wide_env.config import WideConfig

    try:
        spec = gym.spec(env_id)
    except Exception as exc:  # gymnasium raises its own NameNotFound / NamespaceNotFound
        raise ValueError(f"unknown environment id {env_id!r}: {exc}; registered WIDE ids: "
                         f"{sorted(wide_env.ENVIRONMENTS)}") from None
    user = dict(env_kwargs or {})
    config = user.pop("config", None) or {}
    if isinstance(config, WideConfig):
        config = config.to_dict()
    if not isinstance(config, dict):
        raise TypeError(f"env_kwargs['config'] must be a dict, got {type(config).__name__}")
    merged = dict(config)
    if scale is not None:
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"budget scale must be a positive number, got {scale!r}")
        preset = user.get("preset", spec.kwargs.get("preset"))
        base = WideConfig.from_dict(merged, preset=preset).budget.scale
        merged = deep_merge(merged, {"budget": {"scale": float(base) * float(scale)}})
    return {**user, "config": merged}


def _build_policies(policies, env, policy_kwargs, cache):
    built = []
    for item in policies:
        if isinstance(item, str):
            label = item
            key = item.split(":", 1)[0].strip().lower() if ":" in item else item.strip().lower()
            kwargs = dict((policy_kwargs or {}).get(item, (policy_kwargs or {}).get(key, {})))
            pol = make_policy("topk" if key == IDEAL_TOPK else item, env, **kwargs)
            if ":" in item:  # reuse a loaded model across budget scales
                if item in cache:
                    pol._model = cache[item]
                else:
                    cache[item] = pol.model
            built.append((label, pol))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            label, obj = item
            if isinstance(obj, Policy) or (callable(obj) and not _is_factory(obj)):
                built.append((label, obj))
            else:
                built.append((label, obj(env)))
        else:
            raise TypeError(f"policies must be names ('siftmoe', 'ppo:model.zip') or (label, policy) pairs; got {item!r}")
    return built


def _is_factory(obj) -> bool:
    return getattr(obj, "is_policy_factory", False)


#: per-step info values summed into an episode record
_SUMMED = ("energy_j", "topk_energy_j", "deviation", "budget_violated", "deadline_misses", "n_executed")
#: how an evaluation runs its episodes (see the module docstring)
VEC_ENV_MODES = ("auto", "native", "single")


def _new_record() -> dict:
    return {**{key: 0.0 for key in _SUMMED}, "reward": 0.0, "decision_s": 0.0, "steps": 0}


def _prompt_tokens(problem) -> int | None:
    """Tokens per episode of a prefill problem (every step covers the whole prompt); None for decoding."""
    return problem.prompt_tokens * problem.n_prompts if hasattr(problem, "prompt_tokens") else None


def _run_episode(env, policy, seed: int, max_steps: int | None):
    obs, _ = env.reset(seed=seed)
    if hasattr(policy, "reset"):
        policy.reset(seed=seed)
    rec = _new_record()
    acc: dict[str, list[float]] = {}
    tokens = set()
    done = False
    while not done:
        t0 = time.perf_counter()
        action = policy(obs)
        rec["decision_s"] += time.perf_counter() - t0
        obs, reward, term, trunc, info = env.step(action)
        rec["reward"] += float(reward)
        for key in _SUMMED:
            rec[key] += float(info[key])
        if info.get("token_complete", 1):  # accuracy is a per-token outcome: count each token once
            for key, value in info.items():
                if key.startswith("accuracy_"):
                    acc.setdefault(key, []).append(float(value))
        tokens.add(info.get("token", 0))
        rec["steps"] += 1
        done = term or trunc or (max_steps is not None and rec["steps"] >= max_steps)
    # decoding: one token per L steps (info["token"]); prefilling: every step covers the whole prompt
    rec["tokens"] = _prompt_tokens(env.unwrapped.problem) or len(tokens)
    for key, values in acc.items():
        rec[key] = float(np.mean(values))
    return rec


def _run_batch(venv, policy, seed: int, max_steps: int | None) -> list[dict]:
    """One episode per sub-env of a native vector env, sub-env i seeded ``seed + i`` (it replays the single
    env's episode of that seed); the policy acts on the batch. Returns one record per sub-env (the same
    fields as :func:`_run_episode`)."""
    B = venv.num_envs
    obs, _ = venv.reset(seed=[seed + i for i in range(B)])
    if hasattr(policy, "reset"):
        policy.reset(seed=seed)
    sums = {key: np.zeros(B) for key in (*_SUMMED, "reward", "decision_s")}
    steps, tokens = np.zeros(B, dtype=np.int64), np.zeros(B, dtype=np.int64)
    last_token = np.full(B, -1)
    acc_sum: dict[str, np.ndarray] = {}
    acc_n = np.zeros(B)
    active = np.ones(B, dtype=bool)
    while active.any():
        t0 = time.perf_counter()
        action = policy(obs)
        sums["decision_s"] += np.where(active, (time.perf_counter() - t0) / B, 0.0)
        obs, reward, term, trunc, info = venv.step(action)
        sums["reward"] += np.where(active, reward, 0.0)
        for key in _SUMMED:
            sums[key] += np.where(active, info[key], 0.0)
        complete = active & (np.asarray(info["token_complete"]) > 0 if "token_complete" in info else active)
        for key in info:
            if key.startswith("accuracy_"):
                acc_sum.setdefault(key, np.zeros(B))[:] += np.where(complete, info[key], 0.0)
        acc_n += complete
        token = np.asarray(info.get("token", np.zeros(B)))
        tokens += active & (token != last_token)
        last_token = np.where(active, token, last_token)
        steps += active
        active &= ~(np.asarray(term) | np.asarray(trunc))
        if max_steps is not None:
            active &= steps < max_steps
    prompt = _prompt_tokens(venv.unwrapped.problem)
    recs = []
    for i in range(B):
        rec = {key: float(v[i]) for key, v in sums.items()}
        rec["steps"], rec["tokens"] = int(steps[i]), prompt or int(tokens[i])
        for key, v in acc_sum.items():
            rec[key] = float(v[i] / acc_n[i]) if acc_n[i] else float("nan")
        recs.append(rec)
    return recs


def resolve_vec_env(env_id: str, kwargs: dict, mode: str) -> str:
    """"native" or "single" for ``mode`` ("auto": native when the id has a batched core)."""
    import gymnasium as gym

    if mode not in VEC_ENV_MODES:
        raise ValueError(f"vec_env must be one of {list(VEC_ENV_MODES)}, got {mode!r}")
    if mode == "single":
        return mode
    batched = gym.spec(env_id).vector_entry_point is not None
    if mode == "native" and not batched:
        raise ValueError(f"vec_env='native': {env_id} has no batched core (no vector entry point); use 'single' or "
                         "'auto'")
    return "native" if batched else "single"


ACCURACY_MODES = ("auto", "rule", "model", "live")


def accuracy_env_kwargs(env_id: str, kwargs: dict, accuracy: str) -> dict:
    """``kwargs`` with the decoding env's accuracy source set: "rule" and "model" set ``gating.accuracy``,
    "live" runs the live backend (``gating.backend = "live"``: the live router's gating in the observations),
    "auto" measures on the model wherever it can (a trace with its checkpoint, torch installed, the config's
    ``gating.accuracy`` left at "auto"): tables judge policies, so they are exact even where the env's own fast
    default is the validated rule; else the env's own source."""
    import importlib.util

    import gymnasium as gym

    from wide_env.config import WideConfig
    from wide_env.envs.model_backend import checkpoint_dir_of

    if accuracy not in ACCURACY_MODES:
        raise ValueError(f"accuracy must be one of {list(ACCURACY_MODES)}, got {accuracy!r}")
    spec = gym.spec(env_id)
    if "WideMoEEnv" not in str(spec.entry_point):  # accuracy is the decoding env's
        if accuracy in ("live", "model"):
            raise ValueError(f"accuracy={accuracy!r}: {env_id} reports no real accuracy (decoding envs only)")
        return kwargs
    if accuracy == "auto":
        config = WideConfig.from_dict(kwargs.get("config"), preset=kwargs.get("preset", spec.kwargs.get("preset")))
        g = config.gating
        if (g.source != "trace" or g.backend != "table" or g.accuracy != "auto" or checkpoint_dir_of(config) is None
                or importlib.util.find_spec("torch") is None):
            return kwargs
        accuracy = "model"
    gating = {"backend": "live"} if accuracy == "live" else {"accuracy": accuracy}
    return {**kwargs, "config": deep_merge(kwargs.get("config") or {}, {"gating": gating})}


def _make_eval_env(env_id: str, kwargs: dict, mode: str, episodes: int):
    import gymnasium as gym

    if mode == "native":
        return gym.make_vec(env_id, num_envs=episodes, vectorization_mode="vector_entry_point", **kwargs)
    return gym.make(env_id, **kwargs)


def evaluate_policies(env_id: str, policies: Iterable, *, episodes: int = 20, seed: int = 0,
                      env_kwargs: dict | None = None, budget_scales: Iterable[float] | None = None,
                      policy_kwargs: dict | None = None, progress: bool | None = None,
                      max_steps: int | None = None, episode_rows: list | None = None,
                      vec_env: str = "auto", accuracy: str = "auto") -> list[dict]:
    """Run every policy on the same episodes for each budget scale.

    policies: names (``"siftmoe"``, ``"ppo:runs/model.zip"``) or ``(label, policy)`` pairs where policy is
        a callable ``obs -> action`` (optionally with ``reset(seed)``) or a factory ``env -> policy``
        marked with ``factory.is_policy_factory = True``. In native mode they act on batched observations
        (every policy of the project does).
    budget_scales: multipliers of the env's budget (None: the env as configured, reported as scale 1).
    policy_kwargs: ``{name: {kwarg: value}}`` for named policies.
    progress: tqdm bar (None: only when stderr is a terminal).
    max_steps: optional cap on steps per episode, >= 1 (default: run to truncation).
    episode_rows: if a list is given, one dict per episode is appended to it.
    vec_env: "native" (the episodes of a policy as one batch on the native vector env, sub-env i seeded
        ``seed + i``),
        "single" (episode i = ``gym.make(...).reset(seed=seed + i)``) or "auto" (native where available).
    accuracy: where the real-accuracy figures come from (:func:`accuracy_env_kwargs`): "rule" (the trace's
        accuracy rule), "model" (the checkpoint decodes each token with the executed experts), "live" (the live
        backend) or "auto" (measured on the model wherever a checkpoint and torch are there, else the env's
        own source). Rows say which (``source_of_accuracy``).

    Returns one summary dict per (budget scale, policy); see :func:`summarize` for the fields.
    """
    policies = list(policies)
    if not policies:
        raise ValueError("no policies given; pass e.g. ['topk', 'siftmoe']")
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"episodes must be an integer >= 1, got {episodes!r}")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps must be an integer >= 1 (or None: run every episode to its end), got {max_steps!r}")
    scales = [None] if budget_scales is None else [float(s) for s in budget_scales]
    total = len(scales) * len(policies) * episodes
    bar = None
    if progress or (progress is None and sys.stderr.isatty()):
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="evaluate", unit="ep", leave=False)
        except ImportError:  # tqdm is optional
            bar = None
    rows, cache = [], {}
    try:
        for scale in scales:
            kwargs = accuracy_env_kwargs(env_id, _env_kwargs_for_scale(env_id, env_kwargs, scale), accuracy)
            mode = resolve_vec_env(env_id, kwargs, vec_env)
            env = _make_eval_env(env_id, kwargs, mode, episodes)
            # "topk_ideal": Top-K with deadline enforcement off, on the same seeds (the channel and gating
            # draws do not depend on enforcement, so it sees the same realisations)
            ideal = None
            if any(isinstance(p, str) and p.strip().lower() == IDEAL_TOPK for p in policies):
                ideal_kwargs = {**kwargs, "config": deep_merge(kwargs["config"], {"deadline": {"enforce": False}})}
                ideal = _make_eval_env(env_id, ideal_kwargs, mode, episodes)
            try:
                problem = env.unwrapped.problem
                scale_label = 1.0 if scale is None else scale
                for label, pol in _build_policies(policies, env, policy_kwargs, cache):
                    run_env = ideal if label.strip().lower() == IDEAL_TOPK else env
                    if mode == "native":
                        recs = _run_batch(run_env, pol, seed, max_steps)
                        for i, rec in enumerate(recs):
                            rec.update(policy=label, budget_scale=scale_label, episode=i, seed=seed + i, vec_env=mode)
                        if bar is not None:
                            bar.update(episodes)
                    else:
                        recs = []
                        for i in range(episodes):
                            rec = _run_episode(run_env, pol, seed + i, max_steps)
                            rec.update(policy=label, budget_scale=scale_label, episode=i, seed=seed + i, vec_env=mode)
                            recs.append(rec)
                            if bar is not None:
                                bar.update(1)
                    if bar is not None:
                        bar.set_postfix_str(f"{label} x{scale_label:g}")
                    if episode_rows is not None:
                        episode_rows.extend(recs)
                    row = summarize(recs, env_id=env_id, policy=label, budget_scale=scale_label, problem=problem)
                    row["vec_env"] = mode
                    rows.append(row)
            finally:
                env.close()
                if ideal is not None:
                    ideal.close()
    finally:
        if bar is not None:
            bar.close()
    return rows


def summarize(recs: list[dict], *, env_id: str, policy: str, budget_scale: float, problem) -> dict:
    """Aggregate episode records: per-token energy (mean, 95% CI), energy relative to Top-K, mean
    per-layer deviation (model units), budget-violation rate per step, deadline misses per token,
    executed experts per step, reward per step, accuracy_* means, decision time per step (us)."""
    e_tok = [r["energy_j"] / max(r["tokens"], 1) for r in recs]
    dev = [r["deviation"] / r["steps"] for r in recs]
    row = {
        "env": env_id, "policy": policy, "budget_scale": budget_scale, "episodes": len(recs),
        "energy_per_token_j": float(np.mean(e_tok)), "energy_per_token_ci95": ci95(e_tok),
        "energy_rel_topk": float(sum(r["energy_j"] for r in recs) / max(sum(r["topk_energy_j"] for r in recs), 1e-300)),
        "deviation": float(np.mean(dev)), "deviation_ci95": ci95(dev),
        # per decision: a decoding step decides one token's layer, a prefill step every prompt token's
        "violation_rate": float(sum(r["budget_violated"] for r in recs)
                                / (sum(r["steps"] for r in recs) * getattr(problem, "prompt_tokens", 1))),
        "deadline_misses_per_token": float(sum(r["deadline_misses"] for r in recs) / sum(r["tokens"] for r in recs)),
        "executed_per_step": float(sum(r["n_executed"] for r in recs) / sum(r["steps"] for r in recs)),
        "reward_per_step": float(sum(r["reward"] for r in recs) / sum(r["steps"] for r in recs)),
        "decision_time_us": float(1e6 * sum(r["decision_s"] for r in recs) / sum(r["steps"] for r in recs)),
        "steps": int(sum(r["steps"] for r in recs)),
        "n_layers": problem.n_layers, "n_experts": problem.n_experts, "top_k": problem.top_k,
        "budget_mode": problem.budget_mode, "enforce_deadline": problem.enforce_deadline,
        "source_of_accuracy": getattr(problem, "accuracy_source", "none"),
    }
    for key in sorted({k for r in recs for k in r if k.startswith("accuracy_")}):
        vals = [r[key] for r in recs if key in r]
        row[key] = float(np.mean(vals))
        row[key + "_ci95"] = ci95(vals)
    return row


def write_csv(rows: list[dict], path) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow(r)


def format_table(rows: list[dict]) -> str:
    acc_keys = sorted({k for r in rows for k in r if k.startswith("accuracy_") and not k.endswith("_ci95")})
    head = (f"{'policy':<24} {'scale':>6} {'energy/token (J)':>24} {'E/E_topk':>8} {'deviation':>10} "
            f"{'viol %':>7} {'miss/tok':>8} {'exec':>5}" + "".join(f" {k[9:]:>9}" for k in acc_keys)
            + f" {'t (us)':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        e = f"{r['energy_per_token_j']:.4g} ± {r['energy_per_token_ci95']:.2g}"
        line = (f"{r['policy'][:24]:<24} {r['budget_scale']:>6g} {e:>24} {r['energy_rel_topk']:>8.3f} "
                f"{r['deviation']:>10.4g} {100 * r['violation_rate']:>7.2f} {r['deadline_misses_per_token']:>8.3f} "
                f"{r['executed_per_step']:>5.2f}")
        line += "".join(f" {r.get(k, float('nan')):>9.4f}" for k in acc_keys)
        line += f" {r['decision_time_us']:>8.1f}"
        lines.append(line)
    return "\n".join(lines)


def plot_tradeoff(rows: list[dict], path) -> None:
    """Accuracy (if reported) and deviation vs energy per token; one curve per policy over the scales."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc_keys = sorted({k for r in rows for k in r if k.startswith("accuracy_") and not k.endswith("_ci95")})
    panels = [(k, k.replace("_", " ")) for k in acc_keys] + [("deviation", "mean deviation per layer (model units)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    energies = [r["energy_per_token_j"] for r in rows if r["energy_per_token_j"] > 0]
    log_x = bool(energies) and max(energies) / min(energies) > 100
    for ax, (key, label) in zip(axes[0], panels):
        for pol in policies:
            pts = sorted((r["budget_scale"], r["energy_per_token_j"], r.get(key, float("nan")))
                         for r in rows if r["policy"] == pol)
            xs = [p[1] for p in pts]
            ys = [p[2] for p in pts]
            ax.plot(xs, ys, marker="o", label=pol)
            if len(pts) > 1 and len({round(x, 15) for x in xs}) > 1:
                for s, x, y in (pts[0], pts[-1]):
                    ax.annotate(f"x{s:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel("energy per token (J)")
        ax.set_ylabel(label)
        if log_x:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    env = rows[0]["env"] if rows else ""
    fig.suptitle(f"{env}: trade-off while sweeping the deviation budget", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _literal(text: str, what: str):
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as exc:
        raise SystemExit(f"--{what}: cannot parse {text!r} as a Python literal ({exc}); "
                         "example: \"{'config': {'n_tokens': 8}}\"")
    if not isinstance(value, dict):
        raise SystemExit(f"--{what} must be a dict literal, got {type(value).__name__}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    prog = "wide-evaluate" if script == "wide-evaluate" else "python -m baselines.evaluate"
    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", default="wide_env/WideMoE-v0", help="registered environment id")
    ap.add_argument("--policies", default="topk,siftmoe",
                    help="comma-separated names (topk,topk_ideal,siftmoe,wdmoe,des,adapmoe,greedy,random) or algo:PATH; "
                         "topk = practical Top-K (late experts lost), topk_ideal = deadline enforcement off")
    ap.add_argument("--episodes", type=_positive_int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="output directory (created)")
    ap.add_argument("--env-kwargs", default=None, help="Python dict literal passed to gym.make")
    ap.add_argument("--policy-kwargs", default=None, help="Python dict literal {policy: {kwarg: value}}")
    ap.add_argument("--budget-scales", default="0.25,0.5,1,2,4",
                    help="comma-separated multipliers of the budget swept for the trade-off curves "
                         "(default 0.25,0.5,1,2,4; '1' for the env as configured only)")
    ap.add_argument("--max-steps", type=_positive_int, default=None,
                    help="cap on steps per episode, >= 1 (default: every episode to its end)")
    ap.add_argument("--vec-env", default="auto", choices=VEC_ENV_MODES,
                    help="native: each policy's episodes as one batch on the native vector env; single: one env; "
                         "either way episode i is seeded seed + i; auto: native where the id has it")
    ap.add_argument("--accuracy", default="auto", choices=ACCURACY_MODES,
                    help="where real accuracy comes from: rule (the trace's accuracy rule), model (the checkpoint "
                         "decodes each token with the executed experts), live (the live backend: live gating in the "
                         "observations) or auto (the model wherever a checkpoint and torch are there, else the env's "
                         "own source); the table says which")
    ap.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    ap.add_argument("--ray", action="store_true",
                    help="spread policies x budget scales x envs x episode chunks over a Ray cluster (pip install "
                         "'.[ray]'); --env may then list several ids (outputs in OUT/ENV_ID per env)")
    ap.add_argument("--address", default=None, help="with --ray: the cluster ('auto' joins 'ray start'; default local)")
    ap.add_argument("--chunk-episodes", type=_positive_int, default=5, help="with --ray: episodes per Ray task")
    return ap


def main(argv=None) -> list[dict]:
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    ap = build_parser()
    args = ap.parse_args(argv)

    env_kwargs = _literal(args.env_kwargs, "env-kwargs") if args.env_kwargs else None
    policy_kwargs = _literal(args.policy_kwargs, "policy-kwargs") if args.policy_kwargs else None
    scales = None
    if args.budget_scales:
        try:
            scales = [float(s) for s in args.budget_scales.split(",") if s.strip()]
        except ValueError:
            raise SystemExit(f"--budget-scales: expected comma-separated numbers, got {args.budget_scales!r}")
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if args.ray:  # the same outputs, computed on a Ray cluster (baselines/sweep.py)
        from baselines.sweep import main_ray

        return main_ray(args, policies=policies, env_kwargs=env_kwargs, policy_kwargs=policy_kwargs, scales=scales)
    episodes: list[dict] = []
    try:
        rows = evaluate_policies(args.env, policies, episodes=args.episodes, seed=args.seed, env_kwargs=env_kwargs,
                                 budget_scales=scales, policy_kwargs=policy_kwargs,
                                 progress=False if args.no_progress else None, max_steps=args.max_steps,
                                 episode_rows=episodes, vec_env=args.vec_env, accuracy=args.accuracy)
    except (ValueError, TypeError, KeyError, FileNotFoundError) as exc:  # bad input: the message says what to fix
        ap.exit(2, f"{ap.prog}: error: {exc}\n")
    write_outputs(args.env, rows, episodes, Path(args.out), n_episodes=args.episodes, seed=args.seed)
    return rows


def accuracy_lines(rows: list[dict]) -> list[str]:
    """One line per accuracy source of the rows: where the table's accuracy columns come from."""
    from wide_env.envs.model_backend import ACCURACY_SOURCES

    return [f"accuracy: {ACCURACY_SOURCES.get(source, source)}"
            for source in sorted({r.get("source_of_accuracy", "none") for r in rows}) if source != "none"]


def write_outputs(env_id: str, rows: list[dict], episodes: list[dict], out: Path, *, n_episodes: int,
                  seed: int) -> None:
    """Print the table and write ``results.csv``, ``episodes.csv`` and ``tradeoff.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    print(f"{env_id}: {n_episodes} episodes per policy, seeds {seed}..{seed + n_episodes - 1}")
    print(format_table(rows))
    print("\n".join(accuracy_lines(rows)))
    write_csv(rows, out / "results.csv")
    write_csv(episodes, out / "episodes.csv")
    plot_tradeoff(rows, out / "tradeoff.png")
    print(f"wrote {out / 'results.csv'}, {out / 'episodes.csv'}, {out / 'tradeoff.png'}")


def cli() -> int:
    """Console script ``wide-evaluate`` (exit status 0; errors exit 2 with the message)."""
    main()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
