"""Learning curves from run directories: evaluation score against agent steps, one line per run.

    spikeq report runs/Pong-dsqn-s0-* runs/Pong-dqn-s0-* --out pong.png

Each run's ``eval.csv`` gives the mean evaluation score (line) and its standard deviation over the
evaluation episodes (band) at every evaluation step; runs are labelled ``<model> s<seed>`` from
their ``config.yaml``. Training writes ``eval.png`` of its own run after every evaluation.
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt

from spikeq.config import TrainConfig


def read_curve(run_dir: Path) -> tuple[list[int], list[float], list[float]]:
    """Steps, mean scores and score standard deviations of a run's ``eval.csv``."""
    path = Path(run_dir) / "eval.csv"
    if not path.exists():
        raise ValueError(f"{run_dir} has no eval.csv: is it a spikeq run directory?")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return (
        [int(r["step"]) for r in rows],
        [float(r["score_mean"]) for r in rows],
        [float(r["score_std"]) for r in rows],
    )


def _label(run_dir: Path) -> str:
    config_file = Path(run_dir) / "config.yaml"
    if not config_file.exists():
        return Path(run_dir).name
    config = TrainConfig.load(config_file)
    return f"{config.model} s{config.seed}" + (f" T={config.num_steps}" if config.spiking else "")


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
        config_file = Path(run_dir) / "config.yaml"
        if config_file.exists():
            games.append(TrainConfig.load(config_file).game)
    axes.set_xlabel("agent steps")
    axes.set_ylabel("evaluation score (mean ± std over episodes)")
    axes.set_title(title or ", ".join(dict.fromkeys(games)) or "evaluation")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out
