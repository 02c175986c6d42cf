"""The run spec: one YAML file (+ ``key.sub=value`` overrides) -> a validated, typed ``RunSpec``.

Each section is a typed config; the components' ``build()`` turns them into live objects. Paths are
made absolute at load time and a mixture file is inlined, so the resolved spec saved with every
checkpoint is self-contained (a Slurm or Ray job reads exactly what the user validated).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from midtrain.config_io import (
    AbsPath,
    Bool,
    Float,
    Int,
    StrictModel,
    apply_overrides,
    dump_yaml,
    load_yaml_mapping,
    parse_yaml,
    validate,
)
from midtrain.data_mixing.mixture import MixtureConfig
from midtrain.training.parallel import backend_unavailable, layout_problem, shape_problem
from midtrain.training.schedule import ScheduleConfig


class LlamaShape(StrictModel):
    """A Llama-family decoder (RMSNorm, SwiGLU, RoPE, grouped-query attention)."""

    hidden_size: Int = Field(gt=0)
    num_layers: Int = Field(gt=0)
    num_heads: Int = Field(gt=0)
    num_kv_heads: Int | None = Field(default=None, gt=0, description="default: num_heads")
    ffn_hidden_size: Int = Field(gt=0)
    vocab_size: Int | None = Field(default=None, gt=0, description="default: the tokenizer's size")
    max_position_embeddings: Int | None = Field(
        default=None, gt=0, description="default: seq_length"
    )
    rope_theta: Float = Field(default=10000.0, gt=0)
    rms_norm_eps: Float = Field(default=1e-5, gt=0)
    tie_embeddings: Bool = False

    @model_validator(mode="after")
    def _heads_divide(self) -> LlamaShape:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({kv})"
            )
        return self


class ModelConfig(StrictModel):
    tokenizer: AbsPath | None = Field(default=None, description="tokenizer directory")
    config: LlamaShape | None = Field(default=None, description="build a new model of this shape")
    from_checkpoint: AbsPath | None = Field(
        default=None, description="a midtrain checkpoint or HF model directory: shape and weights"
    )
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    compile: Bool = False
    activation_checkpointing: Bool = False

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if self.config is not None and self.from_checkpoint is not None:
            raise ValueError("give either model.config or model.from_checkpoint, not both")
        if self.config is not None and self.tokenizer is None:
            raise ValueError("model.tokenizer is required with model.config")
        return self


class InitFromConfig(StrictModel):
    """Start a *new* run from a checkpoint's weights (and optionally its optimizer moments)."""

    checkpoint: AbsPath
    load_optimizer: Bool = False


class OptimizerConfig(StrictModel):
    lr: Float = Field(gt=0, description="peak learning rate")
    weight_decay: Float = Field(default=0.1, ge=0)
    betas: tuple[Float, Float] = (0.9, 0.95)
    eps: Float = Field(default=1e-8, gt=0)
    grad_clip: Float | None = Field(default=1.0, gt=0)

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in value):
            raise ValueError(f"betas must be in [0, 1), got {value}")
        return value


class TrainConfig(StrictModel):
    global_batch_size: Int = Field(gt=0, description="sequences per optimizer step, all workers")
    micro_batch_size: Int = Field(gt=0, description="sequences per forward pass on one worker")
    max_steps: Int = Field(gt=0)
    seed: Int = 1
    precision: Literal["fp32", "bf16"] = "fp32"
    zero_stage: Int = Field(default=1, ge=0, le=3)
    log_interval: Int = Field(default=1, gt=0, description="a metrics record every N steps")
    tensorboard: Bool = False
    deterministic: Bool = Field(default=True, description="deterministic kernels (exact resume)")
    backend: Literal["deepspeed", "megatron"] = Field(
        default="deepspeed", description="deepspeed (HF model, ZeRO) or megatron (megatron-core)"
    )

    @model_validator(mode="after")
    def _zero_stage(self) -> TrainConfig:
        if self.backend == "megatron" and self.zero_stage != 1:
            raise ValueError(
                f"train.zero_stage ({self.zero_stage}) applies to the deepspeed backend only; the "
                f"megatron backend always shards the optimizer state over the data-parallel ranks "
                f"(megatron-core's distributed optimizer, like ZeRO 1): leave zero_stage out"
            )
        # DeepSpeed's stage-0 bf16 optimizer keeps its fp32 copies apart from the parameters,
        # where midtrain's per-parameter checkpoint cannot find them.
        if self.backend == "deepspeed" and self.precision == "bf16" and self.zero_stage == 0:
            raise ValueError(
                "train.precision bf16 needs train.zero_stage 1, 2 or 3 with the deepspeed backend "
                "(stage 1 uses the same memory on one worker)"
            )
        return self


