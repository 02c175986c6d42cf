"""Helpers for the mixture tests: prepared prefixes built directly with megatron-core's builder."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import yaml

from midtrain.data_mixing.stats import write_stats

EOD = 0
VOCAB_SIZE = 50_000  # above every id these tests write


def make_prefix(
    prefix: str | Path,
    docs: list[list[int]] | list[np.ndarray],
    fingerprint: str = "tok-A",
    stats_tokens: int | None = None,
) -> list[np.ndarray]:
    """Write PREFIX.bin/.idx (one sequence per document) and PREFIX.stats.json; returns the docs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    arrays = [np.asarray(d, dtype=np.int64) for d in docs]
    for doc in arrays:
        builder.add_item(torch.from_numpy(doc))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    tokens = sum(len(d) for d in arrays)
    write_stats(
        prefix,
        {
            "documents": len(arrays),
            "tokens": tokens if stats_tokens is None else stats_tokens,
            "holdout_documents": 0,
            "holdout_tokens": 0,
            "rejected": 0,
            "tokenizer": {"fingerprint": fingerprint, "eod_id": EOD, "vocab_size": VOCAB_SIZE},
            "inputs": [],
        },
    )
    return arrays


def random_docs(rng: np.random.Generator, n: int, lo: int, hi: int, base: int) -> list[np.ndarray]:
    """``n`` documents of ``lo..hi`` tokens (eod included); token ids start at ``base`` so that
    each source's tokens are recognisable."""
    docs = []
    for _ in range(n):
        body = rng.integers(base, base + 1000, size=int(rng.integers(lo, hi)) - 1)
        docs.append(np.append(body, EOD))
    return docs


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path
