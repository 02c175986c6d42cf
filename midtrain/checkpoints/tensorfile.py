"""Writing files into a checkpoint: safetensors streamed straight from tensor memory, hashed on a
second thread while they are written (one pass over the bytes), fsynced; HF-layout model weights.

We write safetensors ourselves rather than with ``safetensors.torch.save_file`` so that the sha256
the manifest needs costs no second read of the file and no in-memory copy of the whole file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch

from midtrain.checkpoints.layout import MODEL_FILE, MODEL_INDEX, model_shard_name
from midtrain.checkpoints.manifest import FileEntry
from midtrain.errors import CheckpointError, checkpoint_write_error

ProgressFn = Callable[[int], None]
"""Called with the number of bytes just written (for progress bars and tests)."""

_CHUNK = 64 << 20
_MAX_PENDING_HASHES = 4
_WRITE_BEHIND_BYTES = 8 << 20
_FADVISE = hasattr(os, "posix_fadvise")

# safetensors dtype names (the format's spec).
_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


class HashingFile:
    """A new file written in order while its sha256 is computed on a second thread; fsynced on
    close. Buffers passed to ``write`` must stay unchanged until ``close`` returns."""

    def __init__(self, path: Path, progress: ProgressFn | None = None) -> None:
        self.path = path
        self._progress = progress
        self._hash = hashlib.sha256()
        self._size = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="midtrain-sha256")
        self._pending: deque[Future[None]] = deque()
        try:
            self._file = open(path, "xb")  # noqa: SIM115 - closed in close()/__exit__
        except OSError as exc:
            self._pool.shutdown()
            raise checkpoint_write_error(path, exc) from None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        # Single worker: updates run in submission order. Bound the queue so copied-in chunks
        # (file copies) do not pile up in memory when hashing is slower than the disk.
        self._pending.append(self._pool.submit(self._hash.update, data))
        while len(self._pending) > _MAX_PENDING_HASHES:
            self._pending.popleft().result()
        n = memoryview(data).nbytes
        try:
            self._file.write(data)
            if n >= _WRITE_BEHIND_BYTES and _FADVISE:
                # Start writing these pages to disk now, while the next chunk is hashed, instead
                # of all of them at the final fsync (Linux: DONTNEED starts writeback of dirty pages).
                self._file.flush()
                os.posix_fadvise(self._file.fileno(), self._size, n, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            raise checkpoint_write_error(self.path, exc) from None
        self._size += n
        if self._progress is not None:
            self._progress(n)

    def close(self) -> FileEntry:
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            raise checkpoint_write_error(self.path, exc) from None
        finally:
            self._abort()
        return FileEntry(sha256=self._hash.hexdigest(), size=self._size)

    def _abort(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        while self._pending:
            self._pending.popleft().result()
        self._pool.shutdown()

    def __enter__(self) -> HashingFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._abort()


def byte_array(t: torch.Tensor) -> np.ndarray:
    """The raw bytes of a tensor (little-endian, C order) as a uint8 array; shares the tensor's
    memory when it is a contiguous CPU tensor (any dtype, bfloat16 included)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(byte_array(t))


def write_bytes(path: Path, data: bytes, progress: ProgressFn | None = None) -> FileEntry:
    with HashingFile(path, progress) as f:
        f.write(data)
        return f.close()


