"""ALE game names and the constants of the paper's Atari protocol, apart from the environments built
on them (:mod:`spikeq.envs.atari`, :mod:`spikeq.envs.vector`): the short names (``"Pong"``) and the
registered ids they resolve to, the paper's games, and the random and human reference scores.
"""

import difflib
import functools
import re

import ale_py
import gymnasium as gym

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

_ALE_ENTRY_POINT = "ale_py.env:AtariEnv"
# "PongNoFrameskip-v4", "Pong-v0", "ALE/Pong-v5" -> "Pong"
_ENV_ID_PATTERN = re.compile(r"^(?:ALE/)?(?P<name>[A-Za-z0-9]+?)(?:NoFrameskip)?-v\d+$")


def register_ale() -> None:
    # ALE ids exist only once ale_py has registered them, also in every subprocess worker.
    gym.register_envs(ale_py)


@functools.cache
def _ale_game_ids() -> dict[str, str]:
    """Short game name -> the env id :func:`resolve_game` picks for it."""
    register_ale()
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
