"""The DeepSpeed engine's optimizer state, per parameter, across ZeRO stages and precisions:
saving at step k and resuming gives the same steps after k as an uninterrupted run.

These run the training loop in this process (a one-rank gloo group, no Ray) to cover the stages
cheaply; the multi-worker paths are in test_training.py.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import yaml

from midtrain.checkpoints import load_checkpoint
from midtrain.config import load_run_spec
from midtrain.training.metrics import read_metrics


@pytest.fixture(scope="module")
def one_rank_group() -> Any:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch_env = dict(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
    )
    saved = {k: os.environ.get(k) for k in launch_env}
    os.environ.update(launch_env)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    # Later tests' subprocesses must not inherit this group's rendezvous.
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _spec(tmp: Path, corpora: dict[str, Path], run: str, stage: int, precision: str) -> Path:
    spec = {
        "run_dir": str(tmp / run),
        "model": {
            "tokenizer": str(corpora["tokenizer"]),
            "config": {
                "hidden_size": 32,
                "num_layers": 2,
                "num_heads": 4,
                "num_kv_heads": 2,
                "ffn_hidden_size": 64,
            },
        },
        "mixture": {
            "seq_length": 16,
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
        "optimizer": {"lr": 1e-2},
        "schedule": {"kind": "cosine", "warmup_steps": 2},
        "train": {
            "global_batch_size": 4,
            "micro_batch_size": 2,
            "max_steps": 6,
            "seed": 3,
            "zero_stage": stage,
            "precision": precision,
        },
        "checkpoint": {"interval": 3, "keep_last": 5, "async_save": True},
        "workers": 1,
    }
    path = tmp / f"{run}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize(
    ("stage", "precision"), [(0, "fp32"), (1, "fp32"), (2, "fp32"), (3, "fp32"), (2, "bf16")]
)
def test_resume_is_exact_for_each_stage(
    tmp_path: Path,
    prepared_corpora: dict[str, Path],
    one_rank_group: None,
    stage: int,
    precision: str,
) -> None:
    from midtrain.training.loop import train

    full = load_run_spec(_spec(tmp_path, prepared_corpora, "full", stage, precision))
    assert train(full).status == "completed"

    # Resume a copy of the run from its step-3 checkpoint.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(full.run_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "step_00000006")
    (resumed_dir / "checkpoints" / "latest").write_text("step_00000003\n")
    ckpt = load_checkpoint(resumed_dir)
    assert ckpt.has_optimizer and ckpt.step == 3
    keys = ckpt.optimizer_keys()
    assert any(k.endswith("/exp_avg_sq") for k in keys) and any(k.endswith("/master") for k in keys)

    resumed = full.model_copy(update={"run_dir": str(resumed_dir)})
    assert train(resumed).status == "completed"
    a, b = read_metrics(full.run_dir), read_metrics(resumed_dir)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b, strict=True):
        assert (x["loss"], x["grad_norm"], x["lr"]) == (y["loss"], y["grad_norm"], y["lr"])
        assert isinstance(x["grad_norm"], float) and x["grad_norm"] > 0  # also without ZeRO


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one(
    tmp_path: Path, prepared_corpora: dict[str, Path], one_rank_group: None
) -> None:
    """model.compile: true (torch.compile through DeepSpeed's engine.compile, inductor on CPU)
    gives the eager run's losses to float tolerance."""
    from midtrain.training.loop import train

    eager = load_run_spec(_spec(tmp_path, prepared_corpora, "eager", 1, "fp32"))
    eager = eager.model_copy(update={"train": eager.train.model_copy(update={"max_steps": 3})})
    compiled = eager.model_copy(
        update={
            "run_dir": str(tmp_path / "compiled"),
            "model": eager.model.model_copy(update={"compile": True}),
        }
    )
    assert train(eager).status == "completed"
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert train(compiled).status == "completed"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile
    a, b = read_metrics(eager.run_dir), read_metrics(compiled.run_dir)
    assert [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4)


def _backend(spec: Any) -> Any:
    from midtrain.training.backend import build_backend
    from midtrain.training.checkpointing import resolve_start

    return build_backend(spec, resolve_start(spec), rank=0, world=1)


def test_activation_checkpointing_keeps_fewer_activations_and_changes_no_result(
    tmp_path: Path, prepared_corpora: dict[str, Path], one_rank_group: None
) -> None:
    """model.activation_checkpointing: true keeps only each decoder layer's input for the backward
    pass (the layer runs again inside it) and gives the same losses and gradients."""
    from midtrain.data_mixing.sampler import MixtureSampler

    plain = load_run_spec(_spec(tmp_path, prepared_corpora, "plain", 1, "fp32"))
    recompute = plain.model_copy(
        update={"model": plain.model.model_copy(update={"activation_checkpointing": True})}
    )
    results = []
    for spec in (plain, recompute):
        backend = _backend(spec)
        saved: list[int] = []  # tensors autograd keeps from the forward pass for the backward

        def keep(tensor: torch.Tensor, saved: list[int] = saved) -> torch.Tensor:
            saved.append(tensor.numel())
            return tensor

        sampler = MixtureSampler(spec.mixture, total_sequences=spec.total_sequences)
        losses = []
        for _ in range(3):
            batch = sampler.next_batch_for_rank(spec.train.global_batch_size, 0, 1)
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
                loss_sum, count = backend.train_step(batch, len(sampler.source_names))
            losses.append(float(loss_sum.sum() / count.sum()))
        results.append((losses, backend.grad_norm(), len(saved)))
    (plain_losses, plain_norm, plain_saved), (ckpt_losses, ckpt_norm, ckpt_saved) = results
    assert 0 < ckpt_saved < plain_saved / 3  # without it: 89 tensors per micro-batch here
    assert ckpt_losses == pytest.approx(plain_losses, rel=1e-6)
    assert ckpt_norm == pytest.approx(plain_norm, rel=1e-5)


def test_grad_norm_without_zero_is_the_one_zero_reports(
    tmp_path: Path, prepared_corpora: dict[str, Path], one_rank_group: None
) -> None:
    """Stage 0 (fp32) keeps no norm in DeepSpeed: the backend measures it, before clipping, and
    gets what ZeRO-1 reports for the same steps."""
    from midtrain.data_mixing.sampler import MixtureSampler

    norms = []
    for stage in (0, 1):
        spec = load_run_spec(_spec(tmp_path, prepared_corpora, f"stage{stage}", stage, "fp32"))
        backend = _backend(spec)
        sampler = MixtureSampler(spec.mixture, total_sequences=spec.total_sequences)
        steps = []
        for _ in range(2):
            batch = sampler.next_batch_for_rank(spec.train.global_batch_size, 0, 1)
            backend.train_step(batch, len(sampler.source_names))
            steps.append(backend.grad_norm())
        norms.append(steps)
    assert all(n is not None and n > 0 for n in norms[0])
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)


