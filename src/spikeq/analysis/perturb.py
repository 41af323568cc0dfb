"""Observation perturbations for robustness tests: what the agent sees changes, the game does not.

The paper claims DSQN is more robust than the ANN DQN; Chen et al. (2022) test spiking Q-networks
with FGSM attacks, Patel et al. (2019) converted ones with occlusion. ``spikeq evaluate --perturb``
applies one perturbation to every observation a greedy decision is made on:

    gaussian:SIGMA      o' = clip(o + N(0, (SIGMA * R)^2), low, high)
    fgsm:EPS            o' = clip(o + EPS * R * sign(d/do CE(softmax Q(o), argmax_a Q(o, a))), low, high)
    fgsm:EPS@ATTACKER   the same with Q another network's, ATTACKER naming it (a transferred attack)

where the observation space is a Box bounded everywhere: R = high - low, so SIGMA and EPS are in
units of its range (images: R = 255, SIGMA and EPS in units of the [0, 1] pixel range; MinAtar's
binary grids: R = 1, clipped to [0, 1]); the perturbed observations stay float, not re-quantised.
Where a bound is infinite (CartPole's velocities), R = 1 and nothing is clipped. FGSM is the fast gradient
sign method (Goodfellow et al. 2015) against the network's own greedy action (Huang et al. 2017's
attack on DQNs); on a spiking network its gradient is the surrogate gradient the network is trained
with. The attacker's gradient pass is not counted as the agent's energy; the decision on o' is.

A transferred (black-box) attack crafts the FGSM step on another network, the attacker, and shows it
to the network attacked (the black-box setting of Huang et al. 2017, who transfer attacks between
policies). It uses no gradient of the network attacked, so the same attack (a function of the
observation alone) meets a spiking and a differentiable network: it tells an advantage of the network
from one of its surrogate gradient being a weaker guide for the attack (gradient masking).
``Perturbation`` only names the attacker; the caller gives its network (``evaluate_model(attacker=)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gymnasium import spaces
from torch import nn
from torch.nn import functional

PERTURBATIONS = ("none", "gaussian", "fgsm")


@dataclass(frozen=True)
class Perturbation:
    """One perturbation of the observations.

    :param kind: one of ``PERTURBATIONS``
    :param strength: SIGMA (gaussian) or EPS (fgsm), in units of the observation space's range where it
        is bounded (the [0, 1] pixel range for images)
    :param attacker: for a transferred FGSM attack, the name of the network its gradient comes from
        (e.g. its model, ``"dqn"``); ``None``: the gradient of the network attacked
    """

    kind: str = "none"
    strength: float = 0.0
    attacker: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in PERTURBATIONS:
            raise ValueError(f"unknown perturbation {self.kind!r}; allowed: {', '.join(PERTURBATIONS)}")
        if not (self.strength >= 0 and np.isfinite(self.strength)):
            raise ValueError(f"perturbation strength {self.strength!r} must be a finite number >= 0")
        if self.kind == "none" and self.strength != 0:
            # It would be recorded as "none" and play unperturbed, whatever strength was meant.
            raise ValueError(
                f"perturbation none takes no strength, got {self.strength:g}; allowed: none, "
                "gaussian:SIGMA, fgsm:EPS"
            )
        if self.attacker is not None and (self.kind != "fgsm" or not _is_name(self.attacker)):
            raise ValueError(
                f"perturbation {self.kind}:{self.strength:g} with attacker {self.attacker!r}: only fgsm "
                "is transferred, from an attacker named by letters, digits, '.', '_', '+' or '-'"
            )

    @classmethod
    def parse(cls, text: str) -> Perturbation:
        """``"none"``, ``"gaussian:0.05"``, ``"fgsm:0.01"`` or ``"fgsm:0.01@dqn"`` (transferred)."""
        text, at, attacker = text.partition("@")
        kind, _, strength = text.partition(":")
        if kind == "none" and not strength and not at:
            return cls()
        if kind not in PERTURBATIONS or not strength:
            raise ValueError(
                f"perturbation {text + at + attacker!r} is not none, gaussian:SIGMA, fgsm:EPS or "
                "fgsm:EPS@ATTACKER"
            )
        try:
            value = float(strength)
        except ValueError:
            raise ValueError(f"perturbation {text + at + attacker!r}: {strength!r} is not a number") from None
        return cls(kind, value, attacker if at else None)

    @property
    def family(self) -> str:
        """What it is without its strength: ``"fgsm"``, ``"fgsm@dqn"``, ``"gaussian"``, ``"none"``."""
        return self.kind if self.attacker is None else f"{self.kind}@{self.attacker}"

    def __str__(self) -> str:
        if self.kind == "none":
            return "none"
        return f"{self.kind}:{self.strength:g}" + ("" if self.attacker is None else f"@{self.attacker}")

    def apply(
        self, q_net: nn.Module, obs: torch.Tensor, space: spaces.Space, rng: np.random.Generator
    ) -> torch.Tensor:
        """The perturbed observations.

        :param q_net: the Q-network FGSM differentiates through: the one deciding, or for a transferred
            attack the attacker's
        :param obs: ``[B, *observation_shape]`` as ``policy.obs_to_tensor`` makes them
        :param space: the observation space (its bounds give the range and the clip)
        :param rng: draws the Gaussian noise
        :return: float observations of the same shape
        """
        if self.kind == "none" or self.strength == 0:
            return obs
        x = obs.float()
        bounds = _bounds(space)
        scale = 1.0 if bounds is None else bounds[1] - bounds[0]  # per element of an observation
        if self.kind == "gaussian":
            noise = rng.standard_normal(size=tuple(x.shape)) * (self.strength * scale)
            perturbed = x + torch.as_tensor(noise, dtype=x.dtype, device=x.device)
        else:
            x = x.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                q = q_net(x)
                loss = functional.cross_entropy(q, q.argmax(dim=1))
                (gradient,) = torch.autograd.grad(loss, x)
            step = torch.as_tensor(self.strength * scale, dtype=x.dtype, device=x.device)
            perturbed = x.detach() + step * gradient.sign()
        if bounds is None:
            return perturbed
        low, high = (torch.as_tensor(bound, dtype=x.dtype, device=x.device) for bound in bounds)
        return torch.clamp(perturbed, low, high)


def _bounds(space: spaces.Space) -> tuple[np.ndarray, np.ndarray] | None:
    """A Box's (low, high) in float64, or None where the space is no Box or a bound is infinite."""
    if not isinstance(space, spaces.Box):
        return None
    low, high = space.low.astype(np.float64), space.high.astype(np.float64)
    if not (np.isfinite(low).all() and np.isfinite(high).all()):
        return None
    return low, high


def _is_name(text: str) -> bool:
    """An attacker's name: not empty, letters, digits, ``.``, ``_``, ``+`` and ``-`` only."""
    return bool(text) and all(c.isalnum() or c in "._+-" for c in text)
