"""The membrane recurrence of one layer over all T steps as one autograd node, on a chosen backend.

``leaky_sequence`` (spikes and membranes) and ``spike_sequence`` (spikes only, for hidden layers) read
the snnTorch ``Leaky`` module's own beta, threshold, reset mechanism and surrogate function. The
forward loop runs without building a graph; the backward runs the adjoint recurrence in reverse. The
backend does both: ``torch`` (``torch_backend``, the reference, any device) or ``triton``
(``triton_backend``, CUDA); ``auto`` takes Triton for CUDA tensors where it is installed and can run
the layer (ATan surrogate), the PyTorch loop otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from spikeq.snn.engine import torch_backend, triton_backend
from spikeq.snn.engine.torch_backend import RESET_NONE
from spikeq.snn.engine.workspace import Workspace

BACKENDS = ("auto", "torch", "triton")


def choose_backend(
    name: str, current: torch.Tensor, beta: torch.Tensor, threshold: torch.Tensor, spike_fn: Callable
) -> Any:
    """The backend module (``torch_backend`` or ``triton_backend``) that runs this layer.

    :param name: one of ``BACKENDS``
    :raises ValueError: for an unknown name, or ``triton`` where the kernels cannot run the layer
    :raises RuntimeError: for ``triton`` without the triton package
    """
    if name == "torch":
        return torch_backend
    if name == "triton":
        triton_backend.check(current, beta, threshold, torch_backend.atan_alpha(spike_fn))
        triton_backend.kernels()
        return triton_backend
    if name == "auto":
        if not current.is_cuda or not triton_backend.available():
            return torch_backend
        try:
            triton_backend.check(current, beta, threshold, torch_backend.atan_alpha(spike_fn))
        except ValueError:
            return torch_backend
        return triton_backend
    raise ValueError(f"unknown backend {name!r}; allowed: {', '.join(BACKENDS)}")


def _empty(workspace: Workspace | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(shape) if workspace is None else workspace.empty(shape, like)


class _LeakyRecurrence(torch.autograd.Function):
    """The membrane recurrence as one autograd node: returns (spikes, mem).

    Saved for backward: the membrane U only; spikes and reset masks are recomputed from it. U is an
    output here, so the backward writes dL/dI into a new buffer.
    """

    @staticmethod
    def forward(
        ctx: Any,
        current: torch.Tensor,
        beta: torch.Tensor,
        threshold: torch.Tensor,
        num_steps: int,
        reset: int,
        fire: bool,
        input_scale: float,
        spike_fn: Callable[[torch.Tensor], torch.Tensor],
        detach_reset: bool,
        backend: Any,
        workspace: Workspace | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (num_steps, *current.shape[1:])
        mem = _empty(workspace, shape, current)
        spikes = _empty(workspace, shape, current) if fire else current.new_zeros(shape)
        backend.integrate(
            current, num_steps, beta, threshold, reset, input_scale, mem, spikes if fire else None
        )
        _remember(ctx, current, num_steps, reset, input_scale, spike_fn, detach_reset, backend, workspace)
        ctx.save_for_backward(mem, beta, threshold)
        ctx.fire = fire
        if not fire:
            ctx.mark_non_differentiable(spikes)
        return spikes, mem

    @staticmethod
    def backward(ctx: Any, grad_spikes: torch.Tensor | None, grad_mem: torch.Tensor | None) -> tuple:
        mem, beta, threshold = ctx.saved_tensors
        grad_spikes = grad_spikes if ctx.fire else None
        out = _empty(ctx.workspace, mem.shape, mem)
        grads = ctx.backend.adjoint(mem, grad_spikes, grad_mem, ctx, beta, threshold, out)
        return (*grads, *[None] * 8)


class _SpikeRecurrence(torch.autograd.Function):
    """The recurrence of a hidden layer, whose membrane nobody reads: returns the spikes only.

    Saved for backward: U, or with ``recompute`` the static current, from which the backward reruns the
    forward loop. The backward writes dL/dI over U, so it can run only once per forward.
    """

    @staticmethod
    def forward(
        ctx: Any,
        current: torch.Tensor,
        beta: torch.Tensor,
        threshold: torch.Tensor,
        num_steps: int,
        reset: int,
        input_scale: float,
        recompute: bool,
        spike_fn: Callable[[torch.Tensor], torch.Tensor],
        detach_reset: bool,
        backend: Any,
        workspace: Workspace | None,
    ) -> torch.Tensor:
        shape = (num_steps, *current.shape[1:])
        spikes = _empty(workspace, shape, current)
        mem = None if recompute else _empty(workspace, shape, current)
        backend.integrate(current, num_steps, beta, threshold, reset, input_scale, mem, spikes)
        _remember(ctx, current, num_steps, reset, input_scale, spike_fn, detach_reset, backend, workspace)
        ctx.save_for_backward(current if mem is None else mem, beta, threshold)
        ctx.recompute = recompute
        ctx.done = False
        return spikes

    @staticmethod
    def backward(ctx: Any, grad_spikes: torch.Tensor | None) -> tuple:
        if ctx.done:
            raise RuntimeError(
                "the fused engine's backward reuses the layer's membrane buffer, so it can run only "
                "once per forward pass (retain_graph=True is not supported); run the forward again"
            )
        ctx.done = True
        saved, beta, threshold = ctx.saved_tensors
        mem = saved
        if ctx.recompute:
            mem = _empty(ctx.workspace, (ctx.num_steps, *saved.shape[1:]), saved)
            ctx.backend.integrate(
                saved, ctx.num_steps, beta, threshold, ctx.reset, ctx.input_scale, mem, None
            )
        grads = ctx.backend.adjoint(mem, grad_spikes, None, ctx, beta, threshold, mem)
        return (*grads, *[None] * 8)


def _remember(
    ctx: Any,
    current: torch.Tensor,
    num_steps: int,
    reset: int,
    input_scale: float,
    spike_fn: Callable[[torch.Tensor], torch.Tensor],
    detach_reset: bool,
    backend: Any,
    workspace: Workspace | None,
) -> None:
    """Store what both recurrences' backward passes read besides the saved tensors."""
    ctx.num_steps, ctx.reset, ctx.input_scale, ctx.spike_fn = num_steps, reset, input_scale, spike_fn
    ctx.detach_reset, ctx.backend, ctx.workspace = detach_reset, backend, workspace
    ctx.static = current.shape[0] != num_steps
    ctx.set_materialize_grads(False)


