"""The MinAtar study: train every (game, model, seed) run of the study, a few at a time, resumably.

Each run is ``spikeq train --game MinAtar/<Game> --model <model> --preset minatar --seed <s> --steps N``
in ``<runs-dir>/<name>`` with one torch thread. When a run finishes, its small result files
(config.yaml, eval.csv, evaluation.json, eval.png) and its best weights as weights-only files
(best.safetensors, best.json) are copied to ``<results>/<name>/`` with training_curve.csv (its
train.csv at 100 evenly spaced steps: training return, firing rates); the other checkpoints, train.csv
and W&B files stay in the run directory. Started again, the study skips runs whose results exist (in
their run directory or in ``<results>``), resumes runs cut short (from their latest checkpoint) and
starts the rest, so it can be stopped at any moment.

    python experiments/minatar_study.py --games Breakout SpaceInvaders Freeway --models dqn dsqn \\
        --seeds 0 1 2 --steps 1000000 --lanes 2
    python experiments/minatar_study.py --games Breakout --models dsqn --variant default-init \\
        --set init=default     # a named variant: runs <model>+<variant>, with these overrides

    python experiments/minatar_study.py --status   # where each run of the plan stands; starts nothing

Then ``python experiments/minatar_report.py`` writes the table and the learning curves.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from spikeq.analysis.report import TRAINING_CURVE, read_curve, write_training_curve
from spikeq.envs.minatar import GAMES as MINATAR_GAMES
from spikeq.experiment.checkpoints import latest_checkpoint
from spikeq.experiment.config import MODELS, settings
from spikeq.experiment.tracking import child_environment
from spikeq.experiment.train import RUN_LOCK
from spikeq.files import is_locked

RESULT_FILES = ("config.yaml", "eval.csv", "evaluation.json", "eval.png")
# The best weights as weights-only files (half a megabyte), so that a clone can evaluate the trained
# agents again (``minatar_robustness.py``, ``spikeq evaluate``, ``spikeq convert``) without the runs.
WEIGHT_FILES = ("best.safetensors", "best.json")
STUDY_STEPS = 1_000_000
# Settings the study gives every run itself (its own flags, run directory and tracking): --set may not
# change them, since a resumed run is given the study's value again.
STUDY_SETTINGS = ("game", "model", "preset", "seed", "steps", "torch_threads", "out_dir", "wandb")
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
    steps: int = STUDY_STEPS
    variant: str = ""
    overrides: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """``MinAtar-<Game>-<model>[+<variant>]-s<seed>[-<steps>]``; the budget only where it is not the
        study's 1M, so that runs of other budgets never share a directory with the study's."""
        model = f"{self.model}+{self.variant}" if self.variant else self.model
        thousands, rest = divmod(self.steps, 1000)
        budget = "" if self.steps == STUDY_STEPS else f"-{thousands}k" if not rest else f"-{self.steps}"
        return f"MinAtar-{self.game}-{model}-s{self.seed}{budget}"

    def command(self, run_dir: Path) -> list[str]:
        """The ``spikeq train`` command that starts this run, or resumes it where it has a checkpoint."""
        if latest_checkpoint(run_dir / "checkpoints") is not None:
            resume = ["--resume", str(run_dir), "--steps", str(self.steps), "--torch-threads", "1"]
            return [*SPIKEQ, "train", *resume]
        command = [
            *SPIKEQ, "train", "--game", f"MinAtar/{self.game}", "--model", self.model,
            "--preset", "minatar", "--seed", str(self.seed), "--steps", str(self.steps),
            "--torch-threads", "1", "--run-dir", str(run_dir), "--wandb", "offline",
        ]  # fmt: skip
        if run_dir.exists():
            command.append("--force")  # started but cut before its first checkpoint: nothing to keep
        for override in self.overrides:
            key, value = override.split("=", 1)
            command += [f"--{key.replace('_', '-')}", value]
        return command


def collect(run: Run, run_dir: Path, results: Path) -> bool:
    """Copy a finished run's result files to ``results/<name>``, with its training curve; False while it
    has no result, or when its result is of a run trained past the study's budget."""
    if not (run_dir / "evaluation.json").exists():
        return False
    trained = yaml.safe_load((run_dir / "config.yaml").read_text())["steps"]
    if trained > run.steps:  # trained further in place (spikeq train --resume --steps): not the study's
        print(
            f"not collected: {run_dir} was trained for {trained:,} steps, the study's run for {run.steps:,}"
        )
        return False
    target = results / run.name
    target.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES:
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, target / name)
    for name in WEIGHT_FILES:
        if (run_dir / "checkpoints" / name).exists():
            shutil.copy2(run_dir / "checkpoints" / name, target / name)
    if (run_dir / "train.csv").exists():
        write_training_curve(run_dir, target / TRAINING_CURVE)
    return True


