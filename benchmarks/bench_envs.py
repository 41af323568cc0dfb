"""Environment stepping: SB3's DummyVecEnv and SubprocVecEnv against ale-py's native vector env.

Run:  .venv/bin/python benchmarks/bench_envs.py [--game Pong] [--n-envs 1 4 8] [--steps 1000] [--rounds 3]

Every contender is ``spikeq.envs.atari.make_env`` (the paper's training env: no-op reset, max-and-skip 4,
time limit, Monitor, lost life ends the episode, FIRE reset, 84x84 grayscale, clipped rewards,
4-frame stack) with one ``vec_env`` choice:

- dummy: SB3's ``DummyVecEnv``, all games stepped one after the other in this process;
- subproc: SB3's ``SubprocVecEnv``, one worker process per game;
- ale: :class:`spikeq.envs.vector.AleVecEnv`, one native ale-py ``AtariVectorEnv`` thread per game.

Reported: agent steps per second (all envs together: ``n_envs`` per ``step``) with uniformly random
actions, autoresets included, the median over ``--rounds`` rounds of ``--steps`` vector steps after
a warm-up; contenders are interleaved round by round so that a busy machine slows all alike. The
ratio column is ale's rate over the SB3 contender's. Building the envs (subprocess start-up) is not
timed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
from stable_baselines3.common.vec_env import VecEnv

from spikeq.envs.atari import make_env

VEC_ENVS = ("dummy", "subproc", "ale")
WARMUP_STEPS = 50


def steps_per_second(env: VecEnv, actions: np.ndarray) -> float:
    """Agent steps per second of ``env`` playing ``actions`` ``[T, n_envs]``."""
    start = time.perf_counter()
    for action in actions:
        env.step(action)
    return actions.size / (time.perf_counter() - start)


def bench(game: str, n_envs: int, steps: int, rounds: int, seed: int) -> dict[str, float]:
    """Median agent steps per second of each vec env at ``n_envs`` games."""
    envs = {name: make_env(game, n_envs=n_envs, seed=seed, vec_env=name) for name in VEC_ENVS}
    rng = np.random.default_rng(seed)
    n_actions = int(envs["dummy"].action_space.n)
    rates: dict[str, list[float]] = {name: [] for name in VEC_ENVS}
    try:
        for env in envs.values():
            env.reset()
            steps_per_second(env, rng.integers(0, n_actions, (WARMUP_STEPS, n_envs)))
        for _ in range(rounds):
            actions = rng.integers(0, n_actions, (steps, n_envs))
            for name, env in envs.items():
                rates[name].append(steps_per_second(env, actions))
    finally:
        for env in envs.values():
            env.close()
    return {name: statistics.median(values) for name, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--game", default="Pong", help="game name or ALE id (default: Pong)")
    parser.add_argument("--n-envs", type=int, nargs="+", default=[1, 4, 8], help="numbers of games")
    parser.add_argument("--steps", type=int, default=1000, help="vector steps per round (default: 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per contender, median reported")
    parser.add_argument("--seed", type=int, default=0, help="seed of the envs and the random actions")
    args = parser.parse_args()

    print(
        f"{args.game}, training env, random actions; {args.steps} vector steps x {args.rounds} rounds "
        f"(median); {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    )
    header = f"{'n_envs':>6} | " + " | ".join(f"{name:>9}" for name in VEC_ENVS)
    print(f"{header} | {'ale/dummy':>9} | {'ale/subproc':>11}   (agent steps/s)")
    for n_envs in args.n_envs:
        rates = bench(args.game, n_envs, args.steps, args.rounds, args.seed)
        columns = " | ".join(f"{rates[name]:9.0f}" for name in VEC_ENVS)
        print(
            f"{n_envs:>6} | {columns} | {rates['ale'] / rates['dummy']:9.2f} | "
            f"{rates['ale'] / rates['subproc']:11.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
