"""The reset's gradient (``detach_reset``) against an independent float64 implementation of SpikingJelly's
equations, and against SpikingJelly itself where it is installed.

The forward pass is the paper's LIF (SpikingJelly ``LIFNode``, ``decay_input=True``, v_reset = 0):

    H[t] = V[t-1] + (X[t] - V[t-1]) / tau      (IF: H[t] = V[t-1] + X[t])
    S[t] = Heaviside(H[t] - v_th)             (ATan surrogate backward, alpha = 2)
    V[t] = H[t] (1 - S[t]) + v_reset S[t]     (zero reset)

and the two settings differ only in the backward: with ``detach_reset=True`` the S[t] of the reset is
a constant (dV/dH = 1 - S[t], snnTorch's ``Leaky``); with ``detach_reset=False`` the gradient also flows
through it (dV/dH = 1 - S[t] + (v_reset - H[t]) sg'(H[t] - v_th), SpikingJelly's default and the paper's
code). The soft reset is snnTorch's, which removes the threshold after the decay,
H[t] = V[t-1] + (X[t] - V[t-1]) / tau - S[t-1] v_th, with the gradient through S[t-1] or not.

The reference below runs these equations step by step with autograd, the surrogate as its own
autograd function; spikeq's fused engine computes the same gradients with its adjoint recurrence.
"""

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3 import DQN

from spikeq import NetworkSpec, NeuronSpec, SpikingLayer, SpikingQNetwork, cli
from spikeq.envs import atari
from spikeq.experiment.config import ConfigError, resolve
from spikeq.snn.engine import torch_backend
from spikeq.snn.readout import READOUTS

NEURON_RESETS = [("lif", "zero"), ("if", "zero"), ("lif", "subtract"), ("if", "subtract")]
ALPHA = 2.0


class ATanSpike(torch.autograd.Function):
    """Heaviside(x) forward (x > 0, as snnTorch; SpikingJelly fires at x >= 0, which differs only at
    x = 0 exactly), ATan backward: sg'(x) = alpha / 2 / (1 + (pi / 2 * alpha * x)^2)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (ALPHA / 2) / (1 + (math.pi / 2 * ALPHA * x) ** 2)


class ReferenceNeurons:
    """One layer of the equations above, one step per call; beta and v_th may be learnable tensors."""

    def __init__(self, neuron, reset, detach_reset, tau=2.0, beta=None, threshold=1.0, fire=True):
        self.neuron, self.reset, self.detach_reset, self.fire = neuron, reset, detach_reset, fire
        self.tau, self.beta, self.threshold = tau, beta, threshold
        self.h = self.s = 0.0  # H[t-1], S[t-1]

    def step(self, x):
        s = self.s.detach() if self.detach_reset and torch.is_tensor(self.s) else self.s
        v = self.h * (1 - s) if self.reset == "zero" else self.h  # V[t-1]
        if self.beta is not None:  # the same equations with a learnable decay
            h = self.beta * v + (x / self.tau if self.neuron == "lif" else x)
        elif self.neuron == "lif":
            h = v + (x - v) / self.tau
        else:
            h = v + x
        if self.reset == "subtract":
            h = h - s * self.threshold
        self.h = h
        self.s = ATanSpike.apply(h - self.threshold) if self.fire else 0.0 * h
        return self.s, h


def reference_network(net, obs, detach_reset):
    """Q and every layer's spikes of ``net``'s weights by the equations above, every layer at every step."""
    spec = net.spec
    # SB3's preprocessing makes observations float32 (images divided by 255), before the network's float64
    x = (obs.float() / 255 if net.is_image else obs.float()).to(net.readout.linear.weight.dtype)
    layers = [ReferenceNeurons(spec.neuron, spec.reset, detach_reset, spec.tau) for _ in net.synapses]
    out = ReferenceNeurons(spec.neuron, spec.reset, detach_reset, spec.tau, fire=spec.readout == "spike")
    static_current = net.synapses[0](x)  # direct input: conv1 once, the same current at every step
    spikes = [[] for _ in layers]
    out_spikes, out_mem = [], []
    for _ in range(spec.num_steps):
        s = static_current
        for i, layer in enumerate(layers):
            s, _ = layer.step(s if i == 0 else net.synapses[i](s))
            spikes[i].append(s)
        s_out, h_out = out.step(net.readout.linear(s))
        out_spikes.append(s_out)
        out_mem.append(h_out)
    last = torch.stack(spikes[-1])
    mem = torch.stack(out_mem)
    q = {
        "rate": lambda: net.readout.linear(last.mean(0)),
        "spike": lambda: torch.stack(out_spikes).mean(0),
        "max_mem": lambda: mem.max(0).values,
        "last_mem": lambda: mem[-1],
        "mean_mem": lambda: mem.mean(0),
    }[spec.readout]()
    return q, [torch.stack(s) for s in spikes]


def q_and_grads(q, params):
    """Q and the gradients of a fixed random loss on it."""
    weights = torch.randn(q.shape, generator=torch.Generator().manual_seed(2), dtype=q.dtype)
    grads = torch.autograd.grad((q * weights).sum(), params, allow_unused=True)
    return q.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def assert_grads_match(grads, expected):
    for got, want in zip(grads, expected, strict=True):
        scale = float(want.abs().max()) if want.numel() else 1.0
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11 * max(scale, 1e-300))


def atari_frames(game, count=4):
    """``count`` channel-first frame stacks of real play (random actions) in the paper's evaluation env."""
    env = atari.make_env(game, n_envs=1, seed=0, train=False)
    env.reset()
    rng = np.random.default_rng(0)
    frames = []
    for step in range(1, 12 * count + 1):
        obs, _, _, _ = env.step(rng.integers(0, env.action_space.n, 1))
        if step % 12 == 0:
            frames.append(obs)
    env.close()
    return torch.as_tensor(np.concatenate(frames)).permute(0, 3, 1, 2)  # [B, 4, 84, 84] uint8


