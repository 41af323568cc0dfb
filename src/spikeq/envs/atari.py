"""Atari environments for the paper's protocol (README, "The paper's protocol") and human-normalised scores.

One agent step is ``FRAME_SKIP`` emulator frames. Every environment built by :func:`make_env` is,
from the emulator up::

    ALE <Game>NoFrameskip-v4        one emulator frame per step, no sticky actions
    NoopResetEnv                    1..noop_max random no-op frames on reset
    MaxAndSkipEnv                   repeat the action FRAME_SKIP times, max over the last 2 frames
    TimeLimit                       max_episode_steps AGENT steps, sets truncated
    Monitor                         raw full-game score and length -> info["episode"]
    EpisodicLifeEnv                 (training only) a lost life terminates the episode
    FireResetEnv                    press FIRE on reset, for games that have it
    WarpFrame                       84x84 grayscale
    ClipRewardEnv                   (training only) reward -> sign(reward)
    VecFrameStack                   frame_stack frames on the last axis

The wrappers are Stable-Baselines3's own (``stable_baselines3.common.atari_wrappers``); they are
assembled here rather than through ``AtariWrapper`` because the time limit has to sit inside that
chain: above the frame skip so that it counts agent steps, below the life-loss wrapper so that a
time-out really resets the game, and below the ``Monitor`` so that the Monitor closes the episode.
"""

import functools

import gymnasium as gym
from gymnasium.wrappers import TimeLimit
from stable_baselines3.common.atari_wrappers import (
    ClipRewardEnv,
    EpisodicLifeEnv,
    FireResetEnv,
    MaxAndSkipEnv,
    NoopResetEnv,
    WarpFrame,
)
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv, VecFrameStack

from spikeq.envs.ale_games import FRAME_SKIP, SCREEN_SIZE, register_ale, resolve_game
from spikeq.envs.vector import AleVecEnv

VEC_ENV_CLASSES: dict[str, type[DummyVecEnv] | type[SubprocVecEnv]] = {
    "dummy": DummyVecEnv,
    "subproc": SubprocVecEnv,
}


def _make_frame_skipped_env(
    env_id: str, noop_max: int, max_episode_steps: int, render_mode: str | None = None
) -> gym.Env:
    """ALE env -> no-op reset -> max-and-skip -> time limit in agent steps (the Monitor goes on top)."""
    register_ale()
    kwargs = {}
    # Ids with a built-in frame skip (Pong-v4, ALE/Pong-v5) would skip FRAME_SKIP times more.
    if gym.spec(env_id).kwargs.get("frameskip", 1) != 1:
        kwargs["frameskip"] = 1
    env = gym.make(env_id, render_mode=render_mode, **kwargs)
    if noop_max > 0:
        env = NoopResetEnv(env, noop_max=noop_max)
    env = MaxAndSkipEnv(env, skip=FRAME_SKIP)
    return TimeLimit(env, max_episode_steps=max_episode_steps)


def _protocol_wrappers(env: gym.Env, train: bool) -> gym.Env:
    """Wrappers above the Monitor, so that the Monitor keeps the raw full-game score."""
    if train:
        env = EpisodicLifeEnv(env)
    if "FIRE" in env.unwrapped.get_action_meanings():
        env = FireResetEnv(env)
    env = WarpFrame(env, width=SCREEN_SIZE, height=SCREEN_SIZE)
    if train:
        env = ClipRewardEnv(env)
    return env


def make_env(
    game: str,
    *,
    n_envs: int = 1,
    seed: int = 0,
    train: bool = True,
    max_episode_steps: int = 18_000,
    frame_stack: int = 4,
    noop_max: int = 30,
    vec_env: str = "dummy",
    render_mode: str | None = None,
) -> VecEnv:
    """Build the paper's Atari environment as a Stable-Baselines3 ``VecEnv``.

    Observations are uint8 ``[n_envs, 84, 84, frame_stack]`` (channel-last, as SB3's Atari stack
    produces; SB3's DQN transposes them to channel-first itself). After a reset the older frames
    of the stack are zeros. ``info["episode"]`` (from the Monitor) always holds the raw score and
    the length in agent steps of the full game, also in the training env. ALE's own cap of
    108,000 frames (27,000 agent steps) still applies above ``max_episode_steps``.

    :param game: short game name (``"Pong"``) or ALE id, see :func:`resolve_game`; an id with a
        built-in frame skip (``"ALE/Pong-v5"``) gets frameskip=1 so that max-and-skip is the only
        skip, and keeps its other settings (v5: sticky actions)
    :param n_envs: number of environments stepped together
    :param seed: seed of environment ``i`` is ``seed + i`` (its reset and its action space)
    :param train: ``True``: an episode ends at a lost life and rewards are clipped to their sign;
        ``False`` (evaluation): the full game with raw rewards
    :param max_episode_steps: time limit in agent steps (``FRAME_SKIP`` frames each); the FIRE
        presses on reset count towards it
    :param frame_stack: number of consecutive frames in one observation
    :param noop_max: at most this many no-op frames after a reset (at least 1); 0 disables them
    :param vec_env: ``"dummy"`` (all envs in this process), ``"subproc"`` (one process each;
        a script that uses it needs the ``if __name__ == "__main__":`` guard of multiprocessing) or
        ``"ale"`` (ale-py's native vector env behind :class:`spikeq.envs.vector.AleVecEnv`: the same
        protocol, faster; frames differ slightly and no-ops are 0..noop_max-1, see that module)
    :param render_mode: ``"rgb_array"`` to record videos (``evaluate_model(video_path=...)``); not
        with ``vec_env="ale"``
    :return: the vectorised, frame-stacked environment
    :raises ValueError: for an unknown game or an argument out of range
    """
    if n_envs < 1:
        raise ValueError(f"n_envs must be an integer >= 1, got {n_envs!r}")
    if frame_stack < 1:
        raise ValueError(f"frame_stack must be an integer >= 1, got {frame_stack!r}")
    if max_episode_steps < 1:
        raise ValueError(f"max_episode_steps must be an integer >= 1, got {max_episode_steps!r}")
    if noop_max < 0:
        raise ValueError(f"noop_max must be an integer >= 0, got {noop_max!r}")
    if vec_env not in {*VEC_ENV_CLASSES, "ale"}:
        raise ValueError(f"vec_env must be one of {sorted(VEC_ENV_CLASSES)} or 'ale', got {vec_env!r}")
    if vec_env == "ale":
        if render_mode is not None:
            raise ValueError(
                f"render_mode must be None with vec_env='ale' (ale-py's vector env does not render), "
                f"got {render_mode!r}; use vec_env='dummy' to record videos"
            )
        ale_envs = AleVecEnv(
            game,
            n_envs=n_envs,
            train=train,
            max_episode_steps=max_episode_steps,
            frame_stack=frame_stack,
            noop_max=noop_max,
        )
        # As make_vec_env: env i is reset with seed + i, the action space is seeded with seed.
        ale_envs.seed(seed)
        ale_envs.action_space.seed(seed)
        return ale_envs
    env_id = resolve_game(game)
    envs = make_vec_env(
        functools.partial(
            _make_frame_skipped_env,
            env_id,
            noop_max=noop_max,
            max_episode_steps=max_episode_steps,
            render_mode=render_mode,
        ),
        n_envs=n_envs,
        seed=seed,
        wrapper_class=_protocol_wrappers,
        wrapper_kwargs={"train": train},
        vec_env_cls=VEC_ENV_CLASSES[vec_env],
    )
    return VecFrameStack(envs, n_stack=frame_stack, channels_order="last")
