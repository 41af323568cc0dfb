"""The spiking Q-network against an independent implementation of the paper's equations.

The reference below is written from Liu et al. 2022 (SpikingJelly LIFNode, decay_input, hard reset):
    H[t] = V[t-1] + (I[t] - V[t-1]) / tau      (IF: H[t] = V[t-1] + I[t])
    S[t] = H[t] > v_th                         (snnTorch fires strictly above threshold)
    V[t] = H[t] (1 - S[t])
with every layer evaluated at every step, in float64 so that rounding cannot flip a spike. The soft
reset follows snnTorch's Leaky, which removes the threshold after the decay:
    H[t] = H[t-1] + (I[t] - H[t-1]) / tau - S[t-1] v_th
"""

import numpy as np
import pytest
import torch
from gymnasium import spaces

from spikeq import NetworkSpec, SpikingQNetwork

TAU, THRESHOLD = 2.0, 1.0


def neuron_step(state, current, neuron, reset):
    """One step of one layer; state = (H[t-1], S[t-1])."""
    h, s = state
    v = h * (1 - s) if reset == "zero" else h
    h = v + (current - v) / TAU if neuron == "lif" else v + current
    if reset == "subtract":
        h = h - s * THRESHOLD
    s = (h > THRESHOLD).double()
    return s, (h, s)


def reference_forward(net, first_inputs, num_steps, neuron, reset, readout):
    """Q and per-layer spikes by the paper's equations, layer after layer at every time step.

    first_inputs: [T', B, ...] what the first layer receives (T' = 1: the same input every step).
    """
    synapses = list(net.synapses)
    state = [(0.0, 0.0)] * len(synapses)
    state_out, v_out = (0.0, 0.0), 0.0
    spikes = [[] for _ in synapses]
    out_spikes, out_mem = [], []
    for t in range(num_steps):
        x = first_inputs[0 if first_inputs.shape[0] == 1 else t]
        for i, synapse in enumerate(synapses):
            s, state[i] = neuron_step(state[i], synapse(x), neuron, reset)
            spikes[i].append(s)
            x = s
        current = net.readout.linear(x)
        if readout == "spike":
            s, state_out = neuron_step(state_out, current, neuron, reset)
            out_spikes.append(s)
        elif readout != "rate":
            # Non-spiking output neurons: the same leaky integration, never firing.
            v_out = v_out + (current - v_out) / TAU if neuron == "lif" else v_out + current
            out_mem.append(v_out)
    last = torch.stack(spikes[-1])
    if readout == "rate":
        q = net.readout.linear(last.mean(0))
    elif readout == "spike":
        q = torch.stack(out_spikes).mean(0)
    else:
        mem = torch.stack(out_mem)
        q = {"max_mem": mem.max(0).values, "last_mem": mem[-1], "mean_mem": mem.mean(0)}[readout]
    return q, [torch.stack(s) for s in spikes]


def make_net(observation_space, n_actions=3, dtype=torch.float64, **spec):
    torch.manual_seed(0)
    net = SpikingQNetwork(observation_space, spaces.Discrete(n_actions), NetworkSpec(**spec)).to(dtype)
    # PyTorch's default init (the paper's too) leaves deep layers nearly silent on random input;
    # larger weights make every layer spike, so that spikes and gradients are tested everywhere.
    scale = 8.0 if len(observation_space.shape) == 3 else 3.0
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return net


VECTOR_SPACE = spaces.Box(-1.0, 1.0, (6,), dtype=np.float32)
IMAGE_SPACE = spaces.Box(0, 255, (2, 40, 40), dtype=np.uint8)


