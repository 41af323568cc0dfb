"""SpikingPolicy inside Stable-Baselines3's DQN: construction by name, learning, save/load, state."""

import ale_py
import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import DQN
from stable_baselines3.common.env_util import make_atari_env
from stable_baselines3.common.vec_env import VecFrameStack

import spikeq  # noqa: F401  (registers "SpikingPolicy")
from spikeq import SpikingPolicy, SpikingQNetwork

gym.register_envs(ale_py)


def cartpole_model(**policy_kwargs):
    return DQN("SpikingPolicy", "CartPole-v1", policy_kwargs=policy_kwargs, buffer_size=1000, seed=0)


def test_policy_is_registered_by_name_and_takes_network_kwargs():
    model = cartpole_model(num_steps=8, neuron="if", readout="max_mem", net_arch=[32, 16])
    assert isinstance(model.policy, SpikingPolicy)
    for net in (model.q_net, model.q_net_target):
        assert isinstance(net, SpikingQNetwork)
        assert net.spec.num_steps == 8 and net.spec.neuron == "if" and net.spec.readout == "max_mem"
        assert [s.out_features for s in (net.synapses[0][-1], net.synapses[1])] == [32, 16]
    assert model.q_net is not model.q_net_target


def test_defaults_are_the_papers_dsqn():
    spec = cartpole_model().policy.spec
    assert (spec.num_steps, spec.neuron, spec.tau, spec.threshold, spec.reset) == (
        64,
        "lif",
        2.0,
        1.0,
        "zero",
    )
    assert (spec.surrogate, spec.encoder, spec.readout) == ("atan", "direct", "rate")


def test_online_and_target_networks_share_no_state():
    model = cartpole_model(num_steps=16)
    obs = torch.rand(32, 4) - 0.5
    with torch.no_grad():
        online = model.q_net(obs)
        model.q_net_target(obs[:3])  # another batch size through the other network
        single = torch.cat([model.q_net(obs[i : i + 1]) for i in range(32)])
        again = model.q_net(obs)
    assert torch.equal(online, again)
    torch.testing.assert_close(single, online)


def test_save_and_load_round_trip(tmp_path):
    model = cartpole_model(num_steps=8, readout="spike", surrogate="sigmoid", surrogate_slope=10.0)
    model.learn(200)
    model.save(tmp_path / "model.zip")
    loaded = DQN.load(tmp_path / "model.zip")
    obs = torch.rand(16, 4) - 0.5
    with torch.no_grad():
        assert torch.equal(model.q_net(obs), loaded.q_net(obs))
        assert torch.equal(model.q_net_target(obs), loaded.q_net_target(obs))
    assert loaded.policy.spec == model.policy.spec
    assert loaded.policy_kwargs == model.policy_kwargs


def test_policy_alone_saves_and_loads(tmp_path):
    policy = cartpole_model(num_steps=4, readout="last_mem", learn_threshold=True).policy
    policy.save(tmp_path / "policy.pth")
    loaded = SpikingPolicy.load(tmp_path / "policy.pth")
    assert loaded.spec == policy.spec
    for a, b in zip(policy.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_unknown_policy_kwargs_are_named():
    with pytest.raises(
        ValueError, match="unknown SpikingPolicy argument\\(s\\) timesteps; allowed: .*num_steps"
    ):
        cartpole_model(timesteps=8)


def test_non_discrete_action_space_is_refused():
    with pytest.raises(ValueError, match="needs spaces.Discrete"):
        SpikingPolicy(gym.spaces.Box(-1, 1, (4,)), gym.spaces.Box(-1, 1, (2,)), lambda _: 1e-3)


def test_atari_pong_learns_through_the_nature_torso():
    env = VecFrameStack(make_atari_env("PongNoFrameskip-v4", n_envs=2, seed=0), n_stack=4)
    model = DQN(
        "SpikingPolicy",
        env,
        policy_kwargs=dict(num_steps=4),
        buffer_size=500,
        learning_starts=64,
        batch_size=8,
        train_freq=8,
        seed=0,
    )
    model.learn(200)
    assert model.num_timesteps >= 200 and model._n_updates > 0  # it trained, not only acted
    obs = env.reset()  # [n_envs, 84, 84, 4]
    obs_tensor, _ = model.policy.obs_to_tensor(obs)
    with torch.no_grad():
        q = model.q_net(obs_tensor)
    assert q.shape == (2, 6)
    assert torch.isfinite(q).all()
    actions, _ = model.predict(obs, deterministic=True)
    assert actions.shape == (2,) and np.all((0 <= actions) & (actions < 6))
    env.close()
