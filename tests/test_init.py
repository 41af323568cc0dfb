"""Firing-aware initialisation: a DSQN built with PyTorch's initialisation is silent on Atari frames;
``init="firing"`` makes every spiking layer fire from the first training batch on, and stays the same
network when saved, loaded or exported. Firing telemetry: ``FiringMonitor``'s rates and warnings."""

import warnings

import numpy as np
import pytest
import torch
from stable_baselines3 import DQN

from spikeq.analysis import weights
from spikeq.envs import atari
from spikeq.experiment.tracking import FiringMonitor
from spikeq.snn.network import SpikingQNetwork
from spikeq.snn.readout import READOUTS


def play(game: str, n_frames: int, seed: int = 0) -> tuple:
    """The paper's training env for ``game`` and ``n_frames`` observations of random play."""
    env = atari.make_env(game, n_envs=1, seed=seed)
    env.action_space.seed(seed)
    obs, frames = env.reset(), []
    for _ in range(n_frames * 4):  # every 4th: frames that differ
        obs, _, _, _ = env.step(np.array([env.action_space.sample()]))
        frames.append(obs[0])
    return env, np.stack(frames[3::4])


@pytest.fixture(scope="module")
def breakout():
    env, frames = play("Breakout", 16)
    yield env, frames
    env.close()


def dqn(env, batch_size: int = 16, **policy_kwargs) -> DQN:
    """A DQN whose first update comes right after its first batch is in replay."""
    return DQN(
        "SpikingPolicy",
        env,
        policy_kwargs=policy_kwargs,
        buffer_size=200,
        learning_starts=batch_size,
        batch_size=batch_size,
        train_freq=1,
        seed=0,
    )


def rates_and_q(model: DQN, frames: np.ndarray) -> tuple[dict[str, float], torch.Tensor]:
    """Every spiking layer's firing rate (fraction of its neuron-steps) on ``frames``, and Q."""
    q_net: SpikingQNetwork = model.q_net
    obs, _ = model.policy.obs_to_tensor(frames)
    with torch.no_grad(), q_net.record() as activity:
        q = q_net(obs)
    return {a.name: float(a.spikes.mean()) for a in activity if a.spikes is not None}, q


def test_pytorchs_initialisation_is_silent_on_breakout_frames(breakout):
    env, frames = breakout
    model = dqn(env, num_steps=8, init="default")
    rates, q = rates_and_q(model, frames)
    assert rates["conv1"] < 0.001
    assert rates["conv2"] == rates["conv3"] == rates["fc1"] == 0.0
    assert torch.equal(q, q[:1].expand_as(q))  # the same Q for every frame: fc2's bias


@pytest.mark.parametrize("readout", READOUTS)
@pytest.mark.parametrize("neuron", ["lif", "if"])
@pytest.mark.parametrize("num_steps", [8, 64])
def test_firing_init_fires_on_breakout_frames_from_the_first_update(breakout, num_steps, neuron, readout):
    env, frames = breakout
    # T = 64 through the full Nature CNN is slow on a CPU: calibrate on a smaller batch.
    model = dqn(
        env, batch_size=16 if num_steps == 8 else 8, num_steps=num_steps, neuron=neuron, readout=readout
    )
    assert model.q_net.needs_calibration
    model.learn(model.learning_starts + 1)  # one update, on the first batch sampled
    assert model._n_updates == 1 and not model.q_net.needs_calibration
    rates, q = rates_and_q(model, frames)  # frames of another episode than the calibration batch
    expected = ["conv1", "conv2", "conv3", "fc1", *(["fc2"] if readout == "spike" else [])]
    assert list(rates) == expected
    for name, rate in rates.items():
        assert 0.01 <= rate <= 0.5, (name, rates)
    assert (q - q[:1]).abs().amax() > 0  # Q differs across frames


@pytest.mark.parametrize(
    "encoder,engine", [("poisson", "fused"), ("direct", "snntorch"), ("poisson", "snntorch")]
)
def test_firing_init_with_either_encoder_and_engine(breakout, encoder, engine):
    env, frames = breakout
    model = dqn(env, num_steps=8, encoder=encoder, engine=engine)
    model.learn(model.learning_starts + 1)
    rates, q = rates_and_q(model, frames)
    assert all(0.01 <= rate <= 0.5 for rate in rates.values()), rates
    assert (q - q[:1]).abs().amax() > 0


def test_calibration_hits_the_target_rate_on_its_batch_for_an_mlp():
    model = DQN("SpikingPolicy", "CartPole-v1", policy_kwargs=dict(num_steps=16, net_arch=[64, 32]))
    obs = torch.randn(256, 4)
    rates = model.q_net.calibrate_firing(obs, target_rate=0.2)
    assert list(rates) == ["fc1", "fc2"]
    for rate in rates.values():
        assert rate == pytest.approx(0.2, rel=0.1)
    with torch.no_grad(), model.q_net.record() as activity:
        model.q_net(obs)
    assert [float(a.spikes.mean()) for a in activity if a.spikes is not None] == pytest.approx(
        list(rates.values()), rel=0.05
    )
    with pytest.raises(ValueError, match="target_rate=1.5 must lie in \\(0, 1\\)"):
        model.q_net.calibrate_firing(obs, target_rate=1.5)


