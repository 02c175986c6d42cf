"""The DeepSpeed backend: the HF model in a DeepSpeed engine, and a view of its optimizer state
*per parameter*.

Checkpoints store optimizer state per HF parameter name, full and unsharded ("<name>/exp_avg"),
so a run saved by W ZeRO ranks loads on any number of ranks: each rank reads the full tensors and
keeps its own fragment. DeepSpeed's own checkpoint files are never written or read (they are
pickles loaded with ``weights_only=False``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)

from midtrain.checkpoints import Checkpoint
from midtrain.checkpoints.host_buffers import HostCopy
from midtrain.config import RunSpec
from midtrain.data_mixing.sampler import Batch
from midtrain.errors import CheckpointError
from midtrain.training.backend import reduce_source_totals
from midtrain.training.checkpointing import StartPoint
from midtrain.training.model import apply_model_options, parameter_groups, sequence_losses
from midtrain.training.state_tensors import (
    ADAM_STATES,
    STATE_KEYS,
    check_optimizer_keys,
    dealt,
)


def deepspeed_config(spec: RunSpec, num_params: int) -> dict[str, Any]:
    opt, train = spec.optimizer, spec.train
    # ZeRO allocates its gradient buckets every micro-step: DeepSpeed's 5e8-element default costs
    # tens of ms per step for a small model, so buckets never exceed the model itself.
    bucket = int(min(5e8, max(num_params, 2**20)))
    return {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": spec.grad_accum_steps,
        "gradient_clipping": opt.grad_clip or 0.0,
        "bf16": {"enabled": train.precision == "bf16"},
        "zero_optimization": {
            "stage": train.zero_stage,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
        },
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW: no JIT-compiled CPU Adam op, and the same maths on CPU and GPU.
            "params": {
                "lr": opt.lr,
                "betas": list(opt.betas),
                "eps": opt.eps,
                "weight_decay": opt.weight_decay,
                "torch_adam": True,
                "adam_w_mode": True,
                # One fused CUDA kernel for the whole update on GPUs (torch's AdamW(fused=True)).
                **({"fused": True} if get_accelerator().device_name() == "cuda" else {}),
            },
        },
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }


def build_engine(model: torch.nn.Module, spec: RunSpec) -> deepspeed.DeepSpeedEngine:
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=parameter_groups(model, spec.optimizer.weight_decay),
        config=deepspeed_config(spec, sum(p.numel() for p in model.parameters())),
    )
    return engine


def _inner_optimizer(engine: deepspeed.DeepSpeedEngine) -> torch.optim.Optimizer:
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _partitioned(engine: deepspeed.DeepSpeedEngine) -> bool:
    """ZeRO 1-3 and the bf16 optimizer keep fp32 master fragments behind each parameter."""
    return any(hasattr(p, "_hp_mapping") or hasattr(p, "ds_id") for p in engine.module.parameters())


def optimizer_step_count(engine: deepspeed.DeepSpeedEngine) -> int:
    for state in _inner_optimizer(engine).state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def _link_fragments(engine: deepspeed.DeepSpeedEngine) -> None:
    """(Re)link each parameter's fragment view to the flat optimizer state.

    DeepSpeed links all param groups right after the *first* group's first step, when the other
    groups' state does not exist yet (so their fragments stay empty); linking again once every
    group has state fixes that.
    """
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        engine.optimizer._hp_optimizer_states_linked = False
        link()


def gather_optimizer_state(
    engine: deepspeed.DeepSpeedEngine, keep: Callable[[str], bool], copy: HostCopy
) -> dict[str, torch.Tensor]:
    """Full fp32 master weights and Adam moments of the parameters ``keep`` selects, as host
    copies made by ``copy``. A collective under ZeRO: every rank gathers every parameter, and
    keeps its own."""
    out: dict[str, torch.Tensor] = {}
    if optimizer_step_count(engine) == 0:
        return out
    partitioned = _partitioned(engine)
    if partitioned:
        _link_fragments(engine)
    inner = _inner_optimizer(engine)
    for name, param in engine.module.named_parameters():
        if partitioned:
            master = safe_get_full_fp32_param(param)
            moments = {key: safe_get_full_optimizer_state(param, key) for key in ADAM_STATES}
        else:
            master = param.float()
            moments = {key: inner.state[param][key] for key in ADAM_STATES}
        if keep(name):
            out[f"{name}/master"] = copy(f"{name}/master", master)
            for key, value in moments.items():
                out[f"{name}/{key}"] = copy(f"{name}/{key}", value)
    return out


def _materialise_adam_state(engine: deepspeed.DeepSpeedEngine, step: int) -> None:
    """Create zero moments so that they can be overwritten (AdamW creates them lazily)."""
    inner = _inner_optimizer(engine)
    # ZeRO-3 swaps its flat fp32 partitions into the inner optimizer only during a step.
    flat = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    tensors = flat if flat is not None else [p for g in inner.param_groups for p in g["params"]]
    # Fused and capturable AdamW keep the step count on the parameter's device, others on CPU.
    on_device = inner.defaults.get("fused") or inner.defaults.get("capturable")
    for p in tensors:
        state = inner.state[p]
        state["step"] = torch.tensor(float(step), device=p.device if on_device else "cpu")
        for key in ADAM_STATES:
            state.setdefault(key, torch.zeros_like(p, memory_format=torch.preserve_format))
    _link_fragments(engine)


def load_optimizer_state(engine: deepspeed.DeepSpeedEngine, ckpt: Checkpoint, step: int) -> None:
    """Set master weights and Adam moments from a checkpoint's per-parameter full tensors (any
    saving world size). Under ZeRO every rank takes its slice of every parameter, so each rank
    reads every entry, but one parameter at a time: host memory holds one parameter's state, not
    the model's (12 bytes per parameter, on every rank of a node at once)."""
    check_optimizer_keys(ckpt, [name for name, _ in engine.module.named_parameters()])
    _materialise_adam_state(engine, step)
    partitioned = _partitioned(engine)
    inner = _inner_optimizer(engine)
    with torch.no_grad():
        for name, param in engine.module.named_parameters():
            tensors = ckpt.optimizer_tensors([f"{name}/{k}" for k in STATE_KEYS])
            master = tensors[f"{name}/master"]
            shape = tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 params are partitioned
            if tuple(master.shape) != shape:
                raise CheckpointError(
                    f"{ckpt.path}: {name} has shape {tuple(master.shape)}, model has {shape}"
                )
            if partitioned:
                # The model's own weights were loaded before DeepSpeed wrapped it; here only the
                # fp32 master fragments and the moments are set.
                safe_set_full_fp32_param(param, master.to(engine.device))
                for key in ADAM_STATES:
                    value = tensors[f"{name}/{key}"].to(engine.device)
                    safe_set_full_optimizer_state(param, value, key)
            else:
                param.copy_(master.to(param.dtype))
                for key in ADAM_STATES:
                    inner.state[param][key].copy_(tensors[f"{name}/{key}"])


