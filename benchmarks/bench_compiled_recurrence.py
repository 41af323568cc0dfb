"""What compiling the recurrence would buy on the CPU: spikeq's PyTorch loop against compiled code.

Run:  .venv/bin/python benchmarks/bench_compiled_recurrence.py [--rounds 5] [--threads 1] [--portable]

The engine's PyTorch backend (``torch_backend.integrate``) runs a LIF layer's forward loop as four or
five PyTorch kernels a step (scale the input, decay, add with the reset, record the reset and the
spikes), each a pass over the layer's memory. A compiler can fuse a step into one pass. This script
measures what that buys, with the compiler PyTorch ships (``torch.compile``: Inductor, which writes and
builds C++ on the CPU): the same step equations, compiled once per layer shape into a fresh cache,
writing the membrane, spikes and reset mask in place, side by side with ``integrate`` on the same
currents, for every spiking layer of the paper's Atari DSQN (T = 64) and of the MinAtar preset's
(T = 8), at batch 32 (a training step's forward) and batch 1 (a greedy action). A third contender is
the whole loop hand-written in C++ (``CPP_LOOP``: all T steps in one call, one pass over the memory a
step, built once with ``torch.utils.cpp_extension``, for this CPU or with ``--portable`` for any x86-64
CPU; a CPU-specific backend would be this). It checks
that all three give the same bits, and prints each layer's times, their ratios, and the compile time.

The layers use the presets' neurons (tau 2: beta 0.5 and input scale 0.5, threshold 1, reset to zero);
the currents are drawn so that each layer fires in about 10 to 15% of its neuron-steps (printed), conv1's
the same at every step (direct input coding), the others' changing from step to step.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time

# Compile into a fresh cache, so that the compile times printed are a first compile's.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="spikeq-inductor-"))

import torch
from torch.utils.cpp_extension import load_inline

from spikeq.snn.engine import torch_backend

BETA, THRESHOLD, INPUT_SCALE = 0.5, 1.0, 0.5
# (network, T, layer, neurons of one sample, static current)
LAYERS = [
    ("paper", 64, "conv1", (32, 20, 20), True),
    ("paper", 64, "conv2", (64, 9, 9), False),
    ("paper", 64, "conv3", (64, 7, 7), False),
    ("paper", 64, "fc1", (512,), False),
    ("minatar", 8, "conv", (16, 8, 8), True),
    ("minatar", 8, "fc", (128,), False),
]


def compiled_step() -> object:
    """One step of the zero-reset recurrence as ``integrate`` computes it, compiled, in place:

    U[t] = (beta * U[t-1]) * keep + input_scale * I[t]
    keep = (U[t] <= threshold),  S[t] = (U[t] > threshold)
    """

    def step(u, current, keep, mem_t, spike_t, beta, threshold):
        new = beta * u * keep + current * INPUT_SCALE
        mem_t.copy_(new)
        u.copy_(new)
        spike_t.copy_((new > threshold).to(new.dtype))
        keep.copy_((new <= threshold).to(new.dtype))

    torch._dynamo.reset()  # a fresh compile for each layer shape (its cache is per function, 8 entries)
    return torch.compile(step, dynamic=False)


# The zero-reset recurrence over all T steps, in ``integrate``'s float operations and order (no fused
# multiply-add: -ffp-contract=off), so that its bits are the loop's.
CPP_LOOP = r"""
#include <torch/extension.h>

