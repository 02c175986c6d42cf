"""Held-out loss, perplexity and bits per byte of one checkpoint on an evaluation set.

The maths is the training loss's (mean next-token cross-entropy; inputs ``w[:-1]``, targets
``w[1:]``), kept here rather than imported from ``midtrain.training`` so that evaluating pulls in
neither DeepSpeed nor Ray. Sums are taken in float64 over all predicted tokens, so a source's loss
is the mean over its tokens, not over its windows.

The output layer and the cross-entropy run on `LOSS_CHUNK` positions at a time, so the full
[batch, seq, vocab] logits never exist at once (at seq 4096, vocab 128k and batch 8 they and their
fp32 copy would take ~40 GB).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from midtrain.checkpoints import Checkpoint, load_checkpoint, load_model
from midtrain.data_mixing.tokenizer import tokenizer_fingerprint
from midtrain.errors import CheckpointError, ConfigError, DataError
from midtrain.evaluation.heldout import EvalSet, SourceSpec, split_tokenizer

DEFAULT_BATCH_SIZE = 8
LOSS_CHUNK = 1024  # positions per output-layer call: 1024 x 128k vocab in fp32 is 512 MiB


def exp_or_inf(x: float) -> float:
    """``exp(x)``, infinite past float range: a diverged model's loss (over ~710 nats) must not
    stop the report that shows it."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


@dataclass
class SourceScore:
    name: str
    kind: str | None
    tokens: int
    bytes: int
    nats: float  # summed over the predicted tokens

    @property
    def loss(self) -> float:
        """Nats per token."""
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        return exp_or_inf(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nats / (math.log(2) * self.bytes) if self.bytes else math.nan

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "tokens": self.tokens,
            "bytes": self.bytes,
        }


@dataclass
class CheckpointScores:
    """One checkpoint's scores, by source name."""

    path: Path
    step: int
    tokens: int
    scores: dict[str, SourceScore]

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "step": self.step,
            "tokens": self.tokens,
            "sources": {name: s.to_json() for name, s in self.scores.items()},
        }


def pick_device(device: str | None = None) -> torch.device:
    """``None`` or ``"auto"``: the GPU when there is one, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA GPU is available here")
    return dev


def eval_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU, bf16 on a GPU that supports it. Losses differ between the two by about as much
    as a small forgetting value, so the report records which was used."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def check_positions(ckpt: Checkpoint, seq_length: int) -> None:
    """The model must have a position for every input of a window (``seq_length`` of them): past
    ``max_position_embeddings`` a model still returns numbers, but meaningless ones."""
    limit = ckpt.config.get("max_position_embeddings")
    if isinstance(limit, int) and seq_length > limit:
        raise ConfigError(
            f"{ckpt.path / 'config.json'}: max_position_embeddings is {limit}, less than the "
            f"evaluation's seq_length {seq_length}; give --seq-length {limit} or less"
        )


def check_tokenizer(ckpt: Checkpoint, specs: list[SourceSpec]) -> None:
    """Every held-out split must come from the checkpoint's own tokenizer."""
    try:
        model_fp = tokenizer_fingerprint(ckpt.path)
    except DataError:
        raise CheckpointError(
            f"{ckpt.path}: holds no tokenizer files, so the held-out data cannot be checked "
            "against the model's tokenizer"
        ) from None
    for spec in specs:
        for prefix in spec.prefixes:
            data_tok = split_tokenizer(prefix)
            if data_tok["fingerprint"] != model_fp:
                raise DataError(
                    f"{prefix}: tokenized with another tokenizer ({data_tok.get('path', '?')}, "
                    f"fingerprint {data_tok['fingerprint'][:12]}) than the model's "
                    f"({ckpt.path}, fingerprint {model_fp[:12]}); prepare the data with the "
                    "model's tokenizer"
                )


def check_vocab(ckpt: Checkpoint, eval_set: EvalSet) -> None:
    vocab = ckpt.config.get("vocab_size")
    if not isinstance(vocab, int):
        raise CheckpointError(f"{ckpt.path / 'config.json'}: no integer vocab_size")
    for source in eval_set.sources:
        if source.max_id >= vocab:
            raise DataError(
                f"{', '.join(source.spec.prefixes)}: token id {source.max_id} is outside the "
                f"vocabulary of the model {ckpt.path} ({vocab} tokens)"
            )