def test_the_first_training_forward_calibrates_and_the_target_gets_the_same_weights(breakout):
    env, frames = breakout
    model = dqn(env, num_steps=8)
    obs, _ = model.policy.obs_to_tensor(frames)
    before = {k: v.clone() for k, v in model.q_net.state_dict().items()}
    with torch.no_grad():
        model.q_net.set_training_mode(False)
        model.q_net(obs)  # acting does not calibrate
        assert model.q_net.needs_calibration
        model.q_net.set_training_mode(True)
        model.q_net(obs)  # the first training batch does
    after = model.q_net.state_dict()
    assert float(after["firing_calibrated"]) == 1.0
    assert not torch.equal(after["synapses.0.weight"], before["synapses.0.weight"])
    for key, value in model.q_net_target.state_dict().items():
        assert torch.equal(value, after[key]), key
    model.q_net(obs)  # once only
    assert torch.equal(model.q_net.state_dict()["synapses.0.weight"], after["synapses.0.weight"])


def test_a_saved_loaded_or_exported_network_is_never_calibrated_again(breakout, tmp_path):
    env, frames = breakout
    model = dqn(env, num_steps=8)
    model.learn(model.learning_starts + 2)
    model.save(tmp_path / "model.zip")
    weights.export_weights(model, tmp_path / "best")
    obs, _ = model.policy.obs_to_tensor(frames)
    with torch.no_grad():
        expected = model.q_net(obs)
    for loaded in (
        DQN.load(tmp_path / "model.zip", env=env),  # what a resumed run does
        weights.load_model(tmp_path / "model.zip", env, "cpu"),
        weights.load_model(tmp_path / "best.safetensors", env, "cpu"),
    ):
        assert loaded.policy.spec.init == "firing" and not loaded.q_net.needs_calibration
        with torch.no_grad():
            assert torch.equal(loaded.q_net(obs), expected)
            loaded.q_net.set_training_mode(True)  # a training batch: no second calibration
            loaded.q_net(obs)
            loaded.q_net.set_training_mode(False)
            assert torch.equal(loaded.q_net(obs), expected)


def test_networks_saved_before_the_flag_existed_load_as_calibrated(breakout):
    env, _ = breakout
    state = dqn(env, num_steps=8).q_net.state_dict()
    del state["firing_calibrated"]
    q_net = dqn(env, num_steps=8).q_net
    q_net.load_state_dict(state)  # strict, as SB3 loads
    assert not q_net.needs_calibration


def firing_warnings(init: str) -> list[str]:
    env, _ = play("Pong", 1)
    model = dqn(env, batch_size=8, num_steps=4, init=init)
    monitor = FiringMonitor(stretch=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.learn(model.learning_starts + 12, callback=monitor)
    env.close()
    assert monitor.updates == 12
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_a_silent_network_is_named_on_the_console():
    messages = firing_warnings("default")  # PyTorch's initialisation on Pong frames
    fc1 = [m for m in messages if m.startswith("spiking layer fc1 fired in none of its neuron-steps")]
    assert len(fc1) == 1  # once per stretch
    assert "last 10 updates (updates 1 to 10)" in fc1[0] and "--init firing" in fc1[0]


def test_a_saturated_layer_gets_advice_for_saturation():
    # Above a rate of 0 every firing layer counts as saturated: under PyTorch's initialisation the
    # MLP's first layer fires on CartPole's observations, and the advice must not be a silent layer's.
    model = DQN(
        "SpikingPolicy",
        "CartPole-v1",
        learning_starts=16,
        batch_size=8,
        train_freq=1,
        policy_kwargs=dict(init="default", num_steps=4, net_arch=[16]),
        seed=0,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.learn(40, callback=FiringMonitor(stretch=5, saturated_rate=0.0))
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    fc1 = [m for m in messages if m.startswith("spiking layer fc1 fired in more than 0%")]
    assert len(fc1) == 1 and "try --init firing (every layer starts at 10% firing)" in fc1[0], messages


def test_a_firing_network_raises_no_warning():
    assert firing_warnings("firing") == []


def test_firing_monitor_arguments_and_models_it_cannot_watch():
    with pytest.raises(ValueError, match="stretch=0 must be an integer >= 1"):
        FiringMonitor(stretch=0)
    ann = DQN("MlpPolicy", "CartPole-v1", learning_starts=0)
    with pytest.raises(
        ValueError, match="FiringMonitor watches spiking Q-networks; this model's is a QNetwork"
    ):
        ann.learn(10, callback=FiringMonitor())
