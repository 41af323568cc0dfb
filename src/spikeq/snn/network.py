"""The spiking Q-network: encoder -> spiking torso (snnTorch ``Leaky`` layers) -> readout -> Q.

For image observations the torso is the Nature-DQN one of the paper (Liu et al. 2022):

    conv1 C->32 k8 s4 -> LIF -> conv2 32->64 k4 s2 -> LIF -> conv3 64->64 k3 s1 -> LIF
    -> flatten -> fc1 ->512 -> LIF -> readout (fc2 -> n_actions)

For small grids (MinAtar's 10x10xC, any channel-first Box under 36x36) it is Young and Tian's (2019)
MinAtar torso, with the same spiking layers:

    conv1 C->16 k3 s1 -> LIF -> flatten -> fc1 ->128 -> LIF -> readout (fc2 -> n_actions)

For vector observations it is an MLP: Linear -> LIF for each size in ``net_arch``. The network runs T
(``num_steps``) steps from a zero state on every forward call, so Q depends only on the observation.

Initialisation (``init``): ``"default"`` keeps PyTorch's (the paper's reference code), which leaves the
network silent on Atari frames in [0, 1]: conv1's currents stay below the threshold, no deeper layer
ever fires and Q is the same for every frame. ``"firing"`` rescales each spiking layer on the first
batch of real observations so that it fires (``SpikingQNetwork.calibrate_firing``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.preprocessing import is_image_space, preprocess_obs
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.dqn.policies import QNetwork
from torch import nn

from spikeq.snn.encoding import ENCODERS, make_encoder
from spikeq.snn.engine import BACKENDS, Workspace, over_time
from spikeq.snn.neurons import ENGINES, NeuronSpec, SpikingLayer, check_engine
from spikeq.snn.readout import READOUTS, Readout

# Nature-DQN convolutions (Mnih et al. 2015), used unchanged by the paper: (out_channels, kernel, stride)
NATURE_CONVS = ((32, 8, 4), (64, 4, 2), (64, 3, 1))
DEFAULT_CNN_ARCH = (512,)
# MinAtar's DQN torso (Young and Tian 2019, examples/dqn.py): one 3x3 convolution with 16 filters,
# then 128 units: a quarter of the Nature-DQN's widths
MINATAR_CONVS = ((16, 3, 1),)
DEFAULT_GRID_ARCH = (128,)
# Below this height or width the Nature-DQN convolutions do not fit; such grids get the MinAtar torso.
NATURE_MIN_SIZE = 36
DEFAULT_MLP_ARCH = (64, 64)
INITS = ("default", "firing")
# The mean firing rate init="firing" gives every spiking layer on its calibration batch: far from
# silence and from saturation (rate 1), about one spike per neuron per forward pass at T = 8, and the
# rates the engine's speed was measured at (10-14%). On Pong and Breakout frames the layers stayed at
# 9-11% over the first 250 updates of the paper's optimiser (benchmarks/README.md).
FIRING_TARGET_RATE = 0.1
# calibrate_firing: rates tried per layer, and how far the factor on a layer's weights may go from 1.
CALIBRATION_STEPS = 30
CALIBRATION_MAX_SCALE = 2.0**16

# T above this is a typo rather than an experiment: one forward at T = 4096 on an Atari frame already
# holds 4096 x 32 x 20 x 20 membrane values per conv1 map, per sample in the batch.
MAX_NUM_STEPS = 4096


@dataclass(frozen=True)
class NetworkSpec(NeuronSpec):
    """Everything that defines a spiking Q-network besides its spaces (the policy's kwargs): the
    neuron model of every layer (the fields of ``NeuronSpec``) and the following.

    :param num_steps: T, simulation steps per forward pass (paper: 64)
    :param encoder: ``"direct"`` (paper) or ``"poisson"``
    :param readout: ``"rate"`` (paper), ``"spike"``, ``"max_mem"``, ``"last_mem"``, ``"mean_mem"``
    :param engine: ``"fused"`` (time-batched) or ``"snntorch"`` (every layer called at every step)
    :param backend: where the fused engine runs the membrane recurrence (``spikeq.snn.engine``): ``"torch"``
        (PyTorch kernels, any device), ``"triton"`` (spikeq's Triton kernels, CUDA) or ``"auto"``
        (Triton for CUDA tensors where it is installed, else PyTorch)
    :param recompute: fused engine: recompute the membrane of a layer with a static (direct) input in
        the backward pass instead of storing it, T times its input: less memory, a little more time
    :param net_arch: hidden fully-connected sizes: after the convolutions for images (default
        ``(512,)``) and small grids (default ``(128,)``), the whole MLP for vectors (default ``(64, 64)``)
    :param init: ``"firing"`` (rescale every spiking layer on the first training batch so that it
        fires, ``SpikingQNetwork.calibrate_firing``) or ``"default"`` (PyTorch's initialisation, the
        paper's reference code; silent on Atari frames until training wakes it)
    """

    num_steps: int = 64
    encoder: str = "direct"
    readout: str = "rate"
    engine: str = "fused"
    backend: str = "auto"
    recompute: bool = False
    net_arch: tuple[int, ...] | None = None
    init: str = "firing"

    def __post_init__(self) -> None:
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int):
            raise ValueError(f"num_steps={self.num_steps!r} must be an integer >= 1")
        if self.num_steps < 1:
            raise ValueError(f"num_steps={self.num_steps!r} must be >= 1")
        if not isinstance(self.recompute, bool):
            raise ValueError(f"recompute={self.recompute!r} must be True or False")
        for name, value, allowed in (
            ("encoder", self.encoder, ENCODERS),
            ("readout", self.readout, READOUTS),
            ("engine", self.engine, ENGINES),
            ("init", self.init, INITS),
            ("backend", self.backend, BACKENDS),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")
        if self.net_arch is not None:
            arch = tuple(self.net_arch)
            if not arch or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in arch):
                raise ValueError(f"net_arch={self.net_arch!r} must be a non-empty list of sizes >= 1")
            object.__setattr__(self, "net_arch", arch)
        super().__post_init__()
        check_engine(self.engine, self.detach_reset)
        if self.engine == "snntorch" and self.backend == "triton":
            raise ValueError(
                "backend='triton' runs the fused engine's recurrence; engine='snntorch' steps snnTorch's "
                "Leaky instead: use engine='fused' with backend='triton', or backend='auto' or 'torch'"
            )
        if self.backend == "triton" and self.surrogate != "atan":
            raise ValueError(
                f"backend='triton' differentiates surrogate='atan' only, got surrogate={self.surrogate!r}; "
                "use backend='torch' or 'auto'"
            )

    @property
    def neuron_spec(self) -> NeuronSpec:
        """The neuron model shared by every spiking layer."""
        names = {f.name for f in fields(NeuronSpec)}
        return NeuronSpec(**{k: v for k, v in asdict(self).items() if k in names})

    def to_kwargs(self) -> dict:
        """Plain-data kwargs (lists, not tuples) for ``policy_kwargs``, YAML and JSON."""
        kwargs = asdict(self)
        kwargs["net_arch"] = None if self.net_arch is None else list(self.net_arch)
        return kwargs


@dataclass
class LayerActivity:
    """What one synaptic layer saw and produced in the last forward (for energy accounting).

    :param name: layer name (``conv1`` ... ``fc1``, ``fc2``)
    :param synapse: the Conv2d / Linear
    :param inputs: ``[T', B, ...]`` its input: analog values (``T' = 1`` for a static first layer)
        or 0/1 spikes
    :param input_is_spikes: whether ``inputs`` are spikes
    :param spikes: ``[T, B, ...]`` spikes of the neurons it drives (None: non-spiking output)
    """

    name: str
    synapse: nn.Module
    inputs: torch.Tensor
    input_is_spikes: bool
    spikes: torch.Tensor | None


def check_spaces(observation_space: spaces.Space, action_space: spaces.Space) -> None:
    """Raise ``ValueError`` unless a spiking Q-network can take these spaces."""
    if not isinstance(action_space, spaces.Discrete):
        raise ValueError(f"action space {action_space} is not supported: a Q-network needs spaces.Discrete")
    allowed = (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)
    if not isinstance(observation_space, allowed):
        raise ValueError(
            f"observation space {observation_space} is not supported; allowed: Box (image or "
            "vector), Discrete, MultiDiscrete, MultiBinary"
        )


def check_channel_first(observation_space: spaces.Box) -> None:
    """Raise ``ValueError`` for a 3-D Box laid out channel-last, ``[H, W, C]``.

    The convolutional torsos take channel-first ``[C, H, W]``. SB3 transposes uint8 images in
    [0, 255] itself (``VecTransposeImage``) but passes any other 3-D Box on as it is, so MinAtar's own
    bool ``[10, 10, C]`` grid would reach conv1 with its rows as channels and its channels as columns,
    and train without a word. Which axis holds the channels is decided as SB3 decides it for images
    (``is_image_space_channels_first``): the smallest one.

    :param observation_space: a 3-D Box, as the network sees it
    """
    if int(np.argmin(observation_space.shape)) == 2:
        raise ValueError(
            f"observation shape {observation_space.shape} is channel-last [H, W, C] (its smallest axis "
            "is the last); allowed: channel-first [C, H, W] (SB3 transposes only uint8 images in "
            "[0, 255]): transpose the observations (MinAtar: spikeq.envs.minatar.make_env or its "
            "ChannelFirstGrid wrapper), or flatten them (gymnasium's FlattenObservation: an MLP)"
        )


def torso_of(observation_space: spaces.Space, normalize_images: bool = True) -> str:
    """Which torso a Q-network gets for these observations (the ANN and every spiking model alike).

    ``"grid"``: a channel-first Box ``[C, H, W]`` smaller than 36x36 (MinAtar's uint8 ``[C, 10, 10]``
    of 0s and 1s), whatever its dtype (``check_image_dtype`` refuses float ones while
    ``normalize_images`` is True): the MinAtar torso. ``"nature"``: an image (SB3's
    ``is_image_space``: uint8 in [0, 255], or already normalised floats when ``normalize_images`` is
    False): the Nature-DQN torso. ``"mlp"``: everything else, flattened.

    :param observation_space: the observation space as the network sees it (channel-first images)
    :param normalize_images: whether image observations are divided by 255
    :raises ValueError: for a channel-last 3-D Box (``check_channel_first``) or a grid too small
    """
    if isinstance(observation_space, spaces.Box) and len(observation_space.shape) == 3:
        check_channel_first(observation_space)
        if min(observation_space.shape[1:]) < NATURE_MIN_SIZE:
            ((_, kernel, _),) = MINATAR_CONVS
            if min(observation_space.shape[1:]) < kernel:
                raise ValueError(
                    f"observation shape {observation_space.shape} is too small for the grid torso's "
                    f"{kernel}x{kernel} convolution; allowed: channel-first [C, H, W] with H and W at "
                    f"least {kernel}, or a flattened observation (gymnasium's FlattenObservation: an MLP)"
                )
            return "grid"
    image = is_image_space(observation_space, check_channels=False, normalized_image=not normalize_images)
    return "nature" if image else "mlp"


class MinAtarCNN(BaseFeaturesExtractor):
    """The ANN DQN's MinAtar torso for SB3 (``DQN("MlpPolicy", env, policy_kwargs=dict(
    features_extractor_class=MinAtarCNN, net_arch=[128]))``): conv 16 k3 s1 -> ReLU -> flatten, as
    Young and Tian's examples/dqn.py; the policy adds Linear 128 -> ReLU -> Linear Q.

    :param observation_space: channel-first grid ``[C, H, W]``, values in {0, 1}
    """

    def __init__(self, observation_space: spaces.Box) -> None:
        check_channel_first(observation_space)
        channels, height, width = observation_space.shape
        ((out_channels, kernel, stride),) = MINATAR_CONVS
        out_h, out_w = (height - kernel) // stride + 1, (width - kernel) // stride + 1
        super().__init__(observation_space, features_dim=out_channels * out_h * out_w)
        self.cnn = nn.Sequential(nn.Conv2d(channels, out_channels, kernel, stride), nn.ReLU(), nn.Flatten())

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        """:param observations: ``[B, C, H, W]`` floats :return: ``[B, 16 (H-2) (W-2)]``"""
        return self.cnn(observations)


def check_image_dtype(observation_space: spaces.Space, normalize_images: bool) -> None:
    """Raise ``ValueError`` for image-shaped float observations with ``normalize_images=True``.

    (Other dtypes keep SB3's rule: uint8 ``[C, H, W]`` is an image, anything else a vector; a grid
    smaller than 36x36, such as MinAtar's, gets the grid torso whatever its dtype: ``torso_of``.)

    SB3 treats such observations as its ``CnnPolicy`` does: images are uint8 in [0, 255], divided by
    255 when ``normalize_images`` is True; a float image would be divided again, so ``NatureCNN``
    refuses it and asks for ``normalize_images=False``. A spiking network would otherwise silently take
    it for a vector and build an MLP over every pixel.
    """
    if (
        normalize_images
        and isinstance(observation_space, spaces.Box)
        and len(observation_space.shape) == 3
        and np.issubdtype(observation_space.dtype, np.floating)
    ):
        raise ValueError(
            f"observation space {observation_space} looks like an image but is float: with "
            "normalize_images=True SB3 expects uint8 images in [0, 255]; for float images already "
            "normalised pass normalize_images=False (policy_kwargs=dict(normalize_images=False)), which "
            "builds the convolutional torso"
        )


class SpikingQNetwork(QNetwork):
    """DSQN: a Q-network whose hidden layers are snnTorch ``Leaky`` neurons run for T steps.

    :param observation_space: Box image (channel-first uint8, as SB3 passes it), Box vector,
        Discrete, MultiDiscrete or MultiBinary
    :param action_space: Discrete
    :param spec: the network's hyperparameters
    :param normalize_images: divide image observations by 255 (SB3's convention)
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Discrete,
        spec: NetworkSpec,
        normalize_images: bool = True,
    ) -> None:
        check_spaces(observation_space, action_space)
        # QNetwork.__init__ would build an unused ReLU MLP; only the BasePolicy part is wanted.
        BasePolicy.__init__(self, observation_space, action_space, normalize_images=normalize_images)
        self.spec = spec
        self.num_steps = spec.num_steps
        self.engine = spec.engine
        self.is_image = is_image_space(
            observation_space, check_channels=False, normalized_image=not normalize_images
        )
        check_image_dtype(observation_space, normalize_images)
        self.encoder = make_encoder(spec.encoder, observation_space, self.is_image)
        self.layer_names, synapses = self._build_torso()
        self.synapses = nn.ModuleList(synapses)
        # The fused engine's large buffers, reused from one training step to the next (engine.Workspace)
        self.workspace = Workspace()
        layer_kwargs = dict(backend=spec.backend, workspace=self.workspace)
        self.neurons = nn.ModuleList(SpikingLayer(spec.neuron_spec, **layer_kwargs) for _ in synapses)
        self.readout = Readout(
            spec.readout, self._torso_width(), int(action_space.n), spec.neuron_spec, **layer_kwargs
        )
        n_fc = sum(name.startswith("fc") for name in self.layer_names)
        self.readout_name = f"fc{n_fc + 1}"
        self._activity: list[LayerActivity] | None = None
        # 1.0 once calibrate_firing has run: saved with the weights, so a loaded or resumed network is
        # never calibrated again. A float, not a bool: state dicts are handled as float tensors.
        self.register_buffer("firing_calibrated", torch.tensor(0.0))
        # Each spiking layer's firing rate on the last batch seen in training mode (0-dim tensors).
        self.firing_rates: dict[str, torch.Tensor] = {}

    def _build_torso(self) -> tuple[list[str], list[nn.Module]]:
        names: list[str] = []
        synapses: list[nn.Module] = []
        torso = torso_of(self.observation_space, self.normalize_images)
        if torso in ("nature", "grid"):
            channels = self.observation_space.shape[0]
            convs = NATURE_CONVS if torso == "nature" else MINATAR_CONVS
            for i, (out_channels, kernel, stride) in enumerate(convs, start=1):
                synapses.append(nn.Conv2d(channels, out_channels, kernel, stride))
                names.append(f"conv{i}")
                channels = out_channels
            with torch.no_grad():
                probe = torch.zeros(1, *self.observation_space.shape)
                for conv in synapses:
                    probe = conv(probe)
            in_features = probe.numel()
            arch = self.spec.net_arch or (DEFAULT_CNN_ARCH if torso == "nature" else DEFAULT_GRID_ARCH)
        else:
            in_features = int(spaces.flatdim(self.observation_space))
            arch = self.spec.net_arch or DEFAULT_MLP_ARCH
        for i, width in enumerate(arch, start=1):
            linear = nn.Linear(in_features, width)
            # The first fully-connected layer after convolutions (or of an MLP) flattens its input.
            first_fc = i == 1
            synapses.append(nn.Sequential(nn.Flatten(), linear) if first_fc else linear)
            names.append(f"fc{i}")
            in_features = width
        return names, synapses

    def _torso_width(self) -> int:
        last = self.synapses[-1]
        return (last[-1] if isinstance(last, nn.Sequential) else last).out_features

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Q-values for a batch of observations.

        :param obs: ``[B, *observation_shape]``
        :return: ``[B, n_actions]``
        """
        x = self._encode(obs)  # [T', B, ...]
        if self.engine == "fused":
            layer_spikes = self._torso_fused(x)
        else:
            layer_spikes = self._torso_step_by_step(x)
        q, out_spikes = self.readout(layer_spikes[-1], self.num_steps, self.engine)
        if self._activity is not None:
            self._record(x, layer_spikes, out_spikes)
        if self.training:
            spiking = layer_spikes if out_spikes is None else [*layer_spikes, out_spikes]
            names = self.spiking_layer_names
            self.firing_rates = {n: s.detach().mean() for n, s in zip(names, spiking, strict=True)}
        return q

    def _encode(self, obs: torch.Tensor) -> torch.Tensor:
        x = preprocess_obs(obs, self.observation_space, normalize_images=self.normalize_images)
        return self.encoder(x.to(self.readout.linear.weight.dtype), self.num_steps)

    @property
    def spiking_layer_names(self) -> list[str]:
        """The names of the layers of spiking neurons, in order (the output layer of the ``spike``
        readout included)."""
        return [*self.layer_names, *([self.readout_name] if self.readout.kind == "spike" else [])]

    @property
    def needs_calibration(self) -> bool:
        """Whether ``init="firing"`` asks for a ``calibrate_firing`` that has not run yet."""
        return self.spec.init == "firing" and not bool(self.firing_calibrated)

    @torch.no_grad()
    def calibrate_firing(
        self, obs: torch.Tensor, target_rate: float = FIRING_TARGET_RATE
    ) -> dict[str, float]:
        """Rescale every spiking layer, in order, so that it fires at ``target_rate`` on ``obs``.

        Data-driven layer-wise scaling in the spirit of LSUV (Mishkin and Matas, ICLR 2016), which
        rescales each layer in turn on a batch of data until its output variance is 1, and of the
        threshold balancing of converted SNNs (Diehl et al. 2015; Sengupta et al. 2019), which sets
        each layer's scale from the activity of the layer before on real inputs. For spiking layer l
        (conv1, conv2, ..., fc1, then the output layer of the ``spike`` readout), with the layers
        before it already rescaled and their spikes ``s_{l-1}`` (for l = 1: the encoded observation)
        computed on ``obs``:

            I_l(a)[t] = a (W_l s_{l-1}[t] + b_l)                     (input current, scaled by a > 0)
            r_l(a) = 1/(T B N_l) sum_{t, b, i} S_l[t, b, i]          (S_l: the spikes I_l(a) drives)

        a_l solves r_l(a_l) = target_rate by geometric bisection: a is doubled (or halved) from 1
        until it brackets the target, then the bracket's geometric mean replaces the end on its side,
        until the rate is within 5% of the target (at most ``CALIBRATION_STEPS`` tries); the tried
        factor with the closest rate is kept, W_l <- a_l W_l and b_l <- a_l b_l. r_l is non-decreasing
        in a for a static current (the first layer under the ``direct`` encoder: each neuron's current
        a c_i fires more often as a grows when c_i > 0, never when c_i <= 0) and close to it for spike
        inputs. Thresholds and leaks stay as they are, and so does the output layer of the ``rate``
        and membrane readouts (Q = fc2(...) keeps PyTorch's initialisation). Marks the network
        calibrated (the ``firing_calibrated`` buffer).

        :param obs: ``[B, *observation_shape]`` real observations (e.g. a replay batch)
        :param target_rate: the mean firing rate to give every spiking layer, in (0, 1)
        :return: every spiking layer's firing rate on ``obs`` after the rescaling
        """
        if not 0.0 < target_rate < 1.0:
            raise ValueError(f"target_rate={target_rate!r} must lie in (0, 1)")
        x = self._encode(obs)
        layers = [*zip(self.layer_names, self.synapses, self.neurons, strict=True)]
        if self.readout.kind == "spike":
            layers.append((self.readout_name, self.readout.linear, self.readout.neurons))
        rates = {}
        for name, synapse, neurons in layers:
            current = over_time(synapse, x)  # [T', B, ...]
            scale, rate, x = self._scale_for_rate(current, neurons, target_rate)
            for parameter in synapse.parameters():
                parameter.mul_(scale)
            rates[name] = rate
        self.firing_calibrated.fill_(1.0)
        return rates

    def _scale_for_rate(
        self, current: torch.Tensor, neurons: SpikingLayer, target_rate: float
    ) -> tuple[float, float, torch.Tensor]:
        """The factor on ``current`` whose spikes are closest to ``target_rate``: (factor, rate, spikes)."""
        best: tuple[float, float, torch.Tensor] | None = None
        tries = 0

        def fire(scale: float) -> float:
            nonlocal best, tries
            tries += 1
            spikes = neurons(current * scale, self.num_steps, self.engine)[0]
            rate = float(spikes.mean())
            if best is None or abs(rate - target_rate) < abs(best[1] - target_rate):
                best = (scale, rate, spikes)
            return rate

        low = high = 1.0
        rate = fire(1.0)
        if rate < target_rate:
            while rate < target_rate and high < CALIBRATION_MAX_SCALE:
                low, high = high, high * 2.0
                rate = fire(high)
        else:
            while rate >= target_rate and low > 1.0 / CALIBRATION_MAX_SCALE:
                low, high = low / 2.0, low
                rate = fire(low)
        while tries < CALIBRATION_STEPS and abs(rate - target_rate) > 0.05 * target_rate:
            middle = (low * high) ** 0.5
            rate = fire(middle)
            if rate < target_rate:
                low = middle
            else:
                high = middle
        return best

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        # Networks saved before firing-aware initialisation existed have no flag: they are trained
        # networks, never to be rescaled.
        state_dict.setdefault(prefix + "firing_calibrated", torch.tensor(1.0))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _torso_fused(self, x: torch.Tensor) -> list[torch.Tensor]:
        # Layer by layer: each synapse over all steps at once, then the layer's recurrence over T steps.
        # With direct input x is [1, B, ...], so conv1 runs once and its current is static.
        layer_spikes = []
        for synapse, neurons in zip(self.synapses, self.neurons, strict=True):
            current = over_time(synapse, x)  # [T or 1, B, ...]
            x = neurons.spikes(current, self.num_steps, self.spec.recompute)  # [T, B, ...]
            layer_spikes.append(x)
        return layer_spikes

    def _torso_step_by_step(self, x: torch.Tensor) -> list[torch.Tensor]:
        # A static (direct) input drives the first layer with the same current at every step.
        static_current = self.synapses[0](x[0]) if x.shape[0] == 1 else None
        mems: list[torch.Tensor | None] = [None] * len(self.synapses)
        steps: list[list[torch.Tensor]] = [[] for _ in self.synapses]
        for t in range(self.num_steps):
            h = x[0] if static_current is not None else x[t]
            for i, (synapse, neurons) in enumerate(zip(self.synapses, self.neurons, strict=True)):
                current = static_current if i == 0 and static_current is not None else synapse(h)
                if mems[i] is None:
                    mems[i] = torch.zeros_like(current)
                h, mems[i] = neurons.step(current, mems[i])
                steps[i].append(h)
        for neurons in self.neurons:
            neurons.clear_state()
        return [torch.stack(s) for s in steps]

    def _record(
        self, x: torch.Tensor, layer_spikes: list[torch.Tensor], out_spikes: torch.Tensor | None
    ) -> None:
        inputs = [x, *layer_spikes]
        for i, (name, synapse) in enumerate(zip(self.layer_names, self.synapses, strict=True)):
            linear = synapse[-1] if isinstance(synapse, nn.Sequential) else synapse
            self._activity.append(
                LayerActivity(
                    name,
                    linear,
                    inputs[i].detach(),
                    input_is_spikes=i > 0 or not self.encoder.analog,
                    spikes=layer_spikes[i].detach(),
                )
            )
        self._activity.append(
            LayerActivity(
                self.readout_name,
                self.readout.linear,
                layer_spikes[-1].detach(),
                input_is_spikes=True,
                spikes=None if out_spikes is None else out_spikes.detach(),
            )
        )

    @contextmanager
    def record(self) -> Iterator[list[LayerActivity]]:
        """Record every layer's inputs and spikes during the forward calls inside the block.

        Example::

            with q_net.record() as activity:
                q_net(obs)
            spikes = {a.name: int(a.spikes.sum()) for a in activity if a.spikes is not None}
        """
        self._activity = []
        try:
            yield self._activity
        finally:
            self._activity = None

    def spike_counts(self, obs: torch.Tensor) -> dict[str, int]:
        """Spikes emitted by every spiking layer for one forward pass on ``obs`` (whole batch).

        :param obs: ``[B, *observation_shape]``
        """
        with torch.no_grad(), self.record() as activity:
            self(obs)
        return {a.name: int(a.spikes.sum()) for a in activity if a.spikes is not None}

    def _predict(self, observation: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        with torch.inference_mode():
            return self(observation).argmax(dim=1).reshape(-1)

    def _get_constructor_parameters(self) -> dict:
        data = BasePolicy._get_constructor_parameters(self)
        data["spec"] = self.spec
        return data
