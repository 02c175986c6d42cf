"""``midtrain data prepare``: raw corpora -> a tokenized megatron-core indexed dataset.

Writes ``PREFIX.bin/.idx`` (the training split), ``PREFIX.holdout.bin/.idx`` (documents held out
for evaluation, when ``holdout_fraction > 0``) and ``PREFIX.stats.json``, which is written last: a
prefix is complete exactly when its stats file exists.

Pipeline: the main process streams raw records (``readers.read_raw``) and writes tokens; parsing,
hashing and tokenizing batches of records run in ``num_proc`` worker processes, whose results come
back in order, as numpy arrays (with ``num_proc`` 1, in the main process, where the tokenizer
still uses its own threads). Everything is written to a work directory beside the output and moved
into place only when complete, so a failed or killed run leaves the previous output as it was.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from midtrain import console
from midtrain.config_io import AbsPath, Bool, Float, Int, StrictModel
from midtrain.data_mixing.indexed import IndexedWriter, token_dtype
from midtrain.data_mixing.readers import (
    Inputs,
    RawBatch,
    Rejections,
    Source,
    describe,
    expand_inputs,
    fingerprint_paths,
    make_dir,
    nothing_left,
    parse_batch,
    read_raw,
)
from midtrain.data_mixing.stats import STATS_FORMAT, holdout_prefix, stats_path, write_stats
from midtrain.data_mixing.tokenizer import eod_id, load_tokenizer, tokenizer_fingerprint
from midtrain.errors import DataError
from midtrain.fileio import fsync_dir, sha256_file


class PrepareConfig(StrictModel):
    """What ``midtrain data prepare`` does; ``output`` is the PREFIX of the files it writes."""

    inputs: list[str] = Field(min_length=1, description="files, directories or globs")
    tokenizer: AbsPath = Field(description="a local HF tokenizer directory")
    output: AbsPath = Field(description="PREFIX: writes PREFIX.bin/.idx/.stats.json")
    text_field: str = Field(default="text", min_length=1, description="jsonl/parquet text field")
    num_proc: Int | None = Field(
        default=None,
        ge=1,
        description="tokenizer worker processes; 1: in this process, with the tokenizer's own "
        "threads; default: one per CPU, or 1 on machines with 2 CPUs or fewer",
    )
    holdout_fraction: Float = Field(default=0.0, ge=0.0, lt=1.0)
    strict: Bool = Field(default=False, description="fail on the first malformed record")
    paragraphs: Bool = Field(default=False, description="one document per .txt paragraph")
    batch_size: Int = Field(default=1000, ge=1, description="records per tokenizer call")


# --- the holdout split --------------------------------------------------------------------------


def holdout_score(text: str) -> float:
    """A uniform number in [0, 1) that depends only on the text: held out iff below the fraction.

    So a document stays on its side when data is added, and duplicates never straddle the split.
    """
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


# --- encoding (runs in worker processes) --------------------------------------------------------


@dataclass(frozen=True)
class EncodeSpec:
    tokenizer: str
    eod: int
    dtype: str
    text_field: str
    holdout_fraction: float


@dataclass
class Encoded:
    """One batch: token arrays (eod included) and document lengths for each split."""

    train_tokens: np.ndarray
    train_lengths: np.ndarray
    holdout_tokens: np.ndarray
    holdout_lengths: np.ndarray
    rejects: list[tuple[str, int]]  # (reason, line)

    @property
    def documents(self) -> int:
        return len(self.train_lengths) + len(self.holdout_lengths)


class Encoder:
    """Parse a raw batch, tokenize its texts in one call, split them into train and holdout."""

    def __init__(self, spec: EncodeSpec, tokenizer: Any | None = None) -> None:
        self.spec = spec
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec.tokenizer)
        # Documents are longer than any model's context; that is fine here, no need to warn.
        self.tokenizer.model_max_length = int(1e30)
        self.dtype = np.dtype(spec.dtype)

    def __call__(self, raw: RawBatch) -> Encoded:
        parsed = parse_batch(raw, self.spec.text_field)
        tokens, lengths = self._encode(parsed.texts)
        held = self._held_out(parsed.texts)
        if not held.any():
            no_tokens, no_lengths = np.empty(0, self.dtype), np.empty(0, np.int64)
            return Encoded(tokens, lengths, no_tokens, no_lengths, parsed.rejects)
        token_held = np.repeat(held, lengths)
        return Encoded(
            tokens[~token_held], lengths[~held], tokens[token_held], lengths[held], parsed.rejects
        )

    def _encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All documents' ids + eod as one flat array, and each document's length."""
        if not texts:
            return np.empty(0, self.dtype), np.empty(0, np.int64)
        ids: list[list[int]] = self.tokenizer(
            texts,
            add_special_tokens=False,
            # a special token's text in a document ("<|endoftext|>" quoted in a forum post) is
            # text: as a special id it would end the document early
            split_special_tokens=True,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]
        for doc in ids:
            doc.append(self.spec.eod)
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        # one pass over all ids, in C: much cheaper than a numpy array per document
        tokens = np.fromiter(itertools.chain.from_iterable(ids), self.dtype, int(lengths.sum()))
        return tokens, lengths

    def _held_out(self, texts: list[str]) -> np.ndarray:
        fraction = self.spec.holdout_fraction
        if fraction <= 0:
            return np.zeros(len(texts), bool)
        return np.fromiter((holdout_score(t) < fraction for t in texts), bool, len(texts))