def full_model_state(
    engine: deepspeed.DeepSpeedEngine, rank: int, copy: HostCopy
) -> dict[str, torch.Tensor] | None:
    """The model's full weights by HF name, as host copies made by ``copy``, on rank 0 (a
    collective under ZeRO-3), else None."""
    module = engine.module
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)):
        if rank != 0:
            return None
        state = module.state_dict()
        if getattr(module.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # saved once, as Hugging Face does
        state = {k: copy(k, v) for k, v in state.items()}
        if params and torch.cuda.is_available():
            # ZeRO-3 frees the gathered weights on leaving this block: the (asynchronous)
            # copies out of them must be done by then.
            torch.cuda.synchronize()
    return state


def _total_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """The L2 norm of all gradients together (as ``clip_grad_norm_`` computes it, on the device)."""
    norms = [torch.linalg.vector_norm(p.grad.detach()) for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms))


class DeepSpeedBackend:
    """``Backend`` for the HF model in a DeepSpeed engine (data parallel, ZeRO 0-3)."""

    def __init__(self, spec: RunSpec, start: StartPoint, rank: int, world: int) -> None:
        model = start.build_model(spec.model.attn_implementation)  # also on resume: not saved
        model = apply_model_options(model, spec.model.activation_checkpointing)
        self.engine = build_engine(model, spec)
        if spec.model.compile:
            self.engine.compile()
        self.rank, self.data_rank, self.data_world = rank, rank, world
        self.micro_batch_size = spec.train.micro_batch_size
        self.device = self.engine.device
        self.hf_config = self.engine.module.config
        names = [name for name, _ in self.engine.module.named_parameters()]
        self._saved_here = dealt(names, world, rank)
        # Without ZeRO or bf16, DeepSpeed clips fp32 gradients itself and keeps no norm: measure it.
        self._measure_norm = not (self.engine.zero_optimization() or self.engine.bfloat16_enabled())
        self._grad_norm: torch.Tensor | None = None

    def param_groups(self) -> list[dict[str, Any]]:
        return self.engine.optimizer.param_groups

    def train_step(self, batch: Batch, num_sources: int) -> tuple[torch.Tensor, torch.Tensor]:
        engine = self.engine
        per_sequence = []  # kept on the device: no host sync between micro-batches
        for tokens in batch.tokens.split(self.micro_batch_size):
            losses = sequence_losses(engine, tokens.to(engine.device))
            engine.backward(losses.mean())  # DeepSpeed scales by 1/accumulation steps
            if self._measure_norm and engine.is_gradient_accumulation_boundary():
                self._grad_norm = _total_norm(engine.module.parameters())  # before clipping
            engine.step()  # steps the optimizer at the accumulation boundary only
            per_sequence.append(losses.detach())
        return reduce_source_totals(
            torch.cat(per_sequence), batch.source_ids, num_sources, engine.device
        )

    def grad_norm(self) -> float | None:
        norm = self._grad_norm if self._measure_norm else self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def full_model_state(self, copy: HostCopy) -> dict[str, torch.Tensor] | None:
        return full_model_state(self.engine, self.rank, copy)

    def optimizer_state(self, copy: HostCopy) -> dict[str, torch.Tensor]:
        return gather_optimizer_state(self.engine, self._saved_here.__contains__, copy)

    def load_optimizer_state(self, ckpt: Checkpoint, step: int) -> None:
        load_optimizer_state(self.engine, ckpt, step)

    def optimizer_step_count(self) -> int:
        return optimizer_step_count(self.engine)
