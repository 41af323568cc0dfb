"""ANN->SNN conversion (Tan et al. 2021): a trained DQN becomes an IF spiking Q-network whose Q-values
approach the DQN's as T grows, on real CartPole and Pong observations."""

import json

import numpy as np
import pytest
import torch
from conftest import run_spikeq
from gymnasium import spaces
from stable_baselines3 import DQN
from stable_baselines3.common.env_util import make_vec_env
from torch import nn

from spikeq import cli
from spikeq.analysis.convert import action_agreement, convert_dqn, hidden_activations, record_frames
from spikeq.analysis.weights import export_weights, load_model, weights_paths
from spikeq.envs import atari
from spikeq.snn.network import NetworkSpec, SpikingQNetwork


@pytest.fixture(scope="module")
def cartpole():
    """A DQN trained for 2,000 steps on CartPole, and 1,200 observations it played."""
    env = make_vec_env("CartPole-v1", n_envs=1, seed=0)
    model = DQN("MlpPolicy", env, learning_starts=500, buffer_size=2000, seed=0, device="cpu")
    model.learn(2000)
    return model, record_frames(model, env, 1200, progress=False)


@pytest.fixture(scope="module")
def pong():
    """A Nature-CNN DQN (initial weights) and 160 Pong frames it played."""
    env = atari.make_env("Pong", n_envs=1, seed=0, train=False)
    model = DQN("CnnPolicy", env, buffer_size=1, seed=0, device="cpu")
    return model, record_frames(model, env, 160, progress=False)


def relu_forward(q_net: SpikingQNetwork, obs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The converted weights run as a ReLU network: Q and every hidden layer's activations."""
    x = obs.float() / 255 if q_net.is_image else obs.float()
    hidden = []
    for synapse in q_net.synapses:
        x = torch.relu(synapse(x))
        hidden.append(x)
    return q_net.readout.linear(x), hidden


@pytest.mark.parametrize("game", ["cartpole", "pong"])
def test_normalised_weights_compute_the_same_q_with_unit_scales(game, request):
    ann, frames = request.getfixturevalue(game)
    snn, conversion = convert_dqn(ann, frames, num_steps=8, progress=False)

    obs, _ = ann.policy.obs_to_tensor(frames)
    with torch.no_grad():
        q, hidden = relu_forward(snn.q_net, obs)
        q_ann = ann.q_net(obs)
    # Rescaling a ReLU layer's output by 1/lambda and the next layer's input by lambda changes nothing.
    torch.testing.assert_close(q, q_ann, rtol=1e-4, atol=1e-5)
    # ... and every hidden layer's 99.9th percentile of positive activations becomes 1, the threshold.
    for name, activations in zip(snn.q_net.layer_names, hidden, strict=True):
        assert np.percentile(activations[activations > 0].numpy(), 99.9) == pytest.approx(1, rel=1e-3), name
    assert list(conversion.scales) == snn.q_net.layer_names
    assert conversion.frames == len(frames) and conversion.num_steps == 8


def test_spiking_q_values_approach_the_dqn_as_t_grows(cartpole):
    ann, frames = cartpole
    train, held_out = frames[:1000], frames[1000:]
    errors = {}
    for num_steps in (16, 64, 256):
        snn, _ = convert_dqn(ann, train, num_steps=num_steps, progress=False)
        spec = snn.q_net.spec
        assert (spec.neuron, spec.reset, spec.threshold, spec.readout) == ("if", "subtract", 1.0, "rate")
        result = action_agreement(ann, snn, held_out, progress=False)
        errors[num_steps] = result["q_rmse"]
    # A rate code's error falls about as 1/T.
    assert errors[256] < errors[64] / 2 < errors[16] / 4
    assert errors[256] < 0.05 * result["q_scale"]
    assert result["agreement"] >= 0.9


def test_rate_readout_is_the_robust_firing_rate_of_the_paper():
    """Tan et al.'s Q proxy, output spike count + final membrane of IF neurons with subtraction reset,
    written out step by step here on a spiking network's own last hidden spikes, is T times that
    network's rate readout fc2(mean_t S[t])."""
    torch.manual_seed(0)
    num_steps = 50
    net = SpikingQNetwork(
        spaces.Box(-1.0, 1.0, (6,), dtype=np.float32),
        spaces.Discrete(4),
        NetworkSpec(num_steps=num_steps, neuron="if", reset="subtract", readout="rate", net_arch=[20]),
    )
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)  # PyTorch's initialisation is nearly silent on random input
        obs = torch.rand(3, 6) * 2 - 1
        with net.record() as activity:
            q = net(obs)
        spikes = activity[len(net.synapses) - 1].spikes  # [T, B, 20]: fc1's
        assert 0 < float(spikes.mean()) < 1
        fc2 = net.readout.linear
        membrane, count = torch.zeros(3, 4), torch.zeros(3, 4)
        for t in range(num_steps):
            membrane += fc2(spikes[t])
            fired = (membrane > 1).float()
            membrane -= fired
            count += fired
    torch.testing.assert_close((count + membrane) / num_steps, q)


def test_hidden_activations_are_the_positive_relu_outputs(pong):
    ann, frames = pong
    activations = hidden_activations(ann, frames[:32], progress=False)
    assert len(activations) == 4  # conv1, conv2, conv3, fc1
    assert all(a.dtype == np.float32 and a.size and (a > 0).all() for a in activations)
    conv1 = ann.q_net.features_extractor.cnn[0]
    with torch.no_grad():
        out = conv1(ann.policy.obs_to_tensor(frames[:32])[0].float() / 255)
    assert activations[0].size == int((out > 0).sum())


