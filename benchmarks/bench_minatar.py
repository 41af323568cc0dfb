"""MinAtar: does the DSQN fire on the grids at the start of learning, and what does a training step cost?

(a) For each game and each init, a DSQN (the minatar preset's network: T = 8, LIF, rate readout) learns
    from 64 random steps (one update: the first training batch calibrates ``init="firing"``), then every
    spiking layer's firing rate (fraction of its neuron-steps that spike) is measured on the first 300
    observations of the replay buffer.
(b) Agent steps per second of the minatar preset's training loop (an update every step, batch 32) for
    the ANN DQN and the DSQN, measured over ``--steps`` steps after the replay start, one torch thread.
(c) With ``--profile-steps N``: where the same loop's time goes, under ``torch.profiler`` for N steps
    of each model: the synaptic work (convolutions and matrix products, forward and backward), the
    spiking layers' recurrences (their autograd nodes, forward and adjoint), the optimiser, and the
    rest (SB3's loop, the environment, replay sampling, the Python between kernels), in ms per agent
    step. It bounds what any faster recurrence could buy a MinAtar run. The profiler's own cost per
    operator weighs most on the many small ones, so the recurrences' share is an upper bound.

    .venv/bin/python benchmarks/bench_minatar.py [--steps 2000] [--games Breakout ...] [--profile-steps 300]
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_engine import SYNAPTIC_OPS  # the benchmark beside this one

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


def _past_replay_start(game: str, model_name: str, seed: int):
    """A minatar-preset model (and its env) 200 updates past its replay start (1,000 steps)."""
    env = games.make_env(f"MinAtar/{game}", seed=seed)
    config = resolve("minatar", model_name, game=f"MinAtar/{game}", learning_starts=1_000, seed=seed)
    model = build_model(config, env, "cpu")
    model.learn(1_200)
    return model, env


def steps_per_second(game: str, model_name: str, steps: int, seed: int = 0) -> float:
    """Agent steps/s of the minatar preset's training loop after its replay start."""
    model, env = _past_replay_start(game, model_name, seed)
    start = time.perf_counter()
    model.learn(steps, reset_num_timesteps=False)
    env.close()
    return steps / (time.perf_counter() - start)


# The spiking recurrences' autograd nodes (forward and backward, each op they run included); the
# synaptic operators are bench_engine.py's.
RECURRENCE_OPS = frozenset(
    f"{node}{part}" for node in ("_SpikeRecurrence", "_LeakyRecurrence") for part in ("", "Backward")
)
PARTS = ("synaptic", "recurrences", "optimiser", "rest")


def _part(name: str) -> str | None:
    if name in SYNAPTIC_OPS:
        return "synaptic"
    if name in RECURRENCE_OPS:
        return "recurrences"
    if name.startswith("Optimizer."):
        return "optimiser"
    return None


def time_split(game: str, model_name: str, steps: int, seed: int = 0) -> dict[str, float]:
    """(c): ms per agent step of the training loop in each of ``PARTS``, profiled over ``steps`` steps.

    An event counts with its children, unless an enclosing event already counts in a part; the rest
    is the loop's wall time less the parts.
    """
    model, env = _past_replay_start(game, model_name, seed)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        model.learn(steps, reset_num_timesteps=False)
        wall = time.perf_counter() - start
    env.close()
    ms = dict.fromkeys(PARTS, 0.0)
    for event in profiler.events():
        part = _part(event.name)
        if part is not None and not _inside_a_part(event):
            ms[part] += event.cpu_time_total / 1e3
    ms["rest"] = wall * 1e3 - sum(ms.values())
    return {part: value / steps for part, value in ms.items()}


def _inside_a_part(event: object) -> bool:
    """Whether an enclosing event already counts in a part (its time includes this one's)."""
    parent = event.cpu_parent
    while parent is not None:
        if _part(parent.name) is not None:
            return True
        parent = parent.cpu_parent
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--games", nargs="+", default=list(GAMES))
    parser.add_argument("--steps", type=int, default=2_000, help="timed agent steps for (b)")
    parser.add_argument("--profile-steps", type=int, default=0, help="profiled agent steps for (c) (0: skip)")
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

    if args.profile_steps:
        print(f"\n(c) ms per agent step, {game}, profiled over {args.profile_steps} steps after replay start")
        print("| model | " + " | ".join(PARTS) + " | all |\n|---|" + "---:|" * (len(PARTS) + 1))
        for model in ("dqn", "dsqn"):
            split = time_split(game, model, args.profile_steps)
            cells = [f"{split[part]:.2f} ({split[part] / sum(split.values()):.0%})" for part in PARTS]
            print(f"| {model} | " + " | ".join(cells) + f" | {sum(split.values()):.2f} |")


if __name__ == "__main__":
    main()
