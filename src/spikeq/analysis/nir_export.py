"""A trained spiking Q-network as a NIR graph, for neuromorphic hardware, and a check of the file.

NIR (the Neuromorphic Intermediate Representation, ``nir`` 1.0) describes a network as a graph of
continuous-time primitives that Norse, Sinabs, Rockpool, Lava-DL, SpiNNaker2, Xylo, Speck and others
read. ``export_nir`` writes a ``SpikingQNetwork`` as such a graph:

    input -> conv1 -> LIF -> conv2 -> LIF -> conv3 -> LIF -> flatten -> fc1 -> LIF -> readout -> output

(an MLP: ``fc1 -> LIF -> fc2 -> LIF -> ... -> readout``), every synaptic layer a ``Conv2d`` / ``Flatten``
/ ``Affine`` node and every spiking layer a ``LIF`` (``IF`` for the IF neuron) node with a hard reset.

The neuron mapping. NIR's LIF is continuous-time, with a spike and a reset to v_reset when v > v_thr:

    tau dv/dt = (v_leak - v) + R I

One explicit Euler step of length dt is

    v[t] = v[t-1] + dt / tau * (v_leak - v[t-1] + R I[t])
         = (1 - dt / tau) v[t-1] + (dt R / tau) I[t]              (v_leak = 0)

and spikeq's LIF (the paper's, ``spikeq.snn.neurons``: H[t] = V[t-1] + (I[t] - V[t-1]) / tau_paper, i.e.
U[t] = beta U[t-1] + I[t] / tau_paper with beta = 1 - 1/tau_paper) is exactly that step when

    tau = dt / (1 - beta) = dt * tau_paper,    R = input_scale / (1 - beta) = 1,    v_leak = 0,
    v_thr = threshold,                         v_reset = 0  (the paper's hard reset).

NIR's IF, dv/dt = R I, is spikeq's IF (U[t] = U[t-1] + I[t]) with R = 1 / dt. The graph stores no dt
(NIR leaves the time step to the simulator): the one it was derived for is in the metadata, ``dt``,
by default 1e-4 s, snnTorch's convention, under which snnTorch's ``import_from_nir`` also reads the
LIF layers as the paper's (beta = 1 - 1e-4 / tau; it rescales the threshold by dt R / tau). With a
learned beta the same formulas hold with that layer's beta.

Both sides fire on v > v_thr (snnTorch and NIR compare strictly; the paper's SpikingJelly fires on
v >= v_thr, which differs only for a membrane exactly at the threshold) and reset to 0 in the step
that fires, so the spikes are the same. The readouts, in NIR primitives (Q is read after step T):

- ``rate``:  Affine(fc) -> I(R = 1 / (T dt)):  v[T] = sum_t (W s[t] + b) / T = W rate + b
- ``spike``: Affine(fc) -> LIF / IF (firing) -> I(R = 1 / (T dt)): the output firing rate
- ``last_mem``: Affine(fc) -> LI / I (non-firing): v[T]
- ``mean_mem``: Affine(fc) -> LI / I -> I(R = 1 / (T dt)): the mean membrane over T
- ``max_mem``: Affine(fc) -> LI / I: NIR has no running maximum; Q is the maximum of the output over
  the T steps, taken by the host (metadata ``q_reduce = "max"``; else ``"last"``).

Direct input (the paper): the normalised observation is presented unchanged at each of the T steps,
so the first layer's current is the same at every step ("static" first layer). Poisson input has no
NIR primitive: the graph takes the spikes, which the host draws each step with probability
(x - low) / (high - low) (metadata ``input_encoding``, ``poisson_low``, ``poisson_span``).

The soft (subtract) reset, U[t] = beta U[t-1] + I[t] / tau_paper - threshold S[t-1] (the converted
networks of ``spikeq convert``), has no NIR neuron: it is written exactly as a membrane without firing
(LI, or I for IF) -> Threshold, with the spikes fed back into the membrane through
Scale(-threshold / input_scale) on a recurrent edge, which a simulator delivers one step later.

``verify_nir`` reads the file back with ``nir.read`` and runs it with nirtorch's graph executor on
node modules written here from the NIR equations above (not from spikeq's modules; nirtorch's default
``Affine`` map drops the bias). snnTorch's ``import_from_nir`` cannot run the whole graph (it has no
``I``/``LI`` node for the readouts and maps ``IF`` to a leaky neuron with beta 0.9); where the hidden
layers are LIF it imports them as a second, third-party check of the spikes (``SnnTorchTorso``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import nir
import nirtorch
import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3 import DQN
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.vec_env import VecEnv
from torch import nn

from spikeq.envs import games
from spikeq.files import atomic_path
from spikeq.snn.network import SpikingQNetwork
from spikeq.snn.neurons import SpikingLayer
from spikeq.snn.policy import SpikingPolicy

NIR_FORMAT = "spikeq-nir-v1"
# snnTorch's export_to_nir / import_from_nir assume this time step (seconds).
DEFAULT_DT = 1e-4
# Smallest share of observations on which the NIR graph must choose the policy's action to pass.
MIN_AGREEMENT = 0.99


@dataclass
class NirExport:
    """What ``export_nir`` wrote.

    :param path: the ``.nir`` file (HDF5)
    :param graph: the NIR graph written
    :param notes: where the graph is not the trained network's exact semantics, or needs the host
    """

    path: Path
    graph: nir.NIRGraph
    notes: list[str] = field(default_factory=list)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def load_spiking_policy(path: str | Path) -> SpikingPolicy:
    """Load the policy of a spiking checkpoint on the CPU, without an environment.

    :param path: an SB3 zip (pickled: only load files you trust), or a weights-only
        ``.safetensors`` / ``.json`` pair written by ``spikeq export``
    :raises ValueError: with one line, for a missing, unreadable or non-spiking checkpoint
    """
    from spikeq.analysis.weights import NO_REPLAY, check_weights_meta, read_weights_meta, space_from_json

    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist")
    if path.suffix == ".zip":
        try:
            policy = DQN.load(path, device="cpu", custom_objects=NO_REPLAY).policy
        except Exception as error:  # a corrupt or foreign zip fails in many ways inside SB3
            raise ValueError(f"{path} is not a readable SB3 DQN checkpoint ({_first_line(error)})") from None
    elif path.suffix in (".safetensors", ".json"):
        from safetensors.torch import load_file

        meta = read_weights_meta(path)
        if meta.get("policy") != "SpikingPolicy":
            raise ValueError(_not_spiking(path, str(meta.get("policy"))))
        check_weights_meta(meta, path.with_suffix(".json"))
        try:
            policy = SpikingPolicy(
                space_from_json(meta["observation_space"]),
                space_from_json(meta["action_space"]),
                lambda _: 0.0,
                **meta["policy_kwargs"],
            )
            policy.q_net.load_state_dict(load_file(str(path.with_suffix(".safetensors"))))
        except Exception as error:  # missing tensors, wrong shapes, a damaged file
            raise ValueError(f"{path} is not a readable spikeq weights file ({_first_line(error)})") from None
    else:
        raise ValueError(f"unknown checkpoint type {path.name!r}; allowed: .zip, .safetensors, .json")
    if not isinstance(getattr(policy, "q_net", None), SpikingQNetwork):
        raise ValueError(_not_spiking(path, type(policy).__name__))
    return policy.eval()


def _not_spiking(path: Path, policy: str) -> str:
    return (
        f"{path} holds a {policy} (an ANN DQN), not a spiking Q-network; only SpikingPolicy "
        "checkpoints can be written as NIR ('spikeq convert' turns a DQN into one)"
    )


def _q_net_of(model: DQN | BasePolicy | SpikingQNetwork | str | Path) -> SpikingQNetwork:
    if isinstance(model, (str, Path)):
        return load_spiking_policy(model).q_net
    q_net = model if isinstance(model, SpikingQNetwork) else getattr(model, "q_net", None)
    if not isinstance(q_net, SpikingQNetwork):
        raise ValueError(
            f"{type(model).__name__} is not a spiking Q-network; allowed: a SpikingQNetwork, a DQN with "
            "a SpikingPolicy, or a checkpoint of one"
        )
    if next(q_net.parameters()).device.type != "cpu":  # exported and simulated on the CPU: a copy there
        on_gpu = q_net
        q_net = SpikingQNetwork(
            on_gpu.observation_space, on_gpu.action_space, on_gpu.spec, on_gpu.normalize_images
        )
        q_net.load_state_dict(on_gpu.state_dict())
    return q_net


def _full(shape: tuple[int, ...], value: float) -> np.ndarray:
    return np.full(shape, value, dtype=np.float64)


def _scalar(parameter: torch.Tensor, name: str, layer: str) -> float:
    values = parameter.detach().cpu().double().flatten().unique()
    if values.numel() != 1:
        raise ValueError(f"{layer}: a {name} per neuron ({values.numel()} values) is not supported")
    return float(values[0])


def neuron_node(
    layer: SpikingLayer, shape: tuple[int, ...], dt: float, name: str, fire: bool | None = None
) -> nir.NIRNode:
    """The NIR node whose Euler step of length ``dt`` is ``layer``'s update (module docstring).

    :param layer: a spiking layer (``fire=True``: LIF / IF) or a non-firing readout (LI / I)
    :param shape: the shape of its neurons, without the batch dimension
    :param dt: the simulation time step the node is derived for
    :param name: the layer's name, for errors
    :param fire: override ``layer.fire`` (False: the membrane only, LI / I)
    """
    fire = layer.fire if fire is None else fire
    if fire and layer.spec.reset != "zero":
        raise ValueError(f"{name}: NIR's LIF and IF neurons reset to v_reset, not by {layer.spec.reset!r}")
    beta = _scalar(layer.leaky.beta, "beta", name)
    scale = layer.input_scale
    if beta == 1.0:
        r = _full(shape, scale / dt)
        if not fire:
            return nir.I(r=r)
        return nir.IF(r=r, v_threshold=_full(shape, _threshold(layer, name)), v_reset=_full(shape, 0.0))
    if not 0.0 < beta < 1.0:
        raise ValueError(f"{name}: beta={beta} has no NIR neuron; allowed: 0 < beta <= 1")
    tau, r, v_leak = _full(shape, dt / (1.0 - beta)), _full(shape, scale / (1.0 - beta)), _full(shape, 0.0)
    if not fire:
        return nir.LI(tau=tau, r=r, v_leak=v_leak)
    threshold = _full(shape, _threshold(layer, name))
    return nir.LIF(tau=tau, r=r, v_leak=v_leak, v_threshold=threshold, v_reset=_full(shape, 0.0))


def _threshold(layer: SpikingLayer, name: str) -> float:
    return _scalar(layer.leaky.threshold, "threshold", name)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().float().numpy().copy()


def _synapse_nodes(
    synapse: nn.Module, shape: tuple[int, ...], name: str
) -> tuple[list[tuple[str, nir.NIRNode]], tuple[int, ...]]:
    """NIR nodes of one synaptic layer (Conv2d, or Flatten + Linear, or Linear) and its output shape."""
    modules = list(synapse) if isinstance(synapse, nn.Sequential) else [synapse]
    nodes = []
    for module in modules:
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                raise ValueError(
                    f"{name}: padding {module.padding!r} ({module.padding_mode}) is not supported"
                )
            node = nir.Conv2d(
                input_shape=np.array(shape[1:]),
                weight=_numpy(module.weight),
                stride=np.array(module.stride),
                padding=np.array(module.padding),
                dilation=np.array(module.dilation),
                groups=module.groups,
                bias=_numpy(module.bias)
                if module.bias is not None
                else np.zeros(module.out_channels, np.float32),
            )
            nodes.append((name, node))
        elif isinstance(module, nn.Flatten):
            if len(shape) > 1:
                nodes.append(
                    (f"{name}_flatten", nir.Flatten(input_type={"input": np.array(shape)}, start_dim=0))
                )
        elif isinstance(module, nn.Linear):
            bias = module.bias if module.bias is not None else torch.zeros(module.out_features)
            nodes.append((name, nir.Affine(weight=_numpy(module.weight), bias=_numpy(bias))))
        else:
            raise ValueError(
                f"{name}: a {type(module).__name__} layer cannot be exported; "
                "allowed: Conv2d, Flatten, Linear"
            )
    with torch.no_grad():
        out_shape = tuple(synapse(torch.zeros(1, *shape)).shape[1:])
    return nodes, out_shape


def export_limits(q_net: SpikingQNetwork) -> list[str]:
    """Where the NIR graph of ``q_net`` leaves something to the host or its simulator, one line each."""
    spec = q_net.spec
    notes = [
        "NIR has no time step: the neuron parameters are derived for the Euler step dt in the metadata; "
        "simulate with that dt (R and tau scale with it)",
        "NIR and snnTorch fire on v > threshold; the paper's SpikingJelly fires on v >= threshold (a "
        "membrane exactly at the threshold)",
    ]
    if spec.encoder == "direct":
        notes.append(
            f"direct input: present the observation (times input_scale) at each of the T={spec.num_steps} "
            "steps (the first layer's current is the same at every step: it may run once, off-chip) "
            "and read Q after the last step"
        )
    else:
        notes.append(
            "poisson input has no NIR primitive: the host draws the input spikes each step, "
            + (
                "Bernoulli(x * input_scale)"
                if q_net.is_image
                else "Bernoulli((x - poisson_low) / poisson_span)"
            )
            + "; the graph starts at the first synapses"
        )
    if spec.reset == "subtract":
        notes.append(
            "subtract reset: written as LI/I -> Threshold with the spikes fed back through "
            "Scale(-threshold / input_scale) on a recurrent edge; the simulator must delay it one step"
        )
    if spec.readout == "max_mem":
        notes.append(
            "max_mem readout: NIR has no running maximum; Q is the maximum of the output over the T steps"
        )
    return notes


def to_nir(
    q_net: SpikingQNetwork, dt: float = DEFAULT_DT, action_names: list[str] | None = None
) -> tuple[nir.NIRGraph, list[str]]:
    """The NIR graph of a spiking Q-network, with its metadata, and the export's notes.

    :param q_net: the network
    :param dt: the simulation time step the neuron parameters are derived for (seconds)
    :param action_names: a name per action (default: their indices)
    :return: the graph and ``export_limits(q_net)``
    :raises ValueError: for what NIR cannot express (a layer type it has no node for, a per-neuron
        threshold, beta outside (0, 1])
    """
    if not dt > 0:
        raise ValueError(f"dt={dt!r} must be > 0")
    space = q_net.observation_space
    if not isinstance(space, spaces.Box):
        raise ValueError(f"observation space {space} cannot be exported; allowed: Box (image or vector)")
    n_actions = int(q_net.action_space.n)
    action_names = [str(a) for a in (action_names or range(n_actions))]
    if len(action_names) != n_actions:
        raise ValueError(f"{len(action_names)} action names for {n_actions} actions")
    spec, num_steps = q_net.spec, q_net.num_steps
    shape = tuple(int(n) for n in space.shape)
    nodes: dict[str, nir.NIRNode] = {"input": nir.Input(input_type={"input": np.array(shape)})}
    edges: list[tuple[str, str]] = []
    previous = "input"

    def chain(name: str, node: nir.NIRNode) -> None:
        nonlocal previous
        nodes[name] = node
        edges.append((previous, name))
        previous = name

    def add_neurons(name: str, layer: SpikingLayer, shape: tuple[int, ...]) -> None:
        if not (layer.fire and layer.spec.reset == "subtract"):
            node = neuron_node(layer, shape, dt, name)
            chain(f"{name}_{type(node).__name__.lower()}", node)
            return
        # Soft reset: the membrane (LI / I), a Threshold, and the spikes fed back one step later
        # through Scale(-threshold / input_scale): U[t] = beta U[t-1] + s I[t] - threshold S[t-1].
        membrane = neuron_node(layer, shape, dt, name, fire=False)
        chain(f"{name}_{type(membrane).__name__.lower()}", membrane)
        membrane_name, threshold = previous, _threshold(layer, name)
        chain(f"{name}_threshold", nir.Threshold(threshold=_full(shape, threshold)))
        nodes[f"{name}_reset"] = nir.Scale(scale=_full(shape, -threshold / layer.input_scale))
        edges.extend([(previous, f"{name}_reset"), (f"{name}_reset", membrane_name)])

    for name, synapse, neurons in zip(q_net.layer_names, q_net.synapses, q_net.neurons, strict=True):
        synapse_nodes, shape = _synapse_nodes(synapse, shape, name)
        for node_name, node in synapse_nodes:
            chain(node_name, node)
        add_neurons(name, neurons, shape)

    torso_output = previous
    readout, out = q_net.readout, (n_actions,)
    chain(
        q_net.readout_name, nir.Affine(weight=_numpy(readout.linear.weight), bias=_numpy(readout.linear.bias))
    )
    mean_over_steps = nir.I(r=_full(out, 1.0 / (num_steps * dt)))
    if readout.kind == "rate":
        chain("rate", mean_over_steps)
    else:
        add_neurons(q_net.readout_name, readout.neurons, out)
        if readout.kind in ("spike", "mean_mem"):
            chain("mean", mean_over_steps)
    chain("output", nir.Output(output_type={"output": np.array(out)}))

    metadata: dict[str, Any] = {
        "format": NIR_FORMAT,
        "num_steps": num_steps,
        "dt": dt,
        "neuron": spec.neuron,
        "tau": spec.tau,
        "threshold": spec.threshold,
        "reset": spec.reset,
        "readout": spec.readout,
        "q_reduce": "max" if spec.readout == "max_mem" else "last",
        "input_encoding": spec.encoder,
        "input_shape": np.array(space.shape),
        "input_layout": "CHW" if len(space.shape) == 3 else "features",
        "input_scale": 1.0 / 255.0 if q_net.is_image and q_net.normalize_images else 1.0,
        "action_names": json.dumps(action_names),
        "torso_output": torso_output,
    }
    if spec.encoder == "poisson" and not q_net.is_image:
        metadata["poisson_low"] = q_net.encoder.low.double().numpy()
        metadata["poisson_span"] = q_net.encoder.span.double().numpy()
    notes = export_limits(q_net)
    metadata["notes"] = "\n".join(notes)
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata=metadata), notes


def export_nir(
    model_or_checkpoint: DQN | BasePolicy | SpikingQNetwork | str | Path,
    path: str | Path,
    *,
    dt: float = DEFAULT_DT,
    action_names: list[str] | None = None,
) -> NirExport:
    """Write a trained spiking Q-network as a NIR file (HDF5, read back with ``nir.read``).

    Example::

        result = export_nir("runs/pong/checkpoints/best.zip", "pong.nir", action_names=names)
        graph = nir.read("pong.nir")   # graph.metadata["num_steps"], ["dt"], ["action_names"], ...

    :param model_or_checkpoint: a DQN with a SpikingPolicy, the policy, its ``SpikingQNetwork``, or a
        checkpoint file (SB3 zip or weights-only ``.safetensors`` / ``.json``)
    :param path: the ``.nir`` file to write
    :param dt: the simulation time step the neuron parameters are derived for (module docstring)
    :param action_names: a name per action, stored in the metadata (default: the indices)
    :raises ValueError: with one line, for a checkpoint that is not a spiking Q-network or a network
        NIR cannot express
    """
    q_net = _q_net_of(model_or_checkpoint)
    graph, notes = to_nir(q_net, dt, action_names)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # a failed write leaves no partial file
        nir.write(tmp, graph)
    return NirExport(path, graph, notes)


# ---- An independent simulator of the NIR graph: each node steps its own NIR equation with Euler. ----


class _Stateful(nn.Module):
    """A NIR neuron node: ``forward(current, state) -> (output, state)`` (nirtorch's stateful API)."""

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.step = step

    def forward(
        self, current: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        v = torch.zeros_like(current) if state is None else state
        return self.step(current, v)


class _Elementwise(nn.Module):
    """A stateless NIR node (Threshold, Scale) as a function of its input."""

    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.function = function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x)


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array, dtype=np.float32))


