"""The training loop that every worker runs.

It needs only an initialised ``torch.distributed`` process group (Ray Train sets one up; so can a
plain multi-process launcher), so the loop itself knows nothing of Ray, and nothing of the
training backend beyond ``backend.Backend``. One optimizer step:

    batch = this data-parallel replica's slice of the next global batch of the mixture
    backend step: forward/backward over its micro-batches, clip, AdamW; losses per source
    losses per source are summed over ranks and logged; checkpoint at the interval
"""

from __future__ import annotations

import dataclasses
import os
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from midtrain.checkpoints import capture_rng_state, restore_rng_state
from midtrain.config import RunSpec
from midtrain.data_mixing.sampler import MixtureSampler
from midtrain.errors import ConfigError
from midtrain.training.backend import Backend, build_backend
from midtrain.training.checkpointing import RunCheckpointer, agree_on_start
from midtrain.training.control import StopFlag
from midtrain.training.flops import mfu, peak_flops, training_flops_per_token
from midtrain.training.metrics import MetricsWriter


@dataclass
class Progress:
    """What a checkpoint records about where the run is, besides the sampler's own state."""

    step: int = 0
    tokens: int = 0
    tokens_by_source: dict[str, int] = field(default_factory=dict)

    def advance(
        self, loss_sum: torch.Tensor, count: torch.Tensor, sources: list[str], seq_length: int
    ) -> float:
        """Count one finished step; returns its mean loss over all sequences of the global batch."""
        self.step += 1
        for name, n in zip(sources, count.tolist(), strict=True):
            self.tokens_by_source[name] += int(n) * seq_length
        self.tokens += int(count.sum()) * seq_length
        return float(loss_sum.sum() / count.sum())

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "tokens_by_source": self.tokens_by_source}


@dataclass
class RunTiming:
    """Where rank 0's time went in this session of the run, for the run summary (the budgets a
    run is held to: data loading well under 1% of step time, checkpoint saves under 2% of the
    run)."""

    run_s: float = 0.0  # the training loop, first step to the last save
    steps_s: float = 0.0  # inside steps: drawing the batch, forward/backward, optimizer
    data_s: float = 0.0  # drawing batches from the mixture (and setting the step's LR)
    checkpoint_s: float = 0.0  # training blocked by saves: gathering state, copying it out

    def state_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in dataclasses.asdict(self).items()}


@dataclass
class Outcome:
    status: str  # "completed" | "preempted"
    step: int
    loss: float | None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(spec: RunSpec) -> Outcome:
    rank, world = dist.get_rank(), dist.get_world_size()
    if spec.train.deterministic:
        # cuBLAS is deterministic only with a fixed workspace, set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # Warn-only: an op with no deterministic kernel must not stop a run. On CUDA that leaves
        # flash/memory-efficient attention's backward non-deterministic (see performance.md).
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Deterministic mode also NaN-fills every new empty tensor; nothing here reads one.
        torch.utils.deterministic.fill_uninitialized_memory = False
    seed_everything(spec.train.seed)

    start, saver_lock = agree_on_start(spec, rank)
    backend = build_backend(spec, start, rank, world)
    sampler = MixtureSampler(spec.mixture, total_sequences=spec.total_sequences)
    schedule = spec.schedule.build(
        peak_lr=spec.optimizer.lr, total_steps=spec.train.max_steps, rewarm_from_lr=start.lr
    )
    progress = Progress(tokens_by_source={name: 0 for name in sampler.source_names})
    if start.optimizer is not None:
        backend.load_optimizer_state(start.optimizer, start.optimizer_step)
    if start.resume_state is not None:
        state = start.resume_state
        sampler.load_state_dict(state["sampler"])
        progress = Progress(state["step"], state["tokens"], dict(state["tokens_by_source"]))
        restore_rng_state(state["rng"])

    checkpointer = RunCheckpointer(spec, rank, world, start, saver_lock)
    stop = StopFlag(spec.run_dir, backend.device)
    metrics = StepMetrics(spec, backend, sampler.source_names, progress.step) if rank == 0 else None
    loss, status = None, "completed"
    timing, started = RunTiming(), time.perf_counter()

    while progress.step < spec.train.max_steps:
        t0 = time.perf_counter()
        step = progress.step
        lr = schedule.apply(backend.param_groups(), step)
        batch = sampler.next_batch_for_rank(
            spec.train.global_batch_size, backend.data_rank, backend.data_world
        )
        data_s = time.perf_counter() - t0
        loss_sum, count = backend.train_step(batch, len(sampler.source_names))
        loss = progress.advance(loss_sum, count, sampler.source_names, spec.mixture.seq_length)
        step_s = time.perf_counter() - t0
        timing.steps_s += step_s
        timing.data_s += data_s

        stopping = stop.requested()  # a collective: every rank stops at the same step
        last = progress.step == spec.train.max_steps
        logged = progress.step % spec.train.log_interval == 0 or last or stopping
        if metrics is not None and logged:
            metrics.log(progress, loss_sum, count, lr, schedule.phase(step), step_s, data_s)
        if (
            stopping
            or last
            or progress.step % (spec.checkpoint.interval or spec.train.max_steps) == 0
        ):
            t_save = time.perf_counter()
            checkpointer.save(
                step=progress.step,
                backend=backend,
                trainer_state={
                    **progress.state_dict(),
                    "sampler": sampler.state_dict(),
                    "schedule": schedule.state_dict(),
                    "optimizer_step": backend.optimizer_step_count(),
                    "rng": capture_rng_state(),
                    "rewarm_from_lr": start.lr,
                    "world_size": world,
                },
                lr=lr,
                phase=schedule.phase(step),
                loss=loss,
                blocking=last or stopping or not spec.checkpoint.async_save,
            )
            timing.checkpoint_s += time.perf_counter() - t_save
        if stopping and not last:
            status = "preempted"
            break

    checkpointer.close()
    timing.run_s = time.perf_counter() - started
    if metrics is not None:
        metrics.close()
    if rank == 0:
        stop.write_status(status, progress.step, loss, timing.state_dict())
    return Outcome(status, progress.step, loss)


