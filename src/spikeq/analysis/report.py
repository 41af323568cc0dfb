"""Learning curves and results tables from run directories.

    spikeq report runs/Pong-dsqn-s0-* runs/Pong-dqn-s0-* --out pong.png
    spikeq table runs/*/ converted-evaluation.json --out results.md

Curves: evaluation score against agent steps, one line per run.
Each run's ``eval.csv`` gives the mean evaluation score (line) and its standard deviation over the
evaluation episodes (band) at every evaluation step; runs are labelled ``<model> s<seed>`` (spiking
models ``<model> s<seed> T=<T>``) from their ``config.yaml``. Training writes ``eval.png`` of its own
run after every evaluation.

Tables: one row per game, model and perturbation, from each run's final ``evaluation.json`` (or the JSON of
``spikeq evaluate --out``): the score averaged over runs (seeds) with its spread across runs, the
human-normalised score, the energy ratio to the ANN and the spikes per action.

Comparisons of a model's runs with a baseline's, with bootstrap intervals: ``spikeq.analysis.compare``.

Runs of one game and model that were trained with different settings (an ablation: T, the reset's
gradient, a learning rate) are never averaged together: tables and the study's curves give each
setting a row or a line of its own, labelled with the config fields in which the runs differ
(``setting_labels``). Given each run's preset values (``reference``, from
``spikeq.experiment.config.preset_values``), a run is labelled only by where it departs from its
preset, so the preset's own runs keep the plain row (and their place in comparisons) beside an ablation.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
import numpy as np
import yaml

from spikeq.analysis.evaluate import Evaluation
from spikeq.analysis.perturb import Perturbation
from spikeq.files import atomic_path, write_atomic


def save_figure(figure: plt.Figure, out: Path) -> Path:
    """Write ``figure`` to ``out`` (its folder created) and close it."""
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    file_format = out.suffix.lstrip(".") or plt.rcParams["savefig.format"]  # not the temporary name's
    with atomic_path(out) as tmp:
        figure.savefig(tmp, dpi=120, format=file_format)
    plt.close(figure)
    return out


def read_curve(run_dir: Path) -> tuple[list[int], list[float], list[float]]:
    """Steps, mean scores and score standard deviations of a run's ``eval.csv``."""
    path = Path(run_dir) / "eval.csv"
    if not path.exists():
        reason = "no evaluation yet" if (Path(run_dir) / "config.yaml").exists() else "is it a spikeq run?"
        raise ValueError(f"{run_dir} has no eval.csv ({reason})")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return (
        [int(r["step"]) for r in rows],
        [float(r["score_mean"]) for r in rows],
        [float(r["score_std"]) for r in rows],
    )


TRAINING_CURVE = "training_curve.csv"
# train.csv's columns that a training curve keeps: SB3's mean return and length of the last 100 training
# episodes (played epsilon-greedily), and each spiking layer's firing rate.
_TRAINING_COLUMNS = {"rollout/ep_rew_mean": "return", "rollout/ep_len_mean": "episode_length"}
_FIRING = "train/firing_rate/"


