"""``spikeq sweep``: the project's W&B sweep files run here without a W&B server, on real training runs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import SPIKEQ

from spikeq import cli
from spikeq.experiment.sweep import command_for, expand, load_sweep, read_state, run_sweep

SWEEPS = Path(__file__).parent.parent / "experiments" / "sweeps"


@pytest.mark.parametrize(("name", "runs"), [("readouts", 15), ("dsqn_num_steps", 9)])
def test_the_project_sweep_files_expand_into_valid_training_runs(name, runs):
    sweep = load_sweep(SWEEPS / f"{name}.yaml")
    grid = expand(sweep)
    assert len(grid) == runs and len({json.dumps(p, sort_keys=True) for p in grid}) == runs
    for params in grid:
        command = command_for(sweep, params)
        assert command[:3] == [sys.executable, "-m", "spikeq.cli"]
        # What the agent would run parses into a valid training config.
        config = cli._train_config(cli.build_parser().parse_args(command[3:]))
        assert config.seed == params["seed"] and config.wandb == "auto"
        if "model" in params:
            assert config.model == params["model"] and config.game == "Breakout"
        else:
            assert config.network.num_steps == params["num_steps"] and config.preset == "zoo"


def write_sweep(tmp_path: Path, **config) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_random_draws_follow_their_distributions_and_the_seed(tmp_path):
    path = write_sweep(
        tmp_path,
        method="random",
        program="train.py",
        parameters={
            "learning_rate": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-3},
            "num_steps": {"distribution": "int_uniform", "min": 4, "max": 16},
            "tau": {"distribution": "q_uniform", "min": 1.5, "max": 3.0, "q": 0.5},
            "readout": {"values": ["rate", "max_mem"], "probabilities": [0.9, 0.1]},
            "seed": {"value": 7},
        },
    )
    sweep = load_sweep(path)
    runs = expand(sweep, count=200, seed=3)
    assert runs == expand(sweep, count=200, seed=3) != expand(sweep, count=200, seed=4)
    assert all(1e-5 <= r["learning_rate"] <= 1e-3 for r in runs)
    assert {r["num_steps"] for r in runs} == set(range(4, 17))
    assert {r["tau"] for r in runs} <= {1.5, 2.0, 2.5, 3.0} and {r["seed"] for r in runs} == {7}
    assert 150 < sum(r["readout"] == "rate" for r in runs) < 200
    # W&B's default command: ${env} ${interpreter} ${program} ${args}
    assert command_for(sweep, runs[0])[:3] == [
        sys.executable,
        "train.py",
        f"--learning_rate={runs[0]['learning_rate']}",
    ]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"method": "bayes", "parameters": {"a": {"value": 1}}}, "needs W&B's server"),
        (
            {"method": "hyperband", "parameters": {"a": {"value": 1}}},
            "'hyperband' is not one of grid, random",
        ),
        (
            {"method": "random", "parameters": {"a": {"distribution": "normal", "mu": 0}}},
            "unknown distribution",
        ),
        (
            {"method": "grid", "parameters": {"a": {"distribution": "uniform", "min": 0, "max": 1}}},
            "grid sweep needs",
        ),
        (
            {"method": "random", "parameters": {"a": {"distribution": "uniform", "min": 1, "max": 0}}},
            "min < max",
        ),
        ({"method": "grid", "parameters": {"a": {"values": []}}}, "non-empty list"),
        ({"method": "grid", "parameters": {"a": {"parameters": {}}}}, "nested parameters"),
        (
            {"method": "grid", "parameters": {"a": {"value": 1}}, "command": ["${foo}"]},
            "unknown command macro",
        ),
        ({"method": "grid", "parameters": {"a": {"value": 1}}}, "names no program"),
        ({"method": "grid"}, "no parameters"),
    ],
)
def test_what_cannot_run_here_is_refused_by_name(tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        load_sweep(write_sweep(tmp_path, **config))


def test_a_random_sweep_needs_a_count_and_bad_files_are_named(tmp_path, capsys):
    sweep = load_sweep(
        write_sweep(tmp_path, method="random", program="p", parameters={"a": {"values": [1, 2]}})
    )
    with pytest.raises(ValueError, match="needs a count"):
        expand(sweep)
    (tmp_path / "bad.yaml").write_text("command: [${env}, ${args}]\n")
    assert cli.main(["sweep", str(tmp_path / "bad.yaml")]) == 2
    assert "is not valid YAML" in capsys.readouterr().err
    assert cli.main(["sweep", str(tmp_path / "sweep.yaml"), "--set", "steps"]) == 2
    assert "'steps' is not NAME=VALUE" in capsys.readouterr().err


def smoke_sweep(tmp_path: Path, num_steps: list[int]) -> Path:
    """A grid over T of real smoke-preset training runs on Pong (W&B offline, short episodes)."""
    return write_sweep(
        tmp_path,
        name="smoke-T",
        method="grid",
        command=["${env}", "${interpreter}", "-m", "spikeq.cli", "train", "--game", "Pong", "${args}"],
        parameters={
            "preset": {"value": "smoke"},
            "num_steps": {"values": num_steps},
            "wandb": {"value": "auto"},
            "final_eval_episodes": {"value": 1},  # short evaluations: the runs' scores are not the point
            "max_episode_steps": {"value": 300},
        },
    )


def sweep_process(path: Path, *args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_API_KEY", None)
    return subprocess.Popen(
        [*SPIKEQ, "sweep", str(path), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_a_sweep_runs_every_combination_and_skips_finished_runs_when_started_again(tmp_path):
    path = smoke_sweep(tmp_path, [1, 2])
    first = sweep_process(path, "--set", "steps=450", cwd=tmp_path)
    output = first.communicate(timeout=600)[0]
    assert first.returncode == 0, output[-3000:]
    assert "sweep smoke-T: 2 of 2 run(s) succeeded" in output
    # Each run in a directory of its own next to the state file, named by what the sweep varies.
    configs = sorted((tmp_path / "runs" / "sweeps" / "smoke-T").glob("*/config.yaml"))
    assert [c.parent.name.split("-")[0] for c in configs] == ["num_steps=1", "num_steps=2"]
    assert sorted(yaml.safe_load(c.read_text())["num_steps"] for c in configs) == [1, 2]
    for config in configs:
        assert (config.parent / "evaluation.json").exists()
    # Each run is a W&B offline run in the sweep's group.
    wandb_files = sorted((tmp_path / "runs" / "sweeps" / "smoke-T").glob("*/wandb/offline-run-*/run-*.wandb"))
    assert len(wandb_files) == 2
    inspect = subprocess.run(
        [str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(wandb_files[0])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    runs = [json.loads(line) for line in inspect.stdout.splitlines() if line.startswith('{"num"')]
    assert [r["run"]["run_group"] for r in runs if r["type"] == "run"] == ["smoke-T"], inspect.stderr
    state = read_state(tmp_path / "runs" / "sweeps" / "smoke-T.jsonl")
    assert sorted(r["params"]["num_steps"] for r in state.values()) == [1, 2]
    assert all(r["returncode"] == 0 and r["params"]["steps"] == 450 for r in state.values())

    again = sweep_process(path, "--set", "steps=450", cwd=tmp_path)
    output = again.communicate(timeout=120)[0]
    assert again.returncode == 0 and output.count("done before, skipped") == 2, output[-3000:]
    assert len(list((tmp_path / "runs").glob("**/config.yaml"))) == 2


def test_ctrl_c_checkpoints_the_running_run_and_the_same_command_resumes_it(tmp_path):
    path = smoke_sweep(tmp_path, [2])
    sweep = sweep_process(path, cwd=tmp_path)
    deadline = time.monotonic() + 300
    # Wait for the run's first checkpoint (step 300): it is training, its signal handlers are set.
    while not list((tmp_path / "runs").glob("**/checkpoints/step-*")):
        assert sweep.poll() is None and time.monotonic() < deadline, "the run did not start training"
        time.sleep(0.5)
    sweep.send_signal(signal.SIGINT)
    output = sweep.communicate(timeout=300)[0]
    assert sweep.returncode == 130, output[-3000:]
    assert "sweep stopped; the same command continues it" in output
    assert "--resume" in output  # spikeq train checkpointed and said how to resume
    steps = [int(p.name.split("-")[1]) for p in (tmp_path / "runs").glob("**/checkpoints/step-*")]
    assert max(steps) > 300  # the checkpoint written on SIGINT, after the periodic one
    assert not (tmp_path / "runs" / "sweeps" / "smoke-T.jsonl").exists()

    again = sweep_process(path, cwd=tmp_path)
    output = again.communicate(timeout=600)[0]
    assert again.returncode == 0 and "sweep smoke-T: 1 of 1 run(s) succeeded" in output, output[-3000:]
    (run_dir,) = (tmp_path / "runs" / "sweeps" / "smoke-T").iterdir()
    assert f"--resume={run_dir.relative_to(tmp_path)}" in output  # continued, not started again
    assert f"| {max(steps)}/" in output, output[-3000:]  # its progress bar starts at the checkpoint
    assert (run_dir / "evaluation.json").exists()
    assert len(list((tmp_path / "runs").glob("**/config.yaml"))) == 1


def test_a_run_is_done_only_for_the_command_it_ran_with(tmp_path):
    """Changing a sweep file's fixed command words (another game, say) makes its runs new runs; a state
    file written before commands were part of a run's identity still counts its runs as done."""
    program = tmp_path / "record.py"
    program.write_text("import sys\nopen(sys.argv[1], 'a').write(' '.join(sys.argv[2:]) + '\\n')\n")
    ran = tmp_path / "ran.txt"
    config = dict(method="grid", program=str(program), parameters={"seed": {"values": [0, 1]}})
    state = tmp_path / "state.jsonl"

    def sweep_with(*fixed: str) -> None:
        command = ["${env}", "${interpreter}", "${program}", str(ran), *fixed, "${args}"]
        sweep = load_sweep(write_sweep(tmp_path, **config, command=command))
        run_sweep(sweep, expand(sweep), state)

    sweep_with("--game=Pong")
    sweep_with("--game=Pong")
    assert ran.read_text().splitlines() == ["--game=Pong --seed=0", "--game=Pong --seed=1"]
    sweep_with("--game=Breakout")
    assert ran.read_text().splitlines()[2:] == ["--game=Breakout --seed=0", "--game=Breakout --seed=1"]
    # Records without the command (older state files) match by their parameters.
    records = [json.loads(line) for line in state.read_text().splitlines()]
    state.write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k != "template"}) + "\n" for r in records)
    )
    sweep_with("--game=Atlantis")
    assert len(ran.read_text().splitlines()) == 4
