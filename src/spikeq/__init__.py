"""spikeq: directly-trained deep spiking Q-networks (DSQN) on snnTorch and Stable-Baselines3.

Importing the package registers ``"SpikingPolicy"`` with SB3's DQN, and lets files saved before the
modules were grouped into layer packages load: SB3 zips pickle classes by module path
(``spikeq.policy.SpikingPolicy``, ``spikeq.replay.FrameReplayBuffer``), so each former path is
answered by the module now holding its code, imported only when something asks for it.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from spikeq.snn.network import NetworkSpec, SpikingQNetwork
from spikeq.snn.neurons import NeuronSpec, SpikingLayer
from spikeq.snn.policy import SpikingPolicy

__all__ = ["NetworkSpec", "NeuronSpec", "SpikingLayer", "SpikingPolicy", "SpikingQNetwork"]
__version__ = "0.1.0"

# Former module path -> where its code is now.
MOVED_MODULES = {
    **{
        f"spikeq.{name}": f"spikeq.snn.{name}"
        for name in ("neurons", "encoding", "readout", "network", "policy")
    },
    "spikeq.engine": "spikeq.snn.engine",
    "spikeq.kernels": "spikeq.snn.engine.kernels",
    **{f"spikeq.{name}": f"spikeq.envs.{name}" for name in ("atari", "minatar", "vector", "replay", "games")},
    **{
        f"spikeq.{name}": f"spikeq.analysis.{name}"
        for name in ("energy", "evaluate", "perturb", "convert", "report", "nir_export")
    },
    **{
        f"spikeq.{name}": f"spikeq.experiment.{name}"
        for name in ("config", "train", "checkpoints", "tracking", "sweep")
    },
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports a former module path as the module that holds its code now (the same module object)."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED_MODULES else None

    def create_module(self, spec):
        module = importlib.import_module(MOVED_MODULES[spec.name])
        # The import machinery sets the returned module's __spec__ to this former path's spec next;
        # exec_module puts the module's own back, so that it still names (and reloads) its code.
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state  # its code already ran under its own name


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())
