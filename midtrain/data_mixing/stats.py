"""``PREFIX.stats.json``: what ``data prepare`` wrote under a prefix, read back and checked.

The stats file is the contract between preparing a corpus and mixing it: token counts for the plan,
the tokenizer fingerprint that proves all sources of a mixture share one tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from midtrain.errors import DataError
from midtrain.fileio import atomic_write_json

STATS_FORMAT = "midtrain.prepared/1"
# What a prepared corpus must record of its tokenizer: the fingerprint (which also covers the eos
# token) that every check of "same tokenizer" compares, the end-of-document id written after each
# document, and the vocabulary size the model's embedding must cover.
TOKENIZER_KEYS = ("fingerprint", "eod_id", "vocab_size")
REQUIRED_KEYS = (
    "format",
    "documents",
    "tokens",
    "holdout_documents",
    "holdout_tokens",
    "rejected",
    "tokenizer",
    "inputs",
)


def stats_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.stats.json")


def holdout_prefix(prefix: str | Path) -> str:
    return f"{prefix}.holdout"


def write_stats(prefix: str | Path, stats: dict[str, Any]) -> None:
    atomic_write_json(stats_path(prefix), {"format": STATS_FORMAT, **stats})


def load_stats(prefix: str | Path) -> dict[str, Any]:
    """Read and check ``PREFIX.stats.json``; also checks that ``PREFIX.bin/.idx`` exist."""
    path = stats_path(prefix)
    for suffix in (".bin", ".idx"):
        if not Path(f"{prefix}{suffix}").is_file():
            raise DataError(
                f"{prefix}{suffix}: no such file (prepare the corpus with `midtrain data prepare`)"
            )
    if not path.is_file():
        raise DataError(f"{path}: no such file (prepare the corpus with `midtrain data prepare`)")
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(stats, dict):
        raise DataError(f"{path}: expected a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in stats]
    if missing:
        raise DataError(f"{path}: missing keys {', '.join(missing)}")
    if stats["format"] != STATS_FORMAT:
        raise DataError(f"{path}: unknown format {stats['format']!r} (expected {STATS_FORMAT!r})")
    tok = stats["tokenizer"]
    if not isinstance(tok, dict) or any(k not in tok for k in TOKENIZER_KEYS):
        raise DataError(f"{path}: tokenizer must hold {', '.join(map(repr, TOKENIZER_KEYS))}")
    _check_values(path, stats)
    return stats


# Counts that planning, sampling and evaluation compute with: a hand-written or damaged file must
# fail here, naming the key, not with a TypeError somewhere downstream.
_COUNTS = ("documents", "tokens", "holdout_documents", "holdout_tokens")


def _check_values(path: Path, stats: dict[str, Any]) -> None:
    tok = stats["tokenizer"]
    checks = [(key, stats[key], 0) for key in _COUNTS]
    checks += [
        ("tokenizer.eod_id", tok["eod_id"], 0),
        ("tokenizer.vocab_size", tok["vocab_size"], 1),
    ]
    for key, value, least in checks:
        if not _is_int(value) or value < least:
            kind = "a positive" if least else "a non-negative"
            raise DataError(f"{path}: {key} must be {kind} integer, got {json.dumps(value)}")
    if not isinstance(tok["fingerprint"], str) or not tok["fingerprint"]:
        got = json.dumps(tok["fingerprint"])
        raise DataError(f"{path}: tokenizer.fingerprint must be a non-empty string, got {got}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
