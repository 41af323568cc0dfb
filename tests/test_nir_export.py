"""NIR export: trained spiking Q-networks (a CartPole MLP trained with SB3, a Pong DSQN) written as NIR
graphs, read back with ``nir.read`` and simulated from the file, choose the policy's actions."""

import json

import nir
import numpy as np
import pytest
import torch
from conftest import run_spikeq
from stable_baselines3 import DQN
from stable_baselines3.common.env_util import make_vec_env

from spikeq import cli
from spikeq.analysis.convert import convert_dqn, record_frames
from spikeq.analysis.nir_export import DEFAULT_DT, NirSimulator, action_names, export_nir, verify_nir
from spikeq.analysis.weights import export_weights
from spikeq.envs import atari
from spikeq.snn.engine import over_time
from spikeq.snn.network import SpikingQNetwork

NUM_STEPS = 8
FRAMES = 300
# Largest |Q_nir - Q| allowed, relative to 1 + max |Q|: the file holds the same float32 weights, only
# the order of the additions differs (the rate readout sums W s[t] + b over t instead of W mean(s) + b).
Q_TOLERANCE = 1e-5


def train_cartpole(neuron: str, readout: str, steps: int = 4000) -> tuple[DQN, np.ndarray]:
    """A DSQN trained briefly on CartPole with SB3, and observations it played."""
    env = make_vec_env("CartPole-v1", n_envs=1, seed=0)
    model = DQN(
        "SpikingPolicy",
        env,
        policy_kwargs=dict(num_steps=NUM_STEPS, neuron=neuron, readout=readout),
        learning_rate=1e-3,
        learning_starts=500,
        buffer_size=steps,
        seed=0,
        device="cpu",
    )
    model.learn(steps)
    return model, record_frames(model, env, FRAMES, progress=False)


@pytest.fixture(scope="module")
def cartpole():
    """``cartpole(neuron, readout)``: ``train_cartpole``, once per module and configuration."""
    trained: dict[tuple[str, str], tuple[DQN, np.ndarray]] = {}

    def get(neuron: str, readout: str) -> tuple[DQN, np.ndarray]:
        if (neuron, readout) not in trained:
            trained[neuron, readout] = train_cartpole(neuron, readout)
        return trained[neuron, readout]

    return get


