"""MinAtar games: names, the environment, the MinAtar torso of every model, the preset, and short real
training runs through the ``spikeq`` command."""

import csv
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
import yaml
from conftest import run_spikeq as spikeq
from gymnasium import spaces
from minatar import Environment
from stable_baselines3 import DQN
from torch import nn

from spikeq.analysis.compare import comparison_report
from spikeq.analysis.report import (
    TRAINING_CURVE,
    format_summary,
    plot_ablations,
    plot_robustness,
    read_training_curve,
    split_by_budget,
    write_training_curve,
)
from spikeq.analysis.weights import export_weights, load_model
from spikeq.envs import games, minatar
from spikeq.experiment.config import OPTIMIZERS, PRESETS, preset_values, resolve
from spikeq.experiment.train import build_model
from spikeq.files import FileLock
from spikeq.snn.network import MinAtarCNN, NetworkSpec, SpikingQNetwork, torso_of

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def load_script(name: str):
    """An experiments/ script as a module, its folder on sys.path as when it runs as a script."""
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


study, report = load_script("minatar_study"), load_script("minatar_report")
robustness = load_script("minatar_robustness")
timesteps = load_script("minatar_timesteps")


@pytest.mark.parametrize(
    ("name", "env_id"),
    [
        ("MinAtar/Breakout", "MinAtar/Breakout-v1"),
        ("minatar/spaceinvaders", "MinAtar/SpaceInvaders-v1"),
        ("MinAtar/Freeway-v0", "MinAtar/Freeway-v0"),
        ("MinAtar/Seaquest-v1", "MinAtar/Seaquest-v1"),
    ],
)
def test_game_names_resolve_like_ale_names(name, env_id):
    assert games.resolve_game(name) == env_id
    assert games.game_short_name(name) == env_id.rsplit("-", 1)[0]
    assert games.file_safe_name(name) == env_id.rsplit("-", 1)[0].replace("/", "-")


def test_a_misspelt_game_names_the_closest_ones():
    with pytest.raises(ValueError, match=r"Unknown MinAtar game 'MinAtar/Breakot'.*MinAtar/Breakout\?"):
        games.resolve_game("MinAtar/Breakot")
    with pytest.raises(ValueError, match="Asterix, Breakout, Freeway, Seaquest, SpaceInvaders"):
        games.resolve_game("MinAtar/Pong")


def test_the_env_gives_channel_first_binary_grids_of_the_game_state():
    env = games.make_env("MinAtar/Breakout", seed=3)
    obs = env.reset()
    assert env.observation_space == spaces.Box(0, 1, (4, 10, 10), np.uint8)
    assert env.action_space == spaces.Discrete(3)  # v1: the minimal action set (no-op, left, right)
    assert obs.shape == (1, 4, 10, 10) and obs.dtype == np.uint8 and set(np.unique(obs)) <= {0, 1}
    # The same seed gives the same game as MinAtar's own Environment, read channel-last.
    game = Environment("breakout")
    game.seed(3)
    game.reset()
    np.testing.assert_array_equal(obs[0], np.moveaxis(game.state(), -1, 0))
    # Episodes end by themselves and are summarised by the Monitor (score, length).
    rng = np.random.default_rng(0)
    score, length = 0.0, 0
    for _ in range(2_000):
        obs, rewards, dones, infos = env.step(rng.integers(3, size=1))
        score, length = score + float(rewards[0]), length + 1
        if dones[0]:
            assert (infos[0]["episode"]["r"], infos[0]["episode"]["l"]) == (pytest.approx(score), length)
            break
    else:
        pytest.fail("a random Breakout episode should end within 2,000 steps")
    env.close()


def test_rendered_frames_are_large_enough_to_encode():
    env = minatar.make_env("MinAtar/SpaceInvaders", render_mode="rgb_array")
    env.reset()
    frame = env.render()
    assert frame.shape == (320, 320, 3) and frame.dtype == np.uint8 and frame.max() > 0
    env.close()


def test_small_grids_get_the_minatar_torso_for_every_model():
    grid = spaces.Box(0, 1, (6, 10, 10), np.uint8)
    assert torso_of(grid) == "grid"
    assert torso_of(spaces.Box(0, 255, (4, 20, 20), np.uint8)) == "grid"  # too small for Nature
    assert torso_of(spaces.Box(0, 255, (4, 84, 84), np.uint8)) == "nature"
    assert torso_of(spaces.Box(-1, 1, (8,))) == "mlp"

    for readout in ("rate", "spike", "max_mem"):
        net = SpikingQNetwork(grid, spaces.Discrete(4), NetworkSpec(num_steps=8, readout=readout))
        assert net.layer_names == ["conv1", "fc1"]
        conv, fc1 = net.synapses[0], net.synapses[1][-1]
        assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride) == (6, 16, (3, 3), (1, 1))
        assert (fc1.in_features, fc1.out_features) == (16 * 8 * 8, 128)
        assert net.readout.linear.out_features == 4
        q = net(torch.randint(0, 2, (5, 6, 10, 10), dtype=torch.uint8))
        assert q.shape == (5, 4)


def test_minatars_own_channel_last_grid_is_refused_not_convolved_across_its_rows():
    channel_first = minatar.make_env("MinAtar/Breakout")  # also registers MinAtar's ids with gymnasium
    model = DQN("SpikingPolicy", channel_first, policy_kwargs=dict(num_steps=2), buffer_size=100)
    assert model.policy.q_net.synapses[0].in_channels == 4
    channel_first.close()
    # gym.make gives MinAtar's bool [10, 10, C]; SB3 transposes only uint8 0-255 images, so without
    # ChannelFirstGrid the grid would reach conv1 with its 10 rows as channels.
    env = gym.make("MinAtar/Breakout-v1")
    assert env.observation_space.shape == (10, 10, 4)
    for build in (
        lambda: DQN("SpikingPolicy", env, policy_kwargs=dict(num_steps=2), buffer_size=100),
        lambda: MinAtarCNN(env.observation_space),
    ):
        with pytest.raises(ValueError, match=r"shape \(10, 10, 4\) is channel-last .* ChannelFirstGrid"):
            build()
    env.close()


