"""HF <-> megatron-core weight conversion and tensor-parallel sharding, as tensor bookkeeping.

These need no megatron-core model; test_megatron_cpu.py checks the same layouts against a real
``GPTModel`` (its names, shapes and logits).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from midtrain.checkpoints.megatron_convert import (
    HF_EMBED,
    HF_LM_HEAD,
    MC_EMBED,
    MC_OUTPUT,
    GPTShape,
    fuse_qkv,
    hf_names,
    hf_parts,
    hf_to_mcore,
    hf_to_mcore_tensor,
    mcore_shapes,
    mcore_tensor_to_hf,
    mcore_to_hf,
    padded_vocab_size,
    pipeline_stage,
    shard_tensor_parallel,
    split_qkv,
    unshard_tensor_parallel,
)
from midtrain.errors import CheckpointError

SMALL = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "intermediate_size": 96,
    "vocab_size": 300,
}

MODELS = {
    "llama-gqa": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "llama-tied": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        {"tie_word_embeddings": True},
    ),
    "llama-mha": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        {"num_key_value_heads": 8},
    ),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {}),
    "qwen2-bias": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3-qknorm": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 24}),
}


def hf_model(
    name: str, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, torch.Tensor], GPTShape]:
    config_cls, model_cls, extra = MODELS[name]
    config = config_cls(**{"tie_word_embeddings": False, **SMALL, **extra})
    torch.manual_seed(0)
    model = model_cls(config).to(dtype)
    with torch.no_grad():  # norms and biases start at 1 and 0: make every tensor distinct
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    state = {
        k: v
        for k, v in model.state_dict().items()
        if not (config.tie_word_embeddings and k == HF_LM_HEAD)
    }
    return state, GPTShape.from_hf_config(config)


@pytest.mark.parametrize("spec", ["local", "te"])
@pytest.mark.parametrize("name", list(MODELS))
def test_hf_to_mcore_to_hf_is_identity(name: str, spec: str) -> None:
    hf, shape = hf_model(name)
    mc = hf_to_mcore(hf, shape, spec)  # type: ignore[arg-type]
    back = mcore_to_hf(mc, shape, spec)  # type: ignore[arg-type]
    assert set(back) == set(hf)
    for key, tensor in hf.items():
        assert torch.equal(back[key], tensor), key
    # Fused: one QKV and one fc1 per layer instead of three and two.
    per_layer = 6 + shape.qkv_bias + 2 * shape.qk_norm
    assert len(mc) == 2 + (not shape.tie_embeddings) + shape.num_layers * per_layer


def test_dtype_is_kept_and_inv_freq_buffers_are_ignored() -> None:
    hf, shape = hf_model("llama-gqa", torch.bfloat16)
    hf["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    mc = hf_to_mcore(hf, shape)
    assert {t.dtype for t in mc.values()} == {torch.bfloat16}
    assert {t.dtype for t in mcore_to_hf(mc, shape).values()} == {torch.bfloat16}


def test_names_follow_the_layer_spec() -> None:
    hf, shape = hf_model("llama-gqa")
    local, te = hf_to_mcore(hf, shape, "local"), hf_to_mcore(hf, shape, "te")
    assert "decoder.layers.1.input_layernorm.weight" in local
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in local
    assert "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in te
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in te
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in te)
    assert torch.equal(
        local["decoder.layers.1.pre_mlp_layernorm.weight"],
        hf["model.layers.1.post_attention_layernorm.weight"],
    )


def test_qkv_is_interleaved_per_query_group() -> None:
    # 4 query heads in 2 groups, head_dim 1: each row holds the id of its head.
    shape = GPTShape(
        num_layers=1,
        hidden_size=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=1,
        ffn_hidden_size=4,
        vocab_size=8,
        tie_embeddings=True,
    )
    q = torch.tensor([[10.0], [11.0], [12.0], [13.0]])  # q0..q3
    k = torch.tensor([[20.0], [21.0]])
    v = torch.tensor([[30.0], [31.0]])
    fused = fuse_qkv(q, k, v, shape)
    # q0 q1 k0 v0 | q2 q3 k1 v1: megatron's [sq, b, groups, (heads/group + 2) * d] split.
    assert fused.flatten().tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, shape), (q, k, v), strict=True))


def test_fc1_is_gate_then_up() -> None:
    hf, shape = hf_model("llama-gqa")
    fc1 = hf_to_mcore(hf, shape)["decoder.layers.0.mlp.linear_fc1.weight"]
    gate, up = fc1.chunk(2)
    assert torch.equal(gate, hf["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(up, hf["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("name", ["llama-gqa", "llama-tied", "qwen2-bias", "qwen3-qknorm"])
def test_tensor_parallel_shard_then_unshard_is_identity(name: str, tp: int) -> None:
    hf, shape = hf_model(name)
    vocab = padded_vocab_size(shape.vocab_size, tp)
    full = hf_to_mcore(hf, shape, padded_vocab_size=vocab)
    shards = shard_tensor_parallel(full, shape, tp)
    assert len(shards) == tp
    assert shards[0][MC_EMBED].shape == (vocab // tp, shape.hidden_size)
    back = unshard_tensor_parallel(shards)
    assert set(back) == set(full)
    assert all(torch.equal(back[k], full[k]) for k in full)
    assert mcore_to_hf(back, shape, padded_vocab_size=vocab).keys() == hf.keys()


def test_tensor_parallel_shards_hold_whole_query_groups_and_their_mlp_slices() -> None:
    hf, shape = hf_model("llama-gqa")  # 8 heads, 4 groups, ffn 96
    shards = shard_tensor_parallel(hf_to_mcore(hf, shape), shape, 2)
    d, f = shape.head_dim, shape.ffn_hidden_size
    a = "model.layers.1."
    for rank, shard in enumerate(shards):
        heads = slice(rank * 4 * d, (rank + 1) * 4 * d)  # query heads 4r..4r+3
        groups = slice(rank * 2 * d, (rank + 1) * 2 * d)  # kv heads 2r, 2r+1
        half = GPTShape(**{**shape.__dict__, "num_heads": 4, "num_kv_heads": 2})
        expected_qkv = fuse_qkv(
            hf[a + "self_attn.q_proj.weight"][heads],
            hf[a + "self_attn.k_proj.weight"][groups],
            hf[a + "self_attn.v_proj.weight"][groups],
            half,
        )
        m = "decoder.layers.1."
        assert torch.equal(shard[m + "self_attention.linear_qkv.weight"], expected_qkv)
        assert torch.equal(
            shard[m + "self_attention.linear_proj.weight"],
            hf[a + "self_attn.o_proj.weight"][:, heads],
        )
        cols = slice(rank * f // 2, (rank + 1) * f // 2)
        assert torch.equal(
            shard[m + "mlp.linear_fc1.weight"],
            torch.cat([hf[a + "mlp.gate_proj.weight"][cols], hf[a + "mlp.up_proj.weight"][cols]]),
        )
        assert torch.equal(
            shard[m + "mlp.linear_fc2.weight"], hf[a + "mlp.down_proj.weight"][:, cols]
        )
        assert torch.equal(shard[m + "input_layernorm.weight"], hf[a + "input_layernorm.weight"])


def test_vocab_padding_is_zero_rows_and_cut_off_again() -> None:
    assert padded_vocab_size(300, 1) == 384 and padded_vocab_size(300, 4) == 512
    assert padded_vocab_size(512, 4) == 512
    hf, shape = hf_model("llama-gqa")
    mc = hf_to_mcore(hf, shape, padded_vocab_size=384)
    assert mc[MC_EMBED].shape[0] == 384 and mc["output_layer.weight"].shape[0] == 384
    assert not mc[MC_EMBED][300:].any()
    back = mcore_to_hf(mc, shape, padded_vocab_size=384)
    assert torch.equal(back[HF_EMBED], hf[HF_EMBED])
    with pytest.raises(ValueError, match="smaller than vocab_size"):
        hf_to_mcore(hf, shape, padded_vocab_size=200)


# --- errors name the key ---------------------------------------------------------------------------


def test_missing_tensor_is_named() -> None:
    hf, shape = hf_model("llama-gqa")
    del hf["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(
        CheckpointError, match=r"missing tensor model\.layers\.1\.self_attn\.k_proj"
    ):
        hf_to_mcore(hf, shape, where="ckpt/model.safetensors")


def test_wrong_shape_is_named_with_both_shapes() -> None:
    hf, shape = hf_model("llama-gqa")
    hf["model.layers.0.mlp.up_proj.weight"] = torch.zeros(95, 64)
    with pytest.raises(CheckpointError) as err:
        hf_to_mcore(hf, shape, where="ckpt/model.safetensors")
    message = str(err.value)
    assert "ckpt/model.safetensors" in message and "model.layers.0.mlp.up_proj.weight" in message
    assert "(95, 64)" in message and "(96, 64)" in message


def test_unexpected_tensor_is_named() -> None:
    hf, shape = hf_model("llama-gqa")
    hf["model.layers.2.self_attn.q_proj.weight"] = torch.zeros(64, 64)  # a third layer
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.2\.self_attn"):
        hf_to_mcore(hf, shape)
    mc = hf_to_mcore(hf_model("llama-gqa")[0], shape)
    mc["decoder.layers.0.self_attention.linear_qkv.bias"] = torch.zeros(shape.qkv_rows)
    with pytest.raises(
        CheckpointError, match=r"unexpected tensor decoder\.layers\.0\..*linear_qkv\.bias"
    ):
        mcore_to_hf(mc, shape)


class _Reads(dict[str, torch.Tensor]):
    """A state dict that records which tensors were looked up."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__(tensors)
        self.read: list[str] = []

    def __getitem__(self, name: str) -> torch.Tensor:
        self.read.append(name)
        return super().__getitem__(name)


