"""Checkpoint save/load speed against the raw speed of the same disk, and how long an asynchronous
save blocks training compared with a synchronous one. Prints JSON.

    .venv/bin/python benchmarks/checkpoint.py [--dir DIR] [--hidden 768] [--layers 8] [--repeats 3]

Raw write = write the same byte count + fsync; raw read = read it back after dropping it from the
page cache (posix_fadvise DONTNEED, per file: no root needed, other processes unaffected). The
checkpoint load is measured the same way, cold, and includes verifying every file's sha256.
Goals: save >= 0.7x raw write; async save blocks < 10% of a synchronous save.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from midtrain.checkpoints import CheckpointMeta, CheckpointSaver, load_checkpoint, prune
from midtrain.checkpoints.tensorfile import tensor_bytes


def build_state(hidden: int, layers: int, vocab: int) -> tuple[dict[str, torch.Tensor], dict]:
    """A Llama-shaped state dict (random values: compressibility does not matter to a disk)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        intermediate_size=hidden * 8 // 3 // 64 * 64,
        vocab_size=vocab,
    )
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}, cfg.to_dict()


def evict(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_write(path: Path, state: dict[str, torch.Tensor]) -> float:
    t = time.perf_counter()
    with open(path, "wb") as f:
        for tensor in state.values():
            f.write(tensor_bytes(tensor))
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t


def raw_read(path: Path) -> float:
    evict(path)
    buf = bytearray(1 << 26)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=".", help="where to write (the disk to measure)")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    state, config = build_state(args.hidden, args.layers, args.vocab)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    work = Path(tempfile.mkdtemp(prefix="midtrain-ckpt-bench-", dir=args.dir))
    # Retention is timed apart (prune_s): the save figures are for writing a checkpoint.
    saver = CheckpointSaver(work / "run", keep_last=None, log=None)
    kw = dict(model_state=state, config=config, trainer_state={"step": 0})
    names = ("raw_w", "raw_r", "save", "load", "async", "prune")
    res: dict[str, list[float]] = {k: [] for k in names}
    old_raw: Path | None = None

    def fresh_raw(i: int) -> float:
        # A new file each time, the old one deleted afterwards: the same block reuse a checkpoint
        # sees (a new directory, older ones pruned).
        nonlocal old_raw
        path = work / f"raw-{i}.bin"
        seconds = raw_write(path, state)
        if old_raw is not None:
            old_raw.unlink()
        old_raw = path
        return seconds

    try:
        # Untimed first writes: the first writes to fresh disk blocks are slower everywhere.
        saver.save(CheckpointMeta(step=0), **kw)
        fresh_raw(0)
        # The first background save allocates its snapshot buffers; later ones reuse them.
        t = time.perf_counter()
        saver.save(CheckpointMeta(step=1000), **kw, blocking=False)
        first_async = time.perf_counter() - t
        saver.wait()
        prune(work / "run", keep_last=1)
        for i in range(args.repeats):
            step = 2 * i + 2
            res["raw_w"].append(fresh_raw(step))
            t = time.perf_counter()
            path = saver.save(CheckpointMeta(step=step, tokens=step), **kw)
            res["save"].append(time.perf_counter() - t)
            t = time.perf_counter()
            prune(work / "run", keep_last=1)
            res["prune"].append(time.perf_counter() - t)
            assert old_raw is not None
            res["raw_r"].append(raw_read(old_raw))
            evict(path)
            t = time.perf_counter()
            ckpt = load_checkpoint(path, verify=True)
            loaded = ckpt.model_state_dict()
            res["load"].append(time.perf_counter() - t)
            del loaded
            t = time.perf_counter()
            saver.save(CheckpointMeta(step=step + 1, tokens=step + 1), **kw, blocking=False)
            res["async"].append(time.perf_counter() - t)
            saver.wait()
            prune(work / "run", keep_last=1)
    finally:
        saver.close()
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in res.items()}
    gb = nbytes / 1e9
    out = {
        "bytes": nbytes,
        "repeats": args.repeats,
        "raw_write_gbps": round(gb / med["raw_w"], 3),
        "save_gbps": round(gb / med["save"], 3),
        "save_vs_raw_write": round(med["raw_w"] / med["save"], 3),
        "raw_read_cold_gbps": round(gb / med["raw_r"], 3),
        "load_verified_cold_gbps": round(gb / med["load"], 3),
        "load_vs_raw_read": round(med["raw_r"] / med["load"], 3),
        "sync_save_s": round(med["save"], 3),
        "async_blocked_s": round(med["async"], 4),
        "async_blocked_fraction": round(med["async"] / med["save"], 4),
        "async_first_blocked_s": round(first_async, 4),
        "prune_s": round(med["prune"], 3),
        "goal_save_ge_0.7x_raw": med["raw_w"] / med["save"] >= 0.7,
        "goal_async_blocked_lt_10pct": med["async"] / med["save"] < 0.1,
        "seconds_each": {k: [round(x, 3) for x in v] for k, v in res.items()},
    }
    json.dump(out, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
