"""The fused engine against snnTorch's ``Leaky`` called step by step, and against the paper's equations.

``engine="fused"`` runs each layer over all T steps at once (one conv/matmul over ``[T*B, ...]``, then
the membrane recurrence as one autograd node); ``engine="snntorch"`` calls every layer's ``Leaky`` at
every step. They must give the same spikes and membranes bit for bit, the same Q, and gradients equal
within float rounding, for every neuron, reset, encoder and readout.

Layer tests run in float32, the dtype of training. Network tests run in float64: a batched matmul may
round differently from row-by-row ones (MKL picks kernels by size), which in float32 could, rarely,
move a membrane across the threshold; in float64 that cannot happen, so spikes and Q compare exactly.
"""

import numpy as np
import pytest
import torch
from gymnasium import spaces
from layer_runs import assert_grads_close, run_layer

from spikeq import NetworkSpec, NeuronSpec, SpikingLayer, SpikingQNetwork
from spikeq.snn import engine
from spikeq.snn.encoding import ENCODERS
from spikeq.snn.engine import torch_backend
from spikeq.snn.readout import READOUTS

NEURON_RESETS = [("lif", "zero"), ("if", "zero"), ("lif", "subtract"), ("if", "subtract")]


@pytest.mark.parametrize("neuron,reset", NEURON_RESETS)
def test_fused_recurrence_follows_the_papers_equations(neuron, reset):
    # Liu et al. 2022 (SpikingJelly LIFNode, decay_input=True), written out step by step:
    #   H[t] = V[t-1] + (I[t] - V[t-1]) / tau  (IF: V[t-1] + I[t]);  S[t] = H[t] > v_th (strict)
    #   V[t] = H[t] (1 - S[t])  (hard reset)  or  H[t] - S[t-1] v_th after the decay (soft, snnTorch)
    tau, v_th = 2.0, 1.0
    current = torch.randn(16, 3, 20, dtype=torch.float64) * 1.5
    layer = SpikingLayer(NeuronSpec(neuron=neuron, tau=tau, threshold=v_th, reset=reset))
    spikes, mem = engine.leaky_sequence(current, layer.leaky, input_scale=layer.input_scale)

    h = s = torch.zeros_like(current[0])
    expected_spikes, expected_mem = [], []
    for i in current:
        v = h * (1 - s) if reset == "zero" else h
        h = v + (i - v) / tau if neuron == "lif" else v + i
        if reset == "subtract":
            h = h - s * v_th
        s = (h > v_th).double()
        expected_spikes.append(s)
        expected_mem.append(h)
    assert torch.equal(spikes, torch.stack(expected_spikes))
    torch.testing.assert_close(mem, torch.stack(expected_mem), rtol=1e-12, atol=1e-12)
    assert 0 < spikes.mean() < 1


@pytest.mark.parametrize("neuron,reset", NEURON_RESETS)
@pytest.mark.parametrize("fire", [True, False])
@pytest.mark.parametrize("static", [True, False])
@pytest.mark.parametrize("surrogate", ["atan", "fast_sigmoid", "triangular"])
def test_fused_layer_equals_leaky_step_by_step(neuron, reset, fire, static, surrogate):
    spec = NeuronSpec(
        neuron=neuron, tau=3.0, reset=reset, surrogate=surrogate, learn_beta=True, learn_threshold=True
    )
    layer = SpikingLayer(spec, fire=fire)
    torch.manual_seed(0)
    current = torch.randn(1 if static else 10, 4, 3, 5) * 1.5  # static: the same current every step
    spikes, mem, grads = run_layer(layer, current, 10, "fused")
    expected_spikes, expected_mem, expected_grads = run_layer(layer, current, 10, "snntorch")
    assert torch.equal(spikes, expected_spikes)
    assert torch.equal(mem, expected_mem)
    assert_grads_close(grads, expected_grads)
    if fire:
        assert 0 < spikes.mean() < 1