def test_attn_implementation_also_applies_to_a_model_from_a_checkpoint(
    tmp_path: Path, prepared_corpora: dict[str, Path], one_rank_group: None
) -> None:
    """A saved config.json does not record the attention implementation: a resumed or branched
    run (config from the checkpoint) must still use the spec's."""
    spec = load_run_spec(
        _spec(tmp_path, prepared_corpora, "fresh", 1, "fp32"), ["model.attn_implementation=eager"]
    )
    fresh = _backend(spec)
    assert fresh.engine.module.config._attn_implementation == "eager"
    fresh.engine.module.save_pretrained(tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert saved.get("attn_implementation") is None  # what makes the setting necessary
    overrides = ["model.config=null", f"model.from_checkpoint={tmp_path / 'hf'}"]
    for attn in ("eager", "sdpa"):
        spec = load_run_spec(
            _spec(tmp_path, prepared_corpora, f"from_{attn}", 1, "fp32"),
            [*overrides, f"model.attn_implementation={attn}"],
        )
        assert _backend(spec).engine.module.config._attn_implementation == attn


def test_log_interval_thins_the_metrics_but_keeps_the_last_step(
    tmp_path: Path, prepared_corpora: dict[str, Path], one_rank_group: None
) -> None:
    from midtrain.training.loop import train

    path = _spec(tmp_path, prepared_corpora, "sparse", 1, "fp32")
    spec = load_run_spec(path, ["train.log_interval=4"])
    assert train(spec).status == "completed"
    assert [r["step"] for r in read_metrics(spec.run_dir)] == [4, 6]