// U[t] = (beta * U[t-1]) * keep[t-1] + input_scale * I[t]
// keep[t] = U[t] <= threshold,  S[t] = U[t] > threshold
void integrate(torch::Tensor current, torch::Tensor mem, torch::Tensor spikes,
               double beta_, double threshold_, double input_scale_) {
  const float beta = beta_, threshold = threshold_, input_scale = input_scale_;
  const int64_t steps = mem.size(0), n = mem[0].numel();
  const bool is_static = current.size(0) == 1;
  const float* in = current.data_ptr<float>();
  float* u = mem.data_ptr<float>();
  float* s = spikes.data_ptr<float>();
  for (int64_t t = 0; t < steps; ++t) {
    const float* i_t = in + (is_static ? 0 : t * n);
    for (int64_t k = 0; k < n; ++k) {
      const float before = t == 0 ? 0.f : u[(t - 1) * n + k];
      const float keep = before <= threshold ? 1.f : 0.f;
      const float now = (beta * before) * keep + i_t[k] * input_scale;
      u[t * n + k] = now;
      s[t * n + k] = now > threshold ? 1.f : 0.f;
    }
  }
}
"""


@functools.cache
def cpp_loop(portable: bool = False) -> object:
    """``CPP_LOOP`` built (a C++ compiler and ninja at run time; cached by torch between runs): for this
    CPU (``-march=native``: its widest vector instructions), or with ``portable`` for any x86-64 CPU."""
    flags = ["-O3", "-ffp-contract=off"] + ([] if portable else ["-march=native"])
    name = "spikeq_bench_loop" + ("_portable" if portable else "")
    return load_inline(name, CPP_LOOP, functions=["integrate"], extra_cflags=flags)


def compiled_integrate(step, current, num_steps, beta, threshold, mem, spikes) -> None:
    u = torch.zeros_like(current[0])
    keep = torch.ones_like(u)
    for t in range(num_steps):
        step(u, current[0 if current.shape[0] == 1 else t], keep, mem[t], spikes[t], beta, threshold)


def milliseconds(run) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e3


def measure(
    num_steps: int, neurons: tuple[int, ...], static: bool, batch: int, rounds: int, portable: bool
) -> tuple:
    """(firing rate, the median ms of the loop, the compiled step and the C++ loop, compile s), one layer."""
    beta, threshold = torch.tensor(BETA), torch.tensor(THRESHOLD)
    generator = torch.Generator().manual_seed(0)
    shape = (1 if static else num_steps, batch, *neurons)
    # A static current fires every few steps; a changing one needs a larger mean for the same rate.
    mean, spread = (0.3, 1.2) if static else (0.5, 1.2)
    current = torch.randn(shape, generator=generator) * spread + mean
    buffers = (torch.empty(num_steps, batch, *neurons) for _ in range(6))
    mem, spikes, mem_c, spikes_c, mem_x, spikes_x = buffers
    loop = functools.partial(
        torch_backend.integrate,
        current,
        num_steps,
        beta,
        threshold,
        torch_backend.RESET_ZERO,
        INPUT_SCALE,
        mem,
        spikes,
    )
    compiled = functools.partial(
        compiled_integrate, compiled_step(), current, num_steps, beta, threshold, mem_c, spikes_c
    )
    cpp = functools.partial(
        cpp_loop(portable).integrate, current, mem_x, spikes_x, BETA, THRESHOLD, INPUT_SCALE
    )
    compile_s = milliseconds(compiled) / 1e3
    loop()
    cpp()
    for name, (m, s) in {"compiled step": (mem_c, spikes_c), "C++ loop": (mem_x, spikes_x)}.items():
        if not (torch.equal(mem, m) and torch.equal(spikes, s)):
            raise SystemExit(f"T={num_steps}, {neurons}, batch {batch}: the {name}'s bits differ")
    # Interleaved, so that a busy machine slows all alike.
    times = [(milliseconds(loop), milliseconds(compiled), milliseconds(cpp)) for _ in range(rounds)]
    loop_ms, compiled_ms, cpp_ms = (statistics.median(column) for column in zip(*times, strict=True))
    return spikes.mean().item(), loop_ms, compiled_ms, cpp_ms, compile_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed calls of each; the median is printed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--portable", action="store_true", help="build the C++ loop for any x86-64 CPU (no -march=native)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.rounds} calls, times in ms")
    cpp_loop(args.portable)  # built before any timing
    print(f"C++ loop built {'for any x86-64 CPU' if args.portable else 'with -march=native'}")
    print(
        "| network | batch | layer | firing | PyTorch loop | compiled step | C++ loop | compiled / loop "
        "| C++ / loop | compile s |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    totals: dict[tuple[str, int], list[float]] = {}
    for network, num_steps, layer, neurons, static in LAYERS:
        for batch in (32, 1):
            rate, *times, compile_s = measure(num_steps, neurons, static, batch, args.rounds, args.portable)
            total = totals.setdefault((network, batch), [0.0, 0.0, 0.0])
            total[:] = [t + x for t, x in zip(total, times, strict=True)]
            print(f"| {network} | {batch} | {layer} | {rate:.1%} | {_cells(*times)} | {compile_s:.1f} |")
    for (network, batch), times in totals.items():
        print(f"| {network} | {batch} | all layers | | {_cells(*times)} | |")


def _cells(loop: float, compiled: float, cpp: float) -> str:
    return f"{loop:.2f} | {compiled:.2f} | {cpp:.2f} | {compiled / loop:.2f} | {cpp / loop:.2f}"


if __name__ == "__main__":
    main()
