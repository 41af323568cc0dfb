"""Engine benchmark: spikeq's fused engine against its peers on the paper's Atari DSQN.

Run:  .venv/bin/python benchmarks/bench_engine.py [--steps 8 16 64] [--device cpu] [--quick]
      (``make bench ARGS="--quick"``)

Every contender is the same Nature-CNN DSQN (Liu et al. 2022: conv1 applied once as a static current,
LIF layers after conv1, conv2, conv3 and fc1, tau 2, threshold 1, hard reset, ATan surrogate, Q = fc2 of
the fc1 firing rates), or its non-spiking reference, with 6 actions (Pong):

- spikeq fused: ``SpikingPolicy`` with ``engine="fused"`` (time-batched layers, fused recurrence; on
  CUDA the recurrence runs in spikeq's Triton kernels when Triton is installed);
- spikeq fused, torch loop (CUDA only): the same with the recurrence in PyTorch kernels, step by step
  (``backend="torch"``), to show what the Triton kernels gain;
- spikeq fused+recompute: the same with ``recompute=True`` (conv1's layer keeps no membrane);
- spikeq snntorch: ``SpikingPolicy`` with ``engine="snntorch"`` (every layer called at every step);
- snntorch naive: a plain snnTorch network as the snnTorch tutorials write it, independent of spikeq
  (conv1 applied to the frame at every step, ``Leaky`` called per layer per step);
- spikingjelly: SpikingJelly's multi-step ``LIFNode`` with ``SeqToANNContainer`` layers, as the paper's
  reference code (github AptX395/Deep-Spiking-Q-Networks) builds it; a benchmark-only extra, installed
  with ``pip install --no-deps spikingjelly loguru`` (skipped when missing);
- spikeq fused and spikingjelly, ``detach_reset=False``: the same two with the gradient through the
  reset, as the paper's code has it (the rows above detach it, as snnTorch's ``Leaky`` does); with
  SpikingJelly installed, each T also prints how far spikeq's gradients are from SpikingJelly's with
  the same weights, for both settings;
- dense floor: the same convolutions and linears over all T*B inputs (conv1 once), no neuron work;
- ANN DQN: SB3's ``CnnPolicy`` Q-network (the same torso with ReLUs, one step).

Measured in one process, contenders interleaved round by round so that a busy machine slows all alike:

(a) greedy action: one ``argmax Q`` for a batch of 1 under ``torch.inference_mode``, the network in
    evaluation mode (as SB3's ``predict`` sets it), median latency;
(b) training step: SB3 DQN's update on a batch of 32: a no-grad target-network forward (the target
    network in evaluation mode, as SB3 keeps it), the online forward (training mode), Huber loss,
    backward and an Adam step, median time;
(c) whole loop: agent steps per second of SB3 ``DQN`` on Pong (``make_atari_env`` + 4-frame stack, one
    env, epsilon 0.05) over a window after learning starts; spikeq engines and ``CnnPolicy`` only;
(d) peak memory of one training step: on CPU the growth of the peak resident set (Linux
    ``/proc/self/clear_refs``) over the resident set before the step; on CUDA ``max_memory_allocated``
    over the memory allocated before it;
(f) with ``--profile``: where one training step's time goes: on the CPU each phase's milliseconds (target
    forward, online forward, backward, optimiser step), split into the convolutions and matrix products
    and the rest; then each contender's operators with the most self time under ``torch.profiler``
    (CUDA kernel time on a GPU).

Inputs for (a), (b) and (d) are real Pong frames (random play). With PyTorch's default initialisation
the DSQN does not fire at all on them; for (a), (b) and (d) every network's weights are multiplied by
``--weight-gain`` (default 8), which makes each spiking layer fire in 10 to 14% of its neuron-steps at
batch 32 (printed with the table), as a network that acts on the frames would; no contender's cost
depends much on them, but gradients through silent layers would be zero. (c) trains from SB3's own
initialisation. ``--device cuda`` runs everything on the GPU with ``torch.cuda.synchronize`` around
each timing.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import importlib.util
import inspect
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ale_py
import gymnasium
import numpy as np
import snntorch as snn
import torch
import torch.nn.functional as F
from gymnasium import spaces
from snntorch import surrogate as snn_surrogate
from stable_baselines3 import DQN
from stable_baselines3.common.env_util import make_atari_env
from stable_baselines3.common.vec_env import VecFrameStack
from stable_baselines3.dqn.policies import CnnPolicy, DQNPolicy
from torch import nn
from torch.profiler import record_function

from spikeq.snn import engine
from spikeq.snn.network import SpikingQNetwork
from spikeq.snn.policy import SpikingPolicy

GAME = "PongNoFrameskip-v4"
N_ACTIONS = 6  # Pong
OBS_SPACE = spaces.Box(0, 255, (4, 84, 84), np.uint8)  # channel-first, as SB3 passes it
TAU, THRESHOLD, ALPHA = 2.0, 1.0, 2.0  # the paper's LIF and ATan surrogate
TRAIN_BATCH = 32
GAMMA = 0.99
LEARNING_RATE = 1e-4
# (c): SB3's DQN trains every TRAIN_FREQ agent steps once learning starts.
TRAIN_FREQ = 4
EPSILON = 0.05

gymnasium.register_envs(ale_py)


@dataclass
class Args:
    """Command-line options (see ``--help``)."""

    steps: list[int]
    device: str
    quick: bool
    action_calls: int
    train_repeats: int
    loop_steps: int
    learning_starts: int
    threads: int
    weight_gain: float
    flush_denormal: bool
    skip: list[str] = field(default_factory=list)
    cudnn_benchmark: bool = False
    profile: int = 0


def parse_args() -> Args:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 16, 64], help="T values to run")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="smoke run: T=8, few repetitions (< 2 min)")
    parser.add_argument("--action-calls", type=int, default=8, help="(a) greedy actions per round")
    parser.add_argument("--train-repeats", type=int, default=3, help="(a, b) timed rounds per T")
    parser.add_argument("--loop-steps", type=int, default=64, help="(c) timed agent steps (0: skip (c))")
    parser.add_argument(
        "--learning-starts", type=int, default=256, help="(c) random steps that fill the replay first"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--weight-gain", type=float, default=8.0, help="factor on every network's initial weights"
    )
    parser.add_argument(
        "--flush-denormal",
        action="store_true",
        help="torch.set_flush_denormal(True): subnormal floats become 0 (see benchmarks/README.md)",
    )
    parser.add_argument(
        "--skip", nargs="*", default=[], help="contenders to leave out (names as in the table)"
    )
    parser.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="torch.backends.cudnn.benchmark = True: cuDNN times its convolution algorithms once per shape",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="ROWS",
        help="(f) print this many operators with the most self time in one training step (0: no profile)",
    )
    ns = parser.parse_args()
    args = Args(**vars(ns))
    if args.quick:
        args.steps, args.action_calls, args.train_repeats = [8], 3, 1
        args.loop_steps, args.learning_starts = 8, 64
    return args


# ----------------------------------------------------------------------------------------------
# The contenders. Each takes uint8 observations [B, 4, 84, 84] and returns Q [B, N_ACTIONS].


class NaiveSnnTorchDSQN(nn.Module):
    """The DSQN written as in snnTorch's tutorials: every layer, conv1 included, called at every step.

        cur = layer(x) / tau;  spk, mem = Leaky(cur, mem);  Q = fc2(mean_t spk_fc1)

    :param num_steps: T
    """

    def __init__(self, num_steps: int) -> None:
        super().__init__()
        self.num_steps = num_steps
        self.conv1 = nn.Conv2d(4, 32, 8, 4)
        self.conv2 = nn.Conv2d(32, 64, 4, 2)
        self.conv3 = nn.Conv2d(64, 64, 3, 1)
        self.fc1 = nn.Linear(3136, 512)
        self.fc2 = nn.Linear(512, N_ACTIONS)
        self.lifs = nn.ModuleList(
            snn.Leaky(
                beta=1 - 1 / TAU,
                threshold=THRESHOLD,
                spike_grad=snn_surrogate.atan(alpha=ALPHA),
                reset_mechanism="zero",
            )
            for _ in range(4)
        )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.float() / 255
        mems = [lif.init_leaky() for lif in self.lifs]
        rate = 0
        for _ in range(self.num_steps):
            h = x
            for i, layer in enumerate((self.conv1, self.conv2, self.conv3, self.fc1)):
                if i == 3:
                    h = h.flatten(1)
                h, mems[i] = self.lifs[i](layer(h) / TAU, mems[i])
            rate = rate + h
        return self.fc2(rate / self.num_steps)


def spikingjelly_dsqn(num_steps: int, detach_reset: bool = True) -> nn.Module:
    """The paper's reference DSQN in SpikingJelly (multi-step LIFNode, SeqToANNContainer layers).

    :param num_steps: T
    :param detach_reset: SpikingJelly's option; the paper's code leaves its default, False
    """
    from spikingjelly.activation_based import functional, layer, neuron, surrogate

    lif_kwargs = dict(tau=TAU, surrogate_function=surrogate.ATan(alpha=ALPHA), detach_reset=detach_reset)
    if "backend" in inspect.signature(neuron.LIFNode.__init__).parameters:
        lif_kwargs["backend"] = "torch"  # SpikingJelly before 2.0 selects its backend by name

    def lif() -> nn.Module:
        return neuron.LIFNode(step_mode="m", **lif_kwargs)

    class SpikingJellyDSQN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.static_conv1 = nn.Conv2d(4, 32, 8, 4)
            self.body = nn.Sequential(
                lif(),
                layer.SeqToANNContainer(nn.Conv2d(32, 64, 4, 2)),
                lif(),
                layer.SeqToANNContainer(nn.Conv2d(64, 64, 3, 1)),
                lif(),
                layer.SeqToANNContainer(nn.Flatten(), nn.Linear(3136, 512)),
                lif(),
            )
            self.fc2 = nn.Linear(512, N_ACTIONS)

        def forward(self, obs: torch.Tensor) -> torch.Tensor:
            x_seq = self.static_conv1(obs.float() / 255).unsqueeze(0).repeat(num_steps, 1, 1, 1, 1)
            q = self.fc2(self.body(x_seq).mean(0))  # [T, B, ...] -> [B, n_actions]
            functional.reset_net(self)
            return q

    return SpikingJellyDSQN()


class DenseFloor(nn.Module):
    """The DSQN's convolutions and linears over all T*B inputs, conv1 once, no neuron work.

    :param num_steps: T
    """

    def __init__(self, num_steps: int) -> None:
        super().__init__()
        self.num_steps = num_steps
        self.conv1 = nn.Conv2d(4, 32, 8, 4)
        self.body = nn.Sequential(
            nn.Conv2d(32, 64, 4, 2), nn.Conv2d(64, 64, 3, 1), nn.Flatten(), nn.Linear(3136, 512)
        )
        self.fc2 = nn.Linear(512, N_ACTIONS)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        static = self.conv1(obs.float() / 255)  # [B, 32, 20, 20]
        x = static.expand(self.num_steps, *static.shape).reshape(-1, *static.shape[1:])  # [T*B, ...]
        h = self.body(x)
        return self.fc2(h.reshape(self.num_steps, -1, h.shape[-1]).mean(0))


def sb3_networks(policy_class: type[DQNPolicy], **kwargs: object) -> tuple[nn.Module, nn.Module]:
    """The online and target Q-networks exactly as SB3's DQN builds them."""
    policy = policy_class(OBS_SPACE, spaces.Discrete(N_ACTIONS), lambda _: LEARNING_RATE, **kwargs)
    return policy.q_net, policy.q_net_target


