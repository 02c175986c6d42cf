"""Hugging Face Llama-family weights <-> megatron-core ``GPTModel`` weights, and their tensor-parallel
shards.

Pure tensor bookkeeping: nothing here imports megatron-core, so conversions run (and are tested)
anywhere. The names and layouts are those of megatron-core 0.16's ``GPTModel`` built with
``get_gpt_layer_local_spec`` ("local": torch-native modules) or
``get_gpt_layer_with_transformer_engine_spec`` ("te"):

=====================================  ===============================================  ==========
Hugging Face                           megatron-core                                    TP split
=====================================  ===============================================  ==========
model.embed_tokens.weight              embedding.word_embeddings.weight                 rows
layers.i.input_layernorm.weight        local: decoder.layers.i.input_layernorm.weight   replicated
                                       te: ...self_attention.linear_qkv.layer_norm_weight
layers.i.self_attn.{q,k,v}_proj        decoder.layers.i.self_attention.linear_qkv       rows
                                         (weight and, Qwen2, bias; interleaved per group)
layers.i.self_attn.{q,k}_norm          ...self_attention.{q,k}_layernorm.weight (Qwen3) replicated
layers.i.self_attn.o_proj.weight       ...self_attention.linear_proj.weight             columns
layers.i.post_attention_layernorm      local: decoder.layers.i.pre_mlp_layernorm.weight replicated
                                       te: ...mlp.linear_fc1.layer_norm_weight
layers.i.mlp.{gate,up}_proj.weight     ...mlp.linear_fc1.weight  ([gate; up])           gate|up
layers.i.mlp.down_proj.weight          ...mlp.linear_fc2.weight                         columns
model.norm.weight                      decoder.final_layernorm.weight                   replicated
lm_head.weight (untied only)           output_layer.weight                              rows
=====================================  ===============================================  ==========

The fused QKV matrix is megatron's grouped layout: for each of the ``num_kv_heads`` query groups,
that group's query heads, then its key head, then its value head (``q1 q2 k1 v1 | q3 q4 k2 v2``),
which is how ``SelfAttention.get_query_key_value_tensors`` splits it. Because whole groups are
contiguous, a tensor-parallel shard of it is a contiguous block of rows holding
``num_kv_heads / tp`` groups. ``linear_fc1`` holds gate then up (megatron's ``glu`` applies the
activation to the first half); its shard on each rank is that rank's gate rows then its up rows.

Both directions use the same rotary convention (HF's ``rotate_half`` = megatron's
``rotary_interleaved=False``), so query and key rows are not permuted.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from midtrain.errors import CheckpointError

LayerSpec = Literal["local", "te"]
Split = Literal["rows", "columns", "glu", "replicated"]

HF_EMBED = "model.embed_tokens.weight"
HF_NORM = "model.norm.weight"
HF_LM_HEAD = "lm_head.weight"
MC_EMBED = "embedding.word_embeddings.weight"
MC_NORM = "decoder.final_layernorm.weight"
MC_OUTPUT = "output_layer.weight"

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Buffers that some HF checkpoints store and every loader recomputes.
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)
# Megatron's usual padding: the vocabulary is a multiple of 128 x TP, so matmuls tile well and the
# vocab-parallel embedding and output layer split evenly.
VOCAB_MULTIPLE = 128


@dataclass(frozen=True)
class GPTShape:
    """The tensor shapes of a Llama-family decoder (all that a weight conversion needs)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    tie_embeddings: bool
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def qkv_rows(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    @classmethod
    def from_hf_config(cls, config: Any, where: str = "config.json") -> GPTShape:
        """The shape of a ``transformers`` Llama/Mistral/Qwen2/Qwen3 config (or its dict);
        ``where`` (the config's file) starts the error of a model it cannot express."""
        get = _getter(config)
        model_type = get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"{where}: model_type {model_type!r}: the megatron converter handles "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        # Biases megatron's GPTModel can only express together with MLP biases: refused rather
        # than converted wrongly.
        if model_type in ("llama", "mistral") and get("attention_bias", False):
            raise CheckpointError(f"{where}: {model_type} with attention_bias is not supported")
        if get("mlp_bias", False):
            raise CheckpointError(f"{where}: mlp_bias is not supported")
        if get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{where}: hidden_act {get('hidden_act')!r}: only silu (SwiGLU)")
        heads = get("num_attention_heads")
        try:
            return cls(
                num_layers=get("num_hidden_layers"),
                hidden_size=get("hidden_size"),
                num_heads=heads,
                num_kv_heads=get("num_key_value_heads") or heads,
                head_dim=get("head_dim") or get("hidden_size") // heads,
                ffn_hidden_size=get("intermediate_size"),
                vocab_size=get("vocab_size"),
                tie_embeddings=bool(get("tie_word_embeddings", False)),
                qkv_bias=model_type == "qwen2",
                qk_norm=model_type == "qwen3",
            )
        except ValueError as exc:  # e.g. num_heads not a multiple of num_kv_heads
            raise CheckpointError(f"{where}: {exc}") from None


def _getter(config: Any) -> Any:
    """``get(key, default)`` over an HF config object or its ``config.json`` dict."""
    return config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)


