"""Training throughput on one GPU: tokens/s, MFU and peak memory of a ~1B Llama at sequence length
2048 in bf16, for three training steps over the same model shape in the same run. Prints JSON.

    .venv/bin/python benchmarks/throughput.py [--backends plain,deepspeed,megatron]
        [--micro-batch 4] [--steps 20] [--warmup 5] [--no-compile] [--preset 1b|tiny]
        [--timeout 240] [--out-dir DIR]

* ``plain``: the reference. A plain PyTorch loop over the HF model: fp32 weights, bf16 autocast,
  ``torch.compile``, fused AdamW, grad clipping; midtrain's own loss function.
* ``deepspeed``: the trainer's DeepSpeed backend (``midtrain.training.engine.DeepSpeedBackend``)
  built from a run spec (bf16, ZeRO-1, fused AdamW, ``torch.compile`` unless ``--no-compile``),
  stepped through ``train_step`` exactly as the training loop steps it.
* ``megatron``: the trainer's megatron backend (``midtrain.training.megatron_engine``):
  megatron-core's ``GPTModel`` (Transformer Engine spec if installed, otherwise the local spec
  with SDPA attention), megatron's DDP and distributed optimizer (bf16, fp32 master weights and
  gradient reduction), through the same ``train_step``.

Each backend runs in its own process (one GPU, world size 1), so one's memory and compile caches
do not touch another's. Batches are random tokens already on the GPU: this measures the model
step, not data loading. Step times are wall-clock over ``--steps`` steps after ``--warmup``, with
one synchronisation at each end (the steps themselves never wait for the host). MFU uses the
trainer's formula (``midtrain.training.flops``) against the GPU's dense bf16 peak; peak memory is
``torch.cuda.max_memory_allocated`` over the whole process.

With ``--out-dir DIR``, each backend's result is appended to ``DIR/results.jsonl`` as soon as it
is known, and the child processes' output goes to ``DIR/run.log`` as it is written, so a run
killed part-way still leaves the figures and the log of the backends it got through. A backend
that has not finished after ``--timeout`` seconds is stopped and reported as an error.

Without a CUDA GPU it measures nothing and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

BACKENDS = ("plain", "deepspeed", "megatron")

# Llama 3.2 1B's shape (1.24B parameters, tied embeddings), with plain RoPE: the RoPE scaling
# variant changes no FLOPs. "tiny" is for checking the code paths quickly on a GPU.
PRESETS: dict[str, dict[str, Any]] = {
    "1b": {
        "hidden_size": 2048,
        "num_layers": 16,
        "num_heads": 32,
        "num_kv_heads": 8,
        "ffn_hidden_size": 8192,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "tie_embeddings": True,
    },
    "tiny": {
        "hidden_size": 256,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "ffn_hidden_size": 688,
        "vocab_size": 4096,
        "tie_embeddings": True,
    },
}

NO_GPU = (
    "benchmarks/throughput.py needs a CUDA GPU: torch.cuda.is_available() is False here "
    "(torch {version}). Nothing was measured."
)


# --- shared ---------------------------------------------------------------------------------------


def run_spec(args: argparse.Namespace, backend: str = "deepspeed") -> Any:
    """A run spec for the benchmark's shape: what the trainer would be given (paths are unused).
    ``plain`` reads only its shape and optimizer settings."""
    from midtrain.config import RunSpec
    from midtrain.config_io import validate

    data = {
        "run_dir": "benchmark-run",
        "model": {
            "tokenizer": "unused",
            "config": PRESETS[args.preset],
            # megatron-core brings its own kernels; compiling applies to the HF model.
            "compile": args.compile and backend != "megatron",
        },
        "mixture": {
            "seq_length": args.seq_length,
            "sources": [{"name": "random", "kind": "curated", "path": ["unused"], "weight": 1.0}],
        },
        "optimizer": {"lr": 3e-4, "weight_decay": 0.1, "grad_clip": 1.0},
        "schedule": {"kind": "constant"},
        "train": {
            "global_batch_size": args.micro_batch,
            "micro_batch_size": args.micro_batch,
            "max_steps": args.warmup + args.steps,
            "precision": "bf16",
            "zero_stage": 1,
            "deterministic": False,
            "backend": "megatron" if backend == "megatron" else "deepspeed",
        },
        "workers": 1,
    }
    return validate(RunSpec, data, "benchmarks/throughput.py")


def hf_config(spec: Any) -> Any:
    from midtrain.training.model import llama_config

    shape = spec.model.config
    return llama_config(shape, shape.vocab_size, spec.mixture.seq_length, "sdpa")


def random_batches(n: int, batch: int, seq: int, vocab: int) -> list[torch.Tensor]:
    """``n`` batches of ``seq + 1`` random tokens (inputs and their next tokens), on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randint(0, vocab, (batch, seq + 1), device="cuda", generator=g) for _ in range(n)]


