"""The model: a Hugging Face causal LM, built from a shape in the run spec or loaded from a directory.

Loading is local only (no hub), never with ``trust_remote_code``, and weights come from safetensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers

from midtrain.config import LlamaShape
from midtrain.errors import CheckpointError, ConfigError

# Keys of an HF config that define the tensors' shapes: a start checkpoint must match on these.
SHAPE_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "tie_word_embeddings",
)


def llama_config(
    shape: LlamaShape, vocab_size: int, seq_length: int, attn_implementation: str = "sdpa"
) -> transformers.LlamaConfig:
    """The HF config of a new Llama-family model of ``shape``."""
    return transformers.LlamaConfig(
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads or shape.num_heads,
        intermediate_size=shape.ffn_hidden_size,
        vocab_size=shape.vocab_size or vocab_size,
        max_position_embeddings=shape.max_position_embeddings or seq_length,
        rope_theta=shape.rope_theta,
        rms_norm_eps=shape.rms_norm_eps,
        tie_word_embeddings=shape.tie_embeddings,
        attention_dropout=0.0,
        use_cache=False,
        attn_implementation=attn_implementation,
    )


def build_model(
    config: transformers.PretrainedConfig, seed: int, attn_implementation: str | None = None
) -> transformers.PreTrainedModel:
    """A freshly initialised fp32 model; the same seed gives the same weights on every rank.
    ``attn_implementation`` wins over the config's (a saved config.json does not record it)."""
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation=attn_implementation
    )


def load_hf_config(model_dir: str | Path) -> transformers.PretrainedConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (not a model directory)")
    try:
        return transformers.AutoConfig.from_pretrained(
            str(model_dir), local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:  # transformers' validators raise huggingface_hub's own classes too
        raise CheckpointError(f"{path}: cannot read the model config: {exc}") from None


def check_same_shape(
    expected: transformers.PretrainedConfig, found: transformers.PretrainedConfig, where: str
) -> None:
    """Refuse a start checkpoint whose tensors would not fit the configured model."""
    diffs = [
        f"{key}: {getattr(expected, key, None)} in the run spec, {getattr(found, key, None)} in {where}"
        for key in SHAPE_KEYS
        if getattr(expected, key, None) != getattr(found, key, None)
    ]
    if diffs:
        raise ConfigError(f"{where} holds a model of another shape:\n  " + "\n  ".join(diffs))


def apply_model_options(
    model: transformers.PreTrainedModel, activation_checkpointing: bool
) -> transformers.PreTrainedModel:
    model.config.use_cache = False
    if activation_checkpointing:
        # Non-reentrant: works with torch.compile and inputs that need no grad. transformers 5
        # renamed the method; 4.x has only the old name.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: norms and biases are not decayed (the usual LLM recipe)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def sequence_losses(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence in ``tokens`` [B, L+1] -> [B]."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits = model(input_ids=inputs).logits
    losses = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
    )
    return losses.view(targets.shape).mean(dim=1)
