"""Read documents from local corpora, counting every record that cannot become a document.

Inputs are files (jsonl, jsonl.gz, parquet, txt), saved HF datasets (``Dataset.save_to_disk``),
directories (walked for those) or globs. Reading is split in two so that the expensive half can run
in worker processes:

- ``read_raw`` (sequential, cheap) streams raw records through the ``datasets`` library with their
  line numbers: jsonl lines, txt documents or paragraphs, parquet/dataset column values;
- ``parse_batch`` (pure, picklable) turns them into texts and rejections.

jsonl and txt are read as latin-1 (every byte is one character) so that invalid UTF-8 reaches
``parse_batch`` intact and is rejected per line instead of failing the whole file.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from midtrain.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
TEXT_SUFFIXES = (".txt",)
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED = "jsonl, json, jsonl.gz, json.gz, parquet, txt or a saved HF dataset"

# Why a record was rejected -> what the user is told ({field} is the text field's name).
REASONS = {
    "missing_file": "no such file or directory",
    "empty_file": "empty file",  # no record at all: 0 bytes, or only blank lines
    "invalid_json": "not valid JSON",
    "not_an_object": "not a JSON object",
    "missing_field": "no {field!r} field",
    "not_a_string": "the {field!r} field is not a string",  # null included
    "empty_text": "empty or whitespace-only text",
    "invalid_utf8": "not valid UTF-8",  # or a JSON "\\ud800" escape: a lone surrogate
}

# The blank-line test on latin-1 text: str.strip() would also remove \x85 and \xa0 (bytes that
# are not UTF-8 on their own, and must be reported as such).
_BLANK = " \t\r\n"
BATCH_CHARS = 8 << 20  # default cap on the text in one batch (besides batch_size records)


@dataclass(frozen=True)
class Source:
    """One input: an absolute path and how to read it (``jsonl``, ``txt``, ``parquet``, ``saved``)."""

    path: str
    kind: str


@dataclass
class RawBatch:
    """Raw records of one source: ``items[i]`` starts at line (or row) ``lines[i]`` of ``where``."""

    kind: str
    where: str
    items: list[Any]
    lines: list[int]
    missing_field: bool = False  # a columnar source without the text column


@dataclass
class Parsed:
    texts: list[str] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    rejects: list[tuple[str, int]] = field(default_factory=list)  # (reason, line)


class Rejections:
    """Rejected records by reason: a count and the first ``file:line`` of each."""

    def __init__(self, strict: bool = False, text_field: str = "text") -> None:
        self.strict = strict
        self.text_field = text_field
        self.counts: dict[str, int] = {}
        self.examples: dict[str, str] = {}

    def add(self, reason: str, where: str, count: int = 1) -> None:
        if self.strict:
            raise DataError(
                f"{where}: {describe(reason, self.text_field)} (strict mode: fix or remove it)"
            )
        self.counts[reason] = self.counts.get(reason, 0) + count
        self.examples.setdefault(reason, where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def describe(reason: str, text_field: str = "text") -> str:
    return REASONS.get(reason, reason).format(field=text_field)


# --- finding inputs -----------------------------------------------------------------------------


def expand_inputs(inputs: list[str], rejections: Rejections | None = None) -> list[Source]:
    """Files, directories and globs -> the sources to read, in a stable order, without duplicates.

    Every input is checked before anything is read. A missing file is counted under
    ``missing_file`` in ``rejections`` (an error in strict mode, or without ``rejections``); a glob
    that matches nothing, an unsupported file or a directory without any corpus file is a
    DataError naming it, as is a list where no input exists at all.
    """
    if not inputs:
        raise DataError("no input given")
    sources: list[Source] = []
    for given in inputs:
        path = os.path.abspath(os.path.expanduser(given))
        if glob.has_magic(path):
            matches = sorted(glob.glob(path, recursive=True))
            if not matches:
                raise DataError(f"{given}: the pattern matches no file")
            # like a directory walk, a pattern takes the corpus files among what it matches
            found = [
                s
                for m in matches
                if os.path.isdir(m) or file_kind(m) is not None
                for s in _sources_at(m, given)
            ]
        elif os.path.exists(path):
            found = _sources_at(path, given)
        elif rejections is not None:
            rejections.add("missing_file", given)  # raises in strict mode
            continue
        else:
            raise DataError(f"{given}: no such file or directory")
        if not found:
            raise DataError(f"{given}: holds no corpus file ({SUPPORTED})")
        sources.extend(found)
    if not sources:
        raise DataError(f"none of the inputs exists: {', '.join(inputs)}")
    return list(dict.fromkeys(sources))  # each file once, where it first appears


def _sources_at(path: str, given: str) -> list[Source]:
    if os.path.isdir(path):
        if is_saved_dataset(path):
            return [Source(path, "saved")]
        return _walk(path)
    kind = file_kind(path)
    if kind is None:
        raise DataError(f"{given}: unsupported file type (expected {SUPPORTED})")
    return [Source(path, kind)]


def _walk(root: str) -> list[Source]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        saved = [d for d in dirnames if is_saved_dataset(os.path.join(dirpath, d))]
        for d in saved:
            dirnames.remove(d)
        entries = [(d, "saved") for d in saved]
        entries += [(f, file_kind(f)) for f in filenames if not f.startswith(".")]
        for name, kind in sorted(entries):
            if kind is not None:
                found.append(Source(os.path.join(dirpath, name), kind))
    return found


def file_kind(path: str) -> str | None:
    name = path.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "txt"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def is_saved_dataset(path: str) -> bool:
    """A directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    p = Path(path)
    return (p / "dataset_dict.json").is_file() or (
        (p / "state.json").is_file() and (p / "dataset_info.json").is_file()
    )


