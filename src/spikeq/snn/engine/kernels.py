"""Triton kernels for the membrane recurrence: one launch per layer and direction instead of T steps.

On a GPU, ``engine.torch_backend.integrate`` launches three to five small kernels per step and layer,
and the adjoint as many again: at T = 64 a training step of the paper's DSQN issues over a thousand launches,
and their fixed cost, not arithmetic, bounds it. Here each program owns a block of neurons and runs
all T steps with the membrane in registers: one launch forward, one backward per layer.

- Forward: the float operations of ``engine.torch_backend.integrate`` in its order, with floating-point
  contraction off (no fused multiply-add), so spikes and membranes are bit-identical to the PyTorch
  loop's, hence to snnTorch ``Leaky``'s.
- Backward: ``engine.torch_backend.adjoint`` for snnTorch's ATan surrogate (the paper's), with the
  reset's gradient cut or not (``detach_reset``); gradients equal within float rounding (sums are taken
  in another order).
- Scalar beta and threshold only (the DSQN's); ``engine.triton_backend`` refuses per-neuron ones and
  other surrogates.

The engine imports this module on first use of the ``triton`` backend. With ``TRITON_INTERPRET=1`` set
before that, Triton's interpreter runs the kernels on CPU tensors through numpy, with the same float
operations; the tests check the kernels that way on machines without a GPU.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
import triton
import triton.language as tl

# Neurons per program: at batch 32 the DSQN's layers have 16k (fc1) to 410k (conv1) neurons, so a
# layer takes 64 to 1,600 programs.
BLOCK = 256
# reset codes, as engine.torch_backend.RESET_*: snnTorch's reset_mechanism_val (constexpr: read inside
# the kernels)
_SUBTRACT, _ZERO = tl.constexpr(0), tl.constexpr(1)


@triton.jit
def _forward_kernel(
    current,
    mem,
    spikes,
    constants,
    n,
    steps,
    current_stride,
    RESET: tl.constexpr,
    SCALED: tl.constexpr,
    STORE_MEM: tl.constexpr,
    STORE_SPIKES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """U[t] and S[t] for ``n`` neurons over ``steps`` steps; see ``engine.torch_backend.integrate`` for the
    recurrence. ``current_stride`` is n, or 0 for the same current at every step."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    beta = tl.load(constants)
    threshold = tl.load(constants + 1)
    scale = tl.load(constants + 2)
    u = tl.zeros([BLOCK], dtype=constants.dtype.element_ty)
    # keep = 1 - S[t-1] (zero reset) or S[t-1] (subtract reset), as a float
    previous = (u <= threshold).to(u.dtype) if RESET == _ZERO else (u > threshold).to(u.dtype)
    current_at = current + offsets
    mem_at = mem + offsets
    spikes_at = spikes + offsets
    for _ in range(steps):
        drive = tl.load(current_at, mask=inside, other=0)
        if SCALED:
            drive = drive * scale
        decayed = u * beta
        if RESET == _ZERO:
            u = decayed * previous + drive
            previous = (u <= threshold).to(u.dtype)
        elif RESET == _SUBTRACT:
            u = (decayed + drive) - previous * threshold
            previous = (u > threshold).to(u.dtype)
        else:
            u = decayed + drive
        if STORE_MEM:
            tl.store(mem_at, u, mask=inside)
        if STORE_SPIKES:
            tl.store(spikes_at, (u > threshold).to(u.dtype), mask=inside)
        current_at += current_stride
        mem_at += n
        spikes_at += n


