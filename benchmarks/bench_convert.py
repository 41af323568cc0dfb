"""ANN->SNN conversion (spikeq.analysis.convert, Tan et al. 2021): what T buys.

Trains an ANN DQN on CartPole with rl-baselines3-zoo's hyperparameters (one update per two steps, as
tests/test_cartpole.py) until 20 greedy episodes average 475, records observations it plays
at epsilon 0.05, converts it at several T and prints, side by side with the DQN itself: how often the
SNN picks the DQN's action on further observations, the root-mean-square error of its Q-values, the
mean return of its greedy policy, and its spikes and synaptic operations per action.

    .venv/bin/python benchmarks/bench_convert.py                       # T = 8 ... 512, about 3 minutes
    .venv/bin/python benchmarks/bench_convert.py --steps 20000 --num-steps 16 64 --episodes 5
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from stable_baselines3 import DQN
from stable_baselines3.common.callbacks import EvalCallback, StopTrainingOnRewardThreshold
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

import spikeq  # noqa: F401  (registers SpikingPolicy)
from spikeq.analysis.convert import action_agreement, convert_dqn, record_frames
from spikeq.analysis.energy import EnergyMeter
from spikeq.experiment.config import CARTPOLE_DQN


def spikes_and_sops(model: DQN, frames: np.ndarray) -> tuple[float, float]:
    """Spikes and SOPs per greedy decision of a spiking model on ``frames`` (one at a time)."""
    meter = EnergyMeter(model.q_net)
    for frame in frames:
        meter.q_values(model.policy.obs_to_tensor(frame[None])[0])
    report = meter.report()
    return report.spikes_per_action, report.sops_per_action


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80_000, help="most DQN training steps")
    parser.add_argument("--frames", type=int, default=5000, help="observations to normalise on")
    parser.add_argument("--held-out", type=int, default=1000, help="further observations to compare on")
    parser.add_argument("--num-steps", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512])
    parser.add_argument("--episodes", type=int, default=10, help="greedy episodes per policy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    env = make_vec_env("CartPole-v1", n_envs=1, seed=args.seed)
    started = time.perf_counter()
    # rl-baselines3-zoo's CartPole network: two ReLU layers of 256
    ann = DQN(
        "MlpPolicy",
        env,
        seed=args.seed,
        device="cpu",
        policy_kwargs=dict(net_arch=[256, 256]),
        **CARTPOLE_DQN,
    )
    eval_env = make_vec_env("CartPole-v1", n_envs=1, seed=args.seed + 1000)
    stop = StopTrainingOnRewardThreshold(reward_threshold=475)
    evaluation = EvalCallback(
        eval_env, eval_freq=2500, n_eval_episodes=20, callback_on_new_best=stop, verbose=0
    )
    ann.learn(args.steps, callback=evaluation)
    print(
        f"DQN trained for {ann.num_timesteps:,} steps in {time.perf_counter() - started:.0f} s "
        f"(best 20-episode greedy mean {evaluation.best_mean_reward:.1f})"
    )
    frames = record_frames(ann, env, args.frames + args.held_out, seed=args.seed, progress=False)
    normalise_on, held_out = frames[: args.frames], frames[args.frames :]
    ann_return, _ = evaluate_policy(ann, eval_env, args.episodes)

    print(f"normalised on {args.frames} observations; compared on {args.held_out} further ones\n")
    columns = ("T", 5), ("agreement", 9), ("Q rmse", 8), ("Q rmse/rms", 10), ("return", 7)
    columns += ("spikes/act", 10), ("SOPs/act", 9)
    print(" ".join(f"{name:>{width}}" for name, width in columns))
    print(f"{'DQN':>5} {'1':>9} {'0':>8} {'0':>10} {ann_return:7.1f} {'-':>10} {'-':>9}")
    for num_steps in args.num_steps:
        snn, conversion = convert_dqn(ann, normalise_on, num_steps=num_steps, env=env, progress=False)
        result = action_agreement(ann, snn, held_out, progress=False)
        snn_return, _ = evaluate_policy(snn, eval_env, args.episodes)
        spikes, sops = spikes_and_sops(snn, held_out[:100])
        relative = result["q_rmse"] / result["q_scale"]
        print(
            f"{num_steps:5d} {result['agreement']:9.3f} {result['q_rmse']:8.4f} {relative:10.4f} "
            f"{snn_return:7.1f} {spikes:10.1f} {sops:9.0f}"
        )
    scales = ", ".join(f"{k} {v:.3g}" for k, v in conversion.scales.items())
    print(f"\nlayer scales (99.9th percentile of positive activations): {scales}")


if __name__ == "__main__":
    main()
