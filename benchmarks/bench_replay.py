"""Replay memory for Atari: SB3's ReplayBuffer (plain, optimize_memory_usage) vs FrameReplayBuffer.

Run:  .venv/bin/python benchmarks/bench_replay.py [--transitions 20000] [--game Pong]

Plays ``--transitions`` random-action transitions of the training env once (unstacked frames),
then fills each buffer, sized to exactly that many transitions, with the same transitions stacked
by SB3's own ``StackedObservations`` (what ``VecFrameStack`` uses) and transposed to channel-first,
as SB3's DQN stores them. Per buffer it reports

- array bytes: ``.nbytes`` of the numpy arrays holding the buffer's data,
- RSS growth: resident memory of this process after filling minus before creating the buffer,
- sample time: mean wall time of ``sample(batch_size)``.

Memory per 100k and per 1M transitions is extrapolated LINEARLY from the filled buffer (both
buffers grow linearly with capacity; the frame buffer's terminal-frame store grows with the
number of episode ends, here at the rate random play produces them).
"""

import argparse
import copy
import dataclasses
import gc
import time
from collections.abc import Callable

import numpy as np
import psutil
from gymnasium import spaces
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.vec_env.stacked_observations import StackedObservations

from spikeq.atari import make_env
from spikeq.replay import FrameReplayBuffer

FRAME_SHAPE = (1, 84, 84)  # one channel-first grayscale frame


@dataclasses.dataclass
class Recording:
    """Unstacked frames of a random-action run, enough to replay its stacked transitions."""

    frames: np.ndarray  # [T + 1, n_envs, 1, 84, 84], frames[t + 1] is what step t returned
    actions: np.ndarray  # [T, n_envs]
    rewards: np.ndarray  # [T, n_envs]
    dones: np.ndarray  # [T, n_envs]
    truncated: np.ndarray  # [T, n_envs]
    terminal_frames: dict[tuple[int, int], np.ndarray]  # (step, env) -> [1, 84, 84]
    action_space: spaces.Space


def record(game: str, num_transitions: int, n_envs: int, seed: int) -> Recording:
    """Play random actions in the training env without frame stacking."""
    env = make_env(game, n_envs=n_envs, seed=seed, frame_stack=1)
    env.action_space.seed(seed)
    num_steps = num_transitions // n_envs
    frames = np.zeros((num_steps + 1, n_envs, *FRAME_SHAPE), dtype=np.uint8)
    actions = np.zeros((num_steps, n_envs), dtype=np.int64)
    rewards = np.zeros((num_steps, n_envs), dtype=np.float32)
    dones = np.zeros((num_steps, n_envs), dtype=bool)
    truncated = np.zeros((num_steps, n_envs), dtype=bool)
    terminal_frames = {}
    frames[0] = np.moveaxis(env.reset(), -1, 1)
    for step in range(num_steps):
        actions[step] = [env.action_space.sample() for _ in range(n_envs)]
        obs, rewards[step], dones[step], infos = env.step(actions[step])
        frames[step + 1] = np.moveaxis(obs, -1, 1)
        for i, info in enumerate(infos):
            truncated[step, i] = info.get("TimeLimit.truncated", False)
            if dones[step, i]:
                terminal_frames[step, i] = np.moveaxis(info["terminal_observation"], -1, 0)
    env.close()
    return Recording(
        frames, actions, rewards, dones, truncated, terminal_frames, env.action_space
    )


def fill(buffer: ReplayBuffer, recording: Recording, frame_stack: int) -> None:
    """Add the recorded transitions with 4-frame stacks, the way SB3's DQN adds them."""
    n_envs = recording.frames.shape[1]
    stacker = StackedObservations(
        n_envs, frame_stack, spaces.Box(0, 255, FRAME_SHAPE, np.uint8), channels_order="first"
    )
    obs = stacker.reset(recording.frames[0]).copy()
    for step in range(len(recording.actions)):
        infos = [
            {"TimeLimit.truncated": bool(recording.truncated[step, i])}
            | (
                {"terminal_observation": recording.terminal_frames[step, i]}
                if recording.dones[step, i]
                else {}
            )
            for i in range(n_envs)
        ]
        new_obs, infos = stacker.update(recording.frames[step + 1], recording.dones[step], infos)
        next_obs = copy.deepcopy(new_obs)
        for i, info in enumerate(infos):
            if recording.dones[step, i]:
                next_obs[i] = info["terminal_observation"]
        buffer.add(
            obs,
            next_obs,
            recording.actions[step],
            recording.rewards[step],
            recording.dones[step],
            infos,
        )
        obs = new_obs.copy()


