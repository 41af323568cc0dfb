"""Time-batched ("fused") execution of a feedforward spiking stack.

A feedforward spiking network can be run layer by layer instead of step by step: each layer's synaptic
input for all T steps is one conv/matmul over ``[T*B, ...]`` (``over_time``), and only the membrane
recurrence runs sequentially (``leaky_sequence``, or ``spike_sequence`` for hidden layers, whose
membrane nobody reads). The recurrence is a custom autograd Function: the forward loop runs without
building a graph; the backward runs the adjoint recurrence in reverse. Both read the snnTorch ``Leaky``
module's own beta, threshold, reset mechanism and surrogate function, so spikes and membranes are
bit-identical to calling ``Leaky`` step by step, and gradients equal within float rounding.

What makes it fast on a CPU (``benchmarks/bench_engine.py`` measures it):

- a loop step is three to five kernels that write into preallocated buffers, without temporaries; on
  a CPU, a small layer's loop (a greedy action at batch 1) calls numpy's ufuncs on the same memory,
  which cost a fraction of PyTorch's per-call overhead;
- the large ``[T, B, ...]`` buffers come from a ``Workspace`` that reuses them across calls once
  nothing holds them, instead of fresh memory that page-faults on first write;
- a static current (direct input coding: the same current at every step) stays ``[1, B, ...]``; it is
  never expanded to T copies, forward or backward;
- the input scale (1/tau) is applied inside the loop, not as a pass of its own, forward and backward;
- without autograd the membrane is not stored; with it, a hidden layer's backward writes the gradient
  over the stored membrane, so a layer costs one ``[T, B, ...]`` buffer besides its spikes (none with
  ``recompute`` and a static current);
- the backward runs in chunks of steps small enough to stay in cache, and evaluates snnTorch's ATan
  surrogate (the paper's) in place in three kernels; other surrogates are differentiated with autograd;
- without autograd, a static current under the zero reset fires periodically: its spikes come from
  each neuron's first firing step, without a loop (``_periodic_spikes``, ``periodic_steps``), and
  repeat from step to step, so the next layer's synapses run once per distinct step
  (``periodic_steps``, ``over_distinct_steps``).

On a GPU the per-step kernels' launches would dominate: there the recurrence runs in spikeq.kernels'
Triton kernels, all T steps in one launch per layer and direction (``use_recurrence`` chooses).
"""

from __future__ import annotations

import importlib
import math
import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from snntorch import surrogate as snn_surrogate
from torch import nn

# snnTorch's reset_mechanism_val: 0 subtract, 1 zero, 2 none
RESET_SUBTRACT, RESET_ZERO, RESET_NONE = 0, 1, 2
# The backward processes this many neuron-steps at a time (about 1 MB of float32 per temporary).
CHUNK_ELEMENTS = 1 << 18
# Up to this many neuron-steps the forward loop prefers whole-sequence kernels to per-step ones.
SMALL_ELEMENTS = 1 << 19
# Up to this many neurons (one step, whole batch) a CPU forward loop runs on numpy's ufuncs.
NUMPY_ELEMENTS = 1 << 16
NUMPY_DTYPES = (torch.float32, torch.float64)
# Where the recurrence runs: "auto" takes the Triton kernels (spikeq.kernels) for CUDA tensors when
# Triton is installed and the PyTorch/numpy loops otherwise; "triton" takes them for every tensor (CPU
# tensors need TRITON_INTERPRET=1, Triton's interpreter); "torch" never does. ``use_recurrence`` sets it.
RECURRENCES = ("auto", "triton", "torch")
_recurrence = "auto"
_kernels: Any = None  # the imported spikeq.kernels, False where Triton cannot be imported


def use_recurrence(name: str) -> None:
    """Choose where the membrane recurrence runs: one of ``RECURRENCES`` (default from the
    SPIKEQ_RECURRENCE environment variable, else "auto")."""
    global _recurrence
    if name not in RECURRENCES:
        raise ValueError(f"recurrence {name!r} is not one of {', '.join(RECURRENCES)}")
    if name == "triton" and not _triton_kernels():
        raise RuntimeError("recurrence 'triton' needs the triton package: pip install triton")
    _recurrence = name


def _triton_kernels() -> Any:
    """spikeq.kernels, imported on first use (so TRITON_INTERPRET set before then applies), or None."""
    global _kernels
    if _kernels is None:
        try:
            _kernels = importlib.import_module("spikeq.kernels")
        except ImportError:
            _kernels = False
    return _kernels or None


def _triton_can_run(current: torch.Tensor, beta: torch.Tensor, threshold: torch.Tensor) -> bool:
    """Whether the recurrence of ``current`` runs in the Triton kernels (scalar beta and threshold)."""
    if _recurrence == "torch" or (_recurrence == "auto" and not current.is_cuda):
        return False
    return (
        beta.numel() == 1
        and threshold.numel() == 1
        and current.dtype in NUMPY_DTYPES
        and _triton_kernels() is not None
    )


def _numpy_interop() -> bool:
    """Whether torch can share CPU memory with this numpy (not where torch was built against numpy 1
    and numpy 2 is installed): the numpy paths are skipped otherwise."""
    try:
        return bool(torch.ones(1).numpy()[0] == 1)
    except (RuntimeError, TypeError, ValueError):
        return False


NUMPY_INTEROP = _numpy_interop()


def _numpy_can_run(current: torch.Tensor) -> bool:
    """Whether the numpy paths can work on ``current``'s memory (CPU, float32/64, numpy interop), and
    the Triton kernels are not asked for."""
    return (
        current.device.type == "cpu"
        and current.dtype in NUMPY_DTYPES
        and NUMPY_INTEROP
        and _recurrence != "triton"
    )


