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

import difflib
import functools
import re

import ale_py
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

FRAME_SKIP = 4
SCREEN_SIZE = 84

PAPER_GAMES: tuple[str, ...] = (
    "Atlantis",
    "BeamRider",
    "Boxing",
    "Breakout",
    "CrazyClimber",
    "Gopher",
    "Jamesbond",
    "Kangaroo",
    "Krull",
    "NameThisGame",
    "Pong",
    "RoadRunner",
    "SpaceInvaders",
    "StarGunner",
    "Tennis",
    "Tutankham",
    "VideoPinball",
)

# (random, human) score per game, from DeepMind's DQN Zoo `dqn_zoo/atari_data.py`, which takes them
# from Mnih et al. 2015 / Badia et al. 2020 (episodes start with 1..30 no-ops, 108,000-frame cap).
REFERENCE_SCORES: dict[str, tuple[float, float]] = {
    "Atlantis": (12850.0, 29028.1),
    "BeamRider": (363.9, 16926.5),
    "Boxing": (0.1, 12.1),
    "Breakout": (1.7, 30.5),
    "CrazyClimber": (10780.5, 35829.4),
    "Gopher": (257.6, 2412.5),
    "Jamesbond": (29.0, 302.8),
    "Kangaroo": (52.0, 3035.0),
    "Krull": (1598.0, 2665.5),
    "NameThisGame": (2292.3, 8049.0),
    "Pong": (-20.7, 14.6),
    "RoadRunner": (11.5, 7845.0),
    "SpaceInvaders": (148.0, 1668.7),
    "StarGunner": (664.0, 10250.0),
    "Tennis": (-23.8, -8.3),
    "Tutankham": (11.4, 167.6),
    "VideoPinball": (16256.9, 17667.9),
}

VEC_ENV_CLASSES: dict[str, type[DummyVecEnv] | type[SubprocVecEnv]] = {
    "dummy": DummyVecEnv,
    "subproc": SubprocVecEnv,
}

_ALE_ENTRY_POINT = "ale_py.env:AtariEnv"
# "PongNoFrameskip-v4", "Pong-v0", "ALE/Pong-v5" -> "Pong"
_ENV_ID_PATTERN = re.compile(r"^(?:ALE/)?(?P<name>[A-Za-z0-9]+?)(?:NoFrameskip)?-v\d+$")


def _register_ale() -> None:
    # ALE ids exist only once ale_py has registered them, also in every subprocess worker.
    gym.register_envs(ale_py)


@functools.cache
def _ale_game_ids() -> dict[str, str]:
    """Short game name -> the env id :func:`resolve_game` picks for it."""
    _register_ale()
    ale_ids = [env_id for env_id, spec in gym.registry.items() if spec.entry_point == _ALE_ENTRY_POINT]
    games: dict[str, str] = {}
    for env_id in sorted(ale_ids):
        name = _parse_short_name(env_id)
        if name is None:
            continue
        # The paper's id form where it exists; games added only in v5 resolve to their v5 id.
        no_frameskip = f"{name}NoFrameskip-v4"
        games[name] = no_frameskip if no_frameskip in gym.registry else f"ALE/{name}-v5"
    return games


def _parse_short_name(env_id: str) -> str | None:
    match = _ENV_ID_PATTERN.match(env_id)
    return match["name"] if match else None


def resolve_game(name: str) -> str:
    """Turn a game name into a registered ALE environment id.

    A short name gives the paper's id form (``"Pong"`` -> ``"PongNoFrameskip-v4"``); a registered
    ALE id (``"PongNoFrameskip-v4"``, ``"ALE/Pong-v5"``) is returned unchanged.

    :param name: short game name such as ``"Pong"`` or a registered ALE environment id
    :return: the environment id to pass to ``gymnasium.make``
    :raises ValueError: if ``name`` is neither; the message lists the closest game names
    """
    games = _ale_game_ids()
    if name in games:
        return games[name]
    if name in gym.registry and gym.spec(name).entry_point == _ALE_ENTRY_POINT:
        return name
    lowercase = {game.lower(): game for game in games}
    close = difflib.get_close_matches((_parse_short_name(name) or name).lower(), lowercase, n=5, cutoff=0.6)
    hint = (
        f"Did you mean: {', '.join(lowercase[game] for game in close)}?"
        if close
        else f"The paper's games are: {', '.join(PAPER_GAMES)}."
    )
    raise ValueError(
        f"Unknown Atari game {name!r}: expected one of the {len(games)} ALE game names (e.g. "
        f"'Pong') or a registered ALE id (e.g. 'PongNoFrameskip-v4', 'ALE/Pong-v5'). {hint}"
    )


def game_short_name(env_id: str) -> str:
    """The game name of an ALE environment id: ``"PongNoFrameskip-v4"`` -> ``"Pong"``.

    :param env_id: an ALE id (``"PongNoFrameskip-v4"``, ``"ALE/Pong-v5"``) or a short game name
    :return: the short game name, as used in :data:`PAPER_GAMES` and :data:`REFERENCE_SCORES`
    :raises ValueError: if ``env_id`` does not name an ALE game
    """
    name = env_id if env_id in _ale_game_ids() else _parse_short_name(env_id)
    if name not in _ale_game_ids():
        raise ValueError(
            f"{env_id!r} is not an ALE game id: expected a form such as 'PongNoFrameskip-v4', "
            "'Pong-v4', 'ALE/Pong-v5' or a short name such as 'Pong'"
        )
    return name


def human_normalized(game: str, score: float) -> float | None:
    """Human-normalised score ``(score - random) / (human - random)``.

    :param game: short game name (``"Pong"``) or its environment id (``"PongNoFrameskip-v4"``)
    :param score: raw (unclipped) game score of the agent
    :return: 0 at random play, 1 at human level; ``None`` for a game without reference scores
    """
    reference = REFERENCE_SCORES.get(game) or REFERENCE_SCORES.get(_parse_short_name(game) or "")
    if reference is None:
        return None
    random_score, human_score = reference
    return (score - random_score) / (human_score - random_score)


def _make_frame_skipped_env(
    env_id: str, noop_max: int, max_episode_steps: int, render_mode: str | None = None
) -> gym.Env:
    """ALE env -> no-op reset -> max-and-skip -> time limit in agent steps (the Monitor goes on top)."""
    _register_ale()
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
        ``"ale"`` (ale-py's native vector env behind :class:`spikeq.vector.AleVecEnv`: the same
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
        # Imported here: spikeq.vector imports this module.
        from spikeq.vector import AleVecEnv

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