def finished(run: Run, run_dir: Path, results: Path) -> bool:
    """Whether ``run`` needs no more training: its result collected from ``run_dir`` now, or already in
    ``results`` (committed with the study, where its run directory may be gone: a fresh clone)."""
    return collect(run, run_dir, results) or (results / run.name / "evaluation.json").exists()


def progress(run: Run, run_dir: Path, results: Path) -> tuple[str, str]:
    """Where ``run`` stands: its state (finished, running, cut, not started) and a line saying more."""
    result = results / run.name / "evaluation.json"
    if result.exists():
        record = json.loads(result.read_text())
        return "finished", f"score {record['score_mean']:.2f} ± {record['score_std']:.2f}"
    if not run_dir.exists():
        return "not started", ""
    state = "running" if is_locked(run_dir / RUN_LOCK) else "cut"
    checkpoint = latest_checkpoint(run_dir / "checkpoints")  # what a resume would start from
    step = int(checkpoint.name.removeprefix("step-")) if checkpoint else 0
    detail = f"last checkpoint at step {step:,} of {run.steps:,}"
    steps, means, _ = read_curve(run_dir) if (run_dir / "eval.csv").exists() else ([], [], [])
    if means:
        best = max(range(len(means)), key=means.__getitem__)
        detail += f"; best evaluation {means[best]:.2f} (step {steps[best]:,})"
    if state == "running" and (pace := _pace(run_dir, run.steps)):
        detail += f"; {pace}"
    return state, detail


def _pace(run_dir: Path, budget: int) -> str | None:
    """How far a running run has come and how long it has left, from the last row of its ``train.csv``
    that has SB3's ``time/fps`` (agent steps per second of wall time since the run started or resumed,
    evaluations included); None before SB3 has logged one."""
    if not (run_dir / "train.csv").exists():
        return None
    with (run_dir / "train.csv").open(newline="") as f:
        timed = [row for row in csv.DictReader(f) if row.get("time/fps")]  # evaluation rows have none
    if not timed:
        return None
    step, fps = int(timed[-1]["step"]), float(timed[-1]["time/fps"])
    left = f", about {(budget - step) / fps / 60:,.0f} min left" if fps > 0 else ""
    return f"at step {step:,} ({fps:,.0f} agent steps/s{left})"


