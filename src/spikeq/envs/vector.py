"""The paper's Atari environment on ale-py's native vector env, as a Stable-Baselines3 ``VecEnv``.

:func:`spikeq.envs.atari.make_env` with ``vec_env="ale"`` returns an :class:`AleVecEnv`. It plays the
same protocol as the SB3 wrapper chain documented in :mod:`spikeq.envs.atari`, split in two::

    ale_py AtariVectorEnv (C++ thread)   FRAME_SKIP frames per step, max over the last 2 frames,
      one per game                       grayscale, 84x84 (INTER_AREA), no-ops on reset
    AleVecEnv (Python, per game)         TimeLimit in agent steps, Monitor, EpisodicLifeEnv,
                                         FireResetEnv, ClipRewardEnv, same-step autoreset with
                                         info["terminal_observation"], VecFrameStack (zero fill)

Why not one ``AtariVectorEnv`` for all games with its own life-loss and FIRE options: its
``episodic_life`` restarts the whole game at a lost life and its fire reset presses FIRE for a single
frame, while the protocol (SB3's ``EpisodicLifeEnv`` and ``FireResetEnv``) plays the game on after a
lost life and spends extra agent steps of ONE game on every reset (FIRE, then action 2; a no-op
after a lost life). A vector env steps all its games together, so each game here is a one-game
``AtariVectorEnv``: ``step_async`` sends every game its action (the games run in parallel native
threads) and ``step_wait`` collects them, then replays the SB3 wrappers' reset logic per game.

Differences from the SB3 path, all in the emulator part; everything else is identical
(``tests/test_vector.py`` plays both side by side without no-ops: same rewards, dones, time-outs,
lives, episode frame numbers, full-game scores and lengths; Breakout's frames identical too):

- frames: ALE converts each frame to grayscale and then takes the max of the last two; SB3 takes
  the max of the RGB frames and then converts (the grayscale values themselves are the same).
  Pixels differ where the two frames hold different colours (moving or flickering objects): about
  0.2% of the raw pixels in Pong and MsPacman, none in Breakout, SpaceInvaders or Boxing.
- no-ops: ALE draws 0..noop_max-1 no-op frames after a game reset, from its own RNG; SB3 draws
  1..noop_max from the gym env's RNG (the same number of distinct starts, one frame earlier).
- the newest frame of the terminal observation of a game over on the 3rd or 4th frame of a skip:
  ALE stops before grabbing that frame, SB3 pools it. Nothing bootstraps from a game over.
- ALE's own cap of 108,000 frames per game counts from the end of the no-ops (SB3: from the game
  reset), and its terminal frame is the one of the previous bullet.
- info: no ``"lives"``, ``"frame_number"`` or ``"episode_frame_number"`` keys (gymnasium's
  AtariEnv adds them in the SB3 path); ``get_attr("lives")`` and
  ``get_attr("episode_frame_number")`` give the current values.
- sticky actions (``"ALE/Pong-v5"``) come from a differently seeded RNG.
- no rendering (``render_mode`` None): videos need ``vec_env="dummy"``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import ale_py
import gymnasium as gym
import numpy as np
from ale_py.vector_env import AtariVectorEnv
from gymnasium import spaces
from gymnasium.wrappers import TimeLimit
from stable_baselines3.common.atari_wrappers import (
    ClipRewardEnv,
    EpisodicLifeEnv,
    FireResetEnv,
    MaxAndSkipEnv,
    NoopResetEnv,
    WarpFrame,
)
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn

from spikeq.envs.ale_games import FRAME_SKIP, SCREEN_SIZE, resolve_game

# Same-step autoreset with info["final_obs"] in the native vector env.
MIN_ALE_VERSION = (0, 12)
NOOP, FIRE, FIRE_RESET_SECOND_ACTION = 0, 1, 2  # action indices, as SB3's wrappers use them
# Settings of a registered id that the native vector env takes (frameskip: it always skips
# FRAME_SKIP frames, as make_env's MaxAndSkipEnv does); any other setting must keep its default.
_SPEC_KWARGS = {
    "game",
    "repeat_action_probability",
    "full_action_space",
    "frameskip",
    "max_num_frames_per_episode",
}
_SPEC_DEFAULTS = {"obs_type": "rgb", "mode": None, "difficulty": None}
_ABSENT = object()


def _check_ale_version() -> None:
    version = tuple(int(part) for part in ale_py.__version__.split(".")[:2])
    if version < MIN_ALE_VERSION:
        raise RuntimeError(
            f"AleVecEnv needs ale-py >= {'.'.join(map(str, MIN_ALE_VERSION))} (same-step autoreset of "
            f"AtariVectorEnv), found {ale_py.__version__}; install it or use vec_env='dummy'"
        )


class _AleGame:
    """One game: a one-game ``AtariVectorEnv`` and the SB3 wrappers above it, from the bottom up.

    Method names say which SB3 wrapper they mirror; the reset logic is theirs line by line, so
    that a game over or a lost life inside a reset behaves as in the SB3 path.

    :param rom: ALE ROM name (``"pong"``)
    :param train: ``True``: a lost life ends the episode (EpisodicLifeEnv), rewards are clipped
    :param max_episode_steps: time limit in agent steps, including the FIRE presses of a reset
    :param noop_max: at most this many no-op frames after a game reset (ALE draws 0..noop_max-1)
    :param repeat_action_probability: sticky-action probability of the emulator
    :param full_action_space: all 18 actions instead of the game's minimal set
    :param max_num_frames_per_episode: ALE's own cap on the frames of one game
    """

    # Read by SB3's VecEnv through get_attr; the native vector env does not render.
    render_mode = None

    def __init__(
        self,
        rom: str,
        *,
        train: bool,
        max_episode_steps: int,
        noop_max: int,
        repeat_action_probability: float,
        full_action_space: bool,
        max_num_frames_per_episode: int,
    ) -> None:
        self.ale = AtariVectorEnv(
            rom,
            1,
            num_threads=1,
            autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
            img_height=SCREEN_SIZE,
            img_width=SCREEN_SIZE,
            grayscale=True,
            stack_num=1,
            frameskip=FRAME_SKIP,
            maxpool=True,
            noop_max=noop_max,
            use_fire_reset=False,
            episodic_life=False,
            life_loss_info=False,
            reward_clipping=False,
            max_num_frames_per_episode=max_num_frames_per_episode,
            repeat_action_probability=repeat_action_probability,
            full_action_space=full_action_space,
        )
        names = {action: name for name, action in ale_py.Action.__members__.items()}
        self.action_meanings = [names[action] for action in self.ale.ale.get_action_set()]
        self.episodic_life = train
        self.clip_rewards = train
        self.fire_reset = "FIRE" in self.action_meanings
        self.max_episode_steps = max_episode_steps
        self.t_start = time.time()
        self.lives = 0  # the emulator's lives after the last step or reset
        self.episode_frame_number = 0  # emulator frames since the game reset, no-ops included
        self.elapsed_steps = 0  # TimeLimit
        self.episode_return = 0.0  # Monitor: raw rewards of the current game
        self.episode_length = 0
        self.was_real_done = True  # EpisodicLifeEnv
        self.lives_before = 0  # EpisodicLifeEnv.lives
        # First frame of the game ALE started itself at a game over (same-step autoreset).
        self._restarted_frame: np.ndarray | None = None
        self._action = np.zeros(1, dtype=np.int64)

    def get_action_meanings(self) -> list[str]:
        """Action names, as ``AtariEnv.get_action_meanings`` gives them (``["NOOP", "FIRE", ...]``)."""
        return list(self.action_meanings)

    # --- emulator, TimeLimit, Monitor -------------------------------------------------------------

    def send(self, action: int) -> None:
        """Start one agent step in the native thread; :meth:`recv_monitored` collects it."""
        self._action[0] = action
        self.ale.send(self._action)

    def recv_monitored(self) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """The step :meth:`send` started, through TimeLimit and Monitor: (frame, raw reward,
        terminated, truncated, info with ``"episode"`` when the game ended)."""
        obs, rewards, terminations, truncations, ale_info = self.ale.recv()  # obs [1, 1, 84, 84]
        reward, terminated, truncated = float(rewards[0]), bool(terminations[0]), bool(truncations[0])
        frame = obs[0, 0]
        if terminated or truncated:
            self._restarted_frame = frame.copy()
            frame = ale_info["final_obs"][0, 0]
        self.lives = int(ale_info["lives"][0])
        self.episode_frame_number = int(ale_info["episode_frame_number"][0])
        self.elapsed_steps += 1
        truncated = truncated or self.elapsed_steps >= self.max_episode_steps
        self.episode_return += reward
        self.episode_length += 1
        info: dict[str, Any] = {}
        if terminated or truncated:
            info["episode"] = {
                "r": round(self.episode_return, 6),
                "l": self.episode_length,
                "t": round(time.time() - self.t_start, 6),
            }
        return frame, reward, terminated, truncated, info

    def step_monitored(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """One agent step of this game alone (a reset's extra steps)."""
        self.send(action)
        return self.recv_monitored()

    def reset_monitored(self, seed: int | None) -> np.ndarray:
        """Monitor, TimeLimit and emulator reset; a game ALE already restarted is kept unless seeded."""
        if self._restarted_frame is not None and seed is None:
            frame = self._restarted_frame
        else:
            obs, ale_info = self.ale.reset(seed=seed)
            frame = obs[0, 0]
            self.lives = int(ale_info["lives"][0])
            self.episode_frame_number = int(ale_info["episode_frame_number"][0])
        self._restarted_frame = None
        self.elapsed_steps = 0
        self.episode_return = 0.0
        self.episode_length = 0
        return frame

    # --- EpisodicLifeEnv ---------------------------------------------------------------------------

    def end_at_lost_life(self, terminated: bool, truncated: bool) -> bool:
        """EpisodicLifeEnv.step after the step: a lost life (lives > 0 left) terminates."""
        if not self.episodic_life:
            return terminated
        self.was_real_done = terminated or truncated
        if 0 < self.lives < self.lives_before:
            terminated = True
        self.lives_before = self.lives
        return terminated

    def step_episodic(self, action: int) -> tuple[np.ndarray, bool, bool]:
        """EpisodicLifeEnv.step of one game alone: (frame, terminated, truncated)."""
        frame, _, terminated, truncated, _ = self.step_monitored(action)
        return frame, self.end_at_lost_life(terminated, truncated), truncated

    def reset_episodic(self, seed: int | None) -> np.ndarray:
        """EpisodicLifeEnv.reset: after a lost life a no-op step, the game goes on."""
        if not self.episodic_life or self.was_real_done:
            frame = self.reset_monitored(seed)
        else:
            frame, _, terminated, truncated, _ = self.step_monitored(NOOP)
            if terminated or truncated:
                frame = self.reset_monitored(seed)
        self.lives_before = self.lives
        return frame

    # --- FireResetEnv ------------------------------------------------------------------------------

    def reset(self, seed: int | None = None) -> np.ndarray:
        """FireResetEnv.reset, the reset SB3's vector env calls: the first frame [84, 84]."""
        frame = self.reset_episodic(seed)
        if not self.fire_reset:
            return frame
        _, terminated, truncated = self.step_episodic(FIRE)
        if terminated or truncated:
            self.reset_episodic(seed)
        # As FireResetEnv: the frame of the second press, even when that press ended the episode.
        frame, terminated, truncated = self.step_episodic(FIRE_RESET_SECOND_ACTION)
        if terminated or truncated:
            self.reset_episodic(seed)
        return frame


class AleVecEnv(VecEnv):
    """The paper's Atari protocol on ale-py's native ``AtariVectorEnv``, with SB3's VecEnv semantics.

    Observations are uint8 ``[n_envs, 84, 84, frame_stack]`` (channel-last, older frames zero after
    a reset), as ``make_env(vec_env="dummy")`` gives them. ``step_wait`` returns
    ``(obs, rewards, dones, infos)``; a done game is already reset (``obs`` is the first observation
    of its next episode) and its info holds

    - ``"terminal_observation"``: the last stacked observation of the ended episode,
    - ``"TimeLimit.truncated"``: ``True`` when the time limit, not the game, ended it (every info),
    - ``"episode"``: ``{"r": raw score, "l": agent steps, "t": seconds since creation}`` of the full
      game, only when the game ended (game over or time limit), not at a lost life; as SB3's
      ``Monitor`` it counts the reset's FIRE presses and the no-op step after a lost life.

    Rewards are float32, clipped to their sign in the training env. See the module docstring for
    the few differences from the SB3 path.

    :param game: short game name (``"Pong"``) or ALE id, see :func:`spikeq.envs.ale_games.resolve_game`; the
        id's sticky-action probability, action set and frame cap are used (``"ALE/Pong-v5"``: sticky)
    :param n_envs: number of games stepped together, each in its own native thread
    :param train: ``True``: an episode ends at a lost life and rewards are clipped to their sign;
        ``False`` (evaluation): the full game with raw rewards
    :param max_episode_steps: time limit in agent steps (``FRAME_SKIP`` frames each), counting the
        FIRE presses of the reset
    :param frame_stack: number of consecutive frames in one observation
    :param noop_max: ALE plays 0..noop_max-1 no-op frames after a game reset; 0 disables them
    :raises ValueError: for an unknown game, an argument out of range, or an id with settings the
        native vector env cannot play (a game mode or difficulty)
    """

    def __init__(
        self,
        game: str,
        n_envs: int = 1,
        *,
        train: bool = True,
        max_episode_steps: int = 18_000,
        frame_stack: int = 4,
        noop_max: int = 30,
    ) -> None:
        _check_ale_version()
        for name, value, minimum in (
            ("n_envs", n_envs, 1),
            ("max_episode_steps", max_episode_steps, 1),
            ("frame_stack", frame_stack, 1),
            ("noop_max", noop_max, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        self.env_id = resolve_game(game)
        spec_kwargs = gym.spec(self.env_id).kwargs
        unsupported = {
            key: value
            for key, value in spec_kwargs.items()
            if key not in _SPEC_KWARGS and value != _SPEC_DEFAULTS.get(key, _ABSENT)
        }
        if unsupported:
            raise ValueError(
                f"{self.env_id} sets {unsupported}, which ale-py's vector env cannot play; it takes "
                f"only {sorted(_SPEC_KWARGS)}: use vec_env='dummy' for this id"
            )
        self.train = train
        self.frame_stack = frame_stack
        self.games = [
            _AleGame(
                spec_kwargs["game"],
                train=train,
                max_episode_steps=max_episode_steps,
                noop_max=noop_max,
                repeat_action_probability=float(spec_kwargs.get("repeat_action_probability", 0.0)),
                full_action_space=bool(spec_kwargs.get("full_action_space", False)),
                max_num_frames_per_episode=int(spec_kwargs.get("max_num_frames_per_episode") or 108_000),
            )
            for _ in range(n_envs)
        ]
        self.noop_max = noop_max
        observation_space = spaces.Box(0, 255, (SCREEN_SIZE, SCREEN_SIZE, frame_stack), np.uint8)
        action_space = spaces.Discrete(len(self.games[0].action_meanings))
        self._stacked_obs = np.zeros((n_envs, *observation_space.shape), dtype=np.uint8)
        self._waiting = False  # between step_async and step_wait
        super().__init__(n_envs, observation_space, action_space)

    def reset(self) -> VecEnvObs:
        """Reset every game (with the seeds of :meth:`seed`, used once) and return ``[n, 84, 84, k]``.

        As in the SB3 path, a training env that last lost a life (not the game) plays on from there
        with a no-op step instead of restarting the game.
        """
        if self._waiting:  # a step in flight is finished and dropped, as SB3 cancels it
            for game in self.games:
                game.recv_monitored()
            self._waiting = False
        self._stacked_obs = np.zeros_like(self._stacked_obs)
        for i, game in enumerate(self.games):
            self._stacked_obs[i, :, :, -1] = game.reset(self._seeds[i])
            self.reset_infos[i] = {}
        self._reset_seeds()
        self._reset_options()
        return self._stacked_obs.copy()

    def step_async(self, actions: np.ndarray) -> None:
        """Send every game its action; the native threads step them while the caller goes on.

        :param actions: one action index per game, shape ``[n_envs]``
        :raises ValueError: for a wrong shape or an action outside ``0..n_actions-1``
        """
        actions = np.asarray(actions)
        if actions.shape not in ((self.num_envs,), (self.num_envs, 1)):
            raise ValueError(f"actions must have shape ({self.num_envs},), got {actions.shape}")
        actions = actions.reshape(self.num_envs)
        n_actions = int(self.action_space.n)
        if not np.issubdtype(actions.dtype, np.integer) or ((actions < 0) | (actions >= n_actions)).any():
            raise ValueError(
                f"actions must be integers in 0..{n_actions - 1} ({self.env_id}), got {actions.tolist()}"
            )
        for game, action in zip(self.games, actions.tolist(), strict=True):
            game.send(action)
        self._waiting = True

    def step_wait(self) -> VecEnvStepReturn:
        """Collect the step: ``(obs [n, 84, 84, k] uint8, rewards [n] float32, dones [n] bool, infos)``."""
        if not self._waiting:
            raise RuntimeError("step_wait() called without step_async(actions)")
        self._waiting = False
        n = self.num_envs
        frames = np.empty((n, SCREEN_SIZE, SCREEN_SIZE), dtype=np.uint8)
        rewards = np.zeros(n, dtype=np.float32)
        dones = np.zeros(n, dtype=bool)
        infos: list[dict[str, Any]] = []
        first_frames: dict[int, np.ndarray] = {}
        for i, game in enumerate(self.games):
            frames[i], reward, terminated, truncated, info = game.recv_monitored()
            terminated = game.end_at_lost_life(terminated, truncated)
            rewards[i] = np.sign(reward) if game.clip_rewards else reward
            dones[i] = terminated or truncated
            info["TimeLimit.truncated"] = truncated and not terminated
            if dones[i]:
                first_frames[i] = game.reset()
            infos.append(info)
        # As VecFrameStack: shift in the new frame; a done env's stack with its last frame is the
        # terminal observation, its next stack is zeros and the first frame of the new episode.
        stacked_obs = np.empty_like(self._stacked_obs)
        stacked_obs[..., :-1] = self._stacked_obs[..., 1:]
        stacked_obs[..., -1] = frames
        for i, frame in first_frames.items():
            infos[i]["terminal_observation"] = stacked_obs[i].copy()
            stacked_obs[i] = 0
            stacked_obs[i, :, :, -1] = frame
        self._stacked_obs = stacked_obs
        return stacked_obs.copy(), rewards, dones, infos

    def close(self) -> None:
        """Stop the native threads (the vector envs are destroyed with their last reference)."""
        for game in self.games:
            game.ale.close()
        self.games = []

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """Attribute of each game (``render_mode``, ``lives``, ``episode_frame_number``, ``ale``, ...).

        :raises AttributeError: when the games have no such attribute
        """
        return [getattr(self.games[i], attr_name) for i in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        """Set an attribute on each game (``max_episode_steps`` takes effect at once)."""
        for i in self._get_indices(indices):
            setattr(self.games[i], attr_name, value)

    def env_method(
        self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs
    ) -> list[Any]:
        """Call a method of each game, e.g. ``env_method("get_action_meanings")``."""
        return [
            getattr(self.games[i], method_name)(*method_args, **method_kwargs)
            for i in self._get_indices(indices)
        ]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        """Whether each game behaves as if wrapped in ``wrapper_class``: the SB3 wrappers it emulates.

        ``env_is_wrapped(Monitor)`` is ``True``: ``info["episode"]`` marks the end of the full game,
        so a done without it is a lost life (as :func:`spikeq.analysis.evaluate.evaluate_model` reads it).
        """
        emulated: list[type[gym.Wrapper]] = [Monitor, TimeLimit, MaxAndSkipEnv, WarpFrame]
        if self.noop_max > 0:
            emulated.append(NoopResetEnv)
        if self.train:
            emulated += [EpisodicLifeEnv, ClipRewardEnv]
        if self.games and self.games[0].fire_reset:
            emulated.append(FireResetEnv)
        answer = any(issubclass(wrapper, wrapper_class) for wrapper in emulated)
        return [answer for _ in self._get_indices(indices)]

    def get_images(self) -> Sequence[np.ndarray | None]:
        """Not available: ale-py's vector env gives no RGB frames (use ``vec_env="dummy"`` for videos)."""
        raise NotImplementedError("AleVecEnv does not render; use make_env(vec_env='dummy') to record videos")
