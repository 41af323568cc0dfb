"""Evaluating DQN agents on a real Atari game: scores, energy per action, and a video of an episode.

Episodes are cut at 200 agent steps (800 emulator frames) so that a Pong game ends quickly.
"""

import json
import math

import ale_py
import gymnasium
import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from stable_baselines3 import DQN
from stable_baselines3.common.env_util import make_atari_env
from stable_baselines3.common.vec_env import VecFrameStack

import spikeq  # noqa: F401 (registers "SpikingPolicy" with DQN)
from spikeq.analysis.energy import EnergyCounts, energy_report
from spikeq.analysis.evaluate import Evaluation, evaluate_model

gymnasium.register_envs(ale_py)

MAX_AGENT_STEPS = 200
CONV1_MACS = 32 * 20 * 20 * (4 * 8 * 8)
# Nature CNN: conv1 + conv2 64*9*9*(32*4*4) + conv3 64*7*7*(64*3*3) + fc1 3136*512 + fc2 512*6
NATURE_MACS = CONV1_MACS + 64 * 9 * 9 * 32 * 4 * 4 + 64 * 7 * 7 * 64 * 3 * 3 + 3136 * 512 + 512 * 6
NEURONS = {"conv1": 32 * 20 * 20, "conv2": 64 * 9 * 9, "conv3": 64 * 7 * 7, "fc1": 512}
# The flat result (evaluation.json, ``spikeq evaluate --out``), key by key and in this order.
SCORE_KEYS = [
    "episodes", "scores", "episode_lengths", "score_mean", "score_std", "score_min", "score_max", "game",
    "human_normalized", "epsilon", "seed", "perturbation", "video_path",
]  # fmt: skip
ENERGY_KEYS = [
    "energy_model", "num_steps", "decisions", "firing_rate", "mean_firing_rate", "spikes_per_layer",
    "spikes_per_action", "sops_per_layer", "sops_per_action", "macs_per_layer", "macs_per_action",
    "neuron_updates_per_action", "energy_breakdown_pj", "energy_pj_per_action", "ann_macs_per_action",
    "ann_energy_pj_per_action", "energy_ratio",
]  # fmt: skip


def pong(render_mode: str | None = "rgb_array", n_envs: int = 1):
    """The evaluation env: full game (no life-loss ends), raw rewards, 4 stacked 84x84 frames."""
    env = make_atari_env(
        "PongNoFrameskip-v4",
        n_envs=n_envs,
        seed=0,
        wrapper_kwargs={"terminal_on_life_loss": False, "clip_reward": False},
        # the time limit counts emulator frames: 4 per agent step (frame skip)
        env_kwargs={"max_episode_steps": 4 * MAX_AGENT_STEPS, "render_mode": render_mode},
    )
    return VecFrameStack(env, n_stack=4)


@pytest.fixture(scope="module")
def env():
    env = pong()
    yield env
    env.close()


def check_scores(result: Evaluation, n_episodes: int) -> None:
    scores = result.scores
    assert result.episodes == len(scores) == len(result.episode_lengths) == n_episodes
    assert all(isinstance(score, float) and -21 <= score <= 21 for score in scores)
    assert result.score_mean == pytest.approx(np.mean(scores))
    assert result.score_std == pytest.approx(np.std(scores))
    assert (result.score_min, result.score_max) == (min(scores), max(scores))
    assert all(0 < length <= MAX_AGENT_STEPS for length in result.episode_lengths)
    # Pong's human-normalised score: (score - random) / (human - random), random -20.7, human 14.6
    assert result.human_normalized == pytest.approx((result.score_mean + 20.7) / (14.6 + 20.7))
    # About 95% of the steps are greedy at epsilon = 0.05; only those are counted.
    steps = sum(result.episode_lengths)
    assert 0.85 * steps < result.energy.decisions <= steps
    assert result.energy.energy_model.name == "45nm"
    assert (result.energy.energy_model.pj_per_mac, result.energy.energy_model.pj_per_sop) == (4.6, 0.9)
    for lines in (result.assumptions, result.energy.assumptions):
        assert lines and all(isinstance(line, str) and line for line in lines)
    # The flat form keeps its keys, and reads back (through JSON, as evaluation.json) as it was.
    flat = result.to_dict()
    assert list(flat) == [*SCORE_KEYS, *ENERGY_KEYS, "assumptions"]
    assert flat["assumptions"] == result.assumptions + result.energy.assumptions
    assert Evaluation.from_dict(json.loads(json.dumps(flat))) == result