class StepMetrics:
    """Rank 0's per-step record: loss per source, tokens per source, LR, grad norm, speed, MFU."""

    def __init__(
        self, spec: RunSpec, backend: Backend, sources: list[str], start_step: int
    ) -> None:
        self.backend, self.sources = backend, sources
        self.tokens_per_step = spec.train.global_batch_size * spec.mixture.seq_length
        self.flops_per_token = training_flops_per_token(backend.hf_config, spec.mixture.seq_length)
        self.peak = peak_flops(backend.device, "bf16" if spec.train.precision == "bf16" else "fp32")
        self.world = spec.workers
        self.writer = MetricsWriter(spec.run_dir, start_step, spec.train.tensorboard)

    def log(
        self,
        progress: Progress,
        loss_sum: torch.Tensor,
        count: torch.Tensor,
        lr: float,
        phase: str,
        seconds: float,
        data_seconds: float,
    ) -> None:
        tokens_per_s = self.tokens_per_step / seconds
        grad_norm = self.backend.grad_norm()
        self.writer.log(
            {
                "step": progress.step,
                "loss": float(loss_sum.sum() / count.sum()),
                "loss_by_source": {
                    name: float(loss_sum[j] / count[j])
                    for j, name in enumerate(self.sources)
                    if count[j]
                },
                "tokens": progress.tokens,
                "tokens_by_source": dict(progress.tokens_by_source),
                "lr": lr,
                "phase": phase,
                "grad_norm": grad_norm,
                "tokens_per_s": tokens_per_s,
                "mfu": mfu(tokens_per_s / self.world, self.flops_per_token, self.peak),
                "step_time_s": seconds,
                "data_time_s": data_seconds,
                "time": time.time(),
            }
        )

    def close(self) -> None:
        self.writer.close()


def worker_entry(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: the spec travels as its resolved YAML text."""
    from midtrain.config import run_spec_from_yaml
    from midtrain.runtime_env import setup_process

    setup_process()
    spec_path = Path(config["spec_path"])
    spec = run_spec_from_yaml(config["spec_yaml"], source=str(spec_path))
    if not spec_path.is_file():  # the driver wrote it before starting the workers
        raise ConfigError(
            f"run_dir {spec.run_dir} is not visible on node {socket.gethostname()} (the driver "
            f"wrote {spec_path.name} there): on a cluster, run_dir must be on a filesystem every "
            "node mounts at the same path"
        )
    torch.set_num_threads(spec.launch.cpus_per_worker)
    StopFlag(spec.run_dir).record_worker_pid(dist.get_rank())
    train(spec)
