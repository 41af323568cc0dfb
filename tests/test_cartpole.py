"""A spiking DQN learns CartPole: SpikingPolicy inside SB3's own training loop, nothing mocked.

Hyperparameters are rl-baselines3-zoo's CartPole DQN (lr 2.3e-3, batch 64, target update every 10
steps, epsilon 1 -> 0.04 over 16% of the budget) with one update per two steps, and a small spiking
network: T = 4 steps, two LIF layers of 128, rate readout. Every 2,500 steps the greedy policy plays
20 evaluation episodes; training stops as soon as their mean return reaches 475, at most 80,000 steps.
"""

import gymnasium as gym
from stable_baselines3 import DQN
from stable_baselines3.common.callbacks import EvalCallback, StopTrainingOnRewardThreshold
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv

from spikeq import SpikingQNetwork  # importing spikeq registers "SpikingPolicy"
from spikeq.experiment.config import CARTPOLE_DQN

BUDGET = 80_000


def test_spiking_dqn_learns_cartpole():
    model = DQN(
        "SpikingPolicy",
        "CartPole-v1",
        policy_kwargs=dict(num_steps=4, net_arch=[128, 128]),
        seed=0,
        **CARTPOLE_DQN,
    )
    eval_env = DummyVecEnv([lambda: Monitor(gym.make("CartPole-v1"))])
    eval_env.seed(1)  # fixed evaluation episodes: the test is deterministic on a given machine
    stop = StopTrainingOnRewardThreshold(reward_threshold=475)
    evaluation = EvalCallback(eval_env, eval_freq=2_500, n_eval_episodes=20, callback_on_new_best=stop)
    model.learn(BUDGET, callback=evaluation)
    assert evaluation.best_mean_reward >= 475, f"best 20-episode mean {evaluation.best_mean_reward} < 475"
    assert model.num_timesteps < BUDGET
    assert isinstance(model.q_net, SpikingQNetwork) and model.q_net.num_steps == 4
