"""What survives a crash: kills at every write point, signals at any moment, NaN weights, a full
disk, crafted pickles, concurrent starts and malformed input, each on real files and real SB3
training (tiny step counts on real ALE Pong).

A killed process is a real ``SIGKILL``: the run is forked from this test process and kills itself
at the chosen write (forking saves the import time of a fresh interpreter); signals are sent to the
real ``spikeq`` command in a child process.
"""

import csv
import errno
import json
import os
import pickle
import shlex
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import SPIKEQ
from safetensors.torch import load_file

from spikeq import cli
from spikeq.analysis import weights
from spikeq.envs import atari
from spikeq.experiment import checkpoints, train
from spikeq.experiment.config import override, resolve
from spikeq.experiment.sweep import load_sweep, read_state
from spikeq.experiment.train import build_model, open_run, prepare_run_dir, read_eval_rows, resume_command
from spikeq.files import FileLock

# A whole run in a few seconds: evaluations and checkpoints at steps 32 and 64, one short episode each.
TINY = dict(
    steps=64,
    learning_starts=16,
    batch_size=8,
    buffer_size=200,
    train_freq=4,
    target_update_interval=32,
    exploration_steps=32,
    eval_freq=32,
    checkpoint_freq=32,
    eval_episodes=1,
    final_eval_episodes=1,
    max_episode_steps=20,
    wandb="disabled",
    save_replay=True,
)
TINY_ARGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
# Child processes import this spikeq, whatever their working directory.
CHILD_ENV = {
    **os.environ,
    "PYTHONPATH": str(Path(checkpoints.__file__).parents[1]),
    "WANDB_MODE": "disabled",
    "OMP_NUM_THREADS": "1",
}


def tiny_config(model: str = "dqn", **changes):
    return resolve("smoke", model, **{**TINY, **changes})


def run_tiny(run_dir: Path, model: str = "dqn", **changes) -> train.RunResult:
    trainer = open_run(tiny_config(model, **changes), run_dir=run_dir)
    try:
        return trainer.run()
    finally:
        trainer.close()


def exit_code(argv: list[str]) -> int:
    """``spikeq ARGV``'s exit code, whether it returns it or argparse exits with it."""
    try:
        return cli.main(argv)
    except SystemExit as exit_:
        return exit_.code


def resume(run_dir: Path, *args: str) -> int:
    return cli.main(["train", "--resume", str(run_dir), *args])


def eval_steps(run_dir: Path) -> list[int]:
    return [int(row["step"]) for row in read_eval_rows(run_dir / "eval.csv")]


def zip_tensors_finite(zip_path: Path) -> bool:
    with zipfile.ZipFile(zip_path) as archive:
        params = torch.load(archive.open("policy.pth"), weights_only=True)
    return all(torch.isfinite(value).all() for value in params.values())


