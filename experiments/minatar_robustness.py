"""Robustness of the MinAtar study's trained agents: the paper's claim that a DSQN withstands perturbed
observations better than the DQN, tested on their best weights.

    python experiments/minatar_robustness.py experiments/results/minatar/MinAtar-Breakout-*-300k
    python experiments/minatar_robustness.py     # no runs: the table and figure from the results only
    python experiments/minatar_robustness.py RUN ... --attacker ATTACKER_RUN   # transferred FGSM

(``make minatar-robustness ARGS="..."`` runs it.)

Each run's best weights (``best.safetensors``: in a study's result folder, or a run directory's
``checkpoints/``, as the run's final evaluation loaded them) play that evaluation again (30
episodes at epsilon 0.05, seeded with the run's seed + 1, so that the unperturbed score is that
evaluation's) once per perturbation (``spikeq.analysis.perturb``: FGSM against the network's own greedy
action, Gaussian noise; strengths in cell values of MinAtar's binary grids, clipped to [0, 1]). Each
evaluation is written to ``<results>/<run>/<perturbation>.json`` in the form of ``spikeq evaluate
--out``, with the run's ``config.yaml`` beside it; an evaluation already written is kept, so the script
can be stopped at any moment and run again. Then it writes ``robustness.md`` (one row per game, model,
setting and perturbation, with the energy of the perturbed decisions), ``robustness-summary.md`` (one
row per game, model and setting: the mean score under each perturbation and the fraction of the
unperturbed score it keeps) and ``robustness.png`` (score against strength; ``plot_robustness``).

With ``--attacker``, the FGSM steps are crafted on another run's best weights, not on the network
attacked: a transferred (black-box) attack, ``fgsm:EPS@MODEL`` in the tables (MODEL: the attacker's),
``fgsm-EPS@MODEL.json`` in the files, with the attacker's checkpoint recorded in each. It needs no
gradient of the network attacked, so it tells whether a spiking network withstands the attack or only
its surrogate gradient leads the attack astray. The attacker is not attacked with its own weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import torch

# The study's report script, beside this one (its folder is on sys.path when either runs as a script).
from minatar_report import RESULTS as STUDY_RESULTS
from minatar_report import SAME_IN_EFFECT

from spikeq.analysis.evaluate import evaluate_model, evaluation_record
from spikeq.analysis.perturb import Perturbation
from spikeq.analysis.report import (
    budget_label,
    differing_groups,
    plot_robustness,
    results_table,
    run_config,
    write_table,
)
from spikeq.analysis.weights import load_model
from spikeq.envs import games
from spikeq.experiment.config import preset_values
from spikeq.experiment.train import SEED_MODULUS
from spikeq.files import write_atomic

RESULTS = STUDY_RESULTS / "robustness"
RANDOM = STUDY_RESULTS / "random"
PERTURBATIONS = ("none", "fgsm:0.01", "fgsm:0.02", "fgsm:0.05", "fgsm:0.1")
PERTURBATIONS += ("gaussian:0.05", "gaussian:0.1", "gaussian:0.2")
TRANSFERRED = tuple(p for p in PERTURBATIONS if p.startswith("fgsm"))  # --attacker's default


def file_name(perturbation: Perturbation, num_steps: int | None = None) -> str:
    """``fgsm:0.05`` -> ``fgsm-0.05.json``; at another T than the trained one, ``none`` at T = 4 ->
    ``none-T4.json``."""
    suffix = "" if num_steps is None else f"-T{num_steps}"
    return f"{str(perturbation).replace(':', '-')}{suffix}.json"


def order(perturbation: str) -> tuple[bool, str, float]:
    """A table's order of perturbations: none first, then each kind (and attacker) by strength."""
    parsed = Perturbation.parse(perturbation)
    return parsed.kind != "none", parsed.family, parsed.strength


def row_order(row: dict) -> tuple:
    """A table's order of ``results_table``'s rows: by game, model, setting, init, step budget (the
    longest first), then perturbation."""
    setting, init, budget = row["setting"] or "", row["init"] or "", -(row["train_steps"] or 0)
    return row["game"], row["model"], setting, init, budget, order(row["perturbation"])


def chance_scores(random: Path = RANDOM) -> dict[str, float]:
    """game -> the random policy's mean score, from the study's evaluations of it in ``random``."""
    evaluations = [json.loads(path.read_text()) for path in sorted(random.glob("*.json"))]
    return {evaluation["game"]: evaluation["score_mean"] for evaluation in evaluations}


def best_weights(run_dir: Path) -> Path:
    """A run's best weights: in a study's result folder, or a run directory's ``checkpoints/``.

    :raises ValueError: where it has none
    """
    candidates = [run_dir / "best.safetensors", run_dir / "checkpoints" / "best.safetensors"]
    checkpoint = next((path for path in candidates if path.exists()), None)
    if checkpoint is None:
        tried = " or ".join(map(str, candidates))
        raise ValueError(f"{run_dir} has no best weights ({tried}): has it reached an evaluation?")
    return checkpoint


