"""Time-batched ("fused") execution of a feedforward spiking stack.

A feedforward spiking network can be run layer by layer instead of step by step: each layer's synaptic
input for all T steps is one conv/matmul over ``[T*B, ...]`` (``over_time``), and only the membrane
recurrence runs sequentially (``leaky_sequence``). The recurrence is a custom autograd Function: the
forward loop runs without building a graph and keeps only the membrane sequence; the backward runs the
adjoint recurrence in reverse. Both read the snnTorch ``Leaky`` module's own beta, threshold, reset
mechanism and surrogate function, so spikes are identical to calling ``Leaky`` step by step and
gradients equal within float rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# snnTorch's reset_mechanism_val: 0 subtract, 1 zero, 2 none
RESET_SUBTRACT, RESET_ZERO, RESET_NONE = 0, 1, 2


def over_time(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a stateless module to every step of a sequence in one call.

    :param module: e.g. a Conv2d or Linear
    :param x: ``[T, B, ...]``
    :return: ``[T, B, ...]`` of the module's output
    """
    steps, batch = x.shape[:2]
    y = module(x.reshape(steps * batch, *x.shape[2:]))
    return y.reshape(steps, batch, *y.shape[1:])


class _LeakyRecurrence(torch.autograd.Function):
    """U[t] = beta * (1 - S[t-1]) * U[t-1] + I[t] (or the subtract / no-reset variants), S = H(U - thr)."""

    @staticmethod
    def forward(
        ctx,
        current: torch.Tensor,
        beta: torch.Tensor,
        threshold: torch.Tensor,
        reset: int,
        spike_fn: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mem_seq = torch.empty_like(current)  # [T, B, ...]
        spike_seq = torch.empty_like(current)
        mem = torch.zeros_like(current[0])
        spk = torch.zeros_like(current[0])
        # The operation order mirrors snnTorch's Leaky so that spikes match bit for bit.
        for t, current_t in enumerate(current.unbind(0)):
            if reset == RESET_ZERO:
                mem = beta * ((1 - spk) * mem) + current_t
            elif reset == RESET_SUBTRACT:
                mem = beta * mem + current_t - spk * threshold
            else:
                mem = beta * mem + current_t
            spk = (mem - threshold > 0).to(current.dtype)
            mem_seq[t] = mem
            spike_seq[t] = spk
        ctx.save_for_backward(mem_seq, beta, threshold)
        ctx.reset = reset
        ctx.spike_fn = spike_fn
        ctx.set_materialize_grads(False)
        return spike_seq, mem_seq

    @staticmethod
    def backward(ctx, grad_spikes: torch.Tensor | None, grad_mem: torch.Tensor | None):
        mem_seq, beta, threshold = ctx.saved_tensors
        spike_seq = (mem_seq - threshold > 0).to(mem_seq.dtype)
        # dL/dU[t] through S[t] = surrogate(U[t] - thr), for all t at once with snnTorch's own function.
        direct = torch.zeros_like(mem_seq) if grad_mem is None else grad_mem.clone()
        through_spikes = None
        if grad_spikes is not None:
            with torch.enable_grad():
                shifted = (mem_seq - threshold).detach().requires_grad_()
                (through_spikes,) = torch.autograd.grad(ctx.spike_fn(shifted), shifted, grad_spikes)
            direct += through_spikes
        # Adjoint recurrence: g[t] = direct[t] + g[t+1] * dU[t+1]/dU[t]; the reset is detached.
        keep = (1 - spike_seq) if ctx.reset == RESET_ZERO else torch.ones_like(spike_seq)
        decay = beta * keep  # [T, B, ...]: dU[t+1]/dU[t]
        grad_current = torch.empty_like(mem_seq)
        grad = torch.zeros_like(mem_seq[0])
        for t in range(mem_seq.shape[0] - 1, -1, -1):
            grad = direct[t] + grad * decay[t]
            grad_current[t] = grad

        grad_beta = grad_threshold = None
        if ctx.needs_input_grad[1]:
            # dU[t]/dbeta = keep[t-1] * U[t-1]
            grad_beta = (grad_current[1:] * keep[:-1] * mem_seq[:-1]).sum_to_size(beta.shape)
        if ctx.needs_input_grad[2]:
            grad_threshold = torch.zeros_like(mem_seq)
            if through_spikes is not None:
                grad_threshold -= through_spikes
            if ctx.reset == RESET_SUBTRACT:
                grad_threshold[1:] -= grad_current[1:] * spike_seq[:-1]
            grad_threshold = grad_threshold.sum_to_size(threshold.shape)
        return grad_current, grad_beta, grad_threshold, None, None


def leaky_sequence(
    current: torch.Tensor, leaky: nn.Module, fire: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run an snnTorch ``Leaky`` over a whole current sequence with the fused recurrence.

    :param current: ``[T, B, ...]`` input current, already scaled
    :param leaky: the ``snntorch.Leaky`` whose beta, threshold, reset mechanism and surrogate are used
    :param fire: False for non-spiking integrators (spikes returned as zeros, no reset)
    :return: spikes and membrane potentials, ``[T, B, ...]``
    """
    beta = leaky.beta.clamp(0, 1).to(current.dtype)
    threshold = leaky.threshold.to(current.dtype)
    reset = int(leaky.reset_mechanism_val) if fire else RESET_NONE
    spikes, mem = _LeakyRecurrence.apply(current, beta, threshold, reset, leaky.spike_grad)
    if not fire:
        spikes = torch.zeros_like(mem)
    return spikes, mem
