"""The CPU backend: the recurrence in ``cpu_loops.cpp``, all T steps of a layer in one call per direction.

The PyTorch loop (``torch_backend``) runs four or five kernels per step and layer, each a pass over the
layer's memory; these loops make one pass a step, a block of neurons at a time with its membranes in
cache, on PyTorch's threads (benchmarks/README.md, "A CPU backend"). They take what the paper's DSQN
and the MinAtar preset need: a scalar beta and threshold, float32 or float64, snnTorch's ATan
surrogate; anything else is refused with the reason, never handed to another backend.

The C++ file is compiled with ``torch.utils.cpp_extension`` on first use on a machine (a C++ compiler
and ninja; about half a minute) into torch's extension cache (``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``), and loaded from there afterwards.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from spikeq.snn.engine import torch_backend

DTYPES = (torch.float32, torch.float64)
SOURCE = Path(__file__).with_name("cpu_loops.cpp")
# Contraction off: no fused multiply-add, so the forward rounds every product and sum as PyTorch does.
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]


@functools.cache
def _build() -> tuple[Any, str | None]:
    """(the compiled module, None), or (None, why it could not be built); built once per process."""
    from torch.utils.cpp_extension import load

    try:
        module = load("spikeq_cpu_loops", [str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"])
    except Exception as error:  # no compiler, no ninja, no headers: all say why in their message
        return None, f"{type(error).__name__}: {str(error).strip().splitlines()[-1]}"
    return module, None


def loops() -> Any:
    """The compiled loops.

    :raises RuntimeError: where they cannot be built here, with the compiler's reason
    """
    module, error = _build()
    if module is None:
        raise RuntimeError(f"backend 'cpu' could not build {SOURCE.name} (a C++ compiler and ninja): {error}")
    return module


def available() -> bool:
    """Whether the loops are built, or can be built here (the first call builds them)."""
    return _build()[0] is not None


def check(current: torch.Tensor, beta: torch.Tensor, threshold: torch.Tensor, alpha: float | None) -> None:
    """Raise ``ValueError`` naming what the loops do not take.

    :param alpha: the ATan surrogate's alpha (``torch_backend.atan_alpha``), None for another surrogate
    """
    if current.device.type != "cpu":
        raise ValueError(f"backend 'cpu' runs on CPU tensors, got a {current.device.type} tensor")
    if current.dtype not in DTYPES:
        raise ValueError(f"backend 'cpu' takes float32 or float64, got {current.dtype}; use backend 'torch'")
    if beta.numel() != 1 or threshold.numel() != 1:
        raise ValueError("backend 'cpu' takes a scalar beta and threshold per layer; use backend 'torch'")
    if alpha is None:
        raise ValueError(
            "backend 'cpu' differentiates snnTorch's ATan surrogate only (surrogate='atan'); "
            "use backend 'torch' for other surrogates"
        )


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
    """``torch_backend.integrate`` in one call (the same arguments)."""
    if mem is None and spikes is None:
        return
    loops().integrate(
        current.contiguous(), mem, spikes, num_steps, float(beta), float(threshold), reset, input_scale
    )


def adjoint(
    mem: torch.Tensor,
    grad_spikes: torch.Tensor | None,
    grad_mem: torch.Tensor | None,
    ctx: Any,
    beta: torch.Tensor,
    threshold: torch.Tensor,
    out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``torch_backend.adjoint`` in one call (the same arguments), for snnTorch's ATan surrogate."""
    alpha, scale = torch_backend.atan_alpha(ctx.spike_fn), ctx.input_scale
    terms = mem.new_empty((2, mem[0].numel()))  # per neuron: the terms of dL/dbeta, dL/dthreshold
    loops().adjoint(
        mem,
        None if grad_spikes is None else grad_spikes.contiguous(),
        None if grad_mem is None else grad_mem.contiguous(),
        out,
        terms,
        float(beta),
        float(threshold),
        ctx.reset,
        scale,
        alpha,
        ctx.static,
        ctx.detach_reset,
    )
    grad_current = out[:1] if ctx.static else out
    # the terms were accumulated from H = input_scale * G
    need_beta, need_threshold = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    grad_beta = (terms[0].sum() / scale).reshape(beta.shape) if need_beta else None
    grad_threshold = (terms[1].sum() / scale).reshape(threshold.shape) if need_threshold else None
    return grad_current, grad_beta, grad_threshold