@triton.jit
def _adjoint_kernel(
    mem,
    grad_spikes,
    grad_mem,
    out,
    beta_terms,
    threshold_terms,
    constants,
    n,
    steps,
    last,
    RESET: tl.constexpr,
    HAS_GRAD_SPIKES: tl.constexpr,
    HAS_GRAD_MEM: tl.constexpr,
    STATIC: tl.constexpr,
    NEED_BETA: tl.constexpr,
    NEED_THRESHOLD: tl.constexpr,
    DETACH_RESET: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """H = dL/dI in reverse time, per neuron; see ``engine.torch_backend.adjoint`` for the equations (with the
    reset's gradient cut, DETACH_RESET, or flowing through the spike in the reset). ``out`` gets
    H[t] (or, with STATIC, the sum over t in its first n entries) and may be ``mem`` itself: each
    entry is read before it is written, by the same program."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    beta = tl.load(constants)
    threshold = tl.load(constants + 1)
    scale = tl.load(constants + 2)
    slope = tl.load(constants + 3)
    offset = tl.load(constants + 4)
    k = tl.load(constants + 5)
    half_alpha = tl.load(constants + 6)
    carry = tl.zeros([BLOCK], dtype=constants.dtype.element_ty)  # H[t+1]
    summed = tl.zeros_like(carry)
    beta_sum = tl.zeros_like(carry)
    threshold_sum = tl.zeros_like(carry)
    mem_at = mem + last + offsets
    grad_spikes_at = grad_spikes + last + offsets
    grad_mem_at = grad_mem + last + offsets
    out_at = out + last + offsets
    for _ in range(steps):
        u = tl.load(mem_at, mask=inside, other=0)
        h = tl.zeros_like(carry)
        y = offset + u * slope  # pi / 2 * alpha * (u - threshold)
        if HAS_GRAD_SPIKES:
            # scale * grad * ATan'(u - threshold) = grad / (k + k * y^2)
            h = tl.load(grad_spikes_at, mask=inside, other=0) / (k + k * (y * y))
            if NEED_THRESHOLD:
                threshold_sum -= h
        if HAS_GRAD_MEM:
            h += tl.load(grad_mem_at, mask=inside, other=0) * scale
        keep = (u <= threshold).to(u.dtype)
        if NEED_BETA:
            beta_sum += carry * (u * keep if RESET == _ZERO else u)
        if NEED_THRESHOLD and RESET == _SUBTRACT:
            threshold_sum -= carry * (u > threshold).to(u.dtype)
        if RESET == _ZERO:
            if DETACH_RESET:
                factor = beta * keep
            else:
                derivative = half_alpha / (1 + y * y)  # ATan'(u - threshold)
                factor = beta * (keep - u * derivative)
                if NEED_THRESHOLD:
                    threshold_sum += carry * (beta * u * derivative)
        elif RESET == _SUBTRACT:
            if DETACH_RESET:
                factor = beta
            else:
                derivative = half_alpha / (1 + y * y)
                factor = beta - threshold * derivative
                if NEED_THRESHOLD:
                    threshold_sum += carry * (threshold * derivative)
        else:
            factor = beta
        carry = h + carry * factor
        if STATIC:
            summed += carry
        else:
            tl.store(out_at, carry, mask=inside)
        mem_at -= n
        grad_spikes_at -= n
        grad_mem_at -= n
        out_at -= n
    if STATIC:
        tl.store(out + offsets, summed, mask=inside)
    if NEED_BETA:
        tl.store(beta_terms + offsets, beta_sum, mask=inside)
    if NEED_THRESHOLD:
        tl.store(threshold_terms + offsets, threshold_sum, mask=inside)


# Launch options. Forward: no fused multiply-add, so every product and sum rounds as PyTorch's kernels
# round it (tests/test_kernels.py reads the PTX). Backward: fused, gradients need only agree within
# rounding. The interpreter computes with numpy, which never contracts, and takes neither option.
_INTERPRETED = type(_forward_kernel).__name__ == "InterpretedFunction"
_EXACT = {} if _INTERPRETED else {"enable_fp_fusion": False}
_FUSED = {} if _INTERPRETED else {"enable_fp_fusion": True}


@lru_cache(maxsize=64)
def _numbers(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A constant tensor, copied to the device once rather than at every launch."""
    return torch.tensor(values, dtype=dtype, device=device)


def _constants(
    like: torch.Tensor, beta: torch.Tensor, threshold: torch.Tensor, *values: float
) -> torch.Tensor:
    """[beta, threshold, *values] as one tensor of ``like``'s dtype on its device, without a host sync."""
    numbers = _numbers(values, like.dtype, like.device)
    return torch.cat([beta.reshape(1), threshold.reshape(1), numbers]).to(like.dtype)


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
    """``engine.torch_backend.integrate`` in one launch (same arguments; scalar beta and threshold)."""
    current = current.contiguous()
    n = current[0].numel()
    target = mem if mem is not None else spikes
    if target is None or n == 0 or num_steps == 0:
        return
    _forward_kernel[(triton.cdiv(n, BLOCK),)](
        current,
        target if mem is None else mem,
        target if spikes is None else spikes,
        _constants(current, beta, threshold, input_scale),
        n,
        num_steps,
        0 if current.shape[0] != num_steps else n,
        RESET=reset,
        SCALED=input_scale != 1,
        STORE_MEM=mem is not None,
        STORE_SPIKES=spikes is not None,
        BLOCK=BLOCK,
        **_EXACT,
    )


def adjoint(
    mem: torch.Tensor,
    grad_spikes: torch.Tensor | None,
    grad_mem: torch.Tensor | None,
    ctx: Any,
    beta: torch.Tensor,
    threshold: torch.Tensor,
    out: torch.Tensor,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``engine.torch_backend.adjoint`` in one launch, for snnTorch's ATan surrogate with this ``alpha`` (the
    surrogate's derivative enters through grad_spikes, and through the reset unless it is detached)."""
    steps, n, scale = mem.shape[0], mem[0].numel(), ctx.input_scale
    slope = torch.pi / 2 * alpha
    constants = _constants(mem, beta, threshold, scale, slope, 0.0, 2 / (alpha * scale), alpha / 2)
    constants[4] = constants[1] * -slope  # the offset, rounded as torch_backend._surrogate_product rounds it
    need_beta, need_threshold = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    terms = mem.new_empty((2, n)) if need_beta or need_threshold else mem
    grad_spikes = grad_spikes.contiguous() if grad_spikes is not None else None
    grad_mem = grad_mem.contiguous() if grad_mem is not None else None
    if n:
        _adjoint_kernel[(triton.cdiv(n, BLOCK),)](
            mem,
            mem if grad_spikes is None else grad_spikes,
            mem if grad_mem is None else grad_mem,
            out,
            terms[0],
            terms[-1],
            constants,
            n,
            steps,
            (steps - 1) * n,
            RESET=ctx.reset,
            HAS_GRAD_SPIKES=grad_spikes is not None,
            HAS_GRAD_MEM=grad_mem is not None,
            STATIC=ctx.static,
            NEED_BETA=need_beta,
            NEED_THRESHOLD=need_threshold,
            DETACH_RESET=ctx.detach_reset,
            BLOCK=BLOCK,
            **_FUSED,
        )
    grad_current = out[:1] if ctx.static else out
    # the sums were accumulated from H = input_scale * G
    grad_beta = (terms[0].sum() / scale).reshape(beta.shape) if need_beta else None
    grad_threshold = (terms[-1].sum() / scale).reshape(threshold.shape) if need_threshold else None
    return grad_current, grad_beta, grad_threshold