def with_target(online: nn.Module) -> tuple[nn.Module, nn.Module]:
    return online, copy.deepcopy(online)


def spikeq_networks(num_steps: int, **kwargs: object) -> tuple[nn.Module, nn.Module]:
    # PyTorch's initialisation scaled by --weight-gain, as every other row: init="firing" would rescale
    # spikeq's weights at the first training step and compare different networks.
    return sb3_networks(SpikingPolicy, num_steps=num_steps, init="default", **kwargs)


@dataclass(frozen=True)
class Contender:
    """One implementation in the table.

    :param name: its row name
    :param build: T -> (online, target) Q-networks
    :param loop_policy: (c): the SB3 policy name and policy_kwargs for T, or None to skip (c)
    :param cuda_only: a row that means something on CUDA only
    """

    name: str
    build: Callable[[int], tuple[nn.Module, nn.Module]]
    loop_policy: Callable[[int], tuple[str, dict]] | None = None
    cuda_only: bool = False


CONTENDERS = (
    Contender(
        "spikeq fused",
        lambda t: spikeq_networks(t, engine="fused"),
        lambda t: ("SpikingPolicy", dict(num_steps=t, engine="fused")),
    ),
    Contender(
        "spikeq fused, torch loop",
        lambda t: spikeq_networks(t, engine="fused", backend="torch"),
        lambda t: ("SpikingPolicy", dict(num_steps=t, engine="fused", backend="torch")),
        cuda_only=True,
    ),
    Contender("spikeq fused+recompute", lambda t: spikeq_networks(t, engine="fused", recompute=True)),
    Contender(
        "spikeq snntorch",
        lambda t: spikeq_networks(t, engine="snntorch"),
        lambda t: ("SpikingPolicy", dict(num_steps=t, engine="snntorch")),
    ),
    Contender("snntorch naive", lambda t: with_target(NaiveSnnTorchDSQN(t))),
    Contender("spikingjelly", lambda t: with_target(spikingjelly_dsqn(t))),
    Contender(
        "spikeq fused, detach_reset=False",
        lambda t: spikeq_networks(t, engine="fused", detach_reset=False),
    ),
    Contender(
        "spikingjelly, detach_reset=False", lambda t: with_target(spikingjelly_dsqn(t, detach_reset=False))
    ),
    Contender("dense floor", lambda t: with_target(DenseFloor(t))),
    Contender("ANN DQN", lambda t: sb3_networks(CnnPolicy), lambda t: ("CnnPolicy", {})),
)


