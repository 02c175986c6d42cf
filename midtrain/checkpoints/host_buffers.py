"""Host memory that a checkpoint's tensors are copied into, kept from one save to the next.

An asynchronous save blocks training only while the state is copied out of the training
tensors; the write happens in the background. Copying into memory that is already mapped is
several times faster than into fresh allocations (every new page faults on first touch), and
from a GPU into pinned memory several times faster again, without one sync per tensor. So the
buffers are allocated once, at the first save, and reused: the price is one host copy of this
rank's share of the state, held for the whole run.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from midtrain.checkpoints.tensorfile import byte_array

# (name, tensor) -> a host copy of it that stays valid until the save it is for has finished.
HostCopy = Callable[[str, torch.Tensor], torch.Tensor]


class HostBuffers:
    """Named CPU buffers (pinned when the source is on a GPU), refilled by every save.

    One save: ``copy`` each tensor under a name, then ``finish``. The caller must not start the
    next save's copies before the previous save has finished reading the buffers
    (``CheckpointSaver.host_buffers`` waits for it).
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._used: set[str] = set()
        self._device_copies = False

    def copy(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of ``tensor`` in the buffer kept for ``name``. Copies from a GPU are
        asynchronous: the result is valid once ``finish`` has returned."""
        if name in self._used:
            raise ValueError(f"{name}: copied twice into the same save's buffers")
        buf = self._buffers.get(name)
        if buf is None or buf.shape != tensor.shape or buf.dtype != tensor.dtype:
            buf = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
            self._buffers[name] = buf
        if tensor.device.type == "cpu" and tensor.is_contiguous():
            # A plain memcpy on this thread: torch's multi-threaded copy stalls badly when other
            # processes compete for the cores, and blocks training for longer.
            np.copyto(byte_array(buf), byte_array(tensor))
        else:
            buf.copy_(tensor.detach(), non_blocking=tensor.is_cuda)
            self._device_copies |= tensor.is_cuda
        self._used.add(name)
        return buf

    def finish(self) -> None:
        """Wait for the copies from the GPU, and free the buffers this save did not use."""
        if self._device_copies:
            torch.cuda.synchronize()
        for name in set(self._buffers) - self._used:
            del self._buffers[name]
        self._used.clear()
        self._device_copies = False

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        self._buffers.clear()
        self._used.clear()
        self._device_copies = False