def print_status(plan: list[Run], runs_dir: Path, results: Path) -> None:
    """One line per run of the plan, after a count of the runs in each state."""
    rows = [(run.name, *progress(run, runs_dir / run.name, results)) for run in plan]
    counts = {state: sum(row[1] == state for row in rows) for state in ("finished", "running", "cut")}
    counts["not started"] = len(rows) - sum(counts.values())
    print(f"{len(rows)} run(s): " + ", ".join(f"{n} {state}" for state, n in counts.items()))
    width = max(len(name) for name, _, _ in rows)
    for name, state, detail in rows:
        print(f"  {name:<{width}}  {state:<11}  {detail}".rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--games",
        nargs="+",
        default=["Breakout", "SpaceInvaders", "Freeway"],
        choices=MINATAR_GAMES,
        metavar="GAME",
        help=f"MinAtar games, in the order their runs start (allowed: {', '.join(MINATAR_GAMES)})",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=["dqn", "dsqn"],
        choices=MODELS,
        metavar="MODEL",
        help=f"spikeq models (allowed: {', '.join(MODELS)})",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds")
    parser.add_argument("--steps", type=int, default=STUDY_STEPS, help="agent steps per run")
    parser.add_argument("--lanes", type=int, default=2, help="runs at a time (one CPU core each)")
    parser.add_argument("--variant", default="", help="name of the --set overrides, part of run names")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument(
        "--runs-dir", type=Path, default=Path("runs/minatar"), help="where the runs train (checkpoints)"
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=Path("experiments/results/minatar"),
        help="where each finished run's small result files are copied",
    )
    parser.add_argument("--status", action="store_true", help="print where each run stands and exit")
    args = parser.parse_args(argv)
    if args.lanes < 1:
        parser.error(f"--lanes {args.lanes} must be >= 1")
    if any("=" not in item for item in args.set):
        parser.error(f"--set takes KEY=VALUE items, got {args.set}")
    for key in (item.split("=", 1)[0] for item in args.set):
        if key in STUDY_SETTINGS:
            parser.error(
                f"--set {key}=... is the study's own setting; use its flags (--games, --seeds, --steps)"
            )
        if key not in settings():
            parser.error(f"--set {key}=...: unknown setting; allowed: {', '.join(sorted(settings()))}")
    if args.set and not args.variant:
        parser.error("--set needs --variant NAME, so that the runs are named apart from the plain preset")

    # Seed-major order: every model of a game gets its first seed before any gets a second.
    queue = [
        Run(game, model, seed, args.steps, args.variant, tuple(args.set))
        for seed in args.seeds
        for game in args.games
        for model in args.models
    ]
    if args.status:
        print_status(queue, args.runs_dir, args.results)
        return 0
    queue = [run for run in queue if not finished(run, args.runs_dir / run.name, args.results)]
    print(f"{len(queue)} run(s) to do: {', '.join(run.name for run in queue) or 'none'}", flush=True)
    running: dict[str, tuple[Run, subprocess.Popen]] = {}
    stopping: list[int] = []
    failed: list[str] = []

    def stop(signum: int, frame: object) -> None:
        # The runs have sessions of their own (a terminal's Ctrl-C reaches only this process): each gets
        # exactly one SIGINT, checkpoints and exits; a second one would make it stop without saving.
        if not stopping:
            print("stopping: every running run checkpoints, then exits", flush=True)
            for _, process in running.values():
                process.send_signal(signal.SIGINT)
        stopping.append(signum)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    while (queue and not stopping) or running:
        while queue and not stopping and len(running) < args.lanes:
            run = queue.pop(0)
            run_dir = args.runs_dir / run.name
            if is_locked(run_dir / RUN_LOCK):
                # Another study (a second lane started with other --models, say) is training it.
                print(f"skip {run.name}: another process is training it", flush=True)
                continue
            if finished(run, run_dir, args.results):  # by another process since the plan was made
                print(
                    f"skip {run.name}: finished meanwhile, results in {args.results / run.name}", flush=True
                )
                continue
            command = run.command(run_dir)
            print(f"start {run.name}: {' '.join(command[2:])}", flush=True)
            with (args.runs_dir / f"{run.name}.log").open("a") as log:
                process = subprocess.Popen(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env=child_environment(),
                )
            running[run.name] = (run, process)
        time.sleep(2)
        for name, (run, process) in list(running.items()):
            if process.poll() is None:
                continue
            del running[name]
            if collect(run, args.runs_dir / name, args.results):
                status = f"finished, results in {args.results / name}"
            elif stopping:
                status = "stopped (resumable)"
            else:
                status = f"failed, see {args.runs_dir / name}.log"
                failed.append(name)
            print(f"{name}: exit {process.returncode}, {status}", flush=True)
    if stopping:
        print("stopped; run the same command again to resume", flush=True)
        return 128 + stopping[0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