def array_bytes(buffer: ReplayBuffer) -> int:
    """Bytes of the numpy arrays that hold the buffer's data."""
    if isinstance(buffer, FrameReplayBuffer):
        return buffer.nbytes
    return sum(value.nbytes for value in vars(buffer).values() if isinstance(value, np.ndarray))


def measure(
    make_buffer: Callable[[], ReplayBuffer],
    recording: Recording,
    frame_stack: int,
    batch_size: int,
    num_samples: int,
) -> dict[str, float]:
    """Fill a fresh buffer and return its array bytes, RSS growth and mean sample time."""
    gc.collect()
    process = psutil.Process()
    rss_before = process.memory_info().rss
    buffer = make_buffer()
    fill(buffer, recording, frame_stack)
    rss_growth = process.memory_info().rss - rss_before
    np.random.seed(0)
    buffer.sample(batch_size)  # first call outside the timing
    start = time.perf_counter()
    for _ in range(num_samples):
        buffer.sample(batch_size)
    sample_us = (time.perf_counter() - start) / num_samples * 1e6
    result = {"array_bytes": array_bytes(buffer), "rss_bytes": rss_growth, "sample_us": sample_us}
    del buffer
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--game", default="Pong", help="Atari game played with random actions")
    parser.add_argument(
        "--transitions", type=int, default=20_000, help="transitions filled into each buffer"
    )
    parser.add_argument("--n-envs", type=int, default=1, help="parallel envs of the recording")
    parser.add_argument("--frame-stack", type=int, default=4, help="frames per observation")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of sample()")
    parser.add_argument("--samples", type=int, default=2_000, help="sample() calls timed")
    parser.add_argument("--seed", type=int, default=0, help="seed of env and actions")
    args = parser.parse_args()

    start = time.perf_counter()
    recording = record(args.game, args.transitions, args.n_envs, args.seed)
    num_transitions = recording.actions.size
    print(
        f"Recorded {num_transitions} transitions of {args.game} (random actions, {args.n_envs} "
        f"env(s), {int(recording.dones.sum())} episode ends) in "
        f"{time.perf_counter() - start:.0f} s"
    )

    stacked_space = spaces.Box(0, 255, (args.frame_stack, 84, 84), np.uint8)
    buffer_kwargs = {
        "buffer_size": num_transitions,
        "observation_space": stacked_space,
        "action_space": recording.action_space,
        "device": "cpu",
        "n_envs": args.n_envs,
    }
    buffers = {
        "SB3 ReplayBuffer": lambda: ReplayBuffer(**buffer_kwargs),
        "SB3 optimize_memory_usage": lambda: ReplayBuffer(
            **buffer_kwargs, optimize_memory_usage=True, handle_timeout_termination=False
        ),
        "FrameReplayBuffer": lambda: FrameReplayBuffer(**buffer_kwargs),
    }
    results = {
        name: measure(make, recording, args.frame_stack, args.batch_size, args.samples)
        for name, make in buffers.items()
    }

    per_100k = 100_000 / num_transitions
    print(
        f"\nFilled with {num_transitions} transitions; per-100k and per-1M columns are that "
        "measurement extrapolated linearly.\n"
    )
    header = (
        f"{'buffer':<28}{'arrays B/tr':>12}{'RSS B/tr':>10}{'arrays/100k':>13}"
        f"{'arrays/1M':>11}{'RSS/1M':>9}{'sample(' + str(args.batch_size) + ')':>13}"
    )
    print(header)
    print("-" * len(header))
    for name, result in results.items():
        array_per_transition = result["array_bytes"] / num_transitions
        rss_per_transition = result["rss_bytes"] / num_transitions
        print(
            f"{name:<28}{array_per_transition:>12.0f}{rss_per_transition:>10.0f}"
            f"{result['array_bytes'] * per_100k / 1e9:>11.2f}GB"
            f"{result['array_bytes'] * 10 * per_100k / 1e9:>9.1f}GB"
            f"{result['rss_bytes'] * 10 * per_100k / 1e9:>7.1f}GB"
            f"{result['sample_us']:>11.0f}us"
        )

    frame = results["FrameReplayBuffer"]
    print("\nFrameReplayBuffer relative to")
    for name in ("SB3 ReplayBuffer", "SB3 optimize_memory_usage"):
        print(
            f"  {name:<26} arrays x{frame['array_bytes'] / results[name]['array_bytes']:.3f}, "
            f"RSS x{frame['rss_bytes'] / results[name]['rss_bytes']:.3f}, "
            f"sample time x{frame['sample_us'] / results[name]['sample_us']:.2f}"
        )


if __name__ == "__main__":
    main()