def _numpy_drive(current: torch.Tensor, input_scale: float) -> np.ndarray:
    """input_scale * I as numpy, rounded as the torch loop rounds it (a scalar of the array's dtype)."""
    drive = current.detach().numpy()
    return drive * drive.dtype.type(input_scale) if input_scale != 1 else drive


class Workspace:
    """Reuses the engine's large CPU buffers (``[T, B, ...]`` spikes, membranes, gradients) across calls.

    A fresh multi-megabyte tensor costs a page fault per 4 kB page when first written (glibc maps large
    blocks from the OS and unmaps them when freed): writing conv1's spikes at T = 64 and batch 32 step
    by step took 85 ms into a fresh buffer and 12 ms into a reused one (benchmarks/README.md). A buffer
    handed out here is reused as soon as nothing else holds its storage (no tensor, view or autograd
    graph), so a training step reuses the previous step's buffers. Free buffers not asked for during
    ``keep_for`` further requests are released; ``clear()`` releases all of them.

    :param min_bytes: smaller buffers come from malloc's heap, where reuse is cheap anyway
    :param keep_for: requests a free buffer survives without being reused
    """

    def __init__(self, min_bytes: int = 1 << 20, keep_for: int = 64) -> None:
        self.min_bytes, self.keep_for = min_bytes, keep_for
        self._buffers: list[tuple[torch.UntypedStorage, int]] = []  # (storage, last request served)
        self._requests = 0
        self._lock = threading.Lock()
        self.enabled = hasattr(torch._C, "_storage_Use_Count")

    @staticmethod
    def _free(storage: torch.UntypedStorage) -> bool:
        return torch._C._storage_Use_Count(storage._cdata) == 1  # held by the workspace alone

    def empty(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised contiguous tensor of ``shape`` with ``like``'s dtype and device."""
        nbytes = math.prod(shape) * like.element_size()
        if not self.enabled or like.device.type != "cpu" or nbytes < self.min_bytes:
            return like.new_empty(shape)
        with self._lock:
            self._requests += 1
            storage = None
            kept = []
            for candidate, served in self._buffers:
                if storage is None and candidate.nbytes() == nbytes and self._free(candidate):
                    storage, served = candidate, self._requests
                if served >= self._requests - self.keep_for or not self._free(candidate):
                    kept.append((candidate, served))
            if storage is None:
                storage = torch.UntypedStorage(nbytes, device=like.device)
                kept.append((storage, self._requests))
            self._buffers = kept
            strides = [1] * len(shape)
            for i in range(len(shape) - 2, -1, -1):
                strides[i] = strides[i + 1] * shape[i + 1]
            return like.new_empty(0).set_(storage, 0, shape, strides)

    def clear(self) -> None:
        """Release every buffer nothing else holds."""
        with self._lock:
            self._buffers = [(s, served) for s, served in self._buffers if not self._free(s)]

    @property
    def resident_bytes(self) -> int:
        """Bytes of the buffers the workspace holds, in use or free."""
        return sum(s.nbytes() for s, _ in self._buffers)


WORKSPACE = Workspace()
use_recurrence(os.environ.get("SPIKEQ_RECURRENCE", "auto"))


def over_time(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a stateless module to every step of a sequence in one call.

    :param module: e.g. a Conv2d or Linear
    :param x: ``[T, B, ...]``
    :return: ``[T, B, ...]`` of the module's output
    """
    steps, batch = x.shape[:2]
    y = module(x.reshape(steps * batch, *x.shape[2:]))
    return y.reshape(steps, batch, *y.shape[1:])


def _groups(keys: list) -> tuple[list[int], list[int]]:
    """For a list of hashable keys: the index of each distinct key's first occurrence, and each key's
    index among the distinct ones (``keys[first[inverse[t]]] == keys[t]``)."""
    index: dict = {}
    inverse = [index.setdefault(key, len(index)) for key in keys]
    first = [0] * len(index)
    for t in reversed(range(len(keys))):
        first[inverse[t]] = t
    return first, inverse


def _kept(cache: dict, key: tuple, value: Any, most: int) -> Any:
    """Put ``value`` in a cache that holds at most ``most`` entries (the oldest goes first)."""
    if len(cache) >= most:
        del cache[next(iter(cache))]
    cache[key] = value
    return value


# Keys of time slices (see _distinct_steps): two random integer weights per element, by size and dtype.
_HASH_WEIGHTS: dict[tuple, torch.Tensor] = {}


def _distinct_steps(x: torch.Tensor, most: float = 0.75) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The steps of a CPU tensor ``x`` whose slice first appears there, and each step's index among them.

    x[t] equals x[first[inverse[t]]] for every t. Slices are keyed by two weighted sums (integer
    weights below 32, so the sums of 0/1 spikes are exact integers in float32 for up to half a million
    elements per step); slices with equal keys are then compared element by element, so a key
    collision can only make this return None, never merge different slices.

    :param x: ``[T, ...]`` on the CPU, float32 or float64
    :param most: return None when more than ``most * T`` slices are distinct (no saving worth it)
    :return: (first, inverse) as int64 tensors ``[K]`` and ``[T]``, or None
    """
    steps = x.shape[0]
    rows = x.detach().reshape(steps, -1)
    key = (rows.shape[1], rows.dtype)
    weights = _HASH_WEIGHTS.get(key)
    if weights is None:
        generator = torch.Generator().manual_seed(0)
        weights = torch.randint(0, 32, (2, rows.shape[1]), generator=generator, dtype=rows.dtype)
        _kept(_HASH_WEIGHTS, key, weights, 8)  # acting and training batches: a few sizes at a time
    # torch's matmul, not numpy's: numpy's BLAS threads would spin beside torch's (measured: 2x slower)
    first, inverse = _groups([tuple(k) for k in torch.mm(rows, weights.t()).tolist()])
    if len(first) > most * steps:
        return None
    values = rows.numpy()  # compared as views: no copies of the repeated slices
    if not all(np.array_equal(values[t], values[first[j]]) for t, j in enumerate(inverse) if first[j] != t):
        return None
    return torch.tensor(first), torch.tensor(inverse)


def over_distinct_steps(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``over_time``, applying ``module`` once per distinct step of ``x``, without autograd through x.

    The spikes of a layer driven by a static current (direct input) are periodic per neuron, and
    at T = 64 a Pong frame gave 22 to 32 distinct steps: the next layer's convolution runs on those
    and its output is copied to the steps that repeat them. Each step's output is still
    ``module(x[t])`` for that step's own slice, batched with other slices as ``over_time`` batches
    them. Used where x needs no gradient (acting, the target network) on the CPU; elsewhere, and
    where most steps are distinct, this is ``over_time``.

    :param module: a stateless module (Conv2d, Linear)
    :param x: ``[T, B, ...]``
    :return: ``[T, B, ...]``
    """
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    distinct = None if needs_grad or not _numpy_can_run(x) or x.shape[0] < 4 else _distinct_steps(x)
    if distinct is None:
        return over_time(module, x)
    first, inverse = distinct
    return over_time(module, x.index_select(0, first)).index_select(0, inverse)


def _integrate(
    current: torch.Tensor,
    num_steps: int,
    beta: torch.Tensor,
    threshold: torch.Tensor,
    reset: int,
    input_scale: float,
    mem: torch.Tensor | None,
    spikes: torch.Tensor | None,
) -> None:
    """Run the membrane recurrence, writing U into ``mem`` and S (0/1) into ``spikes`` where not None.

    The float operations and their order are snnTorch ``Leaky``'s, so U is bit-identical:

        zero:      U[t] = beta * ((1 - S[t-1]) * U[t-1]) + input_scale * I[t]
        subtract:  U[t] = (beta * U[t-1] + input_scale * I[t]) - S[t-1] * threshold
        none:      U[t] = beta * U[t-1] + input_scale * I[t]
        S[t] = (U[t] - threshold > 0),  U[-1] = 0

    ``addcmul`` may fuse its multiply and add into one rounding (it does on CPU); it is used only where
    the product is exact (one factor is 0 or 1), so fused and unfused give the same bits. (With the zero
    reset, S may be recorded as not(U <= threshold): the same for every membrane that is not NaN.)

    :param current: ``[T, B, ...]``, or ``[1, B, ...]`` for the same current at every step
    :param reset: ``RESET_ZERO``, ``RESET_SUBTRACT`` or ``RESET_NONE``
    :param mem: ``[T, B, ...]`` buffer for U, or None: U is then kept for one step only
    :param spikes: ``[T, B, ...]`` buffer for S, or None
    """
    if _triton_can_run(current, beta, threshold):
        _triton_kernels().integrate(current, num_steps, beta, threshold, reset, input_scale, mem, spikes)
        return
    if _numpy_can_run(current) and current[0].numel() <= NUMPY_ELEMENTS:
        _integrate_numpy(current, num_steps, beta, threshold, reset, input_scale, mem, spikes)
        return
    u = torch.zeros_like(current[0])
    decayed = torch.empty_like(u)
    mems = mem.unbind(0) if mem is not None else [u] * num_steps
    static = current.shape[0] != num_steps
    # A small sequence is cheaper as one kernel over all T steps than as T kernels (fewer launches);
    # a large one is cheaper step by step (no new [T, B, ...] tensor, each step in cache).
    small = num_steps * u.numel() <= SMALL_ELEMENTS
    prescale = input_scale != 1 and (static or small)
    if prescale:
        current = current * input_scale
    currents = current.unbind(0) * (num_steps if static else 1)
    scaled = torch.empty_like(u) if input_scale != 1 and not prescale else None

    def drive(t: int) -> torch.Tensor:
        return currents[t] if scaled is None else torch.mul(currents[t], input_scale, out=scaled)

    if reset == RESET_ZERO:
        # keep = 1 - S[t], the reset's factor. A small sequence records keep in the spike buffer and
        # turns the record into S at the end.
        record_keep = spikes is not None and small
        keeps = spikes.unbind(0) if record_keep else [torch.empty_like(u)] * num_steps
        keep = (u <= threshold).to(u.dtype)
        for t in range(num_steps):
            torch.mul(u, beta, out=decayed)
            u = torch.addcmul(drive(t), decayed, keep, out=mems[t])
            keep = torch.le(u, threshold, out=keeps[t])
            if spikes is not None and not record_keep:
                torch.gt(u, threshold, out=spikes[t])
        if record_keep:
            torch.eq(spikes, 0, out=spikes)
    elif reset == RESET_SUBTRACT:
        spike = (u > threshold).to(u.dtype)  # S[t-1]
        for t in range(num_steps):
            torch.mul(u, beta, out=decayed)
            u = torch.add(decayed, drive(t), out=mems[t])
            u.addcmul_(spike, threshold, value=-1)
            spike = torch.gt(u, threshold, out=spike if spikes is None else spikes[t])
    else:
        for t in range(num_steps):
            torch.mul(u, beta, out=decayed)
            u = torch.add(decayed, drive(t), out=mems[t])
            if spikes is not None:
                torch.gt(u, threshold, out=spikes[t])


def _integrate_numpy(
    current: torch.Tensor,
    num_steps: int,
    beta: torch.Tensor,
    threshold: torch.Tensor,
    reset: int,
    input_scale: float,
    mem: torch.Tensor | None,
    spikes: torch.Tensor | None,
) -> None:
    """``_integrate`` on the tensors' memory with numpy's ufuncs: the same float operations in the same
    order (so the same bits), at a fraction of PyTorch's per-call overhead, which is most of the cost
    of a small layer (a greedy action at batch 1 runs 64 steps x 4 layers of a few thousand neurons).
    """
    drive = _numpy_drive(current, input_scale)
    drives = [drive[0]] * num_steps if current.shape[0] != num_steps else list(drive)
    beta_np, threshold_np = beta.detach().numpy(), threshold.detach().numpy()
    u = np.zeros_like(drive[0])
    decayed = np.empty_like(u)
    mems = list(mem.numpy()) if mem is not None else [u] * num_steps  # U in place when not kept
    # Without a spike buffer, two alternating buffers hold the last step's 0/1 record.
    spare = (np.empty_like(u), np.empty_like(u))
    records = list(spikes.numpy()) if spikes is not None else [spare[t % 2] for t in range(num_steps)]
    multiply, add, less_equal, greater = np.multiply, np.add, np.less_equal, np.greater
    if reset == RESET_ZERO:
        # records hold keep = 1 - S[t] (S[t] = not(U[t] <= threshold)), turned into S at the end.
        keep = (u <= threshold_np).astype(u.dtype)
        for t in range(num_steps):
            multiply(u, beta_np, decayed)
            multiply(decayed, keep, decayed)
            u = add(decayed, drives[t], mems[t])
            keep = less_equal(u, threshold_np, records[t])
        if spikes is not None:
            record = spikes.numpy()
            np.subtract(record.dtype.type(1), record, out=record)
    elif reset == RESET_SUBTRACT:
        spike = (u > threshold_np).astype(u.dtype)  # S[t-1]
        for t in range(num_steps):
            multiply(u, beta_np, decayed)
            u = add(decayed, drives[t], mems[t])
            multiply(spike, threshold_np, decayed)
            np.subtract(u, decayed, u)
            spike = greater(u, threshold_np, records[t])
    else:
        for t in range(num_steps):
            multiply(u, beta_np, decayed)
            u = add(decayed, drives[t], mems[t])
            if spikes is not None:
                greater(u, threshold_np, records[t])


# Tables of _first_spike_drives, by (dtype, beta, threshold, T); bounded, oldest dropped first.
_DRIVE_TABLES: dict[tuple, np.ndarray] = {}
_DRIVE_TABLES_KEPT = 16


def _first_spike_drives(beta: np.ndarray, threshold: np.ndarray, num_steps: int) -> np.ndarray:
    """The drives at which a neuron at rest first fires at each step, in ascending order.

    Without reset, a constant drive d gives U[0] = d, U[t] = beta * U[t-1] + d, rounded as the loop
    rounds. Rounding is monotone, so with 0 <= beta <= 1 and d >= 0, U[t] grows with d and with t: a
    neuron fires first at step k(d) = #{t : d < c[t]}, where c[t] is the least float with U[t] > threshold.
    c is found by bisection over the floats' bit patterns (ordered as the floats are, for d >= 0), all
    steps at once. Returned reversed (ascending), ready for ``np.searchsorted``.
    """
    key = (beta.dtype.str, float(beta), float(threshold), num_steps)
    table = _DRIVE_TABLES.get(key)
    if table is not None:
        return table
    dtype = beta.dtype
    bits = np.dtype(f"uint{dtype.itemsize * 8}")
    low = np.zeros(num_steps, bits)  # 0.0: U[t] = 0 <= threshold
    high = np.full(num_steps, np.array(np.inf, dtype).view(bits))  # inf: U[t] = inf > threshold
    fired = np.empty(num_steps, bool)
    with np.errstate(over="ignore", invalid="ignore"):
        while (high - low > 1).any():
            middle = low + (high - low) // 2
            drive = middle.view(dtype)
            u = drive.copy()
            fired[0] = u[0] > threshold
            for t in range(1, num_steps):
                u = np.add(np.multiply(u, beta), drive)
                fired[t] = u[t] > threshold
            high = np.where(fired, middle, high)
            low = np.where(fired, low, middle)
    table = np.ascontiguousarray(high.view(dtype)[::-1])
    return _kept(_DRIVE_TABLES, key, table, _DRIVE_TABLES_KEPT)


def _first_spikes(
    current: torch.Tensor,
    num_steps: int,
    leaky: nn.Module,
    beta: torch.Tensor,
    threshold: torch.Tensor,
    input_scale: float,
) -> np.ndarray | None:
    """Each neuron's first firing step (num_steps: none within T) under a static current, or None.

    Applies to a static current under the zero reset with fixed scalar parameters, a threshold >= 0, a
    numpy dtype, on the CPU; the reset then returns the membrane to rest, so a neuron that first fires
    at step k fires at every step t with (t + 1) % (k + 1) == 0. k comes from ``_first_spike_drives``.
    """
    if (
        current.shape[0] == num_steps
        or int(leaky.reset_mechanism_val) != RESET_ZERO
        or leaky.beta.requires_grad
        or leaky.threshold.requires_grad
        or beta.numel() != 1
        or threshold.numel() != 1
        or not _numpy_can_run(current)
    ):
        return None
    beta_np, threshold_np = beta.detach().reshape(()).numpy(), threshold.detach().reshape(()).numpy()
    if not threshold_np >= 0:
        return None
    drive = _numpy_drive(current, input_scale).reshape(-1)
    # first = #{t : drive < c[t]}; NaN sorts last, so fires at every step, as the loop's record does.
    return num_steps - np.searchsorted(_first_spike_drives(beta_np, threshold_np, num_steps), drive, "right")


def _periodic_spikes(first: np.ndarray, num_steps: int, spikes: torch.Tensor) -> bool:
    """Spikes of a constant current under the zero reset, without a loop where that is exact.

    Each neuron fires periodically from its first firing step (``first``, from ``_first_spikes``). The
    spikes are written as a scatter, so the cost is one pass to clear ``spikes`` plus one per spike:
    it applies while fewer than one neuron-step in eight spikes. Bit-identical to ``_integrate``
    (``tests/test_engine.py``).

    :return: whether ``spikes`` was written; False with many spikes, where the loop must run
    """
    neurons = np.flatnonzero(first < num_steps)
    period = first[neurons] + 1
    counts = num_steps // period
    total = int(counts.sum())
    if total * 8 > spikes.numel():
        return False
    spikes.zero_()
    record = spikes.numpy().reshape(num_steps, -1)
    if total:
        # spike j (0-based) of a neuron with period p falls on step (j + 1) * p - 1
        nth = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        record[(nth + 1) * np.repeat(period, counts) - 1, np.repeat(neurons, counts)] = 1
    return True


def periodic_steps(
    current: torch.Tensor, leaky: nn.Module, num_steps: int, input_scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The spikes of a static current as their distinct steps, without a loop: for acting.

    Under the zero reset each neuron fires every k-th step (``_first_spikes``), so step t's spikes
    are those of the neurons whose period divides t + 1, and steps with the same set of dividing
    periods spike alike (at T = 64 a Pong frame gave 18 to 32 distinct steps). Returns the distinct
    steps' spikes and each step's index among them: ``distinct[inverse]`` equals
    ``spike_sequence(current, leaky, num_steps, input_scale)`` bit for bit, and the next layer's
    synapses need to run on the distinct steps only.

    :param current: ``[1, B, ...]`` the static current
    :return: (distinct ``[K, B, ...]``, inverse int64 ``[T]``), or None where this does not apply:
        autograd, a layer of more than ``NUMPY_ELEMENTS`` neurons (there the loop is faster than
        writing the rows), or what ``_first_spikes`` does not take
    """
    steps, beta, threshold, needs_grad = _neuron_parameters(current, leaky, num_steps)
    if needs_grad or current.shape[0] != 1 or current[0].numel() > NUMPY_ELEMENTS:
        return None
    first = _first_spikes(current, steps, leaky, beta, threshold, input_scale)
    if first is None:
        return None
    period = first + 1  # T + 1: never fires within T steps
    present = np.flatnonzero(np.bincount(period, minlength=steps + 2)[1 : steps + 1]) + 1
    divides = (np.arange(1, steps + 1)[:, None] % present) == 0  # [T, periods present]
    first, inverse = _groups([row.tobytes() for row in divides])
    # chosen[k, p]: whether the k-th distinct step has neurons of period p fire
    chosen = current.new_zeros((len(first), steps + 2))
    chosen[:, torch.from_numpy(present)] = torch.from_numpy(divides[first]).to(chosen.dtype)
    distinct = chosen.index_select(1, torch.from_numpy(period))
    return distinct.reshape(len(first), *current.shape[1:]), torch.tensor(inverse)


def _atan_alpha(spike_fn: Callable[[torch.Tensor], torch.Tensor]) -> float | None:
    """alpha of snnTorch's ATan surrogate, recognised by its autograd node; None for other functions."""
    probe = torch.zeros((), requires_grad=True)
    with torch.enable_grad():
        node = spike_fn(probe).grad_fn
    return float(node.alpha) if type(node) is snn_surrogate.ATan._backward_cls else None


def _surrogate_product(
    spike_fn: Callable[[torch.Tensor], torch.Tensor], threshold: torch.Tensor, factor: float
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]:
    """A function (grad_spikes, u, out) writing factor * grad_spikes * surrogate'(u - threshold) to out.

    ``out`` may be ``u`` itself. snnTorch's ATan (the paper's), alpha / 2 / (1 + (pi / 2 * alpha * x)^2),
    is recognised by its autograd node and takes three kernels: with y = pi / 2 * alpha * (u - threshold)
    and k = 2 / (alpha * factor), the product is grad_spikes / (k + k * y^2). Any other surrogate
    function is differentiated with autograd.
    """
    alpha = _atan_alpha(spike_fn)
    if alpha is not None:
        c = math.pi / 2 * alpha
        k = 2 / (alpha * factor)
        offset, k_tensor = threshold * -c, threshold.new_tensor(k)

        def atan(grad_spikes: torch.Tensor, u: torch.Tensor, out: torch.Tensor) -> None:
            torch.add(offset, u, alpha=c, out=out)
            torch.addcmul(k_tensor, out, out, value=k, out=out)
            torch.div(grad_spikes, out, out=out)

        return atan

    def through_autograd(grad_spikes: torch.Tensor, u: torch.Tensor, out: torch.Tensor) -> None:
        with torch.enable_grad():
            x = (u - threshold).requires_grad_()
            (product,) = torch.autograd.grad(spike_fn(x), x, grad_spikes)
        torch.mul(product, factor, out=out)

    return through_autograd


def _surrogate_derivative(
    spike_fn: Callable[[torch.Tensor], torch.Tensor], threshold: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function u -> surrogate'(u - threshold), a new tensor: the reset's own gradient needs it.

    snnTorch's ATan (the paper's) is written out, alpha / 2 / (1 + (pi / 2 * alpha * x)^2); any other
    surrogate function is differentiated with autograd.
    """
    alpha = _atan_alpha(spike_fn)
    if alpha is not None:
        c, half_alpha = math.pi / 2 * alpha, alpha / 2

        def atan(u: torch.Tensor) -> torch.Tensor:
            y = (u - threshold).mul_(c)
            return y.mul_(y).add_(1).reciprocal_().mul_(half_alpha)

        return atan

    def through_autograd(u: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = (u - threshold).requires_grad_()
            (derivative,) = torch.autograd.grad(spike_fn(x), x, torch.ones_like(x))
        return derivative.to(u.dtype)

    return through_autograd


def _adjoint(
    mem: torch.Tensor,
    grad_spikes: torch.Tensor | None,
    grad_mem: torch.Tensor | None,
    ctx: Any,
    beta: torch.Tensor,
    threshold: torch.Tensor,
    out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Backward of ``_integrate``, in reverse a chunk of steps at a time (chunks stay in cache).

    With G[t] = dL/dU[t], the adjoint runs as H = input_scale * G, which is dL/dI directly:

        H[t] = input_scale * (grad_mem[t] + grad_spikes[t] * sg'[t]) + dU[t+1]/dU[t] * H[t+1]
        sg'[t] = surrogate'(U[t] - threshold)
        dL/dbeta = sum_t G[t+1] * (1 - S[t]) * U[t] (zero reset) or sum_t G[t+1] * U[t]
        dL/dthreshold = -sum_t grad_spikes[t] * sg'[t] + sum_t G[t+1] * dU[t+1]/dthreshold

    With the reset detached (``ctx.detach_reset``; snnTorch's ``Leaky``, SpikingJelly
    ``detach_reset=True``), S[t] in the reset term is a constant:

        zero:      dU[t+1]/dU[t] = beta * (1 - S[t]),            dU[t+1]/dthreshold = 0
        subtract:  dU[t+1]/dU[t] = beta,                         dU[t+1]/dthreshold = -S[t]

    Without (SpikingJelly ``detach_reset=False``, Liu et al.'s code), the gradient also flows through
    S[t] = Heaviside(U[t] - threshold) in the reset:

        zero:      dU[t+1]/dU[t] = beta * (1 - S[t] - U[t] sg'[t]),  dU[t+1]/dthreshold = beta U[t] sg'[t]
        subtract:  dU[t+1]/dU[t] = beta - threshold sg'[t],  dU[t+1]/dthreshold = threshold sg'[t] - S[t]

    and dU/dU = beta with no reset (non-firing neurons).

    :param mem: ``[T, B, ...]`` U of the forward pass
    :param grad_spikes: ``[T, B, ...]`` or None (spikes unused, or the neurons do not fire)
    :param grad_mem: ``[T, B, ...]`` or None
    :param ctx: the autograd context (reset, input_scale, spike_fn, static, needs_input_grad)
    :param out: ``[T, B, ...]`` buffer for H; each chunk of ``mem`` is read before the same chunk of
        ``out`` is written, so ``out`` may be ``mem`` itself
    :return: the gradients of the current (``out``, or for a static current its sum over the steps,
        ``[1, B, ...]``), beta and threshold (None where not needed)
    """
    steps, scale, reset = mem.shape[0], ctx.input_scale, ctx.reset
    through_reset = reset != RESET_NONE and not ctx.detach_reset
    if _triton_can_run(mem, beta, threshold):
        alpha = _atan_alpha(ctx.spike_fn) if grad_spikes is not None or through_reset else 1.0
        if alpha is not None:
            return _triton_kernels().adjoint(mem, grad_spikes, grad_mem, ctx, beta, threshold, out, alpha)
    surrogate = _surrogate_product(ctx.spike_fn, threshold, scale) if grad_spikes is not None else None
    derivative = _surrogate_derivative(ctx.spike_fn, threshold) if through_reset else None
    chunk = min(steps, max(1, CHUNK_ELEMENTS // max(1, mem[0].numel())))
    # dU[t+1]/dU[t]: with a scalar beta on the CPU and a detached reset, the factor beta goes into the
    # adjoint's kernel as a number, and only 1 - S is computed per step.
    scalar_beta = beta.numel() == 1 and beta.device.type == "cpu" and derivative is None
    beta_value = float(beta) if scalar_beta else None
    keep = mem.new_empty((chunk, *mem.shape[1:])) if reset == RESET_ZERO else None
    through_threshold = None
    carry = torch.zeros_like(mem[0])  # H[t+1]
    summed = torch.zeros_like(mem[0]) if ctx.static else None
    beta_sum = torch.zeros_like(mem[0]) if ctx.needs_input_grad[1] else None
    threshold_sum = torch.zeros_like(mem[0]) if ctx.needs_input_grad[2] else None
    for end in range(steps, 0, -chunk):
        start = max(0, end - chunk)
        u, h = mem[start:end], out[start:end]
        # Everything read from U comes first: h may overwrite it.
        if derivative is not None:
            slope = derivative(u)  # sg'[t]
            if reset == RESET_ZERO:
                factors = torch.le(u, threshold, out=keep[: end - start]).sub_(u * slope).mul_(beta)
                if threshold_sum is not None:
                    through_threshold = slope.mul_(u).mul_(beta)
            else:
                factors = beta - threshold * slope
                if threshold_sum is not None:
                    through_threshold = slope.mul_(threshold)
        elif keep is not None:
            factors = torch.le(u, threshold, out=keep[: end - start])
            if beta_value is None:
                factors.mul_(beta)
        else:
            factors = None if beta_value is not None else beta.expand_as(u)
        if beta_sum is not None:
            through_beta = u * (u <= threshold) if reset == RESET_ZERO else u.clone()
        if threshold_sum is not None and reset == RESET_SUBTRACT:
            reset_spikes = u > threshold
        if grad_spikes is not None:
            surrogate(grad_spikes[start:end], u, h)
            if threshold_sum is not None:
                threshold_sum -= h.sum(0)
            if grad_mem is not None:
                h.add_(grad_mem[start:end], alpha=scale)
        elif grad_mem is not None:
            torch.mul(grad_mem[start:end], scale, out=h)
        else:
            h.zero_()
        for i in range(end - start - 1, -1, -1):
            if beta_sum is not None:
                beta_sum.addcmul_(carry, through_beta[i])
            if threshold_sum is not None and reset == RESET_SUBTRACT:
                threshold_sum.addcmul_(carry, reset_spikes[i], value=-1)
            if through_threshold is not None:
                threshold_sum.addcmul_(carry, through_threshold[i])
            if factors is None:
                carry = h[i].add_(carry, alpha=beta_value)
            elif beta_value is None:
                carry = h[i].addcmul_(carry, factors[i])
            else:
                carry = h[i].addcmul_(carry, factors[i], value=beta_value)
        if summed is not None:
            summed += h[0] if end - start == 1 else h.sum(0)
    # beta_sum and threshold_sum were accumulated from H = input_scale * G.
    grad_beta = None if beta_sum is None else (beta_sum / scale).sum_to_size(beta.shape)
    grad_threshold = None if threshold_sum is None else (threshold_sum / scale).sum_to_size(threshold.shape)
    return (out if summed is None else summed.unsqueeze(0)), grad_beta, grad_threshold


class _LeakyRecurrence(torch.autograd.Function):
    """The membrane recurrence as one autograd node (see ``_integrate`` and ``_adjoint``).

    Returns (spikes, mem). Saved for backward: the membrane U only; spikes and reset masks are
    recomputed from it. U is an output here, so the backward writes dL/dI into a new buffer.
    """

    @staticmethod
    def forward(
        ctx: Any,
        current: torch.Tensor,
        beta: torch.Tensor,
        threshold: torch.Tensor,
        num_steps: int,
        reset: int,
        fire: bool,
        input_scale: float,
        spike_fn: Callable[[torch.Tensor], torch.Tensor],
        detach_reset: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (num_steps, *current.shape[1:])
        mem = WORKSPACE.empty(shape, current)
        spikes = WORKSPACE.empty(shape, current) if fire else current.new_zeros(shape)
        _integrate(current, num_steps, beta, threshold, reset, input_scale, mem, spikes if fire else None)
        _remember(ctx, current, num_steps, reset, input_scale, spike_fn, (mem, beta, threshold), detach_reset)
        ctx.fire = fire
        if not fire:
            ctx.mark_non_differentiable(spikes)
        return spikes, mem

    @staticmethod
    def backward(ctx: Any, grad_spikes: torch.Tensor | None, grad_mem: torch.Tensor | None) -> tuple:
        mem, beta, threshold = ctx.saved_tensors
        grad_spikes = grad_spikes if ctx.fire else None
        grads = _adjoint(
            mem, grad_spikes, grad_mem, ctx, beta, threshold, out=WORKSPACE.empty(mem.shape, mem)
        )
        return (*grads, None, None, None, None, None, None)


class _SpikeRecurrence(torch.autograd.Function):
    """The recurrence of a hidden layer, whose membrane nobody reads: returns the spikes only.

    Saved for backward: U, or with ``recompute`` the static current, from which the backward reruns the
    forward loop. The backward writes dL/dI over U, so it can run only once per forward.
    """

    @staticmethod
    def forward(
        ctx: Any,
        current: torch.Tensor,
        beta: torch.Tensor,
        threshold: torch.Tensor,
        num_steps: int,
        reset: int,
        input_scale: float,
        recompute: bool,
        spike_fn: Callable[[torch.Tensor], torch.Tensor],
        detach_reset: bool,
    ) -> torch.Tensor:
        shape = (num_steps, *current.shape[1:])
        spikes = WORKSPACE.empty(shape, current)
        mem = None if recompute else WORKSPACE.empty(shape, current)
        _integrate(current, num_steps, beta, threshold, reset, input_scale, mem, spikes)
        _remember(
            ctx,
            current,
            num_steps,
            reset,
            input_scale,
            spike_fn,
            (current if mem is None else mem, beta, threshold),
            detach_reset,
        )
        ctx.recompute = recompute
        ctx.done = False
        return spikes

    @staticmethod
    def backward(ctx: Any, grad_spikes: torch.Tensor | None) -> tuple:
        if ctx.done:
            raise RuntimeError(
                "the fused engine's backward reuses the layer's membrane buffer, so it can run only "
                "once per forward pass (retain_graph=True is not supported); run the forward again"
            )
        ctx.done = True
        saved, beta, threshold = ctx.saved_tensors
        mem = saved
        if ctx.recompute:
            mem = WORKSPACE.empty((ctx.num_steps, *saved.shape[1:]), saved)
            _integrate(saved, ctx.num_steps, beta, threshold, ctx.reset, ctx.input_scale, mem, None)
        grads = _adjoint(mem, grad_spikes, None, ctx, beta, threshold, out=mem)
        return (*grads, None, None, None, None, None, None)


def _remember(
    ctx: Any,
    current: torch.Tensor,
    num_steps: int,
    reset: int,
    input_scale: float,
    spike_fn: Callable[[torch.Tensor], torch.Tensor],
    saved: tuple[torch.Tensor, ...],
    detach_reset: bool,
) -> None:
    """Store what both recurrences' backward passes read."""
    ctx.save_for_backward(*saved)
    ctx.num_steps, ctx.reset, ctx.input_scale, ctx.spike_fn = num_steps, reset, input_scale, spike_fn
    ctx.detach_reset = detach_reset
    ctx.static = current.shape[0] != num_steps
    ctx.set_materialize_grads(False)


def _neuron_parameters(
    current: torch.Tensor, leaky: nn.Module, num_steps: int | None
) -> tuple[int, torch.Tensor, torch.Tensor, bool]:
    """T, beta and threshold as ``Leaky`` uses them, and whether the recurrence needs autograd."""
    steps = current.shape[0] if num_steps is None else num_steps
    if current.shape[0] not in (1, steps):
        raise ValueError(f"current has {current.shape[0]} steps; expected 1 (static) or num_steps={steps}")
    beta = leaky.beta.clamp(0, 1).to(current.dtype)
    threshold = leaky.threshold.to(current.dtype)
    needs_grad = torch.is_grad_enabled() and (
        current.requires_grad or beta.requires_grad or threshold.requires_grad
    )
    return steps, beta, threshold, needs_grad


def leaky_sequence(
    current: torch.Tensor,
    leaky: nn.Module,
    fire: bool = True,
    num_steps: int | None = None,
    input_scale: float = 1.0,
    detach_reset: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run an snnTorch ``Leaky`` over a whole current sequence with the fused recurrence.

    :param current: ``[T, B, ...]`` input current; or ``[1, B, ...]`` with ``num_steps`` = T for the
        same current at every step (direct input), which is never expanded to T copies
    :param leaky: the ``snntorch.Leaky`` whose beta, threshold, reset mechanism and surrogate are used
    :param fire: False for non-spiking integrators (spikes returned as zeros, no reset)
    :param num_steps: T; None takes ``current.shape[0]``
    :param input_scale: factor on the current before it enters ``Leaky`` (``Leaky(input_scale * I)``)
    :param detach_reset: cut the gradient through the reset, as ``Leaky`` does (SpikingJelly
        ``detach_reset=True``); False lets it flow through the spike in the reset term (SpikingJelly's
        default, the paper's code); the forward pass is the same (see ``_adjoint``)
    :return: spikes and membrane potentials, ``[T, B, ...]``
    """
    steps, beta, threshold, needs_grad = _neuron_parameters(current, leaky, num_steps)
    reset = int(leaky.reset_mechanism_val) if fire else RESET_NONE
    if needs_grad:
        return _LeakyRecurrence.apply(
            current, beta, threshold, steps, reset, fire, input_scale, leaky.spike_grad, detach_reset
        )
    shape = (steps, *current.shape[1:])
    mem = WORKSPACE.empty(shape, current)
    spikes = WORKSPACE.empty(shape, current) if fire else current.new_zeros(shape)
    _integrate(current, steps, beta, threshold, reset, input_scale, mem, spikes if fire else None)
    return spikes, mem


def spike_sequence(
    current: torch.Tensor,
    leaky: nn.Module,
    num_steps: int | None = None,
    input_scale: float = 1.0,
    recompute: bool = False,
    detach_reset: bool = True,
) -> torch.Tensor:
    """The spikes of ``leaky_sequence`` alone, for hidden layers: faster and lighter.

    Without autograd the membrane is never stored; with it, the membrane buffer is reused for the
    gradient, so the backward can run only once per forward (no ``retain_graph``).

    :param current: ``[T, B, ...]`` input current, or ``[1, B, ...]`` (static) with ``num_steps``
    :param leaky: the ``snntorch.Leaky`` whose beta, threshold, reset mechanism and surrogate are used
    :param num_steps: T; None takes ``current.shape[0]``
    :param input_scale: factor on the current before it enters ``Leaky``
    :param recompute: for a static current, keep it instead of the ``[T, B, ...]`` membrane for the
        backward pass and recompute the membrane there (less memory, one more forward loop); a
        sequence of currents is as large as the membrane, so this changes nothing for one
    :param detach_reset: cut the gradient through the reset (see ``leaky_sequence``)
    :return: spikes ``[T, B, ...]``
    """
    steps, beta, threshold, needs_grad = _neuron_parameters(current, leaky, num_steps)
    reset = int(leaky.reset_mechanism_val)
    if needs_grad:
        recompute = recompute and current.shape[0] != steps
        return _SpikeRecurrence.apply(
            current, beta, threshold, steps, reset, input_scale, recompute, leaky.spike_grad, detach_reset
        )
    spikes = WORKSPACE.empty((steps, *current.shape[1:]), current)
    first = _first_spikes(current, steps, leaky, beta, threshold, input_scale)
    if first is None or not _periodic_spikes(first, steps, spikes):
        _integrate(current, steps, beta, threshold, reset, input_scale, None, spikes)
    return spikes
