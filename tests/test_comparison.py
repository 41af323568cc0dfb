"""A model's runs against a baseline's: point estimates, bootstrap intervals, the study's own files."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from spikeq.analysis import compare, report
from spikeq.analysis.compare import (
    compare_models,
    compare_scores,
    format_comparison,
    format_leave_one_out,
    leave_one_game_out,
    plot_comparison,
    shared_settings,
)
from spikeq.analysis.report import split_by_budget
from spikeq.experiment.config import preset_values

STUDY = Path(__file__).resolve().parents[1] / "experiments" / "results" / "minatar"


def test_point_estimates_of_one_game():
    """Two runs a side: the difference of means, the score between chance and the baseline, and the
    share of pairs of runs the model wins (2 > 1, 4 > 1, 4 > 3; 2 < 3)."""
    comparison = compare_scores({"G": ([2.0, 4.0], [1.0, 3.0], 0.0)}, model="dsqn", baseline="dqn")
    (game,) = comparison.games
    assert game.difference == 1.0
    assert game.normalised == 1.5  # (3 - 0) / (2 - 0)
    assert game.p_improvement == 0.75
    assert comparison.normalised == 1.5 and comparison.p_improvement == 0.75
    low, high = game.difference_ci
    assert -1.0 <= low <= 1.0 <= high <= 3.0  # a resample's difference lies in [2 - 3, 4 - 1]


def test_ties_count_half():
    assert compare_scores({"G": ([1.0, 1.0], [1.0, 0.0], -1.0)}).games[0].p_improvement == 0.75


def test_the_interval_is_the_percentiles_of_the_resampled_statistic():
    """The model's runs 0 and 1 against a baseline of 2: a resample's difference of means is -2, -1.5
    or -1 with probabilities 1/4, 1/2, 1/4, so its 95% interval is [-2, -1], and its 40% interval (the
    30th to 70th percentiles) [-1.5, -1.5]."""
    scores = {"G": ([0.0, 1.0], [2.0, 2.0], -1.0)}
    assert compare_scores(scores).games[0].difference_ci == (-2.0, -1.0)
    assert compare_scores(scores, confidence=0.4).games[0].difference_ci == (-1.5, -1.5)


def test_games_weigh_alike_and_the_bootstrap_stays_within_each_game():
    """Over games: the mean of the games' statistics; each resample draws a game's runs from that game
    only, so a game whose runs agree adds no spread."""
    scores = {"A": ([3.0, 3.0], [2.0, 2.0], 1.0), "B": ([1.0, 3.0], [2.0, 2.0], 0.0)}
    comparison = compare_scores(scores, resamples=4000, seed=1)
    assert comparison.normalised == pytest.approx((2.0 + 1.0) / 2)
    assert comparison.p_improvement == pytest.approx((1.0 + 0.5) / 2)
    assert comparison.games[0].normalised_ci == (2.0, 2.0)
    low, high = comparison.normalised_ci
    assert (low, high) == pytest.approx(((2.0 + 0.5) / 2, (2.0 + 1.5) / 2))
    assert compare_scores(scores, resamples=4000, seed=1) == comparison  # seeded: reproducible


def test_a_games_intervals_do_not_depend_on_the_other_games_compared():
    """Each game's resamples come from a stream of its own: adding a game leaves the others' as they were."""
    scores = {
        "A": ([1.0, 4.0, 2.0], [2.0, 3.0, 0.5], 0.0),
        "B": ([1.0, 2.5, 4.0, 6.5, 9.0], [0.5, 1.5, 3.0, 3.5, 5.0], 0.0),  # many distinct resampled means
    }
    alone = compare_scores({"B": scores["B"]}, resamples=500).games[0]
    together = compare_scores(scores, resamples=500).games[1]
    assert together.game == "B" and together == alone


def test_one_run_on_a_side_gives_no_interval():
    comparison = compare_scores({"A": ([5.0], [2.0, 3.0], 0.0), "B": ([2.0, 3.0], [1.0, 2.0], 0.0)})
    assert comparison.games[0].difference_ci is None and comparison.games[0].normalised_ci is None
    assert comparison.games[1].difference_ci is not None
    assert comparison.normalised_ci is None and comparison.p_improvement_ci is None
    assert "| A | 1 | 2 | 5.00 | 2.50 | +2.50 | 2.00 | 1.00 |" in format_comparison(comparison)


def test_a_baseline_at_chance_has_no_normalised_score():
    comparison = compare_scores({"A": ([5.0, 6.0], [0.0, 3.0], 0.0)})
    assert comparison.games[0].normalised is None and comparison.normalised is None
    assert comparison.games[0].difference == 4.0


@pytest.mark.parametrize(
    "scores, message",
    [
        ({}, "no games"),
        ({"A": ([], [1.0], 0.0)}, "A: every side needs at least one run; model has 0 runs, baseline 1"),
    ],
)
def test_bad_input_is_refused(scores, message):
    with pytest.raises(ValueError, match=message):
        compare_scores(scores)
    with pytest.raises(ValueError, match=r"confidence=1\.5 must lie in \(0, 1\)"):
        compare_scores({"A": ([1.0], [1.0], 0.0)}, confidence=1.5)
    with pytest.raises(ValueError, match="resamples=0 must be an integer >= 1"):
        compare_scores({"A": ([1.0], [1.0], 0.0)}, resamples=0)


def test_leaving_each_game_out_compares_the_others_as_if_alone():
    """One game can decide a mean over games (a baseline barely above chance makes a large normalised
    score): each game left out in turn, the others compared as ``compare_scores`` would compare them."""
    scores = {
        "A": ([3.0, 5.0], [1.1, 1.2], 1.0),  # the baseline barely learns: normalised 20
        "B": ([2.0, 3.0], [2.0, 2.5], 0.0),
        "C": ([4.0, 4.0], [3.0, 5.0], 0.0),
    }
    comparison = compare_scores(scores, model="dsqn", baseline="dqn", resamples=2000)
    left_out = leave_one_game_out(comparison, resamples=2000)
    assert list(left_out) == ["A", "B", "C"]
    for game, without in left_out.items():
        rest = {name: runs for name, runs in scores.items() if name != game}
        assert without == compare_scores(rest, model="dsqn", baseline="dqn", resamples=2000)
    assert comparison.normalised > 7 and left_out["A"].normalised == pytest.approx((2.5 / 2.25 + 1.0) / 2)
    table = format_leave_one_out(left_out).splitlines()
    assert table[0] == "| left out | games | dsqn normalised [95%] | P(dsqn > dqn) [95%] |"
    # Without A: P(dsqn > dqn) is (2.5 / 4 + 2 / 4) / 2 (B: 3 beats 2 and 2.5, 2 ties 2; C: 4 beats 3).
    without_a = left_out["A"]
    assert without_a.p_improvement == 0.5625
    (n_low, n_high), (p_low, p_high) = without_a.normalised_ci, without_a.p_improvement_ci
    normalised = f"{without_a.normalised:.2f} [{n_low:.2f}, {n_high:.2f}]"
    assert table[2] == f"| A | 2 | {normalised} | 0.56 [{p_low:.2f}, {p_high:.2f}] |"
    with pytest.raises(ValueError, match="three games or more; the comparison has 2"):
        leave_one_game_out(left_out["A"])


def test_the_comparison_figure_draws_games_and_means(tmp_path, monkeypatch):
    """comparison.png: a row per game and per mean, on a log axis where every normalised score is above
    chance and a linear one where a model plays below chance; refused where no baseline scores above
    chance (nothing to normalise by)."""
    drawn = []

    def save_figure(figure, out):
        left = figure.axes[0]
        drawn.append((left.get_xscale(), [label.get_text() for label in left.get_yticklabels()]))
        return report.save_figure(figure, out)

    monkeypatch.setattr(compare, "save_figure", save_figure)
    scores = {
        "A": ([3.0, 5.0], [1.5, 2.0], 1.0),
        "B": ([2.0, 3.0], [2.0, 2.5], 0.0),
        "C": ([4.0], [3.0], 0.0),
    }
    comparison = compare_scores(scores, resamples=500)
    out = plot_comparison(comparison, tmp_path / "figures" / "comparison.png", leave_one_game_out(comparison))
    assert out.read_bytes().startswith(b"\x89PNG")
    rows = ["A", "B", "C", "all 3 games", "without A", "without B", "without C"]
    assert drawn.pop() == ("log", rows)
    below = compare_scores({**scores, "C": ([-1.0], [3.0], 0.0)}, resamples=500)
    assert plot_comparison(below, tmp_path / "below.png").read_bytes().startswith(b"\x89PNG")
    assert drawn.pop() == ("linear", rows[:4])
    at_chance = compare_scores({"A": ([2.0], [0.0], 0.0)})
    with pytest.raises(ValueError, match="baseline does not score above chance anywhere"):
        plot_comparison(at_chance, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_both_models_run_with_another_setting_are_compared_on_their_own(tmp_path):
    """Runs of another optimiser (a study's ``--variant adam --set optimizer=adam ...``) are neither
    pooled with the preset's runs nor lost: where both models have some, they are a comparison of their
    own. Here the committed Asterix DQN with Adam and a copy of a DSQN run relabelled as trained so."""
    asterix = ["MinAtar-Asterix-dqn-s0", "MinAtar-Asterix-dsqn-s0", "MinAtar-Asterix-dqn+adam-s0"]
    runs = [STUDY / name for name in asterix]
    random = [STUDY / "random" / "MinAtar-Asterix.json"]
    labels = dict(ignore=("bootstrap_time_limit",), reference=preset_values)
    adam = "learning_rate=0.0001, optimizer=adam"
    assert shared_settings([*runs, *random], **labels) == []  # a DQN with Adam only
    with pytest.raises(
        ValueError, match=rf"dqn with {adam} and a random .* dqn \({adam}\); dsqn:firing; random"
    ):
        compare_models([*runs, *random], **labels, setting=adam)
    relabelled = tmp_path / "MinAtar-Asterix-dsqn+adam-s0"
    shutil.copytree(STUDY / "MinAtar-Asterix-dsqn-s0", relabelled)
    config = yaml.safe_load((relabelled / "config.yaml").read_text())
    (relabelled / "config.yaml").write_text(
        yaml.safe_dump({**config, "optimizer": "adam", "learning_rate": 1e-4})
    )
    paths = [*runs, relabelled, *random]
    assert shared_settings(paths, **labels) == [adam]
    score = {run.name: json.loads((run / "evaluation.json").read_text())["score_mean"] for run in runs}
    preset, other = compare_models(paths, **labels), compare_models(paths, **labels, setting=adam)
    assert preset.games[0].model_scores == [score["MinAtar-Asterix-dsqn-s0"]]
    assert preset.games[0].baseline_scores == [score["MinAtar-Asterix-dqn-s0"]]
    assert other.games[0].model_scores == [score["MinAtar-Asterix-dsqn-s0"]]  # the copy's own score
    assert other.games[0].baseline_scores == [score["MinAtar-Asterix-dqn+adam-s0"]]


def test_the_study_comparison_takes_each_main_runs_final_score():
    """On the committed MinAtar results, labelled against their presets as ``make minatar-report`` does:
    every 1M-step DSQN (firing init) and DQN run of a game, by its evaluation.json, and none of the
    ablations (the 200k-step DSQN with PyTorch's initialisation, the 300k-step runs with the paper's
    reset gradient or IF neurons) nor the shorter runs of the main models (300k steps)."""
    runs = sorted(path.parent for path in STUDY.glob("*/evaluation.json"))
    main, shorter = split_by_budget(runs)
    assert {run.name for run in shorter} >= {"MinAtar-Breakout-dqn-s0-300k", "MinAtar-Breakout-dsqn-s0-300k"}
    random = sorted((STUDY / "random").glob("*.json"))
    chance = {
        json.loads(path.read_text())["game"]: json.loads(path.read_text())["score_mean"] for path in random
    }
    ignore = ("bootstrap_time_limit",)
    comparison = compare_models([*main, *random], ignore=ignore, reference=preset_values)
    assert comparison.games, "the study has games with runs of both models"
    for game in comparison.games:
        name = game.game.replace("/", "-")
        for model, scores in (("dsqn", game.model_scores), ("dqn", game.baseline_scores)):
            # The study's own runs are named <game>-<model>-s<seed>; an ablation's name says more.
            main_run = re.compile(rf"{re.escape(name)}-{model}-s\d+")
            files = [run / "evaluation.json" for run in main if main_run.fullmatch(run.name)]
            assert sorted(scores) == sorted(json.loads(f.read_text())["score_mean"] for f in files)
        assert game.chance == chance[game.game]
        assert game.normalised == pytest.approx(
            (np.mean(game.model_scores) - game.chance) / (np.mean(game.baseline_scores) - game.chance)
        )
    # The games with two runs or more a side: the others are left out, the rest compared as before.
    seeded = compare_models([*main, *random], ignore=ignore, reference=preset_values, min_runs=2)
    kept = [g for g in comparison.games if min(len(g.model_scores), len(g.baseline_scores)) >= 2]
    assert [g.game for g in seeded.games] == [g.game for g in kept] and kept
    assert all(g.normalised_ci is not None for g in seeded.games) and seeded.normalised_ci is not None
    assert [g.model_scores for g in seeded.games] == [g.model_scores for g in kept]
    with pytest.raises(ValueError, match=r"no game has runs of both dsqn:firing and dqn \(99 or more each\)"):
        compare_models([*main, *random], ignore=ignore, reference=preset_values, min_runs=99)
    with pytest.raises(ValueError, match="min_runs=0 must be an integer >= 1"):
        compare_models([*main, *random], ignore=ignore, reference=preset_values, min_runs=0)
    # The 300k-step DQNs and DSQNs of the robustness test with the main runs of their model: refused,
    # not pooled, with or without the presets' labels; and 1M-step DSQNs against 300k-step DQNs refused.
    breakout = [
        STUDY / f"MinAtar-Breakout-{m}-s{s}{b}"
        for m in ("dsqn", "dqn")
        for s in (0, 1, 2)
        for b in ("", "-300k")
    ]
    for reference in (preset_values, None):
        with pytest.raises(
            ValueError, match=r"MinAtar/Breakout: dsqn:firing has runs of several step budgets"
        ):
            compare_models([*breakout, *random], ignore=ignore, reference=reference)
    mixed = [run for run in breakout if ("dsqn" in run.name) != run.name.endswith("-300k")]
    with pytest.raises(
        ValueError, match=r"MinAtar/Breakout: dsqn:firing runs of 1,000,000 steps against dqn runs of 300,000"
    ):
        compare_models([*mixed, *random], ignore=ignore, reference=preset_values)
    # Without the random policy's evaluations there is no chance level; the error names what there is
    # (the study's sides, and those of whatever ablations have been added to it since).
    with pytest.raises(ValueError, match=r"no game has runs of both dsqn:firing and dqn") as error:
        compare_models(runs, reference=preset_values)
    held = str(error.value).split("the results hold: ")[1].split("; ")
    assert {"dqn", "dsqn:firing", "dsqn:default"} <= set(held) and held == sorted(held)
