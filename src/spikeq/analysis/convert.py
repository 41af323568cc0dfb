"""ANN->SNN conversion of a trained DQN: the conversion baseline the paper compares against.

The method of Tan, Patel and Kozma (AAAI 2021, arXiv 2009.14456):

- every ReLU unit becomes an IF neuron (no leak) with reset by subtraction and threshold 1:
  U[t] = U[t-1] + I[t] - S[t-1], S[t] = (U[t] > 1);
- the weights are normalised layer by layer with the p-th percentile (99.9) of each ReLU layer's
  activations, recorded on frames the DQN itself played at epsilon 0.05 (data-based normalisation,
  Rueckauer et al. 2017): with lambda_l that percentile of layer l and lambda_0 = 1,

      W_l <- W_l * lambda_{l-1} / lambda_l,   b_l <- b_l / lambda_l     (hidden layers)
      W_L <- W_L * lambda_{L-1},              b_L unchanged            (the Q layer)

  so that a hidden neuron's firing rate approximates its ReLU activation divided by lambda_l, and the
  Q layer's output is in the ANN's units. spikeq takes the percentile of the positive activations
  (a ReLU layer's many zeros would otherwise pull it towards 0);
- the frame is the analog input current at every step (spikeq's ``direct`` encoder: conv1 runs
  once), T = 500;
- Q proxy, their "robust firing rate": the output spike count plus the final output membrane of IF
  neurons with subtraction reset. Each spike removes exactly the threshold (1) from the membrane, so
  count + U[T] is the summed input current sum_t I[t]: T times spikeq's ``rate`` readout
  Q = fc2(1/T sum_t S_fc1[t]). The converted network is therefore a ``SpikingQNetwork`` with
  ``neuron="if"``, ``reset="subtract"``, ``threshold=1``, ``readout="rate"``; the same actions, Q in
  the ANN's units, and spikeq's evaluation and energy accounting apply unchanged.

Their extra metric, how often the SNN picks the same action as the DQN, is ``action_agreement``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from stable_baselines3 import DQN
from stable_baselines3.common.vec_env import VecEnv
from torch import nn
from tqdm.auto import tqdm

from spikeq.snn.network import MAX_NUM_STEPS, SpikingQNetwork

# Tan et al. 2021's settings.
PAPER_PERCENTILE = 99.9
PAPER_NUM_STEPS = 500
PAPER_FRAMES = 15_000
# Activations kept per layer for its percentile: a uniform sample above this many.
MAX_SAMPLES = 1 << 22


@dataclass
class Conversion:
    """What a conversion did (stored with the converted weights).

    :param percentile: the percentile of each hidden layer's positive activations used as its scale
    :param scales: lambda_l of each hidden layer, by the SNN's layer name (``conv1`` ... ``fc1``)
    :param frames: observations the activations were recorded on
    :param num_steps: T of the converted network
    :param method: the method's source
    """

    percentile: float
    scales: dict[str, float]
    frames: int
    num_steps: int
    method: str = "Tan, Patel, Kozma 2021 (arXiv 2009.14456): IF, subtract reset, threshold 1"

    def to_dict(self) -> dict:
        """Plain data, for JSON."""
        return asdict(self)


def ann_layers(model: DQN) -> list[nn.Module]:
    """The Conv2d/Linear layers of an SB3 DQN's ReLU Q-network, input to output.

    :raises ValueError: for a spiking Q-network, other activations than ReLU, or no hidden layer
    """
    if isinstance(model.q_net, SpikingQNetwork):
        raise ValueError(
            "the model is already a spiking Q-network; conversion takes an ANN DQN (CnnPolicy, MlpPolicy)"
        )
    layers, activations = [], set()
    for module in model.q_net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            layers.append(module)
        elif not isinstance(module, (nn.Sequential, nn.Flatten)) and not list(module.children()):
            activations.add(type(module).__name__)
    if activations - {"ReLU"}:
        raise ValueError(
            f"conversion needs ReLU activations; the Q-network has {', '.join(sorted(activations))}"
        )
    if len(layers) < 2:
        raise ValueError(f"the Q-network has {len(layers)} layer(s); conversion needs a hidden layer")
    return layers


def _snn_layers(q_net: SpikingQNetwork) -> list[nn.Module]:
    """The SNN's Conv2d/Linear layers in the same order: synapses, then the readout's."""
    synapses = [s[-1] if isinstance(s, nn.Sequential) else s for s in q_net.synapses]
    return [*synapses, q_net.readout.linear]


def hidden_activations(
    model: DQN, frames: np.ndarray, batch_size: int = 256, progress: bool = True
) -> list[np.ndarray]:
    """Record each hidden ReLU layer's positive activations on ``frames`` (a random sample of at most
    ``MAX_SAMPLES`` per layer, the same number from each batch: a last, shorter batch's activations
    weigh a little more than the others').

    :param model: an ANN DQN (ReLU)
    :param frames: ``[N, *observation_shape]`` observations as the env gives them
    :return: one float32 array per hidden layer, input to output
    """
    hidden = ann_layers(model)[:-1]
    batches = range(0, len(frames), batch_size)
    samples: list[list[np.ndarray]] = [[] for _ in hidden]
    quota = max(1, MAX_SAMPLES // max(1, len(batches)))
    rng = np.random.default_rng(0)
    outputs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda m, i, out: outputs.append(out)) for layer in hidden]
    try:
        with torch.inference_mode():
            for start in tqdm(batches, desc="activations", unit="batch", disable=not progress):
                outputs.clear()
                obs, _ = model.policy.obs_to_tensor(frames[start : start + batch_size])
                model.q_net(obs)
                for kept, out in zip(samples, outputs, strict=True):
                    positive = out[out > 0].float().cpu().numpy()
                    if len(positive) > quota:
                        positive = rng.choice(positive, quota, replace=False)
                    kept.append(positive)
    finally:
        for hook in hooks:
            hook.remove()
    return [np.concatenate(kept) for kept in samples]


def check_conversion(num_steps: int, percentile: float) -> None:
    """Refuse a T or percentile ``convert_dqn`` cannot use, before any frame is played for it.

    :param num_steps: T of the spiking network, 1 to ``MAX_NUM_STEPS`` (a longer one would be written,
        but no spikeq command loads a network of that T)
    :param percentile: percentile of each layer's positive activations, in (0, 100]
    :raises ValueError: naming the value and what is allowed
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= MAX_NUM_STEPS:
        raise ValueError(f"num_steps={num_steps!r} is out of range; allowed: 1 to {MAX_NUM_STEPS}")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile={percentile!r} must lie in (0, 100]")