_worker_encoder: Encoder | None = None


def _init_worker(spec: EncodeSpec, parent: int) -> None:
    global _worker_encoder
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    # One process per core already: the tokenizer's own threads would only compete.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_encoder = Encoder(spec)


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """On Linux, have the kernel kill this worker when the main process ends (strictly: the
    thread that forked it, which runs prepare_corpus while the pool lives). A main process killed
    (SIGTERM from Slurm, the OOM killer) runs no cleanup, and its workers, which hold the task
    queue's pipe open themselves, would otherwise wait for work forever."""
    if sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it ended before the line above
        os._exit(1)


def _encode_in_worker(raw: RawBatch) -> Encoded:
    assert _worker_encoder is not None
    return _worker_encoder(raw)


# --- the pipeline -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _EndOfSource:
    """Marks, in the ordered stream of batches, that a source has no more."""


Item = RawBatch | _EndOfSource


def _work_items(sources: list[Source], cfg: PrepareConfig, num_proc: int) -> Iterator[Item]:
    # In this process, big batches keep the tokenizer's threads busy; across processes, smaller
    # ones spread long documents evenly over the workers.
    max_chars = 8 << 20 if num_proc == 1 else 1 << 20
    for source in sources:
        yield from read_raw(source, cfg.text_field, cfg.paragraphs, cfg.batch_size, max_chars)
        yield _EndOfSource()


class _Pool:
    """Encodes batches in ``num_proc`` worker processes (in this process if 1), in input order."""

    def __init__(self, num_proc: int, spec: EncodeSpec, tokenizer: Any) -> None:
        self.window = 2 * num_proc + 2  # batches in flight: keeps workers busy, memory bounded
        self.executor: ProcessPoolExecutor | None = None
        self.encoder: Encoder | None = None
        if num_proc == 1:
            self.encoder = Encoder(spec, tokenizer)
            return
        # fork (what datasets' own map uses) starts workers at once; spawn where there is no fork
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        self.executor = ProcessPoolExecutor(
            num_proc, multiprocessing.get_context(method), _init_worker, (spec, os.getpid())
        )
        # Start the workers now, before the progress bar starts a thread in this process.
        self.executor.submit(os.getpid).result()

    def map(self, items: Iterator[Item]) -> Iterator[tuple[Item, Encoded | None]]:
        if self.encoder is not None:
            for item in items:
                yield item, self.encoder(item) if isinstance(item, RawBatch) else None
            return
        pending: deque[tuple[Item, Future[Encoded] | None]] = deque()
        for item in items:
            pending.append((item, self._submit(item, pending)))
            while pending and (pending[0][1] is None or len(pending) > self.window):
                yield self._pop(pending)
        while pending:
            yield self._pop(pending)

    def _submit(
        self, item: Item, pending: deque[tuple[Item, Future[Encoded] | None]]
    ) -> Future[Encoded] | None:
        if not isinstance(item, RawBatch):
            return None
        assert self.executor is not None
        try:
            return self.executor.submit(_encode_in_worker, item)
        except BrokenProcessPool:  # a worker died on a batch in flight: name the oldest
            raise _worker_died(next((i for i, f in pending if f is not None), item)) from None

    @staticmethod
    def _pop(
        pending: deque[tuple[Item, Future[Encoded] | None]],
    ) -> tuple[Item, Encoded | None]:
        item, future = pending.popleft()
        if future is None:
            return item, None
        try:
            return item, future.result()
        except BrokenProcessPool:
            raise _worker_died(item) from None

    def __enter__(self) -> _Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)


