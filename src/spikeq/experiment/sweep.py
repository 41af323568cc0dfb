"""Run a W&B sweep file here, without a W&B server: the grid and random methods.

``wandb agent`` needs a W&B server that hands out the parameter sets. The same YAML file
(``experiments/sweeps/*.yaml``) is read here instead: its parameters are expanded (every combination
for ``grid``, ``count`` draws for ``random``) and each run's ``command`` is built with W&B's macros and
run in turn, in this machine's Python. Each finished run is appended to a state file (JSON lines), so a
sweep that is stopped and started again skips the runs that already succeeded (the same parameters
and the same command). A ``spikeq train`` run gets a run directory of its own next to the state file
(``<state>/<parameters>-<hash>``, from ``--run-dir``), so that a run stopped or failed part-way is
resumed from its last checkpoint when the sweep is started again, not trained from the start. Runs
share the W&B group named after the sweep (``WANDB_RUN_GROUP``), so they appear together when synced.

Supported, as W&B's sweep configuration defines them: ``method`` grid or random; parameters with
``value``, ``values`` (optionally ``probabilities`` for random), or a ``distribution`` (``constant``,
``categorical``, ``uniform``, ``int_uniform``, ``log_uniform_values``, ``q_uniform``) for random;
command macros ``${env}``, ``${interpreter}``, ``${program}``, ``${args}``, ``${args_no_hyphens}``,
``${args_no_boolean_flags}``. Bayesian search needs W&B's server and is refused with that reason.

Several ``spikeq sweep`` processes may work on one file at once (on one machine or on a shared file
system with ``flock``): each run is claimed with an exclusive lock on
``<state>.claims/<run>.lock`` while it runs, so no two processes train the same run, and a process
skips the runs another one has finished or is running. A claim is released when its process ends,
however it ends.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from spikeq.experiment.checkpoints import latest_checkpoint
from spikeq.experiment.tracking import child_environment
from spikeq.files import FileLock, LockedError

METHODS = ("grid", "random")
DISTRIBUTIONS = ("constant", "categorical", "uniform", "int_uniform", "log_uniform_values", "q_uniform")
MACROS = (
    "${env}",
    "${interpreter}",
    "${program}",
    "${args}",
    "${args_no_hyphens}",
    "${args_no_boolean_flags}",
)
# W&B's command when the file gives none.
DEFAULT_COMMAND = ("${env}", "${interpreter}", "${program}", "${args}")


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file.

    :param name: the sweep's name (``name`` in the file, else the file's stem)
    :param method: ``grid`` or ``random``
    :param parameters: name -> W&B parameter specification
    :param command: the command template, W&B macros included
    :param program: what ``${program}`` stands for
    """

    name: str
    method: str
    parameters: dict[str, dict[str, Any]]
    command: tuple[str, ...]
    program: str | None


