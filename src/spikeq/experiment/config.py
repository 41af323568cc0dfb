"""One typed experiment config: presets, models, YAML, command-line overrides and validation.

A run's config is ``preset`` values, then the ``model``'s network choices, then explicit overrides,
in that order; the resolved config is printed at the start of a run and saved as ``config.yaml``.
"""

from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from spikeq.files import write_atomic
from spikeq.snn.network import MAX_NUM_STEPS, NetworkSpec
from spikeq.snn.neurons import NeuronSpec

MODELS: dict[str, dict[str, Any]] = {
    # The paper's DSQN and its ablations (Liu et al. 2022), plus Chen et al.'s max-membrane readout.
    "dsqn": dict(neuron="lif", readout="rate"),
    "dsqn-if": dict(neuron="if", readout="rate"),
    "dsqn-spike": dict(neuron="lif", readout="spike"),
    "dsqn-mem": dict(neuron="lif", readout="max_mem"),
    # The ANN with the same torso: SB3's CnnPolicy (NatureCNN + Linear) on Atari, MlpPolicy over
    # MinAtarCNN on MinAtar grids.
    "dqn": dict(),
}
# SB3 DQN keyword arguments for CartPole-v1: rl-baselines3-zoo's (hyperparams/dqn.yml) with one update
# per two steps (64 every 128 instead of 128 every 256). For the CartPole test and benchmarks.
CARTPOLE_DQN: dict[str, Any] = dict(
    learning_rate=2.3e-3,
    batch_size=64,
    buffer_size=100_000,
    learning_starts=1_000,
    gamma=0.99,
    target_update_interval=10,
    train_freq=128,
    gradient_steps=64,
    exploration_fraction=0.16,
    exploration_final_eps=0.04,
)
# optimizer name -> (class, its kwargs besides the learning rate)
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    # The paper's and its reference code's: Adam with PyTorch's defaults.
    "adam": (torch.optim.Adam, {}),
    # MinAtar's DQN (Young and Tian 2019, examples/dqn.py): centred RMSprop, gradient momentum 0.95,
    # squared-gradient momentum 0.95, minimum squared gradient 0.01.
    "rmsprop": (torch.optim.RMSprop, dict(alpha=0.95, momentum=0.95, eps=0.01, centered=True)),
}
# The reset's gradient. The paper's code lets it through the spike (SpikingJelly's detach_reset=False
# default); elsewhere it is cut, as snnTorch's Leaky does, until a measurement on MinAtar chooses.
PAPER_DETACH_RESET = False
DEFAULT_DETACH_RESET = True
WANDB_MODES = ("auto", "online", "offline", "disabled")
VEC_ENVS = ("dummy", "subproc", "ale")
# NumPy, gymnasium and ALE take 32-bit seeds (ale-py's vector env signed ones); larger ones fail deep
# inside the first reset.
MAX_SEED = 2**32 - 1
MAX_ALE_SEED = 2**31 - 1
# torch crashed (a segmentation fault) when asked for 100,000 threads; no machine here has more than this.
MAX_TORCH_THREADS = 1024
# The field types a config file may hold, by the annotation's text (``from __future__ import annotations``).
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
    "float | None": (int, float, type(None)),
    "list[str]": (list,),
}


class ConfigError(ValueError):
    """A config value that cannot be used; the message names it and what is allowed."""


# Every preset's starting network: NetworkSpec's defaults but PyTorch's initialisation (the reference
# code's) and the reset's gradient cut (DEFAULT_DETACH_RESET); the presets change what they need (the
# paper preset lets the reset's gradient through, as the paper's code does).
BASE_NETWORK = NetworkSpec(init="default", detach_reset=DEFAULT_DETACH_RESET)
# The network settings a run names flat; the torso's sizes (net_arch) stay each torso's own.
NETWORK_FIELDS: dict[str, str] = {f.name: str(f.type) for f in fields(NetworkSpec) if f.name != "net_arch"}


