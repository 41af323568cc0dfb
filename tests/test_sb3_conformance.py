"""SpikingPolicy through the checks Stable-Baselines3's own test suite runs on its policies.

Written after SB3's tests/test_save_load.py (save and load with every state-dict entry perturbed,
env-less load, get/set_parameters, the policy and the q_net alone, another device), test_predict.py
(one observation and a batch), test_train_eval_mode.py and test_cnn.py (image observations), with
SpikingPolicy in place of SB3's. The networks are ones that fire (a one-layer MLP on CartPole, the
Nature torso on SB3's FakeImageEnv with larger weights), so that Q depends on every parameter.
"""

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3 import DQN
from stable_baselines3.common.envs import FakeImageEnv

import spikeq  # noqa: F401  (registers "SpikingPolicy")
from spikeq import NetworkSpec, SpikingPolicy, SpikingQNetwork

SPECS = [
    dict(),
    dict(neuron="if", reset="subtract", readout="spike"),
    dict(readout="max_mem", learn_beta=True, learn_threshold=True, detach_reset=False),
]


def cartpole_model(**spec):
    policy_kwargs = dict(num_steps=4, net_arch=[64], **spec)
    return DQN(
        "SpikingPolicy", "CartPole-v1", policy_kwargs=policy_kwargs, learning_starts=50, buffer_size=1_000,
        target_update_interval=10_000, seed=0, device="cpu",
    )  # fmt: skip


def image_model():
    env = FakeImageEnv(action_dim=3, screen_height=40, screen_width=40, n_channels=2)
    model = DQN(
        "SpikingPolicy", env, policy_kwargs=dict(num_steps=4, net_arch=[32]), learning_starts=20,
        buffer_size=200, seed=0, device="cpu",
    )  # fmt: skip
    with torch.no_grad():  # the default initialisation is silent on images
        for net in (model.q_net, model.q_net_target):
            for p in net.synapses.parameters():
                p.mul_(8)
    return model


def greedy(model_or_policy, obs):
    return model_or_policy.predict(obs, deterministic=True)[0]


def observations(model, count=16):
    env = model.get_env()
    obs = [env.reset()]
    for _ in range(count - 1):
        obs.append(env.step(np.array([env.action_space.sample()]))[0])
    return np.concatenate(obs)


def perturbed(params):
    """Every tensor replaced by rand_like, as SB3's save/load tests do (beta and threshold too)."""
    return {name: {k: torch.rand_like(v) for k, v in tensors.items()} for name, tensors in params.items()}


@pytest.mark.parametrize("spec", SPECS)
def test_the_state_dict_holds_floating_point_tensors_only(spec):
    policy = cartpole_model(**spec).policy
    assert policy.state_dict() and all(t.is_floating_point() for t in policy.state_dict().values())


@pytest.mark.parametrize("model_fn", [cartpole_model, image_model], ids=["mlp", "cnn"])
def test_save_and_load_with_perturbed_parameters(tmp_path, model_fn):
    model = model_fn()
    model.learn(100)
    obs = observations(model)
    params = perturbed({k: v for k, v in model.get_parameters().items() if k == "policy"})
    model.set_parameters(params, exact_match=False)
    state = copy.deepcopy(model.policy.state_dict())
    actions, _ = model.predict(obs, deterministic=True)
    with torch.no_grad():
        q = model.q_net(model.policy.obs_to_tensor(obs)[0])
    model.save(tmp_path / "model.zip")
    env = model.get_env()
    del model

    # Loaded on the device they were saved from (bit-identical Q); test_load_on_another_device moves them.
    loads = [
        DQN.load(tmp_path / "model.zip", env=env, device="cpu"),
        DQN.load(tmp_path / "model.zip", device="cpu"),
    ]
    for loaded in loads:
        for key, value in loaded.policy.state_dict().items():
            assert torch.equal(value, state[key]), key
        assert np.array_equal(loaded.predict(obs, deterministic=True)[0], actions)
        with torch.no_grad():
            assert torch.equal(loaded.q_net(loaded.policy.obs_to_tensor(obs)[0]), q)


def test_get_and_set_parameters():
    model = cartpole_model()
    params = model.get_parameters()
    assert set(params) == {"policy", "policy.optimizer"}
    new = {**perturbed({"policy": params["policy"]}), "policy.optimizer": params["policy.optimizer"]}
    model.set_parameters(new, exact_match=True)
    for key, value in model.get_parameters()["policy"].items():
        assert torch.equal(value, new["policy"][key]), key
    with pytest.raises(ValueError, match="Names of parameters do not match"):
        model.set_parameters({"policy": new["policy"]}, exact_match=True)  # no optimizer state
    # A missing weight is an error (a missing firing_calibrated flag is not: older saves lack it).
    weight = next(key for key in new["policy"] if key.endswith("weight"))
    partial = {**new, "policy": {k: v for k, v in new["policy"].items() if k != weight}}
    with pytest.raises(RuntimeError, match="Missing key"):
        model.set_parameters(partial, exact_match=True)
    model.set_parameters(partial, exact_match=False)


