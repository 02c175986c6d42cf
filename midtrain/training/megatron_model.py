"""megatron-core's ``GPTModel`` in Llama shape (RMSNorm, SwiGLU, RoPE, grouped-query attention),
built from a Hugging Face config and loaded with converted HF weights.

Two layer specs:

* ``"te"``: megatron's Transformer Engine spec (fused LayerNorm+Linear, TE flash attention), the
  fast one on a GPU; needs ``transformer_engine``.
* ``"local"``: megatron's torch-native spec with its core attention swapped for
  ``SDPACoreAttention``. Megatron's own local ``DotProductAttention`` materialises the full score
  matrix in a CUDA-only buffer; torch's SDPA runs flash kernels on a GPU and also runs on a CPU,
  which is what lets the conversion tests check logits on machines without a GPU.

``MIDTRAIN_MEGATRON_SPEC=local`` in the environment forces the local spec even where Transformer
Engine imports (for a TE build that does not work with this megatron-core); unset or empty, the
TE spec is used when it imports.

megatron-core's ``parallel_state`` must be initialised (``initialize_model_parallel``) before a
model is built: its layers read their tensor-parallel group from it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from midtrain import console
from midtrain.checkpoints.megatron_convert import GPTShape, LayerSpec, rope_base
from midtrain.errors import CheckpointError, ConfigError

SPEC_ENV = "MIDTRAIN_MEGATRON_SPEC"  # "local": never use Transformer Engine


def have_transformer_engine() -> bool:
    """Whether Transformer Engine is to be used: it imports (not just is installed: a build for
    another torch fails at import, and then the local layer spec is used, with a warning) and
    ``MIDTRAIN_MEGATRON_SPEC`` is not ``local``."""
    choice = os.environ.get(SPEC_ENV, "")
    if choice not in ("", "local"):
        raise ConfigError(f"{SPEC_ENV}={choice!r}: the only value it takes is 'local' (or unset)")
    return choice != "local" and _transformer_engine_imports()


@functools.cache
def _transformer_engine_imports() -> bool:
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # any import failure of a compiled extension
        console.info(
            f"warning: transformer_engine is installed but does not import ({exc}); "
            "using megatron's local layer spec"
        )
        return False
    return True


class SDPACoreAttention(MegatronModule):
    """Causal self-attention core with ``torch.nn.functional.scaled_dot_product_attention``.

    Takes megatron's core-attention arguments (query ``[s, b, heads, d]``, key/value
    ``[s, b, groups, d]``) and returns ``[s, b, heads * d]``, like ``DotProductAttention``.
    Only causal masks over whole sequences: the trainer packs documents into fixed-length
    sequences, so there is no padding mask.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
    ) -> None:
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"SDPACoreAttention is causal only, got {attn_mask_type}")
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not support context parallelism")
        # None: SDPA scales by 1/sqrt(head_dim), as DotProductAttention and HF Llama do.
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        if attention_mask is not None or attention_bias is not None or packed_seq_params:
            raise ValueError("SDPACoreAttention takes no attention mask, bias or packed sequences")
        seq, batch = query.shape[0], query.shape[1]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # -> [b, heads, s, d]
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=True,
            scale=self.softmax_scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)


def transformer_config(
    hf_config: Any,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    dtype: torch.dtype = torch.float32,
    spec: LayerSpec = "local",
    sequence_parallel: bool = False,
    on_gpu: bool = True,
    recompute: bool = False,
) -> TransformerConfig:
    """megatron-core's ``TransformerConfig`` for a Llama-family HF config. ``recompute``: full
    activation checkpointing of every layer (megatron's ``full``/``uniform``, one layer a chunk)."""
    shape = GPTShape.from_hf_config(hf_config)
    te = spec == "te"
    return TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_heads,
        num_query_groups=shape.num_kv_heads,
        kv_channels=shape.head_dim,
        ffn_hidden_size=shape.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=float(getattr(hf_config, "rms_norm_eps", 1e-5)),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=shape.qkv_bias,
        qk_layernorm=shape.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=float(getattr(hf_config, "initializer_range", 0.02)),
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # Fusions: megatron 0.16 builds bias-dropout-add with torch.compile, a compile per process
        # for nothing here (no biases, no dropout: it is a plain add); the rest need TE or apex.
        bias_dropout_fusion=False,
        bias_activation_fusion=False,  # no biases: nothing to fuse
        masked_softmax_fusion=False,  # attention is SDPA or TE's, not megatron's softmax
        apply_rope_fusion=te,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        use_cpu_initialization=not on_gpu,
        pipeline_dtype=dtype,  # the dtype of activations sent between pipeline stages
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
    )