def fingerprint_paths(source: Source) -> list[Path]:
    """The files whose bytes make up a source (for its sha256 in stats.json)."""
    root = Path(source.path)
    if not root.is_dir():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file())


# --- raw records --------------------------------------------------------------------------------


def read_raw(
    source: Source,
    text_field: str = "text",
    paragraphs: bool = False,
    batch_size: int = 1000,
    cache_dir: str | Path | None = None,
    max_chars: int = BATCH_CHARS,
) -> Iterator[RawBatch]:
    """Stream a source's raw records in batches of at most ``batch_size`` records and about
    ``max_chars`` characters, with the line (or row) where each record starts."""
    try:
        yield from _read_raw(
            source, text_field, paragraphs, Batching(batch_size, max_chars), cache_dir
        )
    except (DataError, GeneratorExit):
        raise
    except Exception as exc:  # a damaged file fails deep inside pyarrow, gzip or datasets
        raise DataError(f"{source.path}: cannot read it as {source.kind} ({exc})") from exc


@dataclass(frozen=True)
class Batching:
    records: int
    chars: int


def _read_raw(
    source: Source,
    text_field: str,
    paragraphs: bool,
    batching: Batching,
    cache_dir: str | Path | None,
) -> Iterator[RawBatch]:
    if source.kind == "saved":
        yield from _read_saved(source, text_field, batching)
        return
    if os.path.getsize(source.path) == 0:
        return  # datasets cannot stream an empty parquet file; an empty file has no records
    from datasets import load_dataset

    cache = None if cache_dir is None else str(cache_dir)
    if source.kind == "parquet":
        ds = load_dataset(
            "parquet", data_files=[source.path], split="train", streaming=True, cache_dir=cache
        )
        yield from _read_columnar(ds, source.path, text_field, batching)
        return
    sample_by = "document" if source.kind == "txt" and not paragraphs else "line"
    ds = load_dataset(
        "text",
        data_files=[source.path],
        split="train",
        streaming=True,
        cache_dir=cache,
        encoding="latin-1",
        sample_by=sample_by,
        keep_linebreaks=source.kind == "txt",
    )
    lines = (line for batch in ds.iter(batch_size=batching.records) for line in batch["text"])
    if source.kind == "txt" and paragraphs:
        records: Iterator[tuple[str, int]] = _paragraphs(lines)
    else:
        records = ((line, i) for i, line in enumerate(lines, start=1))
    yield from _batched(records, source.kind, source.path, batching)


def _paragraphs(lines: Iterator[str]) -> Iterator[tuple[str, int]]:
    """Group lines (with their line breaks) into blank-line-separated paragraphs."""
    block: list[str] = []
    start = 0
    for number, line in enumerate(lines, start=1):
        if line.strip(_BLANK):
            if not block:
                start = number
            block.append(line)
        elif block:
            yield _join_paragraph(block), start
            block = []
    if block:
        yield _join_paragraph(block), start


def _join_paragraph(block: list[str]) -> str:
    text = "".join(block)
    return text[:-1] if text.endswith("\n") else text


