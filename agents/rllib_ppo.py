"""RLlib PPO (new API stack) with the expert-set RLModule on a WIDE env, compared with SiftMoE and Top-K.

    python -m agents.rllib_ppo --env wide_env/WideMoE-v0 --iterations 25

Trains with :class:`agents.rllib_module.ExpertSetRLModule` on the env of ``wide_env.integrations.rllib``
(flat observations, ``MultiDiscrete([2] * E)`` actions, the native vector env), with the settings of
``agents/hyperparams/ppo.yml`` for the id (the network options of its ``expert_set`` policy_kwargs, gamma,
lambda, learning rate, clip range, epochs, minibatch size and rollout size ``n_envs * n_steps``, so the RLlib
run matches ``train.py``'s SB3 run), then evaluates the greedy module, SiftMoE and Top-K on the same
evaluation episodes (seeds ``eval_seed + i``) with the project's one evaluation code path
(:func:`agents.evaluation.evaluate` -> ``baselines.rollout.evaluate_policies``) and prints the table.

Needs ``pip install -e ".[train,rllib]"`` in its own environment (ray[rllib] 2.60 pins gymnasium 1.2.2; see
.ci/run).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from typing import Any

import gymnasium as gym
import numpy as np

from agents.common import (UsageError, check_env_id, load_hyperparams, parse_env_kwargs)
from agents.evaluation import add_relative_columns, evaluate, format_table
from agents.run_config import EVAL_SEED, MAX_SEED, select_policy_kwargs

__all__ = ["build_parser", "ppo_config", "module_policy", "train", "main", "LABEL"]

DEFAULT_ENV = "wide_env/WideMoE-v0"
#: the agent's row in the comparison table
LABEL = "rllib_ppo"


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m agents.rllib_ppo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--env", default=DEFAULT_ENV, help="registered WIDE environment id")
    p.add_argument("--env-kwargs", default=None,
                   help="Python dict literal of gym.make kwargs, e.g. \"{'config': {'n_tokens': 8}}\"")
    p.add_argument("--iterations", type=_int_at_least(1), default=25,
                   help="PPO iterations (each samples n_envs * n_steps of the YAML)")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="training seed")
    p.add_argument("--eval-episodes", type=_int_at_least(1), default=20, help="evaluation episodes")
    p.add_argument("--eval-seed", type=_int_at_least(0), default=EVAL_SEED,
                   help="evaluation episode i uses seed EVAL_SEED + i")
    p.add_argument("--num-cpus", type=_int_at_least(1), default=1, help="CPUs given to the local Ray")
    p.add_argument("--num-threads", type=_int_at_least(1), default=1,
                   help="torch threads (the network is small: more threads only contend for the cores)")
    return p


def _learning_rate(value, total_steps: int):
    """A number, or ``lin_X`` (the YAML's linear decay X -> 0) as RLlib's piecewise schedule."""
    try:
        if isinstance(value, str) and value.startswith("lin_"):
            return [[0, float(value[4:])], [max(int(total_steps), 1), 0.0]]
        if not isinstance(value, bool):
            return float(value)
    except ValueError:
        pass
    raise UsageError(f"learning_rate = {value!r}: expected a number or 'lin_X' (linear decay from X to 0)")


#: ppo.yml keys the RLlib run maps to PPOConfig (learning_rate, gamma, ... below; policy_kwargs: the module's options)
MAPPED_KEYS = ("n_envs", "n_steps", "batch_size", "n_epochs", "learning_rate", "gamma", "gae_lambda", "clip_range",
               "ent_coef", "vf_coef", "max_grad_norm", "policy", "policy_kwargs")
#: ppo.yml keys of train.py's run (budget, evaluation and checkpoint schedule, SB3's VecEnv kind): not training
#: settings, so the RLlib run has its own (--iterations, --eval-episodes)
RUN_ONLY_KEYS = ("n_timesteps", "demo_timesteps", "eval_freq", "eval_episodes", "save_freq", "vec_env")


def _number(env_id: str, hp: dict, key: str, default: float) -> float:
    value = hp.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{env_id}'s PPO setting {key} = {value!r}: the RLlib run takes a number here (a 'lin_X' "
                         "schedule only for learning_rate)")
    return float(value)


def _check_settings(env_id: str, hp: dict) -> None:
    """Refuse an id whose PPO settings the RLlib run would not reproduce (reward shaping and VecNormalize are
    SB3-trainer features; another policy is not this module)."""
    other = sorted(set(hp) - set(MAPPED_KEYS) - set(RUN_ONLY_KEYS))
    if other:
        raise UsageError(f"{env_id}'s PPO settings (agents/hyperparams/ppo.yml) use {other}, which only train.py's "
                         "SB3 trainer applies (reward_shaping: agents/shaping.py, normalize: VecNormalize); train "
                         "this id with train.py")
    if hp.get("policy", "expert_set") != "expert_set":
        raise UsageError(f"{env_id}'s PPO settings choose the policy {hp['policy']!r}; the RLlib run trains the "
                         "expert-set module only")


def ppo_config(env_id: str, env_kwargs: dict, *, hp: dict, iterations: int, seed: int):
    """The PPOConfig of the run: the YAML's PPO settings mapped to RLlib's names, the expert-set module,
    EnvRunner-local sampling on the native vector env (no extra processes: the machine may be small)."""
    from ray.rllib.algorithms.ppo import PPOConfig

    import wide_env.integrations.rllib as wide_rllib
    from agents.rllib_module import expert_set_spec

    _check_settings(env_id, hp)
    wide_rllib.register([env_id])
    # where the YAML is silent: SB3 PPO's defaults, so both trainers read one file the same way
    num = functools.partial(_number, env_id, hp)
    n_envs = int(num("n_envs", 8))
    rollout = n_envs * int(num("n_steps", 2048))
    probe = wide_rllib.make_env(env_id, env_kwargs)
    try:
        spec = expert_set_spec(probe, **select_policy_kwargs(hp, "expert_set"))
    finally:
        probe.close()
    native = gym.spec(env_id).vector_entry_point is not None
    return (PPOConfig()
            .environment(env_id, env_config=env_kwargs)
            .env_runners(num_env_runners=0, num_envs_per_env_runner=n_envs, rollout_fragment_length="auto",
                         gym_env_vectorize_mode="vector_entry_point" if native else "sync")
            .training(train_batch_size_per_learner=rollout, minibatch_size=int(num("batch_size", 64)),
                      num_epochs=int(num("n_epochs", 10)),
                      lr=_learning_rate(hp.get("learning_rate", 3e-4), iterations * rollout),
                      gamma=num("gamma", 0.99), lambda_=num("gae_lambda", 0.95), clip_param=num("clip_range", 0.2),
                      entropy_coeff=num("ent_coef", 0.0), vf_loss_coeff=num("vf_coef", 0.5),
                      grad_clip=num("max_grad_norm", 0.5),
                      # SB3's PPO has neither a KL penalty nor value clipping
                      use_kl_loss=False, vf_clip_param=float("inf"))
            .rl_module(rl_module_spec=spec)
            .debugging(seed=seed))


def module_policy(module, problem):
    """The trained module as an evaluation policy ``obs -> int8 action`` (single or batched, Dict or flat
    observations): greedy, an entry runs where its execute logit is positive (never where masked)."""
    import torch as th

    from baselines.observation import parse_observation

    order = sorted(problem.obs_slices, key=lambda k: problem.obs_slices[k].start)

    def act(obs):
        arrays, single = parse_observation(obs, problem)
        flat = np.concatenate([arrays[k] for k in order], axis=-1).astype(np.float32)
        with th.no_grad():
            x = th.from_numpy(flat)
            logits = module.execute_logits(x, module.encoder(x))
        action = (logits > 0).numpy().astype(np.int8)
        return action[0] if single else action

    return act


def train(env_id: str, env_kwargs: dict, *, iterations: int, seed: int, num_cpus: int = 1, num_threads: int = 1,
          log=print) -> tuple[Any, dict]:
    """Train; returns (the trained module, {'env_steps', 'wall_s', 'returns'}). Starts a local Ray if none."""
    import ray
    import torch as th

    # measured on the 2-core machine: torch's default thread pool made each tiny matmul and softmax ~5 ms
    # (10x slower per iteration than one thread)
    th.set_num_threads(num_threads)

    hp, source = load_hyperparams("ppo", env_id)
    config = ppo_config(env_id, env_kwargs, hp=hp, iterations=iterations, seed=seed)
    log(f"PPO settings from {source}; expert-set module {config.rl_module_spec.model_config}")
    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=80 * 2 ** 20,
                 log_to_driver=False)
    algo = config.build_algo()
    try:
        t0, returns, steps = time.perf_counter(), [], 0
        for i in range(iterations):
            result = algo.train()
            runners = result["env_runners"]
            steps = int(runners.get("num_env_steps_sampled_lifetime", steps))
            ret = float(runners.get("episode_return_mean", float("nan")))
            returns.append(ret)
            log(f"iteration {i + 1:>3}/{iterations}: {steps:>7} env steps, episode return {ret:9.3f}, "
                f"{time.perf_counter() - t0:6.1f} s")
        wall = time.perf_counter() - t0
        module = algo.get_module()
        module.eval()
        return module, {"env_steps": steps, "wall_s": wall, "returns": returns}
    finally:
        algo.stop()


def main(argv=None) -> tuple[list[dict], dict]:
    """Train, evaluate against SiftMoE and Top-K, print the table; returns (table rows, training stats)."""
    args = build_parser().parse_args(argv)
    env_id = check_env_id(args.env)
    if args.eval_seed > MAX_SEED:
        raise UsageError(f"--eval-seed must be in [0, {MAX_SEED}], got {args.eval_seed}")
    env_kwargs = parse_env_kwargs(args.env_kwargs)
    module, stats = train(env_id, env_kwargs, iterations=args.iterations, seed=args.seed, num_cpus=args.num_cpus,
                          num_threads=args.num_threads)
    print(f"trained: {stats['env_steps']} env steps in {stats['wall_s']:.1f} s of wall time")

    def agent(env):
        from baselines.observation import problem_of

        return module_policy(module, problem_of(env))

    agent.is_policy_factory = True
    rows = add_relative_columns(evaluate(env_id, env_kwargs, [(LABEL, agent), "siftmoe", "topk"],
                                         episodes=args.eval_episodes, seed=args.eval_seed))
    print(format_table(rows))
    for r in rows:
        print(f"{r['policy']:>10}: {r['energy_pct_of_siftmoe']:6.1f}% of SiftMoE's energy, "
              f"budget violations {100 * r['violation_rate']:.2f}%")
    return rows, stats


def cli() -> int:
    try:
        main()
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
