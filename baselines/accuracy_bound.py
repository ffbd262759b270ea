"""The accuracy hindsight bound: per token, the least energy of a selection of executed experts (every layer)
that keeps the model's prediction, computed on the model the env measures accuracy with.

Problem, per token t of an episode (the env's model accuracy: :mod:`wide_env.envs.model_backend`)::

    minimise    sum_l sum_{j in A_l} energy_{t,l,j}                      (J, the env's objective scope)
    over        A_l subset of the experts usable at (t, l)              (on time, as realised, where deadlines
                                                                        are enforced: a late expert costs and
                                                                        serves nothing, so it is never chosen)
    subject to  keep(t): the checkpoint, decoding token t with A_0..A_{L-1} under the combine rule
                (wide_env.rules.serve_slots through StreamDecoder.execute, live routing), predicts what the full
                Top-K model predicts (``accuracy_same``), or, with ``tolerance`` = tau nats, its loss
                -log p(target) is at most the full model's + tau (``delta_loss <= tau``).

Search (exact).  A layer's output depends on the executed set only through the slots' servers phi (the combine
rule), so each layer offers one option per distinct phi, at the least energy of the sets of at most K usable
experts that produce it (an expert that serves no slot only adds energy). A uniform-cost search over layer
prefixes (energies are additive and >= 0) pops the cheapest open prefix, runs the checkpoint to its next layer
(batched: many prefixes as streams of one StreamDecoder), and expands one child per option; complete selections
are decoded and tested. Open prefixes at least as costly as the best kept selection (the incumbent: Top-K's
usable experts, improved by a greedy descent, below) are pruned. When the open set empties, the incumbent is the
exact least energy (``exact``). With ``max_nodes`` prefixes expanded first, the search stops and reports both
sides: ``upper_j`` (the incumbent: a selection that keeps the prediction, so at least the least energy) and
``lower_j`` (the least energy of an open prefix: every selection cheaper than the incumbent extends one, so at
most the least energy). Nothing else is relaxed: ``lower_j <= least energy <= upper_j`` always.

Greedy descent (the first incumbent).  From the cheaper kept one of the usable live Top-K and the env's Top-K
sets (the trace's gating), layer by layer in decreasing energy, replace the layer's set by the cheapest set of
at most K usable experts that still keeps the prediction (every candidate decoded, batched); two passes.

Context (a token's KV perturbation reaches later tokens).  Tokens are solved in episode order and each token is
decoded in the context its predecessors' chosen selections produced (the env's stream: the full model's context
before the episode, then the episode as decoded). So the plan is realisable: replayed through the env (one
action per step: the chosen set) it gives the env's energy per token and the env's measured accuracy, which are
the figures :func:`accuracy_bound` reports. Per token the figure is exact given that context; over the episode,
choosing each token's cheapest selection greedily can make later tokens dearer or unkeepable, so the episode's
energy is an UPPER bound on the least energy of a plan that keeps every prediction the plan keeps (it is such a
plan), not a lower one. ``lower_j`` is a lower bound for each token in the plan's context only. A token whose
prediction no selection found keeps (possible where the context or deadlines moved it) gets the empty selection
(0 J: it is lost either way) and is counted in ``lost``.

The deviation budget is not a constraint here: accuracy is what it stands in for; the replay reports the env's
violations of the plan (``violations``).
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass

import numpy as np
import torch

from wide_env.envs.model_backend import ModelAccuracy
from wide_env.models.torch_threads import one_torch_thread

from baselines.equal_accuracy import episode_matrix
from baselines.headroom import baseline_energy_at, counts_for_agents_win, headroom

__all__ = ["TokenBound", "EpisodeBound", "selection_options", "TokenSearch", "episode_bound", "accuracy_bound",
           "replay_plan", "regime_headroom"]


def selection_options(n_experts: int, top_k: int) -> np.ndarray:
    """(M, E) bool: every set of at most ``top_k`` experts, by size then lexicographically (the empty set first)."""
    rows = [np.zeros(n_experts, bool)]
    for size in range(1, top_k + 1):
        for combo in itertools.combinations(range(n_experts), size):
            row = np.zeros(n_experts, bool)
            row[list(combo)] = True
            rows.append(row)
    return np.array(rows)


@dataclass(frozen=True)
class TokenBound:
    """One token's solution: the chosen selection and both sides of its least energy (J)."""

    masks: np.ndarray  # (L, E) bool executed sets (usable experts only)
    upper_j: float  # energy of ``masks`` (inf where nothing found keeps the prediction)
    lower_j: float  # <= the least energy of a selection that keeps it (= upper_j when exact)
    exact: bool  # the search finished: upper_j is the least energy
    kept: bool  # ``masks`` keeps the prediction
    nodes: int  # prefixes expanded


