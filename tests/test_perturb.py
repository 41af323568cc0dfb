"""Observation perturbations (robustness tests): Gaussian noise and FGSM on real Pong frames, for the
ANN DQN and the DSQN, FGSM transferred from another network, and ``evaluate_model`` / ``spikeq
evaluate`` under them."""

import numpy as np
import pytest
import torch
from stable_baselines3 import DQN
from torch.nn import functional

from spikeq import cli
from spikeq.analysis.convert import record_frames
from spikeq.analysis.evaluate import evaluate_model
from spikeq.analysis.perturb import Perturbation
from spikeq.envs import atari, games
from spikeq.snn.network import MinAtarCNN


@pytest.fixture(scope="module")
def pong():
    """The paper's evaluation env on Pong (episodes capped at 60 agent steps), and 16 frames."""
    env = atari.make_env("Pong", n_envs=1, seed=0, train=False, max_episode_steps=60)
    ann = DQN("CnnPolicy", env, buffer_size=1, seed=0, device="cpu")
    return env, record_frames(ann, env, 16, progress=False)


def models(env):
    ann = DQN("CnnPolicy", env, buffer_size=1, seed=0, device="cpu")
    dsqn = DQN("SpikingPolicy", env, buffer_size=1, seed=0, device="cpu", policy_kwargs=dict(num_steps=8))
    with torch.no_grad():  # weights that fire on Pong frames (PyTorch's initialisation does not)
        for synapse in dsqn.q_net.synapses:
            for parameter in synapse.parameters():
                parameter.mul_(8)
    return {"dqn": ann, "dsqn": dsqn}


def test_parse_names_what_is_allowed():
    assert Perturbation.parse("fgsm:0.01") == Perturbation("fgsm", 0.01)
    assert (
        str(Perturbation.parse("gaussian:0.05")) == "gaussian:0.05"
        and str(Perturbation.parse("none")) == "none"
    )
    with pytest.raises(ValueError, match="is not none, gaussian:SIGMA, fgsm:EPS or fgsm:EPS@ATTACKER"):
        Perturbation.parse("blur:3")
    with pytest.raises(ValueError, match="'x' is not a number"):
        Perturbation.parse("fgsm:x")
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        Perturbation.parse("gaussian:-1")
    # A strength given to none is a typo for another perturbation, not an unperturbed run.
    with pytest.raises(ValueError, match="perturbation none takes no strength, got 0.1; allowed: none"):
        Perturbation.parse("none:0.1")


def test_a_transferred_attack_names_its_attacker():
    transferred = Perturbation.parse("fgsm:0.1@dqn")
    assert transferred == Perturbation("fgsm", 0.1, "dqn") and str(transferred) == "fgsm:0.1@dqn"
    assert transferred.family == "fgsm@dqn" and Perturbation.parse("fgsm:0.1").family == "fgsm"
    assert Perturbation.parse("fgsm:0.1@dsqn-if").attacker == "dsqn-if"
    for text in ("gaussian:0.1@dqn", "fgsm:0.1@", "fgsm:0.1@a/b"):
        with pytest.raises(ValueError, match="only fgsm is transferred, from an attacker named by letters"):
            Perturbation.parse(text)
    with pytest.raises(ValueError, match="is not none, gaussian:SIGMA"):
        Perturbation.parse("none@dqn")


def test_gaussian_noise_has_its_sigma_and_stays_in_the_pixel_range(pong):
    env, frames = pong
    policy = models(env)["dqn"].policy
    obs, _ = policy.obs_to_tensor(frames)
    rng = np.random.default_rng(0)
    noisy = Perturbation("gaussian", 0.05).apply(policy.q_net, obs, policy.observation_space, rng)
    assert noisy.dtype == torch.float32 and noisy.shape == obs.shape
    assert 0 <= float(noisy.min()) and float(noisy.max()) <= 255
    # Where neither bound clips, the noise is N(0, (0.05 * 255)^2).
    inside = (obs > 60) & (obs < 195)
    assert float((noisy - obs.float())[inside].std()) == pytest.approx(0.05 * 255, rel=0.05)
    assert Perturbation("gaussian", 0.0).apply(policy.q_net, obs, policy.observation_space, rng) is obs


