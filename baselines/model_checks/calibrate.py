"""Calibrate deviation budgets to accuracy: the per-layer budget at which SiftMoE costs 0.5, 1 and 2 points.

    python -m baselines.model_checks.calibrate --profile mixtral-8x7b [--trace PATH] [--ckpt DIR] [--episodes 600]
        [--costs 0.5,1,2] [--default-cost 1] [--write]
    python -m baselines.model_checks.calibrate --profile P --refit [--default-cost 1]   # re-fit the stored grid

Method. The budget is ``eps_l = s * u_l`` with ``u_l`` the trace's median-skip budget (the export's
``layer_budget`` rule). For a grid of scales s, SiftMoE runs on the profile's env (same episodes, seeds
``seed..seed+episodes-1``, so the same tokens and channels at every scale), and the checkpoint re-decodes
every episode with the experts SiftMoE executed (:func:`wide_env.modeltools.live.replay_executed`: the live
backend's outcome, perturbed keys and values included). The cost at s is the full model's accuracy minus
that accuracy on the same tokens; the budget for a cost c interpolates (log s) on the isotonic
(non-decreasing) least-squares fit of the measured costs. ``--write`` stores ``calibrated_accuracy_cost``, ``calibrated_layer_budget`` and
``meta.budget_calibration`` in the trace, and with ``--default-cost c`` also makes the c-point budget the
trace's ``layer_budget`` (the env's default budget); the median-skip budget stays in the meta.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

DEFAULT_SCALES = tuple(float(2.0 ** (k / 4)) for k in range(-8, 25))  # 0.25 .. 64, steps of 2^(1/4)


def _median_rule_budget(trace: dict) -> np.ndarray:
    from wide_env.gating.trace import trace_meta

    cal = trace_meta(trace).get("budget_calibration")
    return np.asarray(cal["median_rule_layer_budget"] if cal else trace["layer_budget"], np.float64)


def _env_trace(trace: dict, payload_d_model: int | None, unit: np.ndarray, directory: str) -> str:
    """A copy of the trace for the calibration env: layer_budget = the median-skip unit, and (while the config
    has no ``radio.payload_d_model``) d_model = the payload's hidden size, so deadlines see the real payload."""
    from wide_env.gating.trace import save_trace

    arrays = dict(trace)
    arrays["layer_budget"] = unit.astype(np.float32)
    if payload_d_model is not None:
        arrays["d_model"] = np.array(int(payload_d_model), np.int64)
    path = os.path.join(directory, "calibration_trace.npz")
    save_trace(path, compress=False, **arrays)
    return path


def policy_selections(config: dict, episodes: int, seed: int, policy: str = "siftmoe") -> dict:
    """Run ``policy`` on the table env; per episode its start position and executed masks (n_tokens, L, E) of
    the experts that met the deadline, and the energy spent and Top-K's energy on the same states (J)."""
    from baselines import make_policy
    from wide_env.envs.decode import WideMoEEnv

    env = WideMoEEnv(config)
    pol = make_policy(policy, env)
    L, E, n_tok = env.sim.n_layers, env.sim.n_experts, env.config.n_tokens
    starts = np.zeros(episodes, np.int64)
    executed = np.zeros((episodes, n_tok, L, E), bool)
    energy = np.zeros(2)
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        if hasattr(pol, "reset"):
            pol.reset(seed=seed + ep)
        starts[ep] = env.trace_start  # trace position of the episode's first token
        done = False
        while not done:
            action = np.asarray(pol(obs)).astype(bool)
            meets = env.current_view().meets_deadline if env.sim.enforce_deadline else np.ones(E, bool)
            obs, _, term, trunc, info = env.step(action.astype(np.int8))
            executed[ep, info["token"], info["layer"]] = action & np.asarray(meets, bool)
            energy += info["energy_j"], info["topk_energy_j"]
            done = term or trunc
    return {"starts": starts, "executed": executed, "energy_j": float(energy[0]), "topk_energy_j": float(energy[1])}


def live_accuracy(model, trace: dict, sel: dict) -> np.ndarray:
    """(episodes, n_tokens) bool: the checkpoint's prediction is correct under the selections."""
    from wide_env.modeltools.live import replay_executed

    window_starts = np.flatnonzero(trace["doc_start"])
    out = np.zeros(sel["executed"].shape[:2], bool)
    for ep, start in enumerate(sel["starts"]):
        w = int(window_starts[np.searchsorted(window_starts, start, side="right") - 1])
        n = sel["executed"].shape[1]
        r = replay_executed(model, trace["mismatch"], trace["token_id"][w : start + n], trace["target_id"][w : start + n],
                            int(start - w), sel["executed"][ep])
        out[ep] = r["correct"]
    return out


