"""Readouts: the last hidden layer's spike sequence ``[T, B, F]`` -> Q-values ``[B, n_actions]``.

- ``rate`` (the paper's DSQN): Q = W (1/T sum_t s[t]) + b, a linear map of the firing rates.
- ``spike`` (DSQN-Spike ablation): the output layer is spiking too, Q = 1/T sum_t s_out[t], so Q is
  quantised to multiples of 1/T (the paper's "confusing Q-values").
- ``max_mem``, ``last_mem``, ``mean_mem`` (Chen et al. 2022): non-spiking output neurons integrate
  the current I[t] = W s[t] + b without firing, U[t] = beta U[t-1] + I[t] / tau (LIF; the IF neuron:
  U[t] = U[t-1] + I[t]), and Q is the max / last / mean of U over t.
"""

from __future__ import annotations

import torch
from torch import nn

from spikeq.snn.engine import Workspace, over_time
from spikeq.snn.neurons import NeuronSpec, SpikingLayer

READOUTS = ("rate", "spike", "max_mem", "last_mem", "mean_mem")


class Readout(nn.Module):
    """Maps a spike sequence to Q-values.

    :param kind: one of ``READOUTS``
    :param in_features: size of the last hidden layer
    :param n_actions: number of Q-values
    :param neuron: neuron model of the output neurons (``spike`` and membrane readouts)
    :param backend: where the fused engine runs the output neurons' recurrence (``engine.BACKENDS``)
    :param workspace: where the fused engine takes its large buffers from (None: fresh memory)
    """

    def __init__(
        self,
        kind: str,
        in_features: int,
        n_actions: int,
        neuron: NeuronSpec,
        backend: str = "auto",
        workspace: Workspace | None = None,
    ) -> None:
        super().__init__()
        if kind not in READOUTS:
            raise ValueError(f"unknown readout {kind!r}; allowed: {', '.join(READOUTS)}")
        self.kind = kind
        self.linear = nn.Linear(in_features, n_actions)
        self.neurons = (
            None
            if kind == "rate"
            else SpikingLayer(neuron, fire=kind == "spike", backend=backend, workspace=workspace)
        )

    def forward(
        self, spikes: torch.Tensor, num_steps: int, engine: str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:param spikes: ``[T, B, F]`` spikes of the last hidden layer
        :param num_steps: T
        :param engine: ``"fused"`` or ``"snntorch"``
        :return: Q ``[B, n_actions]``, and the output spikes ``[T, B, n_actions]`` for ``spike``
            (else None)
        """
        if self.neurons is None:
            return self.linear(spikes.mean(0)), None
        out_spikes, mem = self.neurons(over_time(self.linear, spikes), num_steps, engine)
        if self.kind == "spike":
            return out_spikes.mean(0), out_spikes
        if self.kind == "max_mem":
            return mem.max(0).values, None
        if self.kind == "last_mem":
            return mem[-1], None
        return mem.mean(0), None
