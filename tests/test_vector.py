"""ale-py's native vector env behind SB3's VecEnv API: the same game as the SB3 wrapper path.

``make_env(..., vec_env="ale")`` and ``make_env(..., vec_env="dummy")`` are played side by side with
the same seeds and actions and no no-ops (no-op counts come from different RNGs). What must match
exactly: rewards, dones, time-outs, lives, the Monitor's full-game scores and lengths, and the
frames, except where ALE's max-pooling of grayscale frames differs from SB3's max-pooling of RGB
frames (Pong) and in the last frame of a game over (see ``spikeq.envs.vector``).
"""

import numpy as np
import pytest
from stable_baselines3 import DQN
from stable_baselines3.common.atari_wrappers import ClipRewardEnv, EpisodicLifeEnv, FireResetEnv
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import VecEnv

from spikeq.analysis.evaluate import evaluate_model
from spikeq.envs.atari import make_env
from spikeq.envs.replay import FrameReplayBuffer
from spikeq.envs.vector import AleVecEnv


def sb3_lives_and_frames(env: VecEnv) -> tuple[list[int], list[int]]:
    """Lives and episode frame number of each game of a ``vec_env="dummy"`` env."""
    ales = [game.unwrapped.ale for game in env.venv.envs]
    return [ale.lives() for ale in ales], [ale.getEpisodeFrameNumber() for ale in ales]


def play_side_by_side(game: str, n_steps: int, reset_at: int | None = None, **kwargs) -> dict[str, list]:
    """Play the SB3 path and the ALE path with the same random actions; assert that they agree.

    Observations are compared by the caller (through the returned differences); everything else
    is asserted here, step by step. Returns the per-step mean absolute frame differences, the
    terminal-observation differences per kind of episode end, and the episode summaries.
    """
    sb3 = make_env(game, noop_max=0, vec_env="dummy", **kwargs)
    ale = make_env(game, noop_max=0, vec_env="ale", **kwargs)
    actions = np.random.default_rng(0).integers(0, sb3.action_space.n, (n_steps, sb3.num_envs))
    report: dict[str, list] = {
        key: [] for key in ("obs_diff", "lost_life", "game_over", "time_out", "episodes")
    }
    sb3_obs, ale_obs = sb3.reset(), ale.reset()
    for step, action in enumerate(actions):
        report["obs_diff"].append(np.abs(sb3_obs.astype(int) - ale_obs).mean())
        if step == reset_at:  # a reset in mid-game: after a lost life it only plays on
            sb3_obs, ale_obs = sb3.reset(), ale.reset()
            continue
        sb3_obs, sb3_rewards, sb3_dones, sb3_infos = sb3.step(action)
        ale_obs, ale_rewards, ale_dones, ale_infos = ale.step(action)

        assert ale_obs.shape == sb3_obs.shape and ale_obs.dtype == np.uint8
        np.testing.assert_array_equal(ale_rewards, sb3_rewards)
        np.testing.assert_array_equal(ale_dones, sb3_dones)
        assert ale_rewards.dtype == np.float32 and ale_dones.dtype == bool
        lives, frame_numbers = sb3_lives_and_frames(sb3)
        assert ale.get_attr("lives") == lives
        assert ale.get_attr("episode_frame_number") == frame_numbers
        for sb3_info, ale_info in zip(sb3_infos, ale_infos, strict=True):
            assert ale_info["TimeLimit.truncated"] == sb3_info["TimeLimit.truncated"]
            assert ("episode" in ale_info) == ("episode" in sb3_info)
            if "episode" in sb3_info:
                assert ale_info["episode"]["r"] == sb3_info["episode"]["r"]
                assert ale_info["episode"]["l"] == sb3_info["episode"]["l"]
                report["episodes"].append(ale_info["episode"])
            assert ("terminal_observation" in ale_info) == ("terminal_observation" in sb3_info)
            if "terminal_observation" in sb3_info:
                kind = (
                    "time_out"
                    if sb3_info["TimeLimit.truncated"]
                    else "game_over"
                    if "episode" in sb3_info
                    else "lost_life"
                )
                sb3_terminal = sb3_info["terminal_observation"].astype(int)
                assert ale_info["terminal_observation"].shape == sb3_terminal.shape
                # [older frames, newest frame]: a game over can change only the newest one.
                difference = np.abs(sb3_terminal - ale_info["terminal_observation"])
                report[kind].append((difference[..., :-1].mean(), difference[..., -1].mean()))
    sb3.close()
    ale.close()
    return report


def test_breakout_training_env_plays_exactly_the_sb3_game():
    # Two games, 5 lives each, random play: lost lives, game overs and time-outs all happen.
    report = play_side_by_side("Breakout", 450, reset_at=200, n_envs=2, train=True, max_episode_steps=150)

    assert max(report["obs_diff"]) == 0  # every observation identical
    assert len(report["lost_life"]) >= 10 and len(report["game_over"]) >= 1 and len(report["time_out"]) >= 1
    assert np.max(report["lost_life"]) == 0 and np.max(report["time_out"]) == 0
    older, newest = np.max(report["game_over"], axis=0)
    # A game over on the 3rd or 4th frame of a skip: ALE keeps the frame before (spikeq.envs.vector).
    assert older == 0 and newest < 1.0
    assert all(episode["l"] <= 150 for episode in report["episodes"])


