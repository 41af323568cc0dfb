"""Experiment tracking: SB3's logger forwarded to W&B and to CSV files in the run directory, and the
spiking layers' firing rates during training.

W&B runs offline unless the user is logged in (``WANDB_API_KEY`` or a ``wandb login`` netrc entry)
or asks for ``online``; offline runs land in ``RUN_DIR/wandb/offline-run-*`` and can be uploaded later
with ``wandb sync``. Nothing here needs a network connection.
"""

from __future__ import annotations

import csv
import netrc
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import KVWriter, Logger
from torch.utils.hooks import RemovableHandle

from spikeq.files import atomic_path
from spikeq.snn.network import SpikingQNetwork

# A spiking layer silent (no spike at all) or saturated (more than SATURATED_RATE of its neuron-steps
# firing) on the training batches of this many consecutive updates is named on the console.
SILENT_STRETCH = 1_000
SATURATED_RATE = 0.95


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


def child_environment() -> dict[str, str]:
    """The environment for a spikeq run started as a child process: this process's, without the
    address of a W&B service it holds (``WANDB_SERVICE``, which wandb sets in a process that used it),
    so that the run starts a service of its own: handed to this process's, an offline run wrote no
    ``run-*.wandb`` file."""
    return {name: value for name, value in os.environ.items() if name != "WANDB_SERVICE"}


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


class FiringMonitor(BaseCallback):
    """Every spiking layer's firing rate on the batches a DQN trains on, and a warning for dead layers.

    The rates are those the online network's forward pass computed anyway (``firing_rates``: the mean
    of each layer's spikes over its neuron-steps and the batch), read once per update. They are logged
    as ``train/firing_rate/<layer>``, averaged over the updates since SB3's logger last wrote (so at its
    log interval, to ``train.csv`` and W&B). A layer that stays silent (rate 0) or saturated (rate above
    ``saturated_rate``) for ``stretch`` consecutive updates gets one ``RuntimeWarning`` per such
    stretch: a silent layer gets no surrogate gradient through its own spikes and passes none to the
    layers before it.

    Example::

        model = DQN("SpikingPolicy", env, policy_kwargs=dict(init="default"))
        model.learn(100_000, callback=FiringMonitor())

    :param stretch: consecutive updates of silence or saturation before the warning
    :param saturated_rate: the rate above which a layer counts as saturated
    """

    def __init__(self, stretch: int = SILENT_STRETCH, saturated_rate: float = SATURATED_RATE) -> None:
        super().__init__()
        if isinstance(stretch, bool) or not isinstance(stretch, int) or stretch < 1:
            raise ValueError(f"stretch={stretch!r} must be an integer >= 1")
        self.stretch = stretch
        self.saturated_rate = saturated_rate
        self.updates = 0
        # layer -> consecutive updates silent / saturated so far
        self.silent: dict[str, int] = {}
        self.saturated: dict[str, int] = {}
        self._hook: RemovableHandle | None = None

    def _on_training_start(self) -> None:
        q_net = self.model.q_net
        if not isinstance(q_net, SpikingQNetwork):
            raise ValueError(
                f"FiringMonitor watches spiking Q-networks; this model's is a {type(q_net).__name__}"
            )
        self._on_training_end()  # a learn() that ended in an exception left its hook behind
        self._hook = q_net.register_forward_hook(self._on_forward)

    def _on_training_end(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _on_step(self) -> bool:
        return True

    def _on_forward(self, q_net: SpikingQNetwork, args: tuple, output: torch.Tensor) -> None:
        if not q_net.training:  # acting and the target network's forward are not updates
            return
        self.updates += 1
        names = list(q_net.firing_rates)
        rates = torch.stack(list(q_net.firing_rates.values())).tolist()  # one device sync
        for name, rate in zip(names, rates, strict=True):
            self.logger.record_mean(f"train/firing_rate/{name}", rate)
            self._count(self.silent, name, rate == 0.0, q_net, "fired in none of its neuron-steps")
            self._count(
                self.saturated,
                name,
                rate > self.saturated_rate,
                q_net,
                f"fired in more than {self.saturated_rate:.0%} of its neuron-steps",
            )

    def _count(
        self, streaks: dict[str, int], name: str, hit: bool, q_net: SpikingQNetwork, what: str
    ) -> None:
        streaks[name] = streaks.get(name, 0) + 1 if hit else 0
        if streaks[name] != self.stretch:
            return
        if q_net.spec.init == "firing":
            advice = (
                "it fired at initialisation (init='firing'): training changed that; try a lower learning rate"
            )
        elif streaks is self.silent:
            advice = "start from a firing network with --init firing (policy_kwargs init='firing')"
        else:
            advice = "try --init firing (every layer starts at 10% firing) or a lower learning rate"
        warnings.warn(
            f"spiking layer {name} {what} on the training batches of the last {self.stretch:,} updates "
            f"(updates {self.updates - self.stretch + 1:,} to {self.updates:,}); {advice}",
            RuntimeWarning,
            stacklevel=1,  # raised from a forward hook: no caller of the user's to point at
        )