def rope_base(config: Any, where: str = "config.json") -> int:
    """RoPE base of an HF config. Scaled RoPE variants (llama3, yarn, ...) are refused because
    megatron's ``GPTModel`` would compute different frequencies, and so is a fractional base
    (``GPTModel`` takes an integer one)."""
    get = _getter(config)
    params = get("rope_parameters") or get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(
            f"{where}: rope_type {rope_type!r}: the megatron backend supports plain RoPE only"
        )
    theta = params.get("rope_theta", get("rope_theta"))
    theta = 10000.0 if theta is None else float(theta)
    if not theta.is_integer() or theta <= 0:
        raise CheckpointError(f"{where}: rope_theta {theta}: the megatron backend needs an integer")
    return int(theta)


def sliding_window_problem(config: Any, seq_length: int, where: str = "config.json") -> str | None:
    """Megatron's ``GPTModel`` attends over the whole sequence: a sliding window that is shorter
    than the sequence (Mistral's, Qwen2's ``use_sliding_window``) would train another model."""
    get = _getter(config)
    window, layer_types = get("sliding_window"), get("layer_types")
    windowed = window is not None and (layer_types is None or "sliding_attention" in layer_types)
    if windowed and window < seq_length:
        return (
            f"{where}: sliding_window ({window}) is shorter than mixture.seq_length "
            f"({seq_length}), and the megatron backend attends over the whole sequence: use the "
            f"deepspeed backend, or a seq_length of at most {window}"
        )
    return None