def synapse_shapes(module: nn.Module) -> list[tuple[int, ...]]:
    return [tuple(m.weight.shape) for m in module.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def test_the_ann_and_the_dsqn_share_the_minatar_torso():
    env = games.make_env("MinAtar/Asterix")
    dqn = build_model(resolve("minatar", "dqn", game="MinAtar/Asterix"), env, "cpu")
    dsqn = build_model(resolve("minatar", "dsqn", game="MinAtar/Asterix"), env, "cpu")
    assert isinstance(dqn.q_net.features_extractor, MinAtarCNN)
    assert synapse_shapes(dqn.q_net) == synapse_shapes(dsqn.q_net) == [(16, 4, 3, 3), (128, 1024), (5, 128)]
    # Young and Tian's optimiser for both: centred RMSprop.
    for model in (dqn, dsqn):
        optimizer = model.policy.optimizer
        assert isinstance(optimizer, torch.optim.RMSprop)
        group = optimizer.param_groups[0]
        assert (group["lr"], group["alpha"], group["momentum"], group["eps"], group["centered"]) == (
            2.5e-4, 0.95, 0.95, 0.01, True,
        )  # fmt: skip
    env.close()


def test_the_minatar_preset_is_their_dqn_setup():
    config = resolve("minatar", "dsqn", game="MinAtar/Breakout")
    assert (config.buffer_size, config.batch_size, config.train_freq, config.gradient_steps) == (
        100_000,
        32,
        1,
        1,
    )
    assert (config.target_update_interval, config.learning_starts, config.steps) == (1_000, 5_000, 5_000_000)
    assert (config.exploration_initial_eps, config.exploration_final_eps, config.exploration_steps) == (
        1.0, 0.1, 100_000,
    )  # fmt: skip
    assert (config.gamma, config.optimizer, config.learning_rate) == (0.99, "rmsprop", 2.5e-4)
    assert config.max_grad_norm == float("inf") and config.network.num_steps == 8
    assert (config.eval_freq, config.eval_episodes, config.eval_epsilon) == (100_000, 30, 0.05)
    # Every value can still be overridden.
    assert resolve("minatar", "dsqn", learning_rate=1e-3, optimizer="adam").optimizer == "adam"
    assert set(OPTIMIZERS) == {"adam", "rmsprop"} and "minatar" in PRESETS


def test_an_unknown_optimizer_is_refused_with_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'; allowed: adam, rmsprop"):
        resolve("minatar", "dsqn", optimizer="sgd")


def test_a_trained_minatar_dqn_round_trips_through_the_weights_only_format(tmp_path):
    env = games.make_env("MinAtar/Freeway")
    model = build_model(resolve("minatar", "dqn", game="MinAtar/Freeway", learning_starts=32), env, "cpu")
    model.learn(64)
    weights, meta = export_weights(model, tmp_path / "new" / "folder" / "best")  # folders made as needed
    assert json.loads(meta.read_text())["policy_kwargs"]["features_extractor_class"] == "MinAtarCNN"
    loaded = load_model(weights, env, "cpu")
    obs = torch.as_tensor(np.stack([env.observation_space.sample() for _ in range(16)]))
    torch.testing.assert_close(loaded.q_net(obs), model.q_net(obs), rtol=0, atol=0)
    # Earlier files named the policy's class, not SB3's alias: "DQNPolicy" is "MlpPolicy".
    data = json.loads(meta.read_text())
    assert data["policy"] == "MlpPolicy"
    meta.write_text(json.dumps({**data, "policy": "DQNPolicy"}))
    torch.testing.assert_close(load_model(weights, env, "cpu").q_net(obs), model.q_net(obs), rtol=0, atol=0)
    env.close()


@pytest.fixture(scope="module")
def minatar_smoke(tmp_path_factory):
    """``spikeq train --game MinAtar/Breakout --model MODEL --preset smoke``, once per model."""
    runs = {}

    def get(model: str):
        if model not in runs:
            run_dir = tmp_path_factory.mktemp(f"minatar-{model}") / "run"
            game = ("--game", "MinAtar/Breakout")
            done = spikeq("train", *game, "--model", model, "--preset", "smoke", "--run-dir", str(run_dir))
            runs[model] = (run_dir, done)
        return runs[model]

    return get


@pytest.mark.parametrize("model", ["dsqn", "dqn"])
def test_smoke_training_on_minatar_breakout(minatar_smoke, model):
    run_dir, done = minatar_smoke(model)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((run_dir / "evaluation.json").read_text())
    assert result["game"] == "MinAtar/Breakout" and result["model"] == model
    assert result["human_normalized"] is None  # no human reference for MinAtar
    assert result["episodes"] == PRESETS["smoke"]["final_eval_episodes"]
    if model == "dsqn":
        assert result["energy_ratio"] is not None and set(result["firing_rate"]) == {"conv1", "fc1"}
    else:
        assert result["num_steps"] is None


def test_the_study_report_regenerates_table_and_curves(minatar_smoke, tmp_path):
    """What ``make minatar-report`` does, on the result files of two real smoke runs."""
    results = tmp_path / "results"
    for model in ("dsqn", "dqn"):
        run_dir, _ = minatar_smoke(model)
        study.collect(study.Run("Breakout", model, 0), run_dir, results)
    assert sorted(p.name for p in (results / "MinAtar-Breakout-dsqn-s0").iterdir()) == sorted(
        [*study.RESULT_FILES, *study.WEIGHT_FILES, study.TRAINING_CURVE]
    )
    assert report.main(["--results", str(results)]) == 0
    table = (results / "table.md").read_text()
    rows = {line.split("|")[2].strip(): line for line in table.splitlines()[2:]}
    assert set(rows) == {"dsqn", "dqn", "random"}
    dsqn_firing = json.loads((results / "MinAtar-Breakout-dsqn-s0" / "evaluation.json").read_text())
    assert f"{dsqn_firing['mean_firing_rate']:.3f} |" in rows["dsqn"]  # the firing-rate column
    # summary.md, README's form: one run's score ± its sd over episodes, the random policy last.
    summary = (results / "summary.md").read_text().splitlines()
    assert [line.split("|")[2].strip() for line in summary[2:]] == ["dqn", "dsqn", "random"]
    score = f"| {dsqn_firing['score_mean']:.2f} ± {dsqn_firing['score_std']:.2f} |"
    assert summary[3].startswith("| MinAtar/Breakout | dsqn | firing | ") and score in summary[3]
    assert json.loads((results / "random" / "MinAtar-Breakout.json").read_text())["model"] == "random"
    assert (results / "learning_curves.png").read_bytes().startswith(b"\x89PNG")
    assert (results / "training_curves.png").read_bytes().startswith(b"\x89PNG")
    # One run a side: the DSQN against the DQN without intervals.
    comparison = (results / "comparison.md").read_text().splitlines()
    assert comparison[0].startswith("| game | dsqn runs | dqn runs |")
    assert comparison[2].startswith("| MinAtar/Breakout | 1 | 1 |") and "[" not in comparison[2]


def test_the_study_comparison_leaves_each_game_out_and_compares_other_settings(tmp_path):
    """comparison.md on the committed 1M-step runs: the preset's comparison, each game left out in turn
    (Asterix's DQNs barely beat chance, so that game alone lifts the mean), and a table for a setting
    both models were run with: here a copy of a DSQN run relabelled as trained with Adam, beside the
    committed DQN with Adam."""
    results = report.RESULTS if report.RESULTS.is_absolute() else EXPERIMENTS.parent / report.RESULTS
    runs = sorted(
        path.parent for path in results.glob("*/evaluation.json") if "dsqn+adam" not in path.parent.name
    )
    main, _ = split_by_budget(runs)
    chance = sorted((results / "random").glob("*.json"))
    labels = dict(ignore=report.SAME_IN_EFFECT, reference=preset_values)
    relabelled = tmp_path / "MinAtar-Asterix-dsqn+adam-s0"
    shutil.copytree(results / "MinAtar-Asterix-dsqn-s0", relabelled)
    config = yaml.safe_load((relabelled / "config.yaml").read_text())
    (relabelled / "config.yaml").write_text(
        yaml.safe_dump({**config, "optimizer": "adam", "learning_rate": 1e-4})
    )
    compared = comparison_report([*main, relabelled, *chance], **labels)
    preset, *titled = compared.markdown.split("\n\n")
    tables = dict(zip(titled[::2], titled[1::2], strict=True))  # each further table under its title
    assert preset.splitlines()[0].startswith("| game | dsqn runs | dqn runs |")
    left_out = tables["Each game left out in turn (the mean over the others):"]
    rows = {row.split("|")[1].strip(): row.split("|")[3].split()[0] for row in left_out.splitlines()[2:]}
    assert set(rows) == {line.split("|")[1].strip() for line in preset.splitlines()[2:-1]}
    assert set(compared.left_out) == set(rows) == {game.game for game in compared.comparison.games}
    everything = preset.splitlines()[-1].split("|")[-3].split()[0]
    if "n/a" not in (everything, rows["MinAtar/Asterix"]):  # n/a: a game's DQN did not beat chance
        assert float(rows["MinAtar/Asterix"]) < float(everything)  # over the games where the DQN learns
    adam = "learning_rate=0.0001, optimizer=adam"
    assert list(tables)[-1] == f"Both models with {adam}:"
    (asterix,) = tables[f"Both models with {adam}:"].splitlines()[2:-1]
    dqn_adam = [run for run in main if run.name.startswith("MinAtar-Asterix-dqn+adam-s")]
    assert asterix.startswith(f"| MinAtar/Asterix | 1 | {len(dqn_adam)} |")


def markdown_tables(text: str) -> dict[str, set[str]]:
    """Each Markdown table's header line in ``text`` -> the rows under it (tables of one header pooled)."""
    tables: dict[str, set[str]] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")):
            rows = tables.setdefault(line, set())
            j = i + 2  # below the alignment row
            while j < len(lines) and lines[j].startswith("|"):
                rows.add(lines[j])
                j += 1
    return tables


def test_the_readme_shows_the_study_as_its_report_writes_it():
    """README's MinAtar results are the report's files, and those files are what the committed runs give
    now: summary.md and comparison.md regenerated equal the committed ones; README shows every row of
    summary.md; every table of README's MinAtar section has the header of a table of summary.md,
    comparison.md, robustness-summary.md or timesteps-summary.md (regenerated equal to the committed
    one too), and each of its rows is a row of such a table."""
    results = report.RESULTS if report.RESULTS.is_absolute() else EXPERIMENTS.parent / report.RESULTS
    runs = sorted(path.parent for path in results.glob("*/evaluation.json"))
    chance = report.chance_levels(results, runs)
    summary = format_summary(sorted(report.study_rows(results, runs, chance), key=report.summary_order))
    assert (results / "summary.md").read_text() == summary + "\n"
    main, _ = split_by_budget(runs)
    comparison = report.study_comparison(main, chance).markdown
    assert (results / "comparison.md").read_text() == comparison + "\n"
    robustness = (results / "robustness" / "robustness-summary.md").read_text()
    played = sorted(results.glob("timesteps/*/none-T*.json"))
    played_at = timesteps.summary(timesteps.rows_by_num_steps(played))
    assert (results / "timesteps" / "timesteps-summary.md").read_text() == played_at + "\n"
    generated: dict[str, set[str]] = {}
    for text in (summary, comparison, robustness, played_at):
        for header, rows in markdown_tables(text).items():
            generated.setdefault(header, set()).update(rows)
    readme = (EXPERIMENTS.parent / "README.md").read_text()
    section = readme.split("\n### MinAtar results\n")[1].split("\n## ")[0]
    shown = markdown_tables(section)
    header, *_ = summary.splitlines()
    assert shown[header] == generated[header], "README's results table is not summary.md's"
    assert len(shown) >= 6  # results, comparison, each game left out, robustness, transferred, T
    for header, rows in shown.items():
        assert header in generated, f"README table not written by the report: {header}"
        assert rows <= generated[header], f"README rows not in the report's files: {rows - generated[header]}"


def test_the_robustness_study_replays_the_final_evaluation_under_perturbations(
    minatar_smoke, tmp_path, capsys
):
    """What ``make minatar-robustness`` does, on two real smoke runs: the unperturbed evaluation is the
    run's own final one again; each perturbation gets a file, a table row and a point of the figure."""
    # The DSQN from the study's result folder (its weights-only files), the DQN from its run directory
    # (checkpoints/), named as the study names it: the fixture's run directories are all named "run".
    study.collect(study.Run("Breakout", "dsqn", 0), minatar_smoke("dsqn")[0], tmp_path / "study")
    runs = [tmp_path / "study" / "MinAtar-Breakout-dsqn-s0", tmp_path / "MinAtar-Breakout-dqn-s0"]
    runs[1].symlink_to(minatar_smoke("dqn")[0], target_is_directory=True)
    results = tmp_path / "robustness"
    episodes = str(PRESETS["smoke"]["final_eval_episodes"])
    options = [
        "--episodes",
        episodes,
        "--perturb",
        "none",
        "fgsm:0.1",
        "gaussian:0.2",
        "--results",
        str(results),
    ]
    assert robustness.main([*map(str, runs), *options]) == 0
    for run_dir in runs:
        written = results / run_dir.name
        assert sorted(p.name for p in written.iterdir()) == [
            "config.yaml", "fgsm-0.1.json", "gaussian-0.2.json", "none.json"
        ]  # fmt: skip
        final = json.loads((run_dir / "evaluation.json").read_text())
        replayed = json.loads((written / "none.json").read_text())
        assert Path(replayed["checkpoint"]).parent.name == (
            "checkpoints" if run_dir == runs[1] else run_dir.name
        )
        assert (
            replayed["scores"] == final["scores"] and replayed["episode_lengths"] == final["episode_lengths"]
        )
        attacked = json.loads((written / "fgsm-0.1.json").read_text())
        assert attacked["perturbation"] == "fgsm:0.1" and attacked["model"] == final["model"]
    table = (results / "robustness.md").read_text().splitlines()[2:]
    assert [(row.split("|")[2].strip(), row.split("|")[4].strip()) for row in table] == [
        (model, perturbation)
        for model in ("dqn", "dsqn")
        for perturbation in ("none", "fgsm:0.1", "gaussian:0.2")
    ]
    assert (results / "robustness.png").stat().st_size > 10_000
    header, _, *models = (results / "robustness-summary.md").read_text().splitlines()
    assert header == "| game | model | runs | none | fgsm:0.1 | gaussian:0.2 |"
    assert [row.split("|")[2].strip() for row in models] == ["dqn", "dsqn"]
    # Run again: every evaluation is kept, none is played again.
    stamps = {path: path.stat().st_mtime_ns for path in results.glob("*/*.json")}
    capsys.readouterr()
    assert robustness.main([*map(str, runs), *options]) == 0
    assert {path: path.stat().st_mtime_ns for path in results.glob("*/*.json")} == stamps
    assert ": " not in "".join(
        line for line in capsys.readouterr().out.splitlines() if line.startswith("MinAtar")
    )
    # Refusals name the bad value.
    with pytest.raises(SystemExit):
        robustness.main([str(runs[0]), "--perturb", "blur:1", "--results", str(results)])
    assert "perturbation 'blur:1' is not none, gaussian:SIGMA, fgsm:EPS or" in capsys.readouterr().err
    not_trained = tmp_path / "not-trained"
    not_trained.mkdir()
    shutil.copyfile(runs[0] / "config.yaml", not_trained / "config.yaml")
    assert robustness.main([str(not_trained), "--results", str(results)]) == 2
    assert "has no best weights" in capsys.readouterr().err
    (tmp_path / "another").mkdir()
    (tmp_path / "another" / runs[0].name).symlink_to(runs[1], target_is_directory=True)
    assert robustness.main([str(tmp_path / "another" / runs[0].name), "--results", str(results)]) == 2
    assert "holds the evaluations of another run named MinAtar-Breakout-dsqn-s0" in capsys.readouterr().err

    # A transferred attack: the DQN's weights craft the FGSM steps the DSQN sees; the DQN is not attacked
    # with its own weights.
    attack = [*map(str, runs), "--attacker", str(runs[1]), "--results", str(results), "--episodes", episodes]
    assert robustness.main([*attack, "--perturb", "fgsm:0.1"]) == 0
    assert "MinAtar-Breakout-dqn-s0 is the attacker: not attacked" in capsys.readouterr().out
    assert not (results / runs[1].name / "fgsm-0.1@dqn.json").exists()
    transferred = json.loads((results / runs[0].name / "fgsm-0.1@dqn.json").read_text())
    assert transferred["perturbation"] == "fgsm:0.1@dqn" and transferred["model"] == "dsqn"
    assert transferred["attacker_checkpoint"] == str(runs[1] / "checkpoints" / "best.safetensors")
    own = json.loads((results / runs[0].name / "fgsm-0.1.json").read_text())
    assert transferred["episodes"] == own["episodes"] and "attacker_checkpoint" not in own
    first, second = (results / "robustness-summary.md").read_text().split("\n\n", 1)
    assert first.splitlines()[0] == "| game | model | runs | none | fgsm:0.1 | gaussian:0.2 |"
    heading, _, header, _, *attacked = second.splitlines()
    assert heading == "FGSM crafted on dqn's network (transferred)"
    assert header == "| game | model | runs | none | fgsm:0.1@dqn |"
    assert [row.split("|")[2].strip() for row in attacked] == ["dsqn"]
    assert (results / "robustness.png").stat().st_size > 10_000
    # The same name crafted on another attacker is refused, not mixed in; other perturbations, too.
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(runs[1], elsewhere)
    assert robustness.main([str(runs[0]), "--attacker", str(elsewhere), "--perturb", "fgsm:0.1",
                            "--results", str(results), "--episodes", episodes]) == 2  # fmt: skip
    assert "holds an attack crafted on " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        robustness.main([*attack, "--perturb", "gaussian:0.1"])
    assert "--attacker crafts FGSM steps; gaussian:0.1 is not fgsm:EPS" in capsys.readouterr().err


def test_the_timesteps_study_plays_a_trained_dsqn_at_other_time_steps(minatar_smoke, tmp_path, capsys):
    """What ``make minatar-timesteps`` does, on a real smoke run: at the trained T the evaluation is the
    run's own final one again; at each other T the same weights play, and spend, as that T makes them."""
    study.collect(study.Run("Breakout", "dsqn", 0), minatar_smoke("dsqn")[0], tmp_path / "study")
    run_dir = tmp_path / "study" / "MinAtar-Breakout-dsqn-s0"
    results = tmp_path / "timesteps"
    trained = PRESETS["smoke"]["num_steps"]
    episodes = str(PRESETS["smoke"]["final_eval_episodes"])
    options = ["--num-steps", "1", str(trained), "16", "--episodes", episodes, "--results", str(results)]
    assert timesteps.main([str(run_dir), *options]) == 0
    written = results / run_dir.name
    assert sorted(p.name for p in written.iterdir()) == [
        "config.yaml", "none-T1.json", "none-T16.json", f"none-T{trained}.json"
    ]  # fmt: skip
    final = json.loads((run_dir / "evaluation.json").read_text())
    at = {t: json.loads((written / f"none-T{t}.json").read_text()) for t in (1, trained, 16)}
    assert at[trained]["scores"] == final["scores"] and at[trained]["num_steps"] == trained
    assert at[trained]["spikes_per_action"] == final["spikes_per_action"]
    assert [at[t]["num_steps"] for t in (1, trained, 16)] == [1, trained, 16]
    assert at[1]["spikes_per_action"] < at[16]["spikes_per_action"]
    assert at[1]["energy_ratio"] < at[16]["energy_ratio"]
    table = (results / "timesteps.md").read_text().splitlines()[2:]
    assert [row.split("|")[5].strip() for row in table] == ["1", str(trained), "16"]
    header, _, row = (results / "timesteps-summary.md").read_text().splitlines()
    assert header == f"| game | model | trained steps | runs | T = 1 | T = {trained} | T = 16 |"
    cells = [cell.strip() for cell in row.split("|")[5:-1]]
    assert cells == [f"{at[t]['score_mean']:.2f} ({at[t]['energy_ratio']:.3f})" for t in (1, trained, 16)]
    assert (results / "timesteps.png").stat().st_size > 10_000
    # Run again: every evaluation is kept, none is played again.
    stamps = {path: path.stat().st_mtime_ns for path in results.glob("*/*.json")}
    assert timesteps.main([str(run_dir), *options]) == 0
    assert {path: path.stat().st_mtime_ns for path in results.glob("*/*.json")} == stamps
    # A DQN has no T to change; a T out of range is refused.
    study.collect(study.Run("Breakout", "dqn", 0), minatar_smoke("dqn")[0], tmp_path / "study")
    capsys.readouterr()
    for args, message in (
        ([str(tmp_path / "study" / "MinAtar-Breakout-dqn-s0")], "is a DQN, which does not spike"),
        ([str(run_dir), "--num-steps", "0"], "--num-steps 0 is out of range; allowed: 1 to 4096"),
    ):
        with pytest.raises(SystemExit):
            timesteps.main([*args, "--results", str(results)])
        assert message in capsys.readouterr().err


def test_a_robustness_panel_starts_from_the_runs_it_attacked(tmp_path, monkeypatch):
    """On the committed robustness study: a transferred attack's panel starts each line at the
    unperturbed score of the runs that attack was shown to (not the attacker's own run), the panel of the
    network's own gradient at all of them."""
    import spikeq.analysis.report as analysis

    figures = []
    monkeypatch.setattr(analysis, "save_figure", lambda figure, out: figures.append(figure) or out)
    study = Path(__file__).resolve().parents[1] / "experiments" / "results" / "minatar" / "robustness"
    files = sorted(study.glob("*/*.json"))
    plot_robustness(
        files, tmp_path / "robustness.png", ignore=("bootstrap_time_limit",), reference=preset_values
    )
    panels = {axes.get_title(): axes for axes in figures[0].axes}

    def start(panel: str) -> float:
        (line,) = [line for line in panels[panel].get_lines() if line.get_label().startswith("dqn (")]
        return float(line.get_ydata()[0])

    def plain(runs: list[Path]) -> float:
        return float(np.mean([json.loads((run / "none.json").read_text())["score_mean"] for run in runs]))

    dqns = sorted(study.glob("MinAtar-Breakout-dqn-s*-300k"))
    attacked = [run for run in dqns if (run / "fgsm-0.1@dqn.json").exists()]
    assert len(dqns) == 3 and len(attacked) == 2
    assert start("MinAtar/Breakout: fgsm") == pytest.approx(plain(dqns))
    assert start("MinAtar/Breakout: fgsm crafted on dqn") == pytest.approx(plain(attacked)) != plain(dqns)


def relabelled(results: Path, out: Path, **config: Any) -> Path:
    """A copy of a run's replays (``config.yaml`` and evaluation files) as the replays of a run whose
    config differs in ``config`` (``steps``, ``init``), in the evaluations too."""
    shutil.copytree(results, out)
    trained = {**yaml.safe_load((out / "config.yaml").read_text()), **config}
    (out / "config.yaml").write_text(yaml.safe_dump(trained))
    for path in out.glob("*.json"):
        evaluation = json.loads(path.read_text())
        path.write_text(json.dumps({**evaluation, "train_steps": trained["steps"], "init": trained["init"]}))
    return out


def test_replays_of_other_budgets_and_inits_keep_lines_and_rows_of_their_own(tmp_path, monkeypatch):
    """The committed robustness replays of Breakout's three 300k-step DSQNs, beside copies of seed 0's
    relabelled as a 1M-step run and as a 300k-step run from the default initialisation: the figure
    draws each budget and init as a line of its own, the summary gives each a row, named by what sets
    it apart."""
    import spikeq.analysis.report as analysis

    figures = []
    monkeypatch.setattr(analysis, "save_figure", lambda figure, out: figures.append(figure) or out)
    study = EXPERIMENTS / "results" / "minatar" / "robustness"
    dsqns = sorted(study.glob("MinAtar-Breakout-dsqn-s[0-9]-300k"))
    results = tmp_path / "robustness"
    for run in dsqns:
        shutil.copytree(run, results / run.name)
    relabelled(dsqns[0], results / "MinAtar-Breakout-dsqn-s0", steps=1_000_000)
    relabelled(dsqns[0], results / "MinAtar-Breakout-dsqn+default-init-s0-300k", init="default")
    files = sorted(results.glob("*/*.json"))
    labels = dict(ignore=report.SAME_IN_EFFECT, reference=preset_values)

    plot_robustness(files, tmp_path / "robustness.png", **labels)
    panel = next(axes for axes in figures[0].axes if axes.get_title() == "MinAtar/Breakout: fgsm")
    lines = {line.get_label(): line.get_ydata() for line in panel.get_lines()}
    assert set(lines) == {
        "dsqn (firing init), 300k steps (3)",
        "dsqn (firing init), 1M steps (1)",
        "dsqn (default init), 300k steps (1)",
    }

    def scores(runs: list[Path], name: str) -> float:
        return float(np.mean([json.loads((run / name).read_text())["score_mean"] for run in runs]))

    strengths = ["none.json", *(f"fgsm-{eps}.json" for eps in (0.01, 0.02, 0.05, 0.1))]
    three, one = lines["dsqn (firing init), 300k steps (3)"], lines["dsqn (firing init), 1M steps (1)"]
    assert list(three) == pytest.approx([scores(dsqns, name) for name in strengths])
    assert list(one) == pytest.approx([scores(dsqns[:1], name) for name in strengths])

    _, _, *rows = robustness.summary(files, labels).split("\n\n")[0].splitlines()
    assert [row.split("|")[2:4] for row in rows] == [
        [" dsqn, default init, 300k steps ", " 1 "],
        [" dsqn, firing init, 1M steps ", " 1 "],
        [" dsqn, firing init, 300k steps ", " 3 "],
    ]


def test_time_step_replays_of_another_init_keep_rows_of_their_own(tmp_path):
    """The committed time-step replays of Breakout's three 300k-step DSQNs, beside a copy of seed 0's
    relabelled as a run from the default initialisation: a row of its own, named by its init."""
    study = EXPERIMENTS / "results" / "minatar" / "timesteps"
    dsqns = sorted(study.glob("MinAtar-Breakout-dsqn-s[0-9]-300k"))
    results = tmp_path / "timesteps"
    for run in dsqns:
        shutil.copytree(run, results / run.name)
    relabelled(dsqns[0], results / "MinAtar-Breakout-dsqn+default-init-s0-300k", init="default")
    played = timesteps.rows_by_num_steps(sorted(results.glob("*/*.json")))
    _, _, *rows = timesteps.summary(played).splitlines()
    assert [row.split("|")[2:5] for row in rows] == [
        [" dsqn, default init ", " 300,000 ", " 1 "],
        [" dsqn, firing init ", " 300,000 ", " 3 "],
    ]


def test_the_report_draws_runs_shorter_than_the_study_apart(minatar_smoke, tmp_path):
    """Runs trained for fewer steps than their game's longest (ablations) leave the main curves for
    ``ablations.png``, cut at their own budget; a study of one budget has no such figure."""
    results = tmp_path / "results"
    for model in ("dsqn", "dqn"):
        run_dir, _ = minatar_smoke(model)
        study.collect(study.Run("Breakout", model, 0), run_dir, results)
    assert report.main(["--results", str(results)]) == 0
    assert not (results / "ablations.png").exists()
    main = sorted(path.parent for path in results.glob("*/evaluation.json"))
    assert split_by_budget(main) == (main, [])
    with pytest.raises(ValueError, match="no shorter runs"):
        plot_ablations(main, tmp_path / "none.png")

    # An ablation: the DSQN's run as if it had been trained for half the steps (one evaluation) with the
    # reset's gradient kept.
    short = results / "MinAtar-Breakout-dsqn+paper-reset-s0-half"
    shutil.copytree(results / "MinAtar-Breakout-dsqn-s0", short)
    config = yaml.safe_load((short / "config.yaml").read_text())
    half = config["steps"] // 2
    (short / "config.yaml").write_text(yaml.safe_dump({**config, "detach_reset": False, "steps": half}))
    header, *rows = (short / "eval.csv").read_text().splitlines()
    kept = [row for row in rows if int(row.split(",")[0]) <= half]
    assert 0 < len(kept) < len(rows)
    (short / "eval.csv").write_text("\n".join([header, *kept]) + "\n")
    # A shorter run of a main model with nothing else changed: a trial, not a side of the comparison.
    trial = results / "MinAtar-Breakout-dqn-s0-half"
    shutil.copytree(results / "MinAtar-Breakout-dqn-s0", trial)
    config = yaml.safe_load((trial / "config.yaml").read_text())
    (trial / "config.yaml").write_text(yaml.safe_dump({**config, "steps": half}))
    assert split_by_budget([*main, short, trial]) == (main, [short, trial])
    (results / "comparison.md").unlink()
    assert report.main(["--results", str(results)]) == 0
    assert (results / "ablations.png").read_bytes().startswith(b"\x89PNG")
    table = (results / "table.md").read_text()
    assert f"| MinAtar/Breakout | dsqn (detach_reset=False) | firing | none | 4 | 1 | 0 | {half:,} |" in table
    assert (results / "comparison.md").read_text().splitlines()[2].startswith("| MinAtar/Breakout | 1 | 1 |")
    with pytest.raises(ValueError, match="naming its game and its steps"):
        split_by_budget([tmp_path])


def test_the_ablations_draw_each_step_budget_of_a_setting_apart(tmp_path, monkeypatch):
    """On the committed study: Breakout's DQN and DSQN were each trained for 1M steps and for 300k
    (three seeds a budget); in ``ablations.png`` each budget is a line of its own, and every Breakout
    line names its budget. The learning curves, of one budget a game, name none."""
    import spikeq.analysis.report as analysis

    figures = []
    monkeypatch.setattr(analysis, "save_figure", lambda figure, out: figures.append(figure) or out)
    results = report.RESULTS if report.RESULTS.is_absolute() else EXPERIMENTS.parent / report.RESULTS
    runs = sorted(path.parent for path in results.glob("*/evaluation.json"))
    labels = dict(ignore=report.SAME_IN_EFFECT, reference=preset_values)
    plot_ablations(runs, tmp_path / "ablations.png", **labels)
    scores = next(axes for axes in figures[0].axes if axes.get_title() == "MinAtar/Breakout")
    lines = {line.get_label() for line in scores.get_lines()} - {"random"}
    assert {
        "dqn, 1M steps (3)", "dqn, 300k steps (3)",
        "dsqn (firing init), 1M steps (3)", "dsqn (firing init), 300k steps (3)",
        "dsqn (default init), 200k steps (1)", "dsqn-if (firing init), 300k steps (3)",
    } <= lines  # fmt: skip
    assert all(" steps (" in line for line in lines)

    main, _ = split_by_budget(runs)
    analysis.plot_learning_curves(main, tmp_path / "curves.png", **labels)
    (breakout,) = [axes for axes in figures[1].axes if axes.get_title() == "MinAtar/Breakout"]
    assert {"dqn (3)", "dsqn (firing init) (3)"} <= {line.get_label() for line in breakout.get_lines()}


def test_the_firing_rates_figure_draws_each_spiking_layer_of_each_game(tmp_path, monkeypatch):
    """On the committed study: a row of panels per spiking layer (conv1, fc1), a panel per game, a line
    per model and setting from each run's ``training_curve.csv``; DQNs have no firing rates."""
    import spikeq.analysis.report as analysis

    figures = []
    monkeypatch.setattr(analysis, "save_figure", lambda figure, out: figures.append(figure) or out)
    results = report.RESULTS if report.RESULTS.is_absolute() else EXPERIMENTS.parent / report.RESULTS
    breakout = [
        results / f"MinAtar-Breakout-{run}" for run in ("dsqn-s0", "dsqn-s1", "dsqn+adam-s0", "dqn-s0")
    ]
    analysis.plot_firing_rates(
        breakout, tmp_path / "firing.png", ignore=report.SAME_IN_EFFECT, reference=preset_values
    )
    panels = [axes for axes in figures[0].axes if axes.get_title()]
    assert [(axes.get_title(), axes.get_ylabel()) for axes in panels] == [
        ("MinAtar/Breakout", "conv1: neuron-steps that spiked"),
        ("MinAtar/Breakout", "fc1: neuron-steps that spiked"),
    ]
    fc1 = {line.get_label(): line.get_data() for line in panels[1].get_lines()}
    adam = "dsqn (firing init), learning_rate=0.0001, optimizer=adam (1)"
    assert set(fc1) == {"dsqn (firing init) (2)", adam}
    steps, rates = analysis.read_training_curve(breakout[2], "firing_rate/fc1")
    assert (list(fc1[adam][0]), list(fc1[adam][1])) == (steps, rates)
    with pytest.raises(ValueError, match="none of the runs has firing rates"):
        analysis.plot_firing_rates(breakout[3:], tmp_path / "dqn.png")
    with pytest.raises(ValueError, match="has no column 'firing_rate/fc1'"):
        analysis.read_training_curve(breakout[3], "firing_rate/fc1")


def test_the_training_curve_keeps_the_latest_logged_values_at_evenly_spaced_steps(minatar_smoke, tmp_path):
    """``training_curve.csv`` of a real run, checked against its full ``train.csv``."""
    run_dir, _ = minatar_smoke("dsqn")
    out = write_training_curve(run_dir, tmp_path / TRAINING_CURVE, points=10)
    with (run_dir / "train.csv").open(newline="") as f:
        logged = list(csv.DictReader(f))
    with out.open(newline="") as f:
        curve = list(csv.DictReader(f))
    budget = PRESETS["smoke"]["steps"]
    assert [int(row["step"]) for row in curve] == list(range(budget // 10, budget + 1, budget // 10))
    assert set(curve[0]) == {"step", "return", "episode_length", "firing_rate/conv1", "firing_rate/fc1"}
    for row in curve:
        before = [r for r in logged if int(r["step"]) <= int(row["step"])]
        returns = [r["rollout/ep_rew_mean"] for r in before if r["rollout/ep_rew_mean"]]
        rates = [r["train/firing_rate/fc1"] for r in before if r["train/firing_rate/fc1"]]
        assert row["return"] == (returns[-1] if returns else "")
        assert row["firing_rate/fc1"] == (rates[-1] if rates else "")
    assert any(row["return"] for row in curve), "the smoke run logs training returns"
    kept = [row for row in curve if row["return"]]
    assert read_training_curve(tmp_path) == (
        [int(row["step"]) for row in kept],
        [float(row["return"]) for row in kept],
    )


def test_the_study_status_says_where_each_run_stands(minatar_smoke, tmp_path, capsys):
    """``--status`` on real runs: one finished (its results collected), one held by a process (with its
    pace and the time it has left), two not started."""
    runs, results = tmp_path / "runs", tmp_path / "results"
    for model in ("dsqn", "dqn"):
        shutil.copytree(
            minatar_smoke(model)[0],
            runs / f"MinAtar-Breakout-{model}-s0",
            ignore=shutil.ignore_patterns("wandb"),
        )
    study.collect(study.Run("Breakout", "dsqn", 0), runs / "MinAtar-Breakout-dsqn-s0", results)
    plan = ["--games", "Breakout", "--seeds", "0", "1", "--runs-dir", str(runs), "--results", str(results)]
    with FileLock(runs / "MinAtar-Breakout-dqn-s0" / ".lock"):
        assert study.main(["--status", *plan]) == 0
    heading, *lines = capsys.readouterr().out.splitlines()
    assert heading == "4 run(s): 1 finished, 1 running, 0 cut, 2 not started"
    states = {line.split()[0]: line.split(maxsplit=1)[1] for line in lines}
    finished = json.loads((results / "MinAtar-Breakout-dsqn-s0" / "evaluation.json").read_text())
    assert states["MinAtar-Breakout-dsqn-s0"].split() == [
        "finished",
        "score",
        f"{finished['score_mean']:.2f}",
        "±",
        f"{finished['score_std']:.2f}",
    ]
    steps = PRESETS["smoke"]["steps"]
    assert states["MinAtar-Breakout-dqn-s0"].startswith(
        f"running      last checkpoint at step {steps:,} of 1,000,000; best"
    )
    with (runs / "MinAtar-Breakout-dqn-s0" / "train.csv").open(newline="") as f:
        last = [row for row in csv.DictReader(f) if row["time/fps"]][-1]  # SB3's pace, logged last
    fps = float(last["time/fps"])
    left = (1_000_000 - int(last["step"])) / fps / 60
    assert states["MinAtar-Breakout-dqn-s0"].endswith(
        f"; at step {int(last['step']):,} ({fps:,.0f} agent steps/s, about {left:,.0f} min left)"
    )
    assert states["MinAtar-Breakout-dsqn-s1"] == "not started"
    assert not (runs / "MinAtar-Breakout-dsqn-s1").exists()  # --status starts nothing


def test_the_study_starts_new_runs_and_resumes_cut_ones_to_their_budget(tmp_path):
    run = study.Run("Freeway", "dsqn", 2, steps=300_000)
    run_dir = tmp_path / run.name
    assert run.name == "MinAtar-Freeway-dsqn-s2-300k"
    # Budgets that are not whole thousands keep every digit: 1,000 and 1,500 steps never share a name.
    names = {study.Run("Freeway", "dsqn", 2, steps=steps).name for steps in (1_000, 1_500, 999, 1_000_000)}
    assert names == {f"MinAtar-Freeway-dsqn-s2{tail}" for tail in ("-1k", "-1500", "-999", "")}
    start = run.command(run_dir)
    assert start[start.index("--game") + 1] == "MinAtar/Freeway" and "--force" not in start
    assert start[start.index("--steps") + 1] == "300000" and "--resume" not in start
    (run_dir / "checkpoints" / "step-50000").mkdir(parents=True)
    assert "--force" in run.command(run_dir)  # cut before its first checkpoint: started afresh
    for name in ("model.zip", "trainer.json"):  # complete, though cut before `latest` named it
        (run_dir / "checkpoints" / "step-50000" / name).write_text("")
    resume = run.command(run_dir)
    assert resume[resume.index("--resume") + 1] == str(run_dir)
    assert resume[resume.index("--steps") + 1] == "300000"  # a run trained further gets the study's budget


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--games", "Breakout", "Pong"], "invalid choice: 'Pong'"),
        (["--models", "dsqn-lif"], "invalid choice: 'dsqn-lif'"),
        (["--lanes", "0"], "--lanes 0 must be >= 1"),
        (["--set", "init=default"], "--set needs --variant NAME"),
        (["--variant", "v", "--set", "seed=5"], "--set seed=... is the study's own setting"),
        (["--variant", "v", "--set", "steps=2000000"], "--set steps=... is the study's own setting"),
        (["--variant", "v", "--set", "lr=0.1"], "--set lr=...: unknown setting; allowed: backend,"),
    ],
)
def test_the_study_refuses_a_bad_plan_before_starting_anything(flags, named, tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:
        study.main([*flags, "--runs-dir", str(tmp_path / "runs"), "--results", str(tmp_path / "results")])
    assert refused.value.code == 2 and named in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_the_study_leaves_a_run_that_another_process_trains_to_it(tmp_path, capsys):
    """Two studies over overlapping plans: a run whose directory is locked is skipped, not started."""
    runs, results = tmp_path / "runs", tmp_path / "results"
    run_dir = runs / "MinAtar-Breakout-dqn-s0"
    run_dir.mkdir(parents=True)
    plan = ["--games", "Breakout", "--models", "dqn", "--seeds", "0", "--runs-dir", str(runs)]
    with FileLock(run_dir / ".lock"):
        assert study.main([*plan, "--results", str(results)]) == 0
    assert "skip MinAtar-Breakout-dqn-s0: another process is training it" in capsys.readouterr().out
    assert sorted(p.name for p in runs.iterdir()) == ["MinAtar-Breakout-dqn-s0"]  # no log: nothing ran
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]


def test_the_study_collects_a_run_that_finished_since_its_plan_was_made(tmp_path, capsys, monkeypatch):
    """Two lanes whose plans overlap: a run the other lane finished while this one waited is collected,
    not started again."""
    runs, results = tmp_path / "runs", tmp_path / "results"
    run_dir = runs / "MinAtar-Breakout-dsqn-s2"
    run_dir.mkdir(parents=True)
    collect = study.collect
    planned = []

    def finished_after_the_plan(run, run_dir, results):
        if not planned:  # the plan: not finished yet
            planned.append(run.name)
            return False
        (run_dir / "evaluation.json").write_text(json.dumps({"score_mean": 10.0, "score_std": 8.0}))
        (run_dir / "config.yaml").write_text(yaml.safe_dump({"steps": run.steps}))
        return collect(run, run_dir, results)

    def no_training(*args, **kwargs):
        raise AssertionError(f"started a finished run: {args}")

    monkeypatch.setattr(study, "collect", finished_after_the_plan)
    monkeypatch.setattr(study.subprocess, "Popen", no_training)
    plan = ["--games", "Breakout", "--models", "dsqn", "--seeds", "2", "--runs-dir", str(runs)]
    assert study.main([*plan, "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "1 run(s) to do: MinAtar-Breakout-dsqn-s2" in out
    assert f"skip MinAtar-Breakout-dsqn-s2: finished meanwhile, results in {results}" in out
    assert (results / "MinAtar-Breakout-dsqn-s2" / "evaluation.json").exists()


def test_the_study_never_trains_again_a_run_whose_results_are_committed(tmp_path, capsys, monkeypatch):
    """A fresh clone holds the study's results but not its run directories: nothing is started, and
    the committed result stays as it is."""
    runs, results = tmp_path / "runs", tmp_path / "results"
    committed = results / "MinAtar-Breakout-dsqn-s0" / "evaluation.json"
    committed.parent.mkdir(parents=True)
    committed.write_text(json.dumps({"score_mean": 9.87, "score_std": 8.72}))
    before = committed.read_bytes()

    def no_training(*args, **kwargs):
        raise AssertionError(f"started a finished run: {args}")

    monkeypatch.setattr(study.subprocess, "Popen", no_training)
    plan = ["--games", "Breakout", "--models", "dsqn", "--seeds", "0", "--runs-dir", str(runs)]
    assert study.main([*plan, "--results", str(results)]) == 0
    assert "0 run(s) to do: none" in capsys.readouterr().out
    assert committed.read_bytes() == before and not (runs / "MinAtar-Breakout-dsqn-s0").exists()


def test_the_study_leaves_the_results_of_a_run_trained_past_its_budget(tmp_path, capsys):
    """A run extended in place (``spikeq train --resume RUN --steps 2000000``) has another run's
    result: it is not filed under the study's run."""
    run, results = study.Run("Breakout", "dqn", 0), tmp_path / "results"
    run_dir = tmp_path / "runs" / run.name
    run_dir.mkdir(parents=True)
    (run_dir / "evaluation.json").write_text(json.dumps({"score_mean": 12.0, "score_std": 8.0}))
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"steps": 2_000_000}))
    assert not study.collect(run, run_dir, results) and not results.exists()
    assert "was trained for 2,000,000 steps, the study's run for 1,000,000" in capsys.readouterr().out