def forked(function) -> int:
    """Run ``function`` in a forked child; its exit code, or -signal when a signal ended it."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = function()
        finally:
            os._exit(code or 0)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def kill_at(target: object, name: str, call: int) -> None:
    """Make this process SIGKILL itself when ``target.name`` is called for the ``call``-th time."""
    original = getattr(target, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(target, name, wrapper)


# --- 1. --force and validation before anything on disk ----------------------------------------------


def test_force_never_removes_a_directory_that_is_not_a_spikeq_run(tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    # The case: --force with a seed that fails validation wiped the directory first.
    assert cli.main(["train", "--run-dir", str(precious), "--force", "--seed", "99999999999"]) == 2
    assert "seed=99999999999 is too large" in capsys.readouterr().err
    assert cli.main(["train", "--preset", "smoke", "--run-dir", str(precious), "--force"]) == 2
    err = capsys.readouterr().err
    assert "--force refused" in err and "not a spikeq run directory" in err and err.count("\n") == 1
    assert sorted(p.name for p in precious.iterdir()) == ["thesis.tex"]
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_force_replaces_a_finished_run_but_not_one_in_use(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run_tiny(run_dir, steps=32).status == "finished"
    with FileLock(run_dir / ".lock"):  # as a process training in it holds it
        assert cli.main(["train", "--preset", "smoke", "--run-dir", str(run_dir), "--force"]) == 2
        assert "in use by another spikeq process" in capsys.readouterr().err
        assert (run_dir / "evaluation.json").exists()
    run_dir2, lock, replaced = prepare_run_dir(tiny_config(), run_dir, force=True)
    lock.release()
    assert run_dir2 == run_dir and [p.name for p in run_dir.iterdir()] == [".lock"]
    assert (replaced / "evaluation.json").exists()  # removed by open_run once the new run is built


def test_force_keeps_the_old_run_when_the_new_one_cannot_start(tmp_path, capsys):
    # ALE's vector env is refused for a MinAtar game only when the envs are made, after --force
    # has taken the directory: the old run is put back.
    run_dir = tmp_path / "run"
    assert run_tiny(run_dir, steps=32).status == "finished"
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    argv = ["train", "--game", "MinAtar/Breakout", "--preset", "smoke", "--vec-env", "ale"]
    assert cli.main([*argv, "--run-dir", str(run_dir), "--force"]) == 2
    assert "vec_env must be one of dummy, subproc for MinAtar games" in capsys.readouterr().err
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert resume(run_dir) == 0  # still the finished run
    capsys.readouterr()
    # A new run that starts replaces it, and nothing of the old one is left beside it.
    open_run(tiny_config(steps=32), run_dir=run_dir, force=True).close()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert not (run_dir / "evaluation.json").exists()


PRECIOUS_ARGS = [
    (
        ["--seed", "4294967296"],
        "seed=4294967296 is too large for n_envs=1 with vec_env=dummy; allowed: 0 to 4,294,967,295",
    ),
    # Environment i is seeded with seed + i; ale-py's vector env takes signed 32-bit seeds.
    (
        ["--seed", "4294967295", "--n-envs", "2"],
        "seed=4294967295 is too large for n_envs=2 with vec_env=dummy; allowed: 0 to 4,294,967,294",
    ),
    (
        ["--seed", "2147483648", "--vec-env", "ale"],
        "seed=2147483648 is too large for n_envs=1 with vec_env=ale; allowed: 0 to 2,147,483,647",
    ),
    (["--seed", "-1"], "seed=-1 must be an integer >= 0"),
    (["--learning-rate", "1e309"], "learning_rate=inf must be a finite number"),
    (["--learning-rate", "nan"], "learning_rate=nan must be a finite number"),
    (["--learning-rate", "0"], "learning_rate=0.0 must be > 0"),
    (["--surrogate-slope", "nan"], "surrogate_slope=nan must be a finite number"),
    (["--surrogate-slope", "-2"], "surrogate_slope=-2.0 must be > 0"),
    (
        ["--torch-threads", "100000"],
        "torch_threads=100000 is too large; allowed: 0 (torch's default) to 1024",
    ),
    (["--preset", ""], "unknown preset ''; allowed: paper, zoo, minatar, smoke"),
    (["--model", ""], "unknown model ''; allowed: dsqn"),
    (["--max-grad-norm", "nan"], "max_grad_norm=nan must be a number > 0"),
    (["--gamma", "inf"], "gamma=inf must lie in [0, 1]"),
    (["--gamma", "nan"], "gamma=nan must lie in [0, 1]"),
    (["--tau", "inf"], "tau=inf must be a finite number"),
    (["--num-steps", "1000000000"], "num_steps=1000000000 is too large; allowed: 1 to 4096"),
    (["--steps", "1.5"], "invalid int value: '1.5'"),
    (["--exploration-final-eps", "2"], "exploration_final_eps=2.0 must lie in [0, 1]"),
    (["--game", ""], "game is empty"),
    (["--save-replay", "maybe"], "'maybe' is not a boolean; allowed: true, false"),
    (["--eval-freq", "0"], "eval_freq=0 must be a positive integer"),
    (["--device", "tpu"], "unknown device 'tpu'"),
]


@pytest.mark.parametrize(("args", "message"), PRECIOUS_ARGS, ids=[" ".join(a) for a, _ in PRECIOUS_ARGS])
def test_malformed_arguments_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, args, message):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    out_dir = tmp_path / "runs"
    argv = ["train", "--preset", "smoke", "--run-dir", str(precious), "--force", "--out-dir", str(out_dir)]
    assert exit_code([*argv, *args]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert [p.name for p in precious.iterdir()] == ["notes.txt"] and not out_dir.exists()


# --- 6 and 8: config.yaml on resume -------------------------------------------------------------------

BAD_CONFIG_FILES = [
    ("game: [Pong\n", "is not valid YAML"),
    ("", "is not a spikeq config"),
    ("- Pong\n- dsqn\n", "is not a spikeq config"),
    ("model: dsqn\n", "it lacks game, preset"),
    (
        "game: Pong\nmodel: dsqn\npreset: smoke\nsteps: many\n",
        "steps='many' is a str; allowed: a value of type int",
    ),
    (
        "game: Pong\nmodel: dsqn\npreset: smoke\nlearning_rate: .nan\n",
        "learning_rate=nan must be a finite number",
    ),
    ("game: Pong\nmodel: dsqn\npreset: smoke\nsave_replay: 'yes'\n", "save_replay='yes' is a str"),
    ("game: Pong\nmodel: dsqn\npreset: smoke\ncolour: red\n", "unknown config key(s) colour"),
]


@pytest.mark.parametrize(("text", "message"), BAD_CONFIG_FILES)
def test_a_malformed_config_yaml_is_refused_and_left_as_it_was(tmp_path, capsys, text, message):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(text)
    assert resume(run_dir) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert (run_dir / "config.yaml").read_text() == text
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]


def test_a_rejected_resume_leaves_config_yaml_untouched(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run_tiny(run_dir, steps=32, checkpoint_freq=32).status == "finished"
    before = (run_dir / "config.yaml").read_bytes()
    assert resume(run_dir, "--device", "tpu") == 2
    assert "unknown device 'tpu'" in capsys.readouterr().err
    # A budget below the steps trained would file the run under a budget it has passed.
    assert resume(run_dir, "--steps", "16") == 2
    assert "--steps 16 is below the 32 steps" in capsys.readouterr().err
    assert (run_dir / "config.yaml").read_bytes() == before
    for step in ("step-32",):  # no checkpoint loads: refused after the config was accepted
        (run_dir / "checkpoints" / step / "model.zip").write_bytes(b"not a zip")
    assert resume(run_dir, "--steps", "64") == 2
    assert "no checkpoint of" in capsys.readouterr().err
    assert (run_dir / "config.yaml").read_bytes() == before


# --- 5. kills at every write point ---------------------------------------------------------------------


def _count_replaces(run_dir: Path) -> int:
    calls = []
    original = os.replace

    def counting(*args, **kwargs):
        calls.append(args[1])
        return original(*args, **kwargs)

    def count() -> int:
        os.replace = counting
        result = run_tiny(run_dir)
        (run_dir.parent / "replaces.json").write_text(json.dumps([str(c) for c in calls]))
        return 0 if result.status == "finished" else 1

    assert forked(count) == 0
    return len(json.loads((run_dir.parent / "replaces.json").read_text()))


def test_a_kill_at_any_write_point_resumes_with_every_evaluation_once(tmp_path):
    writes = _count_replaces(tmp_path / "count" / "run")
    # config.yaml; per evaluation eval.csv (+ best.zip, best.safetensors, best.json when better);
    # per checkpoint the folder's rename and `latest`; evaluation.json.
    assert writes >= 9
    kill_points = [(os, "replace", call) for call in range(1, writes + 1)]
    kill_points += [(checkpoints, "_fsync_tree", 1), (checkpoints, "_fsync_tree", 2), (np, "savez", 2)]
    no_run = []
    for target, name, call in kill_points:
        run_dir = tmp_path / f"{name}-{call}" / "run"

        def killed_run(target=target, name=name, call=call, run_dir=run_dir) -> int:
            kill_at(target, name, call)
            run_tiny(run_dir)
            return 0

        assert forked(killed_run) == -signal.SIGKILL, (name, call)
        if not (run_dir / "config.yaml").exists():
            no_run.append((name, call))  # killed while writing the first file: there is no run to resume
            continue
        assert forked(lambda run_dir=run_dir: resume(run_dir)) == 0, (name, call)
        assert eval_steps(run_dir) == [32, 64], (name, call)
        result = json.loads((run_dir / "evaluation.json").read_text())
        assert result["episodes"] == 1 and result["best_step"] in (32, 64)
        leftovers = [p.name for p in [*run_dir.glob(".*"), *run_dir.glob("checkpoints/.*")]]
        assert leftovers == [".lock"], (name, call, leftovers)
        assert (run_dir / "checkpoints" / "latest").read_text() == "step-64"
        best = json.loads((run_dir / "checkpoints" / "best.json").read_text())
        assert best["num_timesteps"] == result["best_step"], "best.* come from one step"
        logged = [int(row["step"]) for row in read_eval_rows(run_dir / "train.csv")]
        assert logged == [32, 64], "train.csv: the rows after the checkpoint are redone, not repeated"
    assert no_run == [("replace", 1)], "only a kill at the first write (config.yaml) leaves no run"


def test_latest_naming_a_missing_or_broken_checkpoint_falls_back_to_the_other(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run_tiny(run_dir, steps=64, eval_freq=64).status == "finished"
    ckpt = run_dir / "checkpoints"
    (ckpt / "step-64" / "model.zip").write_bytes(b"PK\x03\x04 cut short")
    (run_dir / "evaluation.json").unlink()
    assert resume(run_dir) == 0
    assert "skipped step-64" in capsys.readouterr().out
    assert eval_steps(run_dir) == [64] and (run_dir / "evaluation.json").exists()
    (ckpt / "latest").write_text("step-9999")  # names nothing
    assert checkpoints.latest_checkpoint(ckpt) == ckpt / "step-64"


def test_a_checkpoint_below_newer_ones_that_do_not_load_is_kept(tmp_path):
    # Resumed from an older checkpoint because the newer ones did not load, a run writes below them:
    # pruning to the newest two must not remove what it has just written and `latest` names.
    run_dir = tmp_path / "run"
    trainer = open_run(tiny_config(steps=32), run_dir=run_dir)
    ckpt = run_dir / "checkpoints"
    try:
        trainer.model.learn(32, reset_num_timesteps=True)
        for step in (900, 1000):  # complete-looking, unloadable
            (ckpt / f"step-{step}").mkdir(parents=True)
            for name in ("model.zip", "trainer.json"):
                (ckpt / f"step-{step}" / name).write_text("damaged")
        written = checkpoints.save_checkpoint(trainer.model, ckpt, {}, save_replay=False)
    finally:
        trainer.close()
    assert written == ckpt / "step-32" and written.is_dir()
    assert checkpoints.latest_checkpoint(ckpt) == written


# --- 5. a full disk ------------------------------------------------------------------------------------


def test_a_full_disk_gives_one_line_and_a_resumable_run(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    config_args = ["train", "--preset", "smoke", "--model", "dqn", "--run-dir", str(run_dir), *TINY_ARGS]
    save = checkpoints.save_replay_buffer
    calls = []

    def disk_full_at_the_second_checkpoint(buffer, folder):
        calls.append(folder)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        save(buffer, folder)

    monkeypatch.setattr(checkpoints, "save_replay_buffer", disk_full_at_the_second_checkpoint)
    assert cli.main(config_args) == 1
    err = capsys.readouterr().err
    message = err.splitlines()[-1]  # after the progress bar
    assert "Traceback" not in err
    assert "cannot write checkpoint" in message and "No space left on device" in message
    assert "checkpoint step-32 is kept" in message and f"--resume {run_dir}" in message
    assert [p.name for p in (run_dir / "checkpoints").glob(".*")] == []
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-32"

    monkeypatch.setattr(checkpoints, "save_replay_buffer", save)
    assert resume(run_dir) == 0
    assert eval_steps(run_dir) == [32, 64]


def test_a_real_file_size_limit_fails_one_line_and_leaves_no_temporary_files(tmp_path):
    import resource

    run_dir = tmp_path / "run"
    limit = 30_000_000  # bytes per file: the model (27 MB) fits, a 5,000-frame replay (35 MB) does not

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    args = ["train", "--preset", "smoke", "--model", "dqn", "--run-dir", str(run_dir), *TINY_ARGS]
    done = subprocess.run(
        [*SPIKEQ, *args, "--buffer-size=5000"],
        capture_output=True,
        text=True,
        env=CHILD_ENV,
        preexec_fn=limited,
        timeout=600,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    message = done.stderr.splitlines()[-1]
    assert "cannot write checkpoint" in message and "File too large" in message
    assert "no checkpoint yet: it restarts from step 0" in message and "--resume" in message
    assert [p.name for p in (run_dir / "checkpoints").glob(".*")] == []
    assert resume(run_dir) == 0
    assert eval_steps(run_dir) == [32, 64]


def test_a_failed_write_of_the_best_weights_keeps_the_previous_three(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    trainer = open_run(tiny_config(steps=32, eval_freq=16), run_dir=run_dir)
    ckpt = run_dir / "checkpoints"
    write = checkpoints.save_file
    try:
        trainer.model.learn(16, reset_num_timesteps=True)
        trainer.evaluate_now()
        before = {name: (ckpt / name).read_bytes() for name in checkpoints.BEST_FILES}
        trainer.state["best_score"] = -1e9  # whatever it scores now is the best

        def disk_full(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(checkpoints, "save_file", disk_full)
        trainer.model.learn(16, reset_num_timesteps=False)
        with pytest.raises(OSError, match="No space left"):
            trainer.evaluate_now()
    finally:
        monkeypatch.setattr(checkpoints, "save_file", write)
        trainer.close()
    assert {name: (ckpt / name).read_bytes() for name in checkpoints.BEST_FILES} == before
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(checkpoints.BEST_FILES)  # no temporary file


def test_a_resumed_run_seeds_its_environments_anew(tmp_path):
    # SB3's DQN.load seeds the training envs with config.seed, as at step 0: the resume seeds them
    # again with seed + the steps trained, so that it plays new episodes.
    config = tiny_config(seed=5, n_envs=2, steps=32)
    assert run_tiny(tmp_path / "run", seed=5, n_envs=2, steps=32).status == "finished"
    trainer = open_run(config, run_dir=tmp_path / "run", resume=True)
    try:
        assert trainer.model.num_timesteps == 32
        assert trainer.train_env.unwrapped._seeds == [5 + 32, 6 + 32]  # for the next reset (SB3's VecEnv)
    finally:
        trainer.close()


def test_a_resume_without_wandb_keeps_the_wandb_run_for_the_next_one(tmp_path):
    # Offline, then a stretch with W&B disabled, then offline again: one W&B run, continued.
    run_dir = tmp_path / "run"
    assert run_tiny(run_dir, steps=32, eval_freq=16, checkpoint_freq=16, wandb="offline").status == "finished"
    assert resume(run_dir, "--steps", "48", "--wandb", "disabled") == 0
    assert resume(run_dir, "--steps", "64", "--wandb", "offline") == 0
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({path.name.rsplit("-", 1)[1] for path in runs}) == 1


def test_a_resume_without_the_replay_buffer_refills_learning_starts_transitions_every_time(tmp_path):
    run_dir = tmp_path / "run"
    assert run_tiny(run_dir, steps=32, learning_starts=24, save_replay=False).status == "finished"
    # Resumed without its replay buffer and checkpointed at step 40, 16 steps into the 24-step refill.
    assert resume(run_dir, "--steps", "40") == 0
    config = override(tiny_config(steps=32, learning_starts=24, save_replay=False), steps=64)
    trainer = open_run(config, run_dir=run_dir, resume=True)
    try:
        updates = trainer.model._n_updates
        assert trainer.run().status == "finished"
        # Steps 41 to 64 refill the empty buffer again: no update on fewer than 24 transitions.
        assert trainer.model._n_updates == updates
    finally:
        trainer.close()


def test_a_resume_trains_at_its_new_learning_rate_and_epsilon_schedule(tmp_path):
    # 32 steps of a 48-step decay, then resumed to 64 steps at a tenth of the learning rate: the updates
    # after step 32 use 1e-5, and epsilon reaches its final 0.1 at step 48 as in a 64-step run.
    run_dir = tmp_path / "run"
    assert run_tiny(run_dir, steps=32, exploration_steps=48).status == "finished"
    assert resume(run_dir, "--steps", "64", "--learning-rate", "1e-5") == 0
    with (run_dir / "train.csv").open(newline="") as f:
        rows = [row for row in csv.DictReader(f) if int(row["step"]) > 32]
    rates = {float(row["train/learning_rate"]) for row in rows if row["train/learning_rate"]}
    assert rates == {1e-5}
    assert int(rows[-1]["step"]) == 64
    assert float(rows[-1]["rollout/exploration_rate"]) == pytest.approx(0.1)


def test_a_ctrl_c_between_the_renames_of_the_best_weights_waits_for_all_three(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    trainer = open_run(tiny_config(steps=32, eval_freq=16), run_dir=run_dir)
    ckpt = run_dir / "checkpoints"
    replace = os.replace

    def interrupted(source, target):  # SIGINT as best.json (the first) takes its place
        replace(source, target)
        if Path(target).name == "best.json":
            os.kill(os.getpid(), signal.SIGINT)

    # Python's own SIGINT handler (a test before may have left another one in place)
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        trainer.model.learn(16, reset_num_timesteps=True)
        checkpoints.save_best(trainer.model, ckpt, {})
        trainer.model.learn(16, reset_num_timesteps=False)
        monkeypatch.setattr(os, "replace", interrupted)
        with pytest.raises(KeyboardInterrupt):
            checkpoints.save_best(trainer.model, ckpt, {})
    finally:
        monkeypatch.setattr(os, "replace", replace)
        signal.signal(signal.SIGINT, handler)
        trainer.close()
    meta = json.loads((ckpt / "best.json").read_text())
    saved = load_file(ckpt / "best.safetensors")
    assert meta["num_timesteps"] == 32
    for name, tensor in trainer.model.policy.q_net.state_dict().items():
        if name in saved:  # the weights of the same step as best.json
            assert torch.equal(saved[name], tensor), name


def test_an_unexpected_error_is_one_line_with_its_traceback_in_error_log(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    plots = []

    def broken_plot(runs, out):
        plots.append(out)
        if len(plots) == 2:
            raise RuntimeError("matplotlib backend exploded")

    monkeypatch.setattr(train, "plot_runs", broken_plot)
    assert (
        cli.main(["train", "--preset", "smoke", "--model", "dqn", "--run-dir", str(run_dir), *TINY_ARGS]) == 1
    )
    message = capsys.readouterr().err.splitlines()[-1]
    assert "unexpected RuntimeError: matplotlib backend exploded" in message
    assert "checkpoint step-32 is kept" in message and "--resume" in message
    assert "Traceback" in (run_dir / "error.log").read_text()
    monkeypatch.undo()
    assert resume(run_dir) == 0
    assert eval_steps(run_dir) == [32, 64]


# --- 2. NaN and inf ------------------------------------------------------------------------------------


def test_non_finite_weights_are_never_saved_and_resume_can_lower_the_learning_rate(tmp_path, capsys):
    run_dir = tmp_path / "run"
    trainer = open_run(tiny_config(steps=96, eval_freq=16, checkpoint_freq=48), run_dir=run_dir)
    model = trainer.model
    optimizer = model.policy.optimizer
    step = optimizer.step

    def poisoned_step(*args, **kwargs):
        step(*args, **kwargs)
        if model.num_timesteps >= 56:  # after the checkpoint at 48, before the evaluation at 64
            with torch.no_grad():
                next(model.q_net.parameters()).fill_(float("nan"))

    optimizer.step = poisoned_step
    try:
        result = trainer.run()
    finally:
        trainer.close()
    assert result.status == "failed" and result.exit_code == 1
    assert "non-finite" in result.message and "checkpoint step-48 is kept" in result.message
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text() == "step-48"
    assert eval_steps(run_dir) == [16, 32, 48]
    for zip_path in [ckpt / "best.zip", *ckpt.glob("step-*/*.zip")]:
        assert zip_tensors_finite(zip_path), zip_path
    assert all(torch.isfinite(t).all() for t in load_file(ckpt / "best.safetensors").values())

    assert resume(run_dir, "--learning-rate", "1e-5") == 0
    assert eval_steps(run_dir) == [16, 32, 48, 64, 80, 96]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["learning_rate"] == 1e-5
    assert "finished 96 steps" in capsys.readouterr().out


# --- 3. nothing a resume reads runs code -----------------------------------------------------------------


class _Payload:
    """Unpickling this creates the marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_crafted_pickles_in_a_checkpoint_run_no_code(tmp_path, capsys):
    import base64

    run_dir = tmp_path / "run"
    assert run_tiny(run_dir, steps=64, eval_freq=64).status == "finished"
    (run_dir / "evaluation.json").unlink()
    marker = tmp_path / "pwned"
    for step in ("step-32", "step-64"):
        folder = run_dir / "checkpoints" / step
        (folder / "rng.json").unlink()
        (folder / "rng.pt").write_bytes(pickle.dumps(_Payload(marker)))
        (folder / "replay.npz").unlink()
        (folder / "replay.pkl").write_bytes(pickle.dumps(_Payload(marker)))
        # model.zip's own pickled entries: a schedule replaced by the payload.
        with zipfile.ZipFile(folder / "model.zip") as archive:
            entries = {name: archive.read(name) for name in archive.namelist()}
        data = json.loads(entries["data"])
        data["lr_schedule"][":serialized:"] = base64.b64encode(pickle.dumps(_Payload(marker))).decode()
        if step == "step-64":  # an entry spikeq does not know: the checkpoint is refused
            data["evil"] = {":type:": "x", ":serialized:": data["lr_schedule"][":serialized:"]}
        entries["data"] = json.dumps(data).encode()
        with zipfile.ZipFile(folder / "model.zip", "w") as archive:
            for name, content in entries.items():
                archive.writestr(name, content)
    with pytest.warns(UserWarning, match="is a pickle"):
        assert resume(run_dir, "--steps", "64") == 0
    out = capsys.readouterr().out
    assert "skipped step-64: " in out and "pickled entries spikeq does not rebuild: ['evil']" in out
    assert not marker.exists()
    assert eval_steps(run_dir) == [64] and (run_dir / "evaluation.json").exists()


