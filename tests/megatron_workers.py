"""Worker processes for the megatron-core model tests.

megatron-core keeps its parallel groups in module globals (``parallel_state``), so each test runs
its model code in fresh processes (``torch.multiprocessing.spawn``) that leave the pytest process
untouched; rank 0 writes its findings as JSON for the test to assert on.
"""

from __future__ import annotations

import json
import os
import socket
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import transformers

SMALL = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 176,
    "vocab_size": 400,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}

MODELS: dict[str, tuple[type, type, dict[str, Any]]] = {
    "llama-gqa": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "llama-tied": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        {"tie_word_embeddings": True},
    ),
    "qwen2-bias": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3-qknorm": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 24}),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hf_model(name: str) -> transformers.PreTrainedModel:
    """A tiny HF model whose norms and biases are random too, so a swapped one shows."""
    config_cls, model_cls, extra = MODELS[name]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**SMALL, **extra})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


def hf_weights(model: transformers.PreTrainedModel) -> dict[str, torch.Tensor]:
    tied = model.config.tie_word_embeddings
    return {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}


def composed_logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """``GPTModel.forward`` composed from the model's own modules, for CPUs.

    ``GPTModel.forward`` moves the RoPE frequencies to CUDA (``RotaryEmbedding.get_emb``), the one
    step that cannot run without a GPU; here the same ``RotaryEmbedding`` computes them and the
    embedding, decoder stack (attention, MLP, norms) and output layer run as in the model.
    Returns this tensor-parallel rank's vocabulary slice of the logits, ``[b, s, V / tp]``.
    """
    seq = input_ids.shape[1]
    positions = torch.arange(seq).expand_as(input_ids)
    hidden = model.embedding(input_ids=input_ids, position_ids=positions)
    freqs = model.rotary_pos_emb.get_freqs_non_repeated(seq)
    rotary = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
    hidden = model.decoder(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rotary)
    shared = model.share_embeddings_and_output_weights
    weight = model.shared_embedding_or_output_weight() if shared else None
    logits, _ = model.output_layer(hidden, weight=weight)
    return logits.transpose(0, 1)


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def gather_state(model: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    """Every tensor-parallel rank's weights (a collective over the TP group)."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    mine = {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if isinstance(v, torch.Tensor) and not k.endswith("._extra_state")
    }
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, mine, group=group)
    return out


def naive_qkv(mc: dict[str, torch.Tensor], hf: dict[str, torch.Tensor], layers: int) -> None:
    """Overwrite the fused QKV with plain [q; k; v] concatenation: the layout a converter that
    ignored megatron's per-group interleaving would produce (a negative control)."""
    for i in range(layers):
        a = f"model.layers.{i}.self_attn."
        mc[f"decoder.layers.{i}.self_attention.linear_qkv.weight"] = torch.cat(
            [hf[a + "q_proj.weight"], hf[a + "k_proj.weight"], hf[a + "v_proj.weight"]]
        )


def _start(rank: int, world: int, port: int, backend: str) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world)


def _tp_section(
    tp: int, results: dict[str, Any], body: Callable[[dict[str, Any]], None], seed: int = 0
) -> None:
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)  # megatron's own attention forks this RNG state
    try:
        section: dict[str, Any] = {}
        body(section)
        results[f"tp{tp}"] = section
    finally:
        parallel_state.destroy_model_parallel()