def _batched(
    records: Iterator[tuple[Any, int]],
    kind: str,
    where: str,
    batching: Batching,
    missing_field: bool = False,
) -> Iterator[RawBatch]:
    batch = RawBatch(kind, where, [], [], missing_field)
    chars = 0
    for item, line in records:
        batch.items.append(item)
        batch.lines.append(line)
        chars += len(item) if isinstance(item, str) else 0
        if len(batch.items) >= batching.records or chars >= batching.chars:
            yield batch
            batch, chars = RawBatch(kind, where, [], [], missing_field), 0
    if batch.items:
        yield batch


def _read_columnar(ds: Any, where: str, text_field: str, batching: Batching) -> Iterator[RawBatch]:
    """Rows of a parquet file or saved dataset; the line number is the row, counting from 1."""
    columns = list(ds.column_names or [])
    missing = text_field not in columns
    if not missing:
        ds = ds.select_columns([text_field])
    elif columns:
        ds = ds.select_columns(columns[:1])  # still counted row by row, as missing_field
    batches = ds.iter(batch_size=batching.records)
    values = (v for batch in batches for v in next(iter(batch.values())))
    records = ((v, row) for row, v in enumerate(values, start=1))
    yield from _batched(records, "columnar", where, batching, missing)


def _read_saved(source: Source, text_field: str, batching: Batching) -> Iterator[RawBatch]:
    from datasets import Dataset, load_from_disk

    try:
        loaded = load_from_disk(source.path)
    except Exception as exc:  # datasets raises several types for a damaged directory
        raise DataError(f"{source.path}: not a readable saved dataset ({exc})") from None
    if isinstance(loaded, Dataset):
        yield from _read_columnar(loaded, source.path, text_field, batching)
        return
    for split in loaded:
        yield from _read_columnar(loaded[split], f"{source.path}[{split}]", text_field, batching)


# --- parsing ------------------------------------------------------------------------------------


def parse_batch(batch: RawBatch, text_field: str = "text") -> Parsed:
    """Texts and rejections of a raw batch; blank jsonl lines and blank txt files are skipped."""
    out = Parsed()
    if batch.kind == "jsonl":
        for item, line in zip(batch.items, batch.lines, strict=True):
            if item.strip(_BLANK):
                _keep(out, _parse_json_line(item, text_field), line)
    elif batch.kind == "txt":
        for item, line in zip(batch.items, batch.lines, strict=True):
            if item.strip(_BLANK):
                text, bad_line = _decode_text(item)
                _keep(out, text, line + bad_line)
    else:
        for value, line in zip(batch.items, batch.lines, strict=True):
            _keep(
                out, _Reject("missing_field") if batch.missing_field else _check_text(value), line
            )
    return out


@dataclass(frozen=True)
class _Reject:
    reason: str


def _keep(out: Parsed, text: str | _Reject, line: int) -> None:
    if isinstance(text, _Reject):
        out.rejects.append((text.reason, line))
    else:
        out.texts.append(text)
        out.lines.append(line)


def _parse_json_line(raw: str, text_field: str) -> str | _Reject:
    try:
        line = raw.encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        return _Reject("invalid_utf8")
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return _Reject("invalid_json")
    if not isinstance(record, dict):
        return _Reject("not_an_object")
    if text_field not in record:
        return _Reject("missing_field")
    return _check_text(record[text_field])


def _check_text(value: Any) -> str | _Reject:
    if not isinstance(value, str):
        return _Reject("not_a_string")
    if not value.strip():
        return _Reject("empty_text")
    try:
        value.encode("utf-8")  # a JSON "\ud800" escape decodes to a lone surrogate
    except UnicodeEncodeError:
        return _Reject("invalid_utf8")
    return value


def _decode_text(raw: str) -> tuple[str | _Reject, int]:
    """UTF-8 text from latin-1 text, or a rejection and how many lines in the bad byte is."""
    data = raw.encode("latin-1")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _Reject("invalid_utf8"), data.count(b"\n", 0, exc.start)
    return _check_text(text), 0


# --- documents, for tokenizer training ----------------------------------------------------------


def iter_texts(
    sources: list[Source],
    rejections: Rejections,
    text_field: str = "text",
    paragraphs: bool = False,
    batch_size: int = 1000,
    cache_dir: str | Path | None = None,
) -> Iterator[str]:
    """Every document's text, in order; bad records and empty files go to ``rejections``."""
    for source in sources:
        seen = 0
        for raw in read_raw(source, text_field, paragraphs, batch_size, cache_dir):
            parsed = parse_batch(raw, text_field)
            for reason, line in parsed.rejects:
                rejections.add(reason, f"{raw.where}:{line}")
            seen += len(parsed.texts) + len(parsed.rejects)
            yield from parsed.texts
        if seen == 0:
            rejections.add("empty_file", source.path)
