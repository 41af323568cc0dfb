"""Time-batched ("fused") execution of a feedforward spiking stack.

A feedforward spiking network can be run layer by layer instead of step by step (the paper's network,
``SpikingQNetwork._torso_fused``, reads so):

    current = over_time(synapse, x)       # one conv/matmul over [T*B, ...] (conv1: once, [1, B, ...])
    x = spike_sequence(current, leaky)    # the membrane recurrence over T steps: [T, B, ...] spikes
    ...                                   # every hidden layer in turn, then the readout

Only the membrane recurrence runs sequentially. It is one autograd node (``recurrence``) whose forward
loop builds no graph and whose backward runs the adjoint recurrence in reverse, on a backend chosen by
name (``BACKENDS``), as SpikingJelly chooses its neurons' backends:

- ``torch`` (``torch_backend``): the reference, PyTorch kernels step by step, any device, dtype and
  surrogate;
- ``triton`` (``triton_backend``, ``spikeq.snn.engine.kernels``): all T steps in one launch per layer and
  direction, on CUDA, for the paper's neurons (scalar parameters, ATan surrogate); anything else is
  refused with the reason;
- ``auto``: ``triton`` for CUDA tensors where it is installed and can run the layer, ``torch`` otherwise.

Both give spikes and membranes bit-identical to calling snnTorch's ``Leaky`` step by step, and gradients
equal within float rounding, with the reset's gradient cut (``detach_reset=True``, as ``Leaky``) or not
(SpikingJelly's ``detach_reset=False``, the paper's code). Large ``[T, B, ...]`` buffers can come from a
``Workspace`` that the network owns and reuses from one training step to the next.
"""

from __future__ import annotations

import torch
from torch import nn

from spikeq.snn.engine.recurrence import BACKENDS, choose_backend, leaky_sequence, spike_sequence
from spikeq.snn.engine.workspace import Workspace

__all__ = ["BACKENDS", "Workspace", "choose_backend", "leaky_sequence", "over_time", "spike_sequence"]


def over_time(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a stateless module to every step of a sequence in one call.

    :param module: e.g. a Conv2d or Linear
    :param x: ``[T, B, ...]``
    :return: ``[T, B, ...]`` of the module's output
    """
    steps, batch = x.shape[:2]
    y = module(x.reshape(steps * batch, *x.shape[2:]))
    return y.reshape(steps, batch, *y.shape[1:])