# ----------------------------------------------------------------------------------------------
# Measurements.


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Batch:
    """A DQN minibatch on the device."""

    obs: torch.Tensor  # [B, 4, 84, 84] uint8
    actions: torch.Tensor  # [B, 1] int64
    rewards: torch.Tensor  # [B]
    next_obs: torch.Tensor  # [B, 4, 84, 84] uint8
    dones: torch.Tensor  # [B]


def pong_frames(count: int) -> np.ndarray:
    """``count`` stacked observations of random Pong play, channel-first uint8 [count, 4, 84, 84]."""
    env = VecFrameStack(make_atari_env(GAME, n_envs=1, seed=0), n_stack=4)
    env.reset()
    rng = np.random.default_rng(0)
    frames = []
    for _ in range(count + 30):  # skip the first steps, whose stacks still hold the reset frame
        obs, *_ = env.step(rng.integers(N_ACTIONS, size=1))
        frames.append(obs[0].transpose(2, 0, 1))
    env.close()
    return np.stack(frames[30:])


def make_batch(frames: np.ndarray, device: torch.device) -> Batch:
    rng = np.random.default_rng(1)
    index = rng.integers(len(frames) - 1, size=TRAIN_BATCH)
    return Batch(
        obs=torch.as_tensor(frames[index], device=device),
        actions=torch.as_tensor(rng.integers(N_ACTIONS, size=(TRAIN_BATCH, 1)), device=device),
        rewards=torch.as_tensor(rng.choice([-1.0, 0.0, 1.0], size=TRAIN_BATCH), device=device).float(),
        next_obs=torch.as_tensor(frames[index + 1], device=device),
        dones=torch.zeros(TRAIN_BATCH, device=device),
    )