def write_training_curve(run_dir: Path, out: Path, points: int = 100) -> Path:
    """A run's ``train.csv`` sampled at ``points`` evenly spaced agent steps, as a small CSV to keep.

    SB3 logs the training return every few episodes, so ``train.csv`` has a row every few hundred
    steps (hundreds of kB for a 1M-step run) at steps that differ between seeds. This keeps, at every
    ``steps / points`` agent steps of the run's budget (its config's ``steps``), the latest value logged
    at or before that step of: ``return`` and ``episode_length`` (SB3's means over the last 100
    training episodes) and ``firing_rate/<layer>`` (spiking models). Seeds of one budget share the
    steps, so their curves can be averaged. Steps before the first logged episode have no return.

    :param run_dir: a run directory (``config.yaml``, ``train.csv``)
    :param out: the CSV file to write (atomically)
    :param points: how many steps to keep
    :return: ``out``
    """
    run_dir, out = Path(run_dir), Path(out)
    budget = run_config(run_dir).get("steps")
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"{run_dir}/config.yaml: steps {budget!r} must be a positive integer")
    with (run_dir / "train.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        firing = sorted(name for name in reader.fieldnames or () if name.startswith(_FIRING))
        names = _TRAINING_COLUMNS | {name: f"firing_rate/{name.removeprefix(_FIRING)}" for name in firing}
        every = max(1, budget // points)  # a budget under ``points`` steps keeps every step
        latest: dict[str, str] = {}
        grid: list[dict[str, Any]] = []
        point = every  # the next grid step to sample
        step = 0
        for row in reader:
            step = int(row["step"])
            while point < step:  # the grid steps this row comes after
                grid.append({"step": point, **latest})
                point += every
            latest.update({names[name]: row[name] for name in names if row.get(name)})
    while point <= step:  # and those up to the last row, which they include
        grid.append({"step": point, **latest})
        point += every
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", *names.values()])
        writer.writeheader()
        writer.writerows(grid)
    return out


def read_training_curve(run_dir: Path, column: str = "return") -> tuple[list[int], list[float]]:
    """Steps and values of a column of a run's ``training_curve.csv`` (``write_training_curve``): the
    training ``return`` (default), ``episode_length`` or a spiking layer's ``firing_rate/<layer>``.

    :raises ValueError: where the run has no such file or the file no such column
    """
    path = Path(run_dir) / TRAINING_CURVE
    if not path.exists():
        raise ValueError(f"{run_dir} has no {TRAINING_CURVE}: write it with write_training_curve")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if column not in (reader.fieldnames or []):
            raise ValueError(f"{path} has no column {column!r}; it has {reader.fieldnames}")
        rows = [row for row in reader if row[column]]
    return [int(row["step"]) for row in rows], [float(row[column]) for row in rows]


def firing_layers(run_dir: Path) -> list[str]:
    """The spiking layers whose firing rate a run's ``training_curve.csv`` holds (none for a DQN)."""
    path = Path(run_dir) / TRAINING_CURVE
    with path.open(newline="") as f:
        names = next(csv.reader(f), [])
    return [name.removeprefix("firing_rate/") for name in names if name.startswith("firing_rate/")]


def run_config(run_dir: Path) -> dict[str, Any]:
    """A run's ``config.yaml`` as plain data (``{}`` when it has none): reports only label and group
    runs by it; ``spikeq.experiment.config.TrainConfig.load`` is what validates it for training.

    :raises ValueError: for a file that is not a YAML mapping
    """
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a spikeq config (a YAML mapping of config fields)")
    return data


# Config fields that say where and how a run ran, not what it trained (the engine, its backend and
# recomputation give the same spikes and Q); ``steps`` (the budget) has a column of its own, and game,
# model and init are compared anyway.
UNCOMPARED_FIELDS = frozenset(
    {"seed", "steps", "device", "torch_threads", "vec_env", "wandb", "wandb_project", "tags", "out_dir",
     "checkpoint_freq", "save_replay", "engine", "backend", "recompute", "game", "model", "init"}
)  # fmt: skip


# A run's preset values: its config -> every field as its preset and model set it, as config.yaml
# writes them (None where the config names no known preset).
Reference = Callable[[dict[str, Any]], dict[str, Any] | None]


def setting_labels(
    configs: list[dict[str, Any]], ignore: Iterable[str] = (), reference: Reference | None = None
) -> list[str]:
    """Name, for each of a group of runs (one game, model and init), the settings that set it apart:
    ``"detach_reset=False, num_steps=16"``, or ``""``.

    Without ``reference``, a run is labelled by the fields in which the group's runs differ, each with
    its value (every run of an ablation and of its baseline gets a label). With it, a run is labelled by
    the fields in which it departs from its preset (``reference(config)``), whether or not the group
    holds other runs: the preset's own runs get ``""``, and so does a group of one setting only where it
    is the preset's. Where the group's runs are all labelled one way, two runs get the same label only
    where they agree in every field compared. Fields in ``UNCOMPARED_FIELDS`` or ``ignore`` are not
    compared, nor fields missing from a config (written by an earlier version of spikeq); a run without
    a config (``spikeq evaluate --out``) gets ``""``.

    :param configs: the runs' ``config.yaml`` contents (``{}`` where there is none)
    :param ignore: further fields to leave out, where a study shows they changed nothing
    :param reference: a run's preset values (``spikeq.experiment.config.preset_values``)
    """
    known = [config for config in configs if config]
    skipped = UNCOMPARED_FIELDS | set(ignore)
    shared = set.intersection(*(set(config) for config in known)) - skipped if known else set()
    differing = sorted(key for key in shared if len({repr(config[key]) for config in known}) > 1)

    def label(config: dict[str, Any]) -> str:
        preset = reference(config) if reference is not None and config else None
        if preset is None:
            keys = differing
        else:
            compared = set(config) & set(preset) - skipped
            keys = sorted(key for key in compared if repr(config[key]) != repr(preset[key]))
        return ", ".join(f"{key}={config[key]}" for key in keys) if config else ""

    return [label(config) for config in configs]


def _label(run_dir: Path) -> str:
    config = run_config(run_dir)
    if not config:
        return Path(run_dir).name
    label = f"{config.get('model')} s{config.get('seed')}"
    return label if config.get("model") == "dqn" else f"{label} T={config.get('num_steps')}"


def plot_runs(run_dirs: list[Path], out: Path, title: str | None = None) -> Path:
    """Plot the evaluation curves of ``run_dirs`` into the image ``out`` (PNG, SVG or PDF).

    :param run_dirs: spikeq run directories
    :param out: the image file to write
    :param title: figure title (default: the games of the runs)
    :return: ``out``
    """
    if not run_dirs:
        raise ValueError("no run directories given")
    figure, axes = plt.subplots(figsize=(7, 4.2))
    games = []
    for run_dir in run_dirs:
        steps, means, stds = read_curve(run_dir)
        line = axes.plot(steps, means, marker="o", markersize=3, label=_label(run_dir))[0]
        low = [m - s for m, s in zip(means, stds, strict=True)]
        high = [m + s for m, s in zip(means, stds, strict=True)]
        axes.fill_between(steps, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
        if "game" in (config := run_config(run_dir)):
            games.append(config["game"])
    axes.set_xlabel("agent steps")
    axes.set_ylabel("evaluation score (mean ± std over episodes)")
    axes.set_title(title or ", ".join(dict.fromkeys(games)) or "evaluation")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return save_figure(figure, out)


@dataclass(frozen=True)
class EvaluationRecord:
    """An evaluation read back from a file, with what was evaluated.

    :param evaluation: the scores and the energy per action
    :param model: the model evaluated (``dsqn``, ``dqn``, ``dqn-converted``, ``random`` ...)
    :param init: a spiking model's initialisation (``None`` for an ANN or where not recorded)
    :param train_seed: the seed of its training run (``None`` where not recorded)
    :param train_steps: the step budget of its training run (``None`` where not recorded)
    :param config: its training run's ``config.yaml`` (empty for a ``spikeq evaluate --out`` file)
    """

    evaluation: Evaluation
    model: str
    init: str | None = None
    train_seed: int | None = None
    train_steps: int | None = None
    config: dict[str, Any] = field(default_factory=dict)


def read_result(path: Path) -> EvaluationRecord:
    """One evaluation: a finished run directory (its ``evaluation.json``, with the training seed from
    its ``config.yaml``) or a JSON file written by ``spikeq evaluate --out``, with the training run's
    ``config.yaml`` where one lies beside it (as the MinAtar robustness study keeps them), so that
    ablations are told apart as their runs' own evaluations are.

    :raises ValueError: for anything else, or a result that does not say its game and model
    """
    path = Path(path)
    config: dict[str, Any] = {}
    if path.is_dir():
        file = path / "evaluation.json"
        if not file.exists():
            raise ValueError(f"{path} has no evaluation.json: has the run finished?")
        data = json.loads(file.read_text())
        if config := run_config(path):
            model = data.get("model", config.get("model"))
            data = {
                **data,
                "model": model,
                "train_seed": config.get("seed"),
                "train_steps": config.get("steps"),
                "init": config.get("init") if model != "dqn" else None,
            }
    elif path.suffix == ".json" and path.exists():
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or "score_mean" not in data:
            raise ValueError(f"{path} is not an evaluation result (spikeq evaluate --out)")
        config = run_config(path.parent)
    else:
        raise ValueError(f"{path} is neither a run directory nor an evaluation JSON file")
    for key in ("game", "model"):
        if not data.get(key):
            raise ValueError(f"{path} does not record its {key}")
    try:
        evaluation = Evaluation.from_dict(data)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return EvaluationRecord(
        evaluation, data["model"], data.get("init"), data.get("train_seed"), data.get("train_steps"), config
    )


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def grouped_results(
    paths: list[Path], ignore: Iterable[str] = (), reference: Reference | None = None
) -> dict[tuple[str, str, str | None, str, int | None, str], list[EvaluationRecord]]:
    """The evaluations read from ``paths``, grouped by (game, model, init, perturbation, step budget,
    setting): the runs (seeds) of one group differ in nothing but their seed and what ``ignore`` and
    ``UNCOMPARED_FIELDS`` name. ``setting`` is ``setting_labels``'s label (``ignore`` and
    ``reference`` passed to it), ``""`` where there is none.
    """
    if not paths:
        raise ValueError("no run directories or evaluation files given")
    groups: dict[tuple[str, str, str | None, str, int | None], list[EvaluationRecord]] = {}
    for path in paths:
        record = read_result(path)
        evaluation = record.evaluation
        key = (evaluation.game, record.model, record.init, evaluation.perturbation, record.train_steps)
        groups.setdefault(key, []).append(record)
    settings: dict[tuple[str, str, str | None, str, int | None, str], list[EvaluationRecord]] = {}
    for key, records in groups.items():
        labels = setting_labels([record.config for record in records], ignore, reference)
        for record, label in zip(records, labels, strict=True):
            settings.setdefault((*key, label), []).append(record)
    return settings


def results_table(
    paths: list[Path], ignore: Iterable[str] = (), reference: Reference | None = None
) -> list[dict[str, Any]]:
    """One row per (game, model, init, setting, perturbation, step budget): the evaluations of its runs
    (seeds) summarised.

    Columns: ``game``, ``model``, ``init`` (a spiking model's initialisation, from its config),
    ``setting`` (the config fields that set these runs apart, ``None`` where none do:
    ``setting_labels``, which ``ignore`` and ``reference`` are passed to),
    ``perturbation`` (``spikeq evaluate --perturb``), ``num_steps`` (T;
    None for an ANN), ``runs``, ``seeds``, ``train_steps`` (the runs' step budget, from their
    config.yaml; runs of different budgets get rows of their own), ``score`` (mean over runs of each
    run's mean score),
    ``score_sd`` (standard deviation of those means across runs, ddof 1; None for one run),
    ``run_scores`` (each run's mean score, in the order of ``seeds``), ``episode_sd`` (for one run, the
    standard deviation of its score over its evaluation episodes; None for several),
    ``human_normalized``, ``energy_ratio`` (E_SNN / E_ANN, 1 for an ANN), ``spikes_per_action`` and
    ``firing_rate`` (all spiking neurons together: spikes / (neurons x T) per decision), each the mean
    over runs.
    """
    rows = []
    groups = grouped_results(paths, ignore, reference)
    for (game, model, init, perturbation, train_steps, setting), records in groups.items():
        evaluations = [record.evaluation for record in records]
        energies = [evaluation.energy for evaluation in evaluations if evaluation.energy is not None]
        scores = [evaluation.score_mean for evaluation in evaluations]
        rows.append(
            {
                "game": game,
                "model": model,
                "init": init,
                "setting": setting or None,
                "perturbation": perturbation,
                "num_steps": energies[0].num_steps if energies else None,
                "runs": len(records),
                "seeds": [record.train_seed for record in records],
                "train_steps": train_steps,
                "score": float(np.mean(scores)),
                "score_sd": float(np.std(scores, ddof=1)) if len(scores) > 1 else None,
                "run_scores": scores,
                "episode_sd": evaluations[0].score_std if len(evaluations) == 1 else None,
                "human_normalized": _mean([evaluation.human_normalized for evaluation in evaluations]),
                "energy_ratio": _mean([energy.energy_ratio for energy in energies]),
                "spikes_per_action": _mean([energy.spikes_per_action for energy in energies]),
                "firing_rate": _mean([energy.mean_firing_rate for energy in energies]),
            }
        )
    return rows


def _cell(value: Any, spec: str, missing: str = "n/a") -> str:
    if value is None:
        return missing
    if isinstance(value, list):
        return ",".join("?" if v is None else str(v) for v in value)
    return format(value, spec)


_TABLE = (
    ("game", "game", "s"),
    ("model", "model", "s"),
    ("init", "init", "s"),
    ("perturbation", "perturbation", "s"),
    ("T", "num_steps", "d"),
    ("runs", "runs", "d"),
    ("seeds", "seeds", "s"),
    ("trained steps", "train_steps", ",d"),
    ("score", "score", ".2f"),
    ("score sd (runs)", "score_sd", ".2f"),
    ("human-normalised", "human_normalized", ".3f"),
    ("energy ratio", "energy_ratio", ".4f"),
    ("spikes / action", "spikes_per_action", ",.0f"),
    ("firing rate", "firing_rate", ".3f"),
)


def format_table(rows: list[dict[str, Any]]) -> str:
    """``results_table``'s rows as a Markdown table."""
    lines = ["| " + " | ".join(title for title, _, _ in _TABLE) + " |"]
    lines.append("|" + "|".join("---" if spec == "s" else "---:" for _, _, spec in _TABLE) + "|")
    for row in rows:
        if row.get("setting"):  # an ablation's row: the model with the settings that set it apart
            row = {**row, "model": f"{row['model']} ({row['setting']})"}
        lines.append("| " + " | ".join(_cell(row[key], spec) for _, key, spec in _TABLE) + " |")
    return "\n".join(lines)


def format_summary(rows: list[dict[str, Any]]) -> str:
    """``results_table``'s rows as the short Markdown table a README shows: for several runs their mean
    score and each run's in brackets (in the order of the seeds), for one run its score ± its standard
    deviation over the evaluation episodes; blank cells where a value does not apply."""
    titles = ("game", "model", "init", "T", "seeds", "trained steps", "score", "energy ratio")
    lines = ["| " + " | ".join((*titles, "spikes / action", "firing rate")) + " |"]
    lines.append("|---|---|---|---:|---|---:|---:|---:|---:|---:|")
    for row in rows:
        model = f"{row['model']} ({row['setting']})" if row.get("setting") else row["model"]
        if row["perturbation"] != "none":
            model = f"{model}, {row['perturbation']}"
        if row["runs"] > 1:
            score = f"{row['score']:.2f} ({', '.join(f'{value:.2f}' for value in row['run_scores'])})"
        else:
            score = f"{row['score']:.2f} ± {row['episode_sd']:.2f}"
        seeds = ", ".join(str(seed) for seed in row["seeds"] if seed is not None)
        cells = [
            row["game"],
            model,
            row["init"] or "",
            _cell(row["num_steps"], "d", ""),
            seeds,
            _cell(row["train_steps"], ",d", ""),
            score,
            _cell(row["energy_ratio"], ".3f", ""),
            _cell(row["spikes_per_action"] if row["firing_rate"] is not None else None, ",.0f", ""),
            _cell(row["firing_rate"], ".3f", ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_table(rows: list[dict[str, Any]], out: Path) -> Path:
    """Write ``results_table``'s rows as Markdown (``.md``) or CSV (``.csv``)."""
    out = Path(out)
    if out.suffix not in (".md", ".csv"):
        raise ValueError(f"table file {out.name!r}: allowed suffixes .md, .csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".md":
        write_atomic(out, format_table(rows) + "\n")
        return out
    with atomic_path(out) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            lists = {key: _cell(row[key], "s") for key in ("seeds", "run_scores")}
            writer.writerow({**row, **lists})
    return out


def plot_learning_curves(
    run_dirs: list[Path],
    out: Path,
    chance: dict[str, float] | None = None,
    title: str | None = None,
    ignore: Iterable[str] = (),
    training: bool = False,
    reference: Reference | None = None,
) -> Path:
    """One panel per game: each model's evaluation score against agent steps, the mean over its runs
    (seeds) as a line and the range of the runs (min to max) as a band; with ``training``, its training
    return instead (``training_curve.csv``: SB3's mean over the last 100 epsilon-greedy episodes).

    A step enters a model's mean only when every one of its runs has reached it, so a run still in
    progress does not bend the curve. Runs of one model with different settings get lines of their own
    (``setting_labels``, which ``ignore`` and ``reference`` are passed to), and so do runs of other step
    budgets, named where a game has several.

    :param run_dirs: run directories (``config.yaml`` + ``eval.csv``, or ``training_curve.csv``, each)
    :param out: the image file to write
    :param chance: game -> the random policy's score, drawn as a dashed line
    :param title: figure title
    :param ignore: config fields not to tell settings apart by
    :param training: plot the training return rather than the evaluation score
    :param reference: a run's preset values (``setting_labels``)
    :return: ``out``
    """
    curves = _curves(run_dirs, ignore, reference, "return" if training else None)
    figure, panels = plt.subplots(1, len(curves), figsize=(max(6.0, 4.2 * len(curves)), 3.8), squeeze=False)
    colours = _colours(curves)
    for axes, (game, lines) in zip(panels[0], sorted(curves.items()), strict=True):
        _draw_panel(axes, game, lines, colours, chance, training)
        axes.legend(fontsize=7)
    panels[0][0].set_ylabel(_Y_LABELS[training])
    figure.suptitle(f"{title + ': ' if title else ''}mean over seeds (n runs), band min-max", fontsize=9)
    return save_figure(figure, out)


def split_by_budget(run_dirs: list[Path]) -> tuple[list[Path], list[Path]]:
    """The runs trained for their game's longest step budget (config ``steps``), and the others.

    In a study the longest runs are its main comparison and the shorter ones its ablations and trials
    (``plot_ablations``); a game whose runs all share one budget has no shorter runs.

    :param run_dirs: run directories with a ``config.yaml`` naming the game and the steps
    :return: (the longest runs, the shorter runs), each in the order given
    """
    budgets = _budgets(run_dirs)
    longest = _longest(budgets.values())
    main = [run for run, (game, steps) in budgets.items() if steps == longest[game]]
    return main, [run for run in budgets if run not in main]


def _budgets(run_dirs: list[Path]) -> dict[Path, tuple[str, int]]:
    """Each run's game and step budget, from its ``config.yaml``."""
    budgets = {}
    for run_dir in run_dirs:
        config = run_config(run_dir)
        if not isinstance(config.get("steps"), int) or "game" not in config:
            raise ValueError(f"{run_dir} has no config.yaml naming its game and its steps")
        budgets[run_dir] = (config["game"], config["steps"])
    return budgets


def _longest(budgets: Iterable[tuple[str, int]]) -> dict[str, int]:
    """game -> the longest of the given (game, steps) budgets."""
    longest: dict[str, int] = {}
    for game, steps in budgets:
        longest[game] = max(steps, longest.get(game, 0))
    return longest


def plot_ablations(
    run_dirs: list[Path],
    out: Path,
    chance: dict[str, float] | None = None,
    title: str | None = None,
    ignore: Iterable[str] = (),
    reference: Reference | None = None,
) -> Path:
    """The shorter runs of each game beside its longest ones, over the shorter runs' steps.

    One column per game that has runs shorter than its longest (``split_by_budget``): the evaluation
    score on top and, where the runs have a ``training_curve.csv``, the training return below, of every
    run of the game, drawn as ``plot_learning_curves`` draws them up to the longest of the shorter
    budgets; one legend for the figure, one colour per line in every panel.

    :param run_dirs: run directories (``config.yaml`` + ``eval.csv`` each)
    :param out: the image file to write
    :param chance: game -> the random policy's score, drawn as a dashed line
    :param title: figure title
    :param ignore: config fields not to tell settings apart by
    :param reference: a run's preset values (``setting_labels``)
    :return: ``out``
    :raises ValueError: where no game has runs shorter than its longest
    """
    budgets = _budgets(run_dirs)
    _, shorter = split_by_budget(run_dirs)
    if not shorter:
        raise ValueError("every game's runs share one step budget: there are no shorter runs to plot")
    horizon = _longest(budgets[run] for run in shorter)  # game -> its longest short budget
    runs = [run for run in run_dirs if budgets[run][0] in horizon]
    rows = [False, True] if all((run / TRAINING_CURVE).exists() for run in runs) else [False]
    curves = {
        training: _curves(runs, ignore, reference, "return" if training else None, horizon)
        for training in rows
    }
    colours = _colours(curves[False])
    games = sorted(horizon)
    figure, panels = _panels_and_legend_column(len(rows), len(games))
    for row, training in enumerate(rows):
        for axes, game in zip(panels[row], games, strict=False):  # the legend's column has no game
            _draw_panel(axes, game, curves[training][game], colours, chance, training)
        panels[row][0].set_ylabel(_Y_LABELS[training])
    _legend_in_last_column(panels)
    figure.suptitle(
        f"{title + ': ' if title else ''}the runs shorter than their game's longest, beside the longest "
        "over the same steps\nmean over seeds (n runs), band min-max",
        fontsize=9,
    )
    return save_figure(figure, out)


def plot_firing_rates(
    run_dirs: list[Path],
    out: Path,
    title: str | None = None,
    ignore: Iterable[str] = (),
    reference: Reference | None = None,
) -> Path:
    """How the spiking runs' layers fire while they train: one row of panels per spiking layer, one
    column per game, and in each a line per model, setting and step budget (as ``plot_learning_curves``
    draws them): the mean over its runs (seeds) of the share of the layer's neuron-steps that spiked on
    the training batches (``train/firing_rate/<layer>``, as ``training_curve.csv`` samples it), the
    runs' range as a band. A layer near 0 passes almost nothing on (the silent network), one near 1
    hardly more information.

    :param run_dirs: run directories with a ``training_curve.csv``; runs without firing rates in it (DQNs)
        are left out
    :param out: the image file to write
    :param title: figure title
    :param ignore: config fields not to tell settings apart by
    :param reference: a run's preset values (``setting_labels``)
    :return: ``out``
    :raises ValueError: where no run has firing rates
    """
    layers_of = {run: firing_layers(run) for run in run_dirs}
    layers = list(dict.fromkeys(layer for layers in layers_of.values() for layer in layers))  # conv1 first
    if not layers:
        raise ValueError("none of the runs has firing rates in its training_curve.csv (a DQN has none)")
    # layer -> game -> line -> its runs' {step: firing rate}
    curves = {
        layer: _curves(
            [run for run in run_dirs if layer in layers_of[run]], ignore, reference, f"firing_rate/{layer}"
        )
        for layer in layers
    }
    games = sorted({game for by_game in curves.values() for game in by_game})
    colours = _colours(
        {f"{layer} {game}": lines for layer in layers for game, lines in curves[layer].items()}
    )
    figure, panels = _panels_and_legend_column(len(layers), len(games))
    for row, layer in enumerate(layers):
        for axes, game in zip(panels[row], games, strict=False):  # the legend's column has no game
            if game in curves[layer]:
                _draw_panel(axes, game, curves[layer][game], colours, None, training=True)
            axes.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        panels[row][0].set_ylabel(f"{layer}: neuron-steps that spiked")
    _legend_in_last_column(panels)
    figure.suptitle(
        f"{title + ': ' if title else ''}firing rate on the training batches, mean over seeds (n runs), "
        "band min-max",
        fontsize=9,
    )
    return save_figure(figure, out)


def plot_robustness(
    paths: list[Path],
    out: Path,
    chance: dict[str, float] | None = None,
    title: str | None = None,
    ignore: Iterable[str] = (),
    reference: Reference | None = None,
) -> Path:
    """Score against perturbation strength: one row of panels per game, one panel per kind of
    perturbation (``fgsm``, ``gaussian``, and ``fgsm@NAME``, an FGSM attack crafted on NAME's network),
    one line per model, setting and step budget (named where a game has several).

    A line is the mean over its runs (seeds) of each run's mean score at each strength, with the runs'
    range as a band; the unperturbed evaluations (``none``) of the runs in a panel are its point at
    strength 0 there (an attacker's own run has no transferred attack). Strengths are spaced evenly,
    labelled with their values.

    :param paths: evaluation results with their perturbation (``read_result``: files of
        ``spikeq evaluate --out``, with their runs' ``config.yaml`` beside them to tell settings apart)
    :param out: the image file to write
    :param chance: game -> the random policy's score, drawn as a dashed line
    :param title: figure title
    :param ignore: config fields not to tell settings apart by
    :param reference: a run's preset values (``setting_labels``)
    :return: ``out``
    :raises ValueError: where no result is perturbed
    """
    groups = grouped_results(paths, ignore, reference)
    several_budgets = differing_groups((game, steps) for game, _, _, _, steps, _ in groups)
    # game -> line -> kind (Perturbation.family) -> strength -> run (seed, budget) -> its mean score
    scores: dict[str, dict[str, dict[str, dict[float, dict[tuple, float]]]]] = {}
    for (game, model, init, perturbation, train_steps, setting), records in groups.items():
        perturbed = Perturbation.parse(perturbation)
        line = _line_label(model, init, setting, train_steps if game in several_budgets else None)
        by_strength = scores.setdefault(game, {}).setdefault(line, {}).setdefault(perturbed.family, {})
        by_strength.setdefault(perturbed.strength, {}).update(
            {(r.train_seed, r.train_steps): r.evaluation.score_mean for r in records}
        )
    kinds = sorted({kind for lines in scores.values() for line in lines.values() for kind in line} - {"none"})
    if not kinds:
        raise ValueError("no perturbed evaluation among the results: nothing to plot against strength")
    games = sorted(scores)
    lines = sorted({line for by_line in scores.values() for line in by_line})
    colours = {line: f"C{i}" for i, line in enumerate(lines)}
    figure, panels = _panels_and_legend_column(len(games), len(kinds))
    for row, game in enumerate(games):
        for axes, kind in zip(panels[row], kinds, strict=False):  # the legend's column has no kind
            _draw_robustness_panel(axes, game, kind, scores[game], colours, chance)
        panels[row][0].set_ylabel("evaluation score")
    _legend_in_last_column(panels)
    figure.suptitle(
        f"{title + ': ' if title else ''}score under perturbed observations\n"
        "mean over seeds (n runs), band min-max",
        fontsize=9,
    )
    return save_figure(figure, out)


def plot_timesteps(
    rows: list[dict[str, Any]],
    out: Path,
    chance: dict[str, float] | None = None,
    title: str | None = None,
) -> Path:
    """Score and energy against T, the simulation steps per decision trained spiking networks were
    evaluated at: one row of panels per game, its score and its energy ratio (E_SNN / E_ANN), one line
    per model, setting and training budget.

    A line is the mean over its runs (seeds) of each run's mean score at each T, with the runs' range
    as a band, and the runs' mean energy ratio; T on a base-2 log axis.

    :param rows: ``results_table``'s rows of spiking networks, one per game, model, setting and T
    :param out: the image file to write
    :param chance: game -> the random policy's score, drawn as a dashed line
    :param title: figure title
    :raises ValueError: for no rows, or a row of a network that does not spike
    """
    lines: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}  # game -> line -> T -> row
    for row in rows:
        if row["num_steps"] is None:
            raise ValueError(f"{row['game']} {row['model']}: not a spiking network, it has no T")
        # runs of other budgets are lines of their own
        label = _line_label(row["model"], row["init"], row["setting"], row["train_steps"])
        lines.setdefault(row["game"], {}).setdefault(label, {})[row["num_steps"]] = row
    if not lines:
        raise ValueError("no evaluations to plot against T")
    games = sorted(lines)
    colours = {line: f"C{i}" for i, line in enumerate(sorted({line for by in lines.values() for line in by}))}
    figure, panels = _panels_and_legend_column(len(games), 2)
    for (score_axes, energy_axes, _), game in zip(panels, games, strict=True):
        steps = sorted({t for by_steps in lines[game].values() for t in by_steps})
        for line, by_steps in sorted(lines[game].items()):
            ts = sorted(by_steps)
            scores = [by_steps[t]["score"] for t in ts]
            score_axes.plot(ts, scores, marker="o", markersize=3, color=colours[line], label=line)
            lowest = [min(by_steps[t]["run_scores"]) for t in ts]
            highest = [max(by_steps[t]["run_scores"]) for t in ts]
            score_axes.fill_between(ts, lowest, highest, color=colours[line], alpha=0.2)
            ratios = [by_steps[t]["energy_ratio"] for t in ts]
            energy_axes.plot(ts, ratios, marker="o", markersize=3, color=colours[line])
        energy_axes.set_ylim(bottom=0)
        if chance and game in chance:
            score_axes.axhline(chance[game], color="grey", linestyle="--", linewidth=1, label="random")
        for axes, what in ((score_axes, "score"), (energy_axes, "energy per decision")):
            axes.set_xscale("log", base=2)
            axes.set_xticks(steps, [str(t) for t in steps])
            axes.minorticks_off()
            axes.set_xlabel("T (steps per decision) at evaluation")
            axes.set_title(f"{game}: {what}")
            axes.grid(alpha=0.3)
        score_axes.set_ylabel("evaluation score")
        energy_axes.set_ylabel("E_SNN / E_ANN")
    _legend_in_last_column(panels)
    figure.suptitle(
        f"{title + ': ' if title else ''}trained spiking networks run for T steps per decision\n"
        "score: mean over seeds, band min-max; energy: mean over seeds",
        fontsize=9,
    )
    return save_figure(figure, out)


def _draw_robustness_panel(
    axes: plt.Axes,
    game: str,
    kind: str,
    lines: dict[str, dict[str, dict[float, dict[tuple, float]]]],
    colours: dict[str, str],
    chance: dict[str, float] | None,
) -> None:
    """A game's panel of ``plot_robustness`` for one kind of perturbation: each line's mean score over
    its runs at each strength, the runs' range as a band, strengths spaced evenly.

    :param axes: the panel
    :param game: the game, for the title and the random policy's score
    :param kind: the kind of perturbation (``Perturbation.family``: ``fgsm``, ``gaussian``, ``fgsm@NAME``)
    :param lines: line -> kind -> strength -> run (seed, budget) -> its mean score; kind ``none`` holds
        the unperturbed scores, the line's point at strength 0 for the runs attacked in this panel
    :param colours: line -> its colour
    :param chance: game -> the random policy's score, drawn as a dashed line
    """
    strengths = sorted({0.0} | {s for by_kind in lines.values() for s in by_kind.get(kind, {})})
    for line, by_kind in sorted(lines.items()):
        points = by_kind.get(kind, {})
        attacked = {run for by_run in points.values() for run in by_run}
        plain = by_kind.get("none", {}).get(0.0, {})
        points = {0.0: {run: plain[run] for run in attacked & plain.keys()}, **points}
        xs = [i for i, s in enumerate(strengths) if points.get(s)]
        if not xs:
            continue
        runs = [list(points[strengths[i]].values()) for i in xs]
        means = [float(np.mean(r)) for r in runs]
        label = f"{line} ({len(_runs_of(by_kind))})"
        axes.plot(xs, means, marker="o", markersize=3, color=colours[line], label=label)
        axes.fill_between(xs, [min(r) for r in runs], [max(r) for r in runs], color=colours[line], alpha=0.2)
    if chance and game in chance:
        axes.axhline(chance[game], color="grey", linestyle="--", linewidth=1, label="random")
    axes.set_xticks(range(len(strengths)), [f"{s:g}" for s in strengths])
    attack, _, attacker = kind.partition("@")
    axes.set_title(f"{game}: {attack}" + (f" crafted on {attacker}" if attacker else ""))
    axes.set_xlabel("EPS" if attack == "fgsm" else "SIGMA")
    axes.grid(alpha=0.3)


def _runs_of(by_kind: dict[str, dict[float, dict[tuple, float]]]) -> set[tuple]:
    """Every run of a line of ``plot_robustness``, in any panel."""
    return {run for by_strength in by_kind.values() for by_run in by_strength.values() for run in by_run}


def _panels_and_legend_column(rows: int, columns: int) -> tuple[plt.Figure, np.ndarray]:
    """A grid of ``rows`` x ``columns`` panels and one more column, narrower, for the legend."""
    return plt.subplots(
        rows,
        columns + 1,
        figsize=(4.6 * columns + 3.6, 3.4 * rows),
        squeeze=False,
        gridspec_kw={"width_ratios": [4.6] * columns + [3.6]},
    )


def _legend_in_last_column(panels: np.ndarray) -> None:
    """One legend of every line drawn in the panels (each label once), in the last column's top panel;
    the last column shows nothing else."""
    legend = {}  # label -> line
    for axes in panels[:, :-1].flat:
        lines, labels = axes.get_legend_handles_labels()
        legend.update(zip(labels, lines, strict=True))
    for axes in panels[:, -1]:
        axes.axis("off")
    panels[0][-1].legend(legend.values(), legend.keys(), loc="upper left", fontsize=7, frameon=False)


_Y_LABELS = {False: "evaluation score", True: "training return (last 100 episodes)"}


def _curves(
    run_dirs: list[Path],
    ignore: Iterable[str],
    reference: Reference | None,
    column: str | None,
    horizon: dict[str, int] | None = None,
) -> dict[str, dict[str, list[dict[int, float]]]]:
    """game -> line label -> each of its runs' {step: evaluation score (``column`` None), or the value
    of ``column`` in ``training_curve.csv``}, up to the game's ``horizon`` where given. Runs of other
    step budgets (config ``steps``) are lines of their own, and where a game has several budgets each of
    its lines names its own."""
    # (game, model, init, steps) -> its runs
    groups: dict[tuple[str, str, str | None, int | None], list[Path]] = {}
    for run_dir in run_dirs:
        config = run_config(run_dir)
        if not {"game", "model"} <= config.keys():
            raise ValueError(f"{run_dir} has no config.yaml naming its game and model")
        model = config["model"]
        init = None if model == "dqn" else config.get("init")
        groups.setdefault((config["game"], model, init, config.get("steps")), []).append(run_dir)
    several_budgets = differing_groups((game, steps) for game, _, _, steps in groups)
    curves: dict[str, dict[str, list[dict[int, float]]]] = {}
    for (game, model, init, budget), runs in groups.items():
        settings = setting_labels([run_config(run_dir) for run_dir in runs], ignore, reference)
        last = (horizon or {}).get(game)
        named = budget if game in several_budgets else None
        for run_dir, setting in zip(runs, settings, strict=True):
            steps, values = (
                read_curve(run_dir)[:2] if column is None else read_training_curve(run_dir, column)
            )
            curve = {
                step: value for step, value in zip(steps, values, strict=True) if last is None or step <= last
            }
            curves.setdefault(game, {}).setdefault(_line_label(model, init, setting, named), []).append(curve)
    if not curves:
        raise ValueError("no run directories given")
    return curves


def _line_label(model: str, init: str | None, setting: str | None, train_steps: int | None = None) -> str:
    """A figure's line: ``"dsqn (firing init), detach_reset=False"``; a DQN has no init. With
    ``train_steps``, the runs' step budget too: ``"dqn, 300k steps"``."""
    label = model if init is None else f"{model} ({init} init)"
    label = f"{label}, {setting}" if setting else label
    return f"{label}, {budget_label(train_steps)}" if train_steps else label


def budget_label(train_steps: int) -> str:
    """A step budget as labels name it: ``300000`` -> ``"300k steps"``, ``1000000`` -> ``"1M steps"``."""
    if train_steps % 1_000_000 == 0:
        return f"{train_steps // 1_000_000:,}M steps"
    return f"{train_steps // 1000:,}k steps"


def differing_groups(pairs: Iterable[tuple[Hashable, Hashable]]) -> set[Hashable]:
    """The groups among ``(group, value)`` pairs that hold more than one value: the groups whose rows or
    lines a label tells apart by that value (an init, a step budget), where the others leave it unnamed.
    ``[(("Breakout", "dsqn"), 300_000), (("Breakout", "dsqn"), 1_000_000), (("Breakout", "dqn"), 1_000_000)]``
    -> ``{("Breakout", "dsqn")}``."""
    values: dict[Hashable, set[Hashable]] = {}
    for group, value in pairs:
        values.setdefault(group, set()).add(value)
    return {group for group, seen in values.items() if len(seen) > 1}


def _colours(curves: dict[str, dict[str, list[dict[int, float]]]]) -> dict[str, str]:
    """One colour per line label, the same in every panel (matplotlib's ten, or tab20's twenty where
    there are more lines: no two lines share one)."""
    labels = sorted({line for lines in curves.values() for line in lines})
    if len(labels) <= 10:
        return {line: f"C{i}" for i, line in enumerate(labels)}
    palette = plt.get_cmap("tab20").colors
    return {line: palette[i % len(palette)] for i, line in enumerate(labels)}


def _draw_panel(
    axes: plt.Axes,
    game: str,
    lines: dict[str, list[dict[int, float]]],
    colours: dict[str, str],
    chance: dict[str, float] | None,
    training: bool,
) -> None:
    """A game's lines: the mean over each line's runs at the steps all of them reached, the runs'
    range as a band, and the random policy's score dashed."""
    for line, runs in sorted(lines.items()):
        steps = sorted(set.intersection(*(set(run) for run in runs)))
        scores = np.array([[run[step] for step in steps] for run in runs])  # [runs, steps]
        marker = {} if training else {"marker": "o", "markersize": 3}
        axes.plot(steps, scores.mean(0), color=colours[line], label=f"{line} ({len(runs)})", **marker)
        axes.fill_between(steps, scores.min(0), scores.max(0), color=colours[line], alpha=0.2)
    if chance and game in chance:
        axes.axhline(chance[game], color="grey", linestyle="--", linewidth=1, label="random")
    axes.set_title(game)
    axes.set_xlabel("agent steps")
    axes.xaxis.set_major_formatter(lambda steps, _: f"{steps / 1e3:g}k")
    axes.grid(alpha=0.3)
