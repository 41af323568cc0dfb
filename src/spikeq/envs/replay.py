"""A replay buffer for stacked Atari frames that stores every frame once.

SB3's ``ReplayBuffer`` keeps the full ``frame_stack``-frame observation and next observation of
every transition: 2 x 4 x 84 x 84 bytes = 56 kB, i.e. 56 GB for the paper's 1,000,000
transitions (28 GB with ``optimize_memory_usage``). Consecutive stacks share all but one frame, so
:class:`FrameReplayBuffer` keeps one 84x84 frame per transition (7 kB, 7 GB for 1M) and rebuilds the
stacks when sampling, as Dopamine's circular buffer does. It samples exactly what SB3's
``ReplayBuffer`` (``optimize_memory_usage=False``) samples for the same transitions and the same
numpy random state.
"""

from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import BaseBuffer, ReplayBuffer
from stable_baselines3.common.type_aliases import ReplayBufferSamples
from stable_baselines3.common.vec_env import VecNormalize

# Capacity of the store of terminal frames the first time one is needed; it doubles when full.
_INITIAL_TERMINAL_CAPACITY = 64


class FrameReplayBuffer(ReplayBuffer):
    """Replay buffer for frame-stacked image observations, a drop-in ``replay_buffer_class``.

    Layout, with ``N = buffer_size // n_envs`` rows (one transition per row and env, as in SB3),
    ``k`` frames per stack and ``t`` the agent step (number of ``add`` calls) of a row::

        _frames          [N + k + 1, n_envs, H, W]  ring: the newest frame of the obs added at
                                                    step t is in slot t % (N + k); the last slot
                                                    is never written and stays zero
        _history         [N, n_envs]                real frames before the newest one, 0..k-1
        _terminal_id     [N, n_envs]                index of next_obs's newest frame in the
                                                    terminal store, -1 when it is ring slot t + 1
        _terminal_frames [capacity, H, W]           terminal store: grows by doubling, reuses the
                                                    entries of overwritten rows
        actions, rewards, dones, timeouts           as in SB3's ReplayBuffer

    The observation of row ``t`` is ``k - 1 - history`` zero frames (the zero fill SB3's
    ``VecFrameStack`` puts in after a reset) followed by the ring frames of steps
    ``t - history .. t``. Its next observation is the same stack moved on by one frame; the newest
    frame is ring slot ``t + 1``, except for a ``done`` transition, whose terminal frame is kept in
    the terminal store (ring slot ``t + 1`` gets the first frame of the next episode). There are
    no ``observations`` / ``next_observations`` arrays.

    Wrap-around: the ring holds ``k`` frames more than there are rows, so the ``k - 1`` older frames
    of the oldest row and the next frame of the newest row are never overwritten. Every row SB3
    would sample is therefore complete, and sampling is SB3's own: the same random draws pick the
    same (row, env) pairs as in SB3's ``ReplayBuffer``.

    ``add`` checks that the buffer rebuilds the observation and next observation it is given
    exactly and raises ``ValueError`` otherwise, e.g. for observations that are not a frame stack.
    An env reset without ``done`` (a second ``learn()`` call) is recognised by its zero-filled
    stack; the next frame of the row before it then moves to the terminal store.

    The stack axis is the smallest axis of the 3-D observation space, as SB3 decides for images
    (``is_image_space_channels_first``): ``(k, 84, 84)`` after SB3's ``VecTransposeImage`` (what DQN
    passes), or ``(84, 84, k)`` straight from ``VecFrameStack``.

    :param buffer_size: maximum number of transitions, over all envs
    :param observation_space: 3-D ``Box`` of stacked frames, channel-first or channel-last
    :param action_space: action space
    :param device: PyTorch device of the sampled tensors
    :param n_envs: number of parallel environments
    :param optimize_memory_usage: must be ``False``; SB3's memory optimisation (storing obs and
        next_obs in one array) does not apply, this buffer already stores each frame once
    :param handle_timeout_termination: as in SB3: a ``done`` caused by a time limit
        (``info["TimeLimit.truncated"]``) is sampled as not done, so its value is bootstrapped
    """

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: th.device | str = "auto",
        n_envs: int = 1,
        optimize_memory_usage: bool = False,
        handle_timeout_termination: bool = True,
    ) -> None:
        if optimize_memory_usage:
            raise ValueError(
                "FrameReplayBuffer does not support optimize_memory_usage=True (it already stores "
                "each frame once); allowed: optimize_memory_usage=False"
            )
        if not isinstance(observation_space, spaces.Box) or len(observation_space.shape) != 3:
            raise ValueError(
                f"FrameReplayBuffer needs a 3-D Box observation space of stacked frames, "
                f"(k, H, W) or (H, W, k); got {observation_space}"
            )
        stack_axis = int(np.argmin(observation_space.shape))
        if stack_axis == 1:
            raise ValueError(
                f"Cannot tell the frame-stack axis of observation shape {observation_space.shape}: "
                "the smallest axis must be the first (k, H, W) or the last (H, W, k)"
            )
        # BaseBuffer, not ReplayBuffer.__init__: that would allocate the two full arrays of
        # stacked observations this class exists to avoid.
        BaseBuffer.__init__(self, buffer_size, observation_space, action_space, device, n_envs=n_envs)
        self.buffer_size = max(buffer_size // n_envs, 1)
        self.optimize_memory_usage = False
        self.handle_timeout_termination = handle_timeout_termination
        self.stack_axis = stack_axis
        self.frame_stack = observation_space.shape[stack_axis]
        frame_shape = tuple(size for axis, size in enumerate(observation_space.shape) if axis != stack_axis)
        obs_dtype = observation_space.dtype
        # Slot `_ring_size` is never written: all zeros, it stands for the zero fill of a stack.
        self._ring_size = self.buffer_size + self.frame_stack
        self._frames = np.zeros((self._ring_size + 1, n_envs, *frame_shape), dtype=obs_dtype)
        self._history = np.zeros((self.buffer_size, n_envs), dtype=np.uint8)
        self._terminal_id = np.full((self.buffer_size, n_envs), -1, dtype=np.int32)
        self._terminal_frames = np.zeros((0, *frame_shape), dtype=obs_dtype)
        self._terminal_free: list[int] = []
        self._terminal_used = 0
        # History of the next observation each env should continue with; -1 after a done.
        self._next_history = np.full(n_envs, -1, dtype=np.int64)
        self._num_added = 0

        self.actions = np.zeros(
            (self.buffer_size, n_envs, self.action_dim),
            dtype=self._maybe_cast_dtype(action_space.dtype),
        )
        self.rewards = np.zeros((self.buffer_size, n_envs), dtype=np.float32)
        self.dones = np.zeros((self.buffer_size, n_envs), dtype=np.float32)
        self.timeouts = np.zeros((self.buffer_size, n_envs), dtype=np.float32)

    @property
    def nbytes(self) -> int:
        """Bytes allocated by the buffer's arrays: frames, terminal frames, per-row metadata."""
        arrays = (
            self._frames,
            self._terminal_frames,
            self._history,
            self._terminal_id,
            self.actions,
            self.rewards,
            self.dones,
            self.timeouts,
        )
        return sum(array.nbytes for array in arrays)

    def reset(self) -> None:
        """Empty the buffer (the arrays stay allocated)."""
        super().reset()
        self._terminal_id.fill(-1)
        self._terminal_free = []
        self._terminal_used = 0
        self._next_history.fill(-1)
        self._num_added = 0

    def add(
        self,
        obs: np.ndarray,
        next_obs: np.ndarray,
        action: np.ndarray,
        reward: np.ndarray,
        done: np.ndarray,
        infos: list[dict[str, Any]],
    ) -> None:
        """Store one transition per env, as SB3's ``ReplayBuffer.add``.

        :param obs: stacked observations ``[n_envs, *obs_shape]``
        :param next_obs: next stacked observations ``[n_envs, *obs_shape]``; for a done env its
            terminal observation, as SB3's off-policy algorithms pass it
        :param action: actions ``[n_envs, action_dim]`` or ``[n_envs]``
        :param reward: rewards ``[n_envs]``
        :param done: episode ends ``[n_envs]``, time-outs included
        :param infos: one info dict per env; ``"TimeLimit.truncated"`` marks a time-out
        :raises ValueError: if the buffer could not rebuild ``obs`` or ``next_obs`` exactly
        """
        obs_frames = self._to_frames(obs)  # [n_envs, k, H, W]
        next_frames = self._to_frames(next_obs)  # [n_envs, k, H, W]
        done = np.asarray(done, dtype=bool).reshape(self.n_envs)
        step = self._num_added
        slot, next_slot = step % self._ring_size, (step + 1) % self._ring_size
        histories, restarted = self._check_stacks(step, obs_frames, next_frames)

        # A restarted env overwrites ring slot `step`, which holds the newest frame of the
        # previous row's next_obs: move that frame to the terminal store.
        previous_row = (self.pos - 1) % self.buffer_size
        if previous_row != self.pos:
            for env in np.flatnonzero(restarted):
                self._terminal_id[previous_row, env] = self._store_terminal(self._frames[slot, env])
        overwritten_ids = self._terminal_id[self.pos]
        self._terminal_free.extend(overwritten_ids[overwritten_ids >= 0].tolist())
        self._terminal_id[self.pos] = -1

        self._frames[slot] = obs_frames[:, -1]
        self._frames[next_slot, ~done] = next_frames[~done, -1]
        for env in np.flatnonzero(done):
            self._terminal_id[self.pos, env] = self._store_terminal(next_frames[env, -1])
        self._history[self.pos] = histories
        self._next_history = np.where(done, -1, np.minimum(histories + 1, self.frame_stack - 1))

        self.actions[self.pos] = np.array(action).reshape((self.n_envs, self.action_dim))
        self.rewards[self.pos] = np.array(reward)
        self.dones[self.pos] = done
        if self.handle_timeout_termination:
            self.timeouts[self.pos] = [info.get("TimeLimit.truncated", False) for info in infos]

        self._num_added += 1
        self.pos += 1
        if self.pos == self.buffer_size:
            self.full = True
            self.pos = 0

    def _get_samples(self, batch_inds: np.ndarray, env: VecNormalize | None = None) -> ReplayBufferSamples:
        # Same draw as SB3's ReplayBuffer._get_samples, so both sample the same transitions.
        env_indices = np.random.randint(0, high=self.n_envs, size=(len(batch_inds),))
        steps = self._num_added - self.pos + batch_inds
        if self.full:
            steps -= self.buffer_size * (batch_inds >= self.pos)
        histories = self._history[batch_inds, env_indices].astype(np.int64)
        obs = self._stacks(steps, env_indices, histories)
        next_obs = self._stacks(
            steps + 1,
            env_indices,
            np.minimum(histories + 1, self.frame_stack - 1),
            self._terminal_id[batch_inds, env_indices],
        )
        # A time-out is not a terminal state: its next value is bootstrapped.
        not_timeout = 1 - self.timeouts[batch_inds, env_indices]
        data = (
            self._normalize_obs(self._from_frames(obs), env),
            self.actions[batch_inds, env_indices, :],
            self._normalize_obs(self._from_frames(next_obs), env),
            (self.dones[batch_inds, env_indices] * not_timeout).reshape(-1, 1),
            self._normalize_reward(self.rewards[batch_inds, env_indices].reshape(-1, 1), env),
        )
        return ReplayBufferSamples(*tuple(map(self.to_torch, data)))

    def _to_frames(self, obs: np.ndarray) -> np.ndarray:
        """``[n_envs, *obs_shape]`` -> ``[n_envs, k, H, W]``."""
        obs = np.asarray(obs).reshape((self.n_envs, *self.obs_shape))
        return np.moveaxis(obs, 1 + self.stack_axis, 1)

    def _from_frames(self, stacks: np.ndarray) -> np.ndarray:
        """``[B, k, H, W]`` -> ``[B, *obs_shape]``."""
        return np.moveaxis(stacks, 1, 1 + self.stack_axis)

    def _stacks(
        self,
        newest_steps: np.ndarray,
        env_indices: np.ndarray,
        histories: np.ndarray,
        terminal_ids: np.ndarray | None = None,
    ) -> np.ndarray:
        """Rebuild frame stacks ``[B, k, H, W]`` from the ring.

        :param newest_steps: agent step of the newest frame of each stack ``[B]``
        :param env_indices: env of each stack ``[B]``
        :param histories: number of real frames before the newest one ``[B]``; older ones are zero
        :param terminal_ids: id in the terminal store of the newest frame, -1 for the ring ``[B]``
        """
        ages = np.arange(self.frame_stack - 1, -1, -1)  # [k] steps before the newest frame
        slots = (newest_steps[:, None] - ages) % self._ring_size  # [B, k]
        slots = np.where(ages > histories[:, None], self._ring_size, slots)
        stacks = self._frames[slots, env_indices[:, None]]  # [B, k, H, W]
        if terminal_ids is not None:
            from_store = terminal_ids >= 0
            stacks[from_store, -1] = self._terminal_frames[terminal_ids[from_store]]
        return stacks

    def _check_stacks(
        self, step: int, obs_frames: np.ndarray, next_frames: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """History of each env's obs and whether the env restarted without a ``done``.

        Nothing is written before every env has passed, so a rejected ``add`` changes nothing.
        """
        envs = np.arange(self.n_envs)
        # The stack each env shows if it goes on with its episode.
        continued = self._stacks(np.full(self.n_envs, step), envs, np.maximum(self._next_history, 0))
        histories = np.zeros(self.n_envs, dtype=np.int64)
        restarted = np.zeros(self.n_envs, dtype=bool)
        for env in envs:
            expected = self._next_history[env]
            if expected >= 0 and np.array_equal(obs_frames[env], continued[env]):
                histories[env] = expected
            elif not obs_frames[env, :-1].any():
                # The zero-filled first stack of an episode; a restart if one was not expected.
                restarted[env] = expected >= 0
            else:
                raise ValueError(
                    f"obs of env {env} at step {step} is neither the previous next_obs nor the "
                    "zero-filled first frame stack of an episode; FrameReplayBuffer needs the "
                    "frame stacks of VecFrameStack, added in the order they were played"
                )
            if not np.array_equal(next_frames[env, :-1], obs_frames[env, 1:]):
                raise ValueError(
                    f"next_obs of env {env} at step {step} is not obs moved on by one frame; "
                    "FrameReplayBuffer needs the frame stacks of VecFrameStack"
                )
        return histories, restarted

    def _store_terminal(self, frame: np.ndarray) -> int:
        """Put a frame in the terminal store and return its id."""
        if self._terminal_free:
            terminal_id = self._terminal_free.pop()
        else:
            if self._terminal_used == len(self._terminal_frames):
                grown = np.zeros(
                    (max(2 * self._terminal_used, _INITIAL_TERMINAL_CAPACITY), *frame.shape),
                    dtype=self._terminal_frames.dtype,
                )
                grown[: self._terminal_used] = self._terminal_frames
                self._terminal_frames = grown
            terminal_id = self._terminal_used
            self._terminal_used += 1
        self._terminal_frames[terminal_id] = frame
        return terminal_id
