"""Training callbacks: WIDE metrics for TensorBoard, crash-safe checkpoints, periodic evaluation.

Checkpoints and evaluations happen at the start of a rollout, i.e. right after a policy update, so the
saved model, its timestep counter and the optimizer state are consistent (nothing of a half-collected
rollout is lost or counted twice): resuming from a checkpoint replays exactly the remaining budget.
Every file is written to a temporary name and moved into place (``os.replace``), and
``checkpoints/latest.json`` is updated last, so a SIGKILL at any moment leaves the previous checkpoint
intact and referenced.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback

METRIC_KEYS = ("energy_j", "topk_energy_j", "deviation", "budget_violated", "deadline_misses", "n_executed")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_save_model(model, path: Path) -> None:
    """model.save to ``path`` (a .zip) atomically."""
    tmp = Path(str(path)[:-4] + ".tmp.zip")
    model.save(tmp)
    os.replace(tmp, path)


def atomic_save_vecnormalize(vecnorm, path: Path) -> None:
    tmp = Path(str(path) + ".tmp")
    vecnorm.save(tmp)
    os.replace(tmp, path)


class WideMetricsCallback(BaseCallback):
    """Logs per-rollout WIDE metrics from ``info`` (energy per token, relative energy, deviation,
    violation rate, deadline misses, executed experts, and any ``accuracy_*`` key) under ``wide/``."""

    def __init__(self, n_layers: int, verbose: int = 0):
        super().__init__(verbose)
        self.n_layers = max(int(n_layers), 1)
        self._reset()

    def _reset(self):
        self.sums = {k: 0.0 for k in METRIC_KEYS}
        self.acc: dict[str, list[float]] = {}
        self.steps = 0

    def _on_step(self) -> bool:
        for info in self.locals.get("infos", ()):
            if "energy_j" not in info:
                continue
            for k in METRIC_KEYS:
                self.sums[k] += float(info.get(k, 0.0))
            for k, v in info.items():
                if k.startswith("accuracy_"):
                    self.acc.setdefault(k, []).append(float(v))
            self.steps += 1
        return True

    def _on_rollout_end(self) -> None:
        if self.steps == 0:
            return
        s, n = self.sums, self.steps
        self.logger.record("wide/energy_per_token_j", s["energy_j"] / n * self.n_layers)
        self.logger.record("wide/energy_rel_topk", s["energy_j"] / max(s["topk_energy_j"], 1e-300))
        self.logger.record("wide/deviation", s["deviation"] / n)
        self.logger.record("wide/violation_rate", s["budget_violated"] / n)
        self.logger.record("wide/deadline_misses_per_token", s["deadline_misses"] / n * self.n_layers)
        self.logger.record("wide/executed_per_step", s["n_executed"] / n)
        for k, v in self.acc.items():
            self.logger.record(f"wide/{k}", float(np.mean(v)))
        self._reset()


EVAL_FIELDS = ("timesteps", "wall_s", "reward_per_step", "energy_per_token_j", "energy_rel_topk", "deviation",
               "violation_rate", "deadline_misses_per_token", "executed_per_step")


class CheckpointEvalCallback(BaseCallback):
    """Periodic evaluation (best model by reward) and crash-safe checkpoints, after policy updates.

    evaluate: ``model -> summary row`` (baselines.evaluate's fields). state: dict persisted in
    ``latest.json`` (best reward, last eval / save steps) so a resumed run continues the bookkeeping.
    on_evaluation: optional listener called with every eval_log row (sweeps report it to Ray Tune or
    Optuna); a truthy return stops training after this evaluation (``stop_requested``)."""

    def __init__(self, run_dir: Path, evaluate: Callable[[Any], dict], *, eval_freq: int, save_freq: int,
                 vecnorm=None, state: dict | None = None, keep_checkpoints: int = 3, verbose: int = 1,
                 budget: int | None = None, on_evaluation: Callable[[dict], Any] | None = None):
        super().__init__(verbose)
        self.on_evaluation = on_evaluation
        self.stop_requested = False
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.eval_dir = self.run_dir / "eval"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.eval_dir.mkdir(parents=True, exist_ok=True)
        self.evaluate_fn = evaluate
        self.eval_freq, self.save_freq = int(eval_freq), int(save_freq)
        self.vecnorm = vecnorm
        self.keep = max(int(keep_checkpoints), 1)
        st = state or {}
        self.best_reward = float(st.get("best_reward", -np.inf))
        self.last_eval = int(st.get("last_eval", -1))
        self.last_save = int(st.get("last_save", 0))
        self.wall_offset = float(st.get("wall_s", 0.0))
        self.cpu_offset = float(st.get("cpu_s", 0.0))
        self.budget = budget
        self.t0, self.cpu0 = time.time(), time.process_time()

    # ---- hooks ------------------------------------------------------------------------------------
    def _on_training_start(self) -> None:
        if self.eval_freq > 0 and self.last_eval < 0:
            self.run_eval()  # the untrained policy: first point of the learning curve

    def _on_rollout_start(self) -> None:
        n = self.model.num_timesteps
        if self.eval_freq > 0 and n - self.last_eval >= self.eval_freq:
            self.run_eval()
        if self.save_freq > 0 and n - self.last_save >= self.save_freq:
            self.save_checkpoint()

    def _on_step(self) -> bool:
        return not self.stop_requested

    # ---- evaluation -------------------------------------------------------------------------------
    def wall(self) -> float:
        """Wall seconds of training so far, every segment of a resumed run up to its checkpoint included."""
        return self.wall_offset + time.time() - self.t0

    def cpu(self) -> float:
        """CPU seconds (this process's ``time.process_time``) of training so far, every segment included."""
        return self.cpu_offset + time.process_time() - self.cpu0

    def run_eval(self) -> dict:
        n = int(self.model.num_timesteps)
        row = self.evaluate_fn(self.model)
        rec = {"timesteps": n, "wall_s": round(self.wall(), 2)}
        rec.update({k: row[k] for k in EVAL_FIELDS[2:] if k in row})
        # the accuracies and the 95% CIs of the means (the learning curve's bands)
        rec.update({k: row[k] for k in row if k.startswith("accuracy_") or k.endswith("_ci95")})
        self.append_eval(rec)
        try:
            for k, v in rec.items():
                if k != "timesteps":
                    self.logger.record(f"eval/{k}", v)
            # written now, at the evaluated step (as SB3's EvalCallback does): SB3 dumps only at the end of
            # a rollout, so the evaluation after the last update would otherwise never be written
            self.logger.dump(n)
        except AttributeError:  # model without a logger (e.g. a finished run re-opened by --resume)
            pass
        if rec["reward_per_step"] > self.best_reward:
            self.best_reward = rec["reward_per_step"]
            atomic_save_model(self.model, self.run_dir / "best_model.zip")
            if self.vecnorm is not None:
                atomic_save_vecnormalize(self.vecnorm, self.run_dir / "best_vecnormalize.pkl")
        self.last_eval = n
        if self.verbose:
            print(f"[eval] t={n:>8d} reward/step={rec['reward_per_step']:.4f} "
                  f"E/E_topk={rec.get('energy_rel_topk', float('nan')):.3f} "
                  f"viol={100 * rec.get('violation_rate', float('nan')):.2f}% "
                  f"miss/tok={rec.get('deadline_misses_per_token', float('nan')):.3f} ({rec['wall_s']:.0f}s)",
                  flush=True)
        if self.on_evaluation is not None and self.on_evaluation(dict(rec)):
            self.stop_requested = True
        return rec

    def append_eval(self, rec: dict) -> None:
        path = self.eval_dir / "eval_log.csv"
        rows = read_eval_log(path)
        rows = [r for r in rows if int(r["timesteps"]) < rec["timesteps"]] + [rec]
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        tmp = Path(str(path) + ".tmp")
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            for r in rows:
                w.writerow(r)
        os.replace(tmp, path)
        arrays = {k: np.array([float(r.get(k, np.nan)) for r in rows]) for k in keys}
        tmp_npz = self.eval_dir / "evaluations.tmp.npz"
        np.savez(tmp_npz, **arrays)
        os.replace(tmp_npz, self.eval_dir / "evaluations.npz")

    # ---- checkpoints ------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"best_reward": self.best_reward, "last_eval": self.last_eval, "last_save": self.last_save,
                "wall_s": round(self.wall(), 2), "cpu_s": round(self.cpu(), 2)}

    def save_checkpoint(self) -> Path:
        n = int(self.model.num_timesteps)
        path = self.ckpt_dir / f"model_{n}_steps.zip"
        atomic_save_model(self.model, path)
        vn = None
        if self.vecnorm is not None:
            vn = self.ckpt_dir / f"vecnormalize_{n}_steps.pkl"
            atomic_save_vecnormalize(self.vecnorm, vn)
        self.last_save = n
        state = self.state()
        # the training time at every kept checkpoint, so a resume from an older one counts its segments too
        kept = sorted([int(p.stem.split("_")[1]) for p in self.ckpt_dir.glob("model_*_steps.zip")])[-self.keep:]
        try:
            times = json.loads((self.ckpt_dir / "latest.json").read_text()).get("times", {})
        except (OSError, ValueError, AttributeError):
            times = {}
        times = {k: v for k, v in times.items() if k.isdigit() and int(k) in kept}
        times[str(n)] = {"wall_s": state["wall_s"], "cpu_s": state["cpu_s"]}
        latest = {"model": path.name, "vecnormalize": vn.name if vn else None, "num_timesteps": n,
                  "time": time.time(), **state, "times": times}
        atomic_write_text(self.ckpt_dir / "latest.json", json.dumps(latest, indent=1))
        if self.budget is not None:  # status.json follows the checkpoints (a crash leaves the last one)
            write_status(self.run_dir, "running", n, self.budget, checkpoint=path.name)
        self._prune()
        if self.verbose > 1:
            print(f"[checkpoint] {path}")
        return path

    def _prune(self) -> None:
        ckpts = sorted(self.ckpt_dir.glob("model_*_steps.zip"), key=lambda p: int(p.stem.split("_")[1]))
        for old in ckpts[:-self.keep]:
            n = old.stem.split("_")[1]
            old.unlink(missing_ok=True)
            (self.ckpt_dir / f"vecnormalize_{n}_steps.pkl").unlink(missing_ok=True)


class CpuTimeLimit(BaseCallback):
    """Stops training once this process has used ``limit_s`` seconds of CPU time (``time.process_time``: the
    training's own computing, not the wall clock of a shared machine) since training started."""

    def __init__(self, limit_s: float, verbose: int = 0):
        super().__init__(verbose)
        if not limit_s > 0:
            raise ValueError(f"the CPU-time limit must be positive, got {limit_s!r} s")
        self.limit_s = float(limit_s)
        self.start = None
        self.reached = False

    def _on_training_start(self) -> None:
        self.start = time.process_time()

    def _on_step(self) -> bool:
        if time.process_time() - self.start > self.limit_s:
            self.reached = True
            return False
        return True


def read_eval_log(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    with open(path, newline="") as fh:
        return [{k: (float(v) if v not in ("", None) else float("nan")) for k, v in r.items()}
                for r in csv.DictReader(fh)]


def write_status(run_dir: Path, state: str, n: int, budget: int, **extra) -> None:
    """``status.json``: state ("running", "trained", "done"), timesteps done and the total budget."""
    atomic_write_text(Path(run_dir) / "status.json", json.dumps(
        {"state": state, "num_timesteps": int(n), "n_timesteps": int(budget), "time": time.time(), **extra}))


def checkpoints_newest_first(run_dir: Path) -> list[dict]:
    """Every checkpoint on disk, newest first: ``model_path``, ``num_timesteps``, ``vecnormalize_path`` (and,
    for the one ``latest.json`` points to, its bookkeeping: best reward, last evaluation, wall time)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    latest = {}
    try:
        latest = json.loads((ckpt_dir / "latest.json").read_text())
    except (OSError, ValueError):
        pass
    out = []
    for path in sorted(ckpt_dir.glob("model_*_steps.zip"), key=lambda p: int(p.stem.split("_")[1]), reverse=True):
        n = int(path.stem.split("_")[1])
        vn = ckpt_dir / f"vecnormalize_{n}_steps.pkl"
        rec = dict(latest) if latest.get("model") == path.name else {}
        times = latest.get("times") if isinstance(latest.get("times"), dict) else {}
        if not rec and isinstance(times.get(str(n)), dict):  # an older checkpoint: its training time
            rec.update({k: float(v) for k, v in times[str(n)].items() if k in ("wall_s", "cpu_s")})
        rec.update(model_path=str(path), num_timesteps=n, vecnormalize_path=str(vn) if vn.exists() else None)
        out.append(rec)
    return out

