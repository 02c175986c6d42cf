"""The trainer on a GPU (one rank, NCCL). The megatron backend: continued
pretraining from a Hugging Face directory, exact resume, agreement with the DeepSpeed backend on
the same weights and batches, and a megatron checkpoint resumed by the DeepSpeed backend. Both
backends in bf16 (DeepSpeed: fused AdamW): exact resume. Two workers on one GPU are not
possible under NCCL (one rank per device): the 2-worker runs (data, tensor and pipeline parallel)
run where there are 2 GPUs.

Each run is a fresh process (``torch.multiprocessing.spawn``): megatron-core keeps its parallel
groups in module globals. Tensor and pipeline sizes above 1 need several GPUs; their weight paths
are checked on CPU in test_megatron_cpu.py (tensor 2 x pipeline 2 over gloo).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
import transformers
import yaml
from megatron_workers import free_port, train_worker

from midtrain.checkpoints import load_checkpoint
from midtrain.data_mixing.tokenizer import load_tokenizer
from midtrain.training.metrics import read_metrics

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

STEPS = 8
# Longer than one 128-key block of flash/memory-efficient attention's backward, whose atomic
# accumulation across blocks is what could make a resume inexact on a GPU.
SEQ = 256


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory, prepared_corpora: dict[str, Path]) -> Path:
    """A small Llama in a plain HF directory, as `ckpt import-hf` users have."""
    vocab = len(load_tokenizer(str(prepared_corpora["tokenizer"])))
    config = transformers.LlamaConfig(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        vocab_size=vocab,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf") / "llama"
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def spec_file(
    tmp: Path,
    corpora: dict[str, Path],
    hf: Path,
    run: str,
    workers: int = 1,
    parallel: dict[str, int] | None = None,
    grad_clip: float | None = 1.0,
    **train: Any,
) -> Path:
    spec = {
        "run_dir": str(tmp / run),
        "model": {"from_checkpoint": str(hf), "tokenizer": str(corpora["tokenizer"])},
        "mixture": {
            "seq_length": SEQ,
            "seed": 2,
            "sources": [
                {
                    "name": "legal",
                    "kind": "customer",
                    "path": [str(corpora["legal"])],
                    "weight": 0.5,
                },
                {
                    "name": "general",
                    "kind": "curated",
                    "path": [str(corpora["general"])],
                    "weight": 0.5,
                },
            ],
        },
        "optimizer": {"lr": 3e-3, "weight_decay": 0.1, "grad_clip": grad_clip},
        "schedule": {"kind": "cosine", "warmup_steps": 2},
        "train": {
            "global_batch_size": 8,
            "micro_batch_size": 4,
            "max_steps": STEPS,
            "seed": 3,
            "precision": "fp32",
            "backend": "megatron",
            **train,
        },
        "checkpoint": {"interval": 4, "keep_last": 5, "async_save": True},
        "workers": workers,
        "parallel": parallel or {},
    }
    path = tmp / f"{run}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run(spec: Path) -> list[dict[str, Any]]:
    data = yaml.safe_load(spec.read_text())
    world = data["workers"]
    mp.spawn(train_worker, args=(world, free_port(), str(spec)), nprocs=world, join=True)
    return read_metrics(data["run_dir"])


def rewind(run_dir: Path, to: Path, step: int) -> Path:
    """A copy of a run whose latest checkpoint is ``step``: resuming it repeats what followed."""
    shutil.copytree(run_dir, to)
    for ckpt in (to / "checkpoints").glob("step_*"):
        if int(ckpt.name.split("_")[1]) > step:
            shutil.rmtree(ckpt)
    (to / "checkpoints" / "latest").write_text(f"step_{step:08d}\n")
    return to


def resume_copy(spec: Path, step: int) -> list[dict[str, Any]]:
    """Resume a copy of ``spec``'s run rewound to ``step`` (same spec, run_dir ``<run>_resumed``)
    to its end; the copy's metrics."""
    data = yaml.safe_load(spec.read_text())
    run_dir = Path(data["run_dir"])
    resumed = rewind(run_dir, run_dir.with_name(f"{run_dir.name}_resumed"), step)
    resumed_spec = spec.with_name(f"{resumed.name}.yaml")
    resumed_spec.write_text(yaml.safe_dump({**data, "run_dir": str(resumed)}))
    return run(resumed_spec)


