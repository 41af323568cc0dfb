"""Energy accounting: exact operation counts of greedy decisions, priced by an energy model.

One greedy decision is one forward pass for one observation (one action). For a spiking Q-network the
counts come from what the network actually did (``SpikingQNetwork.record()``), never from average
rates. For each synaptic layer l, with T time steps:

    spikes[l]          = sum_t sum_i S_l[t, i]                  spikes of the neurons l drives
    firing_rate[l]     = spikes[l] / (neurons[l] * T)
    neuron_updates[l]  = neurons[l] * T                         every neuron updates at every step
    MACs[l]            = T' * out_elements[l] * fan_in[l]       analog input (T' = 1: static first layer)
    SOPs[l]            = sum_t sum_j s_in[t, j] * fan_out[j]    spiking input

The fan-out is the real one: ``out_features`` for a Linear layer; for a convolution the number of output
neurons whose receptive field holds the input, which is smaller at the borders (padding, stride and
dilation decide how many windows cover a pixel). Summed over inputs this equals the input spikes inside
every output neuron's receptive field, summed over output neurons:

    SOPs = sum(conv2d(s_in, ones_like(W), stride, padding, dilation, groups))

The readout (fc2) is counted as SOPs on the last hidden layer's spikes, each spike triggering
``n_actions`` accumulates, also for the ``rate`` readout: W (1/T sum_t s[t]) = 1/T sum_t W s[t].

Energy per action, for costs e_mac, e_sop, e_neuron in pJ (``EnergyModel``):

    E_SNN = e_mac * MACs + e_sop * SOPs + e_neuron * neuron_updates   (last term if e_neuron is priced)
    E_ANN = e_mac * MACs_ANN        the same layer shapes, every layer dense (``ann_macs``)
    energy_ratio = E_SNN / E_ANN    (< 1: the spiking network needs less energy)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from gymnasium import spaces
from torch import nn

from spikeq.snn.network import LayerActivity, SpikingQNetwork

# The costs of an EnergyModel, in pJ; pj_per_sop is the only one every profile must price.
COST_FIELDS = ("pj_per_mac", "pj_per_sop", "pj_per_neuron_update")
PROFILE_FIELDS = ("name", "source", "description", *COST_FIELDS)
REQUIRED_PROFILE_FIELDS = ("name", "source", "pj_per_mac", "pj_per_sop")
# How the first of an energy report's assumptions begins: where they start in an evaluation's list.
ENERGY_ASSUMPTIONS_START = "Energy model "


@dataclass(frozen=True)
class EnergyModel:
    """Energy cost per operation, in picojoules.

    :param name: short name (``"45nm"``)
    :param source: where the numbers come from: publication, table, process node
    :param pj_per_mac: one multiply-accumulate on analog (non-spike) input; ``None`` for hardware
        without a MAC unit, whose MAC energies are then reported as ``None``
    :param pj_per_sop: one synaptic operation: the accumulate one input spike causes at one synapse
    :param pj_per_neuron_update: one neuron state update (one neuron, one time step); ``None``: not
        priced
    :param description: what the profile models and what it leaves out
    """

    name: str
    source: str
    pj_per_mac: float | None
    pj_per_sop: float
    pj_per_neuron_update: float | None = None
    description: str = ""

    def __post_init__(self) -> None:
        for key in ("name", "source"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"energy model field {key}={value!r} must be a non-empty string")
        if not isinstance(self.description, str):
            raise ValueError(f"energy model field description={self.description!r} must be a string")
        for key in COST_FIELDS:
            value = getattr(self, key)
            optional = key != "pj_per_sop"
            if value is None and optional:
                continue
            number = not isinstance(value, bool) and isinstance(value, int | float)
            if not number or not math.isfinite(value) or value < 0:
                allowed = "a finite number >= 0 (pJ)" + (" or null (not priced)" if optional else "")
                raise ValueError(f"energy model {self.name!r}: {key}={value!r} must be {allowed}")
            object.__setattr__(self, key, float(value))


ENERGY_MODELS: dict[str, EnergyModel] = {
    "45nm": EnergyModel(
        name="45nm",
        source=(
            "M. Horowitz, 'Computing's energy problem (and what we can do about it)', ISSCC 2014: "
            "45 nm CMOS, 0.9 V; 32-bit float multiply 3.7 pJ + add 0.9 pJ = 4.6 pJ per MAC, "
            "32-bit float add 0.9 pJ per accumulate (SOP)"
        ),
        pj_per_mac=4.6,
        pj_per_sop=0.9,
        description=(
            "32-bit float arithmetic on a 45 nm process, the usual convention for comparing SNNs "
            "with ANNs; neuron updates are not priced."
        ),
    ),
    "loihi": EnergyModel(
        name="loihi",
        source=(
            "M. Davies et al., 'Loihi: A Neuromorphic Manycore Processor with On-Chip Learning', "
            "IEEE Micro 38(1), 2018, Table 2: 14 nm, 0.75 V, pre-silicon (SPICE/SDF) estimates; "
            "synaptic spike op (min) 23.6 pJ, neuron update (active) 81 pJ. Quoted from secondary "
            "sources (SNN energy-estimation code and papers citing that table); the primary table "
            "could not be checked here."
        ),
        pj_per_mac=None,
        pj_per_sop=23.6,
        pj_per_neuron_update=81.0,
        description=(
            "Intel Loihi, 14 nm: not comparable with the 45 nm numbers, so no MAC cost is borrowed "
            "from another process; MAC energies (a direct-coded first layer, the ANN twin) are "
            "None. The spike-routing energy per tile hop (quoted as 3.0 to 4.2 pJ, the '+3.5 pJ' of "
            "some presets) is per emitted spike and depends on the placement on the chip: not included."
        ),
    ),
}


def load_energy_model(model: str | Path | EnergyModel) -> EnergyModel:
    """An energy model by preset name or from a YAML file.

    The YAML file is a mapping with the fields ``name``, ``source``, ``pj_per_mac`` (may be ``null``:
    no MAC unit), ``pj_per_sop`` and optionally ``pj_per_neuron_update`` and ``description``; see
    ``experiments/energy_profiles/``.

    :param model: a name in ``ENERGY_MODELS`` (``"45nm"``, ``"loihi"``), a path to a ``.yaml`` /
        ``.yml`` file, or an ``EnergyModel`` (returned as is)
    :raises ValueError: for an unknown name, a missing file, or a profile with missing, unknown or
        invalid fields
    """
    if isinstance(model, EnergyModel):
        return model
    if str(model) in ENERGY_MODELS:
        return ENERGY_MODELS[str(model)]
    path = Path(model)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        raise ValueError(
            f"unknown energy model {str(model)!r}; allowed: {', '.join(ENERGY_MODELS)}, or the path "
            "of an existing .yaml/.yml profile"
        )
    return _energy_model_from(yaml.safe_load(path.read_text()), f"energy profile {path}")


def _energy_model_from(data: Any, origin: str) -> EnergyModel:
    """An energy model from a mapping of its fields; an error message begins with ``origin``."""
    if not isinstance(data, Mapping):
        raise ValueError(
            f"{origin}: expected a mapping with the fields {', '.join(PROFILE_FIELDS)}, "
            f"got {type(data).__name__}"
        )
    unknown = sorted(map(str, set(data) - set(PROFILE_FIELDS)))
    if unknown:
        raise ValueError(
            f"{origin}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(PROFILE_FIELDS)}"
        )
    missing = [key for key in REQUIRED_PROFILE_FIELDS if key not in data]
    if missing:
        raise ValueError(
            f"{origin}: missing field(s) {', '.join(missing)}; required: {', '.join(REQUIRED_PROFILE_FIELDS)}"
        )
    try:
        return EnergyModel(**data)
    except ValueError as error:
        raise ValueError(f"{origin}: {error}") from error


def _receptive_field_sums(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over every output position's window, per group: ``[N, G, H, W]`` -> ``[N, G, H', W']``.

    A conv2d with an all-ones 1-channel kernel per group, with the layer's own padding, stride and
    dilation; non-zero padding modes pad explicitly first, exactly as ``nn.Conv2d`` does.
    """
    groups = conv.groups
    box = torch.ones(groups, 1, *conv.kernel_size, dtype=x.dtype, device=x.device)
    padding = conv.padding
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    return F.conv2d(x, box, stride=conv.stride, padding=padding, dilation=conv.dilation, groups=groups)


