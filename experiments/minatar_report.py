"""The MinAtar study's results table and learning curves, regenerated from the committed result files.

    python experiments/minatar_report.py            # or: make minatar-report

Reads ``experiments/results/minatar/<run>/`` (config.yaml, eval.csv, evaluation.json of each finished
run), ``experiments/results/minatar/random/<Game>.json`` (the random policy, ``spikeq evaluate
--random``; measured once per game when missing) and ``experiments/results/minatar/converted/*.json``
(``spikeq evaluate --out`` of a trained DQN converted with ``spikeq convert``, model ``dqn-converted``;
table only), and writes beside them ``table.md`` (one row per game and model: the final score of the
best weights, 30 episodes, averaged over seeds, with the energy ratio, spikes per action and firing
rate), ``summary.md`` (the same rows as README.md shows them: each game's longest runs first, each
seed's score in brackets), ``comparison.md`` (the DSQN against the DQN, game by game and over games:
difference of mean scores, DQN-normalised score and probability of improvement, with bootstrap intervals;
``spikeq.analysis.compare.compare_scores``; with three games or more, the mean over the others with
each game left out; and a table for each setting both models were run with, such as another
optimiser; ``comparison.png`` draws the first two), ``learning_curves.png`` (the evaluation score, one panel
per game) and ``training_curves.png`` (the training return, SB3's mean over the last 100 episodes,
from each run's training_curve.csv) and ``firing_rates.png`` (each spiking layer's firing rate on the
training batches, from the same files) of the runs trained for their game's longest budget (the main
study), and ``ablations.png`` (evaluation score and training return of the shorter runs, the ablations,
beside the main runs over the same steps; ``spikeq.analysis.report.plot_ablations``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from spikeq.analysis.compare import ComparisonReport, comparison_report, plot_comparison
from spikeq.analysis.report import (
    TRAINING_CURVE,
    format_summary,
    format_table,
    plot_ablations,
    plot_firing_rates,
    plot_learning_curves,
    results_table,
    split_by_budget,
    write_table,
)
from spikeq.envs import games
from spikeq.experiment.config import preset_values
from spikeq.files import write_atomic

RESULTS = Path("experiments/results/minatar")
# Settings that differ between the study's runs but changed nothing in them. bootstrap_time_limit acts
# only on a training episode cut at max_episode_steps (10,000). The Breakout runs of seed 0 predate the
# field (their configs say false or nothing; every other run has SB3's true), and none of their training
# episodes was cut: the longest mean of SB3's 100-episode window in their train.csv was 92 steps, and a
# single cut episode would have put it above 100.
SAME_IN_EFFECT = ("bootstrap_time_limit",)


def chance_level(results: Path, game: str, episodes: int = 30) -> Path:
    """The random policy's evaluation of ``game`` (``spikeq evaluate --random``), run when missing."""
    out = results / "random" / f"{games.file_safe_name(game)}.json"
    if not out.exists():
        command = [sys.executable, "-m", "spikeq.cli", "evaluate", "--random", "--game", game]
        command += ["--episodes", str(episodes), "--max-episode-steps", "10000", "--out", str(out)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            said = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
            raise ValueError(f"the random policy's evaluation of {game} failed: {said[-1]}")
    return out


def chance_levels(results: Path, runs: list[Path]) -> list[Path]:
    """The random policy's evaluation of each game of ``runs`` (measured where missing)."""
    study_games = sorted({json.loads((run / "evaluation.json").read_text())["game"] for run in runs})
    return [chance_level(results, game) for game in study_games]


def study_rows(results: Path, runs: list[Path], chance: list[Path]) -> list[dict]:
    """``table.md``'s rows: the runs, the random policy and the converted networks, by game, model and
    setting (``summary_order`` gives ``summary.md``'s order)."""
    converted = sorted((results / "converted").glob("*.json"))
    rows = results_table([*runs, *chance, *converted], ignore=SAME_IN_EFFECT, reference=preset_values)
    return sorted(rows, key=lambda row: (row["game"], row["model"], row["setting"] or ""))


def study_comparison(main_runs: list[Path], chance: list[Path]) -> ComparisonReport:
    """``comparison.md``'s tables: the study proper, each game's runs of its longest budget (shorter
    runs of a model are trials), the DSQN against the DQN.

    :raises ValueError: where no game has finished runs of both models
    """
    return comparison_report([*main_runs, *chance], ignore=SAME_IN_EFFECT, reference=preset_values)


def summary_order(row: dict) -> tuple:
    """README's order of ``results_table``'s rows: by game, its trained runs from the longest budget
    down, then what was not trained (converted networks), the random policy last."""
    trained_steps = row["train_steps"] or 0
    return row["game"], row["model"] == "random", -trained_steps, row["model"], row["setting"] or ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="the study's result folder")
    args = parser.parse_args(argv)
    runs = sorted(path.parent for path in args.results.glob("*/evaluation.json"))
    if not runs:
        print(f"no finished runs under {args.results}", file=sys.stderr)
        return 1
    try:
        chance = chance_levels(args.results, runs)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 1
    labels = dict(ignore=SAME_IN_EFFECT, reference=preset_values)  # an ablation's rows: what sets it apart
    rows = study_rows(args.results, runs, chance)
    table = args.results / "table.md"
    write_table(rows, table)
    summary = args.results / "summary.md"
    write_atomic(summary, format_summary(sorted(rows, key=summary_order)) + "\n")
    evaluations = [json.loads(path.read_text()) for path in chance]
    scores = {evaluation["game"]: evaluation["score_mean"] for evaluation in evaluations}
    main_runs, shorter = split_by_budget(runs)
    figure = plot_learning_curves(
        main_runs, args.results / "learning_curves.png", chance=scores, title="MinAtar", **labels
    )
    written = [table, summary, figure]
    if shorter:
        out = args.results / "ablations.png"
        written.append(plot_ablations(runs, out, chance=scores, title="MinAtar", **labels))
    compared = None
    try:
        compared = study_comparison(main_runs, chance)
    except ValueError as error:  # no game has finished runs of both models yet
        print(f"no comparison: {error}", file=sys.stderr)
    else:
        write_atomic(args.results / "comparison.md", compared.markdown + "\n")
        written.append(args.results / "comparison.md")
        if any(game.normalised is not None for game in compared.comparison.games):
            out = args.results / "comparison.png"
            written.append(plot_comparison(compared.comparison, out, compared.left_out))
    if trained := [run for run in main_runs if (run / TRAINING_CURVE).exists()]:
        out = args.results / "training_curves.png"
        curves = plot_learning_curves(trained, out, title="MinAtar", training=True, **labels)
        written.append(curves)
        out = args.results / "firing_rates.png"
        written.append(plot_firing_rates(trained, out, title="MinAtar", **labels))
    print(format_table(rows))
    if compared is not None:
        print(f"\n{compared.markdown}")
    print(f"written: {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
