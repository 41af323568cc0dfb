"""FrameReplayBuffer: SB3's replay buffer for stacked Atari frames, each frame stored once."""

import copy
from collections.abc import Iterator

import numpy as np
import pytest
import torch as th
from stable_baselines3 import DQN
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.vec_env import VecEnv, VecTransposeImage

from spikeq.envs.atari import make_env
from spikeq.envs.replay import FrameReplayBuffer


def play(
    env: VecEnv, num_steps: int, buffers: list[ReplayBuffer], restart_at: int | None = None
) -> Iterator[list[dict]]:
    """Random play, each transition added to every buffer the way SB3's DQN adds it; yields infos."""
    env.action_space.seed(0)
    obs = env.reset()
    for step in range(num_steps):
        if step == restart_at:  # as a second `learn()` call does: a reset without a done
            obs = env.reset()
        actions = np.array([env.action_space.sample() for _ in range(env.num_envs)])
        new_obs, rewards, dones, infos = env.step(actions)
        # The VecEnv has already reset a finished env: its transition ends in the terminal obs.
        next_obs = copy.deepcopy(new_obs)
        for i, done in enumerate(dones):
            if done:
                next_obs[i] = infos[i]["terminal_observation"]
        for buffer in buffers:
            buffer.add(obs, next_obs, actions, rewards, dones, infos)
        obs = new_obs
        yield infos


def assert_same_samples(expected_buffer: ReplayBuffer, actual_buffer: ReplayBuffer, seed: int):
    np.random.seed(seed)
    expected = expected_buffer.sample(64)
    np.random.seed(seed)
    actual = actual_buffer.sample(64)
    for field in ("observations", "actions", "next_observations", "dones", "rewards"):
        expected_tensor, actual_tensor = getattr(expected, field), getattr(actual, field)
        assert actual_tensor.dtype == expected_tensor.dtype, field
        assert th.equal(actual_tensor, expected_tensor), field


@pytest.mark.parametrize(
    ("channels_first", "handle_timeout_termination", "restart_at"),
    [
        (True, True, None),  # channel-first: what SB3's DQN passes
        (False, True, 150),  # channel-last: VecFrameStack's own layout
        (True, False, 150),
    ],
)
def test_samples_exactly_what_sb3_replay_buffer_samples(
    channels_first, handle_timeout_termination, restart_at
):
    # Two Breakout envs, short time limit, 100-transition buffers filled 6 times over: life
    # losses, time-outs and wrap-around all occur.
    env = make_env("Breakout", n_envs=2, max_episode_steps=40, seed=1)
    if channels_first:
        env = VecTransposeImage(env)
    buffers = [
        buffer_class(
            100,
            env.observation_space,
            env.action_space,
            device="cpu",
            n_envs=2,
            handle_timeout_termination=handle_timeout_termination,
        )
        for buffer_class in (ReplayBuffer, FrameReplayBuffer)
    ]
    life_losses = time_outs = 0
    for step, infos in enumerate(play(env, 300, buffers, restart_at)):
        for info in infos:
            time_outs += info.get("TimeLimit.truncated", False)
            life_losses += "terminal_observation" in info and not info["TimeLimit.truncated"]
        if step % 20 == 0:
            assert_same_samples(*buffers, seed=step)
    assert_same_samples(*buffers, seed=0)
    assert buffers[1].full and life_losses > 0 and time_outs > 0
    env.close()


def test_stores_about_one_frame_per_transition():
    env = VecTransposeImage(make_env("Pong", n_envs=2, max_episode_steps=40))
    sb3_buffer = ReplayBuffer(2000, env.observation_space, env.action_space, n_envs=2)
    frame_buffer = FrameReplayBuffer(2000, env.observation_space, env.action_space, n_envs=2)
    for _ in play(env, 200, [frame_buffer]):
        pass

    # Allocated bytes: the arrays are sized for full capacity up front (all but the frame
    # buffer's small terminal-frame store, which grows with the episode ends).
    sb3_bytes = sum(array.nbytes for array in vars(sb3_buffer).values() if isinstance(array, np.ndarray))
    assert sb3_bytes / 2000 > 2 * 4 * 84 * 84  # obs and next_obs: 8 frames per transition
    assert frame_buffer.nbytes / 2000 < 1.1 * 84 * 84
    assert frame_buffer.nbytes / sb3_bytes < 0.3
    env.close()


def test_trains_sb3_dqn_on_pong_and_saves_and_loads_its_buffer(tmp_path):
    env = make_env("Pong", n_envs=2, max_episode_steps=60, seed=0)
    model = DQN(
        "CnnPolicy",
        env,
        replay_buffer_class=FrameReplayBuffer,
        buffer_size=300,
        learning_starts=100,
        batch_size=8,  # small batches: CPU test time
        exploration_initial_eps=1.0,
        exploration_final_eps=1.0,  # random play: the test is about the buffer, not the policy
        seed=0,
        device="cpu",
    )
    model.learn(total_timesteps=160)
    assert isinstance(model.replay_buffer, FrameReplayBuffer)
    assert model.replay_buffer.observation_space.shape == (4, 84, 84)  # DQN transposed them
    assert model._n_updates > 0

    trained_buffer = model.replay_buffer
    model.save_replay_buffer(tmp_path / "replay.pkl")
    model.load_replay_buffer(tmp_path / "replay.pkl")
    assert model.replay_buffer is not trained_buffer
    assert_same_samples(trained_buffer, model.replay_buffer, seed=0)

    # A new learn() resets the env mid-episode and keeps filling the loaded buffer.
    model.learn(total_timesteps=40)
    assert model.replay_buffer.size() == trained_buffer.size() + 40 // env.num_envs
    env.close()


def test_rejects_what_it_cannot_store():
    env = VecTransposeImage(make_env("Pong"))
    with pytest.raises(ValueError, match="optimize_memory_usage"):
        FrameReplayBuffer(100, env.observation_space, env.action_space, optimize_memory_usage=True)

    buffer = FrameReplayBuffer(100, env.observation_space, env.action_space)
    obs = env.reset()
    not_a_stack = np.random.default_rng(0).integers(0, 255, obs.shape, dtype=np.uint8)
    with pytest.raises(ValueError, match="not obs moved on by one frame"):
        buffer.add(obs, not_a_stack, np.array([0]), np.array([0.0]), np.array([False]), [{}])
    assert buffer.size() == 0
    env.close()
