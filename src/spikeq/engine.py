"""Time-batched ("fused") execution of a feedforward spiking stack.

A feedforward spiking network can be run layer by layer instead of step by step: each layer's synaptic
input for all T steps is one conv/matmul over ``[T*B, ...]`` (``over_time``), and only the membrane
recurrence runs sequentially (``leaky_sequence``). The recurrence is a custom autograd Function: the
forward loop runs without building a graph and keeps only the membrane sequence; the backward runs the
adjoint recurrence in reverse. Both read the snnTorch ``Leaky`` module's own beta, threshold, reset
mechanism and surrogate function, so spikes are identical to calling ``Leaky`` step by step and
gradients equal within float rounding.

Speed on a CPU comes from three things: every loop step is a few out-of-place-free kernels writing
straight into the preallocated ``[T, B, ...]`` outputs (three per step for the paper's hard reset); a
static current (direct input coding: the same current at every step) is passed as ``[1, B, ...]`` and
never expanded to T copies, forward or backward; and the backward works on chunks of steps small enough
to stay in cache, so the surrogate gradient and the adjoint recurrence do not stream ``[T, B, ...]``
temporaries through memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# snnTorch's reset_mechanism_val: 0 subtract, 1 zero, 2 none
RESET_SUBTRACT, RESET_ZERO, RESET_NONE = 0, 1, 2
# The backward processes this many neuron-steps at a time (about 1 MB of float32 per temporary).
CHUNK_ELEMENTS = 1 << 18


def over_time(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a stateless module to every step of a sequence in one call.

    :param module: e.g. a Conv2d or Linear
    :param x: ``[T, B, ...]``
    :return: ``[T, B, ...]`` of the module's output
    """
    steps, batch = x.shape[:2]
    y = module(x.reshape(steps * batch, *x.shape[2:]))
    return y.reshape(steps, batch, *y.shape[1:])


def _integrate(
    current: torch.Tensor,
    beta: torch.Tensor,
    threshold: torch.Tensor,
    reset: int,
    mem: torch.Tensor,
    spikes: torch.Tensor | None,
) -> None:
    """Run the membrane recurrence, writing U into ``mem`` and, unless None, S (0/1) into ``spikes``.

    The float operations and their order are snnTorch ``Leaky``'s, so U is bit-identical:

        zero:      U[t] = beta * ((1 - S[t-1]) * U[t-1]) + I[t]
        subtract:  U[t] = (beta * U[t-1] + I[t]) - S[t-1] * threshold
        none:      U[t] = beta * U[t-1] + I[t]
        S[t] = (U[t] - threshold > 0),  U[-1] = 0

    ``addcmul`` may fuse its multiply and add into one rounding (it does on CPU); it is used only where
    the product is exact (one factor is 0 or 1), so fused and unfused give the same bits.

    :param current: ``[T, B, ...]``, or ``[1, B, ...]`` for the same current at every step
    :param reset: ``RESET_ZERO``, ``RESET_SUBTRACT`` or ``RESET_NONE``
    :param mem: ``[T, B, ...]`` output buffer for U
    :param spikes: ``[T, B, ...]`` output buffer for S, or None
    """
    steps = mem.shape[0]
    currents = current.unbind(0) if current.shape[0] == steps else current.unbind(0) * steps
    mems = mem.unbind(0)
    prev = torch.zeros_like(mems[0])
    decayed = torch.empty_like(prev)
    if reset == RESET_NONE:
        for t in range(steps):
            torch.mul(prev, beta, out=decayed)
            prev = torch.add(decayed, currents[t], out=mems[t])
        if spikes is not None:
            torch.gt(mem, threshold, out=spikes)
        return
    # Per-step spike (or keep) records: into ``spikes`` when wanted, else two alternating buffers.
    records = spikes.unbind(0) if spikes is not None else [torch.empty_like(prev), decayed.clone()] * steps
    if reset == RESET_ZERO:
        # The loop records keep = 1 - S, the reset's factor, and turns it into S at the end.
        keep = (prev <= threshold).to(prev.dtype)
        for t in range(steps):
            torch.mul(prev, beta, out=decayed)
            prev = torch.addcmul(currents[t], decayed, keep, out=mems[t])
            keep = torch.le(prev, threshold, out=records[t])
        if spikes is not None:
            torch.eq(spikes, 0, out=spikes)
        return
    spike = (prev > threshold).to(prev.dtype)
    for t in range(steps):
        torch.mul(prev, beta, out=decayed)
        prev = torch.add(decayed, currents[t], out=mems[t])
        prev.addcmul_(spike, threshold, value=-1)
        spike = torch.gt(prev, threshold, out=records[t])