class Trainer:
    """SB3 DQN's gradient step (``DQN.train``) on a fixed batch, for any pair of Q-networks."""

    def __init__(self, online: nn.Module, target: nn.Module, batch: Batch) -> None:
        self.online, self.target, self.batch = online, target, batch
        self.optimizer = torch.optim.Adam(online.parameters(), lr=LEARNING_RATE)
        self.target.eval()  # as SB3's DQNPolicy keeps q_net_target

    def step(self) -> None:
        """(b): the whole update, the optimiser's step included."""
        self.network_work()
        with record_function("optimiser step"):
            self.optimizer.step()

    def network_work(self) -> None:
        """(e): the networks' share of the update: the target forward without grad, the online forward
        and its backward; no optimiser step, so the weights stay as they are. Each phase is marked for
        the profiler (f)."""
        b = self.batch
        self.online.train()  # as SB3's DQN.train sets it (a spiking network then records firing rates)
        with torch.no_grad(), record_function("target forward"):
            next_q = self.target(b.next_obs).max(dim=1).values
            target_q = b.rewards + (1 - b.dones) * GAMMA * next_q
        with record_function("online forward"):
            q = torch.gather(self.online(b.obs), dim=1, index=b.actions).squeeze(1)
            loss = F.smooth_l1_loss(q, target_q)
        with record_function("backward"):
            self.optimizer.zero_grad()
            loss.backward()


