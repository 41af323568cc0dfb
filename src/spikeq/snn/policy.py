"""Stable-Baselines3 integration: ``SpikingPolicy``, a DQN policy whose Q-networks are DSQNs.

SB3 keeps replay, exploration, the target network and the optimiser loop; the policy only changes
``make_q_net`` (called twice by ``DQNPolicy._build``: online and target network). ``import spikeq``
registers the name, so ``DQN("SpikingPolicy", env, policy_kwargs=dict(num_steps=8))`` works.

With ``init="firing"`` (the default) the networks are calibrated on the first training batch: the policy
is built before any observation exists, and ``DQN.train`` runs the online network in training mode on
each sampled batch, so the first such forward rescales it (``SpikingQNetwork.calibrate_firing``) and the
target network is given the same weights before the update goes on. SB3 computes that first update's
TD targets before it, so they come from the target network as built (one update of the run; every
later target comes from a calibrated copy).
"""

from __future__ import annotations

from typing import Any

import torch
from gymnasium import spaces
from stable_baselines3 import DQN
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import Schedule
from stable_baselines3.dqn.policies import DQNPolicy

from spikeq.snn.network import NetworkSpec, SpikingQNetwork, check_spaces


class SpikingPolicy(DQNPolicy):
    """DQN policy with spiking Q-networks (Liu et al. 2022 by default).

    :param observation_space: observation space
    :param action_space: action space (Discrete)
    :param lr_schedule: learning-rate schedule
    :param net_arch: hidden fully-connected sizes (images: after the convolutions, default [512];
        grids smaller than 36x36 such as MinAtar's: after the convolution, default [128]; vectors:
        default [64, 64])
    :param normalize_images: divide image observations by 255
    :param optimizer_class: optimiser (Adam, as in the paper)
    :param optimizer_kwargs: its kwargs besides the learning rate
    :param spec_kwargs: the remaining fields of ``NetworkSpec``: ``num_steps``, ``neuron``, ``tau``,
        ``threshold``, ``reset``, ``surrogate``, ``surrogate_slope``, ``learn_beta``,
        ``learn_threshold``, ``detach_reset``, ``encoder``, ``readout``, ``engine``, ``backend``,
        ``recompute``, ``init``
    """

    q_net: SpikingQNetwork
    q_net_target: SpikingQNetwork

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Discrete,
        lr_schedule: Schedule,
        net_arch: list[int] | None = None,
        normalize_images: bool = True,
        optimizer_class: type[torch.optim.Optimizer] = torch.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
        **spec_kwargs: Any,
    ) -> None:
        allowed = set(NetworkSpec.__dataclass_fields__) - {"net_arch"}
        unknown = sorted(set(spec_kwargs) - allowed)
        if unknown:
            raise ValueError(
                f"unknown SpikingPolicy argument(s) {', '.join(unknown)}; allowed: net_arch, "
                f"normalize_images, optimizer_class, optimizer_kwargs, {', '.join(sorted(allowed))}"
            )
        check_spaces(observation_space, action_space)
        # Set before super().__init__(), which builds the networks through make_q_net().
        self.spec = NetworkSpec(net_arch=net_arch, **spec_kwargs)
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            net_arch=net_arch,
            normalize_images=normalize_images,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs,
        )
        self._calibration_pending = True
        self.q_net.register_forward_pre_hook(self._calibrate_on_first_batch)

    def _calibrate_on_first_batch(self, q_net: SpikingQNetwork, args: tuple[torch.Tensor]) -> None:
        # Acting (eval mode) does not count: only a training batch, the first of them. The flag is read
        # from the buffer once (a device sync on a GPU), not at every update.
        if not q_net.training or not self._calibration_pending:
            return
        self._calibration_pending = False
        if q_net.needs_calibration:
            q_net.calibrate_firing(args[0])
            self.q_net_target.load_state_dict(q_net.state_dict())

    def make_q_net(self) -> SpikingQNetwork:
        return SpikingQNetwork(
            self.observation_space, self.action_space, self.spec, self.normalize_images
        ).to(self.device)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        # DQNPolicy adds activation and feature-extractor arguments that this policy does not take.
        data = BasePolicy._get_constructor_parameters(self)
        data.update(
            lr_schedule=self._dummy_schedule,
            optimizer_class=self.optimizer_class,
            optimizer_kwargs=self.optimizer_kwargs,
            **self.spec.to_kwargs(),
        )
        return data


DQN.policy_aliases["SpikingPolicy"] = SpikingPolicy