def _neuron_parameters(
    current: torch.Tensor, leaky: nn.Module, num_steps: int | None
) -> tuple[int, torch.Tensor, torch.Tensor, bool]:
    """T, beta and threshold as ``Leaky`` uses them, and whether the recurrence needs autograd."""
    steps = current.shape[0] if num_steps is None else num_steps
    if current.shape[0] not in (1, steps):
        raise ValueError(f"current has {current.shape[0]} steps; expected 1 (static) or num_steps={steps}")
    beta = leaky.beta.clamp(0, 1).to(current.dtype)
    threshold = leaky.threshold.to(current.dtype)
    needs_grad = torch.is_grad_enabled() and (
        current.requires_grad or beta.requires_grad or threshold.requires_grad
    )
    return steps, beta, threshold, needs_grad


def leaky_sequence(
    current: torch.Tensor,
    leaky: nn.Module,
    fire: bool = True,
    num_steps: int | None = None,
    input_scale: float = 1.0,
    detach_reset: bool = True,
    backend: str = "auto",
    workspace: Workspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run an snnTorch ``Leaky`` over a whole current sequence with the fused recurrence.

    :param current: ``[T, B, ...]`` input current; or ``[1, B, ...]`` with ``num_steps`` = T for the
        same current at every step (direct input), which is never expanded to T copies
    :param leaky: the ``snntorch.Leaky`` whose beta, threshold, reset mechanism and surrogate are used
    :param fire: False for non-spiking integrators (spikes returned as zeros, no reset)
    :param num_steps: T; None takes ``current.shape[0]``
    :param input_scale: factor on the current before it enters ``Leaky`` (``Leaky(input_scale * I)``)
    :param detach_reset: cut the gradient through the reset, as ``Leaky`` does (SpikingJelly
        ``detach_reset=True``); False lets it flow through the spike in the reset term (SpikingJelly's
        default, the paper's code); the forward pass is the same (see ``torch_backend.adjoint``)
    :param backend: one of ``BACKENDS``
    :param workspace: where the ``[T, B, ...]`` buffers come from (None: fresh memory)
    :return: spikes and membrane potentials, ``[T, B, ...]``
    """
    steps, beta, threshold, needs_grad = _neuron_parameters(current, leaky, num_steps)
    reset = int(leaky.reset_mechanism_val) if fire else RESET_NONE
    runner = choose_backend(backend, current, beta, threshold, leaky.spike_grad)
    if needs_grad:
        return _LeakyRecurrence.apply(
            current, beta, threshold, steps, reset, fire, input_scale, leaky.spike_grad, detach_reset,
            runner, workspace,
        )  # fmt: skip
    shape = (steps, *current.shape[1:])
    mem = _empty(workspace, shape, current)
    spikes = _empty(workspace, shape, current) if fire else current.new_zeros(shape)
    runner.integrate(current, steps, beta, threshold, reset, input_scale, mem, spikes if fire else None)
    return spikes, mem


def spike_sequence(
    current: torch.Tensor,
    leaky: nn.Module,
    num_steps: int | None = None,
    input_scale: float = 1.0,
    recompute: bool = False,
    detach_reset: bool = True,
    backend: str = "auto",
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """The spikes of ``leaky_sequence`` alone, for hidden layers: faster and lighter.

    Without autograd the membrane is never stored; with it, the membrane buffer is reused for the
    gradient, so the backward can run only once per forward (no ``retain_graph``).

    :param current: ``[T, B, ...]`` input current, or ``[1, B, ...]`` (static) with ``num_steps``
    :param leaky: the ``snntorch.Leaky`` whose beta, threshold, reset mechanism and surrogate are used
    :param num_steps: T; None takes ``current.shape[0]``
    :param input_scale: factor on the current before it enters ``Leaky``
    :param recompute: for a static current, keep it instead of the ``[T, B, ...]`` membrane for the
        backward pass and recompute the membrane there (less memory, one more forward loop); a
        sequence of currents is as large as the membrane, so this changes nothing for one
    :param detach_reset: cut the gradient through the reset (see ``leaky_sequence``)
    :param backend: one of ``BACKENDS``
    :param workspace: where the ``[T, B, ...]`` buffers come from (None: fresh memory)
    :return: spikes ``[T, B, ...]``
    """
    steps, beta, threshold, needs_grad = _neuron_parameters(current, leaky, num_steps)
    reset = int(leaky.reset_mechanism_val)
    runner = choose_backend(backend, current, beta, threshold, leaky.spike_grad)
    if needs_grad:
        recompute = recompute and current.shape[0] != steps
        return _SpikeRecurrence.apply(
            current, beta, threshold, steps, reset, input_scale, recompute, leaky.spike_grad,
            detach_reset, runner, workspace,
        )  # fmt: skip
    spikes = _empty(workspace, (steps, *current.shape[1:]), current)
    runner.integrate(current, steps, beta, threshold, reset, input_scale, None, spikes)
    return spikes