def padded_vocab_size(vocab_size: int, tensor_parallel: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """The smallest multiple of ``multiple * tensor_parallel`` that holds ``vocab_size`` rows."""
    step = multiple * tensor_parallel
    return -(-vocab_size // step) * step


@dataclass(frozen=True)
class PipelineStage:
    """The part of the model one pipeline stage holds: a contiguous block of decoder layers, plus
    the embedding on the first stage and the final norm and output layer on the last.

    Megatron numbers a stage's layers from 0 in its state dict (``decoder.layers.0`` is global
    layer ``first_layer``); Hugging Face names use global numbers. With tied embeddings and more
    than one stage, the last stage holds its own copy of the embedding as ``output_layer.weight``
    (megatron keeps the two equal by summing their gradients).
    """

    first_layer: int
    num_layers: int
    first: bool
    last: bool

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.first_layer + self.num_layers)


def pipeline_stage(num_layers: int, pipeline: int, rank: int) -> PipelineStage:
    """Stage ``rank`` of ``pipeline`` equal stages (megatron's default, even split)."""
    if pipeline < 1 or not 0 <= rank < pipeline:
        raise ValueError(f"pipeline rank {rank} is outside 0..{pipeline - 1}")
    if num_layers % pipeline:
        raise ValueError(f"num_layers ({num_layers}) is not divisible by pipeline {pipeline}")
    per = num_layers // pipeline
    return PipelineStage(rank * per, per, first=rank == 0, last=rank == pipeline - 1)


def whole_model(shape: GPTShape) -> PipelineStage:
    return PipelineStage(0, shape.num_layers, first=True, last=True)


# --- names ---------------------------------------------------------------------------------------


def _hf_layer(i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    return {
        "attn_norm": p + "input_layernorm.weight",
        "q": p + "self_attn.q_proj.weight",
        "k": p + "self_attn.k_proj.weight",
        "v": p + "self_attn.v_proj.weight",
        "q_bias": p + "self_attn.q_proj.bias",
        "k_bias": p + "self_attn.k_proj.bias",
        "v_bias": p + "self_attn.v_proj.bias",
        "q_norm": p + "self_attn.q_norm.weight",
        "k_norm": p + "self_attn.k_norm.weight",
        "o": p + "self_attn.o_proj.weight",
        "mlp_norm": p + "post_attention_layernorm.weight",
        "gate": p + "mlp.gate_proj.weight",
        "up": p + "mlp.up_proj.weight",
        "down": p + "mlp.down_proj.weight",
    }


def _mc_layer(i: int, spec: LayerSpec) -> dict[str, str]:
    p = f"decoder.layers.{i}."
    if spec == "te":  # the norms live inside TE's fused LayerNormLinear modules
        attn_norm = p + "self_attention.linear_qkv.layer_norm_weight"
        mlp_norm = p + "mlp.linear_fc1.layer_norm_weight"
    elif spec == "local":
        attn_norm = p + "input_layernorm.weight"
        mlp_norm = p + "pre_mlp_layernorm.weight"
    else:
        raise ValueError(f"layer spec must be 'local' or 'te', got {spec!r}")
    return {
        "attn_norm": attn_norm,
        "qkv": p + "self_attention.linear_qkv.weight",
        "qkv_bias": p + "self_attention.linear_qkv.bias",
        "q_norm": p + "self_attention.q_layernorm.weight",
        "k_norm": p + "self_attention.k_layernorm.weight",
        "proj": p + "self_attention.linear_proj.weight",
        "mlp_norm": mlp_norm,
        "fc1": p + "mlp.linear_fc1.weight",
        "fc2": p + "mlp.linear_fc2.weight",
    }


def tensor_parallel_split(name: str) -> Split:
    """How megatron-core splits the tensor ``name`` across tensor-parallel ranks.

    Column-parallel layers (QKV, fc1, embedding and output rows) split their output rows,
    row-parallel ones (``linear_proj``, ``linear_fc2``) their input columns; norms are replicated.
    """
    if name.endswith(("layernorm.weight", "layer_norm_weight")):
        return "replicated"
    if name.endswith("mlp.linear_fc1.weight"):
        return "glu"
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return "columns"
    if name in (MC_EMBED, MC_OUTPUT) or name.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        return "rows"
    raise CheckpointError(f"{name}: not a tensor of a Llama-shaped megatron-core GPTModel")


# --- checked access ------------------------------------------------------------------------------


class _Tensors:
    """A state dict being consumed: missing, misshapen and left-over tensors are errors that name
    the key and the state dict."""

    def __init__(
        self, tensors: Mapping[str, torch.Tensor], where: str, ignored: Sequence[str] = ()
    ) -> None:
        self.tensors = tensors
        self.where = where
        self.used: set[str] = {k for k in tensors if k.endswith(tuple(ignored))}

    def take(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in self.tensors:
            raise CheckpointError(f"{self.where}: missing tensor {key}")
        tensor = self.tensors[key]
        if tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"{self.where}: {key} has shape {tuple(tensor.shape)}, the model shape needs "
                f"{shape}"
            )
        self.used.add(key)
        return tensor

    def finish(self) -> None:
        extra = sorted(k for k in self.tensors if k not in self.used)
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise CheckpointError(
                f"{self.where}: unexpected tensor {extra[0]}{more} for this model shape"
            )


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if rows == tensor.shape[0]:
        return tensor
    # Padding rows are zeros: embeddings no real token uses, and output logits of 0 that a
    # trainer must mask or learn down; they are cut off again on the way back to HF.
    pad = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, pad])


def _check_padding(shape: GPTShape, padded_vocab: int | None) -> int:
    if padded_vocab is None:
        return shape.vocab_size
    if padded_vocab < shape.vocab_size:
        raise ValueError(
            f"padded_vocab_size ({padded_vocab}) is smaller than vocab_size ({shape.vocab_size})"
        )
    return padded_vocab


# --- QKV and SwiGLU layouts ----------------------------------------------------------------------


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: GPTShape) -> torch.Tensor:
    """Separate q/k/v projections (weights ``[heads*d, H]`` or biases ``[heads*d]``) -> megatron's
    per-group interleaved QKV."""
    groups, d = shape.num_kv_heads, shape.head_dim
    rest = q.shape[1:]
    parts = (
        q.reshape(groups, shape.heads_per_group * d, *rest),
        k.reshape(groups, d, *rest),
        v.reshape(groups, d, *rest),
    )
    return torch.cat(parts, dim=1).reshape(shape.qkv_rows, *rest)