def convert_dqn(
    model: DQN,
    frames: np.ndarray,
    num_steps: int = PAPER_NUM_STEPS,
    percentile: float = PAPER_PERCENTILE,
    env: VecEnv | None = None,
    progress: bool = True,
) -> tuple[DQN, Conversion]:
    """Convert a trained ANN DQN into a spiking one (Tan et al. 2021; see the module docstring).

    :param model: a DQN with SB3's ``CnnPolicy`` (Nature CNN) or ``MlpPolicy``, ReLU activations
    :param frames: ``[N, *observation_shape]`` observations the activations are recorded on (paper:
        15,000 frames the DQN played at epsilon 0.05, see ``record_frames``)
    :param num_steps: T of the spiking network (paper: 500), 1 to ``MAX_NUM_STEPS``
    :param percentile: percentile of each layer's positive activations taken as its scale, in (0, 100]
    :param env: the env the returned DQN is bound to (default: ``model``'s)
    :param progress: show a progress bar
    :return: a DQN with a ``SpikingPolicy`` (IF, subtract reset, rate readout) holding the normalised
        weights, and what the conversion did
    """
    check_conversion(num_steps, percentile)
    if len(frames) == 0:
        raise ValueError("no frames to record activations on")
    env = env if env is not None else model.get_env()
    if env is None:
        raise ValueError("the model has no env; pass env=")
    ann = ann_layers(model)
    hidden_sizes = [layer.out_features for layer in ann if isinstance(layer, nn.Linear)][:-1]
    snn = DQN(
        "SpikingPolicy",
        env,
        buffer_size=1,
        device=model.device,
        policy_kwargs=dict(
            num_steps=num_steps,
            neuron="if",
            reset="subtract",
            threshold=1.0,
            readout="rate",
            encoder="direct",
            init="default",  # the weights are the ANN's, normalised below: never rescaled again
            net_arch=hidden_sizes,
            normalize_images=model.policy.normalize_images,
        ),
    )
    q_net: SpikingQNetwork = snn.q_net
    targets = _snn_layers(q_net)
    shapes = [tuple(layer.weight.shape) for layer in ann], [tuple(layer.weight.shape) for layer in targets]
    if shapes[0] != shapes[1]:
        raise ValueError(
            f"the Q-network's layers {shapes[0]} do not match a spiking Q-network's {shapes[1]} "
            "(the Nature CNN for images, an MLP for vectors)"
        )
    activations = hidden_activations(model, frames, progress=progress)
    scales = []
    for name, values in zip(q_net.layer_names, activations, strict=True):
        if values.size == 0:
            raise ValueError(f"layer {name} was never active on the {len(frames)} frames; record more frames")
        scales.append(float(np.percentile(values, percentile)))
    # Layer l's input arrives divided by lambda_{l-1}, its output is divided by lambda_l (the Q layer: 1).
    with torch.no_grad():
        for source, target, before, after in zip(ann, targets, [1.0, *scales], [*scales, 1.0], strict=True):
            target.weight.copy_(source.weight * (before / after))
            target.bias.copy_(source.bias / after)
    snn.q_net_target.load_state_dict(snn.q_net.state_dict())
    conversion = Conversion(
        percentile, dict(zip(q_net.layer_names, scales, strict=True)), len(frames), num_steps
    )
    return snn, conversion


