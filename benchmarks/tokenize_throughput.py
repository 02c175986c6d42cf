"""Tokens/s of ``midtrain data prepare`` against the raw tokenizer's ``encode_batch`` on the same
text, in the same run. Prints JSON.

    .venv/bin/python benchmarks/tokenize_throughput.py [--dir DIR] [--mb 40] [--vocab 32000] [--num-proc N]
        [--repeats 2] [--tokenizer DIR]

The corpus is jsonl built from the Python standard library's source files (one document per
file, up to ``--mb`` MB; all of CPython 3.11's is about 33 MB). The tokenizer is a byte-level BPE
trained on part of it (or ``--tokenizer``). Raw = ``tokenizers.Tokenizer.encode_batch`` over the
same texts, already in memory, in batches of ``--batch-size`` documents; prepare = the whole
command: reading, parsing, hashing, tokenizing, writing and fsyncing. Tokens count one
end-of-document token per document on both sides. Best of ``--repeats`` runs each, alternated.
Goal: ratio >= 0.8 on 2 cores.

``cpu_ratio`` compares CPU seconds per token (worker processes included) instead of wall time: on
a machine shared with other work, wall-clock ratios move with the load, CPU cost much less.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from midtrain.console import console
from midtrain.data_mixing.prepare import PrepareConfig, prepare_corpus
from midtrain.data_mixing.tokenizer import train_tokenizer


def build_corpus(path: Path, megabytes: float) -> int:
    """jsonl of the standard library's .py files (site-packages left out); returns documents."""
    root = (
        Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    )
    budget = int(megabytes * 1e6)
    documents = 0
    with open(path, "w", encoding="utf-8") as out:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
            for name in sorted(filenames):
                if not name.endswith(".py"):
                    continue
                try:
                    text = (Path(dirpath) / name).read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue
                if text.strip():
                    out.write(json.dumps({"text": text}) + "\n")
                    documents += 1
                if out.tell() >= budget:
                    return documents
    return documents


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (prepare's worker processes)."""
    me, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def raw_encode(tokenizer_dir: Path, corpus: Path, batch_size: int) -> tuple[int, float, float]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    started, cpu = time.perf_counter(), cpu_seconds()
    tokens = 0
    for i in range(0, len(texts), batch_size):
        encodings = tok.encode_batch(texts[i : i + batch_size], add_special_tokens=False)
        tokens += sum(len(e) for e in encodings) + len(encodings)
    return tokens, time.perf_counter() - started, cpu_seconds() - cpu


def run_prepare(cfg: PrepareConfig) -> tuple[int, float, float]:
    started, cpu = time.perf_counter(), cpu_seconds()
    stats = prepare_corpus(cfg)
    tokens = stats["tokens"] + stats["holdout_tokens"]
    return tokens, time.perf_counter() - started, cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="work directory (default: a temporary one)")
    parser.add_argument("--mb", type=float, default=40.0, help="corpus size cap in MB")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokenizer", help="use this tokenizer directory instead of training one")
    parser.add_argument("--num-proc", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    os.environ.setdefault("MIDTRAIN_NO_PROGRESS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    work = Path(args.dir or tempfile.mkdtemp(prefix="midtrain-tokenize-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    documents = build_corpus(corpus, args.mb)
    if args.tokenizer:
        tokenizer_dir = Path(args.tokenizer)
    else:
        sample = work / "sample" / "sample.jsonl"
        sample.parent.mkdir(exist_ok=True)
        build_corpus(sample, min(args.mb, 8.0))
        tokenizer_dir = train_tokenizer([str(sample)], args.vocab, work / "tokenizer")

    cfg = PrepareConfig(
        inputs=[str(corpus)],
        tokenizer=str(tokenizer_dir),
        output=str(work / "out" / "corpus"),
        num_proc=args.num_proc,
        batch_size=args.batch_size,
    )
    raw, prepared = [], []
    with console.capture():  # the summary tables: this script prints only its JSON
        for _ in range(args.repeats):
            raw.append(raw_encode(tokenizer_dir, corpus, args.batch_size))
            prepared.append(run_prepare(cfg))
    raw_rate = max(tokens / seconds for tokens, seconds, _ in raw)
    prepare_rate = max(tokens / seconds for tokens, seconds, _ in prepared)
    # CPU seconds per token: what the pipeline costs around the tokenizer, whatever else runs
    raw_cpu = min(cpu / tokens for tokens, _, cpu in raw)
    prepare_cpu = min(cpu / tokens for tokens, _, cpu in prepared)
    if raw[0][0] != prepared[0][0]:
        sys.exit(f"token counts differ: raw {raw[0][0]}, prepare {prepared[0][0]}")
    result = {
        "prepare_tokens_per_s": round(prepare_rate),
        "raw_encode_batch_tokens_per_s": round(raw_rate),
        "ratio": round(prepare_rate / raw_rate, 3),
        "cpu_ratio": round(raw_cpu / prepare_cpu, 3),
        "load_average": round(os.getloadavg()[0], 2),
        "tokens": prepared[0][0],
        "documents": documents,
        "corpus_mb": round(corpus.stat().st_size / 1e6, 1),
        "num_proc": args.num_proc,
        "cpus": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
