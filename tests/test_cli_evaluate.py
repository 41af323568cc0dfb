"""``spikeq evaluate``, ``export``, ``report`` and ``table`` on the checkpoints of real smoke runs (Pong)."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import run_spikeq as spikeq

from spikeq import cli
from spikeq.analysis.compare import compare_scores, format_comparison
from spikeq.analysis.report import (
    format_table,
    plot_learning_curves,
    results_table,
    run_config,
    setting_labels,
    write_table,
)
from spikeq.experiment.config import PRESETS, preset_values

KEYS = (
    "score_mean", "score_std", "score_min", "score_max", "human_normalized", "firing_rate",
    "spikes_per_action", "sops_per_action", "macs_per_action", "energy_pj_per_action",
    "ann_energy_pj_per_action", "energy_ratio", "energy_model", "assumptions",
)  # fmt: skip


def evaluate(checkpoint, out, *extra, episodes=2):
    """``spikeq evaluate CHECKPOINT`` on short (150-step) Pong episodes; returns the JSON and stdout."""
    args = ["--episodes", str(episodes), "--max-episode-steps", "150", "--out", str(out), *extra]
    done = spikeq("evaluate", str(checkpoint), *args)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


@pytest.mark.parametrize("model", ["dsqn", "dqn"])
def test_evaluate_reports_scores_and_energy(smoke_run, tmp_path, model):
    run_dir, done = smoke_run(model)
    assert done.returncode == 0, done.stderr[-3000:]
    result, stdout = evaluate(
        run_dir / "checkpoints" / "best.zip", tmp_path / "eval.json", "--video", str(tmp_path / "ep.mp4")
    )

    for key in KEYS:
        assert key in result, key
    assert result["episodes"] == 2 and len(result["scores"]) == 2
    scores = result["scores"]
    assert result["score_mean"] == pytest.approx(sum(scores) / len(scores))
    assert (result["score_min"], result["score_max"]) == (min(scores), max(scores))
    random_score, human_score = -20.7, 14.6  # Pong (spikeq.envs.ale_games.REFERENCE_SCORES)
    assert result["human_normalized"] == pytest.approx(
        (result["score_mean"] - random_score) / (human_score - random_score)
    )
    assert result["energy_model"]["name"] == "45nm"
    assert result["ann_energy_pj_per_action"] == pytest.approx(4.6 * result["ann_macs_per_action"])
    if model == "dsqn":
        assert set(result["firing_rate"]) == {"conv1", "conv2", "conv3", "fc1"}
        assert all(0 <= rate <= 1 for rate in result["firing_rate"].values())
        assert result["spikes_per_action"] > 0 and result["firing_rate"]["conv1"] > 0
        assert result["macs_per_action"] == 32 * 20 * 20 * (4 * 8 * 8)  # static conv1, counted once
        assert result["energy_pj_per_action"] == pytest.approx(
            4.6 * result["macs_per_action"] + 0.9 * result["sops_per_action"]
        )
        assert result["energy_ratio"] == pytest.approx(
            result["energy_pj_per_action"] / result["ann_energy_pj_per_action"]
        )
        assert "firing rate (T = " in stdout
    else:
        assert result["spikes_per_action"] == 0 and result["energy_ratio"] == 1.0
    assert (tmp_path / "ep.mp4").stat().st_size > 1000


def test_weights_only_export_evaluates_like_the_zip(smoke_run, tmp_path):
    run_dir, _ = smoke_run("dsqn")
    export = spikeq("export", str(run_dir / "checkpoints" / "best.zip"), str(tmp_path / "shared"))
    assert export.returncode == 0, export.stderr
    meta = json.loads((tmp_path / "shared.json").read_text())
    assert meta["format"] == "spikeq-weights-v1" and meta["config"]["game"] == "Pong"
    from_zip, _ = evaluate(run_dir / "checkpoints" / "best.zip", tmp_path / "a.json", episodes=1)
    from_weights, _ = evaluate(tmp_path / "shared.safetensors", tmp_path / "b.json", episodes=1)
    assert from_weights["scores"] == from_zip["scores"]
    assert from_weights["spikes_per_action"] == from_zip["spikes_per_action"]
    # A step checkpoint (checkpoints/step-N/model.zip) finds its run's config.yaml two folders up.
    step_zip = next((run_dir / "checkpoints").glob("step-*/model.zip"))
    export = spikeq("export", str(step_zip), str(tmp_path / "step"))
    assert export.returncode == 0, export.stderr
    assert json.loads((tmp_path / "step.json").read_text())["config"]["game"] == "Pong"


def test_a_spiking_checkpoint_plays_at_another_number_of_time_steps(smoke_run, tmp_path):
    """``--num-steps T`` runs the trained weights for T steps per decision; at the trained T it changes
    nothing, at another the energy is counted for that T."""
    run_dir, _ = smoke_run("dsqn")
    checkpoint = run_dir / "checkpoints" / "best.zip"
    trained = PRESETS["smoke"]["num_steps"]
    own, _ = evaluate(checkpoint, tmp_path / "own.json", episodes=1)
    same, _ = evaluate(checkpoint, tmp_path / "same.json", "--num-steps", str(trained), episodes=1)
    assert own["num_steps"] == same["num_steps"] == trained
    assert same["scores"] == own["scores"] and same["spikes_per_action"] == own["spikes_per_action"]
    longer, stdout = evaluate(checkpoint, tmp_path / "x4.json", "--num-steps", str(4 * trained), episodes=1)
    assert longer["num_steps"] == 4 * trained and f"firing rate (T = {4 * trained})" in stdout
    assert longer["macs_per_action"] == own["macs_per_action"]  # conv1 runs once whatever T
    assert longer["spikes_per_action"] > own["spikes_per_action"]

    dqn = smoke_run("dqn")[0] / "checkpoints" / "best.zip"
    for args, message in (
        ((str(dqn), "--num-steps", "4"), "policy is CnnPolicy, which does not spike"),
        ((str(checkpoint), "--num-steps", "0"), "num_steps=0 is out of range; allowed: 1 to 4096"),
        (("--random", "--game", "Pong", "--num-steps", "4"), "--random runs no network"),
    ):
        refused = spikeq("evaluate", *args, "--episodes", "1")
        assert refused.returncode == 2 and message in refused.stderr and "Traceback" not in refused.stderr


def test_evaluate_bad_input(tmp_path):
    missing = spikeq("evaluate", str(tmp_path / "none.zip"))
    assert (
        missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    )
    weird = tmp_path / "model.pt"
    weird.write_bytes(b"")
    unknown = spikeq("evaluate", str(weird), "--game", "Pong")
    assert unknown.returncode == 2 and "allowed: .zip, .safetensors, .json" in unknown.stderr


def test_report_plots_the_curves_of_several_runs(smoke_run, tmp_path):
    runs = [str(smoke_run(model)[0]) for model in ("dsqn", "dqn")]
    done = spikeq("report", *runs, "--out", str(tmp_path / "pong.png"))
    assert done.returncode == 0, done.stderr
    image = (tmp_path / "pong.png").read_bytes()
    assert image.startswith(b"\x89PNG") and len(image) > 10_000

    missing = spikeq("report", str(tmp_path / "no-run"), "--out", str(tmp_path / "x.png"))
    assert missing.returncode == 2 and "has no eval.csv (is it a spikeq run?)" in missing.stderr
    started = tmp_path / "started"  # a run that has not reached its first evaluation
    started.mkdir()
    shutil.copy(Path(runs[0]) / "config.yaml", started / "config.yaml")
    early = spikeq("report", str(started), "--out", str(tmp_path / "y.png"))
    assert early.returncode == 2 and "has no eval.csv (no evaluation yet)" in early.stderr


def test_table_summarises_runs_per_game_and_model(smoke_run, tmp_path, capsys):
    """``spikeq table``: the smoke runs, a second "seed" of the DQN run, and a standalone evaluation."""
    dsqn, dqn = (smoke_run(model)[0] for model in ("dsqn", "dqn"))
    second = tmp_path / "dqn-seed-1"
    shutil.copytree(dqn, second, ignore=shutil.ignore_patterns("checkpoints", "wandb"))
    config = yaml.safe_load((second / "config.yaml").read_text())
    (second / "config.yaml").write_text(yaml.safe_dump({**config, "seed": 1}))
    evaluation = json.loads((second / "evaluation.json").read_text())
    first_score = evaluation["score_mean"]
    (second / "evaluation.json").write_text(json.dumps({**evaluation, "score_mean": first_score + 4}))
    standalone, _ = evaluate(dsqn / "checkpoints" / "best.zip", tmp_path / "dsqn-eval.json", episodes=1)
    assert (standalone["model"], standalone["train_seed"]) == ("dsqn", 0)

    attacked = tmp_path / "dsqn-fgsm.json"  # as `spikeq evaluate --perturb fgsm:0.01` records it
    attacked.write_text(json.dumps({**standalone, "perturbation": "fgsm:0.01"}))

    out = tmp_path / "results.md"
    paths = [dsqn, dqn, second, tmp_path / "dsqn-eval.json", attacked]
    assert cli.main(["table", *map(str, paths), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.read_text().strip() in printed
    rows = results_table(paths)
    by_model = {row["model"]: row for row in rows if row["perturbation"] == "none"}
    assert set(by_model) == {"dsqn", "dqn"}
    (fgsm,) = [row for row in rows if row["perturbation"] == "fgsm:0.01"]
    assert (fgsm["model"], fgsm["runs"], fgsm["score"]) == ("dsqn", 1, standalone["score_mean"])
    assert (by_model["dqn"]["runs"], by_model["dqn"]["seeds"]) == (2, [0, 1])
    assert by_model["dqn"]["score"] == pytest.approx(first_score + 2)
    assert by_model["dqn"]["score_sd"] == pytest.approx(4 / 2**0.5)  # two runs 4 apart, ddof 1
    assert by_model["dqn"]["energy_ratio"] == 1.0 and by_model["dqn"]["num_steps"] is None
    dsqn_scores = [json.loads((dsqn / "evaluation.json").read_text())["score_mean"], standalone["score_mean"]]
    assert by_model["dsqn"]["score"] == pytest.approx(sum(dsqn_scores) / 2)
    assert by_model["dsqn"]["num_steps"] == 4 and 0 < by_model["dsqn"]["energy_ratio"]
    assert "| Pong | dsqn | firing | none | 4 | 2 | 0,0 |" in printed

    write_table(rows, tmp_path / "results.csv")
    assert (
        (tmp_path / "results.csv")
        .read_text()
        .splitlines()[0]
        .startswith("game,model,init,setting,perturbation,num_steps")
    )
    # --compare: the DSQN runs against the DQN runs, Pong's chance level from the random policy.
    random_eval = tmp_path / "random.json"
    args = ["--game", "Pong", "--episodes", "1", "--max-episode-steps", "150", "--out", str(random_eval)]
    assert spikeq("evaluate", "--random", *args).returncode == 0
    compared = tmp_path / "compared" / "comparison.md"
    command = ["table", *map(str, paths), str(random_eval), "--compare", "dsqn:firing", "dqn"]
    assert cli.main([*command, "--compare-out", str(compared)]) == 0
    printed = capsys.readouterr().out
    chance = json.loads(random_eval.read_text())["score_mean"]
    expected = compare_scores({"Pong": (dsqn_scores, [first_score, first_score + 4], chance)}, "dsqn", "dqn")
    assert compared.read_text().strip() == format_comparison(expected) and compared.read_text() in printed
    assert cli.main(["table", *map(str, paths), "--compare", "dsqn", "dqn"]) == 2
    assert "the results hold: dqn; dsqn:firing" in capsys.readouterr().err

    (tmp_path / "unfinished").mkdir()
    assert cli.main(["table", str(dsqn), str(tmp_path / "unfinished")]) == 0
    assert "skipped" in capsys.readouterr().err
    assert cli.main(["table", str(tmp_path / "unfinished")]) == 2
    assert "none of the directories holds a finished run" in capsys.readouterr().err
    assert cli.main(["table", str(tmp_path / "no-run")]) == 2
    assert "neither a run directory nor an evaluation JSON" in capsys.readouterr().err
    assert cli.main(["table", str(dsqn), "--out", str(tmp_path / "t.txt")]) == 2
    assert "allowed suffixes .md, .csv" in capsys.readouterr().err


def test_runs_of_another_setting_are_never_averaged_with_the_others(smoke_run, tmp_path):
    """An ablation (here the reset's gradient, or T) gets a row and a curve of its own, labelled with the
    settings that set it apart; where and how a run ran (threads, seed) does not count, nor a field an
    older config lacks."""
    dsqn, _ = smoke_run("dsqn")
    changes = {
        1: {"torch_threads": 2},
        2: {"detach_reset": False},
        3: {"num_steps": 2},
        4: {"tau": None},  # a config written before the field existed
    }
    runs = [dsqn]
    for seed, change in changes.items():
        run = tmp_path / f"dsqn-s{seed}"
        shutil.copytree(dsqn, run, ignore=shutil.ignore_patterns("checkpoints", "wandb"))
        config = {**yaml.safe_load((run / "config.yaml").read_text()), "seed": seed, **change}
        (run / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in config.items() if v is not None}))
        runs.append(run)

    rows = {row["setting"]: row for row in results_table(runs)}
    assert set(rows) == {"detach_reset=True, num_steps=4", "detach_reset=False, num_steps=4",
                         "detach_reset=True, num_steps=2"}  # fmt: skip
    assert rows["detach_reset=True, num_steps=4"]["seeds"] == [0, 1, 4]
    assert rows["detach_reset=False, num_steps=4"]["seeds"] == [2]
    assert "| Pong | dsqn (detach_reset=False, num_steps=4) | firing |" in format_table(list(rows.values()))
    (merged,) = results_table(runs, ignore=("detach_reset", "num_steps"))
    assert merged["setting"] is None and merged["seeds"] == [0, 1, 2, 3, 4]

    labels = setting_labels([run_config(run) for run in runs])
    assert labels[1] == labels[0] and labels[2] == "detach_reset=False, num_steps=4"
    assert plot_learning_curves(runs, tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")

    # Against each run's preset, only the ablations are labelled: the preset's own runs keep the plain
    # row whatever else the group holds (and so stay a side of compare_models).
    rows = {row["setting"]: row for row in results_table(runs, reference=preset_values)}
    assert set(rows) == {None, "detach_reset=False", "num_steps=2"}
    assert rows[None]["seeds"] == [0, 1, 4] and rows["num_steps=2"]["seeds"] == [3]
    (alone,) = results_table([runs[2]], reference=preset_values)  # an ablation alone is still one
    assert alone["setting"] == "detach_reset=False"
    # A config that names no preset is labelled against the others, as without reference.
    no_preset = {"game": "Pong", "detach_reset": True}
    labels = setting_labels([run_config(runs[2]), no_preset], reference=preset_values)
    assert labels == ["detach_reset=False", "detach_reset=True"]
    # How a run ran (the engine, its backend, recomputation: the same spikes and Q) sets no run apart.
    elsewhere = {**run_config(runs[0]), "engine": "snntorch", "backend": "torch", "recompute": True}
    assert setting_labels([run_config(runs[0]), elsewhere], reference=preset_values) == ["", ""]
    assert setting_labels([run_config(runs[0]), elsewhere]) == ["", ""]
    lines = tmp_path / "preset-curves.png"
    assert plot_learning_curves(runs, lines, reference=preset_values).read_bytes().startswith(b"\x89PNG")
    table = spikeq("table", *map(str, runs))
    assert table.returncode == 0, table.stderr[-2000:]
    assert (
        "| Pong | dsqn | firing |" in table.stdout
        and "| Pong | dsqn (num_steps=2) | firing |" in table.stdout
    )