def node_map(dt: float) -> dict[type, Callable[[nir.NIRNode], nn.Module]]:
    """nirtorch node map: every NIR node used by ``to_nir`` as a torch module that steps its NIR
    equation with one explicit Euler step of ``dt`` (written from the NIR definitions, not from
    spikeq's neurons):

    - LIF: v <- v + dt / tau (v_leak - v + R I); z = v > v_thr; v <- v_reset where z
    - IF:  v <- v + dt R I; z = v > v_thr; v <- v_reset where z
    - LI:  v <- v + dt / tau (v_leak - v + R I), output v;   I: v <- v + dt R I, output v
    - Threshold: z = v > thr;   Scale: x * s
    - Affine: W x + b; Conv2d: torch's conv2d; Flatten: NIR dims exclude the batch, so they shift by one

    A recurrent edge (the soft reset's Scale back into its membrane) carries the previous step's output
    (nirtorch keeps it in the state; zero at the first step).

    :param dt: the time step (the graph's metadata ``dt``)
    """

    def lif(node: nir.LIF | nir.LI) -> nn.Module:
        gain = dt / np.asarray(node.tau, dtype=np.float64)
        decay, drive, rest = _t(1.0 - gain), _t(gain * node.r), _t(gain * node.v_leak)
        if isinstance(node, nir.LI):
            return _Stateful(lambda i, v: _integrate(decay * v + drive * i + rest))
        threshold, reset = _t(node.v_threshold), _t(node.v_reset)
        return _Stateful(lambda i, v: _fire(decay * v + drive * i + rest, threshold, reset))

    def integrate_and_fire(node: nir.IF | nir.I) -> nn.Module:
        drive = _t(dt * np.asarray(node.r, dtype=np.float64))
        if isinstance(node, nir.I):
            return _Stateful(lambda i, v: _integrate(v + drive * i))
        threshold, reset = _t(node.v_threshold), _t(node.v_reset)
        return _Stateful(lambda i, v: _fire(v + drive * i, threshold, reset))

    def affine(node: nir.Affine) -> nn.Module:
        linear = nn.Linear(node.weight.shape[1], node.weight.shape[0])
        linear.weight.data, linear.bias.data = _t(node.weight), _t(node.bias)
        return linear

    def threshold(node: nir.Threshold) -> nn.Module:
        level = _t(node.threshold)
        return _Elementwise(lambda v: (v > level).to(v.dtype))

    def scale(node: nir.Scale) -> nn.Module:
        factor = _t(node.scale)
        return _Elementwise(lambda x: x * factor)

    def flatten(node: nir.Flatten) -> nn.Module:
        end = node.end_dim if node.end_dim < 0 else node.end_dim + 1
        return nn.Flatten(node.start_dim + 1, end)

    return {
        nir.LIF: lif,
        nir.LI: lif,
        nir.IF: integrate_and_fire,
        nir.I: integrate_and_fire,
        nir.Affine: affine,
        nir.Flatten: flatten,
        nir.Threshold: threshold,
        nir.Scale: scale,
    }


