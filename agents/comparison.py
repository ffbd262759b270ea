"""The final comparison of a training run: the trained agent (final and best model) against SiftMoE and Top-K on the
evaluation seeds, as ``comparison.txt`` / ``.csv``, ``comparison_episodes.csv`` and ``learning_curve.png``."""

from __future__ import annotations

__all__ = ["write_comparison", "frozen"]


def frozen(vecnorm):
    if vecnorm is None:
        return None
    import copy

    vn = copy.copy(vecnorm)
    vn.training = False
    return vn


def write_comparison(cfg, run_dir, model, problem, vecnorm, reference, eval_rows) -> None:
    from agents.evaluation import add_relative_columns, evaluate, format_table, plot_learning_curve, write_csv
    from agents.sb3_policy import SB3Policy, load_model

    algo = cfg["algo"]
    policies = [(f"{algo} (final)", SB3Policy(model, problem, vecnorm=frozen(vecnorm)))]
    best_path = run_dir / "best_model.zip"
    if best_path.exists():
        best = load_model(algo, str(best_path), problem)
        best_vn = vecnorm
        if vecnorm is not None and (run_dir / "best_vecnormalize.pkl").exists():
            from stable_baselines3.common.vec_env import VecNormalize

            best_vn = VecNormalize.load(str(run_dir / "best_vecnormalize.pkl"), vecnorm.venv)
        policies.append((f"{algo} (best)", SB3Policy(best, problem, vecnorm=frozen(best_vn))))
    if cfg["hyperparams"].get("shield", False):  # the agent as it trained: under the deviation shield
        from agents.shielding import shielded_factory

        policies = [(f"{label[:-1]}, shielded)", shielded_factory(pol)) for label, pol in policies]
    policies += ["siftmoe", "topk"]
    ep_rows: list = []
    rows = evaluate(cfg["env"], cfg["env_kwargs"], policies, episodes=int(cfg["eval_episodes"]),
                    seed=int(cfg["eval_seed"]), episode_rows=ep_rows)
    add_relative_columns(rows)
    table = format_table(rows)
    from baselines.plotting import short_names

    short = short_names(r["policy"] for r in rows)  # the same distinct names as the table above
    extra = ["", f"{'policy':<24} {'% of SiftMoE energy':>20} {'viol % above SiftMoE':>21}"]
    for r in rows:
        if "energy_pct_of_siftmoe" in r:
            extra.append(f"{short[r['policy']]:<24} {r['energy_pct_of_siftmoe']:>20.1f} "
                         f"{100 * r['violation_rate_above_siftmoe']:>21.2f}")
    if rows[0].get("vec_env") == "native":
        seeds = f"one batch on the native vector env, seed {cfg['eval_seed']}"
    else:
        seeds = f"seeds {cfg['eval_seed']}..{cfg['eval_seed'] + int(cfg['eval_episodes']) - 1}"
    header = f"{cfg['env']}: {cfg['eval_episodes']} episodes per policy, {seeds}"
    text = "\n".join([header, table, *extra])
    print(text)
    (run_dir / "comparison.txt").write_text(text + "\n")
    write_csv(rows, run_dir / "comparison.csv")
    write_csv(ep_rows, run_dir / "comparison_episodes.csv")
    title = f"{algo} on {cfg['env']} ({cfg['hyperparams'].get('policy', '')}, seed {cfg['seed']})"
    plot_learning_curve(eval_rows, reference, run_dir / "learning_curve.png", title=title)
    print(f"wrote {run_dir / 'comparison.csv'} and {run_dir / 'learning_curve.png'}")