def scale_to_fire(q_net: SpikingQNetwork, obs: torch.Tensor, quantile: float = 0.9) -> None:
    """Rescale each layer's weights so that a tenth of its input currents cross the threshold (the
    default initialisation is silent on Atari frames), layer by layer from the input."""
    for i, synapse in enumerate(q_net.synapses):
        with torch.no_grad(), q_net.record() as activity:
            q_net(obs)
            current = over_time(synapse, activity[i].inputs) * q_net.neurons[i].input_scale
            sample = current.flatten()[:: max(1, current.numel() // 100_000)]
            factor = q_net.spec.threshold / float(torch.quantile(sample, quantile))
            for parameter in synapse.parameters():
                parameter.mul_(factor)


def pong_dsqn(neuron: str, readout: str, encoder: str = "direct") -> tuple[DQN, np.ndarray]:
    """A Pong DSQN whose every layer fires, and Pong frames it played (not those it was scaled on)."""
    env = atari.make_env("Pong", n_envs=1, seed=0, train=False)
    policy_kwargs = dict(num_steps=NUM_STEPS, neuron=neuron, readout=readout, encoder=encoder)
    model = DQN("SpikingPolicy", env, policy_kwargs=policy_kwargs, buffer_size=1, seed=0, device="cpu")
    scale_to_fire(model.q_net, model.q_net.obs_to_tensor(record_frames(model, env, 100, progress=False))[0])
    return model, record_frames(model, env, FRAMES, seed=1, progress=False)


def assert_every_layer_fires(model: DQN, frames: np.ndarray) -> None:
    counts = model.q_net.spike_counts(model.q_net.obs_to_tensor(frames[:64])[0])
    assert all(counts[name] > 0 for name in model.q_net.layer_names), counts


def assert_same_policy(check: dict) -> None:
    assert check["observations"] == FRAMES
    assert check["agreement"] >= 0.99, check
    assert check["max_q_diff"] <= Q_TOLERANCE * (1 + check["q_scale"]), check


def assert_snntorch_reads_the_same_spikes(check: dict) -> None:
    """snnTorch's own importer, on the hidden LIF layers, reproduces the last hidden layer's spikes."""
    torso = check["snntorch_torso"]
    assert isinstance(torso, dict) and torso["spikes"] > 0 and torso["differing"] == 0, torso


@pytest.mark.parametrize(
    ("neuron", "readout"),
    [("lif", "rate"), ("lif", "spike"), ("lif", "last_mem"), ("if", "mean_mem")],
)
def test_trained_cartpole_policy_runs_the_same_from_the_nir_file(neuron, readout, cartpole, tmp_path):
    model, frames = cartpole(neuron, readout)
    assert_every_layer_fires(model, frames)

    result = export_nir(model, tmp_path / "cartpole.nir")

    graph = nir.read(result.path)
    spiking = nir.LIF if neuron == "lif" else nir.IF
    assert [type(graph.nodes[name]) for name in ("fc1", "fc1_" + neuron, "fc2", "fc2_" + neuron, "fc3")] == [
        nir.Affine,
        spiking,
        nir.Affine,
        spiking,
        nir.Affine,
    ]
    assert graph.metadata["readout"] == readout and graph.metadata["num_steps"] == NUM_STEPS
    check = verify_nir(result.path, model, frames)
    assert_same_policy(check)
    if neuron == "lif":
        assert_snntorch_reads_the_same_spikes(check)
    else:  # snnTorch's importer would make IF neurons leaky (beta 0.9)
        assert "cannot read IF" in check["snntorch_torso"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_model_on_the_gpu_is_exported_from_a_cpu_copy(cartpole, tmp_path):
    model, frames = cartpole("lif", "rate")
    model.policy.to("cuda")
    try:
        check = verify_nir(export_nir(model, tmp_path / "gpu.nir").path, model, frames)
        assert_same_policy(check)
        assert next(model.policy.parameters()).device.type == "cuda"  # the caller's model stays there
    finally:
        model.policy.to("cpu")


@pytest.mark.parametrize(("neuron", "readout"), [("lif", "rate"), ("if", "max_mem")])
def test_pong_dsqn_runs_the_same_from_the_nir_file(neuron, readout, tmp_path):
    model, frames = pong_dsqn(neuron, readout)
    assert_every_layer_fires(model, frames)
    env = atari.make_env("Pong", n_envs=1, train=False)

    result = export_nir(model, tmp_path / "pong.nir", action_names=action_names(env))

    graph = nir.read(result.path)
    conv1 = graph.nodes["conv1"]
    assert isinstance(conv1, nir.Conv2d) and conv1.weight.shape == (32, 4, 8, 8)
    assert list(conv1.stride) == [4, 4] and list(graph.nodes[f"conv1_{neuron}"].v_threshold.shape) == [
        32,
        20,
        20,
    ]
    assert list(graph.nodes["fc1_flatten"].output_type["output"]) == [3136]
    assert json.loads(graph.metadata["action_names"]) == [
        "NOOP",
        "FIRE",
        "RIGHT",
        "LEFT",
        "RIGHTFIRE",
        "LEFTFIRE",
    ]
    assert graph.metadata["input_scale"] == pytest.approx(1 / 255)
    assert graph.metadata["q_reduce"] == ("max" if readout == "max_mem" else "last")
    check = verify_nir(result.path, model, frames)
    assert_same_policy(check)
    if neuron == "lif":
        assert_snntorch_reads_the_same_spikes(check)


def test_poisson_input_is_left_to_the_host_and_checked_on_shared_spike_trains(tmp_path):
    model, frames = pong_dsqn("lif", "rate", encoder="poisson")
    assert_every_layer_fires(model, frames)

    result = export_nir(model, tmp_path / "pong-poisson.nir")

    assert any("poisson" in note for note in result.notes)
    assert nir.read(result.path).metadata["input_encoding"] == "poisson"
    # Both networks see the same Bernoulli draws, so they agree exactly.
    check = verify_nir(result.path, model, frames, seed=3)
    assert_same_policy(check)
    assert_snntorch_reads_the_same_spikes(check)


def test_the_paper_lif_maps_to_nir_parameters_by_the_euler_step(tmp_path):
    model = DQN(
        "SpikingPolicy",
        "CartPole-v1",
        policy_kwargs=dict(num_steps=NUM_STEPS, tau=2.0, readout="rate"),
        buffer_size=1,
        device="cpu",
    )
    graph = nir.read(export_nir(model, tmp_path / "paper.nir").path)
    lif = graph.nodes["fc1_lif"]
    # tau dv/dt = -v + R I, Euler step dt: v += dt/tau (-v + R I) = V + (I - V) / 2, the paper's tau = 2.
    np.testing.assert_allclose(lif.tau, 2 * DEFAULT_DT)
    np.testing.assert_allclose(lif.r, 1.0)
    np.testing.assert_allclose(lif.v_leak, 0.0)
    np.testing.assert_allclose(lif.v_threshold, 1.0)
    np.testing.assert_allclose(lif.v_reset, 0.0)
    # The rate readout integrates fc3's output with dt R = 1/T: Q = W mean(s) + b after step T.
    np.testing.assert_allclose(graph.nodes["rate"].r * DEFAULT_DT, 1 / NUM_STEPS)
    assert graph.metadata["dt"] == DEFAULT_DT and graph.metadata["reset"] == "zero"

    if_model = DQN(
        "SpikingPolicy", "CartPole-v1", policy_kwargs=dict(neuron="if"), buffer_size=1, device="cpu"
    )
    if_node = nir.read(export_nir(if_model, tmp_path / "if.nir", dt=1e-3).path).nodes["fc1_if"]
    # dv/dt = R I, Euler step dt: v += dt R I = V + I.
    np.testing.assert_allclose(if_node.r, 1e3)


def test_simulating_with_another_time_step_changes_the_policy(cartpole, tmp_path):
    model, frames = cartpole("lif", "rate")
    graph = nir.read(export_nir(model, tmp_path / "cartpole.nir").path)
    obs = model.q_net.obs_to_tensor(frames)[0]
    with torch.no_grad():
        q = model.q_net(obs)

    right = NirSimulator(graph).q_values(obs)
    wrong = NirSimulator(graph, dt=2 * DEFAULT_DT).q_values(obs)

    torch.testing.assert_close(right, q, rtol=0, atol=Q_TOLERANCE * (1 + float(q.abs().max())))
    # Twice the time step: no leak memory (dt / tau = 1) and the full current enters, so spikes change.
    assert float((wrong - q).abs().max()) > 0.01


def test_a_converted_dqn_soft_reset_is_written_as_a_threshold_fed_back_to_its_membrane(tmp_path):
    env = make_vec_env("CartPole-v1", n_envs=1, seed=0)
    ann = DQN("MlpPolicy", env, buffer_size=1, seed=0, device="cpu")
    frames = record_frames(ann, env, 2 * FRAMES, progress=False)
    snn, _ = convert_dqn(ann, frames[:FRAMES], num_steps=NUM_STEPS, progress=False)  # IF, subtract reset
    assert_every_layer_fires(snn, frames[FRAMES:])

    result = export_nir(snn, tmp_path / "converted.nir")

    graph = nir.read(result.path)
    assert isinstance(graph.nodes["fc1_i"], nir.I) and isinstance(graph.nodes["fc1_threshold"], nir.Threshold)
    assert ("fc1_threshold", "fc1_reset") in graph.edges and ("fc1_reset", "fc1_i") in graph.edges
    np.testing.assert_allclose(graph.nodes["fc1_reset"].scale, -1.0)  # one threshold per spike
    assert any("subtract reset" in note for note in result.notes)
    assert_same_policy(verify_nir(result.path, snn, frames[FRAMES:]))


def test_cli_exports_and_verifies_a_checkpoint(cartpole, tmp_path, capsys):
    model, _ = cartpole("lif", "rate")
    model.save(tmp_path / "dsqn.zip")
    (weights, _) = export_weights(model, tmp_path / "dsqn")

    done = run_spikeq(
        "export-nir",
        str(tmp_path / "dsqn.zip"),
        str(tmp_path / "dsqn.nir"),
        "--verify",
        "--game",
        "CartPole-v1",
    )
    assert done.returncode == 0, done.stderr
    assert "fc1 -> fc1_lif -> fc2 -> fc2_lif -> fc3 -> rate -> output" in done.stdout
    assert "simulate with that dt" in done.stdout
    assert "same greedy action on 100.0%" in done.stdout, done.stdout
    assert "import_from_nir of the hidden layers: 0 of" in done.stdout, done.stdout

    # The weights-only format (no pickles) exports the same graph.
    assert cli.main(["export-nir", str(weights), str(tmp_path / "weights.nir")]) == 0
    assert "wrote" in capsys.readouterr().out
    a, b = nir.read(tmp_path / "dsqn.nir"), nir.read(tmp_path / "weights.nir")
    np.testing.assert_array_equal(a.nodes["fc1"].weight, b.nodes["fc1"].weight)


def test_cli_refuses_an_ann_dqn_and_a_corrupt_file_with_one_line(tmp_path, capsys):
    ann = DQN("MlpPolicy", make_vec_env("CartPole-v1", n_envs=1), buffer_size=1, device="cpu")
    ann.save(tmp_path / "dqn.zip")
    export_weights(ann, tmp_path / "dqn")
    (tmp_path / "corrupt.zip").write_bytes(b"PK\x03\x04 truncated")
    (tmp_path / "corrupt.json").write_text("{not json")
    snn = DQN("SpikingPolicy", make_vec_env("CartPole-v1", n_envs=1), buffer_size=1, device="cpu")
    _, meta = export_weights(snn, tmp_path / "huge-t")
    data = json.loads(meta.read_text())
    data["policy_kwargs"]["num_steps"] = 10**9  # checked before a network is built for it
    meta.write_text(json.dumps(data))

    cases = {
        "huge-t.json": "num_steps=1000000000; allowed: 1 to 4096",
        "dqn.json": "holds a MlpPolicy (an ANN DQN)",
        "corrupt.zip": "is not a readable SB3 DQN checkpoint",
        "corrupt.json": "is not readable JSON",
        "missing.zip": "does not exist",
    }
    for name, reason in cases.items():
        assert cli.main(["export-nir", str(tmp_path / name), str(tmp_path / "out.nir")]) == 2, name
        out, err = capsys.readouterr()
        assert err.count("\n") == 1 and reason in err and out == "", (name, err)

    done = run_spikeq("export-nir", str(tmp_path / "dqn.zip"), str(tmp_path / "out.nir"))
    assert done.returncode == 2
    assert done.stderr.startswith("spikeq export-nir: error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "holds a DQNPolicy (an ANN DQN), not a spiking Q-network" in done.stderr
    assert not (tmp_path / "out.nir").exists()
