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

    Every input is checked before anything is read. A path that exists is taken as it is, even
    with ``[`` or ``*`` in its name; only a path that does not exist is tried as a glob. A missing
    file is counted under ``missing_file`` in ``rejections`` (an error in strict mode, or without
    ``rejections``); a glob that matches nothing, an unsupported file or a directory without any
    corpus file is a DataError naming it, as is a list where no input exists at all. Directories
    and globs skip ``*.stats.json`` (midtrain's own metadata, e.g. of a prefix written into an
    input directory).
    """
    if not inputs:
        raise DataError("no input given")
    sources: list[Source] = []
    for given in inputs:
        path = os.path.abspath(os.path.expanduser(given))
        if os.path.exists(path):
            found = _sources_at(path, given)
        elif glob.has_magic(given):  # the user's text, not the current directory's name
            found = _glob_sources(given)
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


def _glob_sources(given: str) -> list[Source]:
    matches = sorted(glob.glob(_absolute_pattern(given), recursive=True))
    if not matches:
        raise DataError(f"{given}: the pattern matches no file")
    # like a directory walk, a pattern takes the corpus files among what it matches
    return [
        s
        for m in map(os.path.abspath, matches)
        if os.path.isdir(m) or (file_kind(m) is not None and not is_metadata(m))
        for s in _sources_at(m, given)
    ]


def _absolute_pattern(given: str) -> str:
    """``given`` as an absolute pattern in which only the user's own text is magic: the current
    (or home) directory it is relative to is escaped, since its name may hold ``[`` or ``*``."""
    if os.path.isabs(given):
        return given
    if given.startswith("~"):
        head, _, rest = given.partition("/")
        return os.path.join(glob.escape(os.path.expanduser(head)), rest)
    return os.path.join(glob.escape(os.getcwd()), given)


def is_metadata(path: str) -> bool:
    """midtrain's own ``PREFIX.stats.json``: never corpus, though it ends in ``.json``."""
    return path.lower().endswith(".stats.json")


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
    """Corpus files under ``root``, sorted; follows symbolic links to directories (as a glob
    does), each real directory once, so a link loop ends."""
    found = []
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        saved = [d for d in dirnames if is_saved_dataset(os.path.join(dirpath, d))]
        for d in saved:
            dirnames.remove(d)
        entries = [(d, "saved") for d in saved]
        entries += [
            (f, file_kind(f)) for f in filenames if not f.startswith(".") and not is_metadata(f)
        ]
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


def make_dir(path: Path, output: str | Path) -> None:
    """``mkdir -p path`` for writing ``output``; an OSError becomes a DataError naming both."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = next((p for p in (path, *path.parents) if p.exists()), None)
        reason = (
            f"{blocker} is a file, not a directory"
            if blocker is not None and not blocker.is_dir()
            else exc.strerror or str(exc)
        )
        raise DataError(f"{output}: cannot create the directory {path} ({reason})") from None


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
    # datasets globs data_files: a name with [ or * would silently match nothing
    data_files = [glob.escape(source.path)]
    if source.kind == "parquet":
        if _parquet_rows(source.path) == 0:
            return  # nor one without rows ("BatchSize must be greater than 0")
        ds = load_dataset(
            "parquet", data_files=data_files, split="train", streaming=True, cache_dir=cache
        )
        yield from _read_columnar(ds, source.path, text_field, batching)
        return
    sample_by = "document" if source.kind == "txt" and not paragraphs else "line"
    ds = load_dataset(
        "text",
        data_files=data_files,
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


def _parquet_rows(path: str) -> int:
    import pyarrow.parquet as pq

    return int(pq.read_metadata(path).num_rows)


def _read_columnar(ds: Any, where: str, text_field: str, batching: Batching) -> Iterator[RawBatch]:
    """Rows of a parquet file or saved dataset; the line number is the row, counting from 1."""
    if getattr(ds, "num_rows", None) == 0:
        return  # a saved dataset without rows fails inside datasets' iterator; it has no records
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
    """A saved Dataset, or each split of a saved DatasetDict in the order it lists them."""
    root = Path(source.path)
    if not (root / "dataset_dict.json").is_file():
        yield from _read_saved_split(root, source.path, text_field, batching)
        return
    for split in _saved_splits(root):
        where = f"{source.path}[{split}]"
        yield from _read_saved_split(root / split, where, text_field, batching)


def _saved_splits(root: Path) -> list[str]:
    path = root / "dataset_dict.json"
    try:
        splits = json.loads(path.read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a saved DatasetDict's split list ({exc})") from None
    if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
        raise DataError(f"{path}: splits must be a list of names")
    return splits


def _read_saved_split(
    path: Path, where: str, text_field: str, batching: Batching
) -> Iterator[RawBatch]:
    if _saved_without_rows(path):
        return
    from datasets import load_from_disk

    try:
        loaded = load_from_disk(str(path))
    except Exception as exc:  # datasets raises several types for a damaged directory
        raise DataError(f"{where}: not a readable saved dataset ({exc})") from None
    yield from _read_columnar(loaded, where, text_field, batching)


def _saved_without_rows(path: Path) -> bool:
    """save_to_disk writes no data file for a dataset without rows, and load_from_disk then
    fails ("list index out of range"); such a dataset simply has no records."""
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # load_from_disk reports it
    return isinstance(state, dict) and state.get("_data_files") == []


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