def test_names_are_checked_before_any_tensor_is_read() -> None:
    """A lazy state dict (read from files as looked up) costs nothing when its names are wrong."""
    hf, shape = hf_model("llama-gqa")
    extra = _Reads({**hf, "model.layers.2.mlp.up_proj.weight": torch.zeros(96, 64)})
    with pytest.raises(CheckpointError, match="unexpected tensor model.layers.2.mlp.up_proj"):
        hf_to_mcore(extra, shape)
    assert extra.read == []
    lacking = _Reads({k: v for k, v in hf.items() if k != HF_LM_HEAD})
    with pytest.raises(CheckpointError, match="missing tensor lm_head.weight"):
        hf_to_mcore(lacking, shape)
    assert lacking.read == []
    every = _Reads(hf)
    hf_to_mcore(every, shape)
    assert sorted(every.read) == sorted(hf)  # each tensor once


def test_megatron_side_errors_name_the_megatron_key() -> None:
    hf, shape = hf_model("llama-gqa")
    mc = hf_to_mcore(hf, shape, "te")
    with pytest.raises(
        CheckpointError, match=r"missing tensor decoder\.layers\.0\.input_layernorm"
    ):
        mcore_to_hf(mc, shape, "local")  # TE names read as the local spec


def test_tied_lm_head_must_equal_the_embedding() -> None:
    hf, shape = hf_model("llama-tied")
    hf[HF_LM_HEAD] = hf[HF_EMBED].clone()
    assert HF_LM_HEAD not in mcore_to_hf(hf_to_mcore(hf, shape), shape)
    hf[HF_LM_HEAD][0, 0] += 1
    with pytest.raises(CheckpointError, match="lm_head.weight differs from model.embed_tokens"):
        hf_to_mcore(hf, shape)