def test_a_run_that_fails_is_reported_as_failed_not_resumable(tmp_path, capsys, monkeypatch):
    class Failed:  # spikeq train exiting 2 at once, as for a setting it refuses
        returncode = 2

        def __init__(self, *args, **kwargs):
            pass

        def poll(self):
            return self.returncode

    monkeypatch.setattr(study.subprocess, "Popen", Failed)
    monkeypatch.setattr(study.time, "sleep", lambda seconds: None)
    runs = tmp_path / "runs"
    plan = ["--games", "Breakout", "--models", "dqn", "--seeds", "0", "--runs-dir", str(runs)]
    assert study.main([*plan, "--results", str(tmp_path / "results")]) == 1
    out = capsys.readouterr().out
    assert f"MinAtar-Breakout-dqn-s0: exit 2, failed, see {runs / 'MinAtar-Breakout-dqn-s0'}.log" in out


def test_a_failed_chance_level_names_its_game_and_why(tmp_path):
    results = tmp_path / "results"
    results.write_text("a file where the results folder should be")
    # spikeq evaluate says, before it plays, that it cannot write there: the report passes its line on.
    said = "random policy's evaluation of MinAtar/Breakout failed: spikeq evaluate: error: cannot write"
    with pytest.raises(ValueError, match=said):
        report.chance_level(results, "MinAtar/Breakout", episodes=1)


