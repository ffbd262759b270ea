"""Evaluation sweeps on a Ray cluster: ``python -m baselines.evaluate --ray``.

    python -m baselines.evaluate --ray --address auto --env wide_env/WideMoE-v0,wide_env/WideMoE-Stragglers-v0 \
        --policies topk,siftmoe,wdmoe,ppo:/shared/runs/ppo/x/final_model.zip --episodes 100 --out /shared/eval

Policies x budget scales x envs x chunks of episode seeds become one Ray task each (``--chunk-episodes``
episodes, 1 CPU). A task runs :func:`baselines.rollout.evaluate_policies` - the project's one evaluation
code path - on its seeds ``seed + i`` and returns the episode records; the driver aggregates them with
:func:`baselines.results.summarize`, so ``results.csv``, ``episodes.csv`` and ``tradeoff.png`` are those
of a local run (every column but the measured decision time is identical: episode ``i`` depends only on
its seed). With several envs, each gets its folder ``OUT/ENV_ID`` (the env id with '/' as '-').
Saved agents (``ppo:PATH``) must be at a path every node sees.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable

from baselines.eval_env import accuracy_env_kwargs, env_kwargs_for_scale
from baselines.results import summarize, write_outputs
from baselines.rollout import evaluate_policies


#: how long :func:`connect_ray` waits for a cluster address to answer before it gives up (seconds)
RAY_CONNECT_TIMEOUT_S = 30.0
#: HTTP/2's client preface and an empty SETTINGS frame: a gRPC server (Ray's GCS, its client server) answers
#: with a SETTINGS frame of its own
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


class RayConnectError(ConnectionError):
    """No Ray cluster answers at the address given (``--address``)."""


def connect_ray(address: str | None = None, timeout_s: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """Join the cluster at ``address`` ('auto': the one ``ray start`` runs here; None: a local Ray, or the
    cluster in RAY_ADDRESS). No dashboard: nothing listens beyond what the cluster itself needs.

    A cluster address is first probed from Python (a TCP connection and a gRPC handshake, at most ``timeout_s``
    seconds in all): Ray's own connect retries for over ten minutes inside native code, deaf to SIGTERM. An
    address where no Ray cluster answers raises :class:`RayConnectError` naming it."""
    try:
        import ray
    except ImportError:
        raise SystemExit("--ray needs Ray: pip install -e '.[ray]' (ray[tune] and optuna)") from None
    if ray.is_initialized():
        return
    target = _cluster_address(address)
    if target is not None:
        given = f"--address {address!r}" if address not in (None, "auto") else f"the cluster address {target!r}"
        if address in (None, "auto") and os.environ.get("RAY_ADDRESS"):
            given = f"RAY_ADDRESS {os.environ['RAY_ADDRESS']!r}"
        _probe_cluster(given, target, timeout_s)
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True)


def _cluster_address(address: str | None) -> str | None:
    """The host:port Ray would connect to for ``address`` (None: Ray starts a local instance)."""
    if address and "://" in address:  # ray://HOST[:PORT]: the Ray client server, port 10001 by default
        target = address.split("://", 1)[1].rstrip("/")
        return target if ":" in target.rsplit("]", 1)[-1] else f"{target}:10001"
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:  # a Ray without this helper: probe what was typed
        return address if address not in (None, "auto", "local") else None
    try:
        return canonicalize_bootstrap_address(address)
    except ValueError as exc:
        raise RayConnectError(f"--address {address!r}: not a Ray cluster address ({exc}); give HOST:PORT (the address "
                              "'ray start --head' prints), 'auto' for the cluster started on this machine, or no "
                              "--address for a local Ray") from None


def _probe_cluster(given: str, target: str, timeout_s: float) -> None:
    """Connect to ``target`` (host:port) and check that a gRPC server answers, within ``timeout_s`` seconds."""
    import socket
    import time

    host, _, port_text = target.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        raise RayConnectError(f"{given}: no port in {target!r}; give HOST:PORT (the address "
                              "'ray start --head' prints)") from None
    fix = ("start the cluster ('ray start --head' prints its address) and pass that address, use --address auto for "
           "the cluster started on this machine, or drop --address for a local Ray")
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(5.0, left))) as conn:
                conn.settimeout(max(0.1, min(10.0, deadline - time.monotonic())))
                conn.sendall(_H2_PREFACE)
                header = conn.recv(9)
            break
        except (ConnectionRefusedError, socket.gaierror) as exc:  # nothing listens, or no such host: final
            raise RayConnectError(f"{given}: no Ray cluster answers at {target} ({exc}); {fix}") from None
        except OSError as exc:  # a timeout or an unreachable network: retried until the deadline
            if deadline - time.monotonic() <= 1.0:
                raise RayConnectError(f"{given}: no Ray cluster answered at {target} within "
                                      f"{timeout_s:g} s ({type(exc).__name__}: {exc}); {fix}") from None
            time.sleep(1.0)
    if len(header) < 9 or header[3] != 4:  # frame type 4: SETTINGS
        raise RayConnectError(f"{given}: something listens at {target} but it is not a Ray cluster (no "
                              f"gRPC answer); {fix}")


def _evaluate_chunk(env_id: str, policy: str, scale: float | None, seed: int, first: int, n: int,
                    env_kwargs: dict | None, policy_kwargs: dict | None, max_steps: int | None):
    """Episodes ``first .. first + n - 1`` (seeds ``seed + i``) of one policy at one budget scale: (episode
    records, the env's problem description for :func:`summarize`)."""
    import gymnasium as gym

    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    recs: list[dict] = []
    evaluate_policies(env_id, [policy], episodes=n, seed=seed + first, env_kwargs=env_kwargs,
                      budget_scales=None if scale is None else [scale], policy_kwargs=policy_kwargs,
                      progress=False, max_steps=max_steps, episode_rows=recs)
    for rec in recs:
        rec["episode"] += first
    env = gym.make(env_id, **accuracy_env_kwargs(env_id, env_kwargs_for_scale(env_id, env_kwargs, scale), "auto"))
    try:
        problem = env.unwrapped.problem
    finally:
        env.close()
    return recs, problem


def evaluate_on_ray(env_ids: Iterable[str], policies: Iterable[str], *, episodes: int = 20, seed: int = 0,
                    env_kwargs: dict | None = None, budget_scales: Iterable[float] | None = None,
                    policy_kwargs: dict | None = None, max_steps: int | None = None, chunk_episodes: int = 5,
                    address: str | None = None) -> dict[str, tuple[list[dict], list[dict]]]:
    """:func:`baselines.rollout.evaluate_policies` for several envs at once, spread over Ray tasks.

    Returns ``{env_id: (summary rows, episode rows)}`` in the order a local run produces them."""
    env_ids, policies = list(env_ids), list(policies)
    if not policies or not env_ids:
        raise ValueError("give at least one env id and one policy")
    if not all(isinstance(p, str) for p in policies):
        raise TypeError("a Ray sweep takes policy names ('siftmoe', 'ppo:PATH'): objects do not travel to workers")
    if episodes < 1 or chunk_episodes < 1:
        raise ValueError(f"episodes and chunk_episodes must be >= 1, got {episodes} and {chunk_episodes}")
    scales = [None] if budget_scales is None else [float(s) for s in budget_scales]
    for s in scales:
        if s is not None and not (s > 0 and math.isfinite(s)):
            raise ValueError(f"budget scale must be a positive number, got {s!r}")
    connect_ray(address)
    import ray

    task = ray.remote(num_cpus=1)(_evaluate_chunk)
    jobs: list[tuple[tuple, Any]] = []
    for env_id in env_ids:
        for scale in scales:
            for policy in policies:
                for first in range(0, episodes, chunk_episodes):
                    n = min(chunk_episodes, episodes - first)
                    ref = task.remote(env_id, policy, scale, seed, first, n, env_kwargs, policy_kwargs, max_steps)
                    jobs.append(((env_id, scale, policy), ref))
    done = ray.get([ref for _, ref in jobs])
    grouped: dict[tuple, tuple[list[dict], Any]] = {}
    for (key, _), (recs, problem) in zip(jobs, done):
        grouped.setdefault(key, ([], problem))[0].extend(recs)
    out: dict[str, tuple[list[dict], list[dict]]] = {}
    for (env_id, scale, policy), (recs, problem) in grouped.items():  # insertion order = a local run's order
        rows, episode_rows = out.setdefault(env_id, ([], []))
        recs.sort(key=lambda r: r["episode"])
        episode_rows.extend(recs)
        row = summarize(recs, env_id=env_id, policy=policy, budget_scale=1.0 if scale is None else scale,
                        problem=problem)
        row["vec_env"] = recs[0]["vec_env"]  # how the chunks ran (their episodes are seed + i either way)
        rows.append(row)
    return out


def main_ray(args, *, policies: list[str], env_kwargs: dict | None, policy_kwargs: dict | None,
             scales: list[float] | None) -> list[dict]:
    """The ``--ray`` branch of ``python -m baselines.evaluate`` (its parsed arguments)."""
    env_ids = [e.strip() for e in args.env.split(",") if e.strip()]
    results = evaluate_on_ray(env_ids, policies, episodes=args.episodes, seed=args.seed, env_kwargs=env_kwargs,
                              budget_scales=scales, policy_kwargs=policy_kwargs, max_steps=args.max_steps,
                              chunk_episodes=args.chunk_episodes, address=args.address)
    all_rows: list[dict] = []
    for env_id, (rows, episode_rows) in results.items():
        out = Path(args.out) if len(env_ids) == 1 else Path(args.out) / env_id.replace("/", "-").replace(":", "-")
        write_outputs(env_id, rows, episode_rows, out, n_episodes=args.episodes, seed=args.seed)
        all_rows.extend(rows)
    return all_rows
