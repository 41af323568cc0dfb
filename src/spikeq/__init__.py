"""spikeq: directly-trained deep spiking Q-networks (DSQN) on snnTorch and Stable-Baselines3.

Importing the package registers ``"SpikingPolicy"`` with SB3's DQN.
"""

from spikeq.snn.network import NetworkSpec, SpikingQNetwork
from spikeq.snn.neurons import NeuronSpec, SpikingLayer
from spikeq.snn.policy import SpikingPolicy

__all__ = ["NetworkSpec", "NeuronSpec", "SpikingLayer", "SpikingPolicy", "SpikingQNetwork"]
__version__ = "0.1.0"