def split_qkv(
    qkv: torch.Tensor, shape: GPTShape
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's interleaved QKV -> (q, k, v) in Hugging Face's layout; inverse of ``fuse_qkv``."""
    groups, d = shape.num_kv_heads, shape.head_dim
    rest = qkv.shape[1:]
    grouped = qkv.reshape(groups, (shape.heads_per_group + 2) * d, *rest)
    q, k, v = torch.split(grouped, [shape.heads_per_group * d, d, d], dim=1)
    return (
        q.reshape(shape.num_heads * d, *rest),
        k.reshape(groups * d, *rest),
        v.reshape(groups * d, *rest),
    )


# --- HF <-> megatron-core -------------------------------------------------------------------------


def hf_to_mcore(
    hf: Mapping[str, torch.Tensor],
    shape: GPTShape,
    spec: LayerSpec = "local",
    *,
    padded_vocab_size: int | None = None,
    where: str = "the Hugging Face weights",
    stage: PipelineStage | None = None,
) -> dict[str, torch.Tensor]:
    """A full (unsharded) megatron-core ``GPTModel`` state dict from an HF causal-LM state dict.

    Tensors keep their dtype. With tied embeddings an ``lm_head.weight`` may be present (some
    checkpoints store it) but must equal the embedding. ``padded_vocab_size`` pads the embedding
    (and output) rows with zeros, as megatron's vocab-parallel layers need for TP sizes that do
    not divide the vocabulary. ``stage`` converts one pipeline stage's part only (``hf`` may hold
    the whole model; every tensor in it must still belong to the model).
    """
    return dict(
        iter_hf_to_mcore(
            hf, shape, spec, padded_vocab_size=padded_vocab_size, where=where, stage=stage
        )
    )


def iter_hf_to_mcore(
    hf: Mapping[str, torch.Tensor],
    shape: GPTShape,
    spec: LayerSpec = "local",
    *,
    padded_vocab_size: int | None = None,
    where: str = "the Hugging Face weights",
    stage: PipelineStage | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``hf_to_mcore`` one megatron tensor at a time, looking up each HF tensor when the
    megatron tensor made of it is built: from a ``LazyTensors`` a rank reads only its stage's
    tensors, and holds one layer's at a time. Names are checked before anything is read (none
    missing, none the model lacks), shapes as each tensor is read."""
    stage = stage or whole_model(shape)
    if stage.layers.stop > shape.num_layers:
        raise ValueError(f"stage layers {stage.layers} exceed num_layers {shape.num_layers}")
    vocab = padded_vocab_size
    # Built first: a bad layer spec or padding is refused before any tensor is looked at.
    built = mcore_shapes(shape, spec, padded_vocab_size=vocab, stage=stage)
    needed = hf_shapes(shape, stage)
    model_names = set(hf_names(shape)) | ({HF_LM_HEAD} if shape.tie_embeddings else set())
    extra = sorted(k for k in hf if k not in model_names and not k.endswith(_IGNORED_HF_SUFFIXES))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"{where}: unexpected tensor {extra[0]}{more} for this model shape")
    missing = [k for k in needed if k not in hf]
    if missing:
        raise CheckpointError(f"{where}: missing tensor {missing[0]}")
    src = _Tensors(hf, where)
    for name in built:
        parts = {n: src.take(n, needed[n]) for n in hf_sources(name, shape, spec, stage=stage)}
        tied_head = HF_EMBED in parts and shape.tie_embeddings and HF_LM_HEAD in hf
        if tied_head and not torch.equal(src.take(HF_LM_HEAD, needed[HF_EMBED]), parts[HF_EMBED]):
            raise CheckpointError(
                f"{where}: {HF_LM_HEAD} differs from {HF_EMBED} but the model has tied embeddings"
            )
        yield (
            name,
            hf_to_mcore_tensor(name, parts, shape, spec, padded_vocab_size=vocab, stage=stage),
        )