def _check_parameter(name: str, spec: Any, method: str) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise ValueError(
            f"parameter {name!r}: expected a mapping with value, values or distribution, got {spec!r}"
        )
    if "parameters" in spec:
        raise ValueError(f"parameter {name!r}: nested parameters are not supported")
    if "value" in spec:
        return {"value": spec["value"]}
    distribution = spec.get("distribution", "categorical" if "values" in spec else None)
    if distribution is None:
        raise ValueError(f"parameter {name!r} has none of value, values, distribution")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"parameter {name!r}: unknown distribution {distribution!r}; allowed: {', '.join(DISTRIBUTIONS)}"
        )
    if distribution in ("constant", "categorical"):
        key = "value" if distribution == "constant" else "values"
        if key not in spec or (key == "values" and not (isinstance(spec["values"], list) and spec["values"])):
            raise ValueError(
                f"parameter {name!r}: distribution {distribution} needs {key!r} (a non-empty list for values)"
            )
        if distribution == "constant":
            return {"value": spec["value"]}
        probabilities = spec.get("probabilities")
        if probabilities is not None and (
            len(probabilities) != len(spec["values"]) or not math.isclose(sum(probabilities), 1.0)
        ):
            raise ValueError(f"parameter {name!r}: probabilities must match values and sum to 1")
        return {"values": list(spec["values"]), "probabilities": probabilities}
    if method == "grid":
        raise ValueError(
            f"parameter {name!r}: a grid sweep needs value or values, not distribution {distribution}"
        )
    if "min" not in spec or "max" not in spec or not spec["min"] < spec["max"]:
        raise ValueError(f"parameter {name!r}: distribution {distribution} needs min < max")
    if distribution == "log_uniform_values" and not spec["min"] > 0:
        raise ValueError(f"parameter {name!r}: log_uniform_values needs min > 0")
    checked = {"distribution": distribution, "min": spec["min"], "max": spec["max"]}
    if distribution == "q_uniform":
        checked["q"] = spec.get("q", 1)
    return checked


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> Sweep:
    """Read and check a W&B sweep file.

    :param path: the YAML file
    :param overrides: parameters fixed to a value here (they replace the file's specification)
    :raises ValueError: for a missing file or anything this runner cannot run, naming it
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"sweep file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a sweep configuration (a YAML mapping)")
    method = data.get("method")
    if method == "bayes":
        raise ValueError(
            "method 'bayes' needs W&B's server (its model of past runs); run it with wandb agent"
        )
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    raw = dict(data.get("parameters") or {})
    for name, value in (overrides or {}).items():
        raw[name] = {"value": value}
    if not raw:
        raise ValueError(f"{path} has no parameters")
    parameters = {name: _check_parameter(name, spec, method) for name, spec in raw.items()}
    command = tuple(str(part) for part in data.get("command") or DEFAULT_COMMAND)
    for part in command:
        if part.startswith("${") and part not in MACROS:
            raise ValueError(f"unknown command macro {part}; allowed: {', '.join(MACROS)}")
    if "${program}" in command and not data.get("program"):
        raise ValueError(f"{path}: the command uses ${{program}} but the file names no program")
    name = str(data.get("name") or path.stem)
    # The name becomes a file name under runs/sweeps/: no path separators, no leading dot.
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(
            f"sweep name {name!r} is not allowed; allowed: letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return Sweep(name, method, parameters, command, data.get("program"))


def _draw(spec: dict[str, Any], rng: np.random.Generator) -> Any:
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return spec["values"][rng.choice(len(spec["values"]), p=spec["probabilities"])]
    low, high = spec["min"], spec["max"]
    distribution = spec["distribution"]
    if distribution == "int_uniform":
        return int(rng.integers(low, high + 1))
    if distribution == "log_uniform_values":
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    value = float(rng.uniform(low, high))
    return float(round(value / spec["q"]) * spec["q"]) if distribution == "q_uniform" else value


def expand(sweep: Sweep, count: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The runs' parameter sets: every combination (grid, at most ``count`` of them), or ``count``
    random draws (random, reproducible with ``seed``)."""
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(f"count={count!r} must be an integer >= 1")
    names = list(sweep.parameters)
    if sweep.method == "grid":
        choices = [
            spec["values"] if "values" in spec else [spec["value"]] for spec in sweep.parameters.values()
        ]
        runs = [dict(zip(names, combination, strict=True)) for combination in itertools.product(*choices)]
        return runs[:count]
    if count is None:
        raise ValueError("a random sweep needs a count (--count N)")
    rng = np.random.default_rng(seed)
    return [{name: _draw(sweep.parameters[name], rng) for name in names} for _ in range(count)]


def _text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def command_for(sweep: Sweep, params: dict[str, Any]) -> list[str]:
    """The run's command line: the template with W&B's macros replaced (``${interpreter}`` by this
    Python, ``${env}`` by nothing: the environment is inherited)."""
    args = [f"--{name}={_text(value)}" for name, value in params.items()]
    expansions = {
        "${env}": [],
        "${interpreter}": [sys.executable],
        "${program}": [str(sweep.program)],
        "${args}": args,
        "${args_no_hyphens}": [f"{name}={_text(value)}" for name, value in params.items()],
        "${args_no_boolean_flags}": [
            f"--{name}" if value is True else f"--{name}={_text(value)}"
            for name, value in params.items()
            if value is not False
        ],
    }
    return [word for part in sweep.command for word in expansions.get(part, [part])]


def _key(params: dict[str, Any], template: list[str] | None) -> str:
    """What makes two runs the same run: their parameters and the sweep file's command (template and
    program, before ``${interpreter}`` is filled in). ``None``: a record written before the template
    was recorded, matched by its parameters."""
    return json.dumps([params, template], sort_keys=True, default=str)


def _template(sweep: Sweep) -> list[str]:
    return [*sweep.command, f"program={sweep.program}"]


def read_state(path: Path) -> dict[str, dict[str, Any]]:
    """The runs recorded in a state file, by parameter set and command (the last record of each). A
    line cut short by a crash while it was appended is not a record: that run counts as not done."""
    records: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("params"), dict):
                records[_key(record["params"], record.get("template"))] = record
    return records


def _recorded(records: dict[str, dict[str, Any]], sweep: Sweep, params: dict[str, Any]) -> dict | None:
    return records.get(_key(params, _template(sweep))) or records.get(_key(params, None))


def _trains(command: list[str]) -> bool:
    """Whether ``command`` is ``spikeq train`` (``python -m spikeq.cli train`` or ``spikeq train``)."""
    return any(
        word == "train" and (before == "spikeq.cli" or Path(before).name == "spikeq")
        for before, word in itertools.pairwise(command)
    )


