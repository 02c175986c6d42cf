"""Training throughput on CPU: ``midtrain train`` (Ray + DeepSpeed + sampler + metrics) against a
plain PyTorch loop over the same model, batches and data, in the same run. Prints JSON.

    python benchmarks/train_cpu.py [--steps 300] [--warmup 30] [--repeats 3] [--workers 1]

Both sides use the same number of CPU threads in total; midtrain's figure is measured from its own
metrics (tokens between the last warm-up step and the last step over the wall time between them),
so start-up is not counted, but everything Ray, DeepSpeed, the sampler and the metrics do per step
is. The warm-up is long enough to cover Ray Train's start-up tail: its helper actors (preemption
watcher, placement-group cleaner, autoscaling coordinator) are new processes that start while the
first steps run, and on 2 cores would otherwise be counted as per-step cost. The two sides
alternate ``--repeats`` times (2 shared cores are noisy); the figures are medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from midtrain.config import load_run_spec
from midtrain.data_mixing.prepare import PrepareConfig, prepare_corpus
from midtrain.data_mixing.sample_corpora import build_sample_corpora
from midtrain.data_mixing.tokenizer import train_tokenizer
from midtrain.runtime_env import setup_process
from midtrain.training.metrics import read_metrics


def prepare(root: Path) -> dict[str, str]:
    raw = build_sample_corpora(root / "raw", max_chars=600_000)
    tok = train_tokenizer([str(p) for p in raw.values()], 2048, root / "tok")
    out = {"tokenizer": str(tok)}
    for name, path in raw.items():
        prepare_corpus(
            PrepareConfig(inputs=[str(path)], tokenizer=str(tok), output=str(root / name))
        )
        out[name] = str(root / name)
    return out


def sample_mixture(data: dict[str, str], seq_length: int) -> dict[str, Any]:
    """The run spec's mixture of the two sample corpora that ``prepare`` made, half each."""
    return {
        "seq_length": seq_length,
        "seed": 1,
        "sources": [
            {"name": "legal", "kind": "customer", "path": [data["legal"]], "weight": 0.5},
            {"name": "general", "kind": "curated", "path": [data["general"]], "weight": 0.5},
        ],
    }


def write_spec(root: Path, data: dict[str, str], steps: int, workers: int) -> Path:
    threads = max(1, (os.cpu_count() or 2) // workers)
    spec = {
        "run_dir": str(root / "run"),
        "model": {
            "tokenizer": data["tokenizer"],
            "config": {
                "hidden_size": 128,
                "num_layers": 4,
                "num_heads": 4,
                "num_kv_heads": 2,
                "ffn_hidden_size": 344,
            },
        },
        "mixture": sample_mixture(data, seq_length=128),
        "optimizer": {"lr": 1e-3},
        "schedule": {"kind": "constant"},
        "train": {
            "global_batch_size": 16,
            "micro_batch_size": 16 // workers,
            "max_steps": steps,
            "zero_stage": 1,
        },
        "checkpoint": {"interval": None},
        "workers": workers,
        "launch": {"cpus_per_worker": threads},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def midtrain_tokens_per_s(spec_path: Path, warmup: int) -> float:
    spec = load_run_spec(spec_path)
    shutil.rmtree(spec.run_dir, ignore_errors=True)
    env = {**os.environ, "MIDTRAIN_NO_PROGRESS": "1"}
    subprocess.run(
        [sys.executable, "-m", "midtrain.cli", "train", str(spec_path)],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    records = read_metrics(spec.run_dir)
    first, last = records[warmup - 1], records[-1]
    return (last["tokens"] - first["tokens"]) / (last["time"] - first["time"])


def plain_tokens_per_s(spec_path: Path, warmup: int) -> float:
    """The reference: a plain loop, one process with all the threads, same model and batches."""
    from midtrain.data_mixing.tokenizer import load_tokenizer
    from midtrain.training.model import build_model, llama_config, parameter_groups, sequence_losses

    spec = load_run_spec(spec_path)
    torch.set_num_threads(os.cpu_count() or 2)

    config = llama_config(
        spec.model.config, len(load_tokenizer(spec.model.tokenizer)), spec.mixture.seq_length
    )
    model = build_model(config, seed=1)
    opt = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-3)
    sampler = spec.mixture.build(total_sequences=spec.total_sequences)
    batches = [
        sampler.next_global_batch(spec.train.global_batch_size).tokens
        for _ in range(spec.train.max_steps)
    ]
    start = None
    for step, tokens in enumerate(batches):
        if step == warmup:
            start = time.perf_counter()
        loss = sequence_losses(model, tokens).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _ = loss.item()  # the loop logs its loss, as midtrain does
    elapsed = time.perf_counter() - start
    tokens = (len(batches) - warmup) * spec.train.global_batch_size * spec.mixture.seq_length
    return tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30, help="steps not timed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    setup_process("cpu")  # offline, quiet; before DeepSpeed is imported (it logs to stdout)
    if not 0 < args.warmup < args.steps:
        parser.error("--warmup must be between 1 and --steps - 1")
    plains, ours_all = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = prepare(root)
        spec = write_spec(root, data, args.steps, args.workers)
        for _ in range(args.repeats):
            plains.append(plain_tokens_per_s(spec, args.warmup))
            ours_all.append(midtrain_tokens_per_s(spec, args.warmup))
    plain, ours = statistics.median(plains), statistics.median(ours_all)
    print(
        json.dumps(
            {
                "benchmark": "train_cpu",
                "workers": args.workers,
                "cpus": os.cpu_count(),
                "steps": args.steps,
                "warmup_steps": args.warmup,
                "repeats": args.repeats,
                "midtrain_tokens_per_s": round(ours, 1),
                "plain_pytorch_tokens_per_s": round(plain, 1),
                "ratio": round(ours / plain, 3),
                "overhead_pct": round(100 * (1 - ours / plain), 1),
                "goal_overhead_le_10pct": ours / plain >= 0.9,
                "midtrain_each": [round(x, 1) for x in ours_all],
                "plain_each": [round(x, 1) for x in plains],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