def timed(step: Any, batches: list[torch.Tensor], warmup: int) -> tuple[float, list[float]]:
    """Run ``step`` over the batches; seconds over the batches after ``warmup``, and the losses."""
    losses = []
    for tokens in batches[:warmup]:
        losses.append(step(tokens))
    torch.cuda.synchronize()
    start = time.perf_counter()
    for tokens in batches[warmup:]:
        losses.append(step(tokens))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    # .item() only now. The trainer backends' steps do sync once each (their per-source loss
    # totals come back to the host, as in training); the plain loop's never does.
    return seconds, [float(x) for x in losses]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process_group() -> None:
    """World size 1 in this process: NCCL on GPU 0, gloo where there is no GPU."""
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)


# --- the three backends ---------------------------------------------------------------------------


def plain_step(spec: Any) -> Any:
    from midtrain.training.model import build_model, parameter_groups, sequence_losses

    model = build_model(hf_config(spec), seed=1).cuda()
    opt = torch.optim.AdamW(
        parameter_groups(model, spec.optimizer.weight_decay),
        lr=spec.optimizer.lr,
        betas=spec.optimizer.betas,
        fused=True,
    )
    forward = torch.compile(model) if spec.model.compile else model

    def step(tokens: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = sequence_losses(forward, tokens).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.optimizer.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def trainer_step(spec: Any) -> Any:
    """midtrain's own step: the trainer's backend (``midtrain.training.backend``), built from the
    run spec and stepped as the training loop steps it, per-source loss reduction included."""
    from midtrain.data_mixing.sampler import Batch
    from midtrain.training.backend import build_backend
    from midtrain.training.checkpointing import StartPoint

    init_single_process_group()
    # A new model of the preset's shape, initialised as a run from model.config is.
    start = StartPoint("config", "benchmark", hf_config(spec), tokenizer_dir=None, seed=1)
    backend = build_backend(spec, start, rank=0, world=1)
    sources = torch.zeros(spec.train.global_batch_size, dtype=torch.long)

    def step(tokens: torch.Tensor) -> torch.Tensor:
        loss_sum, count = backend.train_step(Batch(tokens, sources, 0), 1)
        return loss_sum.sum() / count.sum()

    if spec.train.backend == "megatron":
        step.layer_spec = backend.conv.layer_spec  # type: ignore[attr-defined]
    return step


STEPS = {"plain": plain_step, "deepspeed": trainer_step, "megatron": trainer_step}


def measure(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    """One backend, in this process."""
    from midtrain.training.flops import mfu, peak_flops, training_flops_per_token

    spec = run_spec(args, backend)
    torch.manual_seed(1)
    step = STEPS[backend](spec)
    seq, batch = spec.mixture.seq_length, spec.train.micro_batch_size
    vocab = spec.model.config.vocab_size
    seconds, losses = timed(
        step, random_batches(args.warmup + args.steps, batch, seq, vocab), args.warmup
    )
    tokens_per_s = args.steps * batch * seq / seconds
    flops = training_flops_per_token(hf_config(spec), seq)
    result = {
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": mfu(tokens_per_s, flops, peak_flops("cuda", "bf16")),
        "step_time_s": round(seconds / args.steps, 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }
    if hasattr(step, "layer_spec"):
        result["layer_spec"] = step.layer_spec
    return result


# --- driver ---------------------------------------------------------------------------------------


def exit_on_sigterm() -> None:
    """Turn SIGTERM (``timeout``'s signal) into ``SystemExit``, so that ``finally`` blocks stop the
    child process and remove temporary folders."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def run_logged(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> int | None:
    """Run ``cmd`` with its stdout and stderr appended to ``log`` as they are written (nothing is
    held in memory). Its exit status, or None when it was stopped after ``timeout`` seconds. The
    child is killed also when this process is interrupted (SIGTERM via ``exit_on_sigterm``)."""
    with log.open("ab") as f:
        f.write(f"== {shlex.join(cmd)}\n".encode())
        f.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def log_tail(log: Path, start: int, chars: int = 3000) -> str:
    """The last ``chars`` characters that were written to ``log`` after byte ``start``."""
    with log.open("rb") as f:
        f.seek(max(start, log.stat().st_size - 4 * chars))
        return f.read().decode(errors="replace")[-chars:]


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """One JSON line, on disk before this returns: a later kill cannot take it back."""
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_child(backend: str, args: argparse.Namespace, log: Path) -> dict[str, Any]:
    """Measure ``backend`` in a fresh process whose output goes to ``log``; a failure (or a hang
    past ``--timeout``) is reported, not fatal to the others."""
    env = {**os.environ, "DS_ACCELERATOR": "cuda", "MASTER_PORT": str(free_port())}
    start = log.stat().st_size if log.exists() else 0
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--child", backend, "--child-out", str(out), *args.argv]
        code = run_logged(cmd, env, log, args.timeout)
        if code is None:
            error = f"no result after {args.timeout:.0f} s"
        elif code != 0 or not out.exists():
            error = f"exit {code}"
        else:
            return json.loads(out.read_text())
    return {"error": error, "stderr_tail": log_tail(log, start)}


def run_all(backends: list[str], args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Each backend in turn; its result goes to ``out_dir/results.jsonl`` as soon as it is known."""
    results = {}
    for backend in backends:
        results[backend] = run_child(backend, args, out_dir / "run.log")
        record = {"backend": backend, "args": args.argv, **results[backend]}
        append_jsonl(out_dir / "results.jsonl", record)
    return results


def summary(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from midtrain.training.flops import non_embedding_params, training_flops_per_token

    spec = run_spec(args)
    config = hf_config(spec)
    embedding = config.vocab_size * config.hidden_size
    plain = results.get("plain", {}).get("tokens_per_s")
    for name, r in results.items():
        if name != "plain" and plain and "tokens_per_s" in r:
            r["speedup_vs_plain"] = round(r["tokens_per_s"] / plain, 3)
    return {
        "benchmark": "throughput",
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "model": {
            "preset": args.preset,
            "parameters": non_embedding_params(config) + embedding,
            "flops_per_token": training_flops_per_token(config, args.seq_length),
            **PRESETS[args.preset],
        },
        "seq_length": args.seq_length,
        "micro_batch": args.micro_batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "compile": args.compile,
        "results": results,
    }


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument(
        "--timeout", type=float, default=240, help="seconds per backend (default: 240)"
    )
    parser.add_argument(
        "--out-dir", help="write each result (results.jsonl) and the runs' log (run.log) here"
    )
    parser.add_argument("--child", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # What a child process is given: the measurement settings, not the driver's own choices.
    args.argv = [
        f"--preset={args.preset}",
        f"--seq-length={args.seq_length}",
        f"--micro-batch={args.micro_batch}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        *([] if args.compile else ["--no-compile"]),
    ]
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    if not torch.cuda.is_available():
        print(NO_GPU.format(version=torch.__version__), file=sys.stderr)
        return 2
    if args.child:
        Path(args.child_out).write_text(json.dumps(measure(args.child, args)))
        return 0
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        print(f"--backends: unknown {', '.join(unknown)}; choose from {BACKENDS}", file=sys.stderr)
        return 2
    exit_on_sigterm()
    if args.out_dir:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        results = run_all(backends, args, Path(args.out_dir))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            results = run_all(backends, args, Path(tmp))
    print(json.dumps(summary(args, results), indent=2))
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