class CheckpointConfig(StrictModel):
    # Saved every 1000 steps by default (OLMo-core's default; torchtitan's is 500): a run that a
    # crash or a lost node restarts must not fall back to its start. null: only at the end (and
    # when preempted).
    interval: Int | None = Field(
        default=1000, gt=0, description="save every N steps (and at the end); null: end only"
    )
    keep_last: Int = Field(default=3, gt=0)
    keep_every: Int | None = Field(default=None, gt=0, description="mark every Nth step `keep`")
    async_save: Bool = True

    @model_validator(mode="after")
    def _kept_steps_are_saved(self) -> CheckpointConfig:
        if self.keep_every is not None and (
            self.interval is None or self.keep_every % self.interval
        ):
            raise ValueError(
                f"checkpoint.keep_every ({self.keep_every}) must be a multiple of "
                f"checkpoint.interval ({self.interval}): only the steps that are saved can be kept"
            )
        return self


class LaunchConfig(StrictModel):
    ray_address: str | None = Field(
        default=None, description="existing Ray cluster; default: local"
    )
    max_failures: Int = Field(default=0, ge=-1, description="worker restarts (-1: unlimited)")
    cpus_per_worker: Int = Field(default=1, gt=0)
    use_gpu: Bool | None = Field(default=None, description="default: when CUDA is available")


class ParallelConfig(StrictModel):
    """Model parallelism (megatron backend): the rest of ``workers`` is data parallel."""

    tensor: Int = Field(default=1, gt=0, description="tensor-parallel size: GPUs per layer")
    pipeline: Int = Field(default=1, gt=0, description="pipeline-parallel stages")


class RunSpec(StrictModel):
    run_dir: AbsPath
    model: ModelConfig
    init_from: InitFromConfig | None = None
    resume: Bool = False
    mixture: MixtureConfig
    optimizer: OptimizerConfig
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    workers: Int = Field(
        default=1, gt=0, description="worker processes, one per GPU (data x tensor x pipeline)"
    )
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)

    @model_validator(mode="after")
    def _consistent(self) -> RunSpec:
        if self.init_from is not None and self.resume:
            raise ValueError(
                "init_from starts a new run and resume continues one: give one of them, not both"
            )
        if self.init_from is not None and self.model.from_checkpoint is not None:
            raise ValueError(
                "model.from_checkpoint and init_from both name the starting weights: give one "
                "(init_from also keeps the checkpoint's LR for a re-warm and can load its optimizer)"
            )
        no_model = self.model.config is None and self.model.from_checkpoint is None
        if no_model and self.init_from is None:
            raise ValueError(
                "model: give model.config (a new model), model.from_checkpoint, or init_from"
            )
        t, par = self.train, self.parallel
        if problem := layout_problem(
            t.backend, par.tensor, par.pipeline, self.workers, self.launch.use_gpu
        ):
            raise ValueError(problem)
        if t.backend == "megatron" and (
            self.model.compile or self.model.attn_implementation != "sdpa"
        ):
            key = "model.compile" if self.model.compile else "model.attn_implementation"
            raise ValueError(
                f"{key}: applies to the deepspeed backend's HF model only; the megatron backend "
                f"uses megatron-core's own kernels (Transformer Engine when installed)"
            )
        shape = self.model.config
        if shape is not None and (
            problem := shape_problem(
                par.tensor,
                par.pipeline,
                {
                    "num_heads": shape.num_heads,
                    "num_kv_heads": shape.num_kv_heads or shape.num_heads,
                    "ffn_hidden_size": shape.ffn_hidden_size,
                },
                {"num_layers": shape.num_layers},
            )
        ):
            raise ValueError(problem)
        per_step = t.micro_batch_size * self.data_parallel_size
        if t.global_batch_size % per_step:
            workers = (
                "workers"
                if self.data_parallel_size == self.workers
                else "data-parallel size (workers / (parallel.tensor x parallel.pipeline))"
            )
            raise ValueError(
                f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size x {workers} "
                f"({t.micro_batch_size} x {self.data_parallel_size})"
            )
        if problem := self.schedule.steps_error(t.max_steps):
            raise ValueError(problem)
        run_tokens = t.max_steps * t.global_batch_size * self.mixture.seq_length
        if self.mixture.tokens is not None and self.mixture.tokens != run_tokens:
            raise ValueError(
                f"mixture.tokens ({self.mixture.tokens}) disagrees with train.max_steps x "
                f"train.global_batch_size x seq_length ({run_tokens}); leave mixture.tokens out"
            )
        if problem := backend_unavailable(t.backend):
            raise ValueError(problem)
        return self

    @property
    def data_parallel_size(self) -> int:
        return self.workers // (self.parallel.tensor * self.parallel.pipeline)

    @property
    def total_sequences(self) -> int:
        return self.train.max_steps * self.train.global_batch_size

    @property
    def grad_accum_steps(self) -> int:
        return self.train.global_batch_size // (
            self.train.micro_batch_size * self.data_parallel_size
        )

    def to_yaml(self) -> str:
        return dump_yaml(self)