def cpu_worker(rank: int, world: int, port: int, out: str) -> None:
    """Logits of converted models in megatron-core's GPTModel vs HF, on CPU, at TP 1 and 2."""
    _start(rank, world, port, "gloo")
    from midtrain.checkpoints.megatron_convert import (
        GPTShape,
        hf_to_mcore,
        mcore_to_hf,
        padded_vocab_size,
        shard_tensor_parallel,
        unshard_tensor_parallel,
    )
    from midtrain.errors import CheckpointError
    from midtrain.training.megatron_model import build_gpt_model, load_mcore_weights

    ids = torch.randint(0, SMALL["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    results: dict[str, Any] = {}

    def tp1(section: dict[str, Any]) -> None:
        for name in MODELS:
            hf = hf_model(name)
            shape = GPTShape.from_hf_config(hf.config)
            model = build_gpt_model(hf.config).eval()
            weights = hf_weights(hf)
            load_mcore_weights(model, hf_to_mcore(weights, shape), name)
            with torch.no_grad():
                diff = (composed_logits(model, ids) - hf(ids).logits).abs().max().item()
            back = mcore_to_hf(gather_state(model)[0], shape)
            section[name] = {
                "max_abs_diff": diff,
                "round_trip_equal": back.keys() == weights.keys()
                and all(torch.equal(back[k], weights[k]) for k in weights),
            }
        # Negative control: the same check catches a QKV layout that is not megatron's.
        hf = hf_model("llama-gqa")
        shape = GPTShape.from_hf_config(hf.config)
        mc = hf_to_mcore(hf_weights(hf), shape)
        naive_qkv(mc, hf_weights(hf), shape.num_layers)
        model = build_gpt_model(hf.config).eval()
        load_mcore_weights(model, mc, "naive")
        with torch.no_grad():
            naive = (composed_logits(model, ids) - hf(ids).logits).abs().max().item()
        section["naive_qkv_max_abs_diff"] = naive
        # The loader names what does not fit the real model.
        del mc["decoder.layers.1.mlp.linear_fc2.weight"]
        try:
            load_mcore_weights(model, mc, "ckpt")
        except CheckpointError as exc:
            section["missing_error"] = str(exc)

    def tp2(section: dict[str, Any]) -> None:
        from megatron.core import parallel_state

        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        for name in ("llama-gqa", "llama-tied"):
            hf = hf_model(name)
            shape = GPTShape.from_hf_config(hf.config)
            vocab = padded_vocab_size(shape.vocab_size, 2)  # 512: the padded rows must be harmless
            model = build_gpt_model(hf.config, tensor_parallel=2, padded_vocab_size=vocab).eval()
            weights = hf_weights(hf)
            full = hf_to_mcore(weights, shape, padded_vocab_size=vocab)
            load_mcore_weights(model, shard_tensor_parallel(full, shape, 2)[tp_rank], name)
            with torch.no_grad():
                logits = gather_vocab(composed_logits(model, ids))
                diff = (logits[..., : shape.vocab_size] - hf(ids).logits).abs().max().item()
            back = mcore_to_hf(
                unshard_tensor_parallel(gather_state(model)), shape, padded_vocab_size=vocab
            )
            section[name] = {
                "max_abs_diff": diff,
                "logits_shape": list(logits.shape),
                "round_trip_equal": all(torch.equal(back[k], weights[k]) for k in weights),
            }

    _tp_section(1, results, tp1)
    _tp_section(2, results, tp2)
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


class _Reads(Mapping[str, torch.Tensor]):
    """A state dict that records which tensors were looked up, in order."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors, self.read = tensors, list[str]()

    def __getitem__(self, name: str) -> torch.Tensor:
        self.read.append(name)
        return self.tensors[name]

    def __contains__(self, name: object) -> bool:  # Mapping's own would look the tensor up
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def layout_worker(rank: int, world: int, port: int, out: str) -> None:
    """The megatron backend's weight paths at tensor 2 x pipeline 2 (4 gloo processes), against
    megatron-core's real ``GPTModel`` stages: each rank's converted part loads into its stage (the
    names and shapes are the model's own), each parameter rebuilds from the HF tensors it is made
    of (the optimizer-state load path), and the stages gather back to the HF weights on rank 0."""
    _start(rank, world, port, "gloo")
    from megatron.core import parallel_state
    from safetensors.torch import save_file

    from midtrain.checkpoints.host_buffers import HostBuffers
    from midtrain.checkpoints.megatron_convert import hf_names
    from midtrain.checkpoints.tensorfile import LazyTensors
    from midtrain.training.megatron_model import build_gpt_model, load_mcore_weights
    from midtrain.training.megatron_shard import RankConversion, gather_model_state

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=2, pipeline_model_parallel_size=2
    )
    results: dict[str, Any] = {}
    # Untied models only: megatron's GPTModel copies a tied embedding to the last stage with
    # .cuda(), so tied pipeline stages need a GPU.
    for name in ("llama-gqa", "qwen2-bias", "qwen3-qknorm"):
        hf = hf_model(name)
        weights = hf_weights(hf)
        conv = RankConversion.from_parallel_state(hf.config, "local")
        model = build_gpt_model(
            hf.config, tensor_parallel=2, pipeline_parallel=2, padded_vocab_size=conv.padded_vocab
        )
        mine = conv.rank_weights(weights, name)
        load_mcore_weights(model, mine, name)
        # The same part from a weights file, read lazily: only this stage's tensors, each once.
        path = Path(f"{out}.{name}.{rank}.safetensors")
        save_file(weights, str(path))
        lazy = _Reads(LazyTensors.over([path]))
        from_file = conv.rank_weights(lazy, name)
        path.unlink()
        params = list(model.named_parameters())
        rebuilt = all(
            torch.equal(conv.rank_piece(n, {p: weights[p] for p in conv.hf_sources(n)}), param)
            for n, param in params
        )
        buffers = HostBuffers()
        gathered = gather_model_state(conv, params, 0, torch.device("cpu"), buffers.copy)
        buffers.finish()
        found = {
            "stage_layers": list(conv.stage.layers),
            "pieces_rebuild": rebuilt,
            "lazy_equal": from_file.keys() == mine.keys()
            and all(torch.equal(from_file[k], mine[k]) for k in mine),
            "lazy_read": lazy.read,
            "stage_hf_names": hf_names(conv.shape, conv.stage),
        }
        if rank == 0:
            assert gathered is not None
            found["gathered_keys_equal"] = gathered.keys() == weights.keys()
            found["gathered_equal"] = all(
                torch.equal(gathered[k], weights[k]) for k in weights if k in gathered
            )
        else:
            found["gathered_is_none"] = gathered is None
        per_rank: list[Any] = [None] * world
        dist.all_gather_object(per_rank, found)
        results[name] = per_rank
    # The training loss over vocabulary-parallel logits with a padded vocabulary (400 real of
    # 512 columns, 256 per rank): equal to plain cross-entropy over the real columns, and no
    # gradient reaches the padding.
    from midtrain.training.megatron_shard import token_losses

    conv = RankConversion.from_parallel_state(hf_model("llama-gqa").config, "local")
    g = torch.Generator().manual_seed(5)
    full = torch.randn(2, 6, conv.padded_vocab, generator=g)
    labels = torch.randint(0, conv.shape.vocab_size, (2, 6), generator=g)
    columns = conv.padded_vocab // 2
    mine = full[..., conv.tp_rank * columns : (conv.tp_rank + 1) * columns].clone().requires_grad_()
    losses = token_losses(mine, labels, conv.vocab_padding(torch.device("cpu")))
    expected = torch.nn.functional.cross_entropy(
        full[..., : conv.shape.vocab_size].reshape(-1, conv.shape.vocab_size),
        labels.reshape(-1),
        reduction="none",
    ).view(2, 6)
    losses.sum().backward()
    assert mine.grad is not None
    padded = conv.vocab_padding(torch.device("cpu"))
    loss_found = {
        "max_abs_diff": (losses - expected).abs().max().item(),
        "padded_columns": 0 if padded is None else int(padded.sum()),
        "padding_grad_zero": padded is None or bool((mine.grad[..., padded] == 0).all()),
        "real_grad_nonzero": bool((mine.grad[..., :16] != 0).any()),
    }
    results["loss"] = [None] * world
    dist.all_gather_object(results["loss"], loss_found)
    parallel_state.destroy_model_parallel()
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def gpu_worker(rank: int, world: int, port: int, out: str) -> None:
    """megatron-core's complete ``GPTModel.forward`` on a GPU vs HF: fp32 and bf16, for the local
    spec with SDPA, the local spec with megatron's own attention, and TE's spec where installed."""
    _start(rank, world, port, "nccl")
    from midtrain.checkpoints.megatron_convert import GPTShape, hf_to_mcore
    from midtrain.training.megatron_model import (
        build_gpt_model,
        have_transformer_engine,
        load_mcore_weights,
    )

    # fp32 means fp32: no TF32 tensor-core matmuls on either side.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda", rank)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
    variants = [("local", True), ("local", False)] + (
        [("te", True)] if have_transformer_engine() else []
    )
    results: dict[str, Any] = {}

    def body(section: dict[str, Any]) -> None:
        for name in MODELS:
            hf = hf_model(name).to(device)
            shape = GPTShape.from_hf_config(hf.config)
            for dtype in (torch.float32, torch.bfloat16):  # fp32 first: .to() casts in place
                hf = hf.to(dtype)
                with torch.no_grad():
                    ref = hf(ids).logits.float()
                for spec, sdpa in variants:
                    model = build_gpt_model(hf.config, dtype=dtype, spec=spec, sdpa=sdpa).eval()
                    weights = hf_to_mcore(hf_weights(hf), shape, spec)
                    load_mcore_weights(model, weights, name)
                    with torch.no_grad():
                        logits = model(ids, positions, attention_mask=None).float()
                    key = f"{name}/{spec}{'-sdpa' if sdpa else ''}/{str(dtype)[6:]}"
                    section[key] = {
                        "max_abs_diff": (logits - ref).abs().max().item(),
                        "max_abs_logit": ref.abs().max().item(),
                        "top1_agreement": (logits.argmax(-1) == ref.argmax(-1))
                        .float()
                        .mean()
                        .item(),
                    }

    _tp_section(1, results, body)
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def train_worker(rank: int, world: int, port: int, spec_path: str) -> None:
    """midtrain's training loop (``train.backend`` from the spec) on ``world`` GPUs (NCCL)."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world)
    )
    _start(rank, world, port, "nccl")
    from midtrain.config import load_run_spec
    from midtrain.training.loop import train

    train(load_run_spec(spec_path))
    dist.destroy_process_group()
