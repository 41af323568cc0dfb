"""How many updates until every spiking layer fires: PyTorch's initialisation against init="firing".

For each game and init: a DSQN (T = 8 unless told) in SB3's DQN with the paper's optimiser (Adam,
learning rate 1e-4, batch 32, Huber loss, gamma 0.99, target network fixed: the paper copies it every
10,000 agent steps, more than the run's updates cover) trains on replay batches of random play in the
paper's training env, and every spiking layer's firing rate (fraction of its neuron-steps) is measured
on held-out frames of another random episode. Prints one table row per checkpoint, the first update
after which every layer fires in at least 1% of its neuron-steps, and whether Q differs across frames.

    nice -n 10 .venv/bin/python benchmarks/bench_init.py                 # Pong and Breakout, 1,000 updates
    nice -n 10 .venv/bin/python benchmarks/bench_init.py --games Pong --updates 250 --num-steps 4
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from stable_baselines3 import DQN

import spikeq  # noqa: F401  (registers SpikingPolicy)
from spikeq.envs import atari
from spikeq.envs.replay import FrameReplayBuffer

CHECKPOINTS = (1, 100, 250, 500, 1000)
FIRES = 0.01  # a layer "fires" when at least this fraction of its neuron-steps spike


def held_out_frames(game: str, n_frames: int, seed: int) -> np.ndarray:
    """``n_frames`` observations of random play, every 4th step (frames that differ)."""
    env = atari.make_env(game, n_envs=1, seed=seed)
    env.action_space.seed(seed)
    env.reset()
    frames = []
    while len(frames) < n_frames:
        for _ in range(4):
            obs, _, _, _ = env.step(np.array([env.action_space.sample()]))
        frames.append(obs[0])
    env.close()
    return np.stack(frames)


def rates_and_q_spread(model: DQN, frames: np.ndarray) -> tuple[dict[str, float], float]:
    """Every spiking layer's firing rate on ``frames``, and the largest std of a Q-value across them."""
    obs, _ = model.policy.obs_to_tensor(frames)
    with torch.no_grad(), model.q_net.record() as activity:
        q = model.q_net(obs)
    rates = {a.name: float(a.spikes.mean()) for a in activity if a.spikes is not None}
    return rates, float(q.std(0).max())


def run(game: str, init: str, args: argparse.Namespace, frames: np.ndarray) -> str:
    """Train one DSQN, print its table rows; return when every layer fired, and the time taken."""
    env = atari.make_env(game, n_envs=1, seed=args.seed)
    model = DQN(
        "SpikingPolicy",
        env,
        policy_kwargs=dict(num_steps=args.num_steps, init=init),
        learning_rate=1e-4,
        batch_size=32,
        buffer_size=args.replay,
        learning_starts=args.replay,
        gamma=0.99,
        replay_buffer_class=FrameReplayBuffer,
        seed=args.seed,
        device="cpu",
    )
    model.learn(args.replay)  # random play only: learning starts after it
    started, first_all, done = time.process_time(), None, 0
    for checkpoint in sorted({*CHECKPOINTS, *range(args.every, args.updates + 1, args.every)}):
        if checkpoint > args.updates:
            break
        model.train(gradient_steps=checkpoint - done, batch_size=32)
        done = checkpoint
        rates, spread = rates_and_q_spread(model, frames)
        if first_all is None and min(rates.values()) >= FIRES:
            first_all = checkpoint
        if checkpoint in CHECKPOINTS:
            cells = " | ".join(f"{100 * rate:.2f}" for rate in rates.values())
            print(f"| {game} | {init} | {checkpoint} | {cells} | {spread:.2g} |", flush=True)
    seconds = time.process_time() - started
    when = f"after {first_all} updates" if first_all is not None else f"not within {args.updates} updates"
    env.close()
    return f"{game}, init {init}: every layer fires in >= 1% of its neuron-steps {when} ({seconds:.0f} CPU s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--games", nargs="+", default=["Pong", "Breakout"])
    parser.add_argument("--inits", nargs="+", default=["default", "firing"])
    parser.add_argument("--num-steps", type=int, default=8, help="T")
    parser.add_argument("--updates", type=int, default=1000)
    parser.add_argument("--replay", type=int, default=2000, help="transitions of random play to train on")
    parser.add_argument("--frames", type=int, default=128, help="held-out frames the rates are measured on")
    parser.add_argument("--every", type=int, default=50, help="updates between two measurements")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"T = {args.num_steps}, Adam 1e-4, batch 32; firing rates in % of neuron-steps on held-out frames")
    print("| game | init | updates | conv1 | conv2 | conv3 | fc1 | std of Q across frames |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    summaries = []
    for game in args.games:
        frames = held_out_frames(game, args.frames, seed=args.seed + 1)
        summaries += [run(game, init, args, frames) for init in args.inits]
    print(f"\n(every layer's rate measured every {args.every} updates)")
    print("\n".join(summaries))


if __name__ == "__main__":
    main()
