"""Replay memory for Atari: SB3's ReplayBuffer (plain, optimize_memory_usage) vs FrameReplayBuffer.

Run:  .venv/bin/python benchmarks/bench_replay.py [--transitions 20000] [--game Pong]

Plays ``--transitions`` random-action transitions of the training env once (unstacked frames),
then fills each buffer, sized to exactly that many transitions, with the same transitions, stacked
by SB3's own ``StackedObservations`` (what ``VecFrameStack`` uses) channel-first, as SB3's DQN
stores them. Per buffer it reports

- array bytes: ``.nbytes`` of the numpy arrays holding the buffer's data,
- RSS growth: resident memory after filling minus before creating the buffer, measured in a
  forked child per buffer, less the growth of a child that fills a buffer storing nothing,
- add time: mean wall time of one ``add`` (one step of all envs; the frame buffer's includes
  checking that it can rebuild the stacks it is given),
- sample time: wall time of one ``sample(batch_size)`` (numpy gather and copy into torch tensors
  with ``--torch-threads`` threads), the median of the means of 10 rounds.

Memory per 100k and per 1M transitions is extrapolated LINEARLY from the filled buffer (both
buffers grow linearly with capacity; the frame buffer's terminal-frame store grows with the
number of episode ends, here at the rate random play produces them).
"""

import argparse
import copy
import dataclasses
import multiprocessing
import time
from collections.abc import Callable

import numpy as np
import psutil
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.vec_env.stacked_observations import StackedObservations

from spikeq.envs.atari import make_env
from spikeq.envs.replay import FrameReplayBuffer

FRAME_SHAPE = (1, 84, 84)  # one channel-first grayscale frame
# sample() is timed in this many rounds and the median round reported: robust to a busy machine.
TIMING_ROUNDS = 10


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
    return Recording(frames, actions, rewards, dones, truncated, terminal_frames, env.action_space)


def fill(buffer: ReplayBuffer, recording: Recording, frame_stack: int) -> float:
    """Add the recorded transitions as ``frame_stack``-frame stacks, the way SB3's DQN adds them.

    :return: seconds spent inside ``buffer.add``
    """
    n_envs = recording.frames.shape[1]
    stacker = StackedObservations(
        n_envs, frame_stack, spaces.Box(0, 255, FRAME_SHAPE, np.uint8), channels_order="first"
    )
    obs = stacker.reset(recording.frames[0]).copy()
    add_seconds = 0.0
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
        start = time.perf_counter()
        buffer.add(
            obs,
            next_obs,
            recording.actions[step],
            recording.rewards[step],
            recording.dones[step],
            infos,
        )
        add_seconds += time.perf_counter() - start
        obs = new_obs.copy()
    return add_seconds


class DiscardingBuffer(ReplayBuffer):
    """Stores nothing: its RSS growth is the cost of measuring (fork copy-on-write, frame stacker)."""

    def __init__(self) -> None:
        pass

    def add(self, *args, **kwargs) -> None:
        pass


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
    """Fill a fresh buffer; return its array bytes, RSS growth, mean add and sample times.

    :param num_samples: number of timed ``sample`` calls; 0 skips sampling
    """
    process = psutil.Process()
    rss_before = process.memory_info().rss
    buffer = make_buffer()
    add_us = fill(buffer, recording, frame_stack) / len(recording.actions) * 1e6
    rss_growth = process.memory_info().rss - rss_before
    sample_us = float("nan")
    if num_samples > 0:
        np.random.seed(0)
        buffer.sample(batch_size)  # first call outside the timing
        round_means = []
        for _ in range(TIMING_ROUNDS):
            start = time.perf_counter()
            for _ in range(num_samples // TIMING_ROUNDS):
                buffer.sample(batch_size)
            round_means.append((time.perf_counter() - start) / (num_samples // TIMING_ROUNDS))
        sample_us = float(np.median(round_means)) * 1e6
    return {
        "array_bytes": array_bytes(buffer),
        "rss_bytes": rss_growth,
        "add_us": add_us,
        "sample_us": sample_us,
    }


def measure_in_child(
    make_buffer: Callable[[], ReplayBuffer],
    recording: Recording,
    frame_stack: int,
    batch_size: int,
    num_samples: int,
) -> dict[str, float]:
    """:func:`measure` in a forked child process, which shares the recording.

    Each buffer then starts from the same memory state; in one process, the allocator can hand
    a freed buffer's pages to the next one, and its RSS growth would read too small.
    """
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(
        target=lambda: results.put(measure(make_buffer, recording, frame_stack, batch_size, num_samples))
    )
    child.start()
    result = results.get()
    child.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--game", default="Pong", help="Atari game played with random actions")
    parser.add_argument("--transitions", type=int, default=20_000, help="transitions filled into each buffer")
    parser.add_argument("--n-envs", type=int, default=1, help="parallel envs of the recording")
    parser.add_argument("--frame-stack", type=int, default=4, help="frames per observation")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of sample()")
    parser.add_argument("--samples", type=int, default=2_000, help="sample() calls timed")
    parser.add_argument("--seed", type=int, default=0, help="seed of env and actions")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads; sample() copies into torch tensors, and on a busy machine "
        "several threads make that copy slow and noisy for every buffer alike",
    )
    args = parser.parse_args()
    th.set_num_threads(args.torch_threads)

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
    overhead_bytes = measure_in_child(DiscardingBuffer, recording, args.frame_stack, 0, 0)["rss_bytes"]
    results = {
        name: measure_in_child(make, recording, args.frame_stack, args.batch_size, args.samples)
        for name, make in buffers.items()
    }
    for result in results.values():
        result["rss_bytes"] -= overhead_bytes

    per_100k = 100_000 / num_transitions
    print(
        f"\nFilled with {num_transitions} transitions; per-100k and per-1M columns are that "
        "measurement extrapolated linearly.\nRSS: growth of the measuring process minus the "
        f"{overhead_bytes / 1e6:.1f} MB it grows by when filling a buffer that stores nothing.\n"
    )
    header = (
        f"{'buffer':<28}{'arrays B/tr':>12}{'RSS B/tr':>10}{'arrays/100k':>13}"
        f"{'arrays/1M':>11}{'RSS/1M':>9}{'add()':>9}{'sample(' + str(args.batch_size) + ')':>13}"
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
            f"{result['add_us']:>7.0f}us"
            f"{result['sample_us']:>11.0f}us"
        )

    frame = results["FrameReplayBuffer"]
    print("\nFrameReplayBuffer relative to")
    for name in ("SB3 ReplayBuffer", "SB3 optimize_memory_usage"):
        print(
            f"  {name:<26} arrays x{frame['array_bytes'] / results[name]['array_bytes']:.3f}, "
            f"RSS x{frame['rss_bytes'] / results[name]['rss_bytes']:.3f}, "
            f"add time x{frame['add_us'] / results[name]['add_us']:.2f}, "
            f"sample time x{frame['sample_us'] / results[name]['sample_us']:.2f}"
        )


if __name__ == "__main__":
    main()
