"""Host memory reused from one async snapshot to the next.

What an async save makes training wait for is the host copy of the state. Copying into
freshly allocated memory costs about three times a plain memcpy here (measured on this
machine: 0.147 s vs 0.048 s for 600 MB): the kernel has to fault in and zero every new
page. So the buffers of one snapshot are handed to the next one, tensor for tensor (by
shape and dtype; pinned when the source lives on a GPU, so the copy is a DMA), and only
buffers no longer needed are dropped.

The manager calls :meth:`HostBuffers.recycle` only when no save is in flight, so a buffer
is never written while a background save still reads it. Between saves the pool keeps one
host copy of the state: the price of the shorter stall (DCP's cached staging does the same).
"""

from __future__ import annotations

import threading

import torch

_Key = tuple[tuple[int, ...], torch.dtype, bool]


class HostBuffers:
    """Buffers of the previous snapshot, handed out again to the next one."""

    def __init__(self) -> None:
        self._free: dict[_Key, list[torch.Tensor]] = {}
        self._used: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def recycle(self) -> None:
        """The previous snapshot is written: its buffers may be reused (the others, left over
        from an older one whose shapes changed since, are dropped)."""
        with self._lock:
            free: dict[_Key, list[torch.Tensor]] = {}
            for buffer in self._used:
                free.setdefault(_key(buffer), []).append(buffer)
            self._free, self._used = free, []

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, pinned: bool) -> torch.Tensor:
        """A host tensor of ``shape``/``dtype`` (contents undefined), reused when possible."""
        with self._lock:
            stack = self._free.get((tuple(shape), dtype, pinned))
            buffer = stack.pop() if stack else None
        if buffer is None:
            buffer = torch.empty(tuple(shape), dtype=dtype, pin_memory=pinned)
        with self._lock:
            self._used.append(buffer)
        return buffer

    def clear(self) -> None:
        """Drop every buffer (the manager is done)."""
        with self._lock:
            self._free, self._used = {}, []

    @property
    def nbytes(self) -> int:
        with self._lock:
            buffers = [*self._used, *(b for stack in self._free.values() for b in stack)]
        return sum(b.numel() * b.element_size() for b in buffers)


def _key(buffer: torch.Tensor) -> _Key:
    return tuple(buffer.shape), buffer.dtype, buffer.is_pinned()
