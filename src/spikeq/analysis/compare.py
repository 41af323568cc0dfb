"""A model's runs against a baseline's (the DSQN against the DQN), game by game and over games.

    spikeq table RUN_DIR ... RANDOM.json --compare dsqn:firing dqn [--compare-out comparison.md]

Each run counts by its final score (``evaluation.json``); each game's chance level is the random
policy's score. Per game: the difference of the mean scores, the model's score normalised between
chance and the baseline, and the probability of improvement; over games, their means, with stratified
bootstrap intervals over the runs (``compare_scores``). ``compare_models`` gathers the scores from
result files as ``spikeq.analysis.report`` groups them (the preset's runs, or those of one setting that
both models were run with: ``shared_settings``), ``format_comparison`` writes the Markdown table, and
``leave_one_game_out`` / ``format_leave_one_out`` say how far one game decides the mean over games;
``comparison_report`` puts them together (``spikeq table --compare``, ``make minatar-report``) and
``plot_comparison`` draws them.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.ticker
import numpy as np

from spikeq.analysis.report import Reference, grouped_results, plt, save_figure


@dataclass(frozen=True)
class GameComparison:
    """One game's runs of a model against those of a baseline (each run: its final score).

    :param normalised: (mean model score - chance) / (mean baseline score - chance): 0 is the random
        policy, 1 the baseline; None unless every baseline run scores above chance (so that no bootstrap
        resample divides by a mean at or below it)
    :param p_improvement: the probability that a run of the model scores above a run of the baseline,
        over all pairs of their runs (ties count half; Agarwal et al., NeurIPS 2021)
    :param difference_ci, normalised_ci: percentile bootstrap intervals (runs resampled with
        replacement, each model's within the game); None with fewer than two runs on either side
    """

    game: str
    model_scores: list[float]
    baseline_scores: list[float]
    chance: float
    difference: float
    difference_ci: tuple[float, float] | None
    normalised: float | None
    normalised_ci: tuple[float, float] | None
    p_improvement: float


@dataclass(frozen=True)
class Comparison:
    """A model against a baseline over games (``compare_scores``).

    :param normalised: the mean over games of each game's normalised score (every game weighs alike);
        None where a game has none
    :param normalised_ci, p_improvement_ci: stratified percentile bootstrap intervals (each game's runs
        resampled within the game); None where a game has fewer than two runs on either side
    :param p_improvement: the mean over games of each game's probability of improvement
    """

    model: str
    baseline: str
    confidence: float
    games: list[GameComparison]
    normalised: float | None
    normalised_ci: tuple[float, float] | None
    p_improvement: float
    p_improvement_ci: tuple[float, float] | None


def _p_improvement(model: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """P(X > Y) + P(X = Y) / 2 over the last axis' pairs: ``model`` [..., n], ``baseline`` [..., m]."""
    x, y = model[..., :, None], baseline[..., None, :]
    return ((x > y) + 0.5 * (x == y)).mean(axis=(-2, -1))


def _normalised(model_mean: np.ndarray, baseline_mean: np.ndarray, chance: float) -> np.ndarray:
    return (model_mean - chance) / (baseline_mean - chance)


def compare_scores(
    scores: dict[str, tuple[list[float], list[float], float]],
    model: str = "model",
    baseline: str = "baseline",
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> Comparison:
    """Compare a model's runs with a baseline's, game by game and over all games.

    Few seeds make single means noisy; the comparison says how far the data pin the difference down.
    Per game: the difference of the mean scores, the model's score normalised between chance (0) and
    the baseline's mean (1), and the probability of improvement; over games, the mean normalised score
    and probability of improvement, with intervals from a stratified bootstrap (Agarwal et al., "Deep
    Reinforcement Learning at the Edge of the Statistical Precipice", NeurIPS 2021): each resample
    draws every game's model runs and baseline runs with replacement and recomputes every statistic,
    the baseline's mean in the normalisation included. With two or three runs a side the percentile
    intervals are too narrow rather than too wide (a resample cannot leave the range of the runs).

    :param scores: game -> (the model's run scores, the baseline's run scores, the random policy's score)
    :param confidence: the intervals' coverage, in (0, 1)
    :param resamples: bootstrap resamples
    :param seed: the bootstrap's random seed (the same inputs give the same intervals; each game's
        are drawn from a stream of its own, the same whichever other games are compared)
    :raises ValueError: for no games, a game without runs on a side, a confidence outside (0, 1) or
        fewer than one resample
    """
    if not scores:
        raise ValueError("no games to compare")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence!r} must lie in (0, 1)")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples={resamples!r} must be an integer >= 1")
    for game, (model_scores, baseline_scores, _) in scores.items():
        if not model_scores or not baseline_scores:
            counts = f"{model} has {len(model_scores)} runs, {baseline} {len(baseline_scores)}"
            raise ValueError(f"{game}: every side needs at least one run; {counts}")
    tails = [50 * (1 - confidence), 100 - 50 * (1 - confidence)]

    def interval(samples: np.ndarray) -> tuple[float, float]:
        low, high = np.percentile(samples, tails)
        return float(low), float(high)

    games, normalised_samples, p_samples = [], [], []
    for game, (model_scores, baseline_scores, chance) in sorted(scores.items()):
        x, y = np.asarray(model_scores, float), np.asarray(baseline_scores, float)
        # A random stream of the game's own: its intervals do not change with the other games compared.
        rng = np.random.default_rng([seed, zlib.crc32(game.encode())])
        # [resamples, runs]: every resample draws each side's runs with replacement.
        x_star = x[rng.integers(len(x), size=(resamples, len(x)))]
        y_star = y[rng.integers(len(y), size=(resamples, len(y)))]
        both_spread = len(x) > 1 and len(y) > 1  # intervals need two runs or more a side
        above_chance = bool(np.all(y > chance))
        normalised_star = _normalised(x_star.mean(1), y_star.mean(1), chance) if above_chance else None
        games.append(
            GameComparison(
                game=game,
                model_scores=[float(v) for v in x],
                baseline_scores=[float(v) for v in y],
                chance=float(chance),
                difference=float(x.mean() - y.mean()),
                difference_ci=interval(x_star.mean(1) - y_star.mean(1)) if both_spread else None,
                normalised=float(_normalised(x.mean(), y.mean(), chance)) if above_chance else None,
                normalised_ci=interval(normalised_star) if both_spread and above_chance else None,
                p_improvement=float(_p_improvement(x, y)),
            )
        )
        normalised_samples.append(normalised_star)
        p_samples.append(_p_improvement(x_star, y_star))
    every_spread = all(len(g.model_scores) > 1 and len(g.baseline_scores) > 1 for g in games)
    known = all(g.normalised is not None for g in games)
    return Comparison(
        model=model,
        baseline=baseline,
        confidence=confidence,
        games=games,
        normalised=float(np.mean([g.normalised for g in games])) if known else None,
        normalised_ci=interval(np.mean(normalised_samples, axis=0)) if known and every_spread else None,
        p_improvement=float(np.mean([g.p_improvement for g in games])),
        p_improvement_ci=interval(np.mean(p_samples, axis=0)) if every_spread else None,
    )