def layer_spec(spec: LayerSpec, qk_norm: bool = False, sdpa: bool = True) -> ModuleSpec:
    """The layer spec; ``sdpa=False`` keeps megatron's own local ``DotProductAttention`` (GPU
    only), which the GPU tests compare ``SDPACoreAttention`` against."""
    if spec == "te":
        if not have_transformer_engine():
            raise ConfigError(
                "layer spec 'te' needs transformer_engine, which does not import here "
                f"(or {SPEC_ENV}=local is set)"
            )
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_norm)
    local = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_norm)
    if sdpa:
        local.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return local


def build_gpt_model(
    hf_config: Any,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    dtype: torch.dtype = torch.float32,
    spec: LayerSpec = "local",
    padded_vocab_size: int | None = None,
    max_sequence_length: int | None = None,
    sequence_parallel: bool = False,
    sdpa: bool = True,
    recompute: bool = False,
) -> GPTModel:
    """A freshly initialised ``GPTModel`` of the HF config's shape, on the current CUDA device
    (or on the CPU where there is none). Call ``initialize_model_parallel`` first."""
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("call megatron.core.parallel_state.initialize_model_parallel first")
    shape = GPTShape.from_hf_config(hf_config)
    config = transformer_config(
        hf_config,
        tensor_parallel=tensor_parallel,
        pipeline_parallel=pipeline_parallel,
        dtype=dtype,
        spec=spec,
        sequence_parallel=sequence_parallel,
        on_gpu=torch.cuda.is_available(),
        recompute=recompute,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(spec, shape.qk_norm, sdpa),
        vocab_size=padded_vocab_size or shape.vocab_size,
        max_sequence_length=max_sequence_length
        or int(getattr(hf_config, "max_position_embeddings", 4096)),
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=shape.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=rope_base(hf_config),
    )
    if torch.cuda.is_available():
        # The local spec's torch RMSNorm is created on the CPU in fp32 whatever the config says
        # (Megatron-LM moves and casts the whole model afterwards, as here).
        model = model.to(device=torch.cuda.current_device(), dtype=dtype)
    return model


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # _extra_state entries are metadata (None for the local spec, FP8 state for TE), not weights.
    return {
        k: v
        for k, v in model.state_dict(keep_vars=True).items()
        if not k.endswith("._extra_state") and isinstance(v, torch.Tensor)
    }


def load_mcore_weights(
    model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], where: str
) -> None:
    """Copy one rank's converted weights into ``model``: every weight the model has must be
    given with its shape, and nothing else (the error names the first offending key)."""
    have = _weights(model)
    missing = sorted(set(have) - set(tensors))
    if missing:
        raise CheckpointError(f"{where}: missing tensor {missing[0]} ({len(missing)} missing)")
    extra = sorted(k for k in tensors if k not in have and not k.endswith("._extra_state"))
    if extra:
        raise CheckpointError(f"{where}: the model has no tensor {extra[0]}")
    for name, tensor in have.items():
        if tuple(tensors[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{where}: {name} has shape {tuple(tensors[name].shape)}, the model's is "
                f"{tuple(tensor.shape)}"
            )
    with torch.no_grad():
        for name, param in have.items():
            param.copy_(tensors[name])