def firing_rates(net: SpikingQNetwork, obs: torch.Tensor) -> list[tuple[str, float]]:
    """Each spiking layer's fraction of neuron-steps that spike, on ``obs``."""
    with torch.inference_mode(), net.record() as activity:
        net(obs)
    return [(a.name, float(a.spikes.float().mean())) for a in activity if a.spikes is not None]


def greedy_action(online: nn.Module, obs: torch.Tensor) -> int:
    online.eval()  # as SB3's predict sets it
    with torch.inference_mode():
        return int(online(obs).argmax(dim=1)[0])


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


# glibc's malloc_trim, where there is one
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None) if platform.system() == "Linux" else None


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def peak_memory_mb(
    fn: Callable[[], object], device: torch.device, workspaces: list[engine.Workspace]
) -> float | None:
    """Peak memory one call of ``fn`` adds, in MB (None where it cannot be measured).

    :param workspaces: the networks' workspaces, emptied first: buffers kept from earlier steps would
        not show as the step's memory
    """
    gc.collect()
    for workspace in workspaces:
        workspace.clear()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if not os.access("/proc/self/clear_refs", os.W_OK):
        return None
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)  # hand freed heap back, so that the step's allocations show in the RSS
    base = _status_mb("VmRSS:")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the peak resident set (VmHWM) to the current one
    fn()
    return _status_mb("VmHWM:") - base


