"""The engine's buffer workspace: a buffer is reused only once nothing else holds it."""

import copy

import torch
from gymnasium import spaces

from spikeq import NetworkSpec, SpikingQNetwork
from spikeq.snn.engine import Workspace

LIKE = torch.empty(0)


def test_a_released_buffer_is_reused():
    workspace = Workspace(min_bytes=0)
    first = workspace.empty((4, 5), LIKE)
    address = first.data_ptr()
    del first
    second = workspace.empty((4, 5), LIKE)
    assert second.data_ptr() == address
    assert second.shape == (4, 5) and second.is_contiguous()
    assert workspace.resident_bytes == 80


def test_a_buffer_held_by_a_tensor_a_view_or_a_graph_is_not_reused():
    workspace = Workspace(min_bytes=0)
    held = workspace.empty((8,), LIKE)
    assert workspace.empty((8,), LIKE).data_ptr() != held.data_ptr()

    view = workspace.empty((8,), LIKE)
    address, view = view.data_ptr(), view[2:]
    assert all(workspace.empty((8,), LIKE).data_ptr() != address for _ in range(3))
    del view
    assert workspace.empty((8,), LIKE).data_ptr() == address

    weight = torch.ones(8, requires_grad=True)
    saved = workspace.empty((8,), LIKE).fill_(2.0)
    address = saved.data_ptr()
    loss = (weight * saved).sum()  # autograd keeps ``saved`` for the weight's gradient
    del saved
    assert workspace.empty((8,), LIKE).data_ptr() != address
    loss.backward()
    del loss
    assert torch.equal(weight.grad, torch.full((8,), 2.0))
    assert workspace.empty((8,), LIKE).data_ptr() == address


def test_unused_buffers_are_released():
    workspace = Workspace(min_bytes=0, keep_for=3)
    workspace.empty((100,), LIKE)  # released at once, kept for reuse
    assert workspace.resident_bytes == 400
    for _ in range(4):
        held = workspace.empty((10,), LIKE)  # each replaces the last
    assert workspace.resident_bytes == 40 + 40  # the 100-float buffer is gone; held and one free

    kept = workspace.empty((50,), LIKE)
    workspace.clear()
    assert workspace.resident_bytes == 40 + 200  # what is held survives clear()
    del kept, held
    workspace.clear()
    assert workspace.resident_bytes == 0


def test_small_buffers_and_other_devices_bypass_the_workspace():
    workspace = Workspace(min_bytes=1024)
    small = workspace.empty((16,), LIKE)
    assert small.shape == (16,) and workspace.resident_bytes == 0
    big = workspace.empty((256,), torch.empty(0, dtype=torch.float64))
    assert big.dtype == torch.float64 and workspace.resident_bytes == 2048
    meta = workspace.empty((1024,), torch.empty(0, device="meta"))
    assert meta.device.type == "meta" and workspace.resident_bytes == 2048


def train_steps(net, obs, count):
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    grads = []
    for _ in range(count):
        optimizer.zero_grad()
        net(obs).square().sum().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
        optimizer.step()
    return grads


def test_training_through_the_workspace_equals_fresh_buffers():
    # Pooled buffers come back dirty from the last step: results must not depend on that.
    space = spaces.Box(-1, 1, (40,))
    spec = NetworkSpec(num_steps=6, net_arch=[64, 32], threshold=0.3)
    torch.manual_seed(0)
    net = SpikingQNetwork(space, spaces.Discrete(3), spec)
    fresh_net = SpikingQNetwork(space, spaces.Discrete(3), spec)
    fresh_net.load_state_dict(net.state_dict())
    obs = torch.rand(5, 40) * 2 - 1

    net.workspace.min_bytes = 0  # every buffer from the network's workspace
    pooled = train_steps(net, obs, 3)
    resident = net.workspace.resident_bytes
    assert resident > 0
    train_steps(net, obs, 2)
    assert net.workspace.resident_bytes == resident  # the buffers of one step serve the next

    fresh_net.workspace.min_bytes = 1 << 40  # none
    fresh = train_steps(fresh_net, obs, 3)
    assert fresh_net.workspace.resident_bytes == 0
    for step_pooled, step_fresh in zip(pooled, fresh, strict=True):
        for a, b in zip(step_pooled, step_fresh, strict=True):
            assert torch.equal(a, b)
    assert any(g.abs().sum() > 0 for g in pooled[0][:-2])  # gradients reach the spiking layers


def test_each_network_owns_its_workspace_and_a_copy_gets_its_own():
    space = spaces.Box(-1, 1, (8,))
    net = SpikingQNetwork(space, spaces.Discrete(2), NetworkSpec(num_steps=4, readout="spike"))
    layers = [*net.neurons, net.readout.neurons]
    assert all(layer.workspace is net.workspace for layer in layers)
    other = SpikingQNetwork(space, spaces.Discrete(2), NetworkSpec(num_steps=4))
    assert other.workspace is not net.workspace
    copied = copy.deepcopy(net)  # as SB3 copies policies
    assert copied.workspace is not net.workspace
    assert all(layer.workspace is copied.workspace for layer in [*copied.neurons, copied.readout.neurons])
