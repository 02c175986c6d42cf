"""FLOPs per token and MFU: parameter counts against real HF models, PaLM's formula, GPU peaks."""

from __future__ import annotations

import pytest
import torch
import transformers

from midtrain.training.flops import (
    gpu_peak_flops,
    mfu,
    non_embedding_params,
    peak_flops,
    training_flops_per_token,
)


def llama(**overrides) -> transformers.LlamaConfig:
    shape = {
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "intermediate_size": 176,
        "vocab_size": 300,
        "tie_word_embeddings": False,
    }
    return transformers.LlamaConfig(**{**shape, **overrides})


def counted(config: transformers.LlamaConfig) -> int:
    """Parameters of a real model, minus the input embedding (a shared lm_head counts once)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())  # deduplicates a tied weight
    return total - model.get_input_embeddings().weight.numel()


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # GQA, untied
        {"num_key_value_heads": 8},  # plain multi-head attention
        {"num_key_value_heads": 1, "tie_word_embeddings": True},  # MQA, tied
        {"head_dim": 16},  # head_dim x heads != hidden_size
        {"attention_bias": True, "mlp_bias": True},
    ],
)
def test_non_embedding_params_match_a_real_model(overrides):
    config = llama(**overrides)
    assert non_embedding_params(config) == counted(config)


def test_model_and_config_give_the_same_count():
    config = llama()
    model = transformers.LlamaForCausalLM(config)
    assert non_embedding_params(model) == non_embedding_params(config)


def test_gqa_has_fewer_parameters_than_mha():
    h = 64
    assert non_embedding_params(llama(num_key_value_heads=8)) - non_embedding_params(
        llama(num_key_value_heads=2)
    ) == 3 * 2 * h * (8 - 2) * (h // 8)  # 3 layers x (k and v) x H x 6 fewer heads x head_dim


def test_training_flops_follow_palm():
    config = llama()
    n = non_embedding_params(config)
    attention = 12 * 3 * 8 * 8 * 128  # 12 * layers * heads * head_dim * seq_len
    assert training_flops_per_token(config, 128) == 6 * n + attention
    # linear in seq_len with PaLM's 12 L H Q slope (no halving for the causal mask)
    slope = training_flops_per_token(config, 129) - training_flops_per_token(config, 128)
    assert slope == 12 * 3 * 64


def test_tied_lm_head_still_costs_its_matmul():
    untied, tied = llama(), llama(tie_word_embeddings=True)
    assert non_embedding_params(untied) - non_embedding_params(tied) == 300 * 64
    assert training_flops_per_token(tied, 128) == training_flops_per_token(untied, 128)


def test_design_fact_llama_1b_on_h100():
    # shared/DESIGN.md (beside the repository): HF Llama 1.24B (Llama-3.2-1B shape), seq 2048,
    # bf16, 55.5k tokens/s = 46.1% MFU.
    config = transformers.LlamaConfig(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        tie_word_embeddings=True,
    )
    flops = training_flops_per_token(config, 2048)
    peak = gpu_peak_flops("NVIDIA H100 80GB HBM3", "bf16")
    assert mfu(55.5e3, flops, peak) == pytest.approx(0.461, abs=5e-4)


@pytest.mark.parametrize(
    ("name", "precision", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
        ("NVIDIA H100 80GB HBM3", "fp32", 67e12),
        ("NVIDIA H100 80GB HBM3", "tf32", 494.7e12),
        ("NVIDIA H100 PCIe", "bf16", 756e12),
        ("NVIDIA H100 NVL", "bf16", 835e12),
        ("NVIDIA H200", "bf16", 989e12),
        ("NVIDIA H200 NVL", "bf16", 835e12),
        ("NVIDIA GH200 480GB", "bf16", 989e12),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
        ("NVIDIA A100 80GB PCIe", "fp32", 19.5e12),
        ("NVIDIA L40S", "bf16", 362.05e12),
        ("NVIDIA L40", "bf16", 181.05e12),
        ("NVIDIA L4", "bf16", 121e12),
        ("NVIDIA A10", "bf16", 125e12),
        ("NVIDIA A10G", "bf16", None),
        ("NVIDIA GeForce RTX 4090", "bf16", None),
        ("AMD Instinct MI300X", "bf16", None),
    ],
)
def test_gpu_peak_flops_by_name(name, precision, peak):
    assert gpu_peak_flops(name, precision) == peak


def test_no_peak_on_cpu():
    assert peak_flops("cpu") is None
    assert peak_flops(torch.device("cpu"), "fp32") is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_peak_of_this_gpu():
    name = torch.cuda.get_device_name(0)
    assert peak_flops("cuda", "bf16") == gpu_peak_flops(name, "bf16")
    if "H100" in name or "H200" in name:
        assert peak_flops(torch.device("cuda:0")) is not None
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: held to the TF32 peak
        assert peak_flops("cuda", "fp32") == gpu_peak_flops(name, "tf32")
        torch.set_float32_matmul_precision("highest")
        assert peak_flops("cuda", "fp32") == gpu_peak_flops(name, "fp32")
    finally:
        torch.set_float32_matmul_precision(before)


def test_mfu():
    assert mfu(1000.0, 1e9, 1e13) == pytest.approx(0.1)
    assert mfu(1000.0, 1e9, None) is None


def test_bad_inputs():
    with pytest.raises(TypeError, match="hidden_size"):
        non_embedding_params(object())
    with pytest.raises(ValueError, match="seq_len"):
        training_flops_per_token(llama(), 0)
