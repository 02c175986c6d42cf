"""The megatron backend: megatron-core's ``GPTModel`` with tensor and pipeline parallelism, megatron's
DDP (fp32 gradient reduction) and distributed optimizer. CUDA only: megatron allocates its
gradient buffers, optimizer and clipping tensors on the current CUDA device.

Checkpoints stay in midtrain's format (HF names, full tensors), so this backend and the DeepSpeed
one start from and resume each other's checkpoints at any layout:

* weights load from the start point's HF state dict: each rank converts its pipeline stage
  (``hf_to_mcore(stage=...)``) and keeps its tensor-parallel shard;
* saving gathers one parameter at a time: the distributed optimizer's shards are summed over the
  data-parallel group (each rank fills the slice it owns), the tensor-parallel pieces are joined,
  and ``mcore_tensor_to_hf`` turns the full tensor into HF-named ones. The optimizer state of
  parameters is dealt round-robin over the ranks of their pipeline stage, which all hold the full
  tensor by then;
* the weights are written by rank 0 (a stage-0 rank; later stages send theirs over).

Ranks are laid out by ``parallel_state``: tensor-parallel ranks are adjacent, then data parallel,
then pipeline stages, so global rank 0 is stage 0's first tensor- and data-parallel rank.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import (
    ChainedOptimizer,
    DistributedOptimizer,
    OptimizerConfig,
    get_megatron_optimizer,
)
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from midtrain.checkpoints import Checkpoint
from midtrain.checkpoints.host_buffers import HostCopy
from midtrain.checkpoints.megatron_convert import LayerSpec
from midtrain.config import RunSpec
from midtrain.data_mixing.sampler import Batch
from midtrain.errors import CheckpointError, ConfigError
from midtrain.training.backend import reduce_source_totals
from midtrain.training.checkpointing import StartPoint
from midtrain.training.megatron_model import (
    build_gpt_model,
    have_transformer_engine,
    load_mcore_weights,
)
from midtrain.training.megatron_shard import RankConversion, gather_model_state, token_losses
from midtrain.training.model import build_model
from midtrain.training.parallel import check_model_fits
from midtrain.training.state_tensors import (
    ADAM_STATES,
    STATE_KEYS,
    check_optimizer_keys,
    dealt,
)


class MegatronBackend:
    """``Backend`` for megatron-core (see the module docstring)."""

    def __init__(self, spec: RunSpec, start: StartPoint, rank: int, world: int) -> None:
        if not torch.cuda.is_available():
            raise ConfigError("train.backend: the megatron backend needs a CUDA GPU")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.spec, self.rank = spec, rank
        tp, pp = spec.parallel.tensor, spec.parallel.pipeline
        # No gloo groups: megatron uses them only for its own checkpoint format, and gloo must
        # resolve the host name, which fails on machines without a network.
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            create_gloo_process_groups=False,
        )
        model_parallel_cuda_manual_seed(spec.train.seed)
        self.data_rank = parallel_state.get_data_parallel_rank()
        self.data_world = parallel_state.get_data_parallel_world_size()
        self.hf_config = start.hf_config
        check_model_fits(tp, pp, self.hf_config, start.config_file, spec.mixture.seq_length)
        layer_spec: LayerSpec = "te" if have_transformer_engine() else "local"
        self.conv = RankConversion.from_parallel_state(self.hf_config, layer_spec)
        self.dtype = torch.bfloat16 if spec.train.precision == "bf16" else torch.float32

        gpt = build_gpt_model(
            self.hf_config,
            tensor_parallel=tp,
            pipeline_parallel=pp,
            dtype=self.dtype,
            spec=layer_spec,
            padded_vocab_size=self.conv.padded_vocab,
            max_sequence_length=spec.mixture.seq_length,
            recompute=spec.model.activation_checkpointing,
        )
        # Weights go in before DDP and the optimizer exist: DDP copies them into its buffers and
        # the distributed optimizer takes its fp32 master shards from them.
        load_mcore_weights(gpt, self._start_weights(start), start.source)
        self.model = DistributedDataParallel(
            config=gpt.config,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, overlap_grad_reduce=True, use_distributed_optimizer=True
            ),
            module=gpt,
        )
        opt = spec.optimizer
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=opt.lr,
                weight_decay=opt.weight_decay,
                adam_beta1=opt.betas[0],
                adam_beta2=opt.betas[1],
                adam_eps=opt.eps,
                # Megatron measures the gradient norm only to clip it (and reports 0.0 when it
                # does not): an infinite threshold measures it and never clips.
                clip_grad=math.inf if opt.grad_clip is None else opt.grad_clip,
                bf16=self.dtype == torch.bfloat16,
                params_dtype=self.dtype,
                use_distributed_optimizer=True,
            ),
            [self.model],
            use_gloo_process_groups=False,
        )
        # Megatron marks norms and biases wd_mult 0 but leaves applying it to its LR scheduler,
        # which midtrain does not use: no decay on 1-D tensors, as in the DeepSpeed backend.
        for group in self.optimizer.param_groups:
            group["weight_decay"] = opt.weight_decay * group.get("wd_mult", 1.0)
        config = gpt.config
        config.finalize_model_grads_func = finalize_model_grads  # DP sync, tied-embedding grads
        config.grad_scale_func = self.optimizer.scale_loss
        config.no_sync_func = self.model.no_sync  # reduce grads once, after the last micro-batch
        self._forward_backward = get_forward_backward_func()
        self._positions = torch.arange(spec.mixture.seq_length, device=self.device).expand(
            spec.train.micro_batch_size, -1
        )
        self._grad_norm: float | None = None
        # Optimizer steps taken, counted here rather than read from the optimizer's state: a
        # data-parallel rank may own no shard of any parameter, and every rank must agree.
        self._steps = 0
        self._vocab_padding = self.conv.vocab_padding(self.device)
        # The trained parameters by megatron name (a stage's local layer numbers), in the same
        # order on every rank of a stage; each is saved by one rank of the stage.
        self._params = list(gpt.named_parameters())
        here = self.data_rank * tp + self.conv.tp_rank  # this rank's index within its stage
        self._saved_here = dealt([name for name, _ in self._params], tp * self.data_world, here)

    # --- start --------------------------------------------------------------------------------

    def _start_weights(self, start: StartPoint) -> dict[str, torch.Tensor]:
        """This rank's tensor-parallel shard of its stage, from the start point's HF weights (a
        new model is initialised by the HF model class, as the DeepSpeed backend does, so both
        backends start a configured run from the same weights). A checkpoint's weights are read
        one tensor at a time, this rank's stage only."""
        hf: Mapping[str, torch.Tensor]
        if start.weights is not None:
            hf = start.weights()
        else:
            new = build_model(self.hf_config, start.seed).state_dict()
            if self.conv.shape.tie_embeddings:
                new.pop("lm_head.weight", None)
            hf = new
        return self.conv.rank_weights(hf, start.source)  # cast per parameter as they load

    # --- a step -------------------------------------------------------------------------------

    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def train_step(self, batch: Batch, num_sources: int) -> tuple[torch.Tensor, torch.Tensor]:
        micro = self.spec.train.micro_batch_size
        tokens = batch.tokens.to(self.device, non_blocking=True)
        chunks = iter(tokens.split(micro))
        per_sequence: list[torch.Tensor] = []  # filled on the last pipeline stage only

        def forward_step(data: Any, model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
            chunk = next(data)
            # This tensor-parallel rank's logits [b, s, vocab/tp] on the last stage, activations
            # for the next stage elsewhere.
            output = model(chunk[:, :-1], self._positions, None)

            def loss_func(logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
                losses = token_losses(logits, chunk[:, 1:], self._vocab_padding).mean(dim=1)
                per_sequence.append(losses.detach())
                return losses.mean(), {}  # megatron divides by the number of micro-batches

            return output, loss_func

        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        self._forward_backward(
            forward_step_func=forward_step,
            data_iterator=chunks,
            model=[self.model],
            num_microbatches=tokens.size(0) // micro,
            seq_length=self.spec.mixture.seq_length,
            micro_batch_size=micro,
            forward_only=False,
        )
        updated, grad_norm, _ = self.optimizer.step()
        self._steps += int(updated)
        self._grad_norm = None if grad_norm is None else float(grad_norm)

        # One copy of each replica's losses: its last stage's tensor-parallel rank 0.
        losses = torch.cat(per_sequence) if per_sequence and self.conv.tp_rank == 0 else None
        return reduce_source_totals(losses, batch.source_ids, num_sources, self.device)

    def grad_norm(self) -> float | None:
        return self._grad_norm

    # --- checkpoint state --------------------------------------------------------------------

    def full_model_state(self, copy: HostCopy) -> dict[str, torch.Tensor] | None:
        return gather_model_state(self.conv, self._params, self.data_rank, self.device, copy)

    def _distributed_optimizers(self) -> list[DistributedOptimizer]:
        opts = (
            self.optimizer.chained_optimizers
            if isinstance(self.optimizer, ChainedOptimizer)
            else [self.optimizer]
        )
        return [o for o in opts if isinstance(o, DistributedOptimizer)]

    def _owned_shards(self) -> dict[torch.nn.Parameter, tuple[Any, torch.Tensor, dict[str, Any]]]:
        """Model parameter -> (the [start, end) range of it this data-parallel rank owns, the fp32
        master shard, the optimizer state of that shard)."""
        out = {}
        for do in self._distributed_optimizers():
            pairs = list(
                zip(do.model_float16_groups, do.shard_fp32_from_float16_groups, strict=True)
            )
            pairs += list(zip(do.model_fp32_groups, do.shard_fp32_groups, strict=True))
            for model_group, shard_group in pairs:
                for param, shard in zip(model_group, shard_group, strict=True):
                    owned = do._get_model_param_range_map(param)["param"]
                    out[param] = (owned, shard, do.optimizer.state[shard])
        return out

    def optimizer_step_count(self) -> int:
        return self._steps

    def optimizer_state(self, copy: HostCopy) -> dict[str, torch.Tensor]:
        """Per parameter: every data-parallel rank writes its shard of master weights and moments
        into a zero tensor and the group sums them; the tensor-parallel pieces are joined; the
        owning rank keeps the HF-named results."""
        out: dict[str, torch.Tensor] = {}
        if self.optimizer_step_count() == 0:
            return out
        shards = self._owned_shards()
        dp_group = self._distributed_optimizers()[0].data_parallel_group
        for name, param in self._params:
            flat = torch.zeros(
                len(STATE_KEYS), param.numel(), dtype=torch.float32, device=self.device
            )
            if param in shards:
                owned, shard, state = shards[param]
                for row, value in zip(flat, (shard, *(state[k] for k in ADAM_STATES)), strict=True):
                    row[owned.start : owned.end] = value.detach().view(-1)
            dist.all_reduce(flat, group=dp_group)
            for key, row in zip(STATE_KEYS, flat, strict=True):
                full = self.conv.join(name, row.view(param.shape))
                if name in self._saved_here:
                    for hf_name, tensor in self.conv.to_hf(name, full).items():
                        out[f"{hf_name}/{key}"] = copy(f"{hf_name}/{key}", tensor)
        return out

    def load_optimizer_state(self, ckpt: Checkpoint, step: int) -> None:
        """Each rank reads, one parameter at a time, the HF tensors its parameters are made of,
        converts them, and takes its tensor-parallel piece and its data-parallel slice."""
        check_optimizer_keys(ckpt, [p for n, _ in self._params for p in self.conv.hf_sources(n)])
        for do in self._distributed_optimizers():
            for group in do.optimizer.param_groups:
                group["lr"] = 0.0  # the dummy step that creates the state must not move weights
            do._init_optimizer_states_with_dummy_values()
        shards = self._owned_shards()
        with torch.no_grad():
            for name, param in self._params:
                if param not in shards:
                    continue
                owned, shard, state = shards[param]
                parts = self.conv.hf_sources(name)
                tensors = ckpt.optimizer_tensors([f"{p}/{k}" for p in parts for k in STATE_KEYS])
                targets = (shard, *(state[k] for k in ADAM_STATES))
                for key, target in zip(STATE_KEYS, targets, strict=True):
                    piece = self.conv.rank_piece(name, {p: tensors[f"{p}/{key}"] for p in parts})
                    if piece.shape != param.shape:
                        raise CheckpointError(
                            f"{ckpt.path}: {name} converts to shape {tuple(piece.shape)}, this "
                            f"rank's parameter has {tuple(param.shape)}"
                        )
                    value = piece.reshape(-1)[owned.start : owned.end]
                    target.copy_(value.to(target.device, target.dtype))
                if "step" in state:
                    state["step"] = torch.full_like(state["step"], step)
        for do in self._distributed_optimizers():
            for group in do.optimizer.param_groups:
                if "step" in group:
                    group["step"] = step
        self._steps = step
