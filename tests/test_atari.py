"""The paper's Atari protocol: game names, environments, human-normalised scores."""

import numpy as np
import pytest

from spikeq.envs.ale_games import (
    PAPER_GAMES,
    REFERENCE_SCORES,
    game_short_name,
    human_normalized,
    resolve_game,
)
from spikeq.envs.atari import make_env


def test_short_names_resolve_to_the_no_frameskip_v4_ids_full_ids_pass_through():
    assert resolve_game("Pong") == "PongNoFrameskip-v4"
    assert resolve_game("PongNoFrameskip-v4") == "PongNoFrameskip-v4"
    assert resolve_game("ALE/Pong-v5") == "ALE/Pong-v5"
    assert game_short_name("PongNoFrameskip-v4") == "Pong"
    assert game_short_name("ALE/SpaceInvaders-v5") == "SpaceInvaders"


def test_unknown_game_names_the_value_and_suggests_close_names():
    with pytest.raises(ValueError, match=r"'SpaceInvader'.*Did you mean: SpaceInvaders"):
        resolve_game("SpaceInvader")
    with pytest.raises(ValueError, match="'CartPole-v1'"):
        resolve_game("CartPole-v1")


def test_every_paper_game_is_installed_and_has_reference_scores():
    assert len(PAPER_GAMES) == 17
    assert set(REFERENCE_SCORES) == set(PAPER_GAMES)
    for game in PAPER_GAMES:
        assert resolve_game(game) == f"{game}NoFrameskip-v4"


def test_human_normalized_score_is_0_at_random_and_1_at_human_play():
    assert human_normalized("Pong", -20.7) == pytest.approx(0.0)
    assert human_normalized("Pong", 14.6) == pytest.approx(1.0)
    # A typical DQN Breakout score, given by env id.
    assert human_normalized("BreakoutNoFrameskip-v4", 401.2) == pytest.approx(13.87, abs=0.01)
    assert human_normalized("Qbert", 1000.0) is None  # not one of the paper's games


def test_observations_are_uint8_channel_last_stacks_zero_filled_after_reset():
    train_env = make_env("Pong", n_envs=2)
    eval_env = make_env("Pong", train=False, frame_stack=2)

    obs = train_env.reset()
    assert obs.shape == (2, 84, 84, 4) and obs.dtype == np.uint8
    assert not obs[..., :3].any() and obs[..., 3].any()
    assert eval_env.reset().shape == (1, 84, 84, 2)
    train_env.close()
    eval_env.close()


def test_training_env_ends_the_episode_at_a_lost_life_evaluation_env_plays_on():
    train_env = make_env("Breakout", seed=7, train=True)
    eval_env = make_env("Breakout", seed=7, train=False)
    train_env.reset()
    eval_env.reset()
    actions = np.random.default_rng(0).integers(0, 4, size=(10_000, 1))

    # Same seed, same actions: both play the same game until the first life is lost.
    for action in actions:
        _, _, train_done, train_info = train_env.step(action)
        _, _, eval_done, _ = eval_env.step(action)
        if train_done[0]:
            break
    assert eval_env.envs[0].unwrapped.ale.lives() == 4
    assert not eval_done[0]
    assert "episode" not in train_info[0]  # the game goes on behind the training env
    train_env.close()
    eval_env.close()


def test_training_env_clips_rewards_while_the_monitor_keeps_the_raw_game_score():
    env = make_env("SpaceInvaders", seed=0, train=True)
    env.action_space.seed(0)
    env.reset()
    clipped_rewards, life_losses = [], 0
    while True:
        _, reward, done, info = env.step(np.array([env.action_space.sample()]))
        clipped_rewards.append(reward[0])
        if "episode" in info[0]:
            break
        life_losses += int(done[0])

    assert set(clipped_rewards) <= {-1.0, 0.0, 1.0}
    assert life_losses == 2  # three lives: two life-loss episodes, then game over
    # Every invader is worth 5 to 30 points: the Monitor's full-game score is not clipped.
    assert info[0]["episode"]["r"] >= 5 * sum(clipped_rewards) > 0


def test_time_limit_counts_agent_steps_and_truncates():
    env = make_env("Pong", train=False, max_episode_steps=50)
    env.reset()
    steps = 0
    while True:
        _, _, done, info = env.step(np.array([0]))
        steps += 1
        if done[0]:
            break

    assert info[0]["TimeLimit.truncated"]
    # The two FIRE presses of the reset are agent steps too.
    assert steps == 48 and info[0]["episode"]["l"] == 50
    # 4 emulator frames per agent step, plus the 1..30 no-op frames of the reset.
    assert 4 * 50 < info[0]["episode_frame_number"] <= 4 * 50 + 30
    env.close()


def test_subprocess_workers_play_the_same_game_as_in_process_envs():
    in_process = make_env("Pong", n_envs=2, seed=3)
    workers = make_env("Pong", n_envs=2, seed=3, vec_env="subproc")
    np.testing.assert_array_equal(in_process.reset(), workers.reset())
    for _ in range(5):
        action = np.array([2, 3])
        np.testing.assert_array_equal(in_process.step(action)[0], workers.step(action)[0])
    in_process.close()
    workers.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_envs": 0}, "n_envs.*0"),
        ({"frame_stack": 0}, "frame_stack.*0"),
        ({"max_episode_steps": -1}, "max_episode_steps.*-1"),
        ({"vec_env": "threads"}, r"\['dummy', 'subproc'\].*'threads'"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_env("Pong", **kwargs)