# Keys whose change makes a resumed run diverge from the uninterrupted one.
EXACTNESS_KEYS = (
    "mixture",
    "model",
    "train.global_batch_size",
    "train.seed",
    "train.precision",
    "train.deterministic",
    "optimizer",
    "schedule",
    "train.backend",
    "parallel",
)


def _inline_mixture(data: dict[str, Any], source: str) -> Path | None:
    """Replace a mixture file's name by its contents; returns the file (None: inline already)."""
    mixture = data.get("mixture")
    if not isinstance(mixture, str):
        return None
    path = Path(mixture).expanduser()
    if not path.is_absolute():
        # A mixture file named in a run spec is found next to the run spec first.
        beside = Path(source).parent / path
        path = beside if beside.exists() else path
    data["mixture"] = load_yaml_mapping(path)
    return path


def apply_run_overrides(data: dict[str, Any], overrides: list[str], source: str) -> Path | None:
    """Apply overrides to a run spec's data and inline its mixture file; returns that file (None:
    the mixture is inline). ``mixture=FILE`` (a path from the current directory, as every path
    override) replaces the file before it is read; ``mixture.x=...`` edits the mixture after."""
    whole = [o for o in overrides if o.partition("=")[0].strip() == "mixture"]
    apply_overrides(data, whole)
    if whole and isinstance(data.get("mixture"), str):
        data["mixture"] = os.path.abspath(os.path.expanduser(data["mixture"]))
    mixture_file = _inline_mixture(data, source)
    apply_overrides(data, [o for o in overrides if o not in whole])
    return mixture_file


def validate_run_spec(data: Any, source: str, mixture_file: Path | None = None) -> RunSpec:
    """``data`` as a ``RunSpec``; errors name ``source`` (and the mixture's own, its file)."""
    sections = {"mixture": f"{source} (mixture from {mixture_file})"} if mixture_file else {}
    spec = validate(RunSpec, data, source, sections)
    if mixture_file is not None:
        spec.mixture._source = str(mixture_file)  # so that planning errors name it too
    return spec


def load_run_spec(path: str | Path, overrides: list[str] | None = None) -> RunSpec:
    """Read a run spec, apply ``key.sub=value`` overrides, inline the mixture, validate."""
    data = load_yaml_mapping(path)
    mixture_file = apply_run_overrides(data, overrides or [], str(path))
    return validate_run_spec(data, str(path), mixture_file)


def run_spec_from_yaml(text: str, source: str) -> RunSpec:
    """Parse a saved (resolved) run spec, e.g. the one inside a checkpoint."""
    return validate(RunSpec, _as_meant(parse_yaml(text, source)), source)


def _as_meant(data: Any) -> Any:
    """Settings that older midtrain versions accepted and ignored, and that are refused now,
    rewritten to what they meant: a run saved before the change still resumes, unchanged."""
    if not isinstance(data, dict):
        return data

    def section(key: str) -> dict[str, Any]:
        value = data.get(key)
        return value if isinstance(value, dict) else {}

    schedule, model, train, optimizer = map(section, ("schedule", "model", "train", "optimizer"))
    if schedule.get("rewarm_steps") is not None:  # the re-warm replaced the warmup
        schedule.pop("warmup_steps", None)
        schedule.pop("warmup_start_ratio", None)
    if data.get("init_from") and model.get("from_checkpoint"):  # init_from won
        model["from_checkpoint"] = None
    if train.get("backend") == "megatron":  # its optimizer is always sharded
        train.pop("zero_stage", None)
    if optimizer.get("grad_clip") == math.inf:  # clipping at infinity: no clipping
        optimizer["grad_clip"] = None
    for source in section("mixture").get("sources") or []:
        if isinstance(source, dict) and source.get("max_epochs") == math.inf:  # no cap
            source["max_epochs"] = None
    return data


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): obj}


def diff_specs(old: RunSpec, new: RunSpec) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every leaf that differs."""
    a, b = _flatten(old.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def breaks_exactness(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in EXACTNESS_KEYS)