class TokenSearch:
    """The search of one token at a time on ``n_streams`` streams of a StreamDecoder that all hold the same
    context (the episode as decoded so far); each candidate runs on a stream and is rolled back afterwards."""

    def __init__(self, model, mismatch: np.ndarray, n_streams: int = 512):
        from wide_env.models.decoder import StreamDecoder, serve_batch

        self._serve = serve_batch
        self.decoder = StreamDecoder(model, mismatch, n_streams)
        self.D = self.decoder.D
        self.L, self.E, self.K = self.decoder.L, self.decoder.E, self.decoder.K
        self.P = int(n_streams)
        self.options = selection_options(self.E, self.K)

    # ---- the shared context -------------------------------------------------------------------------------
    def set_context(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Every stream holds the context keys/values (L, H, n, hd) (the full model's, before the episode)."""
        for row in range(self.P):
            self.decoder.set_prefix(row, keys, values)

    def advance(self, token_id: int, masks: np.ndarray) -> None:
        """Append the token, decoded with ``masks`` (L, E), to every stream's context."""
        self._decode(np.repeat(np.asarray(masks, bool)[None], self.P, axis=0), token_id, keep_token=True)

    # ---- decoding candidates ------------------------------------------------------------------------------
    def _decode(self, masks: np.ndarray, token_id: int, depth: int | None = None, keep_token: bool = False):
        """Run candidates ``masks`` (R, >= depth, E) on streams 0..R-1: through ``depth`` layers, returning that
        layer's gates (topk (R, K), weights (R, K)); or (depth None) through every layer, returning the next-token
        logits (R, V) float64. The streams are rolled back to the context unless ``keep_token``."""
        R = masks.shape[0]
        rows = np.arange(R)
        length = int(self.decoder.length[0])
        gates = self.decoder.begin(rows, np.full(R, token_id))
        for l in range(self.L if depth is None else depth):
            gates = self.decoder.execute(rows, masks[:, l])
        out = (gates.topk_idx, gates.topk_weight) if depth is not None else self.decoder.finish(rows).double()
        if not keep_token:
            for row in rows.tolist():
                self.decoder.truncate(row, length)
        return out

    def _kept(self, masks: np.ndarray, token_id: int, keep, after=None) -> np.ndarray:
        """(R,) bool: candidates (R, L, E) that keep the prediction, decoded in chunks of the streams. With
        ``after`` = (next token id, its usable (L, E), its keep test): and in the context each candidate leaves,
        the next token's usable live Top-K keeps the next prediction (the lookahead, module docstring)."""
        out = np.zeros(masks.shape[0], bool)
        dec = self.decoder
        length = int(dec.length[0])
        for lo in range(0, masks.shape[0], self.P):
            chunk = masks[lo:lo + self.P]
            rows = np.arange(chunk.shape[0])
            ok = keep(self._decode(chunk, token_id, keep_token=after is not None))
            if after is not None:
                next_id, next_usable, next_keep = after
                if ok.any():
                    gates = dec.begin(rows, np.full(rows.size, next_id))
                    while gates is not None:
                        ex = np.zeros((rows.size, self.E), bool)
                        np.put_along_axis(ex, gates.topk_idx, True, axis=1)
                        gates = dec.execute(rows, ex & next_usable[gates.layer][None])
                    ok &= next_keep(dec.finish(rows).double())
                for row in rows.tolist():
                    dec.truncate(row, length)
            out[lo:lo + self.P] = ok
        return out

    def _children(self, topk: np.ndarray, weight: np.ndarray, layer: int, usable: np.ndarray, energy: np.ndarray):
        """One layer's options for one prefix: (masks (C, E), energies (C,)), one per distinct server tuple phi,
        each the least-energy set of at most K usable experts that produces it (ties: the first in option order)."""
        opts = self.options[~(self.options & ~usable[None]).any(1)]
        M = opts.shape[0]
        phi = self._serve(self.D[layer], np.broadcast_to(topk, (M, self.K)), opts, np.broadcast_to(weight, (M, self.K)))
        cost = opts.astype(np.float64) @ energy
        order = np.argsort(cost, kind="stable")
        _, first = np.unique(phi[order], axis=0, return_index=True)
        pick = order[np.sort(first)]
        return opts[pick], cost[pick]

    # ---- one token ----------------------------------------------------------------------------------------
    def solve(self, token_id: int, energy: np.ndarray, usable: np.ndarray, keep, max_nodes: int = 4000,
              batch: int = 64, after=None, start=None) -> TokenBound:
        """The least-energy selection for ``token_id`` in the streams' context: ``energy`` (L, E) J, ``usable``
        (L, E) bool, ``keep`` maps next-token logits (R, V) float64 to (R,) bool; ``after``: the lookahead
        (:meth:`_kept`); ``start``: the env's Top-K sets (L, E), a first incumbent. See the module docstring."""
        L, E = self.L, self.E
        energy = np.asarray(energy, np.float64)
        usable = np.asarray(usable, bool)
        best_masks, best_e = self._descent(token_id, energy, usable, keep, after, start)
        counter = itertools.count()
        heap = [(0.0, next(counter), np.zeros((0, E), bool))]
        nodes = 0
        while heap and heap[0][0] < best_e and nodes < max_nodes:
            popped = []
            while heap and heap[0][0] < best_e and len(popped) < batch:
                popped.append(heapq.heappop(heap))
            nodes += len(popped)
            for depth in sorted({p[2].shape[0] for p in popped}):
                group = [p for p in popped if p[2].shape[0] == depth]
                prefixes = np.zeros((len(group), L, E), bool)
                for i, p in enumerate(group):
                    prefixes[i, :depth] = p[2]
                topk, weight = self._decode(prefixes, token_id, depth)
                complete, complete_e = [], []
                for i, (e0, _, prefix) in enumerate(group):
                    masks, cost = self._children(topk[i], weight[i], depth, usable[depth], energy[depth])
                    for m, c in zip(masks, (e0 + cost).tolist()):
                        if c >= best_e:
                            continue
                        child = np.vstack([prefix, m[None]])
                        if depth + 1 < L:
                            heapq.heappush(heap, (c, next(counter), child))
                        else:
                            complete.append(child)
                            complete_e.append(c)
                if complete:
                    ok = self._kept(np.array(complete), token_id, keep, after)
                    if ok.any():
                        i = int(np.flatnonzero(ok)[np.argmin(np.asarray(complete_e)[ok])])
                        if complete_e[i] < best_e:
                            best_masks, best_e = complete[i], complete_e[i]
        open_least = heap[0][0] if heap else np.inf
        exact = open_least >= best_e
        kept = bool(np.isfinite(best_e))
        if not kept:
            best_masks = np.zeros((L, E), bool)
        return TokenBound(best_masks, float(best_e), float(min(open_least, best_e)), bool(exact), kept, nodes)

    def _descent(self, token_id: int, energy: np.ndarray, usable: np.ndarray, keep, after, start=None,
                 passes: int = 2):
        """The greedy descent (module docstring) from the cheaper kept one of the usable live Top-K and ``start``
        (L, E) (the env's Top-K sets, restricted to the usable experts): (masks (L, E), energy), or (None, inf)
        where neither keeps the prediction."""
        L, E = self.L, self.E
        masks = np.zeros((L, E), bool)
        for l in range(L):  # the live Top-K of every layer, restricted to the usable experts
            topk, _ = self._decode(masks[None], token_id, l)
            masks[l, topk[0]] = True
            masks[l] &= usable[l]
        starts = np.array([masks] + ([np.asarray(start, bool) & usable] if start is not None else []))
        ok = self._kept(starts, token_id, keep, after)
        if not ok.any():
            return None, np.inf
        masks = starts[np.flatnonzero(ok)[np.argmin((starts * energy).sum((1, 2))[ok])]]
        for _ in range(passes):
            improved = False
            layer_e = (masks * energy).sum(1)
            for l in np.argsort(-layer_e, kind="stable").tolist():
                opts = self.options[~(self.options & ~usable[l][None]).any(1)]
                cost = opts.astype(np.float64) @ energy[l]
                cheaper = cost < layer_e[l]
                if not cheaper.any():
                    continue
                cand = np.repeat(masks[None], int(cheaper.sum()), axis=0)
                cand[:, l] = opts[cheaper]
                ok = self._kept(cand, token_id, keep, after)
                if ok.any():
                    i = int(np.flatnonzero(ok)[np.argmin(cost[cheaper][ok])])
                    masks = cand[i]
                    layer_e[l] = cost[cheaper][i]
                    improved = True
            if not improved:
                break
        return masks, float((masks * energy).sum())


def keep_rule(full_pred: int, target: int, full_nll: float, tolerance: float | None):
    """The test a token's next-byte logits (R, V) must pass: the full model's prediction (tolerance None), or a
    loss -log p(target) at most ``full_nll + tolerance`` nats."""
    if tolerance is None:
        return lambda logits: (logits.argmax(-1) == full_pred).numpy()
    return lambda logits: (-torch.log_softmax(logits, -1)[:, target]).numpy() <= full_nll + float(tolerance)


@dataclass(frozen=True)
class EpisodeBound:
    """One episode's plan and the env's figures for it (replayed)."""

    seed: int
    masks: np.ndarray  # (T, L, E) the plan
    tokens: tuple  # TokenBound per token
    energy_per_token_j: float  # the env's energy per token of the replayed plan (J)
    lower_per_token_j: float  # mean of the tokens' lower_j (J; see the module docstring for its meaning)
    accuracy_correct: float  # the env's measured accuracy of the replayed plan
    accuracy_same: float
    topk_energy_per_token_j: float  # the env's Top-K energy on the same steps (info topk_energy_j)
    violations: int  # the env's budget violations of the plan
    exact_share: float  # share of tokens solved exactly
    lost: int  # tokens no selection found keeps
    cpu_s: float  # process CPU time of the search (replay excluded)


def _model_part(env):
    core = getattr(env.unwrapped, "episode_batch", None)
    model = getattr(core, "model", None)
    if not isinstance(model, ModelAccuracy):
        raise ValueError("the accuracy bound needs an env that measures accuracy on the model: config "
                         "gating.accuracy = 'model' (or 'auto' with a shipped checkpoint) and gating.backend = 'table'")
    return core, model


def episode_bound(env, seed: int, tolerance: float | None = None, max_nodes: int = 4000,
                  n_streams: int = 512, lookahead: bool = True) -> EpisodeBound:
    """The plan of the episode ``env.reset(seed=seed)`` of a single decoding env with model accuracy, replayed
    through ``env`` (module docstring)."""
    # many small batched passes: one thread (measured on a loaded 2-core machine: 1.6 ms instead of 37 ms CPU per
    # 36-stream layer of the Mixtral-profile model); the caller's count restored
    with one_torch_thread():
        return _episode_bound(env, seed, tolerance, max_nodes, n_streams, lookahead)


def _episode_bound(env, seed, tolerance, max_nodes, n_streams, lookahead) -> EpisodeBound:
    env.reset(seed=seed)
    core, part = _model_part(env)
    sim, state = core.sim, core.state
    tables = sim.episode_tables(state, 0)
    T, L, E = tables.energy.shape
    if tables.first_token != 0 or T != sim.n_tokens:
        raise RuntimeError(f"the env planned tokens {tables.first_token}..{tables.first_token + T - 1} of "
                           f"{sim.n_tokens}; the bound needs the whole episode (a single env plans it)")
    usable = tables.meets_deadline if tables.enforce_deadline else np.ones((T, L, E), bool)
    start = int(state.start[0])
    t0 = time.process_time()
    search = TokenSearch(part.model, sim.source.mismatch, n_streams)
    search.set_context(*part.context.prefix(start))
    keeps = []
    for t in range(T):
        pos = start + t
        full_pred, full_nll = part.context.reference(np.array([pos]))
        keeps.append(keep_rule(int(full_pred[0]), int(part.target_id[pos]), float(full_nll[0]), tolerance))
    tokens = []
    for t in range(T):
        token = int(part.token_id[start + t])
        after = (int(part.token_id[start + t + 1]), usable[t + 1], keeps[t + 1]) if lookahead and t + 1 < T else None
        env_topk = np.zeros((L, E), bool)  # the sets practical Top-K executes (the trace's gating)
        np.put_along_axis(env_topk, tables.topk_idx[t], True, axis=1)
        sol = search.solve(token, tables.energy[t], usable[t], keeps[t], max_nodes, after=after, start=env_topk)
        if not sol.kept and after is not None:  # no selection leaves the next token keepable: keep this one alone
            sol = search.solve(token, tables.energy[t], usable[t], keeps[t], max_nodes, start=env_topk)
        search.advance(token, sol.masks)
        tokens.append(sol)
    cpu = time.process_time() - t0
    masks = np.array([s.masks for s in tokens])
    figures = replay_plan(env, seed, masks)
    lower = np.array([s.lower_j if s.kept else 0.0 for s in tokens])
    return EpisodeBound(seed, masks, tuple(tokens), figures["energy_per_token_j"], float(lower.mean()),
                        figures["accuracy_correct"], figures["accuracy_same"], figures["topk_energy_per_token_j"],
                        figures["violations"], float(np.mean([s.exact for s in tokens])),
                        int(sum(not s.kept for s in tokens)), cpu)


def replay_plan(env, seed: int, masks: np.ndarray) -> dict:
    """Step ``env`` (reset with ``seed``) through a plan's executed sets (T, L, E), one per step; the env's
    energy per token (J), Top-K energy per token, measured accuracy and violation count."""
    env.reset(seed=seed)
    T, L, _ = masks.shape
    energy = topk = 0.0
    correct, same = [], []
    violations = 0
    for t in range(T):
        for l in range(L):
            _, _, term, trunc, info = env.step(masks[t, l].astype(np.int8))
            energy += float(info["energy_j"])
            topk += float(info["topk_energy_j"])
            violations += int(info["budget_violated"])
            if info.get("token_complete", l == L - 1):
                correct.append(float(info["accuracy_correct"]))
                same.append(float(info["accuracy_same"]))
    if not (term or trunc):
        raise RuntimeError("the plan ended before the episode did")
    return {"energy_per_token_j": energy / T, "topk_energy_per_token_j": topk / T,
            "accuracy_correct": float(np.mean(correct)), "accuracy_same": float(np.mean(same)),
            "violations": violations}


def accuracy_bound(env_id: str, config: dict | None = None, seeds=range(5), tolerance: float | None = None,
                   max_nodes: int = 4000, lookahead: bool = True) -> list[EpisodeBound]:
    """The accuracy hindsight bound on the episodes ``gym.make(env_id, config=config).reset(seed=s)``, s in
    ``seeds``: one :class:`EpisodeBound` per seed; ``energy_per_token_j`` (J per token) and the accuracies are
    the env's own figures for the replayed plan. ``tolerance``: None keeps each token's full-model prediction,
    else its loss within ``tolerance`` nats of the full model's. ``max_nodes``: prefixes a token's exact search
    may expand (0: the greedy descent alone)."""
    import gymnasium as gym

    import wide_env  # noqa: F401  (registers the envs)

    if tolerance is not None and not (np.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be None or a finite number of nats >= 0, got {tolerance!r}")
    if isinstance(max_nodes, bool) or not isinstance(max_nodes, int) or max_nodes < 0:
        raise ValueError(f"max_nodes must be an integer >= 0, got {max_nodes!r}")
    env = gym.make(env_id, config=config or {})
    try:
        return [episode_bound(env.unwrapped, int(s), tolerance, max_nodes, lookahead=lookahead) for s in seeds]
    finally:
        env.close()


def regime_headroom(env_id: str, config: dict | None = None, seed: int = 0, episodes: int = 3,
                    baselines=("siftmoe",), budget_scales=(0.25, 0.5, 1.0, 2.0, 4.0), tolerance: float | None = None,
                    max_nodes: int = 4000) -> dict:
    """The bound, practical Top-K and each baseline's front on the episodes ``seed .. seed + episodes - 1``
    (``gym.make(env_id, config=config).reset(seed=s)``), and the headroom (module docstring). Returns a dict of
    J-per-token energies, accuracies, per-baseline energy at the bound's accuracy, ``headroom``,
    ``counts_for_agents_win`` and the bound's CPU seconds per episode."""
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


def main(argv=None) -> None:
    """``python -m baselines.accuracy_bound``: the bound, Top-K and the baselines' fronts on a few episodes, and
    the headroom (:func:`regime_headroom`), printed as JSON."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m baselines.accuracy_bound", description=main.__doc__)
    p.add_argument("--env", default="wide_env/WideMoE-AccuracyObjective-v0", help="registered env id")
    p.add_argument("--config", default=None, help="JSON config merged over the preset")
    p.add_argument("--seed", type=int, default=0, help="first episode seed (default 0)")
    p.add_argument("--episodes", type=int, default=3, help="episodes (default 3)")
    p.add_argument("--baselines", default="siftmoe", help="comma-separated causal baselines (default siftmoe)")
    p.add_argument("--scales", default="0.25,0.5,1,2,4", help="their budget scales (default 0.25,0.5,1,2,4)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="keep each token's loss within this many nats of the full model's (default: keep its prediction)")
    p.add_argument("--max-nodes", type=int, default=4000, help="prefixes a token's exact search may expand (default 4000)")
    args = p.parse_args(argv)
    out = regime_headroom(args.env, json.loads(args.config) if args.config else None, args.seed, args.episodes,
                          baselines=tuple(b for b in args.baselines.split(",") if b),
                          budget_scales=tuple(float(s) for s in args.scales.split(",")), tolerance=args.tolerance,
                          max_nodes=args.max_nodes)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