@pytest.fixture(scope="module")
def frames():
    return {"Breakout": atari_frames("Breakout"), "Pong": atari_frames("Pong")}


IMAGE_SPACE = spaces.Box(0, 255, (4, 84, 84), dtype=np.uint8)
VECTOR_SPACE = spaces.Box(-1.0, 1.0, (6,), dtype=np.float32)


def firing_network(observation_space, scale, **spec):
    """A float64 network whose every layer fires: PyTorch's default init is silent on Atari frames."""
    torch.manual_seed(0)
    net = SpikingQNetwork(observation_space, spaces.Discrete(4), NetworkSpec(**spec)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return net


def check_network(net, obs, detach_reset):
    params = list(net.parameters())
    with net.record() as activity:
        q, grads = q_and_grads(net(obs), params)
    spikes = [a.spikes for a in activity if a.spikes is not None]
    expected_q, expected_spikes = reference_network(net, obs, detach_reset)
    _, expected_grads = q_and_grads(expected_q, params)
    assert len(spikes) >= len(expected_spikes) > 0  # the hidden layers (a spiking output layer after them)
    for got, want in zip(spikes[: len(expected_spikes)], expected_spikes, strict=True):
        assert torch.equal(got, want.detach())
        assert 0.01 < float(got.mean()) < 0.6  # every layer fires: the gradients mean something
    torch.testing.assert_close(q, expected_q.detach(), rtol=1e-12, atol=1e-12)
    assert_grads_match(grads, expected_grads)
    assert all(float(g.abs().sum()) > 0 for g in grads)  # every parameter gets a gradient
    return grads


@pytest.mark.parametrize("readout", READOUTS)
@pytest.mark.parametrize("neuron,reset", NEURON_RESETS)
@pytest.mark.parametrize("game", ["Breakout", "Pong"])
def test_dsqn_on_atari_frames_equals_spikingjelly_equations(frames, game, neuron, reset, readout):
    # The paper's torso (fc1 narrowed to 64 for speed) on real frames, both settings of the reset.
    grads = {}
    for detach_reset in (True, False):
        net = firing_network(
            IMAGE_SPACE, 10.0, num_steps=8, neuron=neuron, reset=reset, readout=readout, net_arch=[64],
            detach_reset=detach_reset,
        )  # fmt: skip
        grads[detach_reset] = check_network(net, frames[game], detach_reset)
    # The two settings give the same forward pass and different gradients.
    assert any(not torch.allclose(a, b) for a, b in zip(grads[True], grads[False], strict=True))


@pytest.mark.parametrize("readout", READOUTS)
@pytest.mark.parametrize("neuron,reset", NEURON_RESETS)
@pytest.mark.parametrize("detach_reset", [True, False])
def test_mlp_equals_spikingjelly_equations(neuron, reset, readout, detach_reset):
    net = firing_network(
        VECTOR_SPACE, 8.0, num_steps=12, neuron=neuron, reset=reset, readout=readout, net_arch=[32, 16],
        detach_reset=detach_reset,
    )  # fmt: skip
    obs = torch.rand(8, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 - 1
    check_network(net, obs, detach_reset)


def reference_layer(spec, current, num_steps, beta, threshold, fire=True):
    layer = ReferenceNeurons(
        spec.neuron, spec.reset, spec.detach_reset, spec.tau, beta=beta, threshold=threshold, fire=fire
    )
    out = [layer.step(current[0 if current.shape[0] == 1 else t]) for t in range(num_steps)]
    return torch.stack([s for s, _ in out]), torch.stack([h for _, h in out])


@pytest.mark.parametrize("neuron,reset", NEURON_RESETS)
@pytest.mark.parametrize("detach_reset", [True, False])
@pytest.mark.parametrize("static", [True, False])
@pytest.mark.parametrize("spikes_only", [True, False])
@pytest.mark.parametrize("chunk_elements", [None, 40])
def test_layer_gradients_with_learnable_decay_and_threshold(
    monkeypatch, neuron, reset, detach_reset, static, spikes_only, chunk_elements
):
    # The gradients of the current, beta and the threshold, also with the adjoint in chunks of steps.
    if chunk_elements is not None:
        monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", chunk_elements)
    spec = NeuronSpec(
        neuron=neuron, reset=reset, detach_reset=detach_reset, learn_beta=True, learn_threshold=True,
        tau=3.0, threshold=0.8,
    )  # fmt: skip
    layer = SpikingLayer(spec).double()
    num_steps = 16
    current = torch.randn(1 if static else num_steps, 3, 11, generator=torch.Generator().manual_seed(0))
    current = (current.double() * 1.5).requires_grad_()
    if spikes_only:
        spikes, mem = layer.spikes(current, num_steps), None
    else:
        spikes, mem = layer(current, num_steps)
    weights = torch.randn(spikes.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    params = [current, layer.leaky.beta, layer.leaky.threshold]

    def loss(s, u):
        return (s * weights).sum() + (0.0 if u is None else 0.1 * (u * weights.flip(0)).sum())

    grads = torch.autograd.grad(loss(spikes, mem), params)
    beta = layer.leaky.beta.clamp(0, 1)  # as the engine reads it
    expected_spikes, expected_mem = reference_layer(spec, current, num_steps, beta, layer.leaky.threshold)
    expected = torch.autograd.grad(loss(expected_spikes, None if mem is None else expected_mem), params)
    assert torch.equal(spikes.detach(), expected_spikes.detach())
    assert 0.05 < float(spikes.detach().mean()) < 0.8
    if mem is not None:
        torch.testing.assert_close(mem.detach(), expected_mem.detach(), rtol=1e-12, atol=1e-12)
    assert_grads_match(grads, expected)


def test_non_firing_output_neurons_do_not_depend_on_the_setting():
    current = torch.randn(10, 2, 5, dtype=torch.float64, requires_grad=True)
    grads = []
    for detach_reset in (True, False):
        layer = SpikingLayer(NeuronSpec(detach_reset=detach_reset), fire=False).double()
        _, mem = layer(current, 10)
        grads.append(torch.autograd.grad(mem.square().sum(), current)[0])
    assert torch.equal(grads[0], grads[1])


def test_the_snntorch_engine_refuses_the_reset_gradient():
    # snnTorch's Leaky always detaches its reset: the step-by-step engine cannot give the other gradient.
    message = "engine='snntorch' cannot run detach_reset=False"
    with pytest.raises(ValueError, match=message):
        NetworkSpec(engine="snntorch", detach_reset=False)
    layer = SpikingLayer(NeuronSpec(detach_reset=False))
    with pytest.raises(ValueError, match=message):
        layer(torch.zeros(4, 1, 3), 4, "snntorch")
    with pytest.raises(ConfigError, match=message):
        resolve("paper", "dsqn", engine="snntorch")
    assert resolve("paper", "dsqn", engine="snntorch", detach_reset=True).network.engine == "snntorch"


def test_the_paper_preset_lets_the_gradient_through_the_reset():
    for model in ("dsqn", "dsqn-if", "dsqn-spike", "dsqn-mem"):
        config = resolve("paper", model)
        assert config.network.detach_reset is False and config.to_dict()["detach_reset"] is False
    assert resolve("zoo", "dsqn").network.detach_reset is True
    assert resolve("smoke", "dsqn").network.detach_reset is True
    assert NetworkSpec().detach_reset is True  # SpikingPolicy's default


def test_the_command_line_sets_the_reset_gradient(tmp_path, capsys):
    args = cli.build_parser().parse_args(["train", "--preset=smoke", "--detach-reset=False"])
    assert cli._train_config(args).network.detach_reset is False
    args = cli.build_parser().parse_args(["train", "--preset", "paper", "--detach_reset", "true"])
    assert cli._train_config(args).network.detach_reset is True
    code = cli.main(["train", "--preset", "paper", "--engine", "snntorch", "--out-dir", str(tmp_path)])
    assert code == 2 and "engine='snntorch' cannot run detach_reset=False" in capsys.readouterr().err


def test_sb3_trains_a_dsqn_with_the_gradient_through_the_reset():
    # A one-layer MLP fires on CartPole with PyTorch's initialisation: the updates move every weight.
    env = gym.make("CartPole-v1")
    model = DQN(
        "SpikingPolicy", env, learning_starts=64, batch_size=32, train_freq=4, buffer_size=1_000, seed=0,
        policy_kwargs=dict(num_steps=8, net_arch=[64], detach_reset=False), device="cpu",
    )  # fmt: skip
    assert model.q_net.spec.detach_reset is False
    before = [p.detach().clone() for p in model.q_net.parameters()]
    model.learn(300)
    after = list(model.q_net.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def spikingjelly_network(net, detach_reset):
    """The reference code's network in SpikingJelly (multi-step LIFNode, torch backend), ``net``'s weights."""
    from spikingjelly.activation_based import functional, layer, neuron, surrogate

    def lif():
        return neuron.LIFNode(
            tau=net.spec.tau, v_threshold=net.spec.threshold, v_reset=0.0, step_mode="m",
            surrogate_function=surrogate.ATan(alpha=ALPHA), detach_reset=detach_reset,
        )  # fmt: skip

    class ReferenceDSQN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.static_conv = net.synapses[0]
            body = []
            for synapse in net.synapses[1:]:
                body += [lif(), layer.SeqToANNContainer(synapse)]
            self.body = torch.nn.Sequential(*body, lif())
            self.fc2 = net.readout.linear

        def forward(self, obs):
            x = self.static_conv((obs.float() / 255).double()).unsqueeze(0).repeat(net.num_steps, 1, 1, 1, 1)
            q = self.fc2(self.body(x).mean(0))
            functional.reset_net(self)
            return q

    return ReferenceDSQN()


@pytest.mark.parametrize("detach_reset", [True, False])
def test_dsqn_gradients_equal_spikingjelly(frames, detach_reset):
    pytest.importorskip("spikingjelly")
    net = firing_network(IMAGE_SPACE, 10.0, num_steps=16, net_arch=[64], detach_reset=detach_reset)
    params = list(net.parameters())
    obs = frames["Pong"]
    q, grads = q_and_grads(net(obs), params)
    expected_q, expected_grads = q_and_grads(spikingjelly_network(net, detach_reset)(obs), params)
    torch.testing.assert_close(q, expected_q, rtol=1e-12, atol=1e-12)
    assert_grads_match(grads, expected_grads)
    # and the other setting's gradients are far from these
    other = firing_network(IMAGE_SPACE, 10.0, num_steps=16, net_arch=[64], detach_reset=not detach_reset)
    _, other_grads = q_and_grads(other(obs), list(other.parameters()))
    relative = float((other_grads[0] - grads[0]).norm() / grads[0].norm())
    assert relative > 0.05