def _side_name(model: str, init: str | None) -> str:
    return model if init is None else f"{model}:{init}"


def _sides(
    paths: list[Path], ignore: Iterable[str], reference: Reference | None
) -> dict[tuple[str, str], dict[str, dict[int | None, list[float]]]]:
    """(side, setting) -> game -> step budget -> the unperturbed runs' final scores."""
    sides: dict[tuple[str, str], dict[str, dict[int | None, list[float]]]] = {}
    groups = grouped_results(paths, ignore, reference)
    for (game, name, init, perturbation, steps, setting), records in groups.items():
        if perturbation == "none":
            scores = [record.evaluation.score_mean for record in records]
            sides.setdefault((_side_name(name, init), setting), {}).setdefault(game, {})[steps] = scores
    return sides


def shared_settings(
    paths: list[Path],
    model: str = "dsqn:firing",
    baseline: str = "dqn",
    ignore: Iterable[str] = (),
    reference: Reference | None = None,
) -> list[str]:
    """The settings other than the preset's (``setting_labels``' labels, such as ``"optimizer=adam"``)
    that both ``model`` and ``baseline`` have runs of in one game at least: each can be compared on its
    own (``compare_models(..., setting=...)``)."""
    sides = _sides(paths, ignore, reference)
    settings = {setting for side, setting in sides if setting}
    return sorted(
        setting
        for setting in settings
        if set(sides.get((model, setting), {})) & set(sides.get((baseline, setting), {}))
    )


