"""MinAtar: does the DSQN fire on the grids at the start of learning, and what does a training step cost?

(a) For each game and each init, a DSQN (the minatar preset's network: T = 8, LIF, rate readout) learns
    from 64 random steps (one update: the first training batch calibrates ``init="firing"``), then every
    spiking layer's firing rate (fraction of its neuron-steps that spike) is measured on the first 300
    observations of the replay buffer.
(b) Agent steps per second of the minatar preset's training loop (an update every step, batch 32) for
    the ANN DQN and the DSQN, measured over ``--steps`` steps after the replay start, one torch thread.

    .venv/bin/python benchmarks/bench_minatar.py [--steps 2000] [--games Breakout ...]
"""

from __future__ import annotations

import argparse
import time

import torch

from spikeq.envs import games
from spikeq.envs.minatar import GAMES
from spikeq.experiment.config import resolve
from spikeq.experiment.train import build_model


def firing_rates(game: str, init: str, seed: int = 0) -> dict[str, float]:
    """Per-layer firing rates of a fresh minatar-preset DSQN on the game's grids, after one update."""
    env = games.make_env(f"MinAtar/{game}", seed=seed)
    config = resolve("minatar", "dsqn", game=f"MinAtar/{game}", init=init, learning_starts=64, seed=seed)
    model = build_model(config, env, "cpu")
    model.learn(65)  # 64 random steps, then the first update
    obs = torch.as_tensor(model.replay_buffer.observations[:300, 0])
    q_net = model.policy.q_net
    with torch.no_grad(), q_net.record() as activity:
        q_net(obs)
    env.close()
    return {a.name: float(a.spikes.mean()) for a in activity if a.spikes is not None}


def steps_per_second(game: str, model_name: str, steps: int, seed: int = 0) -> float:
    """Agent steps/s of the minatar preset's training loop after its replay start."""
    env = games.make_env(f"MinAtar/{game}", seed=seed)
    config = resolve("minatar", model_name, game=f"MinAtar/{game}", learning_starts=1_000, seed=seed)
    model = build_model(config, env, "cpu")
    model.learn(1_200)  # replay start, then a few updates to warm up
    start = time.perf_counter()
    model.learn(steps, reset_num_timesteps=False)
    env.close()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--games", nargs="+", default=list(GAMES))
    parser.add_argument("--steps", type=int, default=2_000, help="timed agent steps for (b)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    print("(a) firing rate per layer after the first update (300 observations), T = 8")
    print(f"{'game':<14} {'init':<8} {'conv1':>7} {'fc1':>7}")
    for game in args.games:
        for init in ("default", "firing"):
            rates = firing_rates(game, init)
            print(f"{game:<14} {init:<8} {rates['conv1']:>7.4f} {rates['fc1']:>7.4f}")

    print(f"\n(b) training agent steps/s (minatar preset, 1 thread, {args.steps} steps after replay start)")
    game = args.games[0]
    rates = {model: steps_per_second(game, model, args.steps) for model in ("dqn", "dsqn")}
    for model, rate in rates.items():
        print(f"{game:<14} {model:<5} {rate:7.1f} steps/s   1M steps: {1e6 / rate / 3600:.1f} h")
    print(f"DSQN / DQN time per step: {rates['dqn'] / rates['dsqn']:.2f}x")


if __name__ == "__main__":
    main()