def hf_shapes(shape: GPTShape, stage: PipelineStage | None = None) -> dict[str, tuple[int, ...]]:
    """The HF tensors a (stage of a) model of ``shape`` holds, as HF saves them, with their
    shapes (a tied model has no ``lm_head.weight``; the last stage of a tied model needs the
    embedding too)."""
    stage = stage or whole_model(shape)
    h, d, f = shape.hidden_size, shape.head_dim, shape.ffn_hidden_size
    q_rows, kv_rows = shape.num_heads * d, shape.num_kv_heads * d
    layer = {
        "attn_norm": (h,),
        "q": (q_rows, h),
        "k": (kv_rows, h),
        "v": (kv_rows, h),
        "q_bias": (q_rows,),
        "k_bias": (kv_rows,),
        "v_bias": (kv_rows,),
        "q_norm": (d,),
        "k_norm": (d,),
        "o": (h, q_rows),
        "mlp_norm": (h,),
        "gate": (f, h),
        "up": (f, h),
        "down": (h, f),
    }
    absent = set() if shape.qkv_bias else {"q_bias", "k_bias", "v_bias"}
    absent |= set() if shape.qk_norm else {"q_norm", "k_norm"}
    embed = stage.first or (stage.last and shape.tie_embeddings)
    out: dict[str, tuple[int, ...]] = {HF_EMBED: (shape.vocab_size, h)} if embed else {}
    for i in stage.layers:
        out.update({name: layer[key] for key, name in _hf_layer(i).items() if key not in absent})
    if stage.last:
        out[HF_NORM] = (h,)
        if not shape.tie_embeddings:
            out[HF_LM_HEAD] = (shape.vocab_size, h)
    return out


def hf_names(shape: GPTShape, stage: PipelineStage | None = None) -> list[str]:
    """The names of ``hf_shapes``."""
    return list(hf_shapes(shape, stage))


def mcore_shapes(
    shape: GPTShape,
    spec: LayerSpec = "local",
    *,
    padded_vocab_size: int | None = None,
    stage: PipelineStage | None = None,
) -> dict[str, tuple[int, ...]]:
    """The tensors of a (stage of a) megatron-core ``GPTModel`` of ``shape``, local names, with
    their full (TP-unsharded) shapes, in state-dict order. ``_extra_state`` entries are left out."""
    stage = stage or whole_model(shape)
    h, d, f = shape.hidden_size, shape.head_dim, shape.ffn_hidden_size
    vocab = _check_padding(shape, padded_vocab_size)
    out: dict[str, tuple[int, ...]] = {MC_EMBED: (vocab, h)} if stage.first else {}
    for local in range(stage.num_layers):
        m = _mc_layer(local, spec)
        out[m["attn_norm"]] = (h,)
        out[m["qkv"]] = (shape.qkv_rows, h)
        if shape.qkv_bias:
            out[m["qkv_bias"]] = (shape.qkv_rows,)
        if shape.qk_norm:
            out[m["q_norm"]] = out[m["k_norm"]] = (d,)
        out[m["proj"]] = (h, shape.num_heads * d)
        out[m["mlp_norm"]] = (h,)
        out[m["fc1"]] = (2 * f, h)
        out[m["fc2"]] = (h, f)
    if stage.last:
        out[MC_NORM] = (h,)
        if not shape.tie_embeddings or not stage.first:  # a later stage's copy of a tied one
            out[MC_OUTPUT] = (vocab, h)
    return out


def mcore_to_hf(
    mc: Mapping[str, torch.Tensor],
    shape: GPTShape,
    spec: LayerSpec = "local",
    *,
    padded_vocab_size: int | None = None,
    where: str = "the megatron-core weights",
    stage: PipelineStage | None = None,
) -> dict[str, torch.Tensor]:
    """An HF causal-LM state dict from a full megatron-core ``GPTModel`` state dict (the inverse of
    ``hf_to_mcore``): every tensor ``mcore_shapes`` lists, checked and converted by
    ``mcore_tensor_to_hf``. Tied models get no ``lm_head.weight``, as HF saves them. Megatron's
    ``_extra_state`` entries (TE's FP8 metadata, None for the local spec) carry no weights and
    are skipped. ``stage`` converts one pipeline stage's state dict (local layer numbers) to its
    HF tensors (global numbers); the last stage's copy of a tied embedding is dropped."""
    src = _Tensors(mc, where, ("._extra_state",))
    out: dict[str, torch.Tensor] = {}
    expected = mcore_shapes(shape, spec, padded_vocab_size=padded_vocab_size, stage=stage)
    for name, tensor_shape in expected.items():
        tensor = src.take(name, tensor_shape)
        out.update(
            mcore_tensor_to_hf(
                name, tensor, shape, spec, padded_vocab_size=padded_vocab_size, stage=stage
            )
        )
    src.finish()
    return out


