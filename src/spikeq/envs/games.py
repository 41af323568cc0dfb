"""One entry point for the two game families: Atari (ALE, the paper's) and MinAtar (the CPU testbed).

``--game Pong`` or ``--game PongNoFrameskip-v4`` is an ALE game (:mod:`spikeq.envs.atari`);
``--game MinAtar/Breakout`` is a MinAtar game (:mod:`spikeq.envs.minatar`). The training pipeline, the
evaluator and the CLI call these functions and never ask which family they hold.
"""

from __future__ import annotations

from stable_baselines3.common.vec_env import VecEnv

from spikeq.envs import ale_games, atari, minatar


def resolve_game(name: str) -> str:
    """The registered environment id of a game name (``"Pong"`` -> ``"PongNoFrameskip-v4"``,
    ``"MinAtar/Breakout"`` -> ``"MinAtar/Breakout-v1"``).

    :raises ValueError: for an unknown name, with the closest names of its family
    """
    if minatar.is_minatar(name):
        return minatar.resolve_game(name)
    return ale_games.resolve_game(name)


def game_short_name(name: str) -> str:
    """The name results are filed under: ``"Pong"``, ``"MinAtar/Breakout"``."""
    if minatar.is_minatar(name):
        return minatar.game_short_name(name)
    return ale_games.game_short_name(ale_games.resolve_game(name))


def file_safe_name(name: str) -> str:
    """The short name as it appears in file and run-directory names: ``"MinAtar-Breakout"``."""
    return game_short_name(name).replace("/", "-")


def is_minatar(name: str) -> bool:
    """Whether ``name`` is a MinAtar game."""
    return minatar.is_minatar(name)


def make_env(
    game: str,
    *,
    n_envs: int = 1,
    seed: int = 0,
    train: bool = True,
    max_episode_steps: int = 18_000,
    vec_env: str = "dummy",
    noop_max: int = 30,
    render_mode: str | None = None,
) -> VecEnv:
    """The game's environment as an SB3 ``VecEnv``: :func:`spikeq.envs.atari.make_env` (the paper's
    protocol; ``train`` selects life loss and reward clipping) or :func:`spikeq.envs.minatar.make_env`
    (one environment for training and evaluation; ``train`` and ``noop_max`` do not apply).

    :param game: a game name, see :func:`resolve_game`
    :param n_envs: number of environments stepped together
    :param seed: environment ``i`` is reset with ``seed + i``
    :param train: Atari: the training env (life loss ends an episode, rewards clipped) or the full game
    :param max_episode_steps: time limit in agent steps
    :param vec_env: ``"dummy"``, ``"subproc"``, or (Atari only) ``"ale"``
    :param noop_max: Atari: at most this many no-op frames after a reset
    :param render_mode: ``"rgb_array"`` to record videos
    """
    if minatar.is_minatar(game):
        return minatar.make_env(
            game,
            n_envs=n_envs,
            seed=seed,
            max_episode_steps=max_episode_steps,
            vec_env=vec_env,
            render_mode=render_mode,
        )
    return atari.make_env(
        game,
        n_envs=n_envs,
        seed=seed,
        train=train,
        max_episode_steps=max_episode_steps,
        vec_env=vec_env,
        noop_max=noop_max,
        render_mode=render_mode,
    )
