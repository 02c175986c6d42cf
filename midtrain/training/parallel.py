"""The parallel layout of a run and the rules a run spec must meet for it.

``workers`` processes (one per GPU) form a data x pipeline x tensor grid: ``parallel.tensor`` GPUs
split every layer, ``parallel.pipeline`` stages split the stack of layers, and the rest is data
parallel. The DeepSpeed backend is data-parallel only (ZeRO shards optimizer state, not layers);
tensor and pipeline sizes above 1 need the megatron backend.

Each rule returns a message that names the run-spec keys involved, or None; ``RunSpec`` turns the
first one into a ``ConfigError`` when the spec is loaded, before anything starts. Shapes known
only from a checkpoint are checked by ``check_model_fits`` when the model config is read.
"""

from __future__ import annotations

from typing import Any

from midtrain.errors import ConfigError

BACKENDS = ("deepspeed", "megatron")


def layout_problem(
    backend: str, tensor: int, pipeline: int, workers: int, use_gpu: bool | None
) -> str | None:
    if backend == "deepspeed" and (tensor > 1 or pipeline > 1):
        key, size = ("parallel.tensor", tensor) if tensor > 1 else ("parallel.pipeline", pipeline)
        return (
            f"{key} ({size}): the deepspeed backend is data-parallel only; use "
            f"train.backend: megatron for tensor or pipeline parallelism"
        )
    if workers % (tensor * pipeline):
        return (
            f"workers ({workers}) must be a multiple of parallel.tensor x parallel.pipeline "
            f"({tensor} x {pipeline}): each data-parallel replica spans that many GPUs"
        )
    if backend == "megatron" and use_gpu is False:
        return "train.backend: megatron runs on GPUs only, but launch.use_gpu is false"
    return None


def shape_problem(
    tensor: int,
    pipeline: int,
    num_heads: int,
    num_kv_heads: int,
    num_layers: int,
    where: str = "model.config",
) -> str | None:
    # Each tensor-parallel rank holds whole query groups (its query heads with their key/value
    # head), which is how the weight converter shards the fused QKV matrix.
    if num_heads % tensor:
        return f"parallel.tensor ({tensor}) must divide {where}.num_heads ({num_heads})"
    if num_kv_heads % tensor:
        return f"parallel.tensor ({tensor}) must divide {where}.num_kv_heads ({num_kv_heads})"
    if num_layers % pipeline:
        return f"parallel.pipeline ({pipeline}) must divide {where}.num_layers ({num_layers})"
    return None


def check_model_fits(tensor: int, pipeline: int, hf_config: Any, where: str) -> None:
    """``shape_problem`` for a model whose shape comes from a checkpoint's HF config."""
    heads = hf_config.num_attention_heads
    problem = shape_problem(
        tensor,
        pipeline,
        heads,
        getattr(hf_config, "num_key_value_heads", None) or heads,
        hf_config.num_hidden_layers,
        where,
    )
    if problem:
        raise ConfigError(problem)


def backend_unavailable(backend: str) -> str | None:
    """Why ``backend`` cannot run on this machine, or None."""
    if backend != "megatron":
        return None
    import torch

    if not torch.cuda.is_available():
        return "train.backend: the megatron backend needs a CUDA GPU, and none is visible here"
    return None
