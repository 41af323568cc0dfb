"""MinAtar games (Young and Tian 2019, arXiv 1903.03176): miniature Atari on 10x10xC binary grids.

MinAtar is the CPU-scale testbed of spikeq: its five games (Asterix, Breakout, Freeway, Seaquest,
SpaceInvaders) keep the mechanics of their Atari counterparts on a 10x10 grid with one binary channel
per object kind, so a DQN learns them in hours on a CPU (Obando-Ceron and Castro, ICML 2021, showed that
conclusions drawn on MinAtar carry over to the ALE). The ``minatar`` package (GPL-3.0) is used as a
dependency; none of its code is copied here.

Every environment built by :func:`make_env` is, from the game up::

    minatar.gym.BaseEnv        MinAtar/<Game>-v1: minimal action set, sticky actions (p = 0.1)
    TimeLimit                  max_episode_steps agent steps (Freeway ends itself after 2,500)
    Monitor                    score and length -> info["episode"]
    ChannelFirstGrid           bool [10, 10, C] -> uint8 [C, 10, 10] in {0, 1}; RGB render x32

There is no frame skip, frame stack, life loss or reward clipping: one agent step is one game frame,
the grid already carries motion trails, and rewards are small integers (the setup of their DQN).
"""

from __future__ import annotations

import difflib
import functools
import re

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.wrappers import TimeLimit
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv

GAMES = ("Asterix", "Breakout", "Freeway", "Seaquest", "SpaceInvaders")
PREFIX = "MinAtar/"
# v1 uses each game's minimal action set, as the ALE ids of the paper's protocol do (NoFrameskip-v4);
# v0 keeps all six actions, as MinAtar's examples/dqn.py does.
DEFAULT_VERSION = "v1"
# Pixels per grid cell in rendered frames: 10 cells -> 320 pixels, a size video encoders accept.
RENDER_SCALE = 32
_ID_PATTERN = re.compile(r"^MinAtar/(?P<name>[A-Za-z]+?)(?:-(?P<version>v[01]))?$", re.IGNORECASE)
VEC_ENV_CLASSES = {"dummy": DummyVecEnv, "subproc": SubprocVecEnv}


def is_minatar(game: str) -> bool:
    """Whether ``game`` names a MinAtar game (``MinAtar/Breakout``, ``minatar/breakout-v0`` ...)."""
    return game.lower().startswith(PREFIX.lower())


@functools.cache
def _register() -> None:
    # The ids exist once minatar has registered them (also in every subprocess worker).
    from minatar import gym as minatar_gym

    minatar_gym.register_envs()


def resolve_game(name: str) -> str:
    """Turn a MinAtar game name into its registered environment id.

    ``"MinAtar/Breakout"`` -> ``"MinAtar/Breakout-v1"``; ``"MinAtar/Breakout-v0"`` is kept (all six
    actions); the game name is matched without regard to case.

    :param name: ``MinAtar/<Game>`` or ``MinAtar/<Game>-v0`` / ``-v1``
    :return: the environment id to pass to ``gymnasium.make``
    :raises ValueError: for an unknown game, naming the closest ones
    """
    match = _ID_PATTERN.match(name)
    games = {game.lower(): game for game in GAMES}
    if match and match["name"].lower() in games:
        version = (match["version"] or DEFAULT_VERSION).lower()
        return f"{PREFIX}{games[match['name'].lower()]}-{version}"
    typed = (match["name"] if match else name.removeprefix(PREFIX)).lower()
    close = difflib.get_close_matches(typed, games, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(PREFIX + games[g] for g in close)}?" if close else ""
    raise ValueError(
        f"Unknown MinAtar game {name!r}: expected MinAtar/<Game> or MinAtar/<Game>-v0|v1 with <Game> one "
        f"of {', '.join(GAMES)}.{hint}"
    )


def game_short_name(env_id: str) -> str:
    """``"MinAtar/Breakout-v1"`` -> ``"MinAtar/Breakout"`` (the name results tables use)."""
    return resolve_game(env_id).rsplit("-", 1)[0]


class ChannelFirstGrid(gym.ObservationWrapper):
    """MinAtar's bool ``[10, 10, C]`` grid as uint8 ``[C, 10, 10]`` with values 0 and 1.

    Channel-first is the layout of PyTorch's convolutions (and of MinAtar's own DQN); uint8 keeps the
    replay buffer small. The space's bounds stay [0, 1], so SB3 does not take it for a 0-255 image and
    feeds it to the networks as floats in {0, 1} (MinAtar's input). Rendering upscales the game's
    ``rgb_array`` frame (floats in [0, 1], one pixel per cell) to uint8 RGB, ``RENDER_SCALE`` pixels per
    cell, so that videos can be written.
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        height, width, channels = env.observation_space.shape
        self.observation_space = spaces.Box(0, 1, (channels, height, width), np.uint8)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.moveaxis(observation, -1, 0), dtype=np.uint8)

    def render(self) -> np.ndarray | None:
        frame = self.env.render()
        if frame is None or self.render_mode != "rgb_array":
            return frame
        frame = np.clip(np.asarray(frame) * 255, 0, 255).astype(np.uint8)
        return frame.repeat(RENDER_SCALE, axis=0).repeat(RENDER_SCALE, axis=1)


def _make_game(env_id: str, max_episode_steps: int, render_mode: str | None = None) -> gym.Env:
    _register()
    env = gym.make(env_id, render_mode=render_mode)
    return TimeLimit(env, max_episode_steps=max_episode_steps)


def make_env(
    game: str,
    *,
    n_envs: int = 1,
    seed: int = 0,
    max_episode_steps: int = 100_000,
    vec_env: str = "dummy",
    render_mode: str | None = None,
) -> VecEnv:
    """Build a MinAtar game as a Stable-Baselines3 ``VecEnv`` of uint8 ``[n_envs, C, 10, 10]`` grids.

    Training and evaluation use the same environment (no life loss, no reward clipping), so there is
    no ``train`` switch; ``info["episode"]`` holds each finished episode's score and length.

    :param game: ``MinAtar/<Game>[-v0|-v1]``, see :func:`resolve_game`
    :param n_envs: number of environments stepped together
    :param seed: environment ``i`` is reset with ``seed + i`` (its game and its sticky actions)
    :param max_episode_steps: time limit in agent steps (one agent step is one game frame)
    :param vec_env: ``"dummy"`` (one process) or ``"subproc"`` (a process each)
    :param render_mode: ``"rgb_array"`` to record videos
    :raises ValueError: for an unknown game or an argument out of range
    """
    if n_envs < 1:
        raise ValueError(f"n_envs must be an integer >= 1, got {n_envs!r}")
    if max_episode_steps < 1:
        raise ValueError(f"max_episode_steps must be an integer >= 1, got {max_episode_steps!r}")
    if vec_env not in VEC_ENV_CLASSES:
        raise ValueError(
            f"vec_env must be one of {', '.join(VEC_ENV_CLASSES)} for MinAtar games, got {vec_env!r}"
        )
    env_id = resolve_game(game)
    return make_vec_env(
        functools.partial(_make_game, env_id, max_episode_steps, render_mode),
        n_envs=n_envs,
        seed=seed,
        wrapper_class=ChannelFirstGrid,
        vec_env_cls=VEC_ENV_CLASSES[vec_env],
    )