def test_bad_input_names_the_value(cartpole):
    ann, frames = cartpole
    with pytest.raises(ValueError, match="percentile=0"):
        convert_dqn(ann, frames, percentile=0, progress=False)
    with pytest.raises(ValueError, match="num_steps=0"):
        convert_dqn(ann, frames, num_steps=0, progress=False)
    # A T that no spikeq command would load again is refused, not written.
    with pytest.raises(ValueError, match="num_steps=5000 is out of range; allowed: 1 to 4096"):
        convert_dqn(ann, frames, num_steps=5000, progress=False)
    with pytest.raises(ValueError, match="no frames"):
        convert_dqn(ann, frames[:0], progress=False)
    tanh = DQN("MlpPolicy", "CartPole-v1", buffer_size=1, policy_kwargs=dict(activation_fn=nn.Tanh))
    with pytest.raises(ValueError, match="needs ReLU activations; the Q-network has Tanh"):
        convert_dqn(tanh, frames, progress=False)
    snn, _ = convert_dqn(ann, frames, num_steps=4, progress=False)
    with pytest.raises(ValueError, match="already a spiking Q-network"):
        convert_dqn(snn, frames, progress=False)
    with pytest.raises(ValueError, match="n_frames=0"):
        record_frames(ann, ann.get_env(), 0)


def test_convert_command_then_evaluate(smoke_run, tmp_path, capsys):
    """``spikeq convert`` on the smoke run's DQN, then ``spikeq evaluate`` on what it wrote."""
    run_dir, done = smoke_run("dqn")
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "converted"
    args = ("--frames", "200", "--num-steps", "16", "--agreement-frames", "40")
    converted = run_spikeq("convert", str(run_dir / "checkpoints" / "best.zip"), str(out), *args)
    assert converted.returncode == 0, converted.stderr[-3000:]
    assert "chose the DQN's action on" in converted.stdout
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["policy"] == "SpikingPolicy" and meta["policy_kwargs"]["neuron"] == "if"
    assert meta["config"]["game"] == "Pong"
    conversion = meta["conversion"]
    assert set(conversion["scales"]) == {"conv1", "conv2", "conv3", "fc1"}
    assert conversion["frames"] == 200 and conversion["agreement_frames"] == 40
    assert f"chose the DQN's action on {conversion['agreement']:.1%}" in converted.stdout  # the one printed

    result_file = tmp_path / "eval.json"
    evaluated = run_spikeq(
        "evaluate", str(out.with_suffix(".json")), "--episodes", "1", "--max-episode-steps", "40",
        "--out", str(result_file),
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads(result_file.read_text())
    assert result["num_steps"] == 16 and set(result["firing_rate"]) == {"conv1", "conv2", "conv3", "fc1"}
    # The DQN and its conversion side by side: spikeq table.
    assert (result["model"], result["train_seed"]) == ("dqn-converted", 0)
    assert cli.main(["table", str(run_dir), str(result_file)]) == 0
    table = capsys.readouterr().out
    assert (
        "| Pong | dqn | n/a | none | n/a | 1 | 0 |" in table
        and "| Pong | dqn-converted | n/a | none | 16 | 1 | 0 |" in table
    )

    # Bad input: one line on stderr, exit code 2 (in this process: no interpreter start-up).
    assert (
        cli.main(["convert", str(out.with_suffix(".json")), str(tmp_path / "again"), "--frames", "10"]) == 2
    )
    assert "already a spiking Q-network" in capsys.readouterr().err
    assert cli.main(["convert", str(tmp_path / "none.zip"), str(tmp_path / "x"), "--game", "Pong"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_stem_with_a_dot_keeps_it(cartpole, tmp_path):
    """``OUT`` names the pair: a dot in it (a percentile, a version) is part of the name, not a suffix
    to replace, so conversions at 99.9 and 99.99 are two pairs of files, not one overwritten."""
    ann, frames = cartpole
    for percentile in (99.9, 99.99):
        snn, _ = convert_dqn(ann, frames, num_steps=4, percentile=percentile, progress=False)
        written = export_weights(snn, tmp_path / f"cartpole-p{percentile}")
        assert written == (
            tmp_path / f"cartpole-p{percentile}.safetensors",
            tmp_path / f"cartpole-p{percentile}.json",
        )
        loaded = load_model(written[0], ann.get_env(), "cpu")
        obs, _ = snn.policy.obs_to_tensor(frames[:8])
        with torch.no_grad():
            torch.testing.assert_close(loaded.q_net(obs), snn.q_net(obs), rtol=0, atol=0)
    # A suffix of the pair's files (or of the zip it came from) still names the same pair.
    for name in ("m.safetensors", "m.json", "m.zip", "m"):
        assert weights_paths(tmp_path / name) == (tmp_path / "m.safetensors", tmp_path / "m.json")


def test_the_convert_command_refuses_a_bad_t_or_percentile_before_it_plays(pong, tmp_path, capsys):
    """One line on stderr and nothing written, before a frame is played (no progress bar of the play)."""
    ann, _ = pong
    ann.save(tmp_path / "dqn.zip")
    out = tmp_path / "converted"
    for option, value, message in (
        ("--num-steps", "5000", "num_steps=5000 is out of range; allowed: 1 to 4096"),
        ("--percentile", "150", "percentile=150.0 must lie in (0, 100]"),
    ):
        args = ["convert", str(tmp_path / "dqn.zip"), str(out), "--game", "Pong", option, value]
        assert cli.main([*args, "--frames", "50", "--agreement-frames", "0"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not list(tmp_path.glob("converted*"))