# --- one tensor at a time ------------------------------------------------------------------------

# Layer tensors: megatron key (``_mc_layer``) -> the HF keys (``_hf_layer``) it is made of.
_LAYER_PARTS = {
    "attn_norm": ("attn_norm",),
    "qkv": ("q", "k", "v"),
    "qkv_bias": ("q_bias", "k_bias", "v_bias"),
    "q_norm": ("q_norm",),
    "k_norm": ("k_norm",),
    "proj": ("o",),
    "mlp_norm": ("mlp_norm",),
    "fc1": ("gate", "up"),
    "fc2": ("down",),
}


def hf_parts(
    name: str, shape: GPTShape, spec: LayerSpec = "local", *, stage: PipelineStage | None = None
) -> list[str]:
    """The HF tensor names that the megatron-core tensor ``name`` (a stage's local name) is made
    of, in order; empty for the last stage's copy of a tied embedding (the first stage's
    embedding is the saved one)."""
    stage = stage or whole_model(shape)
    if name == MC_EMBED:
        return [HF_EMBED]
    if name == MC_NORM:
        return [HF_NORM]
    if name == MC_OUTPUT:
        return [] if shape.tie_embeddings else [HF_LM_HEAD]
    parts = name.split(".")
    if len(parts) > 3 and parts[:2] == ["decoder", "layers"] and parts[2].isdigit():
        local = int(parts[2])
        for key, mc_name in _mc_layer(local, spec).items():
            if mc_name == name and local < stage.num_layers:
                hf_layer = _hf_layer(stage.first_layer + local)
                return [hf_layer[k] for k in _LAYER_PARTS[key]]
    raise CheckpointError(f"{name}: not a tensor of a Llama-shaped megatron-core GPTModel")


def hf_sources(
    name: str, shape: GPTShape, spec: LayerSpec = "local", *, stage: PipelineStage | None = None
) -> list[str]:
    """The HF tensors the megatron-core tensor ``name`` is built from when loading: its
    ``hf_parts``, or for the last stage's copy of a tied embedding, the embedding."""
    return hf_parts(name, shape, spec, stage=stage) or [HF_EMBED]


def mcore_tensor_to_hf(
    name: str,
    tensor: torch.Tensor,
    shape: GPTShape,
    spec: LayerSpec = "local",
    *,
    padded_vocab_size: int | None = None,
    stage: PipelineStage | None = None,
) -> dict[str, torch.Tensor]:
    """One full (TP-unsharded) megatron-core tensor as the HF tensors it holds. ``mcore_to_hf``
    applies it to every tensor; alone, it converts per-parameter state (optimizer moments, master
    weights) one parameter at a time."""
    names = hf_parts(name, shape, spec, stage=stage)
    if name in (MC_EMBED, MC_OUTPUT):
        rows = _check_padding(shape, padded_vocab_size)
        if tensor.shape[0] != rows:
            raise CheckpointError(
                f"{name}: {tensor.shape[0]} rows, the padded vocabulary is {rows}"
            )
        pieces = [tensor[: shape.vocab_size]] if names else []
    elif len(names) == 3:
        pieces = list(split_qkv(tensor, shape))
    elif len(names) == 2:
        pieces = list(tensor.chunk(2))
    else:
        pieces = [tensor]
    return {n: p.contiguous() for n, p in zip(names, pieces, strict=True)}


def hf_to_mcore_tensor(
    name: str,
    hf: Mapping[str, torch.Tensor],
    shape: GPTShape,
    spec: LayerSpec = "local",
    *,
    padded_vocab_size: int | None = None,
    stage: PipelineStage | None = None,
) -> torch.Tensor:
    """The full megatron-core tensor ``name`` from the HF tensors ``hf_sources`` names (the
    inverse of ``mcore_tensor_to_hf``)."""
    names = hf_sources(name, shape, spec, stage=stage)
    missing = [n for n in names if n not in hf]
    if missing:
        raise CheckpointError(f"{name}: missing HF tensor {missing[0]}")
    pieces = [hf[n] for n in names]
    if name in (MC_EMBED, MC_OUTPUT):
        return _pad_rows(pieces[0], _check_padding(shape, padded_vocab_size))
    if len(pieces) == 3:
        return fuse_qkv(*pieces, shape)
    return torch.cat(pieces) if len(pieces) == 2 else pieces[0]


