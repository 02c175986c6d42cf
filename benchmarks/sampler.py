"""Time to read one packed sequence (a row of a batch) from the mixture sampler, by document
length. Prints JSON.

    .venv/bin/python benchmarks/sampler.py [--dir DIR] [--tokens 20000000] [--seq-length 2048]
        [--rows 2000]

For each mean document length (8, 100, 1000 and 10000 tokens), a prepared prefix of ``--tokens``
random tokens is written with the project's own writer, and a one-source mixture reads
``--rows`` consecutive sequences (a window crosses about ``seq_length / mean`` documents). The
per-step cost on a rank is ``ms_per_row`` times its rows per step; against a step of a 1B model
on a GPU (about a second for 32 x 2048 tokens) the goal is < 1% of step time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from midtrain.data_mixing.indexed import IndexedWriter
from midtrain.data_mixing.mixture import MixtureConfig
from midtrain.data_mixing.sampler import MixtureSampler
from midtrain.data_mixing.stats import write_stats

VOCAB = 32_000


def write_source(prefix: Path, tokens: int, mean: int, seed: int) -> int:
    """A prefix of random documents of ``mean // 4 .. 7 * mean // 4`` tokens; returns documents."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(1, mean // 4), 7 * mean // 4 + 1, size=tokens // mean + 1)
    with IndexedWriter(prefix, VOCAB) as writer:
        writer.add_documents(rng.integers(1, VOCAB, size=int(lengths.sum())), lengths)
    write_stats(
        prefix,
        {
            "documents": len(lengths),
            "tokens": int(lengths.sum()),
            "holdout_documents": 0,
            "holdout_tokens": 0,
            "rejected": 0,
            "tokenizer": {"fingerprint": "benchmark", "eod_id": 0, "vocab_size": VOCAB},
            "inputs": [],
        },
    )
    return len(lengths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=20_000_000)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = []
        for mean in (8, 100, 1000, 10_000):
            prefix = Path(tmp) / f"mean{mean}"
            documents = write_source(prefix, args.tokens, mean, seed=mean)
            source = {"name": "s", "kind": "curated", "path": str(prefix), "weight": 1}
            cfg = MixtureConfig(
                seq_length=args.seq_length, tokens=args.tokens // 2, sources=[source]
            )
            sampler = MixtureSampler(cfg)
            rows = min(args.rows, sampler.total_sequences)
            sampler.next_global_batch(1)  # the epoch's shuffle, paid once per epoch
            start = time.perf_counter()
            sampler.next_global_batch(rows - 1)
            seconds = time.perf_counter() - start
            results.append(
                {
                    "mean_document_tokens": mean,
                    "documents": documents,
                    "seq_length": args.seq_length,
                    "rows": rows - 1,
                    "ms_per_row": round(1e3 * seconds / (rows - 1), 4),
                }
            )
            for suffix in (".bin", ".idx", ".stats.json"):
                Path(f"{prefix}{suffix}").unlink()
    print(json.dumps({"benchmark": "sampler", "results": results}, indent=2))


if __name__ == "__main__":
    main()