@dataclass
class TrainConfig:
    """Every setting of a training run: the run's own, and its spiking network's (``network``). Defaults
    are the paper's protocol: Liu et al. 2022 and its reference code
    (github.com/AptX395/Deep-Spiking-Q-Networks), as the README's "The paper's protocol" lists it,
    except ``detach_reset``, which the ``paper`` preset sets (``PAPER_DETACH_RESET``).

    :param game: ALE game, short (``Pong``) or full id (``PongNoFrameskip-v4``), or MinAtar game
        (``MinAtar/Breakout``, ``MinAtar/Breakout-v0``)
    :param model: one of ``MODELS``
    :param preset: the preset the run started from (``paper``, ``zoo``, ``minatar``, ``smoke``)
    :param seed: seed of the networks, exploration and environments
    :param device: ``auto`` (a GPU when present), ``cpu``, ``cuda``, ``cuda:1`` ...
    :param steps: agent steps to train for (paper: 50M = 200M frames)
    :param n_envs: parallel training environments
    :param vec_env: how they are stepped: ``dummy`` (SB3, one process), ``subproc`` (SB3, a process
        each) or ``ale`` (ale-py's native vector env, threads in C++; the same games step for step)
    :param torch_threads: CPU threads for torch (0: torch's default); 1 is fastest for small networks
        on a few cores, where spare cores run the emulator
    :param network: the spiking network's settings (unused by ``dqn``): ``BASE_NETWORK`` unless a
        preset, the model or an override changes them. Config files, the CLI, sweeps and ``resolve``
        name them flat, beside the run's own (``num_steps: 8``, ``--num-steps 8``); their names, types
        and documentation are ``NetworkSpec``'s and ``NeuronSpec``'s, declared there once.
    :param optimizer: ``adam`` (paper) or ``rmsprop`` (centred, MinAtar's DQN), see ``OPTIMIZERS``
    :param learning_rate: optimiser learning rate (paper: Adam 1e-4)
    :param batch_size: minibatch size (paper: 32)
    :param buffer_size: replay capacity in transitions (paper: 1M)
    :param learning_starts: agent steps before training starts (paper: 50k)
    :param train_freq: agent steps between gradient updates (paper: 4)
    :param gradient_steps: gradient updates each time
    :param target_update_interval: agent steps between target-network copies (paper: 10k)
    :param gamma: discount (paper: 0.99)
    :param exploration_initial_eps: epsilon at the start (paper: 1.0)
    :param exploration_final_eps: epsilon after the decay (paper: 0.1)
    :param exploration_steps: agent steps of the linear epsilon decay (paper: 1M)
    :param max_grad_norm: gradient-norm clip (paper: none, i.e. inf)
    :param frame_replay: store each Atari frame once in replay (FrameReplayBuffer), ~7 GB for 1M;
        MinAtar grids always use SB3's ReplayBuffer
    :param eval_freq: agent steps between evaluations (paper: 250k)
    :param eval_episodes: episodes per evaluation (paper: 30)
    :param eval_epsilon: epsilon during evaluation (paper: 0.05)
    :param final_eval_episodes: episodes of the final evaluation of the best checkpoint (paper: 30)
    :param max_episode_steps: agent-step limit of an episode (paper: 18,000)
    :param bootstrap_time_limit: at an episode cut by ``max_episode_steps`` in training, bootstrap the
        target from the next state's value, as if the episode went on (SB3's
        ``handle_timeout_termination``); False (paper: its reference code) treats the cut as terminal
    :param checkpoint_freq: agent steps between checkpoints
    :param save_replay: include the replay buffer in checkpoints (exact resume, large on disk)
    :param wandb: ``auto`` (online when logged in, else offline), ``online``, ``offline``, ``disabled``
    :param wandb_project: W&B project name
    :param tags: W&B tags
    :param out_dir: parent folder of run directories
    """

    game: str = "Pong"
    model: str = "dsqn"
    preset: str = "paper"
    seed: int = 0
    device: str = "auto"
    steps: int = 50_000_000
    n_envs: int = 1
    vec_env: str = "dummy"
    torch_threads: int = 0
    network: NetworkSpec = BASE_NETWORK
    optimizer: str = "adam"
    learning_rate: float = 1e-4
    batch_size: int = 32
    buffer_size: int = 1_000_000
    learning_starts: int = 50_000
    train_freq: int = 4
    gradient_steps: int = 1
    target_update_interval: int = 10_000
    gamma: float = 0.99
    exploration_initial_eps: float = 1.0
    exploration_final_eps: float = 0.1
    exploration_steps: int = 1_000_000
    max_grad_norm: float = math.inf
    frame_replay: bool = True
    eval_freq: int = 250_000
    eval_episodes: int = 30
    eval_epsilon: float = 0.05
    final_eval_episodes: int = 30
    max_episode_steps: int = 18_000
    bootstrap_time_limit: bool = False
    checkpoint_freq: int = 250_000
    save_replay: bool = False
    wandb: str = "auto"
    wandb_project: str = "spikeq"
    tags: list[str] = field(default_factory=list)
    out_dir: str = "runs"

    @property
    def max_seed(self) -> int:
        """The largest seed this run's environments take: each of its ``n_envs`` is seeded with
        ``seed + i``, within 32 bits (31 for ALE's vector env)."""
        return (MAX_ALE_SEED if self.vec_env == "ale" else MAX_SEED) - (self.n_envs - 1)

    @property
    def spiking(self) -> bool:
        """Whether the model is a spiking network (everything but ``dqn``)."""
        return self.model != "dqn"

    def validate(self) -> TrainConfig:
        """Check every value; raise ``ConfigError`` naming the first bad one. Returns self."""
        self._check_types()
        if self.model not in MODELS:
            raise ConfigError(f"unknown model {self.model!r}; allowed: {', '.join(MODELS)}")
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; allowed: {', '.join(PRESETS)}")
        if self.vec_env not in VEC_ENVS:
            raise ConfigError(f"unknown vec_env {self.vec_env!r}; allowed: {', '.join(VEC_ENVS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
        if self.wandb not in WANDB_MODES:
            raise ConfigError(f"unknown wandb mode {self.wandb!r}; allowed: {', '.join(WANDB_MODES)}")
        for name in (
            "steps", "n_envs", "batch_size", "buffer_size", "train_freq", "gradient_steps",
            "target_update_interval", "eval_freq", "eval_episodes", "final_eval_episodes",
            "max_episode_steps", "checkpoint_freq",
        ):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        for name in ("learning_starts", "exploration_steps", "seed", "torch_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r} must be an integer >= 0")
        if self.seed > self.max_seed:
            # Environment i of n_envs is seeded with seed + i, and ALE's own vector env takes 31 bits.
            raise ConfigError(
                f"seed={self.seed!r} is too large for n_envs={self.n_envs} with vec_env={self.vec_env}; "
                f"allowed: 0 to {self.max_seed:,}"
            )
        if self.torch_threads > MAX_TORCH_THREADS:
            raise ConfigError(
                f"torch_threads={self.torch_threads!r} is too large; allowed: 0 (torch's default) to "
                f"{MAX_TORCH_THREADS} (this machine has {os.cpu_count()} cores)"
            )
        if not math.isfinite(self.learning_rate):
            raise ConfigError(f"learning_rate={self.learning_rate!r} must be a finite number")
        if math.isnan(self.max_grad_norm):
            raise ConfigError("max_grad_norm=nan must be a number > 0 (inf: no clipping)")
        if not all(isinstance(tag, str) for tag in self.tags):
            raise ConfigError(f"tags={self.tags!r} must be a list of strings")
        if not self.game or not self.out_dir or not self.wandb_project:
            empty = next(k for k in ("game", "out_dir", "wandb_project") if not getattr(self, k))
            raise ConfigError(f"{empty} is empty; give it a value")
        if self.steps % self.n_envs:
            # SB3 steps all n_envs environments at once: the run would end past its budget, and a resume
            # of the finished run would find more steps trained than config.yaml allows.
            nearest = {self.steps // self.n_envs * self.n_envs, -(-self.steps // self.n_envs) * self.n_envs}
            raise ConfigError(
                f"steps={self.steps} is not a multiple of n_envs={self.n_envs}; allowed: a multiple, "
                f"e.g. {' or '.join(str(n) for n in sorted(nearest - {0}))}"
            )
        if self.buffer_size < self.batch_size:
            raise ConfigError(
                f"buffer_size={self.buffer_size} is smaller than batch_size={self.batch_size}: "
                "a minibatch could never be sampled"
            )
        for name in ("exploration_initial_eps", "exploration_final_eps", "eval_epsilon", "gamma"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name}={value!r} must lie in [0, 1]")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate={self.learning_rate!r} must be > 0")
        if not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm={self.max_grad_norm!r} must be > 0 (inf: no clipping)")
        return self

    def _check_types(self) -> None:
        """Every run field holds a value of its declared type (a config file may hold anything)."""
        for f in fields(self):
            if f.name != "network":
                setattr(self, f.name, _checked(f.name, getattr(self, f.name), str(f.type)))

    def to_dict(self) -> dict[str, Any]:
        """Plain data for YAML, JSON and W&B: every setting flat, the network's among the run's."""
        data: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "network":
                data.update({name: getattr(self.network, name) for name in NETWORK_FIELDS})
            else:
                data[f.name] = list(self.tags) if f.name == "tags" else getattr(self, f.name)
        return data

    def save(self, path: Path) -> None:
        """Write the config as YAML, atomically (a crash leaves the old file or the new one)."""
        write_atomic(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        """Read and validate a config written by ``save``.

        :raises ConfigError: for a file that is unreadable, not YAML, not a mapping, lacks the run's
            identity (game, model, preset), has unknown keys or a value of the wrong type or range
        """
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"cannot read {path}: {error}") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} is not a spikeq config (a YAML mapping of config fields)")
        missing = [key for key in ("game", "model", "preset") if key not in data]
        if missing:
            raise ConfigError(f"{path} is not a spikeq config: it lacks {', '.join(missing)}")
        try:
            return from_dict(data).validate()
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None


