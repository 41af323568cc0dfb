"""Experiment tracking: SB3's logger forwarded to W&B and to CSV files in the run directory.

W&B runs offline unless the user is logged in (``WANDB_API_KEY`` or a ``wandb login`` netrc entry)
or asks for ``online``; offline runs land in ``RUN_DIR/wandb/offline-run-*`` and can be uploaded later
with ``wandb sync``. Nothing here needs a network connection.
"""

from __future__ import annotations

import csv
import netrc
import os
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.logger import KVWriter, Logger

from spikeq.files import atomic_path


def wandb_mode(requested: str) -> str:
    """Resolve ``auto`` to ``online`` when the user is logged in to W&B, else ``offline``.

    :param requested: ``auto``, ``online``, ``offline`` or ``disabled``
    """
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "online") and requested == "auto":
        return os.environ["WANDB_MODE"]
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError):
        hosts = {}
    return "online" if any("wandb" in host for host in hosts) else "offline"


def _scalar(value: Any) -> float | int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float | np.integer | np.floating):
        return value.item() if isinstance(value, np.generic) else value
    return None


class WandbWriter(KVWriter):
    """Sends SB3's logged scalars to ``wandb.log`` (SB3's WandbCallback relies on TensorBoard instead).

    :param run: an active ``wandb`` run
    """

    def __init__(self, run: Any) -> None:
        self.run = run

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any], step: int = 0) -> None:
        scalars = {k: _scalar(v) for k, v in key_values.items()}
        self.run.log({k: v for k, v in scalars.items() if v is not None}, step=step)

    def close(self) -> None:
        """The run is finished by its owner."""


class CSVWriter(KVWriter):
    """Appends SB3's logged scalars to a CSV file, one row per dump, ``step`` first.

    New keys widen the file (it is rewritten with the larger header); an existing file is continued,
    so a resumed run keeps one ``train.csv``.

    :param path: the CSV file
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.columns: list[str] = ["step"]
        if self.path.exists() and self.path.stat().st_size:
            with self.path.open(newline="") as f:
                self.columns = next(csv.reader(f))

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any], step: int = 0) -> None:
        row = {k: v for k, v in ((k, _scalar(v)) for k, v in key_values.items()) if v is not None}
        row["step"] = step
        new = [k for k in row if k not in self.columns]
        if new:
            self._widen(self.columns + sorted(new))
        write_header = not self.path.exists() or not self.path.stat().st_size
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            if write_header:
                writer.writeheader()
            writer.writerow(row)

    def _widen(self, columns: list[str]) -> None:
        rows = []
        if self.path.exists() and self.path.stat().st_size:
            with self.path.open(newline="") as f:
                rows = list(csv.DictReader(f))
        self.columns = columns
        with atomic_path(self.path) as tmp, tmp.open("w", newline="") as f:  # a kill keeps the old rows
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    def close(self) -> None:
        """Each write opens and closes the file: nothing is left to flush."""


class Tracker:
    """The run's logger (CSV + W&B) and its W&B run.

    :param run_dir: the run directory (``train.csv`` and ``wandb/`` go there)
    :param config: the resolved config, stored with the W&B run
    :param mode: ``auto``, ``online``, ``offline`` or ``disabled``
    :param project: W&B project
    :param name: run name
    :param tags: W&B tags
    :param run_id: W&B run id to resume (None: a new run)
    """

    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        mode: str = "auto",
        project: str = "spikeq",
        name: str | None = None,
        tags: list[str] | None = None,
        run_id: str | None = None,
    ) -> None:
        self.mode = wandb_mode(mode)
        self.run = None
        writers: list[KVWriter] = [CSVWriter(Path(run_dir) / "train.csv")]
        if self.mode != "disabled":
            import wandb

            self.run = wandb.init(
                project=project,
                name=name,
                config=config,
                tags=tags or None,
                dir=str(run_dir),
                mode=self.mode,
                id=run_id,
                resume="allow" if run_id else None,
                settings=wandb.Settings(console="off", x_disable_stats=True),
            )
            writers.append(WandbWriter(self.run))
        self.logger = Logger(folder=str(run_dir), output_formats=writers)

    @property
    def run_id(self) -> str | None:
        """The W&B run id (kept in the run directory for resuming), or None when disabled."""
        return None if self.run is None else self.run.id

    def summary(self, values: dict[str, Any]) -> None:
        """Set final values (e.g. the best checkpoint's score) on the W&B run."""
        if self.run is not None:
            for key, value in values.items():
                self.run.summary[key] = value

    def finish(self, exit_code: int = 0) -> None:
        """Close the W&B run (offline: its files are complete on disk)."""
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
