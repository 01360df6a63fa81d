"""Decoded tensors still held as byte planes (see :class:`PlanarTensor`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from mlflow_ckpt.codec.planes import merge as merge_planes


class PlanarTensor:
    """A decoded tensor still held as byte planes: interleaved where it is finally needed.

    Why: restoring a module copies each of its tensors into a parameter that already
    exists. Interleaving a compressed tensor into new memory first costs a page fault per 4
    KiB of it (2.4-2.7 us each on the VMs here) and then a second copy; interleaving its
    planes straight into the parameter costs neither. Every zstd frame has been decoded,
    its checksum checked, when the file is read, so the planes are known good before any
    live tensor is touched: restoring stays all-or-nothing. Stored (raw) planes are views
    of the verified file buffer, so only the decoded planes take new memory (the exponent
    planes: a quarter of an fp32 tensor)."""

    def __init__(self, dtype: torch.dtype, shape: Sequence[int], blocks: list[list[Any]]) -> None:
        self.dtype = dtype
        self.shape = torch.Size(shape)
        self._blocks: list[list[np.ndarray]] = blocks
        self._tensor: torch.Tensor | None = None

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return self.dtype.itemsize

    def fits(self, dest: torch.Tensor) -> bool:
        """Whether ``dest`` is plain CPU memory of this dtype and shape, written in order
        (not an inference tensor: those refuse writes from outside ``inference_mode``)."""
        return (
            type(dest) in (torch.Tensor, torch.nn.Parameter)
            and dest.device.type == "cpu"
            and dest.layout == torch.strided
            and (dest.dtype, dest.shape) == (self.dtype, self.shape)
            and dest.is_contiguous()
            and not (dest.is_conj() or dest.is_neg() or dest.is_inference())
        )

    def write_into(self, dest: torch.Tensor) -> None:
        """Interleave the planes into ``dest`` (see :meth:`fits`), as ``dest.copy_`` would:
        its version counter moves, so autograd and incremental saves see the write."""
        if not self.fits(dest):
            raise ValueError(f"cannot interleave a {self.dtype}{list(self.shape)} tensor here")
        flat = _bytes_of(dest)
        for planes, start, stop in self._spans():
            merge_planes(planes, flat[start:stop])
        torch.autograd.graph.increment_version(dest)

    def materialize(self) -> torch.Tensor:
        """The tensor in new memory (once: every later call returns the same tensor)."""
        if self._tensor is None:
            tensor = torch.empty(self.shape, dtype=self.dtype)
            self.write_into(tensor)
            self._tensor = tensor
        return self._tensor

    def equals(self, other: torch.Tensor) -> bool:
        """Whether ``other`` (a CPU tensor) holds exactly these bytes, compared block by
        block through one block of scratch memory, not a whole new tensor."""
        if not self.fits(other):
            return False
        flat = _bytes_of(other)
        scratch = np.empty(
            max((stop - start for _, start, stop in self._spans()), default=0), np.uint8
        )
        for planes, start, stop in self._spans():
            block = scratch[: stop - start]
            merge_planes(planes, block)
            if not np.array_equal(block, flat[start:stop]):
                return False
        return True

    def _spans(self) -> Iterator[tuple[list[np.ndarray], int, int]]:
        """Each block's planes with the byte range of the tensor they interleave into."""
        start = 0
        for planes in self._blocks:
            stop = start + sum(plane.size for plane in planes)
            yield planes, start, stop
            start = stop


def _bytes_of(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().reshape(-1).view(torch.uint8).numpy()