def summary(files: list[Path], labels: dict) -> str:
    """The evaluations in ``files`` (``<run>/<perturbation>.json``) as one Markdown row per game, model
    and setting: the mean score over its runs under each perturbation, with the fraction of the
    unperturbed score it keeps. One table for the noise and the attacks crafted on each network's own
    gradient; then one per attacker of transferred attacks, over the runs it attacked (its unperturbed
    column theirs).

    :param labels: ``results_table``'s ``ignore`` and ``reference``
    """

    def attacker_of(path: Path) -> str:  # "": the network's own gradient, or no attack
        return Perturbation.parse(json.loads(path.read_text())["perturbation"]).attacker or ""

    attackers = {path: attacker_of(path) for path in files}
    tables = []
    for attacker in sorted(set(attackers.values())):  # "" first
        attacked = {path.parent for path in files if attackers[path] == attacker}
        mine = [
            path
            for path in files
            if path.parent in attacked and (attackers[path] == attacker or path.name == "none.json")
        ]
        heading = f"FGSM crafted on {attacker}'s network (transferred)\n\n" if attacker else ""
        tables.append(heading + _summary_table(sorted(results_table(mine, **labels), key=row_order)))
    return "\n\n".join(tables)


def _summary_table(rows: list[dict]) -> str:
    """One Markdown table of ``summary``: a row per game, model, setting, init and step budget, the
    init and the budget named where they set apart rows of one game, model and setting."""
    groups: dict[tuple[str, str, str | None, int | None], dict[str, dict]] = {}
    for row in rows:
        model = f"{row['model']} ({row['setting']})" if row["setting"] else row["model"]
        key = (row["game"], model, row["init"], row["train_steps"])
        groups.setdefault(key, {})[row["perturbation"]] = row
    perturbations = sorted({name for by_name in groups.values() for name in by_name}, key=order)
    lines = ["| game | model | runs | " + " | ".join(perturbations) + " |"]
    lines.append("|---|---|---:|" + "---:|" * len(perturbations))
    several_inits = differing_groups(((game, model), init) for game, model, init, _ in groups)
    several_budgets = differing_groups(((game, model), steps) for game, model, _, steps in groups)
    for (game, model, init, train_steps), by_name in groups.items():
        alike = (game, model)
        if alike in several_inits:
            model += f", {init} init"
        if alike in several_budgets:
            model += f", {budget_label(train_steps)}"
        plain = by_name.get("none", {}).get("score")
        cells = []
        for name in perturbations:
            score = by_name[name]["score"] if name in by_name else None
            kept = f" ({score / plain:.2f})" if score is not None and plain and name != "none" else ""
            cells.append("" if score is None else f"{score:.2f}{kept}")
        runs = max(row["runs"] for row in by_name.values())
        lines.append(f"| {game} | {model} | {runs} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate_run(
    run_dir: Path,
    perturbations: list[Perturbation],
    results: Path,
    episodes: int,
    epsilon: float,
    attacker: Path | None = None,
    num_steps: int | None = None,
) -> list[Path]:
    """Every perturbation's evaluation of ``run_dir``'s best weights not yet written; all of its files.

    :param attacker: the best weights transferred attacks (``fgsm:EPS@NAME``) are crafted on
    :param num_steps: evaluate a spiking network at this T instead of the one it was trained with
        (``spikeq.analysis.weights.with_num_steps``), into files of their own (``file_name``)
    :raises ValueError: for a run directory without a config naming its game and seed, without best
        weights, whose name ``results`` holds the evaluations of another run under, or one of whose
        transferred attacks ``results`` holds crafted on another attacker
    """
    config = run_config(run_dir)
    if not {"game", "seed"} <= config.keys():
        raise ValueError(f"{run_dir} has no config.yaml naming its game and seed: is it a spikeq run?")
    checkpoint = best_weights(run_dir)
    out_dir = results / run_dir.name
    kept = out_dir / "config.yaml"
    if kept.exists() and kept.read_text() != (run_dir / "config.yaml").read_text():
        raise ValueError(
            f"{out_dir} holds the evaluations of another run named {run_dir.name} (its config.yaml "
            f"differs from {run_dir}'s); evaluate this one into other --results"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "config.yaml", kept)
    seed = (config["seed"] + 1) % SEED_MODULUS  # the final evaluation's (spikeq.experiment.train)
    game, cap = config["game"], config.get("max_episode_steps")
    model = attacking = None
    for perturbation in perturbations:
        out = out_dir / file_name(perturbation, num_steps)
        if out.exists():
            crafted_on = json.loads(out.read_text()).get("attacker_checkpoint")
            if crafted_on != (None if attacker is None else str(attacker)):
                raise ValueError(
                    f"{out} holds an attack crafted on {crafted_on}, not on {attacker}; "
                    "evaluate this attacker's into other --results"
                )
            continue
        env = games.make_env(game, n_envs=1, seed=seed, train=False, max_episode_steps=cap)
        model = model or load_model(checkpoint, env, "cpu", num_steps)
        if attacker is not None:
            attacking = attacking or load_model(attacker, env, "cpu")
        start = time.perf_counter()
        result = evaluate_model(
            model,
            env,
            n_episodes=episodes,
            epsilon=epsilon,
            seed=seed,
            progress=False,
            game=games.game_short_name(game),
            perturbation=perturbation,
            attacker=attacking,
        )
        env.close()
        record = evaluation_record(result, checkpoint, config, attacker)
        write_atomic(out, json.dumps(record, indent=1))
        took = time.perf_counter() - start
        at = "" if num_steps is None else f" at T = {num_steps}"
        print(f"{run_dir.name} {perturbation}{at}: {result.score_mean:.2f} ({took:.0f} s)", flush=True)
    return sorted(out_dir.glob("*.json"))