@pytest.fixture(scope="module")
def megatron_run(
    tmp_path_factory: pytest.TempPathFactory, prepared_corpora: dict[str, Path], hf_dir: Path
) -> tuple[Path, Path, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("megatron_train")
    spec = spec_file(tmp, prepared_corpora, hf_dir, "megatron")
    return tmp, spec, run(spec)


def test_continued_pretraining_from_hf_learns_and_saves_hf_weights(megatron_run: Any) -> None:
    tmp, spec, records = megatron_run
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    assert set(records[-1]["loss_by_source"]) == {"legal", "general"}
    ckpt = load_checkpoint(tmp / "megatron")
    assert ckpt.step == STEPS and ckpt.has_optimizer
    # The checkpoint holds complete HF weights: they load strictly into the HF model.
    model = transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(ckpt.path))
    model.load_state_dict(ckpt.model_state_dict(), strict=True)
    keys = set(ckpt.optimizer_keys())
    for name, _ in model.named_parameters():
        assert {f"{name}/master", f"{name}/exp_avg", f"{name}/exp_avg_sq"} <= keys, name


def test_grad_norm_is_measured_without_clipping(
    megatron_run: Any, prepared_corpora: dict[str, Path], hf_dir: Path
) -> None:
    # Megatron measures the norm only when it clips (and reports 0.0 otherwise). The first step's
    # gradient is the same with or without clipping: so is its norm.
    tmp, _, records = megatron_run
    spec = spec_file(tmp, prepared_corpora, hf_dir, "no_clip", grad_clip=None, max_steps=3)
    unclipped = run(spec)
    assert unclipped[0]["grad_norm"] == pytest.approx(records[0]["grad_norm"], rel=1e-5)
    assert all(r["grad_norm"] > 0 for r in unclipped)


def test_resume_is_exact(megatron_run: Any) -> None:
    _, spec, records = megatron_run
    again = resume_copy(spec, 4)
    assert [r["step"] for r in again] == list(range(1, STEPS + 1))
    for a, b in zip(records, again, strict=True):
        assert (a["loss"], a["grad_norm"], a["lr"]) == (b["loss"], b["grad_norm"], b["lr"])


def test_deepspeed_agrees_and_resumes_a_megatron_checkpoint(
    megatron_run: Any, prepared_corpora: dict[str, Path], hf_dir: Path
) -> None:
    tmp, spec, records = megatron_run
    # Same weights, batches and optimizer settings: the two backends compute the same steps up
    # to floating-point order (fp32, TF32 off by default for matmuls in torch).
    ds = run(spec_file(tmp, prepared_corpora, hf_dir, "deepspeed", backend="deepspeed"))
    assert ds[0]["loss"] == pytest.approx(records[0]["loss"], abs=1e-4)
    for a, b in zip(records, ds, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-3)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=2e-2)

    # The DeepSpeed backend resumes megatron's step-4 checkpoint (weights, master weights,
    # moments, sampler) and goes on as megatron did.
    crossed_dir = rewind(tmp / "megatron", tmp / "crossed", 4)
    crossed_spec = spec_file(tmp, prepared_corpora, hf_dir, "crossed", backend="deepspeed")
    assert yaml.safe_load(crossed_spec.read_text())["run_dir"] == str(crossed_dir)
    crossed = run(crossed_spec)
    for a, b in zip(records[4:], crossed[4:], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-3)


@pytest.mark.parametrize("backend", ["deepspeed", "megatron"])
def test_bf16_resume_is_exact_on_gpu(
    tmp_path: Path, prepared_corpora: dict[str, Path], hf_dir: Path, backend: str
) -> None:
    # The bf16 CUDA paths with deterministic kernels: DeepSpeed (ZeRO-1, fused AdamW, SDPA, NCCL)
    # and megatron (bf16 parameters, fp32 master shards in the distributed optimizer). Stopping
    # at step 4 and resuming repeats the uninterrupted run's steps exactly.
    spec = spec_file(
        tmp_path, prepared_corpora, hf_dir, f"{backend}_bf16", backend=backend, precision="bf16"
    )
    records = run(spec)
    assert records[-1]["loss"] < records[0]["loss"]
    again = resume_copy(spec, 4)
    for a, b in zip(records, again, strict=True):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize(
    ("backend", "parallel"),
    [
        ("deepspeed", {}),
        ("megatron", {}),  # data parallel 2: the distributed optimizer shards over 2 ranks
        ("megatron", {"tensor": 2}),
        ("megatron", {"pipeline": 2}),
    ],
)
def test_two_workers_learn_and_resume_exactly(
    tmp_path: Path,
    prepared_corpora: dict[str, Path],
    hf_dir: Path,
    backend: str,
    parallel: dict[str, int],
) -> None:
    spec = spec_file(
        tmp_path, prepared_corpora, hf_dir, "two", workers=2, parallel=parallel, backend=backend
    )
    records = run(spec)
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    ckpt = load_checkpoint(tmp_path / "two")
    model = transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(ckpt.path))
    model.load_state_dict(ckpt.model_state_dict(), strict=True)  # every stage's weights arrived
    again = resume_copy(spec, 4)
    for a, b in zip(records, again, strict=True):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"])