def _param_docs(cls: type) -> dict[str, str]:
    """``:param name: text`` of a class's docstring, as one line each."""
    docs = re.findall(r":param (\w+): (.*?)(?=\n\s*:param |\Z)", cls.__doc__ or "", re.S)
    return {name: " ".join(text.replace("``", "").split()) for name, text in docs}


def settings() -> dict[str, tuple[str, str]]:
    """Every flat setting of a run, in ``config.yaml``'s order: name -> (type, documentation). The
    run's own are documented in ``TrainConfig``'s docstring, the network's in ``NeuronSpec``'s and
    ``NetworkSpec``'s; the CLI's flags and their help come from here."""
    docs = {**_param_docs(NeuronSpec), **_param_docs(NetworkSpec), **_param_docs(TrainConfig)}
    flat = {}
    for f in fields(TrainConfig):
        if f.name == "network":
            flat.update({name: (annotation, docs[name]) for name, annotation in NETWORK_FIELDS.items()})
        else:
            flat[f.name] = (str(f.type), docs[f.name])
    return flat


def _checked(name: str, value: Any, annotation: str) -> Any:
    """``value`` if it is of the annotation's type (an int where a float goes becomes a float)."""
    allowed = _FIELD_TYPES.get(annotation, (object,))
    if isinstance(value, bool) and bool not in allowed:
        allowed = ()  # True is an int to Python, not to a config
    if not isinstance(value, allowed):
        kind = type(value).__name__
        raise ConfigError(f"{name}={value!r} is a {kind}; allowed: a value of type {annotation}")
    return float(value) if annotation in ("float", "float | None") and isinstance(value, int) else value