def transferred(perturbation: Perturbation, attacker: Path) -> Perturbation:
    """``perturbation`` crafted on ``attacker``'s network, named after its model.

    :raises ValueError: for a perturbation other than fgsm:EPS, or an attacker that is no spikeq run
    """
    if perturbation.kind != "fgsm" or perturbation.attacker is not None:
        raise ValueError(f"--attacker crafts FGSM steps; {perturbation} is not fgsm:EPS")
    model = run_config(attacker).get("model")
    if model is None:
        raise ValueError(f"attacker {attacker} has no config.yaml naming its model: is it a spikeq run?")
    return dataclasses.replace(perturbation, attacker=model)


def parse_replay_options(
    parser: argparse.ArgumentParser, argv: list[str] | None, results: Path, runs: str
) -> argparse.Namespace:
    """Parse ``argv`` with the arguments the study's replays of best weights share added to ``parser``
    (the runs, episodes, epsilon, where the evaluations are written, torch threads); sets the thread
    count.

    :param results: the default of ``--results``
    :param runs: what the runs given are, for the help
    """
    parser.add_argument("runs", nargs="*", type=Path, help=f"{runs} (their best.safetensors)")
    parser.add_argument("--episodes", type=int, default=30, help="episodes per evaluation (paper: 30)")
    parser.add_argument("--epsilon", type=float, default=0.05, help="random-action probability (paper: 0.05)")
    parser.add_argument(
        "--results", type=Path, default=results, help=f"where the evaluations are written (default {results})"
    )
    parser.add_argument("--torch-threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    if args.episodes < 1:
        parser.error(f"--episodes {args.episodes} must be >= 1")
    for run_dir in args.runs:
        if not run_dir.is_dir():
            parser.error(f"run directory {run_dir} does not exist")
    torch.set_num_threads(args.torch_threads)
    return args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--perturb",
        nargs="+",
        metavar="PERTURBATION",
        help=f"none, gaussian:SIGMA or fgsm:EPS, in cell values (default: {' '.join(PERTURBATIONS)}; "
        f"with --attacker, fgsm:EPS only, default: {' '.join(TRANSFERRED)})",
    )
    parser.add_argument(
        "--attacker",
        type=Path,
        metavar="RUN",
        help="a result folder or run directory whose best weights craft the FGSM steps (a transferred "
        "attack) for every run given but itself",
    )
    args = parse_replay_options(parser, argv, RESULTS, "result folders or run directories to evaluate")
    try:
        texts = args.perturb or list(PERTURBATIONS if args.attacker is None else TRANSFERRED)
        perturbations = [Perturbation.parse(text) for text in texts]
        if args.attacker is not None:
            perturbations = [transferred(p, args.attacker) for p in perturbations]
    except ValueError as error:
        parser.error(str(error))
    for number, run_dir in enumerate(args.runs, start=1):
        print(f"[{number}/{len(args.runs)}] {run_dir}", flush=True)
        if args.attacker is not None and run_config(run_dir) == run_config(args.attacker):
            print(f"{run_dir.name} is the attacker: not attacked with its own weights", flush=True)
            continue
        try:
            attacker = None if args.attacker is None else best_weights(args.attacker)
            evaluate_run(run_dir, perturbations, args.results, args.episodes, args.epsilon, attacker)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    files = sorted(args.results.glob("*/*.json"))
    if not files:
        print(f"no evaluations under {args.results}: give run directories to evaluate", file=sys.stderr)
        return 1
    labels = dict(ignore=SAME_IN_EFFECT, reference=preset_values)
    rows = results_table(files, **labels)
    rows.sort(key=row_order)
    table = write_table(rows, args.results / "robustness.md")
    short = args.results / "robustness-summary.md"
    brief = summary(files, labels)
    write_atomic(short, brief + "\n")
    written = [table, short]
    try:
        figure = args.results / "robustness.png"
        written.append(plot_robustness(files, figure, chance_scores(), "MinAtar", **labels))
    except ValueError as error:  # only unperturbed evaluations so far
        print(f"no figure: {error}", file=sys.stderr)
    print(brief)
    print(f"written: {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