def test_a_bad_minatar_game_fails_in_one_line():
    done = spikeq("train", "--game", "MinAtar/Breakot", "--preset", "smoke")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "Did you mean: MinAtar/Breakout?" in done.stderr


def test_the_random_policy_row_scores_chance(tmp_path):
    out = tmp_path / "random.json"
    done = spikeq("evaluate", "--random", "--game", "MinAtar/Breakout", "--episodes", "5", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["model"] == "random" and result["episodes"] == 5 and result["epsilon"] == 1.0
    assert 0 <= result["score_mean"] < 3  # random Breakout scores about 0.5 (Young and Tian 2019)
    no_game = spikeq("evaluate", "--random")
    assert no_game.returncode == 2 and "--random needs --game" in no_game.stderr


@pytest.mark.parametrize("model", ["dqn", "dsqn"])
def test_a_minatar_run_resumes_from_its_checkpoint(tmp_path, model):
    """Resume rebuilds the policy (the MinAtar torso, centred RMSprop) from the config, not from pickles."""
    run_dir = tmp_path / "run"
    game = ("--game", "MinAtar/Freeway", "--model", model, "--preset", "smoke")
    first = spikeq("train", *game, "--steps", "600", "--max-episode-steps", "250", "--run-dir", str(run_dir))
    assert first.returncode == 0, first.stderr[-3000:]
    episodes = [json.loads((run_dir / "checkpoints" / "step-600" / "episodes.json").read_text())]
    resumed = spikeq("train", "--resume", str(run_dir), "--steps", "1200")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "finished 1,200 steps" in resumed.stdout
    steps = [row.split(",")[0] for row in (run_dir / "eval.csv").read_text().splitlines()[1:]]
    assert steps == ["600", "1200"]
    # SB3's window of training episodes (the logged training return) goes on across the resume: the
    # 250-step episodes (Freeway's are cut, not ended), two by step 600; the resumed run starts a new
    # one at step 600, its episodes end at 850 and 1,100: four by step 1,200.
    episodes.append(json.loads((run_dir / "checkpoints" / "step-1200" / "episodes.json").read_text()))
    assert [[episode["l"] for episode in saved] for saved in episodes] == [[250] * 2, [250] * 4]


def test_a_trained_minatar_dsqn_exports_to_nir_and_verifies(minatar_smoke, tmp_path):
    """The MinAtar torso as a NIR graph, simulated from the file on recorded grids (exit 1 below 99%)."""
    run_dir, _ = minatar_smoke("dsqn")
    out = tmp_path / "breakout.nir"
    done = spikeq("export-nir", str(run_dir / "checkpoints" / "best.zip"), str(out), "--verify")
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.exists() and "MinAtar" not in done.stderr