def record_frames(
    model: DQN,
    env: VecEnv,
    n_frames: int = PAPER_FRAMES,
    epsilon: float = 0.05,
    seed: int = 0,
    progress: bool = True,
) -> np.ndarray:
    """Play ``model`` epsilon-greedily in ``env`` and keep the observations it saw.

    :param model: the ANN DQN to convert
    :param env: a VecEnv (the paper: the evaluation env, full game)
    :param n_frames: observations to record (paper: 15,000)
    :param epsilon: random-action probability (paper: 0.05)
    :param seed: seeds the env and the exploration
    :return: ``[n_frames, *observation_shape]`` as the env gives them
    """
    if isinstance(n_frames, bool) or not isinstance(n_frames, int) or n_frames < 1:
        raise ValueError(f"n_frames={n_frames!r} must be an integer >= 1")
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon={epsilon!r} must lie in [0, 1]")
    rng = np.random.default_rng(seed)
    env.seed(seed)
    obs = env.reset()
    frames = np.empty((n_frames, *obs.shape[1:]), dtype=obs.dtype)
    kept = 0
    with tqdm(total=n_frames, desc="frames", unit="frame", disable=not progress) as bar:
        while kept < n_frames:
            take = min(len(obs), n_frames - kept)
            frames[kept : kept + take] = obs[:take]
            kept += take
            bar.update(take)
            actions, _ = model.predict(obs, deterministic=True)
            explore = rng.random(len(obs)) < epsilon
            actions[explore] = rng.integers(env.action_space.n, size=int(explore.sum()))
            obs, _, _, _ = env.step(actions)
    return frames


def action_agreement(
    ann: DQN, snn: DQN, frames: np.ndarray, batch_size: int = 32, progress: bool = True
) -> dict[str, float]:
    """How often the converted SNN picks the ANN's greedy action, and how far its Q-values are.

    :param ann: the DQN that was converted
    :param snn: its conversion (``convert_dqn``)
    :param frames: ``[N, *observation_shape]`` observations (better not those it was normalised on)
    :param batch_size: observations per forward pass (the SNN holds ``[T, batch, ...]`` spikes per layer)
    :param progress: show a progress bar
    :return: ``agreement`` (fraction of frames with the same argmax), ``q_rmse`` (root mean square of
        SNN Q - ANN Q) and ``q_scale`` (root mean square of ANN Q, to read q_rmse against)
    """
    same, squared, reference = 0, 0.0, 0.0
    with torch.inference_mode():
        for start in tqdm(
            range(0, len(frames), batch_size), desc="agreement", unit="batch", disable=not progress
        ):
            batch = frames[start : start + batch_size]
            q_ann = ann.q_net(ann.policy.obs_to_tensor(batch)[0]).float()
            q_snn = snn.q_net(snn.policy.obs_to_tensor(batch)[0]).float()
            same += int((q_ann.argmax(1) == q_snn.argmax(1)).sum())
            squared += float(((q_snn - q_ann) ** 2).sum())
            reference += float((q_ann**2).sum())
    values = len(frames) * ann.action_space.n
    return {
        "agreement": same / len(frames),
        "q_rmse": (squared / values) ** 0.5,
        "q_scale": (reference / values) ** 0.5,
    }
