"""What each training preset costs: agent steps per second of the real training loop on Pong.

    .venv/bin/python benchmarks/bench_presets.py [--device cpu] [--steps 400] [--threads 0]
        [--n-envs 1] [--vec-env dummy|subproc|ale] [--presets ...] [--models ...]

For every preset and model the real SB3 DQN of ``spikeq.experiment.train.build_model`` runs on the real
Pong env (the preset's network, batch size, update frequency and replay buffer). After a warm-up of random
actions that fills the replay buffer, two phases of ``--steps`` agent steps each are timed, with
epsilon at the preset's final value: acting (the policy picks every action: one forward pass per
vector step, no updates) and training (plus the preset's updates, one every ``train_freq`` agent
steps). The projection multiplies the training rate by the preset's step budget; evaluation time is
not included.
"""

from __future__ import annotations

import argparse
import time

import torch

import spikeq  # noqa: F401  (registers SpikingPolicy)
from spikeq.envs import atari
from spikeq.experiment.config import VEC_ENVS, resolve
from spikeq.experiment.train import build_model


def steps_per_second(model, steps: int) -> float:
    """Agent steps per second of ``model.learn`` over ``steps`` steps."""
    start = time.perf_counter()
    model.learn(steps, reset_num_timesteps=False)
    return steps / (time.perf_counter() - start)


def measure(preset: str, model_name: str, device: str, steps: int, n_envs: int, vec_env: str) -> dict:
    """Acting-only and training rates for one preset and model (exploration fixed at the final eps)."""
    warm_up = max(steps // 4, 64)
    config = resolve(
        preset, model_name, device=device, buffer_size=10_000, learning_starts=warm_up, n_envs=n_envs
    )
    env = atari.make_env("Pong", n_envs=config.n_envs, seed=0, train=True, vec_env=vec_env)
    model = build_model(config, env, device)
    model.exploration_schedule = lambda _: config.exploration_final_eps
    gradient_steps, model.gradient_steps = model.gradient_steps, 0
    model.learn(warm_up)  # random actions fill the replay buffer (SB3's learning_starts)
    acting = steps_per_second(model, steps)  # the policy acts, no updates
    model.gradient_steps = gradient_steps
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
    parser.add_argument("--n-envs", type=int, default=1, help="training envs (updates per agent step kept)")
    parser.add_argument("--vec-env", default="dummy", choices=VEC_ENVS)
    parser.add_argument(
        "--cudnn-benchmark",
        choices=["on", "off"],
        help="set torch.backends.cudnn.benchmark (default: as training leaves it)",
    )
    args = parser.parse_args()
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = args.cudnn_benchmark == "on"
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, Pong, "
        f"{args.n_envs} env(s) ({args.vec_env})"
    )
    print(
        f"{'preset':<7} {'model':<6} {'T':>3} {'batch':>5} {'acting steps/s':>15} {'training steps/s':>17} "
        f"{'budget':>11} {'projected training time':>24}"
    )
    for preset in args.presets:
        for model_name in args.models:
            r = measure(preset, model_name, args.device, args.steps, args.n_envs, args.vec_env)
            c = r["config"]
            hours = r["budget"] / r["training"] / 3600
            projection = f"{hours:.2f} h" if hours < 48 else f"{hours / 24:.1f} days"
            t = c.network.num_steps if c.spiking else "-"
            print(
                f"{preset:<7} {model_name:<6} {t:>3} {c.batch_size:>5} {r['acting']:>15.1f} "
                f"{r['training']:>17.1f} {r['budget']:>11,} {projection:>24}",
                flush=True,
            )


if __name__ == "__main__":
    main()