# --- tensor parallel ------------------------------------------------------------------------------


def _split_problem(name: str, tensor: torch.Tensor, split: Split, tp: int, shape: GPTShape) -> str:
    if split == "rows" and "linear_qkv" in name:
        if shape.num_kv_heads % tp:
            return f"num_kv_heads ({shape.num_kv_heads}) is not divisible by tensor parallel {tp}"
        return ""
    size = {"rows": tensor.shape[0], "glu": tensor.shape[0] // 2, "columns": tensor.shape[-1]}
    if split != "replicated" and size[split] % tp:
        hint = " (pad the vocabulary: padded_vocab_size)" if name in (MC_EMBED, MC_OUTPUT) else ""
        return f"dimension {size[split]} is not divisible by tensor parallel {tp}{hint}"
    return ""


def shard_tensor_parallel(
    mc: Mapping[str, torch.Tensor], shape: GPTShape, tp: int
) -> list[dict[str, torch.Tensor]]:
    """Split a full megatron-core state dict into the ``tp`` state dicts of the tensor-parallel
    ranks (rank r's is element r), as each rank's ``GPTModel`` holds them."""
    if tp < 1:
        raise ValueError(f"tensor parallel size must be at least 1, got {tp}")
    tensors = {name: t for name, t in mc.items() if not name.endswith("._extra_state")}
    return [
        {name: tensor_parallel_piece(name, t, shape, tp, rank) for name, t in tensors.items()}
        for rank in range(tp)
    ]


def tensor_parallel_piece(
    name: str, tensor: torch.Tensor, shape: GPTShape, tp: int, rank: int
) -> torch.Tensor:
    """Tensor-parallel rank ``rank``'s piece (a copy) of the full megatron-core tensor ``name``:
    the element ``rank`` of ``shard_tensor_parallel``, without making the other ranks' pieces."""
    split = tensor_parallel_split(name)
    if problem := _split_problem(name, tensor, split, tp, shape):
        raise CheckpointError(f"{name}: {problem}")
    if split == "replicated":
        return tensor.clone()
    if split == "rows":
        return tensor.chunk(tp, dim=0)[rank].clone()
    if split == "columns":
        return tensor.chunk(tp, dim=-1)[rank].clone()
    # glu: each rank holds its slice of gate followed by its slice of up
    gate, up = tensor.chunk(2, dim=0)
    return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])


def unshard_tensor_parallel(
    shards: Sequence[Mapping[str, torch.Tensor]], check_replicas: bool = True
) -> dict[str, torch.Tensor]:
    """The full state dict from the tensor-parallel ranks' state dicts (inverse of
    ``shard_tensor_parallel``). Replicated tensors must agree across ranks, unless
    ``check_replicas`` is false: then rank 0's copy is taken (during training, replicas of a norm
    may differ in the last bits where the backward pass reduces with atomics; megatron saves
    rank 0's copy too)."""
    if not shards:
        raise ValueError("no shards")
    names = [n for n in shards[0] if not n.endswith("._extra_state")]
    for rank, shard in enumerate(shards[1:], start=1):
        have = {n for n in shard if not n.endswith("._extra_state")}
        if diff := sorted(have.symmetric_difference(names)):
            raise CheckpointError(
                f"tensor-parallel rank {rank}: its tensors differ from rank 0's ({diff[0]})"
            )
    out: dict[str, torch.Tensor] = {}
    for name in names:
        pieces = [shard[name] for shard in shards]
        split = tensor_parallel_split(name)
        if split == "replicated":
            for rank, piece in enumerate(pieces[1:] if check_replicas else [], start=1):
                if not torch.equal(piece, pieces[0]):
                    raise CheckpointError(
                        f"{name}: replicated across tensor-parallel ranks, but rank {rank}'s "
                        f"copy differs from rank 0's"
                    )
            out[name] = pieces[0].clone()
        elif split == "rows":
            out[name] = torch.cat(pieces, dim=0)
        elif split == "columns":
            out[name] = torch.cat(pieces, dim=-1)
        else:
            halves = [p.chunk(2, dim=0) for p in pieces]
            out[name] = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return out