def _check_synapse(synapse: nn.Module) -> None:
    if not isinstance(synapse, nn.Conv2d | nn.Linear):
        raise ValueError(f"cannot count operations of {type(synapse).__name__}; supported: Conv2d, Linear")


def count_sops(synapse: nn.Module, spikes: torch.Tensor) -> int:
    """Synaptic operations of one layer: every input spike times its real fan-out.

    Conv2d: the ones kernel is the same for every (input, output) channel pair, so the input spikes of
    a group can be summed over its channels before the window sum, and every one of the group's
    ``out_channels / groups`` output channels sees the same count:

        SOPs = out_channels / groups * sum_g sum_p window_p(sum_{c in g} s[c])

    Linear: SOPs = (number of input spikes) * out_features.

    :param synapse: the Conv2d or Linear the spikes feed
    :param spikes: ``[T, B, ...]`` its input spikes (any non-zero entry is one spike event)
    :return: SOPs summed over all steps and samples
    """
    _check_synapse(synapse)
    events = spikes != 0
    if isinstance(synapse, nn.Linear):
        return int(torch.count_nonzero(events)) * synapse.out_features
    x = events.flatten(0, 1).to(torch.float32)  # [T*B, C, H, W]
    n, channels, height, width = x.shape
    groups = synapse.groups
    per_group = x.reshape(n, groups, channels // groups, height, width).sum(2)  # [T*B, G, H, W]
    # Each window sum is at most C/G * kh * kw, exact in float32; the total is summed in int64.
    windows = _receptive_field_sums(synapse, per_group).to(torch.int64)
    return synapse.out_channels // groups * int(windows.sum())


def count_macs(synapse: nn.Module, inputs: torch.Tensor) -> int:
    """Multiply-accumulates of one layer on analog input: output elements times fan-in.

    Conv2d: out_channels * H' * W' * (in_channels / groups * kh * kw) per sample and step.
    Linear: in_features * out_features per sample and step. Bias additions are not counted.

    :param synapse: the Conv2d or Linear
    :param inputs: ``[T', B, ...]`` its input (``T' = 1`` for a static first layer: counted once)
    :return: MACs summed over all steps and samples
    """
    _check_synapse(synapse)
    samples = inputs.shape[0] * inputs.shape[1]
    if isinstance(synapse, nn.Linear):
        return samples * synapse.in_features * synapse.out_features
    height, width = inputs.shape[-2:]
    probe = torch.zeros(1, synapse.groups, height, width, device=inputs.device)
    out_positions = _receptive_field_sums(synapse, probe)[0, 0].numel()
    fan_in = synapse.in_channels // synapse.groups * math.prod(synapse.kernel_size)
    return samples * synapse.out_channels * out_positions * fan_in


@dataclass
class EnergyCounts:
    """Exact operation counts summed over ``decisions`` greedy decisions (one observation each).

    Counts from several batches add up with ``+``. Per-action values divide by ``decisions`` (NaN
    when no decision was counted).

    :param num_steps: T of the spiking network (``None`` for a non-spiking ANN)
    :param decisions: number of observations the counts cover
    :param neurons: spiking layer -> its number of neurons (per observation)
    :param spikes: spiking layer -> spikes emitted over the T steps
    :param sops: layer with spiking input -> synaptic operations
    :param macs: layer with analog input -> multiply-accumulates
    :param neuron_updates: layer with neurons -> neuron state updates (neurons * T per observation)
    """

    num_steps: int | None
    decisions: int = 0
    neurons: dict[str, int] = field(default_factory=dict)
    spikes: dict[str, int] = field(default_factory=dict)
    sops: dict[str, int] = field(default_factory=dict)
    macs: dict[str, int] = field(default_factory=dict)
    neuron_updates: dict[str, int] = field(default_factory=dict)

    def __add__(self, other: EnergyCounts) -> EnergyCounts:
        if self.num_steps != other.num_steps:
            raise ValueError(
                f"cannot add counts of networks with num_steps={self.num_steps} and {other.num_steps}"
            )
        total = EnergyCounts(self.num_steps, self.decisions + other.decisions, {**self.neurons})
        for layer, n in other.neurons.items():
            if total.neurons.setdefault(layer, n) != n:
                raise ValueError(
                    f"cannot add counts of different networks: layer {layer!r} has "
                    f"{total.neurons[layer]} and {n} neurons"
                )
        for name in ("spikes", "sops", "macs", "neuron_updates"):
            for counts in (getattr(self, name), getattr(other, name)):
                for layer, value in counts.items():
                    _accumulate(getattr(total, name), layer, value)
        return total

    def per_action(self, total: float) -> float:
        """``total / decisions``, NaN when no decision was counted."""
        return total / self.decisions if self.decisions else math.nan

    @property
    def firing_rate(self) -> dict[str, float]:
        """Spiking layer -> spikes / (neurons * T), over all counted decisions."""
        return {
            layer: self.per_action(self.spikes[layer] / (n * self.num_steps))
            for layer, n in self.neurons.items()
        }

    @property
    def mean_firing_rate(self) -> float | None:
        """All spiking neurons together: total spikes / (total neurons * T); ``None`` without any."""
        if not self.neurons:
            return None
        return self.per_action(sum(self.spikes.values()) / (sum(self.neurons.values()) * self.num_steps))

    @property
    def spikes_per_action(self) -> float:
        """Spikes of all spiking layers over the T steps of one decision."""
        return self.per_action(sum(self.spikes.values()))

    @property
    def sops_per_action(self) -> float:
        """Synaptic operations of one decision."""
        return self.per_action(sum(self.sops.values()))

    @property
    def macs_per_action(self) -> float:
        """Multiply-accumulates (layers with analog input) of one decision."""
        return self.per_action(sum(self.macs.values()))

    @property
    def neuron_updates_per_action(self) -> float:
        """Neuron state updates of one decision."""
        return self.per_action(sum(self.neuron_updates.values()))


def _accumulate(totals: dict[str, int], layer: str, value: int) -> None:
    totals[layer] = totals.get(layer, 0) + value


def count_activity(
    activity: list[LayerActivity], num_steps: int, membrane_readout: bool = False
) -> EnergyCounts:
    """Exact counts of the forward passes recorded by ``SpikingQNetwork.record()``.

    Example::

        with torch.inference_mode(), q_net.record() as activity:
            q_net(obs)
        counts = count_activity(activity, q_net.num_steps)
        counts.firing_rate, counts.sops_per_action

    :param activity: the recorded layers (several forward passes may follow each other)
    :param num_steps: T of the network
    :param membrane_readout: the readout drives non-spiking integrators (``max_mem``, ``last_mem``,
        ``mean_mem``): count their ``n_actions * T`` neuron updates too
    :return: counts summed over every observation of every recorded forward pass
    :raises ValueError: if nothing was recorded or the spikes do not have ``num_steps`` steps
    """
    if not activity:
        raise ValueError("no layer activity recorded: run the forward pass inside `with q_net.record()`")
    counts = EnergyCounts(num_steps)
    first_layer = activity[0].name
    for layer in activity:
        name, batch = layer.name, layer.inputs.shape[1]
        # Every forward pass starts again at the first layer: one decision per observation.
        if name == first_layer:
            counts.decisions += batch
        if layer.input_is_spikes:
            _accumulate(counts.sops, name, count_sops(layer.synapse, layer.inputs))
        else:
            _accumulate(counts.macs, name, count_macs(layer.synapse, layer.inputs))
        if layer.spikes is not None:
            steps = layer.spikes.shape[0]
            if steps != num_steps:
                raise ValueError(f"layer {name!r} recorded {steps} steps, expected num_steps={num_steps}")
            neurons = layer.spikes[0, 0].numel()
            counts.neurons[name] = neurons
            _accumulate(counts.spikes, name, int(torch.count_nonzero(layer.spikes)))
        elif membrane_readout:
            neurons = layer.synapse.out_features
        else:
            continue
        _accumulate(counts.neuron_updates, name, neurons * num_steps * batch)
    return counts


@contextmanager
def _measuring(q_net: nn.Module) -> Iterator[None]:
    """Inference in eval mode, the module's mode restored after: a forward in training mode would
    calibrate an ``init="firing"`` network that has not been trained yet (SpikingPolicy's first-batch
    hook) on the measured observations, changing its weights."""
    training = q_net.training
    q_net.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        q_net.train(training)


def ann_layer_macs(q_net: nn.Module, observation_space: spaces.Space | None = None) -> dict[str, int]:
    """MACs per observation of every Conv2d / Linear layer of a Q-network, run as a dense ANN.

    Works for SB3's ``QNetwork`` (CnnPolicy: NatureCNN + Linear; MlpPolicy) and for a
    ``SpikingQNetwork``, whose ANN twin has the same synapse shapes: one dummy observation is passed
    through forward hooks and each layer is counted once, however often it is called. Layers are named
    in call order, ``conv1, conv2, ...`` and ``fc1, fc2, ...``, as the spiking network names them.

    :param q_net: the Q-network
    :param observation_space: its observation space (default: ``q_net.observation_space``)
    :return: layer -> MACs per observation (biases not counted)
    """
    space = observation_space if observation_space is not None else q_net.observation_space
    parameter = next(q_net.parameters())
    obs = torch.as_tensor(space.sample(), device=parameter.device).unsqueeze(0)
    layer_macs: dict[str, int] = {}
    seen: set[nn.Module] = set()
    numbers = {"conv": 0, "fc": 0}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if module in seen:
            return
        seen.add(module)
        kind = "conv" if isinstance(module, nn.Conv2d) else "fc"
        numbers[kind] += 1
        if kind == "conv":
            fan_in = module.in_channels // module.groups * math.prod(module.kernel_size)
        else:
            fan_in = module.in_features
        # output: [N, ...] where N is the batch (times T for the time-batched spiking layers)
        layer_macs[f"{kind}{numbers[kind]}"] = output[0].numel() * fan_in

    layers = [m for m in q_net.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        with _measuring(q_net):
            q_net(obs)
    finally:
        for handle in handles:
            handle.remove()
    return layer_macs


def ann_macs(q_net: nn.Module, observation_space: spaces.Space | None = None) -> int:
    """Total MACs per observation of the Q-network run as a dense ANN (see :func:`ann_layer_macs`).

    :param q_net: the Q-network (SB3 ``QNetwork`` or ``SpikingQNetwork``)
    :param observation_space: its observation space (default: ``q_net.observation_space``)
    """
    return sum(ann_layer_macs(q_net, observation_space).values())


def _price(pj_per_op: float | None, ops: float) -> float | None:
    # Nothing to price costs nothing, even where the profile has no price for that operation.
    if ops == 0:
        return 0.0
    return None if pj_per_op is None else pj_per_op * ops


@dataclass(frozen=True)
class EnergyReport:
    """Per-action statistics and energy of the counted greedy decisions, with the ANN comparison.

    Per-layer and per-action values are averages per decision (NaN when no decision was counted); an
    energy is ``None`` where the model has no price for an operation that occurred, and with it the
    ratio. ``to_dict`` gives the flat JSON form, ``from_dict`` reads it back.

    :param energy_model: the energy model that priced the operations
    :param num_steps: T of the spiking network (``None`` for a non-spiking ANN)
    :param decisions: greedy decisions counted
    :param firing_rate: spiking layer -> spikes / (neurons * T)
    :param mean_firing_rate: all spiking neurons together; ``None`` without spiking layers
    :param spikes_per_layer: spiking layer -> spikes per action
    :param spikes_per_action: spikes of all spiking layers per action
    :param sops_per_layer: layer with spiking input -> synaptic operations per action
    :param sops_per_action: synaptic operations per action
    :param macs_per_layer: layer with analog input -> multiply-accumulates per action
    :param macs_per_action: multiply-accumulates per action
    :param neuron_updates_per_action: neuron state updates per action
    :param energy_breakdown_pj: ``macs``, ``sops`` and ``neuron_updates`` -> pJ per action (``None``:
        not priced)
    :param energy_pj_per_action: E_SNN in pJ (``None``: an operation that occurred has no price)
    :param ann_macs_per_action: MACs per observation of the equivalent dense ANN
    :param ann_energy_pj_per_action: E_ANN in pJ (``None`` for a model without a MAC price)
    :param energy_ratio: E_SNN / E_ANN (``None`` where either is unknown)
    :param assumptions: what the numbers assume, one sentence each
    """

    energy_model: EnergyModel
    num_steps: int | None
    decisions: int
    firing_rate: dict[str, float]
    mean_firing_rate: float | None
    spikes_per_layer: dict[str, float]
    spikes_per_action: float
    sops_per_layer: dict[str, float]
    sops_per_action: float
    macs_per_layer: dict[str, float]
    macs_per_action: float
    neuron_updates_per_action: float
    energy_breakdown_pj: dict[str, float | None]
    energy_pj_per_action: float | None
    ann_macs_per_action: int
    ann_energy_pj_per_action: float | None
    energy_ratio: float | None
    assumptions: list[str]

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON form: one key per field, ``energy_model`` as a mapping of its fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EnergyReport:
        """Read back the flat form of ``to_dict`` (also the energy keys of an evaluation result).

        :param data: a mapping with every key of ``to_dict``; other keys are ignored
        :raises ValueError: naming a missing key, or for an energy model that is not valid
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"an energy report must be a mapping, got {type(data).__name__}")
        missing = [f.name for f in fields(cls) if f.name not in data]
        if missing:
            raise ValueError(f"energy report: missing key(s) {', '.join(missing)}")
        # Copies: the report shares no mapping or list with ``data``.
        values = {f.name: copy.deepcopy(data[f.name]) for f in fields(cls)}
        values["energy_model"] = _energy_model_from(values["energy_model"], "energy report: energy_model")
        return cls(**values)


def energy_report(
    counts: EnergyCounts, model: str | Path | EnergyModel, ann_macs_per_action: int
) -> EnergyReport:
    """Per-action statistics and energy of the counted decisions, with the ANN comparison.

    :param counts: the counts (``count_activity``, ``EnergyMeter.counts``)
    :param model: the energy model, or its preset name or YAML path (``load_energy_model``)
    :param ann_macs_per_action: MACs per observation of the equivalent dense ANN (``ann_macs``)
    :return: the report; ``energy_breakdown_pj`` holds ``macs``, ``sops`` and ``neuron_updates``
    """
    model = load_energy_model(model)
    breakdown = {
        "macs": _price(model.pj_per_mac, counts.macs_per_action),
        "sops": _price(model.pj_per_sop, counts.sops_per_action),
        "neuron_updates": (
            None
            if model.pj_per_neuron_update is None
            else model.pj_per_neuron_update * counts.neuron_updates_per_action
        ),
    }
    priced = [breakdown["macs"], breakdown["sops"]]
    if model.pj_per_neuron_update is not None:
        priced.append(breakdown["neuron_updates"])
    energy = None if None in priced else sum(priced)
    ann_energy = _price(model.pj_per_mac, ann_macs_per_action)
    ratio = energy / ann_energy if energy is not None and ann_energy else None
    return EnergyReport(
        energy_model=model,
        num_steps=counts.num_steps,
        decisions=counts.decisions,
        firing_rate=counts.firing_rate,
        mean_firing_rate=counts.mean_firing_rate,
        spikes_per_layer={layer: counts.per_action(n) for layer, n in counts.spikes.items()},
        spikes_per_action=counts.spikes_per_action,
        sops_per_layer={layer: counts.per_action(n) for layer, n in counts.sops.items()},
        sops_per_action=counts.sops_per_action,
        macs_per_layer={layer: counts.per_action(n) for layer, n in counts.macs.items()},
        macs_per_action=counts.macs_per_action,
        neuron_updates_per_action=counts.neuron_updates_per_action,
        energy_breakdown_pj=breakdown,
        energy_pj_per_action=energy,
        ann_macs_per_action=ann_macs_per_action,
        ann_energy_pj_per_action=ann_energy,
        energy_ratio=ratio,
        assumptions=_assumptions(counts, model),
    )


def _assumptions(counts: EnergyCounts, model: EnergyModel) -> list[str]:
    costs = ", ".join(f"{key}={getattr(model, key)}" for key in COST_FIELDS)
    lines = [
        f"{ENERGY_ASSUMPTIONS_START}{model.name!r} ({costs}): {model.source}. {model.description}".strip(),
        f"Per action = per greedy decision: one forward pass for one observation, averaged over "
        f"{counts.decisions} decisions; exact counts of the recorded activity, not rate estimates.",
        "Only arithmetic is priced: memory access, data movement, spike routing and static power are "
        "not included.",
        "E_SNN = pj_per_mac * MACs + pj_per_sop * SOPs (+ pj_per_neuron_update * neuron updates where "
        "the model prices them); E_ANN = pj_per_mac * MACs of the same layer shapes, every layer dense; "
        "energy_ratio = E_SNN / E_ANN (< 1: the SNN needs less energy).",
    ]
    if counts.num_steps is None:
        lines.append("Non-spiking ANN: every layer is dense, all operations are MACs (biases not counted).")
        return lines
    lines += [
        f"Spikes per action: all spikes of the spiking layers over the T={counts.num_steps} steps of one "
        "decision (the output layer included when it spikes); firing rate = spikes / (neurons * T).",
        "MACs: layers with analog input (direct coding: the first layer, applied once to the "
        "observation and fed as the same current at every step, so counted once, not T times); biases "
        "not counted.",
        "SOPs: every input spike costs one accumulate per synapse it really reaches: out_features for a "
        "Linear layer, border-aware for a convolution (a pixel at the border feeds fewer windows).",
        "Readout: fc2 counted as SOPs on the last hidden layer's spikes (each spike triggers n_actions "
        "accumulates), also for the rate readout, where fc2 is applied once to the mean rate: "
        "W (1/T sum_t s[t]) = 1/T sum_t W s[t]; the final 1/T scaling and the bias are not counted.",
        "Neuron updates: neurons * T per spiking layer (and per non-spiking output integrator of a "
        "membrane readout); "
        + (
            "priced by this model."
            if model.pj_per_neuron_update is not None
            else "counted but not priced by this model."
        ),
    ]
    if not counts.macs:
        lines.append("Spike-coded input: no layer receives analog input, so there are no MACs.")
    if not counts.decisions:
        lines.append("No greedy decision was counted: the per-action statistics are NaN.")
    return lines


class EnergyMeter:
    """Q-values of greedy decisions with their exact operation counts, accumulated (for evaluation).

    Example::

        meter = EnergyMeter(model.policy.q_net)
        obs_tensor, _ = model.policy.obs_to_tensor(obs)
        actions = meter.q_values(obs_tensor).argmax(dim=1)
        ...
        report = meter.report("45nm")

    :param q_net: a ``SpikingQNetwork`` (its activity is recorded at every call) or an ANN
        Q-network such as SB3's ``QNetwork`` (every call costs its dense MACs)
    :param observation_space: its observation space (default: ``q_net.observation_space``)
    """

    def __init__(self, q_net: nn.Module, observation_space: spaces.Space | None = None) -> None:
        self.q_net = q_net
        self.ann_layer_macs = ann_layer_macs(q_net, observation_space)
        self.is_spiking = isinstance(q_net, SpikingQNetwork)
        readout_neurons = q_net.readout.neurons if self.is_spiking else None
        self.membrane_readout = readout_neurons is not None and not readout_neurons.fire
        self.counts = EnergyCounts(q_net.num_steps if self.is_spiking else None)

    def q_values(self, obs: torch.Tensor) -> torch.Tensor:
        """Q-values for a batch of observations; each observation counts as one greedy decision.

        :param obs: ``[B, *observation_shape]``, as ``policy.obs_to_tensor`` makes it
        :return: ``[B, n_actions]``
        """
        with _measuring(self.q_net):
            if not self.is_spiking:
                batch = obs.shape[0]
                layer_macs = {layer: macs * batch for layer, macs in self.ann_layer_macs.items()}
                self.counts += EnergyCounts(None, batch, macs=layer_macs)
                return self.q_net(obs)
            with self.q_net.record() as activity:
                q = self.q_net(obs)
        self.counts += count_activity(activity, self.q_net.num_steps, self.membrane_readout)
        return q

    def report(self, model: str | Path | EnergyModel = "45nm") -> EnergyReport:
        """``energy_report`` of everything counted so far.

        :param model: energy model, preset name or YAML path
        """
        return energy_report(self.counts, model, sum(self.ann_layer_macs.values()))