def test_the_policy_and_the_q_net_save_and_load_alone(tmp_path):
    model = cartpole_model(readout="last_mem", learn_threshold=True)
    model.set_parameters(perturbed({"policy": model.get_parameters()["policy"]}), exact_match=False)
    obs = observations(model)
    model.policy.save(tmp_path / "policy.pth")
    policy = SpikingPolicy.load(tmp_path / "policy.pth", device="cpu")
    assert policy.spec == model.policy.spec
    assert np.array_equal(greedy(policy, obs), greedy(model, obs))

    torch.save(model.q_net.state_dict(), tmp_path / "q_net.pt")
    q_net = SpikingQNetwork(model.observation_space, model.action_space, model.policy.spec)
    q_net.load_state_dict(torch.load(tmp_path / "q_net.pt", weights_only=True))
    tensor = model.policy.obs_to_tensor(obs)[0]
    with torch.no_grad():
        assert torch.equal(q_net(tensor), model.q_net(tensor))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_on_another_device(tmp_path):
    model = cartpole_model()
    model.learn(100)
    obs = observations(model)
    model.save(tmp_path / "model.zip")
    loaded = DQN.load(tmp_path / "model.zip", device="cuda")
    assert next(loaded.q_net.parameters()).is_cuda
    assert np.array_equal(greedy(loaded, obs), greedy(model, obs))


def test_a_deep_copy_predicts_the_same_with_state_of_its_own():
    model = cartpole_model()
    obs = observations(model)
    policy = copy.deepcopy(model.policy)
    assert policy.q_net is not model.q_net and policy.q_net.workspace is not model.q_net.workspace
    assert np.array_equal(greedy(policy, obs), greedy(model, obs))


def test_train_and_eval_mode_give_the_same_q():
    model = cartpole_model(readout="spike")
    tensor = model.policy.obs_to_tensor(observations(model))[0]
    model.policy.set_training_mode(True)
    assert model.q_net.training
    with torch.no_grad():
        q_train = model.q_net(tensor)
    model.predict(tensor.numpy(), deterministic=True)  # SB3 predicts in eval mode
    assert not model.policy.training and not model.q_net.training
    with torch.no_grad():
        assert torch.equal(model.q_net(tensor), q_train)


@pytest.mark.parametrize("model_fn", [cartpole_model, image_model], ids=["mlp", "cnn"])
def test_predict_one_observation_and_a_batch(model_fn):
    model = model_fn()
    obs = observations(model, 5)
    batch, _ = model.predict(obs, deterministic=True)
    single, _ = model.predict(obs[0], deterministic=True)
    assert batch.shape == (5,) and np.shape(single) == ()
    assert int(single) == batch[0]
    assert all(0 <= a < model.action_space.n for a in batch)


def test_online_and_target_networks_differ_after_learning():
    model = cartpole_model(detach_reset=False)  # the target is copied every 10,000 steps only
    tensor = model.policy.obs_to_tensor(observations(model))[0]
    with torch.no_grad():
        assert torch.equal(model.q_net(tensor), model.q_net_target(tensor))
    model.learn(300)
    with torch.no_grad():
        assert not torch.allclose(model.q_net(tensor), model.q_net_target(tensor))
    changed = [
        not torch.equal(a, b)
        for a, b in zip(model.q_net.parameters(), model.q_net_target.parameters(), strict=True)
    ]
    assert all(changed)  # the MLP fires: every layer learned


def test_float_images_are_taken_as_sb3s_cnn_policy_takes_them():
    # SB3's CnnPolicy refuses float images with normalize_images=True (they would be divided by 255
    # again) and takes them with normalize_images=False; a spiking network does the same.
    space = spaces.Box(0.0, 1.0, (2, 40, 40), dtype=np.float32)
    with pytest.raises(ValueError, match="looks like an image but is float.*normalize_images=False"):
        SpikingQNetwork(space, spaces.Discrete(3), NetworkSpec())
    net = SpikingQNetwork(space, spaces.Discrete(3), NetworkSpec(num_steps=2), normalize_images=False)
    assert net.is_image and net.layer_names[0] == "conv1"
    with pytest.raises(ValueError, match="looks like an image but is float"):
        DQN("SpikingPolicy", FloatImageEnv(), buffer_size=10, device="cpu")
    model = DQN(
        "SpikingPolicy", FloatImageEnv(), buffer_size=10, device="cpu",
        policy_kwargs=dict(num_steps=2, normalize_images=False),
    )  # fmt: skip
    assert model.q_net.is_image and model.predict(FloatImageEnv().reset()[0])[0].shape == ()


class FloatImageEnv(gym.Env):
    """Channel-first float images in [0, 1] (already normalised), three actions."""

    observation_space = spaces.Box(0.0, 1.0, (2, 40, 40), dtype=np.float32)
    action_space = spaces.Discrete(3)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


def test_graded_spikes_are_refused_and_old_state_dicts_still_load():
    net = SpikingQNetwork(spaces.Box(-1, 1, (4,)), spaces.Discrete(2), NetworkSpec(num_steps=2))
    # State dicts saved before the integer reset code and the spike factor left the state dict
    old = dict(net.state_dict())
    for i in range(len(net.neurons)):
        old[f"neurons.{i}.leaky.reset_mechanism_val"] = torch.tensor(1)
        old[f"neurons.{i}.leaky.graded_spikes_factor"] = torch.tensor(1.0)
    net.load_state_dict(old)
    old["neurons.0.leaky.graded_spikes_factor"] = torch.tensor(0.5)
    with pytest.raises(ValueError, match="graded_spikes_factor=0.5 is not supported"):
        net.load_state_dict(old)
    old["neurons.0.leaky.graded_spikes_factor"] = torch.tensor(1.0)
    old["neurons.0.leaky.reset_mechanism_val"] = torch.tensor(0)
    with pytest.raises(ValueError, match="reset_mechanism_val=0 is not this layer's 1"):
        net.load_state_dict(old)