def test_tensor_parallel_size_must_divide_groups_and_vocab() -> None:
    hf, shape = hf_model("llama-gqa")  # 4 kv heads, vocab 300
    mc = hf_to_mcore(hf, shape, padded_vocab_size=384)
    with pytest.raises(CheckpointError, match=r"linear_qkv\.weight: num_kv_heads \(4\) .* 8"):
        shard_tensor_parallel(mc, shape, 8)
    with pytest.raises(
        CheckpointError, match=r"embedding\.word_embeddings\.weight: .*padded_vocab_size"
    ):
        shard_tensor_parallel(hf_to_mcore(hf, shape), shape, 8)  # 300 rows over 8 ranks
    mc["decoder.layers.0.mystery.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=r"decoder\.layers\.0\.mystery\.weight: not a tensor"):
        shard_tensor_parallel(mc, shape, 2)


def test_unshard_checks_replicas_and_key_sets() -> None:
    hf, shape = hf_model("llama-gqa")
    shards = shard_tensor_parallel(hf_to_mcore(hf, shape), shape, 2)
    shards[1]["decoder.final_layernorm.weight"] = shards[1]["decoder.final_layernorm.weight"] + 1
    with pytest.raises(CheckpointError, match=r"decoder\.final_layernorm\.weight: .*rank 1"):
        unshard_tensor_parallel(shards)
    # A trainer's gather takes rank 0's copy instead (replicas may differ in the last bits).
    joined = unshard_tensor_parallel(shards, check_replicas=False)
    assert torch.equal(
        joined["decoder.final_layernorm.weight"], shards[0]["decoder.final_layernorm.weight"]
    )
    del shards[1]["decoder.final_layernorm.weight"]
    with pytest.raises(CheckpointError, match=r"rank 1: .*decoder\.final_layernorm\.weight"):
        unshard_tensor_parallel(shards)


def test_unsupported_models_are_refused_by_name() -> None:
    with pytest.raises(CheckpointError, match="model_type 'gpt2'"):
        GPTShape.from_hf_config(transformers.GPT2Config())
    with pytest.raises(CheckpointError, match="attention_bias"):
        GPTShape.from_hf_config(transformers.LlamaConfig(**SMALL, attention_bias=True))
    shape = GPTShape.from_hf_config({"model_type": "llama", **SMALL})  # a config.json dict
    assert shape.head_dim == 8 and shape.num_kv_heads == 4 and not shape.tie_embeddings


# --- pipeline stages ----------------------------------------------------------------------------


def four_layer_model(name: str) -> tuple[dict[str, torch.Tensor], GPTShape]:
    config_cls, model_cls, extra = MODELS[name]
    config = config_cls(**{**SMALL, "num_hidden_layers": 4}, **extra)
    torch.manual_seed(0)
    state = model_cls(config).state_dict()
    if config.tie_word_embeddings:
        del state[HF_LM_HEAD]
    return state, GPTShape.from_hf_config(config)


@pytest.mark.parametrize("name", ["llama-gqa", "llama-tied", "qwen2-bias", "qwen3-qknorm"])
@pytest.mark.parametrize("pipeline", [2, 4])
def test_pipeline_stages_convert_their_own_layers_and_join_to_the_whole(
    name: str, pipeline: int
) -> None:
    hf, shape = four_layer_model(name)
    whole = hf_to_mcore(hf, shape, padded_vocab_size=384)
    joined: dict[str, torch.Tensor] = {}
    for rank in range(pipeline):
        stage = pipeline_stage(shape.num_layers, pipeline, rank)
        # Every rank is given the whole HF state dict and takes its stage's part of it.
        mc = hf_to_mcore(hf, shape, padded_vocab_size=384, stage=stage)
        per = shape.num_layers // pipeline
        # Megatron numbers a stage's layers from 0; its tensors equal the whole model's.
        assert {k.split(".")[2] for k in mc if k.startswith("decoder.layers.")} == {
            str(i) for i in range(per)
        }
        for key, tensor in mc.items():
            whole_key = (
                key.replace(
                    f"layers.{key.split('.')[2]}.", f"layers.{int(key.split('.')[2]) + rank * per}."
                )
                if key.startswith("decoder.layers.")
                else key
            )
            if key == MC_OUTPUT and shape.tie_embeddings:
                whole_key = MC_EMBED  # the last stage's copy of the tied embedding
            assert torch.equal(tensor, whole[whole_key]), key
        assert (MC_EMBED in mc) == (rank == 0)
        assert (MC_OUTPUT in mc) == (rank == pipeline - 1)
        back = mcore_to_hf(mc, shape, padded_vocab_size=384, stage=stage)
        assert set(back) == set(hf_names(shape, stage)) - (
            {HF_EMBED} if shape.tie_embeddings and rank else set()
        )
        assert not set(back) & set(joined)
        joined.update(back)
    assert set(joined) == set(hf)
    assert all(torch.equal(joined[k], hf[k]) for k in hf)


def test_stage_conversion_still_refuses_tensors_the_model_does_not_have() -> None:
    hf, shape = four_layer_model("llama-gqa")
    hf["model.layers.9.mlp.gate_proj.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.9\.mlp"):
        hf_to_mcore(hf, shape, stage=pipeline_stage(4, 2, 1))
    del hf["model.layers.9.mlp.gate_proj.weight"], hf["model.layers.3.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.3\.mlp\.up_proj"):
        hf_to_mcore(hf, shape, stage=pipeline_stage(4, 2, 1))
    hf_to_mcore(hf, shape, stage=pipeline_stage(4, 2, 0))  # stage 0 does not need layer 3


def test_pipeline_stage_splits_layers_evenly() -> None:
    assert [list(pipeline_stage(8, 4, r).layers) for r in range(4)] == [
        [0, 1],
        [2, 3],
        [4, 5],
        [6, 7],
    ]
    with pytest.raises(ValueError, match="not divisible by pipeline 3"):
        pipeline_stage(8, 3, 0)
    with pytest.raises(ValueError, match="outside"):
        pipeline_stage(8, 4, 4)


@pytest.mark.parametrize("name", ["llama-gqa", "llama-tied", "qwen2-bias", "qwen3-qknorm"])
@pytest.mark.parametrize("spec", ["local", "te"])
def test_one_tensor_at_a_time_matches_the_whole_state_dict_conversion(name: str, spec: str) -> None:
    hf, shape = four_layer_model(name)
    for rank in range(2):
        stage = pipeline_stage(shape.num_layers, 2, rank)
        mc = hf_to_mcore(hf, shape, spec, padded_vocab_size=384, stage=stage)  # type: ignore[arg-type]
        whole_back = mcore_to_hf(mc, shape, spec, padded_vocab_size=384, stage=stage)  # type: ignore[arg-type]
        # The tensor list mcore_to_hf checks against is what hf_to_mcore builds, shapes included.
        expected = mcore_shapes(shape, spec, padded_vocab_size=384, stage=stage)  # type: ignore[arg-type]
        assert list(expected.items()) == [(k, tuple(v.shape)) for k, v in mc.items()]
        back: dict[str, torch.Tensor] = {}
        for mc_name, tensor in mc.items():
            pieces = mcore_tensor_to_hf(
                mc_name, tensor, shape, spec, padded_vocab_size=384, stage=stage
            )  # type: ignore[arg-type]
            assert list(pieces) == hf_parts(mc_name, shape, spec, stage=stage)  # type: ignore[arg-type]
            back.update(pieces)
            rebuilt = hf_to_mcore_tensor(
                mc_name, hf, shape, spec, padded_vocab_size=384, stage=stage
            )  # type: ignore[arg-type]
            assert torch.equal(rebuilt, tensor), mc_name
        assert back.keys() == whole_back.keys()
        assert all(torch.equal(back[k], whole_back[k]) for k in back)


def test_one_tensor_conversion_names_what_is_wrong() -> None:
    hf, shape = four_layer_model("llama-gqa")
    stage = pipeline_stage(4, 2, 1)
    assert hf_parts("decoder.layers.1.mlp.linear_fc1.weight", shape, stage=stage) == [
        "model.layers.3.mlp.gate_proj.weight",
        "model.layers.3.mlp.up_proj.weight",
    ]
    with pytest.raises(
        CheckpointError, match=r"decoder\.layers\.2\.mlp\.linear_fc1\.weight: not a"
    ):
        hf_parts("decoder.layers.2.mlp.linear_fc1.weight", shape, stage=stage)  # stage has 2
    del hf["model.layers.3.mlp.up_proj.weight"]
    with pytest.raises(
        CheckpointError, match=r"linear_fc1\.weight: missing HF tensor model\.layers\.3\.mlp\.up"
    ):
        hf_to_mcore_tensor("decoder.layers.1.mlp.linear_fc1.weight", hf, shape, stage=stage)