def isotonic(values) -> np.ndarray:
    """Least-squares non-decreasing fit (pool adjacent violators, equal weights)."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in np.asarray(values, np.float64):
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, n1), (m2, n2) = blocks[-2], blocks[-1]
            blocks[-2:] = [[(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2]]
    return np.concatenate([np.full(int(n), m) for m, n in blocks])


def budget_for_cost(scales: np.ndarray, costs: np.ndarray, target: float) -> float:
    """Scale at which the isotonic (non-decreasing) fit of the measured costs first reaches ``target``,
    interpolated linearly in log(scale)."""
    fit = isotonic(costs)
    hit = np.flatnonzero(fit >= target)
    if hit.size == 0:
        raise ValueError(f"SiftMoE never costs {target} points up to scale {scales[-1]:g}; extend the scale grid")
    i = int(hit[0])
    if i == 0:
        raise ValueError(f"SiftMoE already costs {fit[0]:.2f} >= {target} points at the smallest scale {scales[0]:g}; "
                         "start the scale grid lower")
    c0, c1 = fit[i - 1], fit[i]
    f = (target - c0) / (c1 - c0)
    return float(np.exp(np.log(scales[i - 1]) + f * (np.log(scales[i]) - np.log(scales[i - 1]))))


def calibrate(profile: str, trace_path: str, ckpt: str, episodes: int, seed: int, costs=(0.5, 1.0, 2.0),
              scales=DEFAULT_SCALES, log=print) -> dict:
    from wide_env.models.torch_threads import one_torch_thread

    with one_torch_thread():  # the tiny model's many small passes; the caller's thread count restored
        return _calibrate(profile, trace_path, ckpt, episodes, seed, costs, scales, log)


def _calibrate(profile, trace_path, ckpt, episodes, seed, costs, scales, log) -> dict:
    from wide_env.config import RadioConfig, WideConfig
    from wide_env.gating.trace import load_trace
    from wide_env.models.moe_lm import load_checkpoint

    trace = load_trace(trace_path)
    model, _ = load_checkpoint(ckpt)
    unit = _median_rule_budget(trace)
    base_cfg = WideConfig.from_dict({"profile": profile}).to_dict()
    has_payload_field = "payload_d_model" in {f.name for f in RadioConfig.__dataclass_fields__.values()}
    payload = None if has_payload_field else int(base_cfg["model"]["d_model"])
    full = trace["full_correct"]
    rows = []

    def measure(policy: str, s: float) -> dict:
        cfg = {"profile": profile, "gating": {"source": "trace", "trace_path": env_trace, "backend": "table"},
               "budget": {"scale": float(s)}}
        sel = policy_selections(cfg, episodes, seed, policy)
        correct = live_accuracy(model, trace, sel)
        positions = sel["starts"][:, None] + np.arange(correct.shape[1])
        diff = 100 * (full[positions].astype(float) - correct).reshape(-1)
        return {"scale": float(s), "cost_pts": float(diff.mean()), "ci95_pts": float(1.96 * diff.std(ddof=1) / np.sqrt(diff.size)),
                "full_acc": float(full[positions].mean()), "acc": float(correct.mean()),
                "energy_vs_topk": sel["energy_j"] / sel["topk_energy_j"], "executed_per_layer": float(sel["executed"].sum(-1).mean()),
                "tokens": int(correct.size)}

    with tempfile.TemporaryDirectory() as tmp:
        env_trace = _env_trace(trace, payload if payload != int(trace["d_model"]) else None, unit, tmp)
        topk = measure("topk", 1.0)
        log(f"practical Top-K: accuracy {100 * topk['acc']:6.2f} (full {100 * topk['full_acc']:6.2f}), cost "
            f"{topk['cost_pts']:+.2f} +- {topk['ci95_pts']:.2f} points")
        for s in scales:
            t0 = time.time()
            row = measure("siftmoe", s)
            if not rows and row["cost_pts"] >= min(costs):
                raise ValueError(f"SiftMoE already costs {row['cost_pts']:.2f} points at the smallest scale {s:g}; "
                                 "start the scale grid lower")
            rows.append(row)
            log(f"scale {s:7.3f}: accuracy {100 * row['acc']:6.2f} (full {100 * row['full_acc']:6.2f}), cost "
                f"{row['cost_pts']:+.2f} +- {row['ci95_pts']:.2f} points, energy {row['energy_vs_topk']:.3f} x Top-K, "
                f"{row['executed_per_layer']:.2f} experts/layer, {time.time() - t0:.0f}s")
            if np.maximum.accumulate([r["cost_pts"] for r in rows])[-1] >= max(costs) + 1.0:
                break
    measured = np.array([r["scale"] for r in rows]), np.array([r["cost_pts"] for r in rows])
    found = {c: budget_for_cost(*measured, c) for c in costs}
    return {"costs": list(costs), "scales_for_cost": [found[c] for c in costs],
            "layer_budgets": [(found[c] * unit).tolist() for c in costs], "median_rule_layer_budget": unit.tolist(),
            "grid": rows, "topk": topk, "episodes": episodes, "seed": seed, "tokens_per_scale": rows[0]["tokens"],
            "payload_d_model": "radio.payload_d_model of the profile" if has_payload_field else (payload or int(trace["d_model"])),
            "method": "SiftMoE (baselines.make_policy('siftmoe')) on the profile's env with the table backend; accuracy of "
                      "the checkpoint re-decoding each episode with the executed experts (modeltools.live.replay_executed); "
                      "cost = full-model accuracy - that accuracy on the same tokens; budget = scale * median-skip "
                      "budget, scale interpolated in log on the isotonic fit of the costs"}


def refit(result: dict) -> dict:
    """The budgets for ``result['costs']`` re-fitted from its stored grid (no new measurements)."""
    scales = np.array([r["scale"] for r in result["grid"]])
    costs = np.array([r["cost_pts"] for r in result["grid"]])
    unit = np.asarray(result["median_rule_layer_budget"])
    found = [budget_for_cost(scales, costs, c) for c in result["costs"]]
    return dict(result, scales_for_cost=found, layer_budgets=[(s * unit).tolist() for s in found])


def write_calibration(trace_path: str, result: dict, default_cost: float | None) -> None:
    from wide_env.gating.trace import load_trace, save_trace, trace_meta

    trace = load_trace(trace_path)
    meta = trace_meta(trace)
    arrays = dict(trace)
    arrays["calibrated_accuracy_cost"] = np.asarray(result["costs"], np.float32)
    arrays["calibrated_layer_budget"] = np.asarray(result["layer_budgets"], np.float32)
    result = dict(result, default_cost=default_cost)
    if default_cost is not None:
        level = result["costs"].index(default_cost)
        arrays["layer_budget"] = arrays["calibrated_layer_budget"][level].copy()
        meta["layer_budget_rule"] = (f"the budget at which SiftMoE costs {default_cost:g} point(s) of accuracy "
                                     "(meta.budget_calibration); the median-skip budget is "
                                     "meta.budget_calibration.median_rule_layer_budget")
    meta["budget_calibration"] = result
    arrays["meta"] = np.array(json.dumps(meta))
    save_trace(trace_path, **arrays)


def main(argv=None) -> int:
    from wide_env.profiles import PROFILES, profile_checkpoint, profile_trace

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True, choices=sorted(PROFILES))
    ap.add_argument("--trace", default=None, help="default: the profile's shipped trace")
    ap.add_argument("--ckpt", default=None, help="default: the profile's shipped checkpoint directory")
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--seed", type=int, default=5000)
    ap.add_argument("--costs", default="0.5,1,2")
    ap.add_argument("--default-cost", type=float, default=None, help="make this cost's budget the trace's layer_budget")
    ap.add_argument("--write", action="store_true", help="store the result in the trace")
    ap.add_argument("--refit", action="store_true", help="re-fit the budgets from the trace's stored grid and write")
    args = ap.parse_args(argv)
    trace = args.trace or profile_trace(args.profile)
    if args.refit:
        from wide_env.gating.trace import load_trace, trace_meta

        result = refit(trace_meta(load_trace(trace))["budget_calibration"])
        result.pop("default_cost", None)
        result["method"] = result["method"].replace("running max of the cost", "isotonic fit of the costs")
        print(json.dumps({k: result[k] for k in ("costs", "scales_for_cost")}, indent=1))
        write_calibration(trace, result, args.default_cost)
        return 0
    result = calibrate(args.profile, trace, args.ckpt or profile_checkpoint(args.profile), args.episodes, args.seed,
                       tuple(float(c) for c in args.costs.split(",")))
    print(json.dumps({k: result[k] for k in ("costs", "scales_for_cost", "layer_budgets")}, indent=1))
    if args.write:
        write_calibration(trace, result, args.default_cost)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
