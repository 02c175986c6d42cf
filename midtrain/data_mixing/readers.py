"""Read documents from local corpora, counting every record that cannot become a document.

Inputs are files (jsonl and txt, also compressed; parquet), saved HF datasets
(``Dataset.save_to_disk``), directories (walked for those) or globs. Reading is split in two so
that the expensive half can run in worker processes:

- ``read_raw`` (sequential, cheap) streams raw records with their line numbers: jsonl lines and
  txt documents or paragraphs (read here, decompressing .gz, .zst, .bz2 and .xz), parquet column
  values (pyarrow), saved datasets' column values (``datasets``);
- ``parse_batch`` (pure, picklable) turns them into texts and rejections.

jsonl and txt are read as latin-1 (every byte is one character) so that invalid UTF-8 reaches
``parse_batch`` intact and is rejected per line instead of failing the whole file.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import io
import json
import lzma
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from midtrain.errors import DataError

TEXT_KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".txt": "txt"}
COMPRESSIONS = (".gz", ".zst", ".bz2", ".xz")  # of jsonl and txt files
SUPPORTED = "jsonl, json or txt (each also as .gz, .zst, .bz2, .xz), parquet or a saved HF dataset"

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
_BOM = "\xef\xbb\xbf"  # a UTF-8 byte order mark, read as latin-1
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


@dataclass
class Inputs:
    """The sources to read, and what the inputs held that is not read."""

    sources: list[Source] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # files of directories and globs: not corpus
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (dropped, kept): one file

    def skipped_stats(self) -> dict[str, Any]:
        """For stats.json: how many files were skipped, by extension, and the first few."""
        counts = Counter(map(_extension, self.skipped))
        return {
            "count": len(self.skipped),
            "by_extension": dict(sorted(counts.items())),
            "first": self.skipped[:10],
        }

    def skipped_note(self) -> str:
        counts = ", ".join(
            f"{ext}: {n:,}" for ext, n in self.skipped_stats()["by_extension"].items()
        )
        shown = ", ".join(self.skipped[:3]) + (", ..." if len(self.skipped) > 3 else "")
        return f"warning: skipped {len(self.skipped):,} file(s) of other types ({counts}): {shown}"

    def duplicates_note(self) -> str:
        dropped, kept = self.duplicates[0]
        more = f", and {len(self.duplicates) - 1:,} more" if len(self.duplicates) > 1 else ""
        return (
            f"read once: {len(self.duplicates):,} input(s) were a file already read "
            f"({dropped} is {kept}{more})"
        )


def expand_inputs(inputs: list[str], rejections: Rejections | None = None) -> Inputs:
    """Files, directories and globs -> the sources to read, in a stable order, without duplicates.

    Every input is checked before anything is read. A path that exists is taken as it is, even
    with ``[`` or ``*`` in its name; only a path that does not exist is tried as a glob. A missing
    file is counted under ``missing_file`` in ``rejections`` (an error in strict mode, or without
    ``rejections``); a glob that matches nothing, an unsupported file or a directory without any
    corpus file is a DataError naming it, as is a list where no input exists at all. Directories
    and globs skip ``*.stats.json`` (midtrain's own metadata, e.g. of a prefix written into an
    input directory) and list the other files they cannot read in ``skipped``. A file reached
    twice (listed twice, or through a symbolic link) is read once, under its first name.
    """
    if not inputs:
        raise DataError("no input given")
    found = Inputs()
    kept: dict[str, Source] = {}  # real path -> the source read from it
    for given in inputs:
        path = os.path.abspath(os.path.expanduser(given))
        if os.path.exists(path):
            sources = _sources_at(path, given, found.skipped)
        elif glob.has_magic(given):  # the user's text, not the current directory's name
            sources = _glob_sources(given, found.skipped)
        elif rejections is not None:
            rejections.add("missing_file", given)  # raises in strict mode
            continue
        else:
            raise DataError(f"{given}: no such file or directory")
        if not sources:
            raise DataError(f"{given}: holds no corpus file ({SUPPORTED})")
        for source in sources:
            first = kept.setdefault(os.path.realpath(source.path), source)
            if first is source:
                found.sources.append(source)
            else:
                found.duplicates.append((source.path, first.path))
    if not found.sources:
        raise DataError(f"none of the inputs exists: {', '.join(inputs)}")
    return found


def _glob_sources(given: str, skipped: list[str]) -> list[Source]:
    matches = sorted(glob.glob(_absolute_pattern(given), recursive=True))
    if not matches:
        raise DataError(f"{given}: the pattern matches no file")
    # like a directory walk, a pattern takes the corpus files among what it matches
    sources = []
    for match in map(os.path.abspath, matches):
        if os.path.isdir(match) or (file_kind(match) is not None and not is_metadata(match)):
            sources += _sources_at(match, given, skipped)
        elif _reportable(match):
            skipped.append(match)
    return sources


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


def _reportable(path: str) -> bool:
    """A file a walk does not read and should say so: not ``PREFIX.stats.json`` nor the
    ``PREFIX.bin/.idx`` (and ``PREFIX.holdout.*``) beside it, midtrain's own output."""
    if is_metadata(path):
        return False
    base, ext = os.path.splitext(path)
    if ext.lower() not in (".bin", ".idx"):
        return True
    return not os.path.isfile(f"{base.removesuffix('.holdout')}.stats.json")


def _sources_at(path: str, given: str, skipped: list[str]) -> list[Source]:
    if os.path.isdir(path):
        if is_saved_dataset(path):
            return [Source(path, "saved")]
        return _walk(path, skipped)
    kind = file_kind(path)
    if kind is None:
        raise DataError(f"{given}: unsupported file type (expected {SUPPORTED})")
    return [Source(path, kind)]


def _walk(root: str, skipped: list[str]) -> list[Source]:
    """Corpus files under ``root``, sorted; follows symbolic links to directories (as a glob
    does), each real directory once, so a link loop ends. Other files go to ``skipped``."""
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
        entries += [(f, file_kind(f)) for f in filenames if not f.startswith(".")]
        for name, kind in sorted(entries):
            path = os.path.join(dirpath, name)
            if kind is not None and not is_metadata(name):
                found.append(Source(path, kind))
            elif kind is None and _reportable(path):
                skipped.append(path)
    return found


def file_kind(path: str) -> str | None:
    """How a file is read, by its name (``jsonl``, ``txt``, ``parquet``); None: not a corpus file."""
    stem, ext = os.path.splitext(path.lower())
    if ext == ".parquet":
        return "parquet"
    if ext in COMPRESSIONS:
        ext = os.path.splitext(stem)[1]
    return TEXT_KINDS.get(ext)


def _extension(path: str) -> str:
    """``.zst``, or ``.tar.gz`` for a compressed file: how skipped files are counted."""
    stem, ext = os.path.splitext(os.path.basename(path).lower())
    if ext in COMPRESSIONS:
        ext = os.path.splitext(stem)[1] + ext
    return ext or "no extension"


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
    max_chars: int = BATCH_CHARS,
) -> Iterator[RawBatch]:
    """Stream a source's raw records in batches of at most ``batch_size`` records and about
    ``max_chars`` characters, with the line (or row) where each record starts."""
    try:
        yield from _read_raw(source, text_field, paragraphs, Batching(batch_size, max_chars))
    except (DataError, GeneratorExit):
        raise
    except Exception as exc:  # a damaged file fails deep inside pyarrow, gzip or datasets
        raise DataError(f"{source.path}: cannot read it as {source.kind} ({exc})") from exc