@pytest.mark.parametrize("engine", ["fused", "snntorch"])
@pytest.mark.parametrize("readout", ["rate", "spike", "max_mem", "last_mem", "mean_mem"])
@pytest.mark.parametrize("neuron,reset", [("lif", "zero"), ("if", "zero"), ("lif", "subtract")])
@pytest.mark.parametrize("encoder", ["direct", "poisson"])
def test_mlp_matches_paper_equations(engine, readout, neuron, reset, encoder):
    net = make_net(
        VECTOR_SPACE, num_steps=12, neuron=neuron, reset=reset, readout=readout, encoder=encoder,
        engine=engine, net_arch=[16, 8],
    )  # fmt: skip
    obs = torch.rand(5, 6, dtype=torch.float64) * 2 - 1
    with torch.no_grad(), net.record() as activity:
        q = net(obs)
    first_inputs = activity[0].inputs
    if encoder == "direct":
        assert first_inputs.shape == (1, 5, 6)
    else:
        assert first_inputs.shape == (12, 5, 6)
        assert set(first_inputs.unique().tolist()) <= {0.0, 1.0}
    with torch.no_grad():
        q_ref, spikes_ref = reference_forward(net, first_inputs, 12, neuron, reset, readout)
    assert len(spikes_ref) == len(net.synapses) and len(activity) >= len(spikes_ref)  # + the output layer
    for layer, ref in zip(activity[: len(spikes_ref)], spikes_ref, strict=True):
        assert torch.equal(layer.spikes, ref), layer.name
    assert sum(float(s.sum()) for s in spikes_ref) > 0, "the test needs spikes to mean something"
    torch.testing.assert_close(q, q_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("engine", ["fused", "snntorch"])
@pytest.mark.parametrize("neuron", ["lif", "if"])
@pytest.mark.parametrize("readout", ["rate", "spike", "max_mem"])
def test_nature_cnn_matches_paper_equations(engine, neuron, readout):
    net = make_net(IMAGE_SPACE, num_steps=6, neuron=neuron, readout=readout, engine=engine, net_arch=[32])
    obs = torch.randint(0, 256, (2, 2, 40, 40), dtype=torch.uint8)
    with torch.no_grad(), net.record() as activity:
        q = net(obs)
    assert [a.name for a in activity] == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    with torch.no_grad():
        q_ref, spikes_ref = reference_forward(net, activity[0].inputs, 6, neuron, "zero", readout)
    assert len(spikes_ref) == len(net.synapses) and len(activity) >= len(spikes_ref)  # + the output layer
    for layer, ref in zip(activity[: len(spikes_ref)], spikes_ref, strict=True):
        assert torch.equal(layer.spikes, ref), layer.name
    torch.testing.assert_close(q, q_ref, rtol=1e-12, atol=1e-12)


def test_direct_input_is_the_scaled_frame_and_first_layer_runs_once():
    net = make_net(IMAGE_SPACE, num_steps=4)
    obs = torch.full((1, 2, 40, 40), 255, dtype=torch.uint8)
    calls = []
    net.synapses[0].register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    with torch.no_grad():
        net(obs)
    # One call on a batch of B frames (not T*B): conv1 is computed once and reused at every step.
    assert calls == [torch.Size([1, 2, 40, 40])]


@pytest.mark.parametrize("readout", ["rate", "spike", "max_mem", "last_mem", "mean_mem"])
@pytest.mark.parametrize("neuron", ["lif", "if"])
def test_surrogate_gradients_reach_every_layer(readout, neuron):
    net = make_net(IMAGE_SPACE, dtype=torch.float32, num_steps=8, readout=readout, neuron=neuron)
    obs = torch.randint(0, 256, (4, 2, 40, 40), dtype=torch.uint8)
    net(obs).pow(2).sum().backward()
    for name, param in net.named_parameters():
        if name.endswith("weight"):
            assert param.grad is not None, name
            assert torch.isfinite(param.grad).all(), name
            assert param.grad.abs().sum() > 0, name


def test_learnable_beta_and_threshold_are_trained():
    net = SpikingQNetwork(
        VECTOR_SPACE, spaces.Discrete(2), NetworkSpec(num_steps=8, learn_beta=True, learn_threshold=True)
    )
    net(torch.rand(16, 6) * 2 - 1).sum().backward()
    for neurons in net.neurons:
        assert neurons.leaky.beta.grad is not None and neurons.leaky.threshold.grad is not None
        assert torch.isfinite(neurons.leaky.beta.grad) and torch.isfinite(neurons.leaky.threshold.grad)


def test_spike_counts_report_every_spiking_layer():
    net = make_net(IMAGE_SPACE, dtype=torch.float32, num_steps=4, readout="spike")
    obs = torch.randint(0, 256, (3, 2, 40, 40), dtype=torch.uint8)
    counts = net.spike_counts(obs)
    assert list(counts) == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    assert all(n > 0 for n in counts.values())  # make_net's weights make every layer fire
    with torch.no_grad(), net.record() as activity:
        net(obs[:1])
    assert counts["fc2"] > int(activity[-1].spikes.sum())  # three observations, not the first one only


def test_state_never_leaks_between_calls_or_batches():
    net = make_net(VECTOR_SPACE, dtype=torch.float32, num_steps=16)
    obs = torch.rand(8, 6) * 2 - 1
    with torch.no_grad():
        first = net(obs)
        again = net(obs)
        alone = torch.cat([net(obs[i : i + 1]) for i in range(8)])
    assert torch.equal(first, again)
    torch.testing.assert_close(alone, first)


@pytest.mark.parametrize(
    "spec,message",
    [
        (dict(neuron="izhikevich"), "unknown neuron 'izhikevich'; allowed: lif, if"),
        (dict(readout="softmax"), "unknown readout 'softmax'; allowed: rate, spike, max_mem"),
        (dict(encoder="latency"), "unknown encoder 'latency'; allowed: direct, poisson"),
        (dict(surrogate="relu"), "unknown surrogate 'relu'; allowed: atan, sigmoid"),
        (dict(engine="cuda"), "unknown engine 'cuda'; allowed: fused, snntorch"),
        (dict(reset="none"), "unknown reset 'none'; allowed: zero, subtract"),
        (dict(num_steps=0), "num_steps=0 must be >= 1"),
        (dict(num_steps=2.5), "num_steps=2.5 must be an integer"),
        (dict(tau=1.0), "tau=1.0 gives no valid leak"),
        (dict(tau=0.5), "tau=0.5 gives no valid leak"),
        (dict(threshold=0.0), "threshold=0.0 must be > 0"),
        (dict(surrogate_slope=0.0), "surrogate_slope=0.0 must be a finite number > 0"),
        (dict(surrogate_slope=-2.0), "surrogate_slope=-2.0 must be a finite number > 0"),
        (dict(surrogate_slope=float("nan")), "surrogate_slope=nan must be a finite number > 0"),
        (dict(surrogate_slope="2"), "surrogate_slope='2' must be a finite number > 0"),
        (
            dict(surrogate="straight_through", surrogate_slope=2.0),
            "surrogate 'straight_through' has no shape parameter; leave it None or choose one of atan,",
        ),
        (dict(learn_beta="False"), "learn_beta='False' must be True or False"),
        (dict(learn_threshold=1), "learn_threshold=1 must be True or False"),
        (dict(recompute="yes"), "recompute='yes' must be True or False"),
        (dict(net_arch=[64, 0]), "net_arch=[64, 0] must be a non-empty list of sizes >= 1"),
    ],
)
def test_bad_network_arguments_name_the_value_and_the_allowed_ones(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        NetworkSpec(**spec)


def test_spaces_the_network_cannot_take():
    with pytest.raises(ValueError, match="needs spaces.Discrete"):
        SpikingQNetwork(VECTOR_SPACE, spaces.Box(-1, 1, (2,)), NetworkSpec())
    with pytest.raises(ValueError, match="observation space Dict.* is not supported"):
        SpikingQNetwork(spaces.Dict({"a": VECTOR_SPACE}), spaces.Discrete(2), NetworkSpec())
    with pytest.raises(ValueError, match="needs bounded observations"):
        SpikingQNetwork(spaces.Box(-np.inf, np.inf, (4,)), spaces.Discrete(2), NetworkSpec(encoder="poisson"))
    grid = spaces.Box(0.0, 1.0, (4, 2, 8), np.float32)  # too small for the grid torso's 3x3 convolution
    with pytest.raises(ValueError, match=r"shape \(4, 2, 8\) is too small .* 3x3 convolution; allowed"):
        SpikingQNetwork(grid, spaces.Discrete(2), NetworkSpec(), normalize_images=False)


def test_poisson_encoder_fires_at_the_feature_value():
    net = SpikingQNetwork(
        spaces.Box(0, 255, (1, 40, 40), np.uint8),
        spaces.Discrete(2),
        NetworkSpec(num_steps=2000, encoder="poisson"),
    )
    obs = torch.tensor([0, 64, 128, 255], dtype=torch.uint8).repeat_interleave(400).reshape(1, 1, 40, 40)
    spikes = net.encoder(obs.float() / 255, 2000)  # [T, B, C, H, W]
    rates = spikes.mean(0).reshape(4, 400).mean(1)
    torch.testing.assert_close(rates, torch.tensor([0, 64, 128, 255]) / 255, atol=0.01, rtol=0)
    assert not torch.equal(spikes[0], spikes[1]), "spikes are drawn fresh at each step"