def run_dir_of(sweep: Sweep, params: dict[str, Any], state_path: Path) -> Path:
    """The run directory a ``spikeq train`` run of the sweep gets: ``<state>/<name>=<value>,...-<hash>``
    (the state file's path without ``.jsonl``), named by the parameters the sweep varies and a hash of
    all of them and the command, so that a run keeps it however often the sweep is started."""
    varied = [name for name, spec in sweep.parameters.items() if "value" not in spec]
    label = ",".join(f"{name}={_text(params[name])}" for name in varied)
    label = re.sub(r"[^A-Za-z0-9._=,+-]", "_", label)[:100] or "run"
    digest = hashlib.sha256(_key(params, _template(sweep)).encode()).hexdigest()[:8]
    return state_path.with_suffix("") / f"{label}-{digest}"


def run_command(sweep: Sweep, params: dict[str, Any], state_path: Path) -> list[str]:
    """The command that runs ``params`` now: ``command_for``'s, and for ``spikeq train`` in its own run
    directory (``run_dir_of``), resumed from its last checkpoint where it has one, else started there
    (afresh where an earlier try was cut before its first checkpoint: nothing to keep)."""
    command = command_for(sweep, params)
    if not _trains(command):
        return command
    run_dir = run_dir_of(sweep, params, state_path)
    if latest_checkpoint(run_dir / "checkpoints") is not None:
        return [*command, f"--resume={run_dir}"]
    return [*command, f"--run-dir={run_dir}", *(["--force"] if run_dir.exists() else [])]


def _run_child(command: list[str], env: dict[str, str]) -> tuple[int, bool]:
    """Run one command to its end; return its exit code and whether this process was signalled.

    The child runs in its own session, so a Ctrl-C reaches it once, forwarded from here (spikeq train
    then checkpoints and exits; a second Ctrl-C, forwarded too, stops it at once), and SIGTERM sent to
    this process alone reaches it as well.
    """
    process = subprocess.Popen(command, env=env, start_new_session=True)
    interrupted = False

    def forward(signum: int, frame: Any) -> None:
        nonlocal interrupted
        interrupted = True
        process.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        returncode = process.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return returncode, interrupted


def run_sweep(
    sweep: Sweep,
    runs: list[dict[str, Any]],
    state_path: Path,
    dry_run: bool = False,
) -> list[dict[str, Any]]:
    """Run each parameter set's command in turn, skipping those the state file records as succeeded.

    :param sweep: from ``load_sweep``
    :param runs: from ``expand``
    :param state_path: JSON-lines file; one record (params, template, command, returncode, seconds) is
        appended per finished run
    :param dry_run: print the commands only
    :return: the records of this sweep's runs (skipped ones as recorded before)
    :raises KeyboardInterrupt: after SIGINT or SIGTERM, once the running command has exited
    """
    results = []
    env = child_environment()
    env.setdefault("WANDB_RUN_GROUP", sweep.name)
    claims = state_path.with_name(state_path.name + ".claims")
    for i, params in enumerate(runs, start=1):
        label = " ".join(f"{k}={_text(v)}" for k, v in params.items())
        previous = _recorded(read_state(state_path), sweep, params)
        if previous is not None and previous["returncode"] == 0:
            print(f"[{i}/{len(runs)}] {label}: done before, skipped", flush=True)
            results.append(previous)
            continue
        if dry_run:
            print(f"[{i}/{len(runs)}] {label}\n  {' '.join(run_command(sweep, params, state_path))}")
            continue
        claims.mkdir(parents=True, exist_ok=True)
        try:
            name = hashlib.sha256(_key(params, _template(sweep)).encode()).hexdigest()[:16]
            claim = FileLock(claims / f"{name}.lock")
        except LockedError:
            print(f"[{i}/{len(runs)}] {label}: running in another sweep process, skipped", flush=True)
            results.append({"params": params, "returncode": None, "elsewhere": True})
            continue
        with claim:
            previous = _recorded(read_state(state_path), sweep, params)  # finished elsewhere meanwhile?
            if previous is not None and previous["returncode"] == 0:
                print(f"[{i}/{len(runs)}] {label}: finished by another sweep process, skipped", flush=True)
                results.append(previous)
                continue
            command = run_command(sweep, params, state_path)  # as its run directory stands, now it is ours
            print(f"[{i}/{len(runs)}] {label}\n  {' '.join(command)}", flush=True)
            started = time.perf_counter()
            returncode, interrupted = _run_child(command, env)
            if interrupted:
                raise KeyboardInterrupt  # the run was stopped with the sweep: not recorded, redone next time
            record = {
                "params": params,
                "template": _template(sweep),
                "command": command,
                "returncode": returncode,
                "seconds": round(time.perf_counter() - started, 1),
            }
            # One write of one line in append mode: concurrent sweeps never interleave records.
            with state_path.open("a") as state:
                state.write(json.dumps(record, default=str) + "\n")
        results.append(record)
    return results