def test_a_spiking_dqn(env):
    model = DQN("SpikingPolicy", env, policy_kwargs={"num_steps": 4}, buffer_size=1000, seed=0)
    # An untrained DSQN barely spikes; stronger weights make every layer fire (about 10%).
    with torch.no_grad():
        for layer in model.policy.q_net.modules():
            if isinstance(layer, torch.nn.Conv2d | torch.nn.Linear):
                layer.weight *= 8
    result = evaluate_model(model, env, n_episodes=2, epsilon=0.05, seed=0, progress=False, game="Pong")
    check_scores(result, 2)
    report = result.energy
    assert report.num_steps == 4

    rates, spikes = report.firing_rate, report.spikes_per_layer
    assert set(rates) == set(NEURONS)
    assert all(0 < rate < 1 for rate in rates.values())
    for layer, rate in rates.items():
        assert spikes[layer] == pytest.approx(rate * NEURONS[layer] * 4)  # rate = spikes / (neurons * T)
    assert report.spikes_per_action == pytest.approx(sum(spikes.values()))

    # conv1 gets the analog frames once per decision; every other layer gets spikes.
    assert report.macs_per_layer == {"conv1": CONV1_MACS}
    assert report.macs_per_action == CONV1_MACS
    sops = report.sops_per_layer
    assert set(sops) == {"conv2", "conv3", "fc1", "fc2"}
    assert sops["fc1"] == pytest.approx(spikes["conv3"] * 512)  # a Linear input spike reaches all outputs
    assert sops["fc2"] == pytest.approx(spikes["fc1"] * 6)  # the readout: n_actions per fc1 spike
    # A conv2 input (k4 s2) lies in at most 2x2 windows of 64 channels, a conv3 input (k3 s1) in 3x3.
    assert 0 < sops["conv2"] <= spikes["conv1"] * 4 * 64
    assert 0 < sops["conv3"] <= spikes["conv2"] * 9 * 64
    assert report.sops_per_action == pytest.approx(sum(sops.values()))

    energy = 4.6 * report.macs_per_action + 0.9 * report.sops_per_action
    assert report.energy_pj_per_action == pytest.approx(energy, rel=1e-12)
    assert report.ann_energy_pj_per_action == pytest.approx(4.6 * NATURE_MACS, rel=1e-12)
    assert report.energy_ratio == pytest.approx(energy / (4.6 * NATURE_MACS), rel=1e-12)


def test_an_ann_dqn(env):
    model = DQN("CnnPolicy", env, buffer_size=1000, seed=0)
    result = evaluate_model(model, env, n_episodes=2, epsilon=0.05, seed=0, progress=False, game="Pong")
    check_scores(result, 2)
    report = result.energy
    assert report.num_steps is None
    assert report.firing_rate == {}
    assert report.spikes_per_action == report.sops_per_action == 0
    assert report.macs_per_action == NATURE_MACS
    assert report.energy_pj_per_action == pytest.approx(4.6 * NATURE_MACS, rel=1e-12)
    assert report.energy_pj_per_action == report.ann_energy_pj_per_action
    assert report.energy_ratio == 1.0


def test_the_same_seed_gives_the_same_evaluation(env):
    model = DQN("CnnPolicy", env, buffer_size=1000, seed=0)
    first, second = (
        evaluate_model(model, env, n_episodes=1, epsilon=0.5, seed=3, progress=False) for _ in range(2)
    )
    assert first.scores == second.scores
    assert first.energy.decisions == second.energy.decisions


def test_without_greedy_decisions_the_energy_is_not_a_number(env):
    model = DQN("CnnPolicy", env, buffer_size=1000, seed=0)
    result = evaluate_model(model, env, n_episodes=1, epsilon=1.0, seed=0, progress=False)
    assert result.energy.decisions == 0
    assert math.isnan(result.energy.energy_pj_per_action)


def test_envs_past_their_share_of_the_episodes_are_not_metered():
    """2 episodes on 4 envs: envs 2 and 3 play one each, envs 0 and 1 none. Every decision is greedy
    (epsilon 0), so the decisions metered are exactly the steps of the 2 episodes scored."""
    envs = pong(render_mode=None, n_envs=4)
    model = DQN("CnnPolicy", envs, buffer_size=1000, seed=0)
    result = evaluate_model(model, envs, n_episodes=2, epsilon=0.0, seed=0, progress=False, game="Pong")
    envs.close()
    check_scores(result, 2)
    assert result.energy.decisions == sum(result.episode_lengths)


def test_a_video_of_the_first_episode(env, tmp_path):
    model = DQN("CnnPolicy", env, buffer_size=1000, seed=0)
    path = tmp_path / "videos" / "pong.mp4"
    result = evaluate_model(model, env, n_episodes=1, seed=0, video_path=path, progress=False)
    assert result.video_path == str(path)
    assert path.stat().st_size > 0
    with imageio.get_reader(path) as video:
        frames = list(video.iter_data())
    # One RGB screen of the emulator per agent step, from the reset to the last step before the end.
    assert len(frames) == result.episode_lengths[0]
    assert frames[0].shape == (210, 160, 3)


