"""The MinAtar study: train every (game, model, seed) run of the study, a few at a time, resumably.

Each run is ``spikeq train --game MinAtar/<Game> --model <model> --preset minatar --seed <s> --steps N``
in ``<runs-dir>/<name>`` with one torch thread. When a run finishes, its small result files
(config.yaml, eval.csv, evaluation.json, eval.png) are copied to ``<results>/<name>/``; checkpoints and
W&B files stay in the run directory. Started again, the study skips runs whose results exist, resumes
runs cut short (from their latest checkpoint) and starts the rest, so it can be stopped at any moment.

    python experiments/minatar_study.py --games Breakout SpaceInvaders Freeway --models dqn dsqn \\
        --seeds 0 1 2 --steps 1000000 --lanes 2
    python experiments/minatar_study.py --games Breakout --models dsqn --variant default-init \\
        --set init=default     # a named variant: runs <model>+<variant>, with these overrides

Then ``python experiments/minatar_report.py`` writes the table and the learning curves.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RESULT_FILES = ("config.yaml", "eval.csv", "evaluation.json", "eval.png")
SPIKEQ = [sys.executable, "-m", "spikeq.cli"]


@dataclass(frozen=True)
class Run:
    """One run of the study.

    :param game: MinAtar game name (``Breakout``)
    :param model: spikeq model (``dqn``, ``dsqn``, ``dsqn-if`` ...)
    :param seed: training seed
    :param variant: a name for ``overrides`` (empty: the preset as it is)
    :param overrides: ``key=value`` config overrides
    """

    game: str
    model: str
    seed: int
    variant: str = ""
    overrides: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        model = f"{self.model}+{self.variant}" if self.variant else self.model
        return f"MinAtar-{self.game}-{model}-s{self.seed}"

    def command(self, run_dir: Path, steps: int) -> list[str]:
        """The ``spikeq train`` command that starts this run, or resumes it where it has a checkpoint."""
        if (run_dir / "checkpoints" / "latest").exists():
            return [*SPIKEQ, "train", "--resume", str(run_dir), "--steps", str(steps), "--torch-threads", "1"]
        command = [
            *SPIKEQ, "train", "--game", f"MinAtar/{self.game}", "--model", self.model,
            "--preset", "minatar", "--seed", str(self.seed), "--steps", str(steps),
            "--torch-threads", "1", "--run-dir", str(run_dir), "--wandb", "offline",
        ]  # fmt: skip
        if run_dir.exists():
            command.append("--force")  # started but cut before its first checkpoint: nothing to keep
        for override in self.overrides:
            key, value = override.split("=", 1)
            command += [f"--{key.replace('_', '-')}", value]
        return command


def collect(run: Run, run_dir: Path, results: Path) -> bool:
    """Copy a finished run's result files to ``results/<name>``; False while it has no result."""
    if not (run_dir / "evaluation.json").exists():
        return False
    target = results / run.name
    target.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES:
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, target / name)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--games", nargs="+", default=["Breakout", "SpaceInvaders", "Freeway"])
    parser.add_argument("--models", nargs="+", default=["dqn", "dsqn"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1_000_000, help="agent steps per run")
    parser.add_argument("--lanes", type=int, default=2, help="runs at a time (one CPU core each)")
    parser.add_argument("--variant", default="", help="name of the --set overrides, part of run names")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/minatar"))
    parser.add_argument("--results", type=Path, default=Path("experiments/results/minatar"))
    args = parser.parse_args(argv)
    if args.lanes < 1:
        parser.error(f"--lanes {args.lanes} must be >= 1")
    if any("=" not in item for item in args.set):
        parser.error(f"--set takes KEY=VALUE items, got {args.set}")
    if args.set and not args.variant:
        parser.error("--set needs --variant NAME, so that the runs are named apart from the plain preset")

    # Seed-major order: every model of a game gets its first seed before any gets a second.
    queue = [
        Run(game, model, seed, args.variant, tuple(args.set))
        for seed in args.seeds
        for game in args.games
        for model in args.models
    ]
    queue = [run for run in queue if not collect(run, args.runs_dir / run.name, args.results)]
    print(f"{len(queue)} run(s) to do: {', '.join(run.name for run in queue) or 'none'}", flush=True)
    running: dict[str, tuple[Run, subprocess.Popen]] = {}
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    try:
        while queue or running:
            while queue and len(running) < args.lanes:
                run = queue.pop(0)
                run_dir = args.runs_dir / run.name
                log = (args.runs_dir / f"{run.name}.log").open("a")
                command = run.command(run_dir, args.steps)
                print(f"start {run.name}: {' '.join(command[2:])}", flush=True)
                running[run.name] = (run, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
            time.sleep(5)
            for name, (run, process) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[name]
                done = collect(run, args.runs_dir / name, args.results)
                status = "finished, results in " + str(args.results / name) if done else "stopped"
                print(f"{name}: exit {process.returncode}, {status}", flush=True)
    except KeyboardInterrupt:
        # Each run checkpoints on the signal its process group received; wait for them to save.
        for _, process in running.values():
            process.wait()
        print("interrupted; run the same command again to resume", flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
