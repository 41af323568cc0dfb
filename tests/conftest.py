"""Shared fixtures: one real smoke training run per model, reused by the pipeline and CLI tests."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spikeq.experiment.tracking import child_environment

# The tests' networks are tiny: one thread avoids oversubscribing the two CI cores.
torch.set_num_threads(1)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Without a GPU, the Triton recurrence kernels run in Triton's interpreter (tests/test_kernels.py); the
# engine imports them on first use, after this.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SPIKEQ = [sys.executable, "-m", "spikeq.cli"]


def run_spikeq(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """The real ``spikeq`` command in a child process (W&B offline)."""
    env = {**child_environment(), "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*SPIKEQ, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """``smoke_run(model)``: ``spikeq train --game Pong --model MODEL --preset smoke``, run once per
    session; returns (run directory, finished process)."""
    runs: dict[str, tuple[Path, subprocess.CompletedProcess]] = {}

    def get(model: str) -> tuple[Path, subprocess.CompletedProcess]:
        if model not in runs:
            run_dir = tmp_path_factory.mktemp(f"smoke-{model}") / "run"
            args = (
                "train",
                "--game",
                "Pong",
                "--model",
                model,
                "--preset",
                "smoke",
                "--run-dir",
                str(run_dir),
            )
            runs[model] = (run_dir, run_spikeq(*args))
        return runs[model]

    return get