def _network(settings: dict[str, Any]) -> NetworkSpec:
    """``BASE_NETWORK`` with ``settings`` (flat config values), checked as config values are."""
    checked = {name: _checked(name, value, NETWORK_FIELDS[name]) for name, value in settings.items()}
    for name in ("tau", "threshold", "surrogate_slope"):
        value = checked.get(name)
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"{name}={value!r} must be a finite number")
    slope = checked.get("surrogate_slope")
    if slope is not None and not slope > 0:
        raise ConfigError(f"surrogate_slope={slope!r} must be > 0 (or None: the default)")
    steps = checked.get("num_steps", 1)
    if isinstance(steps, int) and steps > MAX_NUM_STEPS:
        raise ConfigError(f"num_steps={steps!r} is too large; allowed: 1 to {MAX_NUM_STEPS}")
    try:
        return replace(BASE_NETWORK, **checked)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build a config from flat plain data (a config file, a sweep's parameters), naming unknown keys."""
    run_fields = {f.name for f in fields(TrainConfig)} - {"network"}
    unknown = sorted(set(data) - run_fields - set(NETWORK_FIELDS))
    if unknown:
        known = sorted(run_fields | set(NETWORK_FIELDS))
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; allowed: {', '.join(known)}")
    network = _network({k: v for k, v in data.items() if k in NETWORK_FIELDS})
    return TrainConfig(**{k: v for k, v in data.items() if k in run_fields}, network=network)


# The network initialisation of every preset but ``paper`` (which keeps the reference code's, PyTorch's):
# the measured comparison is in benchmarks/README.md, "Firing-aware initialisation".
PRESET_INIT = "firing"

PRESETS: dict[str, dict[str, Any]] = {
    # Liu et al. 2022 and its reference code: the TrainConfig defaults (README, "The paper's protocol").
    "paper": dict(detach_reset=PAPER_DETACH_RESET),
    # rl-baselines3-zoo's Atari DQN (hyperparams/dqn.yml): 10M steps, eps 1 -> 0.01 over 10%.
    "zoo": dict(
        steps=10_000_000,
        buffer_size=100_000,
        learning_rate=1e-4,
        batch_size=32,
        learning_starts=100_000,
        target_update_interval=1_000,
        train_freq=4,
        exploration_final_eps=0.01,
        exploration_steps=1_000_000,
        max_grad_norm=10.0,
        bootstrap_time_limit=True,  # SB3's default
        init=PRESET_INIT,
    ),
    # MinAtar's DQN (Young and Tian 2019, examples/dqn.py) for the MinAtar games, with the paper's
    # spiking layers at T = 8; evaluation as the paper's protocol, every 100k steps.
    "minatar": dict(
        steps=5_000_000,
        num_steps=8,
        init=PRESET_INIT,
        buffer_size=100_000,
        batch_size=32,
        learning_starts=5_000,
        train_freq=1,
        gradient_steps=1,
        target_update_interval=1_000,
        gamma=0.99,
        exploration_initial_eps=1.0,
        exploration_final_eps=0.1,
        exploration_steps=100_000,
        optimizer="rmsprop",
        learning_rate=2.5e-4,
        max_grad_norm=math.inf,
        frame_replay=False,
        eval_freq=100_000,
        eval_episodes=30,
        final_eval_episodes=30,
        max_episode_steps=10_000,
        # MinAtar's games have no time limit; this cap is spikeq's, so training bootstraps through it.
        bootstrap_time_limit=True,
        # Runs last hours: a checkpoint every 50k steps, with the replay (100k grids: 80 MB for Breakout
        # to 200 MB for Seaquest, one byte a cell, observation and next observation), so that a
        # cut run resumes with the transitions it had collected (new episodes: emulator states are
        # not saved; the step the signal came at is counted, its transition and update are not).
        checkpoint_freq=50_000,
        save_replay=True,
        torch_threads=1,
    ),
    # A tiny end-to-end run (about a minute on a 2-core CPU): every part of the pipeline, no learning.
    "smoke": dict(
        steps=1_200,
        num_steps=4,
        buffer_size=2_000,
        batch_size=16,
        learning_starts=400,
        train_freq=8,
        target_update_interval=200,
        exploration_steps=600,
        eval_freq=600,
        eval_episodes=2,
        final_eval_episodes=2,
        max_episode_steps=300,
        checkpoint_freq=300,
        save_replay=True,
        torch_threads=1,
        init=PRESET_INIT,
    ),
}


def resolve(preset: str = "paper", model: str = "dsqn", **overrides: Any) -> TrainConfig:
    """The config of a run: preset values, then the model's network, then ``overrides``.

    :param preset: one of ``PRESETS``
    :param model: one of ``MODELS``
    :param overrides: any ``TrainConfig`` field
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")
    if model not in MODELS:
        raise ConfigError(f"unknown model {model!r}; allowed: {', '.join(MODELS)}")
    data = {**PRESETS[preset], **MODELS[model], **overrides, "preset": preset, "model": model}
    return from_dict(data).validate()


@functools.cache
def _preset_dict(preset: str, model: str) -> dict[str, Any]:
    return yaml.safe_load(yaml.safe_dump(resolve(preset, model).to_dict(), sort_keys=False))


def preset_values(config: dict[str, Any]) -> dict[str, Any] | None:
    """Every field as a run's preset and model set it, as its config.yaml would hold them without
    overrides; None where ``config`` names no preset or model that spikeq has (reports then label runs
    by how they differ from each other: ``spikeq.analysis.report.setting_labels``).

    :param config: a run's ``config.yaml`` contents
    """
    preset, model = config.get("preset"), config.get("model")
    if preset not in PRESETS or model not in MODELS:
        return None
    return dict(_preset_dict(preset, model))


def override(config: TrainConfig, **changes: Any) -> TrainConfig:
    """A copy of ``config`` with ``changes`` (flat, as in ``to_dict``) applied and validated."""
    return from_dict({**config.to_dict(), **changes}).validate()
