"""Run-spec rules for the training backend and tensor/pipeline parallel sizes.

Sizes above 1 cannot run on one GPU (or on CPU); what is checked here is that impossible layouts
are refused when the spec is loaded, with the keys named, before anything starts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
import yaml

from midtrain.config import breaks_exactness, load_run_spec
from midtrain.errors import ConfigError
from midtrain.training.parallel import check_model_fits

SPEC = {
    "run_dir": "runs/par",
    "model": {
        "tokenizer": "tok",
        "config": {
            "hidden_size": 64,
            "num_layers": 4,
            "num_heads": 8,
            "num_kv_heads": 2,
            "ffn_hidden_size": 176,
        },
    },
    "mixture": {
        "seq_length": 32,
        "seed": 3,
        "sources": [{"name": "law", "kind": "customer", "path": ["data/law"], "weight": 1.0}],
    },
    "optimizer": {"lr": 1e-3},
    "schedule": {"kind": "constant"},
    "train": {"global_batch_size": 16, "micro_batch_size": 2, "max_steps": 10},
    "workers": 8,
}

NO_GPU = "needs a CUDA GPU"


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    return path


def error(spec_file: Path, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as err:
        load_run_spec(spec_file, overrides)
    message = str(err.value)
    assert str(spec_file) in message  # every message names the file
    return message


def test_defaults_are_deepspeed_and_pure_data_parallel(spec_file: Path) -> None:
    spec = load_run_spec(spec_file)
    assert spec.train.backend == "deepspeed"
    assert (spec.parallel.tensor, spec.parallel.pipeline) == (1, 1)
    assert spec.data_parallel_size == 8 and spec.grad_accum_steps == 1
    assert "parallel:" in spec.to_yaml() and "backend: deepspeed" in spec.to_yaml()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("parallel.tensor=2", "parallel.tensor (2)"),
        ("parallel.pipeline=2", "parallel.pipeline (2)"),
    ],
)
def test_deepspeed_rejects_model_parallelism(spec_file: Path, override: str, key: str) -> None:
    message = error(spec_file, [override])
    assert key in message and "deepspeed backend is data-parallel only" in message


def test_workers_must_fill_whole_model_replicas(spec_file: Path) -> None:
    message = error(
        spec_file,
        ["train.backend=megatron", "parallel.tensor=2", "parallel.pipeline=2", "workers=6"],
    )
    assert (
        "workers (6) must be a multiple of parallel.tensor x parallel.pipeline (2 x 2)" in message
    )


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["parallel.tensor=8", "model.config.num_heads=4"], "model.config.num_heads (4)"),
        (["parallel.tensor=4"], "parallel.tensor (4) must divide model.config.num_kv_heads (2)"),
        (["parallel.pipeline=8"], "parallel.pipeline (8) must divide model.config.num_layers (4)"),
        (
            ["parallel.tensor=2", "model.config.ffn_hidden_size=175"],
            "parallel.tensor (2) must divide model.config.ffn_hidden_size (175)",
        ),
    ],
)
def test_sizes_must_divide_the_model_shape(
    spec_file: Path, overrides: list[str], expected: str
) -> None:
    message = error(spec_file, ["train.backend=megatron", *overrides])
    assert expected in message


def test_tensor_size_equal_to_kv_heads_passes_the_shape_rules(spec_file: Path) -> None:
    # tensor 2 | 8 heads, 2 kv heads; pipeline 2 | 4 layers; 8 workers = 2 data x 2 x 2: the only
    # complaint left is a machine without CUDA; with one, the spec loads.
    overrides = ["train.backend=megatron", "parallel.tensor=2", "parallel.pipeline=2"]
    if torch.cuda.is_available():
        assert load_run_spec(spec_file, overrides).data_parallel_size == 2
    else:
        message = error(spec_file, overrides)
        assert "train.backend: the megatron backend needs a CUDA GPU" in message
        assert "must divide" not in message and "multiple of" not in message


def test_batch_divides_over_data_parallel_replicas_not_workers(spec_file: Path) -> None:
    # 8 workers at tensor 2 = 4 data-parallel replicas: 4 x micro 2 = 8 per step, 12 is no multiple
    # (with workers alone it would need 16).
    message = error(
        spec_file, ["train.backend=megatron", "parallel.tensor=2", "train.global_batch_size=12"]
    )
    assert "train.global_batch_size (12) must be a multiple of train.micro_batch_size x " in message
    assert "data-parallel size" in message and "(2 x 4)" in message


def test_megatron_needs_gpus(spec_file: Path) -> None:
    message = error(spec_file, ["train.backend=megatron", "launch.use_gpu=false"])
    assert "train.backend: megatron runs on GPUs only, but launch.use_gpu is false" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_megatron_on_a_machine_without_cuda_is_a_clear_error(spec_file: Path) -> None:
    message = error(spec_file, ["train.backend=megatron"])
    assert NO_GPU in message


def test_hf_model_options_are_refused_for_megatron(spec_file: Path) -> None:
    # Options of the HF model that megatron-core's GPTModel has no use for: named, not ignored.
    message = error(spec_file, ["train.backend=megatron", "model.compile=true"])
    assert "model.compile: applies to the deepspeed backend's HF model only" in message
    message = error(spec_file, ["train.backend=megatron", "model.attn_implementation=eager"])
    assert "model.attn_implementation: applies to the deepspeed backend" in message


def test_unknown_backend_and_keys_are_named(spec_file: Path) -> None:
    assert "train.backend: Input should be 'deepspeed' or 'megatron'" in error(
        spec_file, ["train.backend=fsdp"]
    )
    assert "parallel.data: unknown key" in error(spec_file, ["parallel.data=2"])
    assert "parallel.tensor: Input should be greater than 0" in error(
        spec_file, ["parallel.tensor=0"]
    )


def test_changing_backend_or_parallel_layout_breaks_exact_resume() -> None:
    assert breaks_exactness("train.backend") and breaks_exactness("parallel.tensor")
    assert not breaks_exactness("workers")


def test_checkpoint_shapes_are_checked_by_name() -> None:
    config = transformers.LlamaConfig(
        hidden_size=64,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=176,
    )
    where = "ckpt/config.json"
    check_model_fits(2, 3, config, where, 32)  # fits: no error
    with pytest.raises(
        ConfigError,
        match=r"parallel.tensor \(4\) must divide ckpt/config.json: num_key_value_heads \(2\)",
    ):
        check_model_fits(4, 1, config, where, 32)
    with pytest.raises(
        ConfigError, match=r"parallel.pipeline \(4\) must divide .*: num_hidden_layers \(6\)"
    ):
        check_model_fits(1, 4, config, where, 32)
    config.intermediate_size = 175  # the MLP's width is split over the tensor-parallel ranks
    with pytest.raises(ConfigError, match=r"must divide ckpt/config.json: intermediate_size"):
        check_model_fits(2, 1, config, where, 32)


SMALL = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (transformers.GPT2Config(), "model_type 'gpt2': the megatron converter handles"),
        (
            transformers.LlamaConfig(
                **SMALL, rope_parameters={"rope_type": "linear", "factor": 2.0}
            ),
            "rope_type 'linear': the megatron backend supports plain RoPE only",
        ),
        (
            transformers.LlamaConfig(**SMALL, rope_theta=10000.5),
            "rope_theta 10000.5: the megatron backend needs an integer",
        ),
        (
            transformers.MistralConfig(**SMALL, sliding_window=16),
            "sliding_window (16) is shorter than mixture.seq_length (32)",
        ),
        (
            transformers.Qwen2Config(
                **SMALL, use_sliding_window=True, sliding_window=8, max_window_layers=2
            ),
            "sliding_window (8) is shorter than mixture.seq_length (32)",
        ),
    ],
)
def test_models_megatron_cannot_express_are_refused_naming_the_file(
    config: transformers.PretrainedConfig, message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        check_model_fits(1, 1, config, "ckpt/config.json", 32)
    assert str(err.value).startswith("ckpt/config.json: ") and message in str(err.value)


def test_windows_that_cover_the_sequence_are_fine() -> None:
    check_model_fits(1, 1, transformers.MistralConfig(**SMALL, sliding_window=32), "c", 32)
    check_model_fits(1, 1, transformers.MistralConfig(**SMALL, sliding_window=None), "c", 32)
    check_model_fits(1, 1, transformers.Qwen2Config(**SMALL, use_sliding_window=False), "c", 32)
    # A window that no layer uses (Qwen2's first max_window_layers layers attend fully).
    all_full = transformers.Qwen2Config(
        **SMALL, use_sliding_window=True, sliding_window=8, max_window_layers=4
    )
    assert all_full.sliding_window == 8 and "sliding_attention" not in all_full.layer_types
    check_model_fits(1, 1, all_full, "c", 32)


def test_the_driver_checks_a_checkpoints_model_before_any_worker_starts(
    tmp_path: Path, prepared_corpora: dict[str, Path]
) -> None:
    from midtrain.training.checkpointing import check_start

    hf = tmp_path / "hf"
    config = transformers.LlamaConfig(**SMALL, intermediate_size=96, vocab_size=512)
    transformers.LlamaForCausalLM(config).save_pretrained(hf)
    spec_file = tmp_path / "run.yaml"
    data = {
        **SPEC,
        "run_dir": str(tmp_path / "run"),
        "model": {"from_checkpoint": str(hf), "tokenizer": str(prepared_corpora["tokenizer"])},
        "mixture": {
            **SPEC["mixture"],
            "sources": [
                {**SPEC["mixture"]["sources"][0], "path": [str(prepared_corpora["legal"])]}
            ],
        },
        "workers": 1,
        "train": {**SPEC["train"], "global_batch_size": 2},
    }
    spec_file.write_text(yaml.safe_dump(data))
    spec = load_run_spec(spec_file)
    check_start(spec, resuming=False)  # the deepspeed backend: no megatron rules
    # The megatron backend cannot load on a machine without CUDA; its rules do not need one.
    megatron = spec.model_copy(
        update={
            "train": spec.train.model_copy(update={"backend": "megatron"}),
            "parallel": spec.parallel.model_copy(update={"tensor": 8}),
            "workers": 8,
        }
    )
    with pytest.raises(ConfigError) as err:
        check_start(megatron, resuming=False)
    assert f"parallel.tensor (8) must divide {hf}/config.json: num_attention_heads (4)" in str(
        err.value
    )


def test_the_megatron_layer_spec_can_be_forced_to_local(monkeypatch: pytest.MonkeyPatch) -> None:
    from midtrain.training import megatron_model

    monkeypatch.setattr(megatron_model, "_transformer_engine_imports", lambda: True)
    assert megatron_model.have_transformer_engine()  # TE imports: used
    monkeypatch.setenv("MIDTRAIN_MEGATRON_SPEC", "local")
    assert not megatron_model.have_transformer_engine()
    monkeypatch.setenv("MIDTRAIN_MEGATRON_SPEC", "te")
    with pytest.raises(ConfigError, match="MIDTRAIN_MEGATRON_SPEC='te': the only value"):
        megatron_model.have_transformer_engine()
