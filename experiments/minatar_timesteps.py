"""How many time steps a trained DSQN needs: the MinAtar study's spiking agents, trained at one T, played
at others with the same weights.

    python experiments/minatar_timesteps.py experiments/results/minatar/MinAtar-Asterix-dsqn-s*
    python experiments/minatar_timesteps.py     # no runs: the tables and figure from the results only

(``make minatar-timesteps ARGS="..."`` runs it.)

T, the simulation steps of one decision, sets the latency and most of the energy of a spiking network;
the paper fixes it at 64 for training and evaluation alike. Nothing in the weights depends on it, so a
network trained at T = 8 can be run at T = 1 to 32 as it is (``spikeq evaluate --num-steps``;
``spikeq.analysis.weights.with_num_steps``). Each run's best weights play the run's final evaluation
again at each T (30 episodes at epsilon 0.05, seeded with the run's seed + 1: at the trained T the
scores are that evaluation's), written to ``<results>/<run>/none-T<T>.json`` in the form of ``spikeq
evaluate --out``; an evaluation already written is kept, so the script can be stopped at any moment and
run again. Then it writes ``timesteps.md`` (one row per game, model, setting and T, with the energy of
its decisions), ``timesteps-summary.md`` (one row per game, model and setting: the score at each T, the
energy ratio in brackets) and ``timesteps.png`` (``plot_timesteps``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The study's scripts, beside this one (its folder is on sys.path when it runs as a script).
from minatar_report import RESULTS as STUDY_RESULTS
from minatar_report import SAME_IN_EFFECT
from minatar_robustness import chance_scores, evaluate_run, parse_replay_options

from spikeq.analysis.perturb import Perturbation
from spikeq.analysis.report import differing_groups, plot_timesteps, results_table, run_config, write_table
from spikeq.experiment.config import preset_values
from spikeq.files import write_atomic
from spikeq.snn.network import MAX_NUM_STEPS

RESULTS = STUDY_RESULTS / "timesteps"
NUM_STEPS = (1, 2, 4, 8, 16, 32)
UNPERTURBED = Perturbation.parse("none")


def num_steps_of(path: Path) -> int:
    """T of an evaluation file written by this script: ``none-T4.json`` -> 4."""
    return int(path.stem.rpartition("-T")[2])


def rows_by_num_steps(files: list[Path]) -> list[dict]:
    """``results_table``'s rows of the evaluations in ``files``, one per game, model, setting and T."""
    labels = dict(ignore=SAME_IN_EFFECT, reference=preset_values)
    rows = []
    for num_steps in sorted({num_steps_of(path) for path in files}):
        rows += results_table([path for path in files if num_steps_of(path) == num_steps], **labels)

    def order(row: dict) -> tuple:
        setting, init = row["setting"] or "", row["init"] or ""
        return row["game"], row["model"], setting, init, row["train_steps"], row["num_steps"]

    return sorted(rows, key=order)


def summary(rows: list[dict]) -> str:
    """``rows`` as one Markdown row per game, model, setting, init and training budget: the mean score
    over its runs at each T, with the mean energy ratio (E_SNN / E_ANN) in brackets; the init is named
    where it sets apart rows of one game, model and setting."""
    groups: dict[tuple[str, str, str | None, int], dict[int, dict]] = {}
    for row in rows:
        model = f"{row['model']} ({row['setting']})" if row["setting"] else row["model"]
        groups.setdefault((row["game"], model, row["init"], row["train_steps"]), {})[row["num_steps"]] = row
    steps = sorted({num_steps for by_steps in groups.values() for num_steps in by_steps})
    lines = ["| game | model | trained steps | runs | " + " | ".join(f"T = {t}" for t in steps) + " |"]
    lines.append("|---|---|---:|---:|" + "---:|" * len(steps))
    several_inits = differing_groups(((game, model), init) for game, model, init, _ in groups)
    for (game, model, init, train_steps), by_steps in groups.items():
        if (game, model) in several_inits:
            model += f", {init} init"
        cells = [
            f"{by_steps[t]['score']:.2f} ({by_steps[t]['energy_ratio']:.3f})" if t in by_steps else ""
            for t in steps
        ]
        runs = max(row["runs"] for row in by_steps.values())
        lines.append(f"| {game} | {model} | {train_steps:,} | {runs} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--num-steps",
        nargs="+",
        type=int,
        default=list(NUM_STEPS),
        metavar="T",
        help=f"the T to evaluate at (default: {' '.join(map(str, NUM_STEPS))})",
    )
    runs = "result folders or run directories of spiking models to evaluate"
    args = parse_replay_options(parser, argv, RESULTS, runs)
    for num_steps in args.num_steps:
        if not 1 <= num_steps <= MAX_NUM_STEPS:
            parser.error(f"--num-steps {num_steps} is out of range; allowed: 1 to {MAX_NUM_STEPS}")
    for run_dir in args.runs:
        if run_config(run_dir).get("model") == "dqn":
            parser.error(f"{run_dir} is a DQN, which does not spike: it has no T to change")
    for number, run_dir in enumerate(args.runs, start=1):
        print(f"[{number}/{len(args.runs)}] {run_dir}", flush=True)
        try:
            for num_steps in args.num_steps:
                evaluate_run(
                    run_dir, [UNPERTURBED], args.results, args.episodes, args.epsilon, num_steps=num_steps
                )
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    files = sorted(args.results.glob("*/none-T*.json"))
    if not files:
        print(f"no evaluations under {args.results}: give run directories to evaluate", file=sys.stderr)
        return 1
    rows = rows_by_num_steps(files)
    table = write_table(rows, args.results / "timesteps.md")
    short = args.results / "timesteps-summary.md"
    brief = summary(rows)
    write_atomic(short, brief + "\n")
    figure = plot_timesteps(rows, args.results / "timesteps.png", chance_scores(), "MinAtar")
    print(brief)
    print(f"written: {table}, {short}, {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