def compare_models(
    paths: list[Path],
    model: str = "dsqn:firing",
    baseline: str = "dqn",
    ignore: Iterable[str] = (),
    reference: Reference | None = None,
    min_runs: int = 1,
    setting: str = "",
    **options: Any,
) -> Comparison:
    """``compare_scores`` for the results in ``paths``: each run's final score (``evaluation.json``),
    and the random policy's (``spikeq evaluate --random --out``) as each game's chance level.

    A side is the runs of one model and init without a perturbation and with one setting (by default
    none of their own: ``grouped_results``, so an ablation's runs are not pooled with the main ones);
    only games with runs of both sides and a random policy's score are compared.

    :param model, baseline: ``MODEL`` or ``MODEL:INIT`` (``dsqn:firing``, ``dsqn:default``, ``dqn``)
    :param ignore, reference: as for ``setting_labels``
    :param setting: the runs compared on both sides: ``""`` those without a setting of their own (with
        ``reference``, the preset's), or a label of ``setting_labels`` (``shared_settings`` lists them)
    :param min_runs: compare only the games where each side has at least this many runs (2: the games
        with an interval, so that one game of single runs does not decide the mean over games)
    :param options: ``compare_scores``'s confidence, resamples and seed
    :raises ValueError: naming the sides the results hold, where no game has runs of both sides (at
        least ``min_runs`` each) and a random policy's score; where a side has runs of several step
        budgets in a game, or the two sides runs of different budgets; for ``min_runs`` below 1
    """
    if isinstance(min_runs, bool) or not isinstance(min_runs, int) or min_runs < 1:
        raise ValueError(f"min_runs={min_runs!r} must be an integer >= 1")
    sides = _sides(paths, ignore, reference)
    # Each game's chance level: the mean of its random-policy evaluations.
    chance = {
        game: float(np.mean([score for scores in evaluations.values() for score in scores]))
        for game, evaluations in sides.get(("random", ""), {}).items()
    }
    model_runs, baseline_runs = sides.get((model, setting), {}), sides.get((baseline, setting), {})
    scores = {}
    for game in sorted(set(model_runs) & set(baseline_runs) & set(chance)):
        for side, runs in ((model, model_runs[game]), (baseline, baseline_runs[game])):
            if len(runs) > 1:
                raise ValueError(f"{game}: {side} has runs of several step budgets: {sorted(runs)}")
        ((model_steps, model_scores),) = model_runs[game].items()  # one budget a side, checked above
        ((baseline_steps, baseline_scores),) = baseline_runs[game].items()
        if None not in (model_steps, baseline_steps) and model_steps != baseline_steps:
            raise ValueError(
                f"{game}: {model} runs of {model_steps:,} steps against {baseline} runs of "
                f"{baseline_steps:,}: compare runs of one budget (split_by_budget)"
            )
        if min(len(model_scores), len(baseline_scores)) >= min_runs:
            scores[game] = (model_scores, baseline_scores, chance[game])
    if not scores:
        runs = "" if min_runs == 1 else f" ({min_runs} or more each)"
        runs += f" with {setting}" if setting else ""
        held = sorted(name + (f" ({label})" if label else "") for name, label in sides) or ["nothing"]
        raise ValueError(
            f"no game has runs of both {model} and {baseline}{runs} and a random policy's score "
            f"(spikeq evaluate --random --out); the results hold: {'; '.join(held)}"
        )
    # Labelled by model name (dsqn, dqn), or by the whole MODEL:INIT where that alone tells them apart.
    names = model.split(":")[0], baseline.split(":")[0]
    names = (model, baseline) if names[0] == names[1] else names
    return compare_scores(scores, model=names[0], baseline=names[1], **options)