# --- 4. signals at any moment ----------------------------------------------------------------------------


class Live:
    """The real ``spikeq`` command in a child process, its output read as it comes."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [*SPIKEQ, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CHILD_ENV
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self.threads = [
            threading.Thread(target=self._read, args=(stream, into), daemon=True)
            for stream, into in ((self.process.stdout, self.out), (self.process.stderr, self.err))
        ]
        for thread in self.threads:
            thread.start()

    @staticmethod
    def _read(stream, into: list[str]) -> None:
        for chunk in iter(lambda: stream.read(1), ""):
            into.append(chunk)

    def wait_for(self, text: str, in_stderr: bool = False, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while text not in "".join(self.err if in_stderr else self.out):
            assert self.process.poll() is None, "".join(self.err)[-3000:]
            assert time.monotonic() < deadline, f"{text!r} never came"
            time.sleep(0.05)

    def finish(self, timeout: float = 300) -> tuple[int, str, str]:
        code = self.process.wait(timeout)
        for thread in self.threads:
            thread.join(10)
        return code, "".join(self.out), "".join(self.err)


def test_an_evaluation_cut_by_ctrl_c_is_redone_at_its_own_step(tmp_path):
    run_dir = tmp_path / "run"
    # 40 steps; the evaluation at step 32 (30 Pong episodes of 250 steps: 10 s or more on a 2-core
    # CPU) is cut by a Ctrl-C, sent when training has reached it (step 32 comes within a second).
    args = ["train", "--preset", "smoke", "--model", "dqn", "--run-dir", str(run_dir), *TINY_ARGS]
    live = Live(*args, "--steps=40", "--eval-episodes=30", "--max-episode-steps=250")
    live.wait_for("/40", in_stderr=True)
    time.sleep(3.0)
    live.process.send_signal(signal.SIGINT)
    code, _, err = live.finish()
    assert code == 128 + signal.SIGINT and "interrupted by SIGINT at step 32" in err, err[-3000:]
    assert eval_steps(run_dir) == []
    # Redone with the weights of step 32 before training goes on, not at step 33.
    assert resume(run_dir) == 0
    assert eval_steps(run_dir) == [32, 40]


def test_ctrl_c_in_the_final_evaluation_leaves_a_resumable_run(tmp_path):
    run_dir = tmp_path / "run"
    # 40 steps, evaluations every 600: the only evaluation is the final one, 30 episodes long.
    args = ["train", "--preset", "smoke", "--model", "dqn", "--run-dir", str(run_dir), *TINY_ARGS]
    live = Live(
        *args,
        "--steps=40",
        "--eval-freq=600",
        "--checkpoint-freq=600",
        "--eval-episodes=30",
        "--final-eval-episodes=10",
        "--max-episode-steps=300",
    )
    live.wait_for("[final] evaluating the last weights (step 40)")
    time.sleep(0.5)
    live.process.send_signal(signal.SIGINT)
    code, out, err = live.finish()
    assert code == 128 + signal.SIGINT and "Traceback" not in err, err[-3000:]
    assert "interrupted by SIGINT at step 40; checkpoint saved" in err
    assert f"Continue with: {resume_command(run_dir)}" in err
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-40"
    assert eval_steps(run_dir) == []  # the interrupted evaluation is redone

    # The resumed run: one Ctrl-C, then two, while the best weights are re-evaluated at the end.
    for signals in (1, 2):
        live = Live("train", "--resume", str(run_dir), "--steps", "40")
        live.wait_for("[final] re-evaluating")
        for _ in range(signals):
            time.sleep(0.5)
            live.process.send_signal(signal.SIGINT)
        code, out, err = live.finish()
        assert code == 128 + signal.SIGINT and "Traceback" not in err, err[-3000:]
        assert "interrupted by SIGINT at step 40" in err and "--resume" in err
        assert not (run_dir / "evaluation.json").exists()
        assert eval_steps(run_dir) == [40]

    done = Live("train", "--resume", str(run_dir))
    code, out, err = done.finish()
    assert code == 0 and "finished 40 steps" in out, err[-3000:]
    assert eval_steps(run_dir) == [40]
    assert json.loads((run_dir / "evaluation.json").read_text())["episodes"] == 10

    again = Live("train", "--resume", str(run_dir))
    code, out, err = again.finish()
    assert code == 0 and "already finished at 40 steps" in out and "[final]" not in out


def test_a_second_ctrl_c_while_training_still_ends_resumable(tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", "--preset", "smoke", "--model", "dqn", "--run-dir", str(run_dir), *TINY_ARGS]
    live = Live(*args, "--steps=100000", "--checkpoint-freq=32", "--eval-freq=100000")
    deadline = time.monotonic() + 300
    while not list((run_dir / "checkpoints").glob("step-*")):
        assert live.process.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    live.process.send_signal(signal.SIGINT)
    live.process.send_signal(signal.SIGINT)
    code, _, err = live.finish()
    assert code == 128 + signal.SIGINT and "Traceback" not in err, err[-3000:]
    assert "interrupted by SIGINT" in err and "--resume" in err
    latest = checkpoints.latest_checkpoint(run_dir / "checkpoints")
    assert latest is not None and zip_tensors_finite(latest / "model.zip")
    assert resume(run_dir, "--steps", str(int(latest.name[5:]) + 8)) == 0


def test_ctrl_c_before_the_first_checkpoint_restarts_the_run_on_resume(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["train", "--preset", "smoke", "--model", "dqn", "--run-dir", str(run_dir), *TINY_ARGS]
    live = Live(*args, "--checkpoint-freq=600", "--eval-freq=16", "--steps=600")
    live.wait_for("[eval] step 16")
    os.kill(live.process.pid, signal.SIGKILL)  # a hard kill: no checkpoint at all
    live.finish()
    assert eval_steps(run_dir) and not list((run_dir / "checkpoints").glob("step-*"))
    assert resume(run_dir, "--steps", "32") == 0
    out = capsys.readouterr().out
    assert "no checkpoint yet: starting from step 0 (its 1 evaluation(s) and best weights are redone)" in out
    assert eval_steps(run_dir) == [16, 32]


def test_a_finished_run_trained_further_keeps_its_result_under_its_step_count(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    assert run_tiny(run_dir, steps=32, eval_freq=16).status == "finished"
    first = (run_dir / "evaluation.json").read_text()

    def cut(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    # Cut before the new budget's result: no evaluation.json claims the run finished, the old one stays.
    monkeypatch.setattr(train.Trainer, "_finish", cut)
    assert resume(run_dir, "--steps", "48") == 1
    assert not (run_dir / "evaluation.json").exists()
    assert (run_dir / "evaluation-32.json").read_text() == first
    monkeypatch.undo()
    assert resume(run_dir, "--steps", "48") == 0
    assert (run_dir / "evaluation-32.json").read_text() == first
    assert eval_steps(run_dir) == [16, 32, 48] and (run_dir / "evaluation.json").exists()


# --- 7. races --------------------------------------------------------------------------------------------


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "run_name", lambda config: "Pong-dqn-s0-20261129-101500")
    config = tiny_config(out_dir=str(tmp_path))
    first, lock1, _ = prepare_run_dir(config, None, force=False)
    second, lock2, _ = prepare_run_dir(config, None, force=False)
    assert (first.name, second.name) == ("Pong-dqn-s0-20261129-101500", "Pong-dqn-s0-20261129-101500-2")
    lock1.release()
    lock2.release()


def test_a_run_directory_is_trained_by_one_process_at_a_time(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run_tiny(run_dir, steps=32).status == "finished"
    with FileLock(run_dir / ".lock"):
        assert resume(run_dir, "--steps", "64") == 2
    assert "is in use by another spikeq process" in capsys.readouterr().err


def test_two_sweeps_on_one_file_run_each_run_once(tmp_path):
    log = tmp_path / "runs.log"
    program = f"import sys, time; time.sleep(1.5); open({str(log)!r}, 'a').write(sys.argv[1] + '\\n')"
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "name": "pair",
                "method": "grid",
                "command": ["${interpreter}", "-c", program, "${args}"],
                "parameters": {"seed": {"values": [0, 1, 2, 3]}},
            }
        )
    )
    sweeps = [
        subprocess.Popen(
            [*SPIKEQ, "sweep", str(sweep)], cwd=tmp_path, env=CHILD_ENV, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = "".join(s.communicate(timeout=120)[0] for s in sweeps)
    assert [s.returncode for s in sweeps] == [0, 0], outputs
    assert sorted(log.read_text().split()) == ["--seed=0", "--seed=1", "--seed=2", "--seed=3"], outputs
    state = read_state(tmp_path / "runs" / "sweeps" / "pair.jsonl")
    assert sorted(r["params"]["seed"] for r in state.values()) == [0, 1, 2, 3]
    # Each run is run by one process and skipped by the other (running there, or finished there).
    skips = sum(outputs.count(s) for s in ("in another sweep process, skipped", "by another", "done before"))
    assert skips == 4, outputs


def test_a_sweep_name_cannot_leave_runs_sweeps(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {"name": "../../x", "program": "spikeq", "method": "grid", "parameters": {"seed": {"value": 0}}}
        )
    )
    with pytest.raises(ValueError, match=r"sweep name '../../x' is not allowed"):
        load_sweep(sweep)


# --- 8. evaluate: one line for every malformed file --------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A DSQN and a DQN exported weights-only (untrained: only the files matter here)."""
    folder = tmp_path_factory.mktemp("exported")
    env = atari.make_env("Pong", n_envs=1, seed=0, train=True)
    for model in ("dsqn", "dqn"):
        config = resolve("smoke", model, buffer_size=64, batch_size=8)
        weights.export_weights(build_model(config, env, "cpu"), folder / model, config.to_dict())
    env.close()
    return folder