def test_a_video_needs_rgb_frames(tmp_path):
    no_frames = pong(render_mode=None)
    model = DQN("CnnPolicy", no_frames, buffer_size=1000, seed=0)
    with pytest.raises(ValueError, match="render_mode is None; allowed: 'rgb_array'"):
        evaluate_model(model, no_frames, n_episodes=1, video_path=tmp_path / "x.mp4", progress=False)
    no_frames.close()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"n_episodes": 0}, "n_episodes=0 must be an integer >= 1"),
        ({"epsilon": 1.5}, r"epsilon=1.5 must lie in \[0, 1\]"),
        ({"energy_model": "65nm"}, "unknown energy model '65nm'"),
    ],
)
def test_bad_arguments(env, kwargs, error):
    model = DQN("CnnPolicy", env, buffer_size=1000, seed=0)
    with pytest.raises(ValueError, match=error):
        evaluate_model(model, env, progress=False, **kwargs)


def test_scores_only_without_energy(env):
    model = DQN("CnnPolicy", env, buffer_size=1000, seed=0)
    result = evaluate_model(model, env, n_episodes=1, seed=0, progress=False, energy=False)
    assert result.energy is None
    flat = result.to_dict()
    assert list(flat) == [*SCORE_KEYS, "assumptions", "decisions"] and flat["decisions"] is None
    assert flat["assumptions"] == result.assumptions
    assert Evaluation.from_dict(json.loads(json.dumps(flat))) == result


def made_up_evaluation(energy: bool = True) -> Evaluation:
    """An evaluation of two episodes with an energy report of 10 decisions, no game played."""
    counts = EnergyCounts(4, 10, neurons={"fc1": 8}, spikes={"fc1": 40}, sops={"fc2": 120}, macs={"fc1": 300})
    return Evaluation(
        episodes=2,
        scores=[1.0, 3.0],
        episode_lengths=[10, 12],
        score_mean=2.0,
        score_std=1.0,
        score_min=1.0,
        score_max=3.0,
        game="Pong",
        human_normalized=0.6431,
        epsilon=0.05,
        seed=0,
        perturbation="none",
        video_path=None,
        energy=energy_report(counts, "45nm", ann_macs_per_action=400) if energy else None,
        assumptions=["Score: made up.", "Actions: made up."],
    )


@pytest.mark.parametrize("energy", [True, False])
def test_the_flat_form_reads_back_as_it_was(energy):
    evaluation = made_up_evaluation(energy)
    flat = evaluation.to_dict()
    if energy:
        assert list(flat) == [*SCORE_KEYS, *ENERGY_KEYS, "assumptions"]
        assert flat["energy_model"]["pj_per_sop"] == 0.9 and flat["decisions"] == 10
        assert flat["assumptions"][:2] == evaluation.assumptions and len(flat["assumptions"]) > 2
    else:
        assert list(flat) == [*SCORE_KEYS, "assumptions", "decisions"] and flat["decisions"] is None
    assert Evaluation.from_dict(flat) == evaluation
    assert Evaluation.from_dict(json.loads(json.dumps(flat))) == evaluation
    assert Evaluation.from_dict(flat).to_dict() == flat


def test_files_of_earlier_versions_and_runs_still_load():
    evaluation = made_up_evaluation()
    # evaluation.json of a run: game, model and best_step first; before --perturb: no perturbation.
    flat = {"game": "Pong", "model": "dsqn", "best_step": 5000, **evaluation.to_dict()}
    del flat["perturbation"]
    assert Evaluation.from_dict(flat) == evaluation


@pytest.mark.parametrize("key", ["score_mean", "assumptions", "sops_per_action", "energy_ratio"])
def test_a_result_without_a_key_names_it_in_one_line(key):
    flat = made_up_evaluation().to_dict()
    del flat[key]
    with pytest.raises(ValueError, match=f"missing key.*{key}") as error:
        Evaluation.from_dict(flat)
    assert "\n" not in str(error.value)


def test_a_result_that_is_not_a_mapping_or_has_a_bad_energy_model_fails_in_one_line():
    with pytest.raises(ValueError, match="must be a mapping, got list"):
        Evaluation.from_dict([1, 2])
    flat = made_up_evaluation().to_dict()
    del flat["energy_model"]["pj_per_sop"]
    with pytest.raises(ValueError, match="energy_model: missing field.*pj_per_sop") as error:
        Evaluation.from_dict(flat)
    assert "\n" not in str(error.value)
