"""Running policies on identical episodes (:func:`evaluate_policies`, the project's one evaluation code path): one
batch on the native vector env or one episode at a time, for every budget scale (see :mod:`baselines.evaluate`)."""
from __future__ import annotations

import sys
import time
from typing import Iterable

import numpy as np

from baselines.eval_env import (IDEAL_TOPK, accuracy_env_kwargs, env_kwargs_for_scale, make_eval_env,
                                resolve_vec_env)
from baselines.policies import make_policy
from baselines.policy_base import Policy
from baselines.results import summarize
from wide_env.config import deep_merge

__all__ = ["evaluate_policies"]


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
            kwargs = accuracy_env_kwargs(env_id, env_kwargs_for_scale(env_id, env_kwargs, scale), accuracy)
            mode = resolve_vec_env(env_id, kwargs, vec_env)
            env = make_eval_env(env_id, kwargs, mode, episodes)
            # "topk_ideal": Top-K with deadline enforcement off, on the same seeds (the channel and gating
            # draws do not depend on enforcement, so it sees the same realisations)
            ideal = None
            if any(isinstance(p, str) and p.strip().lower() == IDEAL_TOPK for p in policies):
                ideal_kwargs = {**kwargs, "config": deep_merge(kwargs["config"], {"deadline": {"enforce": False}})}
                ideal = make_eval_env(env_id, ideal_kwargs, mode, episodes)
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
