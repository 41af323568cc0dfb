"""The training pipeline end to end: the real ``spikeq`` CLI on real ALE Pong with the smoke preset."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import SPIKEQ
from conftest import run_spikeq as spikeq

from spikeq import cli
from spikeq.envs import atari
from spikeq.experiment.config import PRESETS, resolve
from spikeq.experiment.train import build_model, is_new_best, sb3_update_schedule

# A finished run's evaluation.json, key by key and in this order.
EVALUATION_JSON_KEYS = [
    "game", "model", "best_step", "episodes", "scores", "episode_lengths", "score_mean", "score_std",
    "score_min", "score_max", "human_normalized", "epsilon", "seed", "perturbation", "video_path",
    "energy_model", "num_steps", "decisions", "firing_rate", "mean_firing_rate", "spikes_per_layer",
    "spikes_per_action", "sops_per_layer", "sops_per_action", "macs_per_layer", "macs_per_action",
    "neuron_updates_per_action", "energy_breakdown_pj", "energy_pj_per_action", "ann_macs_per_action",
    "ann_energy_pj_per_action", "energy_ratio", "assumptions",
]  # fmt: skip


def eval_rows(run_dir: Path) -> list[dict]:
    with (run_dir / "eval.csv").open() as f:
        return list(csv.DictReader(f))


def smoke_steps() -> list[int]:
    smoke = PRESETS["smoke"]
    return list(range(smoke["eval_freq"], smoke["steps"] + 1, smoke["eval_freq"]))


@pytest.mark.parametrize("model", ["dsqn", "dqn"])
def test_smoke_run_writes_a_complete_run_directory(smoke_run, model):
    run_dir, done = smoke_run(model)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resolved config" in done.stdout and "finished 1,200 steps" in done.stdout

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["game"] == "Pong" and config["model"] == model and config["preset"] == "smoke"
    assert config["num_steps"] == PRESETS["smoke"]["num_steps"]

    rows = eval_rows(run_dir)
    assert [int(r["step"]) for r in rows] == smoke_steps()
    assert (run_dir / "eval.png").read_bytes().startswith(b"\x89PNG")  # the learning curve so far
    for row in rows:
        assert -21 <= float(row["score_mean"]) <= 21 and int(row["episodes"]) == 2
        random_score, human_score = -20.7, 14.6  # Pong (spikeq.envs.ale_games.REFERENCE_SCORES)
        expected = (float(row["score_mean"]) - random_score) / (human_score - random_score)
        assert float(row["human_normalized"]) == pytest.approx(expected)

    ckpt = run_dir / "checkpoints"
    latest = ckpt / (ckpt / "latest").read_text().strip()
    assert latest.name == "step-1200" and (latest / "model.zip").exists() and (latest / "replay.npz").exists()
    assert json.loads((latest / "trainer.json").read_text())["num_timesteps"] == 1200
    for name in ("best.zip", "best.safetensors", "best.json"):
        assert (ckpt / name).exists(), name

    with (run_dir / "train.csv").open() as f:
        train_rows = list(csv.DictReader(f))
    assert any(r.get("train/loss") for r in train_rows), "SB3's training scalars reach train.csv"
    assert any(r.get("eval/score_mean") for r in train_rows)
    if model == "dsqn":  # every spiking layer's firing rate on the training batches
        assert config["init"] == "firing"
        for layer in ("conv1", "conv2", "conv3", "fc1"):
            rates = [
                float(r[f"train/firing_rate/{layer}"])
                for r in train_rows
                if r.get(f"train/firing_rate/{layer}")
            ]
            assert rates and all(0.01 < rate < 0.5 for rate in rates), (layer, rates)
    else:
        assert not any(key.startswith("train/firing_rate") for key in train_rows[0])

    result = json.loads((run_dir / "evaluation.json").read_text())
    assert list(result) == EVALUATION_JSON_KEYS
    assert result["episodes"] == 2 and result["model"] == model and result["game"] == "Pong"
    if model == "dsqn":
        assert list(result["firing_rate"]) == ["conv1", "conv2", "conv3", "fc1"]
        assert result["macs_per_action"] == 32 * 20 * 20 * (4 * 8 * 8)  # the static conv1, once
        energy = 4.6 * result["macs_per_action"] + 0.9 * result["sops_per_action"]
        assert result["energy_pj_per_action"] == pytest.approx(energy)
    else:
        assert result["firing_rate"] == {} and result["energy_ratio"] == 1.0
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def test_sigterm_checkpoints_and_resume_finishes_every_evaluation_once(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    args = ["train", "--preset", "smoke", "--steps", "1800", "--run-dir", str(run_dir)]
    proc = subprocess.Popen(
        [*SPIKEQ, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    deadline = time.time() + 300
    # Interrupt once the first evaluation is written, well before the end.
    while time.time() < deadline and not ((run_dir / "eval.csv").exists() and eval_rows(run_dir)):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "interrupted by SIGTERM" in err and f"--resume {run_dir}" in err
    interrupted_at = int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step-"))
    assert 600 <= interrupted_at < 1800

    done = spikeq("train", "--resume", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "finished 1,800 steps" in done.stdout
    assert [int(r["step"]) for r in eval_rows(run_dir)] == [600, 1200, 1800]
    assert json.loads((run_dir / "evaluation.json").read_text())["episodes"] == 2


def test_wandb_offline_run_holds_the_config_and_the_evaluation(smoke_run):
    run_dir, done = smoke_run("dsqn")
    assert done.returncode == 0, done.stderr[-3000:]
    (wandb_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    inspect = subprocess.run(
        [str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(wandb_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert inspect.returncode == 0, inspect.stderr
    records = [json.loads(line) for line in inspect.stdout.splitlines() if line.startswith("{")]
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    config = run["config"]["update"]
    assert (config["game"], config["model"], config["preset"], config["num_steps"]) == (
        "Pong",
        "dsqn",
        "smoke",
        4,
    )
    assert run["tags"] == ["Pong", "dsqn"]
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    evaluations = [(h["_step"], h["eval/score_mean"]) for h in history if "eval/score_mean" in h]
    rows = eval_rows(run_dir)
    assert evaluations == [(int(r["step"]), float(r["score_mean"])) for r in rows]
    key = "train/firing_rate/fc1"
    rates = [(h["_step"], h[key]) for h in history if key in h]
    with (run_dir / "train.csv").open() as f:
        assert rates and rates == [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r[key]]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--game", "Pongg"], "Unknown Atari game 'Pongg'"),
        (["--model", "snn"], "unknown model 'snn'; allowed: dsqn, dsqn-if, dsqn-spike, dsqn-mem, dqn"),
        (["--preset", "fast"], "unknown preset 'fast'; allowed: paper, zoo, minatar, smoke"),
        (["--steps", "0"], "steps=0 must be a positive integer"),
        (["--steps", "-5"], "steps=-5 must be a positive integer"),
        (["--num-steps", "0"], "num_steps=0 must be >= 1"),
        (["--buffer-size", "8", "--batch-size", "32"], "buffer_size=8 is smaller than batch_size=32"),
        (["--surrogate", "relu"], "unknown surrogate 'relu'"),
        (["--wandb", "cloud"], "unknown wandb mode 'cloud'"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--init", "lsuv"], "unknown init 'lsuv'; allowed: default, firing"),
        (
            ["--n-envs", "8", "--steps", "1001"],
            "steps=1001 is not a multiple of n_envs=8; allowed: a multiple, e.g. 1000 or 1008",
        ),
        # Refused by the environment's maker, once the run directory exists: it is removed again.
        (["--game", "MinAtar/Breakout", "--vec-env", "ale"], "vec_env"),
    ],
)
def test_bad_training_input_is_one_line_and_exit_code_2(tmp_path, capsys, args, message):
    code = cli.main(["train", "--preset", "smoke", "--out-dir", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not list(tmp_path.iterdir()), "nothing is created for a bad command"


def test_unknown_game_suggests_close_names(capsys, tmp_path):
    assert cli.main(["train", "--game", "Breakot", "--out-dir", str(tmp_path)]) == 2
    assert "Breakout" in capsys.readouterr().err


def test_cli_errors_have_no_traceback_in_a_real_process(tmp_path):
    done = spikeq("train", "--game", "Pongg", "--out-dir", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.startswith("spikeq train: error: Unknown Atari game 'Pongg'")
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1


def test_resume_errors(tmp_path, capsys):
    assert cli.main(["train", "--resume", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step-300").mkdir(parents=True)  # a checkpoint without its files
    resolve("smoke", "dsqn").save(run_dir / "config.yaml")
    assert cli.main(["train", "--resume", str(run_dir)]) == 2
    assert "no checkpoint to resume" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(run_dir), "--game", "Breakout"]) == 2
    assert "--game Breakout does not match the run being resumed (game=Pong)" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(run_dir), "--batch-size", "64"]) == 2
    assert "cannot change batch_size when resuming" in capsys.readouterr().err
    for flag in (["--run-dir", str(tmp_path / "elsewhere")], ["--force"]):
        assert cli.main(["train", "--resume", str(run_dir), *flag]) == 2
        assert f"{flag[0]} cannot be used with --resume" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere").exists()


def test_existing_run_directory_is_never_overwritten_without_force(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("keep me")
    assert cli.main(["train", "--preset", "smoke", "--run-dir", str(run_dir)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (run_dir / "notes.txt").read_text() == "keep me"


def test_unwritable_output_directory(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli.main(["train", "--preset", "smoke", "--out-dir", str(blocker / "runs")]) == 2
    assert "cannot write to output directory" in capsys.readouterr().err


def test_presets_and_overrides_resolve_in_order():
    config = resolve("zoo", "dsqn-if", learning_rate=3e-4)
    assert config.buffer_size == 100_000 and config.exploration_final_eps == 0.01  # zoo
    assert config.network.neuron == "if"  # model
    assert config.learning_rate == 3e-4  # override
    paper = resolve("paper", "dsqn")
    assert (paper.steps, paper.buffer_size, paper.learning_starts, paper.target_update_interval) == (
        50_000_000, 1_000_000, 50_000, 10_000
    )  # fmt: skip
    assert (paper.network.num_steps, paper.eval_freq, paper.eval_episodes, paper.eval_epsilon) == (
        64,
        250_000,
        30,
        0.05,
    )
    # The reference code's initialisation under the paper's preset; a firing network elsewhere.
    assert paper.network.init == "default"
    assert config.network.init == resolve("smoke").network.init == "firing"
    # Flat in config.yaml, W&B and on the command line.
    assert paper.to_dict()["init"] == "default" and "network" not in paper.to_dict()


def test_sweep_agent_style_arguments_are_accepted():
    args = cli.build_parser().parse_args(
        ["train", "--preset=zoo", "--game=Breakout", "--num_steps=16", "--seed=2", "--save_replay=True",
         "--learning-rate=3e-4", "--surrogate_slope=4", "--tags=sweep,T16"]
    )  # fmt: skip
    config = cli._train_config(args)
    assert (config.preset, config.game, config.network.num_steps, config.seed) == ("zoo", "Breakout", 16, 2)
    assert config.save_replay is True and config.learning_rate == 3e-4
    assert config.network.surrogate_slope == 4.0
    assert config.tags == ["sweep", "T16"]
    # W&B's ${args_no_boolean_flags} gives a true boolean as a bare flag; a list comes as JSON.
    args = cli.build_parser().parse_args(
        ["train", "--save_replay", "--bootstrap-time-limit", '--tags=["a", "b c"]']
    )
    config = cli._train_config(args)
    assert config.save_replay is True and config.bootstrap_time_limit is True
    assert config.tags == ["a", "b c"]


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    from spikeq.experiment.train import open_run

    config = resolve("smoke", "dsqn", steps=600, wandb="disabled", save_replay=False)
    trainer = open_run(config, run_dir=tmp_path / "run")
    # NaN rewards reach the loss as soon as training starts (step 400); a checkpoint is written at 300.
    buffer = trainer.model.replay_buffer
    store = buffer.add
    buffer.add = lambda obs, next_obs, action, reward, done, infos: store(
        obs, next_obs, action, reward * np.nan, done, infos
    )
    try:
        result = trainer.run()
    finally:
        trainer.close()
    assert result.status == "failed" and result.exit_code == 1
    assert "training loss became nan" in result.message and "checkpoint step-300 is kept" in result.message
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    assert latest == "step-300"


@pytest.mark.parametrize(
    "train_freq,n_envs,expected", [(4, 1, (4, 1)), (4, 8, (1, 2)), (8, 2, (4, 1)), (4, 3, (4, 3))]
)
def test_update_schedule_keeps_updates_per_agent_step(train_freq, n_envs, expected):
    assert sb3_update_schedule(train_freq, 1, n_envs) == expected


def test_several_envs_update_once_every_train_freq_agent_steps():
    # SB3 alone would count train_freq in vector steps: 4 envs would update 4x less often.
    config = resolve("smoke", "dqn", n_envs=4, learning_starts=64, train_freq=8, buffer_size=1_000)
    env = atari.make_env("Pong", n_envs=config.n_envs, seed=0, train=True)
    model = build_model(config, env, "cpu")
    model.learn(256)
    env.close()
    assert model.num_timesteps == 256
    assert model._n_updates == (256 - 64) // 8


@pytest.mark.parametrize("preset,terminal", [("paper", True), ("zoo", False)])
def test_the_time_limit_ends_training_episodes_as_the_preset_says(preset, terminal):
    # The paper's reference code treats the step cap as the end of the episode (no bootstrap);
    # SB3, and so the zoo preset, bootstraps through it.
    config = resolve(preset, "dqn", max_episode_steps=25, buffer_size=200, learning_starts=200)
    env = atari.make_env("Pong", n_envs=1, seed=0, train=True, max_episode_steps=config.max_episode_steps)
    model = build_model(config, env, "cpu")
    model.learn(100)  # random play: four episodes of Pong cut at 25 steps, no update yet
    env.close()
    buffer = model.replay_buffer
    assert int(buffer.dones.sum()) == 4  # every episode ended at the cap
    sampled = buffer._get_samples(np.arange(buffer.size())).dones  # what the TD target sees
    assert int(sampled.sum()) == (4 if terminal else 0)


def test_the_later_of_two_equal_evaluations_becomes_the_best():
    assert is_new_best(-21.0, None)  # the first evaluation
    assert is_new_best(-20.0, -21.0) and is_new_best(-21.0, -21.0)  # better, or as good: the later
    assert not is_new_best(-21.5, -21.0)