def test_pong_evaluation_env_matches_up_to_max_pooling_of_grayscale_frames():
    # ALE max-pools grayscale frames, SB3 RGB frames: a few pixels of the moving paddles and ball.
    report = play_side_by_side("Pong", 220, n_envs=1, train=False, max_episode_steps=200)

    assert np.mean(report["obs_diff"]) < 0.1 and max(report["obs_diff"]) < 0.5
    assert len(report["time_out"]) == 1 and report["episodes"][0]["l"] == 200
    assert max(report["time_out"][0]) < 0.5


def test_observations_are_uint8_channel_last_stacks_zero_filled_after_reset():
    env = make_env("Pong", n_envs=2, seed=0, frame_stack=3, vec_env="ale")
    assert isinstance(env, AleVecEnv)
    assert env.observation_space.shape == (84, 84, 3) and env.action_space.n == 6

    obs = env.reset()
    assert obs.shape == (2, 84, 84, 3) and obs.dtype == np.uint8
    assert not obs[..., :2].any() and obs[..., 2].any()
    env.close()


def test_no_ops_randomise_the_start_reproducibly_from_the_seed():
    def start_frames(seed: int) -> list[int]:
        env = make_env("Pong", n_envs=4, seed=seed, noop_max=30, vec_env="ale")
        env.reset()
        frames = env.get_attr("episode_frame_number")
        env.close()
        return frames

    frames = start_frames(seed=3)
    # 0..29 no-op frames, then the two FIRE presses of 4 frames each.
    assert all(8 <= frame <= 29 + 8 for frame in frames) and len(set(frames)) > 1
    assert start_frames(seed=3) == frames


def test_evaluation_reads_life_losses_as_sb3_monitor_ends():
    train_env = make_env("Breakout", vec_env="ale", train=True)
    eval_env = make_env("Breakout", vec_env="ale", train=False, noop_max=0)

    assert train_env.env_is_wrapped(Monitor) == [True]
    assert train_env.env_is_wrapped(EpisodicLifeEnv) == [True]
    assert train_env.env_is_wrapped(ClipRewardEnv) == [True]
    assert eval_env.env_is_wrapped(EpisodicLifeEnv) == [False]
    assert eval_env.env_is_wrapped(FireResetEnv) == [True]
    assert eval_env.get_attr("render_mode") == [None]
    assert eval_env.env_method("get_action_meanings") == [["NOOP", "FIRE", "RIGHT", "LEFT"]]
    train_env.close()
    eval_env.close()


def test_sb3_dqn_trains_and_evaluates_on_the_ale_env_as_on_the_sb3_env():
    env = make_env("Breakout", n_envs=2, seed=0, vec_env="ale")
    model = DQN(
        "CnnPolicy",
        env,
        buffer_size=1_000,
        learning_starts=100,
        batch_size=16,
        replay_buffer_class=FrameReplayBuffer,  # its add() checks every stack it is given
        seed=0,
    )
    model.learn(total_timesteps=320)  # 40 rollouts of train_freq=4 steps of the 2 envs

    assert model.num_timesteps == 320 and model.replay_buffer.size() == 160 and model._n_updates > 0
    assert model._episode_num > 0  # life losses ended episodes: terminal observations were stored
    env.close()

    # Scored over full games although a lost life ends an episode: env_is_wrapped(Monitor) is True.
    results = {}
    for vec_env in ("dummy", "ale"):
        eval_env = make_env("Breakout", train=True, noop_max=0, max_episode_steps=300, vec_env=vec_env)
        results[vec_env] = evaluate_model(
            model, eval_env, n_episodes=2, epsilon=0.5, seed=2, progress=False, energy=False
        )
        eval_env.close()
    assert results["ale"].scores == results["dummy"].scores and sum(results["ale"].scores) > 0
    assert results["ale"].episode_lengths == results["dummy"].episode_lengths
    assert min(results["ale"].episode_lengths) > 50  # five lives, not one


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"render_mode": "rgb_array"}, "render_mode.*'rgb_array'"),
        ({"vec_env": "threads"}, r"'ale'.*'threads'"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_env("Pong", **{"vec_env": "ale", **kwargs})
    with pytest.raises(ValueError, match=r"n_envs must be an integer >= 1, got 0"):
        AleVecEnv("Pong", n_envs=0)
    with pytest.raises(ValueError, match=r"'Pongg'.*Did you mean: Pong"):
        AleVecEnv("Pongg")


def test_bad_actions_name_the_value_and_the_allowed_ones():
    env = make_env("Pong", n_envs=2, vec_env="ale")
    env.reset()
    with pytest.raises(ValueError, match=r"0\.\.5.*\[0, 6\]"):
        env.step(np.array([0, 6]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        env.step(np.array([0]))
    env.close()