@pytest.mark.parametrize("neuron,reset", NEURON_RESETS)
@pytest.mark.parametrize("static", [True, False])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("learn", [False, True])
# The engine switches between whole-sequence and per-step kernels, and runs the backward in chunks
# of steps, by size: force every combination on small tensors.
@pytest.mark.parametrize("chunk_elements,small_elements", [(None, None), (1, 0), (70, 0)])
def test_spikes_only_path_equals_leaky_step_by_step(
    monkeypatch, neuron, reset, static, recompute, learn, chunk_elements, small_elements
):
    if chunk_elements is not None:
        monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", chunk_elements)
        monkeypatch.setattr(torch_backend, "SMALL_ELEMENTS", small_elements)
    spec = NeuronSpec(neuron=neuron, reset=reset, learn_beta=learn, learn_threshold=learn)
    layer = SpikingLayer(spec)
    torch.manual_seed(0)
    current = torch.randn(1 if static else 12, 3, 7) * 1.5
    spikes, _, grads = run_layer(layer, current, 12, "fused", spikes_only=True, recompute=recompute)
    expected_spikes, _, expected_grads = run_layer(layer, current, 12, "snntorch", mem_loss=False)
    assert torch.equal(spikes, expected_spikes)
    assert_grads_close(grads, expected_grads)


def test_without_autograd_the_engine_gives_the_same_spikes():
    layer = SpikingLayer(NeuronSpec())
    current = torch.randn(8, 2, 30) * 1.5
    spikes_grad = layer.spikes(current.requires_grad_(), 8)
    with torch.inference_mode():
        spikes_inference = layer.spikes(current, 8)
        spikes_mem, _ = layer(current, 8, "fused")
    assert torch.equal(spikes_grad.detach(), spikes_inference)
    assert torch.equal(spikes_mem, spikes_inference)


def test_spikes_only_backward_runs_once():
    # The backward writes the gradient over the stored membrane, so a second backward through the
    # same forward (retain_graph=True) must fail loudly rather than return wrong gradients.
    layer = SpikingLayer(NeuronSpec())
    current = (torch.randn(6, 2, 5) * 1.5).requires_grad_()
    loss = layer.spikes(current, 6).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once per forward"):
        loss.backward()


def test_static_current_must_have_one_step_or_num_steps():
    layer = SpikingLayer(NeuronSpec())
    with pytest.raises(ValueError, match="expected 1 .static. or num_steps=8"):
        engine.leaky_sequence(torch.zeros(3, 2, 5), layer.leaky, num_steps=8)


def make_pair(observation_space, **spec):
    """The same network (float64, same weights) with the fused and the step-by-step engine."""
    nets = {}
    for engine_name in ("fused", "snntorch"):
        torch.manual_seed(0)
        nets[engine_name] = SpikingQNetwork(
            observation_space, spaces.Discrete(3), NetworkSpec(engine=engine_name, **spec)
        ).double()
    # PyTorch's default init leaves deep layers nearly silent on random input; larger weights make
    # every layer spike, so that spikes and gradients are compared everywhere.
    scale = 8.0 if len(observation_space.shape) == 3 else 4.0
    net = nets["fused"]
    with torch.no_grad():
        for p in [*net.synapses.parameters(), *net.readout.linear.parameters()]:
            p.mul_(scale)
    nets["snntorch"].load_state_dict(nets["fused"].state_dict())
    return nets["fused"], nets["snntorch"]


