"""What the training loop needs from a training backend, and how a run spec picks one.

Two backends share the loop, the mixture sampler and the checkpoint store:

* ``deepspeed`` (``engine.DeepSpeedBackend``): the Hugging Face model in a DeepSpeed engine,
  data parallel with ZeRO stages 0-3; runs on CPUs (gloo) and GPUs.
* ``megatron`` (``megatron_engine.MegatronBackend``): megatron-core's ``GPTModel`` with tensor and
  pipeline parallelism, megatron's DDP and distributed optimizer; CUDA only.

Both speak Hugging Face names at the boundary: checkpoints hold full (unsharded) HF-named weights
and per-parameter optimizer state (``<name>/master``, ``<name>/exp_avg``, ``<name>/exp_avg_sq``),
so a checkpoint written by either backend, at any parallel layout, starts or resumes the other.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.distributed as dist
import transformers

from midtrain.checkpoints import Checkpoint
from midtrain.checkpoints.host_buffers import HostCopy
from midtrain.config import RunSpec
from midtrain.data_mixing.sampler import Batch
from midtrain.training.checkpointing import StartPoint


class Backend(Protocol):
    device: torch.device
    hf_config: transformers.PretrainedConfig
    data_rank: int  # this rank's data-parallel replica: which rows of each global batch it reads
    data_world: int  # data-parallel replicas

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's param groups, whose ``lr`` the schedule sets before each step."""
        ...

    def train_step(self, batch: Batch, num_sources: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over this replica's rows of the global batch. Returns CPU float64
        (loss sum, sequence count) per source, summed over the whole global batch (all ranks)."""
        ...

    def grad_norm(self) -> float | None:
        """The global gradient norm of the last step, before clipping."""
        ...

    def full_model_state(self, copy: HostCopy) -> dict[str, torch.Tensor] | None:
        """A collective: the full HF-named weights on rank 0, None elsewhere. Each tensor goes
        to the host through ``copy(hf_name, tensor)`` (the checkpoint's reused host buffers)."""
        ...

    def optimizer_state(self, copy: HostCopy) -> dict[str, torch.Tensor]:
        """A collective: the full per-parameter optimizer tensors that this rank saves, each
        through ``copy("<hf_name>/<state>", tensor)``; every parameter is saved by exactly one
        rank. Empty before the first step."""
        ...

    def load_optimizer_state(self, ckpt: Checkpoint, step: int) -> None:
        """Master weights and moments from a checkpoint saved at any parallel layout."""
        ...

    def optimizer_step_count(self) -> int: ...


def build_backend(spec: RunSpec, start: StartPoint, rank: int, world: int) -> Backend:
    """The backend ``train.backend`` names, with the start point's weights loaded."""
    if spec.train.backend == "megatron":
        from midtrain.training.megatron_engine import MegatronBackend

        return MegatronBackend(spec, start, rank, world)
    from midtrain.training.engine import DeepSpeedBackend

    return DeepSpeedBackend(spec, start, rank, world)


def reduce_source_totals(
    losses: torch.Tensor | None, source_ids: torch.Tensor, num_sources: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A collective: (loss sum, sequence count) per source over the whole global batch, as CPU
    float64, from this rank's per-sequence ``losses`` (None: a rank that contributes none, such as
    an earlier pipeline stage). One all-reduce of one tensor on ``device`` (NCCL reduces GPU
    tensors only), one copy back to the host."""
    totals = torch.zeros(2 * num_sources, dtype=torch.float64, device=device)
    if losses is not None:
        losses = losses.detach().to(device, torch.float64)
        ids = source_ids.to(device)
        totals[:num_sources].index_add_(0, ids, losses)
        totals[num_sources:].index_add_(0, ids, torch.ones_like(losses))
    dist.all_reduce(totals)
    totals = totals.cpu()
    return totals[:num_sources], totals[num_sources:]