@pytest.mark.parametrize("model", ["dqn", "dsqn"])
def test_fgsm_moves_each_pixel_by_eps_against_the_greedy_action(pong, model):
    env, frames = pong
    policy = models(env)[model].policy
    obs, _ = policy.obs_to_tensor(frames)
    attacked = Perturbation("fgsm", 0.02).apply(policy.q_net, obs, policy.observation_space, None)
    change = (attacked - obs.float()).abs()
    assert float(change.max()) <= 0.02 * 255 + 1e-4
    assert float((change > 0).float().mean()) > 0.5  # most pixels move (the rest are clipped at 0 or 255)
    if model == "dqn":
        # The true gradient: the loss of the greedy action can only grow for a small step.
        with torch.no_grad():
            q, q_attacked = policy.q_net(obs), policy.q_net(attacked)
        greedy = q.argmax(dim=1)
        loss = functional.cross_entropy(q, greedy, reduction="none")
        assert (functional.cross_entropy(q_attacked, greedy, reduction="none") > loss).float().mean() > 0.9


@pytest.mark.parametrize("model", ["dqn", "dsqn"])
def test_minatar_grids_are_perturbed_in_units_of_their_range_and_clipped_to_it(model):
    """MinAtar's Box(0, 1) grids: the range is 1, so EPS and SIGMA are cell values, clipped to [0, 1]."""
    env = games.make_env("MinAtar/Breakout", seed=0)
    if model == "dsqn":
        agent = DQN("SpikingPolicy", env, buffer_size=1, seed=0, policy_kwargs=dict(init="firing"))
    else:
        agent = DQN(
            "MlpPolicy", env, buffer_size=1, seed=0, policy_kwargs=dict(features_extractor_class=MinAtarCNN)
        )
    policy = agent.policy
    frames = [env.reset()[0]]
    for _ in range(31):
        frames.append(env.step(np.array([env.action_space.sample()]))[0][0])
    obs, _ = policy.obs_to_tensor(np.stack(frames))
    if model == "dsqn":
        policy.q_net.calibrate_firing(obs)  # PyTorch's initialisation is silent on MinAtar grids
    attacked = Perturbation("fgsm", 0.25).apply(policy.q_net, obs, policy.observation_space, None)
    assert 0 <= float(attacked.min()) and float(attacked.max()) <= 1
    change = attacked - obs.float()
    assert set(np.unique(change.abs().numpy().round(6))) <= {0.0, 0.25}
    # Cells move only into the range (the bounds above), and in both directions: up from 0, down from 1.
    assert bool((change[obs == 0] > 0).any()) and bool((change[obs == 1] < 0).any())
    # Each cell whose gradient sign points into [0, 1] moves: about half of them.
    assert float((change != 0).float().mean()) > 0.3
    noisy = Perturbation("gaussian", 0.3).apply(
        policy.q_net, obs, policy.observation_space, np.random.default_rng(0)
    )
    assert (
        0 <= float(noisy.min()) and float(noisy.max()) <= 1 and float((noisy - obs.float()).abs().max()) > 0.3
    )


def test_evaluation_under_perturbation(pong):
    env, _ = pong
    dsqn = models(env)["dsqn"]
    plain = evaluate_model(dsqn, env, n_episodes=1, seed=3, progress=False)
    zero = evaluate_model(dsqn, env, n_episodes=1, seed=3, progress=False, perturbation="gaussian:0")
    assert zero.scores == plain.scores and zero.energy.spikes_per_action == plain.energy.spikes_per_action
    attacked = evaluate_model(dsqn, env, n_episodes=1, seed=3, progress=False, perturbation="fgsm:0.05")
    assert attacked.perturbation == "fgsm:0.05" and plain.perturbation == "none"
    # The same exploration draws, so the same number of greedy decisions, each counted once.
    assert (
        attacked.energy.decisions == plain.energy.decisions
        and attacked.episode_lengths == plain.episode_lengths
    )
    assert attacked.energy.spikes_per_action != plain.energy.spikes_per_action
    assert any("fgsm:0.05" in line for line in attacked.assumptions)


