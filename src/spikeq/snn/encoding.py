"""Input encoders: observation -> input of the first layer at every time step.

- ``direct`` (the paper, also called static or constant-current coding): the observation itself is
  the input at every step, so the first layer's output I = W x is computed ONCE and injected as the
  same current at each of the T steps. Returned with a time dimension of 1: ``[1, B, ...]``.
- ``poisson`` (rate coding): at each step t every feature fires a Bernoulli spike with probability
  equal to its value in [0, 1], drawn fresh each step: x_s[t] ~ Bernoulli(x). The first layer then runs
  at every step on spikes: ``[T, B, ...]``.
"""

from __future__ import annotations

import numpy as np
import torch
from gymnasium import spaces
from torch import nn

ENCODERS = ("direct", "poisson")


class DirectEncoder(nn.Module):
    """Constant-current input: the observation is presented unchanged at every step."""

    analog = True

    def forward(self, obs: torch.Tensor, num_steps: int) -> torch.Tensor:
        """:param obs: ``[B, ...]`` preprocessed observation
        :param num_steps: T (unused: the input is the same at every step)
        :return: ``[1, B, ...]``, broadcast over the T steps by the first spiking layer
        """
        return obs.unsqueeze(0)


class PoissonEncoder(nn.Module):
    """Bernoulli rate coding: spike with probability equal to the feature's value in [0, 1].

    Images are already in [0, 1] after SB3's /255 normalisation. Vector features are rescaled with the
    observation space's bounds, x' = (x - low) / (high - low), which must therefore be finite.

    :param observation_space: the observation space, for its bounds
    :param is_image: whether observations are images normalised to [0, 1]
    """

    analog = False

    def __init__(self, observation_space: spaces.Space, is_image: bool) -> None:
        super().__init__()
        low = high = None
        if not is_image and isinstance(observation_space, spaces.Box):
            low = np.asarray(observation_space.low, dtype=np.float32).reshape(-1)
            high = np.asarray(observation_space.high, dtype=np.float32).reshape(-1)
            if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
                raise ValueError(
                    "encoder='poisson' needs bounded observations to turn them into spike "
                    f"probabilities, but the observation space {observation_space} has infinite "
                    "bounds; use encoder='direct' or wrap the env so its Box bounds are finite"
                )
        self.register_buffer("low", None if low is None else torch.as_tensor(low))
        self.register_buffer("span", None if high is None else torch.as_tensor(high - low))

    def forward(self, obs: torch.Tensor, num_steps: int) -> torch.Tensor:
        """:param obs: ``[B, ...]`` preprocessed observation
        :param num_steps: T
        :return: ``[T, B, ...]`` spikes (0/1 floats), fresh at each step
        """
        prob = obs if self.low is None else (obs.flatten(1) - self.low) / self.span
        prob = prob.reshape(obs.shape).clamp(0, 1)
        return (torch.rand((num_steps, *prob.shape), device=obs.device) < prob).to(obs.dtype)


def make_encoder(name: str, observation_space: spaces.Space, is_image: bool) -> nn.Module:
    """Build the encoder ``name`` (one of ``ENCODERS``).

    :param name: ``"direct"`` or ``"poisson"``
    :param observation_space: the observation space (Poisson coding rescales by its bounds)
    :param is_image: whether observations are images normalised to [0, 1]
    """
    if name == "direct":
        return DirectEncoder()
    if name == "poisson":
        return PoissonEncoder(observation_space, is_image)
    raise ValueError(f"unknown encoder {name!r}; allowed: {', '.join(ENCODERS)}")
