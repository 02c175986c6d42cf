"""Model FLOPs per token and MFU (model FLOPs utilisation) for Llama-family models.

Training FLOPs per token follow PaLM (Chowdhery et al. 2022, appendix B)::

    6 * N  +  12 * L * H * Q * T

* ``6 N``: forward (2) plus backward (4) multiply-adds of every weight matrix a token passes
  through. N is ``non_embedding_params`` — every parameter but the input embedding (a lookup, no
  matmul) — plus, for a model with tied embeddings, the shared matrix once more: the lm_head
  matmul runs for every token whether or not its weight is shared with the embedding.
* ``12 L H Q T``: attention scores and the weighted sum (QK^T and AV) over ``T = seq_len``
  positions, ``H`` query heads of dimension ``Q``, in ``L`` layers. PaLM's form counts the full
  T x T matrix and does not halve it for causal masking, so figures compare with PaLM's,
  nanoGPT's and torchtitan's MFU.

MFU is the achieved model FLOP/s over the hardware's dense peak; recomputation (activation
checkpointing) does not count as model FLOPs.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

Precision = Literal["bf16", "tf32", "fp32"]


_REQUIRED_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
)


def _hf_config(model_or_config: Any) -> Any:
    """The HF config of a model, or the config itself."""
    cfg = model_or_config
    if not hasattr(cfg, "hidden_size"):
        cfg = getattr(model_or_config, "config", None)
    missing = [key for key in _REQUIRED_KEYS if getattr(cfg, key, None) is None]
    if missing:
        raise TypeError(
            f"expected a Llama-family Hugging Face config or model, got "
            f"{type(model_or_config).__name__} without {', '.join(missing)}"
        )
    return cfg


def _heads(cfg: Any) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim); GQA when kv heads < query heads."""
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    return n_heads, n_kv, head_dim


def non_embedding_params(model_or_config: Any) -> int:
    """Parameters of a Llama-family model (HF config or model) excluding the input embedding.

    Counted from the config: q/o projections ``H x heads*head_dim``, k/v ``H x kv_heads*head_dim``
    (grouped-query attention), SwiGLU MLP ``3 x H x I``, two RMSNorms per layer and a final one,
    and the lm_head unless it is tied to the embedding (then it *is* the embedding).
    """
    cfg = _hf_config(model_or_config)
    h, inter = cfg.hidden_size, cfg.intermediate_size
    n_heads, n_kv, head_dim = _heads(cfg)
    q, kv = n_heads * head_dim, n_kv * head_dim
    attn = h * q + 2 * h * kv + q * h
    if getattr(cfg, "attention_bias", False):
        attn += q + 2 * kv + h
    mlp = 3 * h * inter
    if getattr(cfg, "mlp_bias", False):
        mlp += 2 * inter + h
    per_layer = attn + mlp + 2 * h
    total = cfg.num_hidden_layers * per_layer + h
    if not getattr(cfg, "tie_word_embeddings", False):
        total += cfg.vocab_size * h
    return total


def training_flops_per_token(model_or_config: Any, seq_len: int) -> int:
    """Model FLOPs to train on one token at sequence length ``seq_len`` (PaLM: 6N + 12LHQT)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    cfg = _hf_config(model_or_config)
    n = non_embedding_params(cfg)
    if getattr(cfg, "tie_word_embeddings", False):
        n += cfg.vocab_size * cfg.hidden_size  # the lm_head matmul still runs
    n_heads, _, head_dim = _heads(cfg)
    return 6 * n + 12 * cfg.num_hidden_layers * n_heads * head_dim * seq_len


# Dense (no sparsity) peak FLOP/s per GPU from NVIDIA's datasheets: (bf16, tf32, fp32).
# First match wins, so a variant (NVL, PCIe) comes before its family's default (SXM).
_GPU_PEAKS: list[tuple[str, tuple[float, float, float]]] = [
    (r"\bH100\b.*\bNVL\b", (835e12, 417.5e12, 60e12)),
    (r"\bH100\b.*\bPCIe\b", (756e12, 378e12, 51e12)),
    (r"\bH100\b", (989e12, 494.7e12, 67e12)),  # SXM: "NVIDIA H100 80GB HBM3"
    (r"\bH800\b.*\bPCIe\b", (756e12, 378e12, 51e12)),
    (r"\bH800\b", (989e12, 494.7e12, 67e12)),
    (r"\bH200\b.*\bNVL\b", (835e12, 417.5e12, 60e12)),
    (r"\bH200\b", (989e12, 494.7e12, 67e12)),
    (r"\bGH200\b", (989e12, 494.7e12, 67e12)),
    (r"\bA100\b", (312e12, 156e12, 19.5e12)),
    (r"\bL40S\b", (362.05e12, 183e12, 91.6e12)),
    (r"\bL40\b", (181.05e12, 90.5e12, 90.5e12)),
    (r"\bL4\b", (121e12, 60e12, 30.3e12)),
    (r"\bA10\b", (125e12, 62.5e12, 31.2e12)),
]
_PRECISION_INDEX = {"bf16": 0, "tf32": 1, "fp32": 2}


def gpu_peak_flops(name: str, precision: Precision = "bf16") -> float | None:
    """Dense peak FLOP/s of one GPU by its name (as ``torch.cuda.get_device_name`` gives it).

    ``fp32`` is the CUDA-core peak (no TF32 tensor cores). None for a GPU not in the table.
    """
    for pattern, peaks in _GPU_PEAKS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return peaks[_PRECISION_INDEX[precision]]
    return None


def peak_flops(device: torch.device | str, precision: Precision = "bf16") -> float | None:
    """Dense peak FLOP/s of ``device`` at ``precision``; None for a CPU or an unknown GPU.

    fp32 matmuls that torch lets run on TF32 tensor cores (``set_float32_matmul_precision``
    "high" or "medium") are held to the TF32 peak. None means: do not report MFU.
    """
    import torch

    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    if precision == "fp32" and torch.get_float32_matmul_precision() != "highest":
        precision = "tf32"
    return gpu_peak_flops(torch.cuda.get_device_name(dev), precision)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1]; None when the peak is unknown.

    ``tokens_per_s`` and ``peak`` must describe the same devices: per GPU, or all of them.
    """
    if peak is None or peak <= 0:
        return None
    return tokens_per_s * flops_per_token / peak