def write_json(path: Path, obj: Any) -> FileEntry:
    return write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def copy_file(src: Path, dst: Path, progress: ProgressFn | None = None) -> FileEntry:
    try:
        with open(src, "rb") as fin, HashingFile(dst, progress) as fout:
            while chunk := fin.read(_CHUNK // 8):
                fout.write(chunk)
            return fout.close()
    except FileNotFoundError:
        raise CheckpointError(f"{src}: no such file") from None


def write_safetensors(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    progress: ProgressFn | None = None,
) -> FileEntry:
    """Write ``tensors`` as one safetensors file (the layout ``safetensors.safe_open`` reads)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(
                f"{path}: tensor {name!r} has dtype {t.dtype}, which safetensors lacks"
            )
        n = t.numel() * t.element_size()
        header[name] = {
            "dtype": _DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as the reference writer does
    with HashingFile(path, progress) as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for t in tensors.values():
            data = tensor_bytes(t)
            for start in range(0, data.nbytes, _CHUNK):
                f.write(data[start : start + _CHUNK])
        return f.close()


def split_shards(
    state: Mapping[str, torch.Tensor], max_shard_bytes: int
) -> list[dict[str, torch.Tensor]]:
    """Split a state dict, in order, into shards of at most ``max_shard_bytes`` (a larger tensor gets
    a shard of its own), as Hugging Face's ``save_pretrained`` does."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def write_model_weights(
    ckpt_dir: Path,
    shards: Sequence[Callable[[], Mapping[str, torch.Tensor]]],
    progress: ProgressFn | None = None,
) -> dict[str, FileEntry]:
    """Write model weights in Hugging Face layout: ``model.safetensors`` for one shard, else
    ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``. Each shard is produced
    by its loader only when written, so an import holds one shard in memory at a time."""
    records: dict[str, FileEntry] = {}
    weight_map: dict[str, str] = {}
    total = 0
    for i, load in enumerate(shards):
        name = MODEL_FILE if len(shards) == 1 else model_shard_name(i, len(shards))
        tensors = load()
        records[name] = write_safetensors(ckpt_dir / name, tensors, {"format": "pt"}, progress)
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        records[MODEL_INDEX] = write_json(ckpt_dir / MODEL_INDEX, index)
    return records


def model_weight_files(ckpt_dir: Path, listed: Mapping[str, Any]) -> dict[str, list[str]]:
    """Weight file -> tensor names it holds, from the index (sharded) or the single file."""
    if MODEL_INDEX in listed:
        index = read_json(ckpt_dir / MODEL_INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{ckpt_dir / MODEL_INDEX}: no weight_map object")
        files: dict[str, list[str]] = {}
        for key, name in weight_map.items():
            if name not in listed or not str(name).endswith(".safetensors"):
                raise CheckpointError(
                    f"{ckpt_dir / MODEL_INDEX}: {key!r} maps to {name!r}, not a listed weight file"
                )
            files.setdefault(name, []).append(key)
        return files
    if MODEL_FILE in listed:
        return {MODEL_FILE: []}
    raise CheckpointError(f"{ckpt_dir}: no {MODEL_FILE} or {MODEL_INDEX} in the manifest")


def read_safetensors(path: Path, keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Read all tensors of a safetensors file, or only ``keys`` (memory-friendly)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            available = set(f.keys())
            wanted = list(f.keys()) if keys is None else list(keys)
            missing = [k for k in wanted if k not in available]
            if missing:
                raise CheckpointError(f"{path}: lacks tensors {_few(missing)}")
            return {k: f.get_tensor(k) for k in wanted}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names a safetensors file holds (its header only)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


class LazyTensors(Mapping[str, torch.Tensor]):
    """Tensors by name over safetensors files, each read from its file when it is looked up (and
    not kept): a rank that needs one pipeline stage's part of a model, one tensor at a time, holds
    that part, not the model. ``aliases`` name a stored tensor under a second name (a tied
    ``lm_head.weight``)."""

    def __init__(self, files: Mapping[str, Path], aliases: Mapping[str, str] | None = None) -> None:
        self.files = dict(files)  # tensor name -> the file holding it
        self.aliases = {
            k: v for k, v in (aliases or {}).items() if v in self.files and k not in self.files
        }

    @classmethod
    def over(cls, paths: Sequence[Path], aliases: Mapping[str, str] | None = None) -> LazyTensors:
        """The tensors of ``paths``; a name in two files is an error naming both."""
        files: dict[str, Path] = {}
        for path in paths:
            for key in safetensors_keys(path):
                if key in files:
                    raise CheckpointError(f"{path}: tensor {key!r} is also in {files[key]}")
                files[key] = path
        return cls(files, aliases)

    def __getitem__(self, name: str) -> torch.Tensor:
        stored = self.aliases.get(name, name)
        if stored not in self.files:
            raise KeyError(name)
        return read_safetensors(self.files[stored], [stored])[stored]

    def __contains__(self, name: object) -> bool:
        return name in self.files or name in self.aliases

    def __iter__(self) -> Iterator[str]:
        yield from self.files
        yield from self.aliases

    def __len__(self) -> int:
        return len(self.files) + len(self.aliases)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from None


def _few(names: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")
