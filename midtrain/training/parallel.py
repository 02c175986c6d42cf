"""The parallel layout of a run and the rules a run spec must meet for it.

``workers`` processes (one per GPU) form a data x pipeline x tensor grid: ``parallel.tensor`` GPUs
split every layer, ``parallel.pipeline`` stages split the stack of layers, and the rest is data
parallel. The DeepSpeed backend is data-parallel only (ZeRO shards optimizer state, not layers);
tensor and pipeline sizes above 1 need the megatron backend.

Each rule returns a message that names the run-spec keys involved, or None; ``RunSpec`` turns the
first one into a ``ConfigError`` when the spec is loaded, before anything starts. Shapes known
only from a checkpoint are checked by ``check_model_fits``, in the driver before any worker starts
(``check_start``) and again in each worker.
"""

from __future__ import annotations

from typing import Any

from midtrain.errors import CheckpointError, ConfigError

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
    split_by_tensor: dict[str, int],
    split_by_pipeline: dict[str, int],
    where: str = "model.config.",
) -> str | None:
    """The first size its parallel dimension does not divide; ``where`` prefixes the key names
    (``model.config.`` or ``DIR/config.json: ``)."""
    # Each tensor-parallel rank holds whole query groups (its query heads with their key/value
    # head), which is how the weight converter shards the fused QKV matrix, and an equal slice of
    # the MLP's width; each pipeline stage holds as many layers as the others.
    for key, size in split_by_tensor.items():
        if size % tensor:
            return f"parallel.tensor ({tensor}) must divide {where}{key} ({size})"
    for key, size in split_by_pipeline.items():
        if size % pipeline:
            return f"parallel.pipeline ({pipeline}) must divide {where}{key} ({size})"
    return None


def check_model_fits(
    tensor: int, pipeline: int, hf_config: Any, where: str, seq_length: int
) -> None:
    """For a model whose shape comes from a checkpoint's HF config (``where``: that file): the
    parallel layout fits it, and the megatron backend can express it (model type, RoPE, no
    sliding window shorter than the sequence). Raises ``ConfigError`` naming the file's keys."""
    from midtrain.checkpoints.megatron_convert import (
        GPTShape,
        rope_base,
        sliding_window_problem,
    )

    try:
        GPTShape.from_hf_config(hf_config, where)
        rope_base(hf_config, where)
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    heads = hf_config.num_attention_heads
    problem = shape_problem(
        tensor,
        pipeline,
        {
            "num_attention_heads": heads,
            "num_key_value_heads": getattr(hf_config, "num_key_value_heads", None) or heads,
            "intermediate_size": hf_config.intermediate_size,
        },
        {"num_hidden_layers": hf_config.num_hidden_layers},
        f"{where}: ",
    ) or sliding_window_problem(hf_config, seq_length, where)
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
