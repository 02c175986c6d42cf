"""A thin layer over megatron-core's indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``).

One sequence per document (megatron's ``document_indices`` is ``0..n``), tokens stored as uint16
when the vocabulary fits, else int32. Files are written under temporary names and renamed only when
complete, ``.idx`` last, so a reader never sees a ``.idx`` that describes a partial ``.bin``.
"""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path

import numpy as np

from midtrain.errors import DataError
from midtrain.fileio import fsync_dir

with warnings.catch_warnings():  # megatron.core warns about optional GPU libraries on import
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import (
        _INDEX_HEADER,
        DType,
        IndexedDataset,
        IndexedDatasetBuilder,
    )

# header, version (u64), dtype code (u8), sequence count (u64), document count (u64)
_IDX_PREAMBLE = struct.Struct("<9sQBQQ")


def token_dtype(vocab_size: int) -> type[np.number]:
    """The narrowest on-disk dtype for token ids below ``vocab_size`` (megatron's own rule)."""
    return np.uint16 if vocab_size < 65500 else np.int32


class IndexedWriter:
    """Writes ``PREFIX.bin/.idx``: documents go to temporary files, ``commit()`` renames them.

    ``finish()`` completes the temporary files; ``commit()`` (which finishes first if needed) moves
    them into place; ``abort()`` removes them. Used as a context manager it commits on success and
    aborts on an exception.
    """

    def __init__(
        self, prefix: str | Path, vocab_size: int, tmp_dir: str | Path | None = None
    ) -> None:
        self.prefix = str(prefix)
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        tmp_dir = Path(tmp_dir) if tmp_dir is not None else Path(self.prefix).parent
        tmp_dir.mkdir(parents=True, exist_ok=True)
        stem = tmp_dir / f".{Path(self.prefix).name}.tmp-{os.getpid()}"
        self._tmp_bin, self._tmp_idx = f"{stem}.bin", f"{stem}.idx"
        # The builder writes the .bin file; the index is written here from a numpy buffer (its
        # Python lists cost ~90 MB per million documents).
        self._builder = IndexedDatasetBuilder(self._tmp_bin, dtype=self.dtype)
        self._lengths = _Growing(np.int32)  # the .idx stores sequence lengths as int32
        self._finished = False
        self.documents = 0
        self.tokens = 0

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as one flat token array and the length of each document."""
        n = len(lengths)
        if n == 0:
            return
        if int(lengths.sum()) != tokens.size:
            raise ValueError(
                f"lengths sum to {int(lengths.sum())}, but there are {tokens.size} tokens"
            )
        if tokens.size and int(tokens.max()) >= self.vocab_size:
            raise DataError(
                f"{self.prefix}: token id {int(tokens.max())} is outside the vocabulary "
                f"({self.vocab_size}): the tokenizer's size is wrong"
            )
        # The builder's own add_item converts one tensor per document; one write per batch is
        # much cheaper.
        self._builder.data_file.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._lengths.extend(lengths)
        self.documents += n
        self.tokens += tokens.size

    def add_document(self, tokens: np.ndarray | list[int]) -> None:
        arr = np.asarray(tokens)
        self.add_documents(arr, np.array([arr.size], dtype=np.int64))

    def finish(self) -> None:
        """Complete both temporary files and make them durable."""
        if self._finished:
            return
        if self.documents == 0:
            # numpy cannot mmap an empty file, so megatron could not open an empty dataset: one
            # unused element after the (zero) sequences keeps it readable.
            self._builder.data_file.write(np.zeros(1, dtype=self.dtype).tobytes())
        data_file = self._builder.data_file
        data_file.flush()
        os.fsync(data_file.fileno())
        data_file.close()
        _write_index(self._tmp_idx, self.dtype, self._lengths.values())
        self._finished = True

    def commit(self) -> None:
        """Move the finished files to ``PREFIX.bin`` and ``PREFIX.idx`` (the index last)."""
        self.finish()
        os.replace(self._tmp_bin, f"{self.prefix}.bin")
        os.replace(self._tmp_idx, f"{self.prefix}.idx")
        fsync_dir(Path(self.prefix).parent)

    def abort(self) -> None:
        if not self._builder.data_file.closed:
            self._builder.data_file.close()
        for path in (self._tmp_bin, self._tmp_idx):
            Path(path).unlink(missing_ok=True)

    def __enter__(self) -> IndexedWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class _Growing:
    """An append-only numpy array that doubles its buffer: 4 or 8 bytes per item, not a Python
    int and a list slot."""

    def __init__(self, dtype: type[np.number], capacity: int = 1024) -> None:
        self._data = np.empty(capacity, dtype)
        self._size = 0

    def extend(self, values: np.ndarray) -> None:
        end = self._size + len(values)
        if end > len(self._data):
            grown = np.empty(max(end, 2 * len(self._data)), self._data.dtype)
            grown[: self._size] = self._data[: self._size]
            self._data = grown
        self._data[self._size : end] = values
        self._size = end

    def values(self) -> np.ndarray:
        return self._data[: self._size]


def _write_index(path: str, dtype: type[np.number], lengths: np.ndarray) -> None:
    """megatron-core's ``.idx`` (``_IndexWriter``) byte for byte, for one sequence per document:
    the preamble, the sequence lengths (int32), each sequence's byte offset in the ``.bin``
    (int64) and the document indices ``0..n`` (int64)."""
    n = len(lengths)
    pointers = np.zeros(n, np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= np.dtype(dtype).itemsize
    with open(path, "wb") as f:
        f.write(_IDX_PREAMBLE.pack(_INDEX_HEADER, 1, DType.code_from_dtype(dtype), n, n + 1))
        f.write(lengths.astype(np.int32, copy=False).tobytes())
        f.write(pointers.tobytes())
        f.write(np.arange(n + 1, dtype=np.int64).tobytes())
        f.flush()
        os.fsync(f.fileno())


def write_indexed(prefix: str | Path, documents: list[list[int]], vocab_size: int) -> None:
    """Write a small indexed dataset in one call (tests, tools)."""
    with IndexedWriter(prefix, vocab_size) as writer:
        for doc in documents:
            writer.add_document(doc)


def open_indexed(prefix: str | Path) -> IndexedDataset:
    """Open ``PREFIX.bin/.idx`` with megatron-core, after checking that both files are whole."""
    prefix = str(prefix)
    idx_path, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for path in (bin_path, idx_path):
        if not path.is_file():
            raise DataError(
                f"{path}: no such file (prepare the corpus with `midtrain data prepare`)"
            )
    expected = _check_index(idx_path)
    actual = bin_path.stat().st_size
    if actual != expected:
        raise DataError(
            f"{bin_path}: {actual:,} bytes, but its index describes {expected:,} "
            "(truncated or mixed-up files: prepare it again)"
        )
    try:
        return IndexedDataset(prefix)
    except (AssertionError, OSError, ValueError) as exc:
        raise DataError(f"{idx_path}: not a readable indexed dataset ({exc})") from None


def _check_index(idx_path: Path) -> int:
    """Check the ``.idx`` header and size before megatron-core reads it (it asserts, and then
    fails again in ``__del__``). Returns the size its ``.bin`` must have."""
    size = idx_path.stat().st_size
    with open(idx_path, "rb") as f:
        head = f.read(_IDX_PREAMBLE.size)
        if len(head) < _IDX_PREAMBLE.size:
            raise DataError(f"{idx_path}: truncated index ({size} bytes)")
        header, version, code, sequences, documents = _IDX_PREAMBLE.unpack(head)
        if header != _INDEX_HEADER or version != 1:
            raise DataError(f"{idx_path}: not a megatron-core indexed dataset index (bad header)")
        try:
            itemsize = DType.size(code)
        except ValueError:
            raise DataError(f"{idx_path}: unknown token dtype code {code}") from None
        expected = _IDX_PREAMBLE.size + 12 * sequences + 8 * documents
        # a multimodal index also holds one mode byte per sequence
        if size not in (expected, expected + sequences):
            raise DataError(
                f"{idx_path}: {size:,} bytes, but its header describes {expected:,} "
                "(truncated or corrupt index: prepare it again)"
            )
        if not sequences:
            return itemsize  # the padding element of an empty dataset (see IndexedWriter.finish)
        # The last sequence's length (int32, after the preamble) and byte offset (int64, after
        # the lengths): where the data ends.
        f.seek(_IDX_PREAMBLE.size + 4 * (sequences - 1))
        (last_length,) = struct.unpack("<i", f.read(4))
        f.seek(_IDX_PREAMBLE.size + 4 * sequences + 8 * (sequences - 1))
        (last_pointer,) = struct.unpack("<q", f.read(8))
    return last_pointer + last_length * itemsize
