"""The reference backend: the membrane recurrence and its adjoint in PyTorch kernels, step by step.

Runs on any device and dtype, for any surrogate and for per-neuron parameters. The forward loop repeats
snnTorch ``Leaky``'s float operations in its order, so spikes and membranes are bit-identical to calling
``Leaky`` step by step; the backward is the adjoint recurrence in reverse time, written out (see
``adjoint``), so no graph is built over the T steps.

- A loop step is three to five kernels that write into preallocated buffers, without temporaries.
- A static current (direct input coding: the same current at every step) stays ``[1, B, ...]``; it is
  never expanded to T copies, forward or backward, and the input scale (1/tau) is applied inside the
  loop, not as a pass of its own.
- The backward runs in chunks of steps small enough to stay in cache, and evaluates snnTorch's ATan
  surrogate (the paper's) in place in three kernels; other surrogates are differentiated with autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from snntorch import surrogate as snn_surrogate

# snnTorch's reset_mechanism_val: 0 subtract, 1 zero, 2 none
RESET_SUBTRACT, RESET_ZERO, RESET_NONE = 0, 1, 2
# The backward processes this many neuron-steps at a time (about 1 MB of float32 per temporary).
CHUNK_ELEMENTS = 1 << 18
# Up to this many neuron-steps the forward loop prefers whole-sequence kernels to per-step ones.
SMALL_ELEMENTS = 1 << 19


def integrate(
    current: torch.Tensor,
    num_steps: int,
    beta: torch.Tensor,
    threshold: torch.Tensor,
    reset: int,
    input_scale: float,
    mem: torch.Tensor | None,
    spikes: torch.Tensor | None,
) -> None:
    """Run the membrane recurrence, writing U into ``mem`` and S (0/1) into ``spikes`` where not None.

    The float operations and their order are snnTorch ``Leaky``'s, so U is bit-identical:

        zero:      U[t] = beta * ((1 - S[t-1]) * U[t-1]) + input_scale * I[t]
        subtract:  U[t] = (beta * U[t-1] + input_scale * I[t]) - S[t-1] * threshold
        none:      U[t] = beta * U[t-1] + input_scale * I[t]
        S[t] = (U[t] - threshold > 0),  U[-1] = 0

    ``addcmul`` may fuse its multiply and add into one rounding (it does on CPU); it is used only where
    the product is exact (one factor is 0 or 1), so fused and unfused give the same bits. (With the zero
    reset, S may be recorded as not(U <= threshold): the same for every membrane that is not NaN.)

    :param current: ``[T, B, ...]``, or ``[1, B, ...]`` for the same current at every step
    :param reset: ``RESET_ZERO``, ``RESET_SUBTRACT`` or ``RESET_NONE``
    :param mem: ``[T, B, ...]`` buffer for U, or None: U is then kept for one step only
    :param spikes: ``[T, B, ...]`` buffer for S, or None
    """
    u = torch.zeros_like(current[0])
    decayed = torch.empty_like(u)
    mems = mem.unbind(0) if mem is not None else [u] * num_steps
    static = current.shape[0] != num_steps
    # A small sequence is cheaper as one kernel over all T steps than as T kernels (fewer launches);
    # a large one is cheaper step by step (no new [T, B, ...] tensor, each step in cache).
    small = num_steps * u.numel() <= SMALL_ELEMENTS
    prescale = input_scale != 1 and (static or small)
    if prescale:
        current = current * input_scale
    currents = current.unbind(0) * (num_steps if static else 1)
    scaled = torch.empty_like(u) if input_scale != 1 and not prescale else None

    def drive(t: int) -> torch.Tensor:
        return currents[t] if scaled is None else torch.mul(currents[t], input_scale, out=scaled)

    if reset == RESET_ZERO:
        # keep = 1 - S[t], the reset's factor. A small sequence records keep in the spike buffer and
        # turns the record into S at the end.
        record_keep = spikes is not None and small
        keeps = spikes.unbind(0) if record_keep else [torch.empty_like(u)] * num_steps
        keep = (u <= threshold).to(u.dtype)
        for t in range(num_steps):
            torch.mul(u, beta, out=decayed)
            u = torch.addcmul(drive(t), decayed, keep, out=mems[t])
            keep = torch.le(u, threshold, out=keeps[t])
            if spikes is not None and not record_keep:
                torch.gt(u, threshold, out=spikes[t])
        if record_keep:
            torch.eq(spikes, 0, out=spikes)
    elif reset == RESET_SUBTRACT:
        spike = (u > threshold).to(u.dtype)  # S[t-1]
        for t in range(num_steps):
            torch.mul(u, beta, out=decayed)
            u = torch.add(decayed, drive(t), out=mems[t])
            u.addcmul_(spike, threshold, value=-1)
            spike = torch.gt(u, threshold, out=spike if spikes is None else spikes[t])
    else:
        for t in range(num_steps):
            torch.mul(u, beta, out=decayed)
            u = torch.add(decayed, drive(t), out=mems[t])
            if spikes is not None:
                torch.gt(u, threshold, out=spikes[t])


def atan_alpha(spike_fn: Callable[[torch.Tensor], torch.Tensor]) -> float | None:
    """alpha of snnTorch's ATan surrogate, recognised by its autograd node; None for other functions.

    The probe is built outside inference mode, so that a forward under ``torch.inference_mode()``
    (SB3's and spikeq's greedy action) can still look at the function's autograd node.
    """
    with torch.inference_mode(False), torch.enable_grad():
        node = spike_fn(torch.zeros((), requires_grad=True)).grad_fn
    return float(node.alpha) if type(node) is snn_surrogate.ATan._backward_cls else None


def _surrogate_product(
    spike_fn: Callable[[torch.Tensor], torch.Tensor], threshold: torch.Tensor, factor: float
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]:
    """A function (grad_spikes, u, out) writing factor * grad_spikes * surrogate'(u - threshold) to out.

    ``out`` may be ``u`` itself. snnTorch's ATan (the paper's), alpha / 2 / (1 + (pi / 2 * alpha * x)^2),
    is recognised by its autograd node and takes three kernels: with y = pi / 2 * alpha * (u - threshold)
    and k = 2 / (alpha * factor), the product is grad_spikes / (k + k * y^2). Any other surrogate
    function is differentiated with autograd.
    """
    alpha = atan_alpha(spike_fn)
    if alpha is not None:
        c = math.pi / 2 * alpha
        k = 2 / (alpha * factor)
        offset, k_tensor = threshold * -c, threshold.new_tensor(k)

        def atan(grad_spikes: torch.Tensor, u: torch.Tensor, out: torch.Tensor) -> None:
            torch.add(offset, u, alpha=c, out=out)
            torch.addcmul(k_tensor, out, out, value=k, out=out)
            torch.div(grad_spikes, out, out=out)

        return atan

    def through_autograd(grad_spikes: torch.Tensor, u: torch.Tensor, out: torch.Tensor) -> None:
        with torch.enable_grad():
            x = (u - threshold).requires_grad_()
            (product,) = torch.autograd.grad(spike_fn(x), x, grad_spikes)
        torch.mul(product, factor, out=out)

    return through_autograd


def _surrogate_derivative(
    spike_fn: Callable[[torch.Tensor], torch.Tensor], threshold: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function u -> surrogate'(u - threshold), a new tensor: the reset's own gradient needs it.

    snnTorch's ATan (the paper's) is written out, alpha / 2 / (1 + (pi / 2 * alpha * x)^2); any other
    surrogate function is differentiated with autograd.
    """
    alpha = atan_alpha(spike_fn)
    if alpha is not None:
        c, half_alpha = math.pi / 2 * alpha, alpha / 2

        def atan(u: torch.Tensor) -> torch.Tensor:
            y = (u - threshold).mul_(c)
            return y.mul_(y).add_(1).reciprocal_().mul_(half_alpha)

        return atan

    def through_autograd(u: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = (u - threshold).requires_grad_()
            (derivative,) = torch.autograd.grad(spike_fn(x), x, torch.ones_like(x))
        return derivative.to(u.dtype)

    return through_autograd


def adjoint(
    mem: torch.Tensor,
    grad_spikes: torch.Tensor | None,
    grad_mem: torch.Tensor | None,
    ctx: Any,
    beta: torch.Tensor,
    threshold: torch.Tensor,
    out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Backward of ``integrate``, in reverse a chunk of steps at a time (chunks stay in cache).

    With G[t] = dL/dU[t], the adjoint runs as H = input_scale * G, which is dL/dI directly:

        H[t] = input_scale * (grad_mem[t] + grad_spikes[t] * sg'[t]) + dU[t+1]/dU[t] * H[t+1]
        sg'[t] = surrogate'(U[t] - threshold)
        dL/dbeta = sum_t G[t+1] * (1 - S[t]) * U[t] (zero reset) or sum_t G[t+1] * U[t]
        dL/dthreshold = -sum_t grad_spikes[t] * sg'[t] + sum_t G[t+1] * dU[t+1]/dthreshold

    With the reset detached (``ctx.detach_reset``; snnTorch's ``Leaky``, SpikingJelly
    ``detach_reset=True``), S[t] in the reset term is a constant:

        zero:      dU[t+1]/dU[t] = beta * (1 - S[t]),            dU[t+1]/dthreshold = 0
        subtract:  dU[t+1]/dU[t] = beta,                         dU[t+1]/dthreshold = -S[t]

    Without (SpikingJelly ``detach_reset=False``, Liu et al.'s code), the gradient also flows through
    S[t] = Heaviside(U[t] - threshold) in the reset:

        zero:      dU[t+1]/dU[t] = beta * (1 - S[t] - U[t] sg'[t]),  dU[t+1]/dthreshold = beta U[t] sg'[t]
        subtract:  dU[t+1]/dU[t] = beta - threshold sg'[t],  dU[t+1]/dthreshold = threshold sg'[t] - S[t]

    and dU/dU = beta with no reset (non-firing neurons).

    :param mem: ``[T, B, ...]`` U of the forward pass
    :param grad_spikes: ``[T, B, ...]`` or None (spikes unused, or the neurons do not fire)
    :param grad_mem: ``[T, B, ...]`` or None
    :param ctx: the autograd context (reset, input_scale, spike_fn, detach_reset, static,
        needs_input_grad)
    :param out: ``[T, B, ...]`` buffer for H; each chunk of ``mem`` is read before the same chunk of
        ``out`` is written, so ``out`` may be ``mem`` itself
    :return: the gradients of the current (``out``, or for a static current its sum over the steps,
        ``[1, B, ...]``), beta and threshold (None where not needed)
    """
    steps, scale, reset = mem.shape[0], ctx.input_scale, ctx.reset
    through_reset = reset != RESET_NONE and not ctx.detach_reset
    surrogate = _surrogate_product(ctx.spike_fn, threshold, scale) if grad_spikes is not None else None
    derivative = _surrogate_derivative(ctx.spike_fn, threshold) if through_reset else None
    chunk = min(steps, max(1, CHUNK_ELEMENTS // max(1, mem[0].numel())))
    # dU[t+1]/dU[t]: with a scalar beta on the CPU and a detached reset, the factor beta goes into the
    # adjoint's kernel as a number, and only 1 - S is computed per step.
    scalar_beta = beta.numel() == 1 and beta.device.type == "cpu" and derivative is None
    beta_value = float(beta) if scalar_beta else None
    keep = mem.new_empty((chunk, *mem.shape[1:])) if reset == RESET_ZERO else None
    through_threshold = None
    carry = torch.zeros_like(mem[0])  # H[t+1]
    summed = torch.zeros_like(mem[0]) if ctx.static else None
    beta_sum = torch.zeros_like(mem[0]) if ctx.needs_input_grad[1] else None
    threshold_sum = torch.zeros_like(mem[0]) if ctx.needs_input_grad[2] else None
    for end in range(steps, 0, -chunk):
        start = max(0, end - chunk)
        u, h = mem[start:end], out[start:end]
        # Everything read from U comes first: h may overwrite it.
        if derivative is not None:
            slope = derivative(u)  # sg'[t]
            if reset == RESET_ZERO:
                factors = torch.le(u, threshold, out=keep[: end - start]).sub_(u * slope).mul_(beta)
                if threshold_sum is not None:
                    through_threshold = slope.mul_(u).mul_(beta)
            else:
                factors = beta - threshold * slope
                if threshold_sum is not None:
                    through_threshold = slope.mul_(threshold)
        elif keep is not None:
            factors = torch.le(u, threshold, out=keep[: end - start])
            if beta_value is None:
                factors.mul_(beta)
        else:
            factors = None if beta_value is not None else beta.expand_as(u)
        if beta_sum is not None:
            through_beta = u * (u <= threshold) if reset == RESET_ZERO else u.clone()
        if threshold_sum is not None and reset == RESET_SUBTRACT:
            reset_spikes = u > threshold
        if grad_spikes is not None:
            surrogate(grad_spikes[start:end], u, h)
            if threshold_sum is not None:
                threshold_sum -= h.sum(0)
            if grad_mem is not None:
                h.add_(grad_mem[start:end], alpha=scale)
        elif grad_mem is not None:
            torch.mul(grad_mem[start:end], scale, out=h)
        else:
            h.zero_()
        for i in range(end - start - 1, -1, -1):
            if beta_sum is not None:
                beta_sum.addcmul_(carry, through_beta[i])
            if threshold_sum is not None and reset == RESET_SUBTRACT:
                threshold_sum.addcmul_(carry, reset_spikes[i], value=-1)
            if through_threshold is not None:
                threshold_sum.addcmul_(carry, through_threshold[i])
            if factors is None:
                carry = h[i].add_(carry, alpha=beta_value)
            elif beta_value is None:
                carry = h[i].addcmul_(carry, factors[i])
            else:
                carry = h[i].addcmul_(carry, factors[i], value=beta_value)
        if summed is not None:
            summed += h[0] if end - start == 1 else h.sum(0)
    # beta_sum and threshold_sum were accumulated from H = input_scale * G.
    grad_beta = None if beta_sum is None else (beta_sum / scale).sum_to_size(beta.shape)
    grad_threshold = None if threshold_sum is None else (threshold_sum / scale).sum_to_size(threshold.shape)
    return (out if summed is None else summed.unsqueeze(0)), grad_beta, grad_threshold