def _worker_died(batch: Item) -> DataError:
    assert isinstance(batch, RawBatch)
    unit = "rows" if batch.kind == "columnar" else "lines"
    return DataError(
        f"{batch.where}: a tokenizer worker process died (killed for lack of memory?) "
        f"while {unit} {batch.lines[0]}-{batch.lines[-1]} were being tokenized; "
        "try fewer worker processes (--num-proc 1)"
    )


def default_num_proc() -> int:
    """One worker per CPU. On 2 CPUs or fewer, none: the tokenizer's own threads use them as
    well, without the cost of moving texts and tokens between processes."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return 1 if cpus <= 2 else cpus


# --- the command --------------------------------------------------------------------------------


def prepare_corpus(cfg: PrepareConfig) -> dict[str, Any]:
    """Tokenize ``cfg.inputs`` into ``cfg.output``; print progress and a summary; return the stats.

    Every input is checked before anything is written. Malformed records are counted per reason
    (or, with ``strict``, the first one is a DataError naming its file and line).
    """
    started = time.perf_counter()
    rejections = Rejections(strict=cfg.strict, text_field=cfg.text_field)
    found = expand_inputs(cfg.inputs, rejections)
    sources = found.sources
    tokenizer = load_tokenizer(cfg.tokenizer)
    eod = eod_id(tokenizer)
    vocab_size = len(tokenizer)
    dtype = np.dtype(token_dtype(vocab_size))
    if found.skipped:
        console.console.print(found.skipped_note(), markup=False)
    input_hashes = _hash_inputs(sources)

    prefix = Path(cfg.output)
    make_dir(prefix.parent, prefix)
    _remove_stale_work_dirs(prefix)
    work = prefix.parent / f"{_work_dir_stem(prefix)}{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    make_dir(work, prefix)
    spec = EncodeSpec(cfg.tokenizer, eod, dtype.name, cfg.text_field, cfg.holdout_fraction)
    per_source = [0] * len(sources)
    train = IndexedWriter(prefix, vocab_size, tmp_dir=work)
    holdout = IndexedWriter(holdout_prefix(prefix), vocab_size, tmp_dir=work)
    try:
        num_proc = cfg.num_proc or default_num_proc()
        with _Pool(num_proc, spec, tokenizer) as pool:
            encoded = pool.map(_work_items(sources, cfg, num_proc))
            _consume(encoded, sources, train, holdout, rejections, per_source)
        if train.documents + holdout.documents == 0:
            raise DataError(nothing_left(cfg.inputs, rejections))
        if train.documents == 0:
            raise DataError(
                f"all {holdout.documents:,} documents fell in the held-out split: "
                "lower the holdout fraction"
            )
        stats = {
            "documents": train.documents,
            "tokens": train.tokens,
            "holdout_documents": holdout.documents,
            "holdout_tokens": holdout.tokens,
            "rejected": dict(sorted(rejections.counts.items())),
            "rejected_examples": dict(sorted(rejections.examples.items())),
            "tokenizer": {
                "path": cfg.tokenizer,
                "fingerprint": tokenizer_fingerprint(cfg.tokenizer),
                "vocab_size": vocab_size,
                "eod_id": eod,
            },
            "inputs": [
                {"path": s.path, "sha256": h, "documents": n}
                for s, h, n in zip(sources, input_hashes, per_source, strict=True)
            ],
            "skipped_files": found.skipped_stats(),
            "dtype": dtype.name,
            "text_field": cfg.text_field,
            "paragraphs": cfg.paragraphs,
            "holdout_fraction": cfg.holdout_fraction,
        }
        _commit(prefix, train, holdout if cfg.holdout_fraction > 0 else None, stats)
    finally:
        for writer in (train, holdout):
            writer.abort()  # closes its files; once committed, there is nothing left to remove
        shutil.rmtree(work, ignore_errors=True)
    _print_summary(prefix, stats, rejections, found, time.perf_counter() - started)
    return {"format": STATS_FORMAT, **stats}


def _consume(
    encoded: Iterator[tuple[Item, Encoded | None]],
    sources: list[Source],
    train: IndexedWriter,
    holdout: IndexedWriter,
    rejections: Rejections,
    per_source: list[int],
) -> None:
    """Write encoded batches in order, account for their rejections, and show progress."""
    current = 0  # batches come source by source, each source closed by an _EndOfSource
    seen = 0  # documents + rejected records of the current source
    started = time.perf_counter()
    lines = console.ProgressLines()
    with console.make_progress() as progress:
        task = progress.add_task("tokenizing", total=len(sources), extra="")
        for item, batch in encoded:
            if isinstance(item, _EndOfSource):
                if seen == 0:
                    rejections.add("empty_file", sources[current].path)
                current, seen = current + 1, 0
                progress.advance(task)
                continue
            assert batch is not None
            for reason, line in batch.rejects:
                rejections.add(reason, f"{item.where}:{line}")
            train.add_documents(batch.train_tokens, batch.train_lengths)
            holdout.add_documents(batch.holdout_tokens, batch.holdout_lengths)
            per_source[current] += batch.documents
            seen += batch.documents + len(batch.rejects)
            tokens = train.tokens + holdout.tokens
            rate = tokens / max(time.perf_counter() - started, 1e-9)
            extra = (
                f"{train.documents + holdout.documents:,} docs  {tokens:,} tokens  "
                f"{rate:,.0f} tok/s"
            )
            progress.update(task, extra=extra)
            if lines.due():
                lines.print(f"tokenizing: {current}/{len(sources)} files  {extra}  {item.where}")


def _commit(
    prefix: Path, train: IndexedWriter, holdout: IndexedWriter | None, stats: dict[str, Any]
) -> None:
    """Move the finished files into place: the old stats file goes first and the new one comes
    last, so at no moment does a mix of old and new files look complete."""
    train.finish()
    if holdout is not None:
        holdout.finish()
    stats_path(prefix).unlink(missing_ok=True)
    fsync_dir(prefix.parent)
    train.commit()
    if holdout is not None:
        holdout.commit()
    else:  # no split asked for: a holdout from an earlier run would not match this one
        for suffix in (".bin", ".idx"):
            Path(f"{holdout_prefix(prefix)}{suffix}").unlink(missing_ok=True)
    write_stats(prefix, stats)


def _hash_inputs(sources: list[Source]) -> list[str]:
    """Every source's sha256 (for stats.json), with progress: this reads all of their bytes."""
    files = [fingerprint_paths(s) for s in sources]
    total = sum(p.stat().st_size for paths in files for p in paths)
    done = 0
    hashes = []
    lines = console.ProgressLines()
    with console.make_progress(transient=True) as progress:
        task = progress.add_task("hashing inputs", total=len(sources), extra="")
        for source, paths in zip(sources, files, strict=True):
            extra = f"{console.short_count(done)}B of {console.short_count(total)}B"
            progress.update(task, extra=extra)
            if lines.due():
                lines.print(f"hashing inputs: {len(hashes)}/{len(sources)} files  {extra}")
            hashes.append(_sha256_source(source, paths))
            done += sum(p.stat().st_size for p in paths)
            progress.advance(task)
    return hashes


