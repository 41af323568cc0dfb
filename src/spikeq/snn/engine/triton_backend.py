"""The Triton backend: the recurrence in spikeq.snn.engine.kernels, one launch per layer and direction (CUDA).

At T = 64 a training step of the paper's DSQN issues over a thousand small kernel launches with the
PyTorch loop; on a GPU their fixed cost, not arithmetic, bounds it. The kernels run all T steps with the
membrane in registers. They take what the paper's DSQN needs and nothing else: a scalar beta and
threshold, float32 or float64, and snnTorch's ATan surrogate (the adjoint is written for it); anything
else is refused with the reason, never handed to another backend.

CUDA tensors only, except under Triton's interpreter (``TRITON_INTERPRET=1`` set before
``spikeq.snn.engine.kernels`` is first imported), which runs the same kernels on CPU tensors through
numpy: the tests check the kernels that way on machines without a GPU.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch

from spikeq.snn.engine import torch_backend

DTYPES = (torch.float32, torch.float64)


def kernels() -> Any:
    """spikeq.snn.engine.kernels (imported on first use, so TRITON_INTERPRET set before then applies).

    :raises RuntimeError: where Triton cannot be imported
    """
    try:
        return importlib.import_module("spikeq.snn.engine.kernels")
    except ImportError as error:
        raise RuntimeError(
            f"backend 'triton' needs the triton package (pip install triton): {error}"
        ) from None


def available() -> bool:
    """Whether Triton can be imported here."""
    try:
        kernels()
    except RuntimeError:
        return False
    return True


def check(current: torch.Tensor, beta: torch.Tensor, threshold: torch.Tensor, alpha: float | None) -> None:
    """Raise ``ValueError`` naming what the kernels do not take.

    :param alpha: the ATan surrogate's alpha (``torch_backend.atan_alpha``), None for another surrogate
    """
    if not current.is_cuda and not os.environ.get("TRITON_INTERPRET"):
        raise ValueError(
            f"backend 'triton' runs on CUDA tensors, got a {current.device.type} tensor; use backend "
            "'torch' (or set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter)"
        )
    if current.dtype not in DTYPES:
        raise ValueError(
            f"backend 'triton' takes float32 or float64, got {current.dtype}; use backend 'torch'"
        )
    if beta.numel() != 1 or threshold.numel() != 1:
        raise ValueError("backend 'triton' takes a scalar beta and threshold per layer; use backend 'torch'")
    if alpha is None:
        raise ValueError(
            "backend 'triton' differentiates snnTorch's ATan surrogate only (surrogate='atan'); "
            "use backend 'torch' for other surrogates"
        )


def integrate(*args: Any) -> None:
    """``torch_backend.integrate`` in one launch (the same arguments)."""
    kernels().integrate(*args)


def adjoint(
    mem: torch.Tensor,
    grad_spikes: torch.Tensor | None,
    grad_mem: torch.Tensor | None,
    ctx: Any,
    beta: torch.Tensor,
    threshold: torch.Tensor,
    out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``torch_backend.adjoint`` in one launch (the same arguments)."""
    alpha = torch_backend.atan_alpha(ctx.spike_fn)
    return kernels().adjoint(mem, grad_spikes, grad_mem, ctx, beta, threshold, out, alpha)