def _adjoint(
    mem: torch.Tensor,
    beta: torch.Tensor,
    threshold: torch.Tensor,
    reset: int,
    spike_fn: Callable[[torch.Tensor], torch.Tensor],
    grad_spikes: torch.Tensor | None,
    grad_mem: torch.Tensor | None,
    static: bool,
    needs_grad: tuple[bool, bool],
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Backward of ``_integrate``: the adjoint G[t] = dL/dU[t], run in reverse, a chunk of steps at a time.

        G[t] = grad_mem[t] + grad_spikes[t] * surrogate'(U[t] - threshold) + G[t+1] * dU[t+1]/dU[t]
        dU[t+1]/dU[t] = beta * (1 - S[t]) (zero reset; the reset is detached), beta otherwise
        dL/dI[t] = G[t];  dL/dbeta = sum_t G[t+1] * (1 - S[t]) * U[t] (zero) or G[t+1] * U[t]
        dL/dthreshold = -sum_t grad_spikes[t] * surrogate'(U[t] - thr) (- sum_t G[t+1] * S[t]: subtract)

    :param mem: ``[T, B, ...]`` the membrane of the forward pass
    :param spike_fn: the surrogate spike function, differentiated with autograd so that any snnTorch
        surrogate works
    :param grad_spikes: ``[T, B, ...]`` or None (spikes unused or the neurons do not fire)
    :param grad_mem: ``[T, B, ...]`` or None
    :param static: the current was ``[1, B, ...]``: return its gradient summed over the steps
    :param needs_grad: whether beta and threshold need gradients
    :return: gradients of the current, beta and threshold (None where not needed)
    """
    steps = mem.shape[0]
    chunk = max(1, CHUNK_ELEMENTS // max(1, mem[0].numel()))
    grad_current = None if static else torch.empty_like(mem)
    buffer = mem.new_empty((min(chunk, steps), *mem.shape[1:])) if static else None
    summed = torch.zeros_like(mem[0]) if static else None
    carry = torch.zeros_like(mem[0])  # G[t1], the adjoint of the step after the chunk
    beta_sum = torch.zeros_like(mem[0]) if needs_grad[0] else None
    threshold_sum = torch.zeros_like(mem[0]) if needs_grad[1] else None
    for end in range(steps, 0, -chunk):
        start = max(0, end - chunk)
        u = mem[start:end]
        g = buffer[: end - start] if static else grad_current[start:end]
        if grad_mem is None:
            g.zero_()
        else:
            g.copy_(grad_mem[start:end])
        if grad_spikes is not None:
            with torch.enable_grad():
                shifted = (u - threshold).requires_grad_()
                (through_spikes,) = torch.autograd.grad(spike_fn(shifted), shifted, grad_spikes[start:end])
            g += through_spikes
            if threshold_sum is not None:
                threshold_sum -= through_spikes.sum(0)
        spiked = u > threshold if reset != RESET_NONE else None
        decay = torch.where(spiked, 0.0, beta) if reset == RESET_ZERO else beta.expand_as(u)
        # Terms of beta and threshold that need G[t+1] at the chunk's last step use the carry.
        if beta_sum is not None:
            x = torch.where(spiked, 0.0, u) if reset == RESET_ZERO else u
            beta_sum.addcmul_(carry, x[-1])
        if threshold_sum is not None and reset == RESET_SUBTRACT:
            threshold_sum.sub_(carry * spiked[-1])
        for t in range(end - start - 1, -1, -1):
            carry = g[t].addcmul_(carry, decay[t])
        if beta_sum is not None:
            beta_sum += (g[1:] * x[:-1]).sum(0)
        if threshold_sum is not None and reset == RESET_SUBTRACT:
            threshold_sum -= (g[1:] * spiked[:-1]).sum(0)
        if static:
            summed += g.sum(0)
            carry = carry.clone()
    grad_beta = None if beta_sum is None else beta_sum.sum_to_size(beta.shape)
    grad_threshold = None if threshold_sum is None else threshold_sum.sum_to_size(threshold.shape)
    return (summed.unsqueeze(0) if static else grad_current), grad_beta, grad_threshold


class _LeakyRecurrence(torch.autograd.Function):
    """The membrane recurrence as one autograd node (see ``_integrate`` and ``_adjoint``).

    Saved for backward: the membrane U only, or with ``recompute`` the current, from which the backward
    reruns the forward loop; spikes and reset masks are recomputed from U.
    """

    @staticmethod
    def forward(
        ctx,
        current: torch.Tensor,
        beta: torch.Tensor,
        threshold: torch.Tensor,
        num_steps: int,
        reset: int,
        fire: bool,
        recompute: bool,
        spike_fn: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (num_steps, *current.shape[1:])
        mem = current.new_empty(shape)
        spikes = current.new_empty(shape) if fire else current.new_zeros(shape)
        _integrate(current, beta, threshold, reset, mem, spikes if fire else None)
        ctx.save_for_backward(current if recompute else mem, beta, threshold)
        ctx.num_steps, ctx.reset, ctx.fire, ctx.recompute = num_steps, reset, fire, recompute
        ctx.static = current.shape[0] != num_steps
        ctx.spike_fn = spike_fn
        ctx.set_materialize_grads(False)
        if not fire:
            ctx.mark_non_differentiable(spikes)
        return spikes, mem

    @staticmethod
    def backward(ctx, grad_spikes: torch.Tensor | None, grad_mem: torch.Tensor | None):
        saved, beta, threshold = ctx.saved_tensors
        if ctx.recompute:
            mem = saved.new_empty((ctx.num_steps, *saved.shape[1:]))
            _integrate(saved, beta, threshold, ctx.reset, mem, None)
        else:
            mem = saved
        grads = _adjoint(
            mem,
            beta,
            threshold,
            ctx.reset,
            ctx.spike_fn,
            grad_spikes if ctx.fire else None,
            grad_mem,
            ctx.static,
            (ctx.needs_input_grad[1], ctx.needs_input_grad[2]),
        )
        return (*grads, None, None, None, None, None)


def leaky_sequence(
    current: torch.Tensor,
    leaky: nn.Module,
    fire: bool = True,
    num_steps: int | None = None,
    recompute: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run an snnTorch ``Leaky`` over a whole current sequence with the fused recurrence.

    :param current: ``[T, B, ...]`` input current, already scaled; or ``[1, B, ...]`` with
        ``num_steps`` = T for the same current at every step (direct input), which is never expanded
    :param leaky: the ``snntorch.Leaky`` whose beta, threshold, reset mechanism and surrogate are used
    :param fire: False for non-spiking integrators (spikes returned as zeros, no reset)
    :param num_steps: T; None takes ``current.shape[0]``
    :param recompute: keep the current instead of the membrane for the backward pass and recompute the
        membrane there: less memory when the current is static (``[1, B, ...]``), one more forward loop
    :return: spikes and membrane potentials, ``[T, B, ...]``
    """
    steps = current.shape[0] if num_steps is None else num_steps
    if current.shape[0] not in (1, steps):
        raise ValueError(f"current has {current.shape[0]} steps; expected 1 (static) or num_steps={steps}")
    beta = leaky.beta.clamp(0, 1).to(current.dtype)
    threshold = leaky.threshold.to(current.dtype)
    reset = int(leaky.reset_mechanism_val) if fire else RESET_NONE
    if torch.is_grad_enabled() and (current.requires_grad or beta.requires_grad or threshold.requires_grad):
        return _LeakyRecurrence.apply(
            current, beta, threshold, steps, reset, fire, recompute, leaky.spike_grad
        )
    shape = (steps, *current.shape[1:])
    mem = current.new_empty(shape)
    spikes = current.new_empty(shape) if fire else current.new_zeros(shape)
    _integrate(current, beta, threshold, reset, mem, spikes if fire else None)
    return spikes, mem
