"""Two corpora of clearly different kinds, built from text already on this machine.

The demo and the tests need a *curated general* corpus and a *customer domain* corpus without
downloading anything: Python's standard-library docstrings stand for the general corpus, and the
license and legal texts that installed packages ship stand for a customer's contracts.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from midtrain.fileio import atomic_write_text


def _stdlib_dir() -> Path:
    return (
        Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    )


def stdlib_docstrings(min_chars: int = 120) -> Iterator[str]:
    """Module, class and function docstrings of the standard library, in a stable order."""
    for path in sorted(_stdlib_dir().rglob("*.py")):
        if any(part in ("test", "tests", "idlelib", "site-packages") for part in path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    yield doc


def _license_files() -> list[Path]:
    """License files of installed Python packages, and Debian's common licenses where present."""
    found: set[Path] = set()
    for root in (Path(p) for p in sys.path if p.endswith("site-packages")):
        if root.is_dir():
            found.update(
                p
                for p in root.glob("*.dist-info/**/*")
                if p.is_file() and p.name.upper().startswith(("LICENSE", "COPYING", "NOTICE"))
            )
    common = Path("/usr/share/common-licenses")
    if common.is_dir():
        found.update(p for p in common.iterdir() if p.is_file())
    return sorted(found)


def legal_paragraphs(min_chars: int = 120) -> Iterator[str]:
    """Paragraphs of the license texts installed on this machine, each distinct one once."""
    seen: set[str] = set()
    for path in _license_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for para in text.split("\n\n"):
            para = para.strip()
            key = hashlib.sha1(para.encode()).hexdigest()
            if len(para) >= min_chars and key not in seen:
                seen.add(key)
                yield para


def write_jsonl(path: str | Path, texts: Iterator[str], max_chars: int) -> int:
    """Write ``{"text": ...}`` lines until ``max_chars`` of text; returns the number of documents."""
    lines, total = [], 0
    for text in texts:
        if total >= max_chars:
            break
        lines.append(json.dumps({"text": text}))
        total += len(text)
    atomic_write_text(path, "\n".join(lines) + "\n")
    return len(lines)


def build_sample_corpora(out_dir: str | Path, max_chars: int = 2_000_000) -> dict[str, Path]:
    """``general.jsonl`` (stdlib docstrings) and ``legal.jsonl`` (license texts) under out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"general": out / "general.jsonl", "legal": out / "legal.jsonl"}
    write_jsonl(paths["general"], stdlib_docstrings(), max_chars)
    write_jsonl(paths["legal"], legal_paragraphs(), max_chars)
    return paths
