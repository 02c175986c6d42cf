"""One rank's part of a megatron-core model: which tensors it holds (its pipeline stage's layers,
their tensor-parallel pieces), how they convert to and from Hugging Face names, how the stages'
weights gather on rank 0, and the loss over vocabulary-parallel logits.

These need ``torch.distributed`` and megatron's ``parallel_state``, not CUDA: they are tested on
CPU with gloo at tensor 2 x pipeline 2 (tests/test_megatron_cpu.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from midtrain.checkpoints.host_buffers import HostCopy
from midtrain.checkpoints.megatron_convert import (
    GPTShape,
    LayerSpec,
    PipelineStage,
    hf_sources,
    hf_to_mcore_tensor,
    iter_hf_to_mcore,
    mcore_tensor_to_hf,
    padded_vocab_size,
    pipeline_stage,
    tensor_parallel_piece,
    unshard_tensor_parallel,
)


@dataclass
class RankConversion:
    """HF <-> megatron-core for the part of the model one rank holds: its pipeline stage's
    tensors (local layer numbers), and of those its tensor-parallel piece."""

    shape: GPTShape
    layer_spec: LayerSpec
    padded_vocab: int
    stage: PipelineStage
    tp: int
    tp_rank: int
    tp_group: Any = None  # the tensor-parallel process group (None: the default group)

    @classmethod
    def from_parallel_state(cls, hf_config: Any, layer_spec: LayerSpec) -> RankConversion:
        """This rank's part, from megatron's ``parallel_state`` (initialised by the caller)."""
        shape = GPTShape.from_hf_config(hf_config)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        return cls(
            shape=shape,
            layer_spec=layer_spec,
            padded_vocab=padded_vocab_size(shape.vocab_size, tp),
            stage=pipeline_stage(
                shape.num_layers,
                parallel_state.get_pipeline_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_rank(),
            ),
            tp=tp,
            tp_rank=parallel_state.get_tensor_model_parallel_rank(),
            tp_group=parallel_state.get_tensor_model_parallel_group(),
        )

    def rank_weights(self, hf: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
        """This rank's tensors from a whole model's HF tensors, built one at a time: from a
        ``LazyTensors`` the rank reads its stage's tensors only and holds its own pieces plus
        one layer's full tensors, not the model."""
        converted = iter_hf_to_mcore(
            hf,
            self.shape,
            self.layer_spec,
            padded_vocab_size=self.padded_vocab,
            where=where,
            stage=self.stage,
        )
        return {name: self._piece(name, full) for name, full in converted}

    def rank_piece(self, name: str, hf: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """This rank's piece of the megatron tensor ``name``, from the HF tensors it is made of
        (``hf_sources``)."""
        full = hf_to_mcore_tensor(
            name,
            hf,
            self.shape,
            self.layer_spec,
            padded_vocab_size=self.padded_vocab,
            stage=self.stage,
        )
        return self._piece(name, full)

    def _piece(self, name: str, full: torch.Tensor) -> torch.Tensor:
        return tensor_parallel_piece(name, full, self.shape, self.tp, self.tp_rank)

    def hf_sources(self, name: str) -> list[str]:
        return hf_sources(name, self.shape, self.layer_spec, stage=self.stage)

    def join(self, name: str, piece: torch.Tensor) -> torch.Tensor:
        """A collective over the tensor-parallel group: the full tensor from every rank's piece."""
        if self.tp == 1:
            return piece
        pieces = [torch.empty_like(piece) for _ in range(self.tp)]
        dist.all_gather(pieces, piece.contiguous(), group=self.tp_group)
        return unshard_tensor_parallel([{name: p} for p in pieces], check_replicas=False)[name]

    def vocab_padding(self, device: torch.device) -> torch.Tensor | None:
        """Which of this rank's vocabulary columns are padding (None where none are)."""
        columns = self.padded_vocab // self.tp
        first = self.tp_rank * columns
        padding = torch.arange(first, first + columns, device=device) >= self.shape.vocab_size
        return padding if bool(padding.any()) else None

    def to_hf(self, name: str, full: torch.Tensor) -> dict[str, torch.Tensor]:
        """The HF tensors of a full megatron tensor (none for the last stage's tied copy)."""
        return mcore_tensor_to_hf(
            name,
            full,
            self.shape,
            self.layer_spec,
            padded_vocab_size=self.padded_vocab,
            stage=self.stage,
        )


def token_losses(
    logits: torch.Tensor, labels: torch.Tensor, padding: torch.Tensor | None
) -> torch.Tensor:
    """Next-token cross-entropy [b, s] from this tensor-parallel rank's logits [b, s, vocab/tp]
    over the real vocabulary: the padding columns (the vocabulary is padded to split evenly over
    tensor-parallel ranks) are masked out, so the loss is the HF model's, and the padded rows get
    no gradient (they stay zero and are cut off on save, so a resume is exact)."""
    logits = logits.float()
    if padding is not None:
        logits = logits.masked_fill(padding, float("-inf"))
    return tensor_parallel.vocab_parallel_cross_entropy(logits, labels)


def gather_model_state(
    conv: RankConversion,
    params: list[tuple[str, torch.Tensor]],
    data_rank: int,
    device: torch.device,
    copy: HostCopy,
) -> dict[str, torch.Tensor] | None:
    """A collective: the whole model's HF-named weights as host copies (made by ``copy``) on
    global rank 0, None elsewhere. Each stage's first data-parallel replica joins its
    tensor-parallel pieces, one parameter at a time; the first rank of each later stage sends
    them to rank 0 as it goes, straight from the GPU (a list of names, shapes and dtypes, then
    the tensors; an empty list ends the stage), so no rank holds a second copy of its stage."""
    rank = dist.get_rank()
    state: dict[str, torch.Tensor] = {}
    one_stage = conv.stage.first and conv.stage.last
    sends = not one_stage and rank != 0 and data_rank == 0 and conv.tp_rank == 0
    if data_rank == 0:  # weights are the same on every data-parallel replica
        for name, param in params:
            full = conv.join(name, param.detach())
            if conv.tp_rank != 0:
                continue
            hf = conv.to_hf(name, full)  # {} for a tied output layer: saved as the embedding
            if sends:
                if hf:  # an empty list ends the stage
                    _send_tensors(hf, device)
            else:
                state.update({k: copy(k, v) for k, v in hf.items()})
    if sends:
        _send_tensors({}, device)
    if one_stage or rank != 0:
        return state if rank == 0 else None
    stage_ranks = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
    for src in stage_ranks[1:]:
        while True:
            header: list[Any] = [None]
            dist.recv_object_list(header, src=src, device=device)
            if not header[0]:
                break
            for name, shape, dtype in header[0]:
                buffer = torch.empty(shape, dtype=dtype, device=device)
                dist.recv(buffer, src=src)
                state[name] = copy(name, buffer)
    return state


def _send_tensors(tensors: Mapping[str, torch.Tensor], device: torch.device) -> None:
    header = [[(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]]
    dist.send_object_list(header, dst=0, device=device)
    for tensor in tensors.values():
        dist.send(tensor.to(device).contiguous(), dst=0)
    if device.type == "cuda":
        # NCCL sends do not block the host: without this wait a stage would run ahead and keep
        # every joined tensor alive on its GPU until rank 0 gets round to receiving them.
        torch.cuda.current_stream(device).synchronize()