def run_network(net, obs):
    """Q, every layer's recorded spikes, and the gradients of a fixed loss on Q."""
    torch.manual_seed(1)  # the Poisson encoder draws the same spikes for both engines
    with net.record() as activity:
        q = net(obs)
    weights = torch.randn(q.shape, generator=torch.Generator().manual_seed(2), dtype=q.dtype)
    params = [p for p in net.parameters() if p.requires_grad]
    grads = torch.autograd.grad((q * weights).sum(), params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
    return q.detach(), {a.name: a.spikes for a in activity if a.spikes is not None}, grads


def assert_engines_agree(fused, step_by_step, obs):
    q, spikes, grads = run_network(fused, obs)
    expected_q, expected_spikes, expected_grads = run_network(step_by_step, obs)
    assert spikes.keys() == expected_spikes.keys()
    for name, layer_spikes in spikes.items():
        assert torch.equal(layer_spikes, expected_spikes[name]), name
    assert torch.equal(q, expected_q)
    # snnTorch's surrogate functions return float32 spikes (``.float()``), so the step-by-step
    # gradients pass through float32 even in a float64 network: compare at float32 precision.
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name in fused.layer_names:  # hidden layers: the comparison means something only with spikes
        assert 0 < float(spikes[name].mean()) < 1, name
    # Without autograd (acting, target networks) the engine stores no membrane: the same results.
    torch.manual_seed(1)
    with torch.inference_mode(), fused.record() as activity:
        assert torch.equal(fused(obs), q)
    for a in activity:
        if a.spikes is not None:
            assert torch.equal(a.spikes, spikes[a.name]), a.name


VECTOR_SPACE = spaces.Box(-1.0, 1.0, (6,), dtype=np.float32)
IMAGE_SPACE = spaces.Box(0, 255, (2, 36, 36), dtype=np.uint8)


def observations(observation_space, batch):
    generator = torch.Generator().manual_seed(3)
    if observation_space is IMAGE_SPACE:
        return torch.randint(0, 256, (batch, 2, 36, 36), dtype=torch.uint8, generator=generator)
    return torch.rand(batch, 6, dtype=torch.float64, generator=generator) * 2 - 1


@pytest.mark.parametrize("readout", READOUTS)
@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("neuron,reset", NEURON_RESETS)
def test_mlp_engines_agree(readout, encoder, neuron, reset):
    fused, step_by_step = make_pair(
        VECTOR_SPACE, num_steps=8, neuron=neuron, reset=reset, encoder=encoder, readout=readout,
        net_arch=[16, 8],
    )  # fmt: skip
    assert_engines_agree(fused, step_by_step, observations(VECTOR_SPACE, 4))


@pytest.mark.parametrize("readout", READOUTS)
@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("neuron,reset", [("lif", "zero"), ("if", "subtract")])
def test_nature_cnn_engines_agree(readout, encoder, neuron, reset):
    fused, step_by_step = make_pair(
        IMAGE_SPACE, num_steps=5, neuron=neuron, reset=reset, encoder=encoder, readout=readout,
        net_arch=[16],
    )  # fmt: skip
    assert_engines_agree(fused, step_by_step, observations(IMAGE_SPACE, 2))


@pytest.mark.parametrize("observation_space", [VECTOR_SPACE, IMAGE_SPACE], ids=["mlp", "cnn"])
@pytest.mark.parametrize("readout", ["rate", "spike", "max_mem"])
def test_engines_agree_with_learnable_beta_and_threshold(observation_space, readout):
    fused, step_by_step = make_pair(
        observation_space, num_steps=5, readout=readout, learn_beta=True, learn_threshold=True,
        net_arch=[16],
    )  # fmt: skip
    assert_engines_agree(fused, step_by_step, observations(observation_space, 2))


def test_recompute_changes_memory_not_results():
    fused, _ = make_pair(IMAGE_SPACE, num_steps=5, net_arch=[16])
    recomputing = SpikingQNetwork(
        IMAGE_SPACE, spaces.Discrete(3), NetworkSpec(num_steps=5, net_arch=[16], recompute=True)
    ).double()
    recomputing.load_state_dict(fused.state_dict())
    obs = observations(IMAGE_SPACE, 2)
    q, spikes, grads = run_network(fused, obs)
    expected_q, expected_spikes, expected_grads = run_network(recomputing, obs)
    assert torch.equal(q, expected_q)
    for name, layer_spikes in spikes.items():
        assert torch.equal(layer_spikes, expected_spikes[name]), name
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
