"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

# Stdlib modules whose source is the tests' text: on every machine, nothing to download.
STDLIB_MODULES = ("textwrap", "argparse", "json/decoder", "string", "shlex", "difflib")


def stdlib_texts() -> list[str]:
    """Source files of a few standard-library modules (a venv shares the base interpreter's)."""
    lib = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    if not lib.is_dir():  # non-Unix layout: the directory of a stdlib module
        lib = Path(os.__file__).parent
    return [(lib / f"{name}.py").read_text(encoding="utf-8") for name in STDLIB_MODULES]


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 400-token byte-level BPE (eos = <|endoftext|>) trained once on stdlib source; its dir."""
    from midtrain.data_mixing.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tiny_tokenizer")
    corpus = root / "stdlib.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for text in stdlib_texts():
            f.write(json.dumps({"text": text}) + "\n")
    return train_tokenizer([str(corpus)], 400, root / "tokenizer")


@pytest.fixture(scope="session")
def prepared_corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tokenizer and two prepared sources of very different text (legal vs. Python docs)."""
    from midtrain.data_mixing.prepare import PrepareConfig, prepare_corpus
    from midtrain.data_mixing.sample_corpora import build_sample_corpora
    from midtrain.data_mixing.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("corpora")
    raw = build_sample_corpora(root / "raw", max_chars=150_000)
    tok = train_tokenizer([str(p) for p in raw.values()], 512, root / "tok")
    out: dict[str, Path] = {"tokenizer": Path(tok)}
    for name, path in raw.items():
        prefix = root / "data" / name
        prepare_corpus(
            PrepareConfig(
                inputs=[str(path)], tokenizer=str(tok), output=str(prefix), holdout_fraction=0.05
            )
        )
        out[name] = prefix
    return out