@dataclass(frozen=True)
class Batching:
    records: int
    chars: int


def _read_raw(
    source: Source, text_field: str, paragraphs: bool, batching: Batching
) -> Iterator[RawBatch]:
    if source.kind == "saved":
        yield from _read_saved(source, text_field, batching)
        return
    if os.path.getsize(source.path) == 0:
        return  # an empty file has no records (and is not a valid parquet or compressed file)
    if source.kind == "parquet":
        yield from _read_parquet(source.path, text_field, batching)
        return
    with _open_text(source.path) as f:
        if source.kind == "txt" and not paragraphs:
            records: Iterator[tuple[str, int]] = iter([(f.read().removeprefix(_BOM), 1)])
        elif source.kind == "txt":
            records = _paragraphs(_lines(f, keep_ends=True))
        else:
            records = ((line, i) for i, line in enumerate(_lines(f, keep_ends=False), start=1))
        yield from _batched(records, source.kind, source.path, batching)


def _open_text(path: str) -> IO[str]:
    """A jsonl or txt file, decompressed by its suffix, as latin-1 text with universal newlines
    (LF, CRLF and CR end a line, as editors count them; each becomes LF)."""
    ext = os.path.splitext(path.lower())[1]
    raw: IO[bytes]
    if ext == ".zst":
        import zstandard

        # across frames: concatenated .zst files are one stream; 2 GiB windows: `zstd --long=31`
        reader = zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(
            open(path, "rb"),  # noqa: SIM115 - closed with the reader (closefd)
            read_across_frames=True,
            closefd=True,
        )
        raw = io.BufferedReader(reader)
    else:
        opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(ext, open)
        raw = opener(path, "rb")  # closed with the text wrapper
    return io.TextIOWrapper(raw, encoding="latin-1", newline=None)


def _lines(f: IO[str], keep_ends: bool) -> Iterator[str]:
    """A file's lines; a UTF-8 byte order mark before the first (Windows editors write one) is
    not part of it."""
    for number, line in enumerate(f):
        if number == 0:
            line = line.removeprefix(_BOM)
        yield line if keep_ends or not line.endswith("\n") else line[:-1]


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


def _read_parquet(path: str, text_field: str, batching: Batching) -> Iterator[RawBatch]:
    """A parquet file's rows, one row group at a time, reading only the text column."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as pf:
        if text_field not in pf.schema_arrow.names:
            rows = ((None, row) for row in range(1, pf.metadata.num_rows + 1))
            yield from _batched(rows, "columnar", path, batching, missing_field=True)
            return
        batches = pf.iter_batches(batch_size=batching.records, columns=[text_field])
        values = (v for batch in batches for v in batch.column(0).to_pylist())
        records = ((v, row) for row, v in enumerate(values, start=1))
        yield from _batched(records, "columnar", path, batching)


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
) -> Iterator[str]:
    """Every document's text, in order; bad records and empty files go to ``rejections``."""
    for source in sources:
        seen = 0
        for raw in read_raw(source, text_field, paragraphs, batch_size):
            parsed = parse_batch(raw, text_field)
            for reason, line in parsed.rejects:
                rejections.add(reason, f"{raw.where}:{line}")
            seen += len(parsed.texts) + len(parsed.rejects)
            yield from parsed.texts
        if seen == 0:
            rejections.add("empty_file", source.path)


def nothing_left(inputs: list[str], rejections: Rejections) -> str:
    """Why the inputs gave no document at all: every rejection reason, with its first place."""
    if not rejections.total:
        return f"no documents in {', '.join(inputs)}"
    reasons = [
        f"{n:,} {describe(r, rejections.text_field)} (first at {rejections.examples[r]})"
        for r, n in rejections.counts.items()
    ]
    return f"no documents: every record was rejected: {', '.join(reasons)}"