def profile_table(fn: Callable[[], object], device: torch.device, rows: int) -> str:
    """(f): torch.profiler's table of one call of ``fn`` (warmed up by the timed rounds), by self time;
    on the CPU preceded by ``phase_summary``."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        fn()
        synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort_by, row_limit=rows)
    return table if device.type == "cuda" else phase_summary(profiler.events()) + "\n" + table


# The operators that do a layer's synaptic work, the same in every contender: convolutions and matrix
# products, forward and backward (their own copies included).
SYNAPTIC_OPS = frozenset(
    {"aten::convolution", "aten::convolution_backward", "aten::addmm", "aten::mm", "aten::bmm"}
)
PHASES = ("target forward", "online forward", "backward", "optimiser step")


def phase_summary(events: list) -> str:
    """Milliseconds of each of ``Trainer``'s phases, split into the synaptic operators and the rest.

    The rest is everything else the phase ran: the neuron recurrences, the copies and the Python
    between the kernels. CPU times of one thread of events: on a GPU the kernels run asynchronously
    and the CPU ranges do not measure them.
    """

    def enclosing(event: object, names: frozenset | tuple) -> object | None:
        parent = event.cpu_parent
        while parent is not None and parent.name not in names:
            parent = parent.cpu_parent
        return parent

    total = {name: 0.0 for name in PHASES}
    synaptic = dict(total)
    for event in events:
        if event.name in total:
            total[event.name] += event.cpu_time_total / 1e3
        elif event.name in SYNAPTIC_OPS and enclosing(event, SYNAPTIC_OPS) is None:
            phase = enclosing(event, PHASES)
            if phase is not None:
                synaptic[phase.name] += event.cpu_time_total / 1e3
    rows = [(name, total[name], synaptic[name]) for name in PHASES]
    rows.append(("all", sum(total.values()), sum(synaptic.values())))
    lines = ["| phase | ms | convolutions and matrix products | the rest |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {ms:.1f} | {dense:.1f} | {ms - dense:.1f} |" for name, ms, dense in rows]
    return "\n".join(lines) + "\n"


def agent_steps_per_second(
    policy: str, policy_kwargs: dict, device: torch.device, learning_starts: int, window: int
) -> float:
    """(c): SB3 DQN on Pong, agent steps per second over ``window`` steps after learning starts."""
    env = VecFrameStack(make_atari_env(GAME, n_envs=1, seed=0), n_stack=4)
    model = DQN(
        policy,
        env,
        learning_rate=LEARNING_RATE,
        buffer_size=learning_starts + window + 1,
        learning_starts=learning_starts,
        batch_size=TRAIN_BATCH,
        train_freq=TRAIN_FREQ,
        target_update_interval=1000,
        exploration_initial_eps=EPSILON,
        exploration_final_eps=EPSILON,
        policy_kwargs=policy_kwargs,
        device=device,
        seed=0,
    )
    model.learn(learning_starts)  # random actions fill the replay; no training yet
    start = time.perf_counter()
    model.learn(window, reset_num_timesteps=False)
    synchronize(device)
    elapsed = time.perf_counter() - start
    env.close()
    return window / elapsed


@dataclass
class Row:
    """Results of one contender at one T (None: not measured)."""

    action_ms: list[float] = field(default_factory=list)
    train_ms: list[float] = field(default_factory=list)
    network_ms: list[float] = field(default_factory=list)
    peak_mb: float | None = None
    agent_steps_per_s: float | None = None


def run_steps(
    num_steps: int, contenders: list[Contender], args: Args, frames: np.ndarray, device: torch.device
) -> dict[str, Row]:
    """All measurements at one T, contenders interleaved round by round."""
    batch = make_batch(frames, device)
    obs = batch.obs[:1]
    torch.manual_seed(0)
    trainers = {}
    for c in contenders:
        online, target = c.build(num_steps)
        with torch.no_grad():
            for p in [*online.parameters(), *target.parameters()]:
                p.mul_(args.weight_gain)
        trainers[c.name] = Trainer(online.to(device), target.to(device), batch)
    rows = {c.name: Row() for c in contenders}
    for name, trainer in trainers.items():
        if isinstance(trainer.online, SpikingQNetwork):
            print(f"{name}: firing rates at T = {num_steps}, weight gain {args.weight_gain:g}: ", end="")
            print(", ".join(f"{layer} {rate:.3f}" for layer, rate in firing_rates(trainer.online, batch.obs)))
            break
    for trainer in trainers.values():  # warm-up: allocator, kernels, Adam state
        greedy_action(trainer.online, obs)
        trainer.step()
    for _ in range(args.train_repeats):
        for name, trainer in trainers.items():
            rows[name].action_ms += [
                timed(lambda t=trainer: greedy_action(t.online, obs), device) * 1e3
                for _ in range(args.action_calls)
            ]
            rows[name].train_ms.append(timed(trainer.step, device) * 1e3)
            rows[name].network_ms.append(timed(trainer.network_work, device) * 1e3)
    for name, trainer in trainers.items():
        workspaces = [net.workspace for net in (trainer.online, trainer.target) if hasattr(net, "workspace")]
        rows[name].peak_mb = peak_memory_mb(trainer.step, device, workspaces)
    if args.profile:
        for name, trainer in trainers.items():
            print(f"\n{name}, T = {num_steps}: one training step, its {args.profile} costliest operators")
            print(profile_table(trainer.step, device, args.profile))
    del trainers
    for c in contenders:
        if c.loop_policy is not None and args.loop_steps > 0:
            policy, policy_kwargs = c.loop_policy(num_steps)
            rows[c.name].agent_steps_per_s = agent_steps_per_second(
                policy, policy_kwargs, device, args.learning_starts, args.loop_steps
            )
    return rows


def gradient_agreement(num_steps: int, frames: np.ndarray, weight_gain: float) -> list[str]:
    """spikeq's gradients against SpikingJelly's, with the same weights, for both settings of the reset.

    The loss is a fixed random weighting of Q on 32 Pong frames; each line gives the relative error
    ||g - g_sj|| / ||g_sj|| over all parameters together, against SpikingJelly with the same
    ``detach_reset`` and with the other one (float32, as in training).
    """
    obs = torch.as_tensor(frames[:TRAIN_BATCH])

    def gradients(net: nn.Module) -> torch.Tensor:
        q = net(obs)
        weights = torch.randn(q.shape, generator=torch.Generator().manual_seed(0))
        grads = torch.autograd.grad((q * weights).sum(), list(net.parameters()))
        return torch.cat([g.reshape(-1) for g in grads])

    spikeq_grads, spikingjelly_grads = {}, {}
    for detach_reset in (True, False):
        torch.manual_seed(0)
        net, _ = spikeq_networks(num_steps, detach_reset=detach_reset)
        reference = spikingjelly_dsqn(num_steps, detach_reset=detach_reset)
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(weight_gain)
            for mine, theirs in zip(net.parameters(), reference.parameters(), strict=True):
                theirs.copy_(mine)
        spikeq_grads[detach_reset] = gradients(net)
        spikingjelly_grads[detach_reset] = gradients(reference)
    lines = []
    for detach_reset in (True, False):
        g = spikeq_grads[detach_reset]
        same, other = spikingjelly_grads[detach_reset], spikingjelly_grads[not detach_reset]
        lines.append(
            f"- gradients, spikeq detach_reset={detach_reset}: relative error "
            f"{float((g - same).norm() / same.norm()):.1e} against SpikingJelly detach_reset={detach_reset}, "
            f"{float((g - other).norm() / other.norm()):.2f} against detach_reset={not detach_reset}"
        )
    return lines


# ----------------------------------------------------------------------------------------------
# Report.


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _cell(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def table(num_steps: int, rows: dict[str, Row]) -> str:
    lines = [
        f"T = {num_steps}",
        "",
        "| implementation | (a) action ms, batch 1 | (b) train step ms, batch 32 | (e) its network work ms "
        "| (d) train step peak MB | (c) agent steps/s, Pong |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {_cell(_median(row.action_ms))} | {_cell(_median(row.train_ms), 0)} "
            f"| {_cell(_median(row.network_ms), 0)} | {_cell(row.peak_mb, 0)} "
            f"| {_cell(row.agent_steps_per_s)} |"
        )
    return "\n".join(lines)


TARGET_STEPS = 64  # the targets are stated at T = 64


def ratios(rows: dict[str, Row], device: torch.device) -> list[tuple[str, float | None, float]]:
    """(what, measured value, target) for the issue's targets on this device; None where a row is missing."""

    def median(name: str, metric: str) -> float | None:
        return _median(getattr(rows[name], metric)) if name in rows else None

    def ratio(numerator: str, metric: str, denominator: str) -> float | None:
        top, bottom = median(numerator, metric), median(denominator, metric)
        return None if top is None or bottom is None else top / bottom

    fused = "spikeq fused"
    if device.type == "cuda":
        return [
            ("train: spikeq fused ms (<=)", median(fused, "train_ms"), 4.0),
            ("train: snntorch naive / spikeq fused (>=)", ratio("snntorch naive", "train_ms", fused), 5.0),
        ]
    return [
        # The CPU targets of the engine as a plain package: the training step first, the greedy action
        # only bounded (the earlier batch-1 target, SpikingJelly / spikeq fused >= 3, was retired).
        ("train: spikeq fused / dense floor (<=)", ratio(fused, "train_ms", "dense floor"), 1.15),
        ("train network work: fused / dense floor (<=)", ratio(fused, "network_ms", "dense floor"), 1.15),
        ("train: spikeq fused / spikingjelly (<=)", ratio(fused, "train_ms", "spikingjelly"), 1.0),
        ("action: snntorch naive / spikeq fused (>=)", ratio("snntorch naive", "action_ms", fused), 8.0),
        ("action: spikeq fused / dense floor (<=)", ratio(fused, "action_ms", "dense floor"), 1.5),
    ]