def _mutate(folder: Path, model: str, how: str, target: Path) -> Path:
    weights, meta = folder / f"{model}.safetensors", json.loads((folder / f"{model}.json").read_text())
    target.mkdir(exist_ok=True)
    out = target / "model"
    blob = weights.read_bytes()
    if how == "truncated":
        blob = blob[: len(blob) // 2]
    elif how == "no-tensors":
        blob = None
    elif how == "no-policy-kwargs":
        del meta["policy_kwargs"]
    elif how == "huge-T":
        meta["policy_kwargs"]["num_steps"] = 10**9
    elif how == "wrong-shapes":
        meta["policy_kwargs"]["net_arch"] = [7]
    elif how == "garbage-json":
        meta = None
    elif how == "foreign-policy":
        meta["policy"] = "os.system"
    if blob is not None:
        out.with_suffix(".safetensors").write_bytes(blob)
    out.with_suffix(".json").write_text("{not json" if meta is None else json.dumps(meta))
    return out.with_suffix(".json" if how == "no-tensors" else ".safetensors")


@pytest.mark.parametrize(
    ("model", "how", "message"),
    [
        ("dqn", "truncated", "is not a readable safetensors file"),
        ("dqn", "no-tensors", "not found: a weights-only model is a .safetensors + .json pair"),
        ("dqn", "no-policy-kwargs", "policy_kwargs is missing"),
        ("dsqn", "huge-T", "num_steps=1000000000; allowed: 1 to 4096"),
        ("dsqn", "wrong-shapes", "does not fit its policy"),
        ("dqn", "garbage-json", "is not readable JSON"),
        ("dqn", "foreign-policy", "unknown policy 'os.system'"),
    ],
)
def test_evaluate_a_malformed_weights_file_is_one_line(exported, tmp_path, capsys, model, how, message):
    path = _mutate(exported, model, how, tmp_path)
    code = cli.main(["evaluate", str(path), "--game", "Pong", "--episodes", "1", "--max-episode-steps", "5"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--torch-threads", "100000"], "--torch-threads 100000 is out of range; allowed: 0 to 1024"),
        (["--seed", "4294967296"], "--seed 4294967296 is out of range"),
        (["--max-episode-steps", "0"], "--max-episode-steps 0 must be >= 1"),
    ],
)
def test_evaluate_bad_options_are_one_line(exported, capsys, args, message):
    assert cli.main(["evaluate", str(exported / "dqn.safetensors"), "--game", "Pong", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_evaluate_a_broken_zip_is_one_line(tmp_path, capsys):
    (tmp_path / "model.zip").write_bytes(b"PK\x03\x04 not really")
    assert cli.main(["evaluate", str(tmp_path / "model.zip"), "--game", "Pong"]) == 2
    err = capsys.readouterr().err
    assert "does not load" in err and err.count("\n") == 1


def test_result_files_are_never_replaced_without_force(exported, tmp_path, capsys):
    """evaluate --out / --video, export, convert and export-nir refuse an output that exists before any
    work starts, and leave it as it was; --force replaces it (atomically: no temporary file stays)."""
    import nir

    dqn, dsqn = str(exported / "dqn.safetensors"), str(exported / "dsqn.safetensors")
    earlier = b"an earlier result"
    outputs = {
        name: tmp_path / name
        for name in ("result.json", "ep.mp4", "shared.json", "snn.safetensors", "dsqn.nir")
    }
    for path in outputs.values():
        path.write_bytes(earlier)
    commands = {
        "result.json": ["evaluate", "--random", "--game", "MinAtar/Breakout", "--episodes", "1", "--out"],
        "ep.mp4": ["evaluate", dqn, "--game", "Pong", "--episodes", "1", "--video"],
        "shared.json": ["export", dqn],  # the stem names OUT.safetensors and OUT.json
        "snn.safetensors": ["convert", dqn, "--game", "Pong"],
        "dsqn.nir": ["export-nir", dsqn],
    }
    for name, command in commands.items():
        target = outputs[name].with_suffix("") if command[0] in ("export", "convert") else outputs[name]
        assert cli.main([*command, str(target)]) == 2, name
        err = capsys.readouterr().err
        assert f"{outputs[name]} exists; pass --force to replace it" in err and err.count("\n") == 1, err
        assert outputs[name].read_bytes() == earlier, name

    assert cli.main([*commands["result.json"], str(outputs["result.json"]), "--force"]) == 0
    assert json.loads(outputs["result.json"].read_text())["episodes"] == 1
    assert cli.main([*commands["dsqn.nir"], str(outputs["dsqn.nir"]), "--force"]) == 0
    assert "fc1" in nir.read(outputs["dsqn.nir"]).nodes
    capsys.readouterr()
    assert not list(tmp_path.glob(".*.tmp"))


# --- 9. usability ----------------------------------------------------------------------------------------


def test_the_export_is_small_and_readable_by_others(exported):
    assert (exported / "dqn.json").stat().st_size < 20_000  # the Box bounds are one number each
    umask = os.umask(0)
    os.umask(umask)
    assert (exported / "dqn.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_the_resume_command_runs_as_printed(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert resume_command(tmp_path / "my run") == shlex.join(
        [sys.executable, "-m", "spikeq.cli", "train", "--resume", str(tmp_path / "my run")]
    )
    script = Path(sys.executable).parent / "spikeq"
    if script.exists():
        monkeypatch.setenv("PATH", str(script.parent))
        assert resume_command(Path("runs/a")) == "spikeq train --resume runs/a"


def test_train_help_describes_every_flag():
    help_text = " ".join(
        cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help().split()
    )
    assert "--learning_rate LEARNING_RATE optimiser learning rate (paper: Adam 1e-4)" in help_text
    # The network's flags are documented where the network declares them (NetworkSpec, NeuronSpec).
    assert "--num_steps NUM_STEPS T, simulation steps per forward pass (paper: 64)" in help_text
    assert "--tau TAU membrane time constant of the LIF neuron (paper: 2.0)" in help_text
    assert "default: the preset's value" not in help_text


def test_the_printout_names_the_device_used_and_warns_a_cpu_of_paper_budgets(capsys):
    cli._print_config(resolve("paper", "dsqn", device="auto", steps=2_000_000))
    out = capsys.readouterr().out
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert f"auto ({expected})" in out
    assert "steps=2,000,000 < exploration_steps=1,000,000" not in out
    warning = train.cpu_warning(resolve("paper", "dsqn"), "cpu")
    assert warning is not None and "about 289.4 days" in warning and "--device cuda" in warning
    assert train.cpu_warning(resolve("smoke", "dsqn"), "cpu") is None
    # MinAtar's own budget (5M steps) takes a CPU about 14 hours at T = 8: no warning; 20M take 2.3 days
    minatar = resolve("minatar", "dsqn", game="MinAtar/Breakout")
    assert minatar.steps == 5_000_000 and train.cpu_warning(minatar, "cpu") is None
    warning = train.cpu_warning(resolve("minatar", "dsqn", game="MinAtar/Breakout", steps=20_000_000), "cpu")
    assert warning is not None and "about 2.3 days" in warning and "on minatar" in warning
    assert train.cpu_warning(resolve("paper", "dsqn"), "cuda") is None


def test_a_budget_shorter_than_the_epsilon_decay_keeps_its_slope(capsys):
    # 96 steps of a 1,000-step decay from 1.0 to 0.1: epsilon ends at 0.9136, not at 0.1.
    config = resolve(
        "smoke", "dqn", steps=96, exploration_steps=1_000, learning_starts=1_000, buffer_size=200
    )
    env = atari.make_env("Pong", n_envs=1, seed=0, train=True)
    model = build_model(config, env, "cpu")
    model.learn(config.steps)
    env.close()
    assert model.exploration_rate == pytest.approx(1.0 - 0.9 * 0.096, abs=1e-6)
    cli._print_config(config)
    assert "epsilon decays at the configured rate and ends the run at 0.914" in capsys.readouterr().out