def test_a_transferred_attack_is_crafted_on_the_attackers_network(pong):
    """Crafted on a copy of the network attacked, a transferred attack is the white-box one, decision for
    decision; crafted on another network, it perturbs differently; only fgsm:EPS@NAME takes an attacker."""
    env, _ = pong
    dsqn, dqn = models(env)["dsqn"], models(env)["dqn"]
    options = dict(n_episodes=1, seed=3, progress=False)
    own = evaluate_model(dsqn, env, **options, perturbation="fgsm:0.05")
    copy = DQN("SpikingPolicy", env, buffer_size=1, seed=1, device="cpu", policy_kwargs=dict(num_steps=8))
    copy.policy.load_state_dict(dsqn.policy.state_dict())
    same = evaluate_model(dsqn, env, **options, perturbation="fgsm:0.05@copy", attacker=copy)
    assert same.perturbation == "fgsm:0.05@copy"
    assert same.scores == own.scores and same.episode_lengths == own.episode_lengths
    assert same.energy.spikes_per_action == own.energy.spikes_per_action
    transferred = evaluate_model(dsqn, env, **options, perturbation="fgsm:0.05@dqn", attacker=dqn)
    assert transferred.energy.decisions == own.energy.decisions
    assert transferred.energy.spikes_per_action != own.energy.spikes_per_action
    assert any("crafted on another network, 'dqn'" in line for line in transferred.assumptions)
    with pytest.raises(ValueError, match="needed by a transferred attack"):
        evaluate_model(dsqn, env, **options, perturbation="fgsm:0.05", attacker=dqn)
    with pytest.raises(ValueError, match="needed by a transferred attack"):
        evaluate_model(dsqn, env, **options, perturbation="fgsm:0.05@dqn")
    minatar = games.make_env("MinAtar/Breakout", seed=0)
    elsewhere = DQN("SpikingPolicy", minatar, buffer_size=1, seed=0)
    with pytest.raises(ValueError, match="a transferred attack needs the same observations"):
        evaluate_model(dsqn, env, **options, perturbation="fgsm:0.05@dsqn", attacker=elsewhere)


def test_evaluate_command_refuses_a_bad_perturbation(tmp_path, capsys):
    checkpoint = tmp_path / "dqn.zip"
    checkpoint.write_bytes(b"not used: the perturbation is checked first")
    assert cli.main(["evaluate", str(checkpoint), "--game", "Pong", "--perturb", "blur"]) == 2
    assert "perturbation 'blur' is not none, gaussian:SIGMA, fgsm:EPS or" in capsys.readouterr().err
    command = ["evaluate", str(checkpoint), "--game", "Pong"]
    assert cli.main([*command, "--perturb", "fgsm:0.1@dqn"]) == 2
    assert "names an attacker; give its checkpoint: --attacker FILE" in capsys.readouterr().err
    assert cli.main([*command, "--perturb", "gaussian:0.1", "--attacker", str(checkpoint)]) == 2
    assert "--perturb gaussian:0.1 is not fgsm:EPS" in capsys.readouterr().err
    assert cli.main([*command, "--perturb", "fgsm:0.1", "--attacker", str(tmp_path / "no.zip")]) == 2
    assert f"attacker checkpoint {tmp_path / 'no.zip'} does not exist" in capsys.readouterr().err


def test_an_unseeded_evaluation_draws_noise_of_its_own():
    """Without a seed the noise is unseeded, as the exploration is: two unseeded evaluations of the same
    game with the same greedy network see different noise (they saw seed 0's noise every time)."""
    spikes = []
    for _ in range(2):
        env = atari.make_env("Pong", n_envs=1, seed=0, train=False, max_episode_steps=30)
        dsqn = models(env)["dsqn"]
        result = evaluate_model(
            dsqn, env, n_episodes=1, epsilon=0.0, progress=False, perturbation="gaussian:0.1"
        )
        spikes.append(result.energy.spikes_per_action)
        env.close()
    assert spikes[0] != spikes[1]
