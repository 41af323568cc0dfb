"""What each training preset costs: agent steps per second of the real training loop on Pong.

    .venv/bin/python benchmarks/bench_presets.py [--device cpu] [--steps 400] [--threads 0]

For every preset and model the real SB3 DQN of ``spikeq.train.build_model`` runs on the real Pong env
(the preset's network, batch size, update frequency and replay buffer), measured in two phases:
acting only (before ``learning_starts``: one greedy forward pass per step under epsilon) and
training (after it: plus one update every ``train_freq`` steps). The projection multiplies the
training-phase rate by the preset's step budget; evaluation time is not included.
"""

from __future__ import annotations

import argparse
import time

import torch

import spikeq  # noqa: F401  (registers SpikingPolicy)
from spikeq import atari
from spikeq.config import resolve
from spikeq.train import build_model


def steps_per_second(model, steps: int) -> float:
    """Agent steps per second of ``model.learn`` over ``steps`` steps."""
    start = time.perf_counter()
    model.learn(steps, reset_num_timesteps=False)
    return steps / (time.perf_counter() - start)


def measure(preset: str, model_name: str, device: str, steps: int) -> dict:
    """Acting-only and training rates for one preset and model (exploration fixed at the final eps)."""
    config = resolve(preset, model_name, device=device, buffer_size=10_000, learning_starts=steps)
    env = atari.make_env("Pong", n_envs=config.n_envs, seed=0, train=True)
    model = build_model(config, env, device)
    model.exploration_rate = config.exploration_final_eps
    model.learn(steps // 4)  # warm-up
    model.exploration_schedule = lambda _: config.exploration_final_eps
    acting = steps_per_second(model, steps - steps // 4)
    training = steps_per_second(model, steps)
    env.close()
    return dict(acting=acting, training=training, budget=resolve(preset, model_name).steps, config=config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=400, help="steps per phase")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--presets", nargs="+", default=["smoke", "zoo", "paper"])
    parser.add_argument("--models", nargs="+", default=["dsqn", "dqn"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, Pong, 1 env")
    print(
        f"{'preset':<7} {'model':<6} {'T':>3} {'batch':>5} {'acting steps/s':>15} {'training steps/s':>17} "
        f"{'budget':>11} {'projected training time':>24}"
    )
    for preset in args.presets:
        for model_name in args.models:
            r = measure(preset, model_name, args.device, args.steps)
            c = r["config"]
            hours = r["budget"] / r["training"] / 3600
            projection = f"{hours:.2f} h" if hours < 48 else f"{hours / 24:.1f} days"
            t = c.num_steps if c.spiking else "-"
            print(
                f"{preset:<7} {model_name:<6} {t:>3} {c.batch_size:>5} {r['acting']:>15.1f} "
                f"{r['training']:>17.1f} {r['budget']:>11,} {projection:>24}",
                flush=True,
            )


if __name__ == "__main__":
    main()