def _integrate(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return v, v


def _fire(v: torch.Tensor, threshold: torch.Tensor, reset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    spikes = v > threshold
    return spikes.to(v.dtype), torch.where(spikes, reset, v)


class NirSimulator:
    """Runs a NIR graph written by ``to_nir`` for T steps: nirtorch wires the graph, ``node_map`` steps
    the nodes.

    :param graph: the graph (``nir.read(path)``)
    :param dt: the time step (default: the graph's metadata ``dt``)
    """

    def __init__(self, graph: nir.NIRGraph, dt: float | None = None) -> None:
        meta = graph.metadata
        if meta.get("format") != NIR_FORMAT:
            raise ValueError(f"the graph is not a spikeq NIR export (format {meta.get('format')!r})")
        self.dt = float(meta["dt"] if dt is None else dt)
        self.num_steps = int(meta["num_steps"])
        self.q_reduce = str(meta["q_reduce"])
        self.input_scale = float(meta["input_scale"])
        self.encoding = str(meta["input_encoding"])
        self.module = nirtorch.nir_to_torch(graph, node_map(self.dt))

    @torch.no_grad()
    def q_values(self, inputs: torch.Tensor) -> torch.Tensor:
        """Q-values of a batch.

        :param inputs: ``[B, *input_shape]`` observations as the policy sees them (channel-first,
            not yet scaled) for direct input, or ``[T, B, *input_shape]`` input spikes (Poisson)
        :return: ``[B, n_actions]``
        """
        state, outputs = None, []
        for t in range(self.num_steps):
            x = inputs[t] if self.encoding == "poisson" else inputs.float() * self.input_scale
            out, state = self.module(x, state)
            outputs.append(out)
        return torch.stack(outputs).max(0).values if self.q_reduce == "max" else outputs[-1]


class _GivenSpikes(nn.Module):
    """An encoder that returns input spikes drawn beforehand (so both networks see the same ones)."""

    analog = False

    def __init__(self, spikes: torch.Tensor) -> None:
        super().__init__()
        self.spikes = spikes

    def forward(self, obs: torch.Tensor, num_steps: int) -> torch.Tensor:
        return self.spikes


@contextmanager
def _encoder(q_net: SpikingQNetwork, encoder: nn.Module):
    original = q_net.encoder
    q_net.encoder = encoder
    try:
        yield
    finally:
        q_net.encoder = original


def poisson_spikes(q_net: SpikingQNetwork, obs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Input spikes ``[T, B, ...]`` as the network's Poisson encoder draws them, from ``generator``."""
    from stable_baselines3.common.preprocessing import preprocess_obs

    x = preprocess_obs(obs, q_net.observation_space, normalize_images=q_net.normalize_images).float()
    encoder = q_net.encoder
    prob = x if encoder.low is None else (x.flatten(1) - encoder.low) / encoder.span
    prob = prob.reshape(x.shape).clamp(0, 1)
    return (torch.rand((q_net.num_steps, *prob.shape), generator=generator) < prob).float()


class SnnTorchTorso:
    """snnTorch's ``import_from_nir`` of the graph's hidden layers (the input up to the last hidden
    spiking layer, metadata ``torso_output``): a third-party reading of the LIF parameters, compared
    spike by spike. snnTorch reads LIF with its dt of 1e-4 s (beta = 1 - dt / tau, the threshold divided
    by dt R / tau), but maps IF to a leaky neuron with beta 0.9 and reads no Threshold / Scale nodes (the
    soft reset). Its Flatten also flattens the batch dimension (NIR's dims exclude it): here its dims are
    shifted by one, the only change made to what it imports.

    :param graph: a graph written by ``to_nir``
    :raises ValueError: where snnTorch's importer cannot read the torso as written
    """

    SUPPORTED = (nir.Input, nir.Conv2d, nir.Flatten, nir.Affine, nir.LIF)

    def __init__(self, graph: nir.NIRGraph) -> None:
        import io
        from contextlib import redirect_stdout

        import snntorch as snn
        from snntorch.import_nir import import_from_nir

        end = str(graph.metadata["torso_output"])
        keep, frontier = ["input"], ["input"]
        while frontier:
            source = frontier.pop()
            if source == end:
                continue
            for _, target in (e for e in graph.edges if e[0] == source and e[1] not in keep):
                keep.append(target)
                frontier.append(target)
        unsupported = sorted(
            {type(graph.nodes[n]).__name__ for n in keep} - {t.__name__ for t in self.SUPPORTED}
        )
        if unsupported or float(graph.metadata["dt"]) != DEFAULT_DT:
            raise ValueError(
                f"snnTorch's import_from_nir cannot read {', '.join(unsupported) or 'dt != 1e-4'} as written"
            )
        nodes = {name: graph.nodes[name] for name in keep}
        nodes["output"] = nir.Output(output_type={"output": graph.nodes[end].output_type["output"]})
        edges = [(a, b) for a, b in graph.edges if a in nodes and b in nodes] + [(end, "output")]
        with redirect_stdout(io.StringIO()):  # the importer prints its weight rescaling
            self.module = import_from_nir(nir.NIRGraph(nodes=nodes, edges=edges))
        self.neurons = [m for m in self.module.modules() if isinstance(m, snn.SpikingNeuron)]
        for neuron in self.neurons:  # keep them out of snnTorch's global list, as spikeq.snn.neurons does
            snn.SpikingNeuron.instances.remove(neuron)
        for flatten in (m for m in self.module.modules() if isinstance(m, nn.Flatten)):
            flatten.start_dim += 1
            flatten.end_dim += 1 if flatten.end_dim >= 0 else 0

    @torch.no_grad()
    def spikes(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """Spikes ``[T, B, ...]`` of the last hidden layer for the inputs of each step (``[B, ...]`` each)."""
        for neuron in self.neurons:
            neuron.mem = torch.zeros(0)  # re-zeroed at the next call (init_hidden state)
        state, out = None, []
        for x in inputs:
            spikes, state = self.module(x, state)
            out.append(spikes.flatten(1))
        return torch.stack(out)


def verify_nir(
    path: str | Path,
    model: DQN | BasePolicy | SpikingQNetwork,
    observations: np.ndarray,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """Read a NIR file back and compare its Q-values with the network it was exported from.

    :param path: the ``.nir`` file
    :param model: the network it was exported from (a DQN, its policy or its ``SpikingQNetwork``)
    :param observations: ``[N, *observation_shape]`` as the environment gives them
    :param batch_size: observations per simulated batch
    :param seed: seed of the shared input spikes (Poisson input)
    :return: ``agreement`` (share of observations with the same greedy action), ``max_q_diff`` (largest
        |Q_nir - Q|), ``q_scale`` (largest |Q|, to read it against), ``observations``, ``simulator``,
        and ``snntorch_torso``: the last hidden layer's ``spikes`` and how many of them ``differing``
        under snnTorch's ``import_from_nir`` (``SnnTorchTorso``), or why it cannot read the graph
    """
    q_net = _q_net_of(model)
    graph = nir.read(path)
    simulator = NirSimulator(graph)
    try:
        torso, snntorch_result = SnnTorchTorso(graph), {"spikes": 0, "differing": 0}
    except ValueError as error:
        torso, snntorch_result = None, str(error)
    generator = torch.Generator().manual_seed(seed)
    same, max_diff, q_scale = 0, 0.0, 0.0
    for start in range(0, len(observations), batch_size):
        batch = observations[start : start + batch_size]
        obs = q_net.obs_to_tensor(batch)[0]  # channel-first for images, as the policy sees them
        with torch.no_grad(), q_net.record() as activity:
            if simulator.encoding == "poisson":
                spikes = poisson_spikes(q_net, obs, generator)
                with _encoder(q_net, _GivenSpikes(spikes)):
                    q = q_net(obs).float()
                q_nir = simulator.q_values(spikes)
                inputs = list(spikes)
            else:
                q = q_net(obs).float()
                q_nir = simulator.q_values(obs)
                inputs = [obs.float() * simulator.input_scale] * simulator.num_steps
        same += int((q.argmax(1) == q_nir.argmax(1)).sum())
        max_diff = max(max_diff, float((q_nir - q).abs().max()))
        q_scale = max(q_scale, float(q.abs().max()))
        if torso is not None:
            reference = activity[len(q_net.layer_names) - 1].spikes.flatten(2)  # [T, B, F]
            snntorch_result["spikes"] += int(reference.sum())
            snntorch_result["differing"] += int((torso.spikes(inputs) != reference).sum())
    return {
        "agreement": same / len(observations),
        "max_q_diff": max_diff,
        "q_scale": q_scale,
        "observations": len(observations),
        "simulator": (
            f"nir.read (nir {nir.version}), nirtorch {nirtorch.__version__} graph executor, "
            f"spikeq.analysis.nir_export node map (Euler, dt={simulator.dt:g})"
        ),
        "snntorch_torso": snntorch_result,
    }


def make_observation_env(game: str, seed: int = 0) -> VecEnv:
    """One environment to record observations in: the evaluation env of an ALE or MinAtar game
    (``spikeq.envs.games.make_env``), else the gymnasium id as is (e.g. ``CartPole-v1``).

    :param game: ALE game (``Pong``, ``PongNoFrameskip-v4``), MinAtar game (``MinAtar/Breakout``) or a
        gymnasium id
    :param seed: seed of the env
    :raises ValueError: for a name that is neither (the message lists close ALE game names)
    """
    try:
        return games.make_env(game, n_envs=1, seed=seed, train=False)
    except ValueError:
        if game not in gym.registry:
            raise
    return make_vec_env(game, n_envs=1, seed=seed)


def action_names(env: VecEnv) -> list[str]:
    """The actions' names where the env tells them (ALE: ``NOOP``, ``FIRE``, ...), else their indices."""
    meanings = getattr(env.envs[0].unwrapped, "get_action_meanings", None) if hasattr(env, "envs") else None
    return list(meanings()) if meanings else [str(a) for a in range(int(env.action_space.n))]
