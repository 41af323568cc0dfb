"""A pool of large CPU buffers that a network reuses from one training step to the next."""

from __future__ import annotations

import math
import threading

import torch


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

    def __deepcopy__(self, memo: dict) -> Workspace:
        # A copied network (SB3 copies policies) gets a workspace of its own, empty.
        return Workspace(self.min_bytes, self.keep_for)

    def __reduce__(self) -> tuple:
        return Workspace, (self.min_bytes, self.keep_for)