def report_ratios(rows: dict[str, Row], num_steps: int, device: torch.device) -> str:
    """The targets' lines; a verdict only at T = 64, where the targets are stated."""
    lines = []
    for what, value, target in ratios(rows, device):
        if value is None:
            lines.append(f"- {what} {target:g}: not measured")
            continue
        if num_steps != TARGET_STEPS:
            lines.append(f"- {what} {target:g}: {value:.2f} (the target is for T = {TARGET_STEPS})")
            continue
        met = value >= target if "(>=)" in what else value <= target
        lines.append(f"- {what} {target:g}: {value:.2f} ({'met' if met else 'missed'})")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} "
        f"threads, snntorch {snn.__version__}, load average {load}"
    )


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.flush_denormal and not torch.set_flush_denormal(True):
        print("this CPU cannot flush subnormal floats: --flush-denormal has no effect")
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    contenders = [
        c for c in CONTENDERS if c.name not in args.skip and (device.type == "cuda" or not c.cuda_only)
    ]
    if importlib.util.find_spec("spikingjelly") is None:
        print(
            "SpikingJelly is not installed, its rows are skipped "
            "(install it with: .venv/bin/pip install --no-deps spikingjelly loguru)"
        )
        contenders = [c for c in contenders if not c.name.startswith("spikingjelly")]
    print(f"machine: {machine()}, device {device}, cudnn.benchmark {torch.backends.cudnn.benchmark}")
    if device.type == "cuda":
        print(
            f"spikeq fused: recurrence in Triton {engine.triton_backend.kernels().triton.__version__} kernels"
            if engine.triton_backend.available()
            else "Triton is not installed: spikeq fused runs the recurrence in PyTorch kernels"
        )
    frames = pong_frames(4 * TRAIN_BATCH)
    for num_steps in args.steps:
        start = time.perf_counter()
        rows = run_steps(num_steps, contenders, args, frames, device)
        print()
        print(table(num_steps, rows))
        print()
        print(report_ratios(rows, num_steps, device))
        if device.type == "cpu" and importlib.util.find_spec("spikingjelly") is not None:
            print("\n".join(gradient_agreement(num_steps, frames, args.weight_gain)))
        took = time.perf_counter() - start
        print(f"(T = {num_steps} took {took:.0f} s; load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
