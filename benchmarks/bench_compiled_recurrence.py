"""What compiling the recurrence would buy on the CPU: spikeq's PyTorch loop against a compiled step.

Run:  .venv/bin/python benchmarks/bench_compiled_recurrence.py [--rounds 5] [--threads 1]

The engine's PyTorch backend (``torch_backend.integrate``) runs a LIF layer's forward loop as four or
five PyTorch kernels a step (scale the input, decay, add with the reset, record the reset and the
spikes), each a pass over the layer's memory. A compiler can fuse a step into one pass. This script
measures what that buys, with the compiler PyTorch ships (``torch.compile``: Inductor, which writes and
builds C++ on the CPU): the same step equations, compiled once per layer shape into a fresh cache,
writing the membrane, spikes and reset mask in place, side by side with ``integrate`` on the same
currents, for every spiking layer of the paper's Atari DSQN (T = 64) and of the MinAtar preset's
(T = 8), at batch 32 (a training step's forward) and batch 1 (a greedy action). It checks that both
give the same bits, and prints each layer's times, their ratio, and the compile time.

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


def compiled_integrate(step, current, num_steps, beta, threshold, mem, spikes) -> None:
    u = torch.zeros_like(current[0])
    keep = torch.ones_like(u)
    for t in range(num_steps):
        step(u, current[0 if current.shape[0] == 1 else t], keep, mem[t], spikes[t], beta, threshold)


def milliseconds(run) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e3


def measure(num_steps: int, neurons: tuple[int, ...], static: bool, batch: int, rounds: int) -> tuple:
    """(firing rate, the loop's median ms, the compiled step's median ms, compile s) for one layer."""
    beta, threshold = torch.tensor(BETA), torch.tensor(THRESHOLD)
    generator = torch.Generator().manual_seed(0)
    shape = (1 if static else num_steps, batch, *neurons)
    # A static current fires every few steps; a changing one needs a larger mean for the same rate.
    mean, spread = (0.3, 1.2) if static else (0.5, 1.2)
    current = torch.randn(shape, generator=generator) * spread + mean
    mem, spikes, mem_c, spikes_c = (torch.empty(num_steps, batch, *neurons) for _ in range(4))
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
    compile_s = milliseconds(compiled) / 1e3
    loop()
    if not (torch.equal(mem, mem_c) and torch.equal(spikes, spikes_c)):
        raise SystemExit(f"T={num_steps}, {neurons}, batch {batch}: the compiled step's bits differ")
    # Interleaved, so that a busy machine slows both alike.
    times = [(milliseconds(loop), milliseconds(compiled)) for _ in range(rounds)]
    loop_ms, compiled_ms = (statistics.median(column) for column in zip(*times, strict=True))
    return spikes.mean().item(), loop_ms, compiled_ms, compile_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed calls of each; the median is printed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.rounds} calls, times in ms")
    print("| network | batch | layer | firing | PyTorch loop | compiled step | compiled / loop | compile s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    totals: dict[tuple[str, int], list[float]] = {}
    for network, num_steps, layer, neurons, static in LAYERS:
        for batch in (32, 1):
            rate, a, b, compile_s = measure(num_steps, neurons, static, batch, args.rounds)
            total = totals.setdefault((network, batch), [0.0, 0.0])
            total[0], total[1] = total[0] + a, total[1] + b
            row = f"| {network} | {batch} | {layer} | {rate:.1%} | {a:.2f} | {b:.2f} | {b / a:.2f}"
            print(f"{row} | {compile_s:.1f} |")
    for (network, batch), (a, b) in totals.items():
        print(f"| {network} | {batch} | all layers | | {a:.2f} | {b:.2f} | {b / a:.2f} | |")


if __name__ == "__main__":
    main()