def check_checkpoint(ckpt: Checkpoint, eval_set: EvalSet) -> None:
    """Everything about a verified checkpoint that can be refused before it is scored."""
    check_positions(ckpt, eval_set.seq_length)
    check_tokenizer(ckpt, [s.spec for s in eval_set.sources])
    check_vocab(ckpt, eval_set)


@torch.no_grad()
def window_nats(
    model: torch.nn.Module, windows: torch.Tensor, chunk: int = LOSS_CHUNK
) -> torch.Tensor:
    """Summed next-token cross-entropy (nats) of each window in ``windows`` [B, L+1] -> [B].

    The decoder (``base_model``, final norm included) runs once; the output layer and the
    cross-entropy then run on ``chunk`` positions at a time. This is the layout of the Llama-family
    models midtrain supports: the logits are ``lm_head(hidden)``, nothing after it."""
    inputs, targets = windows[:, :-1], windows[:, 1:].reshape(-1)
    hidden = model.base_model(input_ids=inputs, use_cache=False).last_hidden_state
    hidden = hidden.reshape(-1, hidden.size(-1))
    head = model.get_output_embeddings()
    nats = torch.empty(targets.shape, dtype=torch.float32, device=windows.device)
    for start in range(0, targets.numel(), chunk):
        part = slice(start, start + chunk)
        nats[part] = F.cross_entropy(head(hidden[part]).float(), targets[part], reduction="none")
    return nats.view(windows.size(0), -1).double().sum(dim=1)


def source_nats(
    model: torch.nn.Module,
    windows: list[np.ndarray],
    batch_size: int,
    device: torch.device,
    advance: Callable[[int], None] | None = None,
) -> float:
    """Total nats over a source's windows, in batches of windows of equal length."""
    total = 0.0
    by_length: dict[int, list[np.ndarray]] = {}
    for w in windows:
        by_length.setdefault(w.size, []).append(w)
    for group in by_length.values():
        for i in range(0, len(group), batch_size):
            batch = torch.from_numpy(np.stack(group[i : i + batch_size])).to(device)
            total += float(window_nats(model, batch).sum())
            if advance is not None:
                advance(batch.size(0))
    return total


def score_model(
    model: torch.nn.Module,
    eval_set: EvalSet,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | None = None,
    advance: Callable[[int], None] | None = None,
) -> dict[str, SourceScore]:
    """Scores of a live model on every source of the evaluation set."""
    device = device or next(model.parameters()).device
    model.eval()
    scores = {}
    for source in eval_set.sources:
        nats = source_nats(model, source.windows, batch_size, device, advance)
        scores[source.name] = SourceScore(
            source.name, source.kind, source.target_tokens, source.target_bytes, nats
        )
    return scores


def load_eval_model(ckpt: Checkpoint, device: torch.device) -> torch.nn.Module:
    """The checkpoint's model on ``device``, in `eval_dtype`."""
    model = load_model(ckpt, dtype=eval_dtype(device))
    return model.to(device).eval()


def score_checkpoint(
    ckpt: str | Path | Checkpoint,
    eval_set: EvalSet,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None,
    advance: Callable[[int], None] | None = None,
) -> CheckpointScores:
    """Verify a checkpoint (manifest, positions, tokenizer, vocabulary), then score it on
    ``eval_set``."""
    if not isinstance(ckpt, Checkpoint):
        ckpt = load_checkpoint(ckpt)
    check_checkpoint(ckpt, eval_set)
    dev = device if isinstance(device, torch.device) else pick_device(device)
    return score_checked(ckpt, eval_set, batch_size=batch_size, device=dev, advance=advance)


def score_checked(
    ckpt: Checkpoint,
    eval_set: EvalSet,
    *,
    batch_size: int,
    device: torch.device,
    advance: Callable[[int], None] | None = None,
) -> CheckpointScores:
    """Score a checkpoint that `check_checkpoint` has accepted (see `score_checkpoint`)."""
    model = load_eval_model(ckpt, device)
    scores = score_model(model, eval_set, batch_size=batch_size, device=device, advance=advance)
    return CheckpointScores(ckpt.path, ckpt.step, ckpt.tokens, scores)