def _sha256_source(source: Source, paths: list[Path]) -> str:
    if len(paths) == 1 and str(paths[0]) == source.path:
        return sha256_file(source.path)
    h = hashlib.sha256()  # a saved dataset: every file's name and hash
    for p in paths:
        rel = p.relative_to(source.path).as_posix()
        h.update(rel.encode("utf-8") + b"\0" + bytes.fromhex(sha256_file(p)))
    return h.hexdigest()


def _work_dir_stem(prefix: Path) -> str:
    return f".{prefix.name}.prepare-{socket.gethostname()}-"


def _remove_stale_work_dirs(prefix: Path) -> None:
    """Work directories of killed runs on this host (their process is gone) are garbage."""
    stem = _work_dir_stem(prefix)
    try:  # startswith, not a glob: the prefix's name may hold [ or *
        paths = [p for p in prefix.parent.iterdir() if p.name.startswith(stem)]
    except OSError:  # an unreadable directory: cleaning up is not worth failing for
        return
    for path in paths:
        pid = path.name[len(stem) :]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _print_summary(
    prefix: Path, stats: dict[str, Any], rejections: Rejections, found: Inputs, seconds: float
) -> None:
    tokens = stats["tokens"] + stats["holdout_tokens"]
    rows: list[tuple[str, Any]] = [
        ("documents", stats["documents"]),
        ("tokens", stats["tokens"]),
        ("holdout documents", stats["holdout_documents"]),
        ("holdout tokens", stats["holdout_tokens"]),
        ("rejected records", rejections.total),
        ("tokens/s", tokens / max(seconds, 1e-9)),
        ("seconds", seconds),
    ]
    console.print_table(console.table(f"prepared {prefix}", ("", "value"), rows))
    if rejections.total:
        bad = [
            (describe(reason, rejections.text_field), count, rejections.examples[reason])
            for reason, count in sorted(rejections.counts.items())
        ]
        table = console.table("rejected records", ("reason", "count", "first at"), bad)
        table.columns[-1].overflow = "fold"  # a location is only useful whole
        console.print_table(table)
    if found.duplicates:
        console.console.print(found.duplicates_note(), markup=False)
