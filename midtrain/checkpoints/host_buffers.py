"""Host memory that a checkpoint's tensors are copied into, kept from one save to the next.

An asynchronous save blocks training only while the state is copied out of the training
tensors; the write happens in the background. Copying into memory that is already mapped is
several times faster than into fresh allocations (every new page faults on first touch), and
from a GPU into pinned memory several times faster again, without one sync per tensor. So the
buffers are allocated once, at the first save, and reused: the price is one host copy of this
rank's share of the state, held for the whole run.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from midtrain.checkpoints.tensorfile import byte_array

# (name, tensor) -> a host copy of it that stays valid until the save it is for has finished.
HostCopy = Callable[[str, torch.Tensor], torch.Tensor]


class HostBuffers:
    """Named CPU buffers (page-locked when the source is on a GPU), refilled by every save.

    One save: ``copy`` each tensor under a name, then ``finish``. The caller must not start the
    next save's copies before the previous save has finished reading the buffers
    (``CheckpointSaver.host_buffers`` waits for it).
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._locked: dict[str, weakref.finalize] = {}  # page-locked for the GPU: unlocks
        self._used: set[str] = set()
        self._device_copies = False

    def copy(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of ``tensor`` in the buffer kept for ``name``. Copies from a GPU are
        asynchronous: the result is valid once ``finish`` has returned."""
        if name in self._used:
            raise ValueError(f"{name}: copied twice into the same save's buffers")
        buf = self._buffers.get(name)
        if buf is None or buf.shape != tensor.shape or buf.dtype != tensor.dtype:
            buf = self._allocate(name, tensor)
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
            self._free(name)
        self._used.clear()
        self._device_copies = False

    @property
    def nbytes(self) -> int:
        return sum(_size(b) for b in self._buffers.values())

    def clear(self) -> None:
        self._used.clear()
        self.finish()  # with no buffer in use, every one is freed

    def _allocate(self, name: str, like: torch.Tensor) -> torch.Tensor:
        self._free(name)
        buf = torch.empty(like.shape, dtype=like.dtype)
        if like.is_cuda and buf.numel():
            # Page-locked in place (cudaHostRegister), not from torch's pinned-memory cache: that
            # rounds each block up to a power of two and keeps freed blocks for itself.
            _check_cuda(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), _size(buf), 0))
            # Unlocked when freed here, or when the tensor dies if this object is dropped
            # without clear(): locked pages left behind would make a later register fail.
            unlock = weakref.finalize(buf, _unlock, buf.data_ptr())
            unlock.atexit = False  # the process's exit frees its locked pages anyway
            self._locked[name] = unlock
        self._buffers[name] = buf
        return buf

    def _free(self, name: str) -> None:
        self._buffers.pop(name, None)
        unlock = self._locked.pop(name, None)
        if unlock is not None:
            unlock()  # runs once: the finalizer is spent


def _unlock(data_ptr: int) -> None:
    _check_cuda(torch.cuda.cudart().cudaHostUnregister(data_ptr))


def _size(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _check_cuda(status: Any) -> None:  # a cudaError enum from torch.cuda.cudart()
    code = int(status)
    if code != 0:
        raise RuntimeError(f"page-locking checkpoint buffers failed: CUDA error {code}")