def _estimate(value: float | None, ci: tuple[float, float] | None, spec: str = ".2f") -> str:
    """A statistic with its interval in brackets where it has one; ``n/a`` where it is undefined."""
    if value is None:
        return "n/a"
    return format(value, spec) + (f" [{ci[0]:{spec}}, {ci[1]:{spec}}]" if ci else "")


def _all_games(comparison: Comparison) -> str:
    count = len(comparison.games)
    return "the one game" if count == 1 else f"all {count} games"


def format_comparison(comparison: Comparison) -> str:
    """A ``Comparison`` as a Markdown table, one row per game and one for all of them."""
    m, b = comparison.model, comparison.baseline
    level = f"{comparison.confidence:.0%}"

    lines = [
        f"| game | {m} runs | {b} runs | {m} | {b} | {m} - {b} [{level}] | {m} normalised [{level}] "
        f"| P({m} > {b}) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for g in comparison.games:
        cells = [
            g.game, str(len(g.model_scores)), str(len(g.baseline_scores)),
            f"{np.mean(g.model_scores):.2f}", f"{np.mean(g.baseline_scores):.2f}",
            _estimate(g.difference, g.difference_ci, "+.2f"), _estimate(g.normalised, g.normalised_ci),
            f"{g.p_improvement:.2f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    over_games = _all_games(comparison) + (" (each alike)" if len(comparison.games) > 1 else "")
    model_runs = sum(len(g.model_scores) for g in comparison.games)
    baseline_runs = sum(len(g.baseline_scores) for g in comparison.games)
    lines.append(
        f"| {over_games} | {model_runs} | {baseline_runs} | | | "
        f"| {_estimate(comparison.normalised, comparison.normalised_ci)} "
        f"| {_estimate(comparison.p_improvement, comparison.p_improvement_ci)} |"
    )
    return "\n".join(lines)


def leave_one_game_out(
    comparison: Comparison, resamples: int = 10_000, seed: int = 0
) -> dict[str, Comparison]:
    """``comparison`` again without each of its games in turn (game -> the comparison of the others):
    how far one game decides the mean over games. The intervals are resampled anew, as
    ``compare_scores`` with this seed would for those games alone.

    :raises ValueError: for a comparison of fewer than three games (one left would be no mean)
    """
    if len(comparison.games) < 3:
        raise ValueError(
            f"leaving one game out needs three games or more; the comparison has {len(comparison.games)}"
        )
    scores = {g.game: (g.model_scores, g.baseline_scores, g.chance) for g in comparison.games}
    return {
        left_out: compare_scores(
            {game: runs for game, runs in scores.items() if game != left_out},
            model=comparison.model,
            baseline=comparison.baseline,
            confidence=comparison.confidence,
            resamples=resamples,
            seed=seed,
        )
        for left_out in scores
    }


def format_leave_one_out(comparisons: dict[str, Comparison]) -> str:
    """``leave_one_game_out``'s comparisons as a Markdown table, one row per game left out."""
    first = next(iter(comparisons.values()))
    m, b, level = first.model, first.baseline, f"{first.confidence:.0%}"
    lines = [
        f"| left out | games | {m} normalised [{level}] | P({m} > {b}) [{level}] |",
        "|---|---:|---:|---:|",
    ]
    for left_out, c in comparisons.items():
        normalised = _estimate(c.normalised, c.normalised_ci)
        p_improvement = _estimate(c.p_improvement, c.p_improvement_ci)
        lines.append(f"| {left_out} | {len(c.games)} | {normalised} | {p_improvement} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class ComparisonReport:
    """``comparison_report``'s result: its Markdown and the comparisons ``plot_comparison`` draws.

    :param comparison: the runs of the presets' settings (``compare_models``)
    :param left_out: each game left out in turn (``leave_one_game_out``); None with fewer than three games
    """

    markdown: str
    comparison: Comparison
    left_out: dict[str, Comparison] | None


def comparison_report(
    paths: list[Path],
    model: str = "dsqn:firing",
    baseline: str = "dqn",
    ignore: Iterable[str] = (),
    reference: Reference | None = None,
) -> ComparisonReport:
    """``model`` against ``baseline`` in Markdown: their runs of the presets' settings (without
    ``reference``: of no setting of their own), then, where they apply, the games with two runs or more
    a side (where a game of single runs, without an interval, could swing the mean), each game left out
    in turn (three games or more), and the same comparison for each setting both models were run with
    (``shared_settings``).

    :raises ValueError: where no game has runs of both models (``compare_models``)
    """
    sides = dict(model=model, baseline=baseline, ignore=ignore, reference=reference)
    compared = compare_models(paths, **sides)
    sections = [format_comparison(compared)]
    runs = [min(len(g.model_scores), len(g.baseline_scores)) for g in compared.games]
    if min(runs) < 2 <= max(runs):
        seeded = format_comparison(compare_models(paths, **sides, min_runs=2))
        sections.append(f"The games with two runs or more a side:\n\n{seeded}")
    left_out = leave_one_game_out(compared) if len(compared.games) >= 3 else None
    if left_out is not None:
        sections.append(
            f"Each game left out in turn (the mean over the others):\n\n{format_leave_one_out(left_out)}"
        )
    for setting in shared_settings(paths, model, baseline, ignore, reference):
        other = format_comparison(compare_models(paths, **sides, setting=setting))
        sections.append(f"Both models with {setting}:\n\n{other}")
    return ComparisonReport("\n\n".join(sections), compared, left_out)


def plot_comparison(comparison: Comparison, out: Path, left_out: dict[str, Comparison] | None = None) -> Path:
    """The comparison as a figure: each game's normalised score (with its interval) and probability of
    improvement, the means over games below them (with theirs), and with ``left_out`` (``leave_one_game_out``)
    the means without each game in turn. Dotted lines mark the baseline (1), chance (0, where the scale
    is linear: it is logarithmic where every score is above chance) and P = 0.5 (neither model ahead).

    :param out: the image file to write
    :return: ``out``
    :raises ValueError: for a comparison with no normalised score in any game (every baseline at chance)
    """
    m, b = comparison.model, comparison.baseline
    rows = [(g.game, g.normalised, g.normalised_ci, g.p_improvement, None) for g in comparison.games]
    rows.append((_all_games(comparison), comparison.normalised, comparison.normalised_ci,
                 comparison.p_improvement, comparison.p_improvement_ci))  # fmt: skip
    for game, c in (left_out or {}).items():
        rows.append((f"without {game}", c.normalised, c.normalised_ci, c.p_improvement, c.p_improvement_ci))
    if all(row[1] is None for row in rows):
        raise ValueError(f"no game has a normalised score: {b} does not score above chance anywhere")
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 1.2 + 0.45 * len(rows)), sharey=True)
    ys = np.arange(len(rows))[::-1]  # the first row at the top
    for i, (y, (_, normalised, normalised_ci, p, p_ci)) in enumerate(zip(ys, rows, strict=True)):
        colour = "C0" if i < len(comparison.games) else "C1"  # games, then means over games
        for axes, value, ci in ((left, normalised, normalised_ci), (right, p, p_ci)):
            if value is None:
                continue
            axes.plot(value, y, "o", color=colour)
            if ci is not None:
                axes.hlines(y, *ci, color=colour, linewidth=2)
    values = [v for row in rows for v in (row[1], *(row[2] or ())) if v is not None]
    if min(values) > 0:  # one game far above the baseline would squeeze the others on a linear axis
        left.set_xscale("log")
        left.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        left.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    else:
        left.axvline(0, color="grey", linestyle=":", linewidth=1)
    left.axvline(1, color="grey", linestyle=":", linewidth=1)
    right.axvline(0.5, color="grey", linestyle=":", linewidth=1)
    left.set_yticks(ys, [row[0] for row in rows])
    left.set_xlabel(f"{m} score normalised: 0 random policy, 1 {b}")
    right.set_xlabel(f"P({m} run > {b} run)")
    right.set_xlim(-0.05, 1.05)
    level = f"{comparison.confidence:.0%}"
    figure.suptitle(
        f"{m} against {b}: point estimates with {level} bootstrap intervals over runs", fontsize=9
    )
    for axes in (left, right):
        axes.grid(alpha=0.3, axis="x")
    return save_figure(figure, out)
