"""Converted HF weights in megatron-core's real ``GPTModel`` on CPU: the converter's names and
shapes are the model's own, and its logits equal the HF model's in fp32, unsharded and split over
two tensor-parallel ranks (gloo). ``GPTModel.forward`` itself needs CUDA for one step (RoPE
frequencies); see ``megatron_workers.composed_logits`` and test_megatron_gpu.py for the full
forward on a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch.multiprocessing as mp
from megatron_workers import MODELS, cpu_worker, free_port, layout_worker

# fp32, two tiny layers: the two implementations differ only in the order of float operations.
FP32_ATOL = 1e-5

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("megatron_cpu") / "results.json"
    mp.spawn(cpu_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return json.loads(Path(out).read_text())


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_equal_hf_in_fp32(results: dict[str, Any], name: str) -> None:
    found = results["tp1"][name]
    assert found["max_abs_diff"] < FP32_ATOL
    # Weights read back out of the live model convert back to the HF tensors, bit for bit.
    assert found["round_trip_equal"]


def test_a_wrong_qkv_layout_is_caught(results: dict[str, Any]) -> None:
    # The same comparison with q, k, v merely concatenated: the check above can fail.
    assert results["tp1"]["naive_qkv_max_abs_diff"] > 1e-2


def test_loader_names_a_missing_tensor(results: dict[str, Any]) -> None:
    message = results["tp1"]["missing_error"]
    assert "ckpt" in message and "decoder.layers.1.mlp.linear_fc2.weight" in message


@pytest.mark.parametrize("name", ["llama-gqa", "llama-tied"])
def test_tensor_parallel_2_logits_equal_hf(results: dict[str, Any], name: str) -> None:
    found = results["tp2"][name]
    assert found["logits_shape"] == [2, 24, 512]  # vocab 400 padded for TP 2, gathered
    assert found["max_abs_diff"] < FP32_ATOL
    assert found["round_trip_equal"]


@pytest.fixture(scope="module")
def layout_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("megatron_layout") / "results.json"
    mp.spawn(layout_worker, args=(4, free_port(), str(out)), nprocs=4, join=True)
    return json.loads(Path(out).read_text())


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-bias", "qwen3-qknorm"])
def test_tensor_2_pipeline_2_weights_load_and_gather_back(
    layout_results: dict[str, Any], name: str
) -> None:
    ranks = layout_results[name]
    # megatron's rank order: tensor-parallel ranks adjacent, pipeline stages outermost.
    assert [r["stage_layers"] for r in ranks] == [[0], [0], [1], [1]]
    assert all(r["pieces_rebuild"] for r in ranks)
    # From a weights file each rank reads its own stage's tensors once, and gets the same part.
    assert all(r["lazy_equal"] for r in ranks)
    assert all(sorted(r["lazy_read"]) == sorted(r["stage_hf_names"]) for r in ranks)
    assert ranks[0]["stage_hf_names"] != ranks[2]["stage_hf_names"]
    assert ranks[0]["gathered_keys_equal"] and ranks[0]["gathered_equal"]
    assert all(r["gathered_is_none"] for r in ranks[1:])


def test_vocabulary_parallel_loss_masks_the_padding(layout_results: dict[str, Any]) -> None:
    ranks = layout_results["loss"]
    # 400 real tokens in 512 columns: tensor-parallel rank 1 (ranks 1 and 3) holds the 112 padded.
    assert [r["padded_columns"] for r in ranks] == [0, 112, 0, 112]
    assert all(r["max_abs_diff"] < 1e-5 for r in ranks)
    assert all(r["padding_grad_zero"] and r["real_grad_nonzero"] for r in ranks)
