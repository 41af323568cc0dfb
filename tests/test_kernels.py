"""The Triton recurrence kernels (spikeq.snn.engine.kernels) against snnTorch's ``Leaky`` called step by step.

On a GPU the engine runs the membrane recurrence in these kernels by default. Without one, conftest.py
sets TRITON_INTERPRET=1 and the kernels run on CPU tensors in Triton's interpreter, which executes
their float operations one by one through numpy: spikes and membranes must equal snnTorch's bit for
bit, and gradients within float rounding, as for the engine's PyTorch loop. On a machine with CUDA the
same tests run the compiled kernels on the GPU.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import snntorch as snn
import torch
from gymnasium import spaces
from layer_runs import assert_grads_close, run_layer
from stable_baselines3 import DQN

from spikeq import NetworkSpec, NeuronSpec, SpikingLayer, SpikingQNetwork
from spikeq.snn import engine
from spikeq.snn.engine import torch_backend, triton_backend

pytest.importorskip("triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NEURON_RESETS = [("lif", "zero"), ("if", "zero"), ("lif", "subtract"), ("if", "subtract")]


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the Triton kernels' launches: {"integrate": n, "adjoint": n}."""
    kernels = triton_backend.kernels()
    calls = {"integrate": 0, "adjoint": 0}

    def counted(name):
        original = getattr(kernels, name)

        def call(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        return call

    for name in calls:
        monkeypatch.setattr(kernels, name, counted(name))
    return calls


def assert_same(got, want):
    (spikes, mem, grads), (spikes_ref, mem_ref, grads_ref) = got, want
    assert torch.equal(spikes, spikes_ref)
    assert mem is None or torch.equal(mem, mem_ref)
    assert_grads_close(grads, grads_ref)


@pytest.mark.parametrize("neuron,reset", NEURON_RESETS)
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("fire", [True, False])
@pytest.mark.parametrize("learn", [False, True])
def test_kernels_equal_snntorch_step_by_step(kernel_calls, neuron, reset, static, fire, learn):
    spec = NeuronSpec(neuron=neuron, reset=reset, learn_beta=learn, learn_threshold=learn)
    layer = SpikingLayer(spec, fire=fire, backend="triton").to(DEVICE)
    num_steps = 13
    generator = torch.Generator().manual_seed(0)
    current = (torch.randn(1 if static else num_steps, 3, 70, generator=generator) * 1.5).to(DEVICE)
    got = run_layer(layer, current, num_steps, "fused")
    assert kernel_calls == {"integrate": 1, "adjoint": 1}
    want = run_layer(layer, current, num_steps, "snntorch")
    assert_same(got, want)
    assert not fire or got[0].sum() > 0


@pytest.mark.parametrize("neuron,reset", NEURON_RESETS)
@pytest.mark.parametrize("static,recompute", [(False, False), (True, False), (True, True)])
def test_kernels_spikes_only_path_equals_snntorch(kernel_calls, neuron, reset, static, recompute):
    layer = SpikingLayer(NeuronSpec(neuron=neuron, reset=reset), backend="triton").to(DEVICE)
    num_steps = 9
    current = (
        torch.randn(1 if static else num_steps, 2, 300, generator=torch.Generator().manual_seed(3)) * 2
    ).to(DEVICE)
    got = run_layer(layer, current, num_steps, "fused", spikes_only=True, recompute=recompute)
    # with recompute the backward runs the forward loop again
    assert kernel_calls == {"integrate": 2 if recompute else 1, "adjoint": 1}
    spikes, _, grads = run_layer(layer, current, num_steps, "snntorch", mem_loss=False)
    assert_same(got, (spikes, None, grads))


def test_kernels_run_under_inference_mode_as_greedy_actions_do(kernel_calls):
    # SpikingQNetwork._predict (every action SB3 takes) runs under torch.inference_mode(), where the
    # backend's look at the surrogate's autograd node must still work.
    network = SpikingQNetwork(
        spaces.Box(0.0, 1.0, (6,)),
        spaces.Discrete(3),
        NetworkSpec(num_steps=5, net_arch=(40,), backend="triton"),
    ).to(DEVICE)
    with torch.no_grad():
        for p in network.synapses.parameters():
            p.mul_(8)
    obs = torch.rand(4, 6, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        q = network(obs)
    with torch.inference_mode():
        q_inference = network(obs)
        actions = network._predict(obs)
    assert kernel_calls["integrate"] == 3  # one firing layer, three forwards
    assert torch.equal(q_inference, q) and torch.equal(actions, q.argmax(dim=1))


def test_sb3_trains_and_acts_through_the_kernels(kernel_calls):
    # The whole DQN loop (SB3's predict under inference mode, the update, the target network) with every
    # spiking layer in the kernels, as it runs by default on a GPU.
    model = DQN(
        "SpikingPolicy", "CartPole-v1", policy_kwargs=dict(num_steps=4, net_arch=[32], backend="triton"),
        learning_starts=40, train_freq=4, buffer_size=500, target_update_interval=20, seed=0, device=DEVICE,
    )  # fmt: skip
    model.learn(80)
    # 40 greedy actions after learning_starts, and 10 or more updates of two forwards and one backward
    assert kernel_calls["integrate"] >= 60 and kernel_calls["adjoint"] >= 10
    obs = model.get_env().reset()
    with torch.no_grad():
        q = model.q_net(model.policy.obs_to_tensor(obs)[0])
    assert np.array_equal(model.predict(obs, deterministic=True)[0], q.argmax(dim=1).cpu().numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_membranes_are_bit_identical_near_the_threshold(kernel_calls, dtype):
    # Currents a few ulps either side of values that put the membrane exactly on the threshold.
    layer = SpikingLayer(NeuronSpec(tau=3.0, threshold=0.7), backend="triton").to(device=DEVICE, dtype=dtype)
    base = torch.tensor([0.7 * 3, 0.35 * 3, 0.7, 2.1 / 2], dtype=dtype)
    near = [base]
    up = down = base
    for _ in range(4):
        up, down = torch.nextafter(up, up + 1), torch.nextafter(down, down - 1)
        near += [up, down]
    current = torch.cat(near).reshape(1, 1, -1).expand(17, 1, -1).contiguous().to(DEVICE)
    with torch.no_grad():
        spikes, mem = layer(current, 17, "fused")
        spikes_ref, mem_ref = layer(current, 17, "snntorch")
    assert kernel_calls["integrate"] == 1
    assert torch.equal(spikes, spikes_ref) and torch.equal(mem, mem_ref)
    assert 0 < spikes.sum() < spikes.numel()


def test_the_kernels_refuse_what_they_cannot_run_and_auto_leaves_it_to_torch(kernel_calls):
    current = (torch.randn(8, 4, 50, generator=torch.Generator().manual_seed(5)) * 2).to(DEVICE)
    # Another surrogate: the adjoint kernel is written for ATan.
    with pytest.raises(ValueError, match="differentiates snnTorch's ATan surrogate only"):
        SpikingLayer(NeuronSpec(surrogate="fast_sigmoid"), backend="triton").to(DEVICE)(current, 8)
    with pytest.raises(ValueError, match="backend='triton' differentiates surrogate='atan' only"):
        NetworkSpec(backend="triton", surrogate="fast_sigmoid")
    # A decay per neuron.
    leaky = snn.Leaky(beta=torch.linspace(0.2, 0.9, 50), learn_beta=True).to(DEVICE)
    with pytest.raises(ValueError, match="scalar beta and threshold"):
        engine.leaky_sequence(current, leaky, backend="triton")
    assert kernel_calls == {"integrate": 0, "adjoint": 0}
    # "auto" runs both in the PyTorch loop, as snnTorch's Leaky would.
    _, mem = engine.leaky_sequence(current, leaky, backend="auto")
    u, expected = torch.zeros_like(current[0]), []
    for i in current:
        _, u = leaky(i, u)
        expected.append(u)
    assert torch.equal(mem.detach(), torch.stack(expected).detach())
    layer = SpikingLayer(NeuronSpec(surrogate="fast_sigmoid"), backend="auto").to(DEVICE)
    assert_same(run_layer(layer, current, 8, "fused"), run_layer(layer, current, 8, "snntorch"))
    assert kernel_calls == {"integrate": 0, "adjoint": 0}


def test_dsqn_q_values_and_gradients_equal_snntorch(kernel_calls):
    space = spaces.Box(0, 255, (2, 44, 44), dtype="uint8")
    obs = torch.randint(0, 256, (3, 2, 44, 44), generator=torch.Generator().manual_seed(0)).to(DEVICE)

    def run(engine_name, backend):
        torch.manual_seed(0)
        spec = NetworkSpec(engine=engine_name, backend=backend, num_steps=6, net_arch=[32], readout="max_mem")
        net = SpikingQNetwork(space, spaces.Discrete(4), spec).to(DEVICE, torch.float64)
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(8.0)  # every layer spikes
        with net.record() as activity:
            q = net(obs)
        grads = torch.autograd.grad(q.square().sum(), list(net.parameters()))
        return q.detach(), [a.spikes for a in activity], grads

    q, spikes, grads = run("fused", "triton")
    assert kernel_calls == {"integrate": 5, "adjoint": 5}
    assert spikes[-1] is None  # non-spiking output neurons (max_mem readout)
    assert all(0 < float(s.mean()) < 1 for s in spikes[:-1])
    for engine_name, backend, rtol, atol in [
        ("fused", "torch", 1e-10, 1e-12),
        ("snntorch", "torch", 1e-5, 1e-6),
    ]:
        # snnTorch's surrogates pass the gradient through float32: compared at float32 precision
        q_ref, spikes_ref, grads_ref = run(engine_name, backend)
        assert all(torch.equal(s, r) for s, r in zip(spikes[:-1], spikes_ref[:-1], strict=True))
        assert torch.equal(q, q_ref)
        for g, g_ref in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(g, g_ref, rtol=rtol, atol=atol)
    assert kernel_calls == {"integrate": 5, "adjoint": 5}


def backend_run(backend, spec, fire, current, num_steps, spikes_only, dtype=torch.float32):
    """``run_layer`` of a layer of ``spec`` on ``backend`` ("triton" or "torch")."""
    layer = SpikingLayer(spec, fire=fire, backend=backend).to(DEVICE, dtype)
    return run_layer(layer, current, num_steps, "fused", spikes_only=spikes_only)


@pytest.mark.parametrize("neuron,reset", NEURON_RESETS)
@pytest.mark.parametrize("detach_reset", [False, True])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("fire,spikes_only", [(True, False), (True, True), (False, False)])
def test_kernels_give_the_reset_gradient_of_either_setting(
    kernel_calls, neuron, reset, detach_reset, static, fire, spikes_only
):
    # The adjoint kernel against the PyTorch adjoint (itself checked against SpikingJelly's equations
    # in tests/test_reset_gradient.py), with learnable decay and threshold, in float64.
    spec = NeuronSpec(
        neuron=neuron, reset=reset, detach_reset=detach_reset, learn_beta=True, learn_threshold=True
    )
    num_steps = 11
    generator = torch.Generator().manual_seed(0)
    current = (torch.randn(1 if static else num_steps, 3, 40, generator=generator) * 1.5).to(DEVICE)
    current = current.double()
    got = backend_run("triton", spec, fire, current, num_steps, spikes_only, torch.float64)
    assert kernel_calls == {"integrate": 1, "adjoint": 1}
    want = backend_run("torch", spec, fire, current, num_steps, spikes_only, torch.float64)
    assert kernel_calls == {"integrate": 1, "adjoint": 1}
    assert torch.equal(got[0], want[0]) and (got[1] is None or torch.equal(got[1], want[1]))
    for g, g_ref in zip(got[2], want[2], strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    assert not fire or 0 < got[0].mean() < 1


def test_kernels_reset_gradient_differs_from_the_detached_one(kernel_calls):
    current = (torch.randn(9, 2, 60, generator=torch.Generator().manual_seed(1)) * 1.5).to(DEVICE)
    grads = {}
    for detach_reset in (True, False):
        spec = NeuronSpec(detach_reset=detach_reset)
        grads[detach_reset] = backend_run("triton", spec, True, current, 9, True)[2][0]
    relative = (grads[True] - grads[False]).norm() / grads[False].norm()
    assert float(relative) > 0.05


def test_auto_takes_the_kernels_for_cuda_tensors_only(monkeypatch):
    cpu = torch.randn(4, 2, 10)
    on_device = cpu.to(DEVICE)  # CUDA, or the CPU under Triton's interpreter
    leaky = SpikingLayer(NeuronSpec()).leaky

    def chosen(name, x):
        return engine.choose_backend(name, x, leaky.beta.to(x), leaky.threshold.to(x), leaky.spike_grad)

    assert chosen("auto", cpu) is torch_backend and chosen("torch", on_device) is torch_backend
    assert chosen("triton", on_device) is triton_backend
    assert chosen("auto", on_device) is (triton_backend if on_device.is_cuda else torch_backend)
    with pytest.raises(ValueError, match="backend 'triton' takes float32 or float64, got torch.float16"):
        chosen("triton", on_device.half())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend 'triton' runs on CUDA tensors, got a cpu tensor"):
        chosen("triton", cpu)


def test_bad_backend_names_the_value_and_the_allowed_ones():
    message = r"unknown backend 'cuda'; allowed: auto, torch, triton"
    with pytest.raises(ValueError, match=message):
        NetworkSpec(backend="cuda")
    with pytest.raises(ValueError, match="engine='snntorch' steps snnTorch's Leaky instead"):
        NetworkSpec(engine="snntorch", backend="triton")
    with pytest.raises(ValueError, match=message):
        SpikingLayer(NeuronSpec(), backend="cuda")
    current = torch.zeros(2, 1, 3)
    with pytest.raises(ValueError, match=message):
        engine.leaky_sequence(current, SpikingLayer(NeuronSpec()).leaky, backend="cuda")


def test_kernels_compile_for_an_h200_and_the_forward_has_no_fused_multiply_add():
    # Triton compiles for sm_90 without a GPU; a child process, as this one interprets the kernels.
    # A fused multiply-add rounds once where PyTorch's separate kernels round twice: the forward
    # would no longer give snnTorch's membranes bit for bit.
    from kernel_ptx import VARIANTS

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("kernel_ptx.py")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["kernel"], r["constexprs"], r["dtype"]) for r in reports] == VARIANTS
    assert all(r["size"] > 1000 for r in reports)
    assert not any(r["fma"] for r in reports if r["kernel"] == "_forward_kernel")
    assert any(r["fma"] for r in reports if r["kernel"] == "_adjoint_kernel")  # the check can see one
