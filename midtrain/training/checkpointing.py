"""Where a run starts from, and how the trainer saves through the checkpoint store.

Four ways to start, in this order of precedence:
  resume       the run's own latest checkpoint: weights, optimizer, sampler, step, RNG (exact)
  init_from    another run's checkpoint: weights (+ optimizer moments if asked), a fresh run
  from_checkpoint  a midtrain checkpoint or a Hugging Face directory: weights only
  config       a new model of the configured shape
A worker that finds a checkpoint in its own run_dir always resumes from it: that is how a worker
group restarted by Ray after a failure continues (the driver refuses a *new* run in a run_dir that
already holds checkpoints, so any checkpoint found there belongs to this run).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import transformers

from midtrain.checkpoints import (
    Checkpoint,
    CheckpointMeta,
    CheckpointSaver,
    load_checkpoint,
)
from midtrain.checkpoints.hf import hf_dir_weights
from midtrain.checkpoints.layout import is_midtrain_path
from midtrain.checkpoints.store import latest_checkpoint, take_saver_lock
from midtrain.config import RunSpec
from midtrain.data_mixing.stats import load_stats
from midtrain.data_mixing.tokenizer import load_tokenizer, tokenizer_fingerprint
from midtrain.errors import CheckpointError, ConfigError
from midtrain.fileio import ExclusiveLock
from midtrain.training.model import build_model, check_same_shape, llama_config, load_hf_config
from midtrain.training.parallel import check_model_fits

if TYPE_CHECKING:  # backend.py imports this module
    from midtrain.training.backend import Backend


@dataclass
class StartPoint:
    kind: str  # "resume" | "init_from" | "from_checkpoint" | "config"
    source: str
    hf_config: transformers.PretrainedConfig
    tokenizer_dir: str | None
    weights: Callable[[], Mapping[str, torch.Tensor]] | None = None  # by HF name, maybe lazy
    lr: float | None = None  # the LR the start checkpoint was at: where a re-warm starts
    parent: str | None = None
    optimizer: Checkpoint | None = None  # the checkpoint whose optimizer state to load
    optimizer_step: int = 0
    resume_state: dict[str, Any] | None = None
    seed: int = 0

    @property
    def config_file(self) -> str:
        """Where the model's shape comes from, for error messages."""
        return self.source if self.kind == "config" else f"{self.source}/config.json"

    def build_model(self, attn_implementation: str | None = None) -> transformers.PreTrainedModel:
        model = build_model(self.hf_config, self.seed, attn_implementation)
        if self.weights is not None:
            source, tied = self.weights(), _tied_names(model)
            # A tied name is the embedding again (a lazy mapping would read it a second time).
            weights = {name: source[name] for name in source if name not in tied}
            own = model.state_dict()
            for name, tensor in weights.items():
                if name in own and tensor.shape != own[name].shape:
                    raise CheckpointError(
                        f"{self.source}: {name} has shape {tuple(tensor.shape)}, the model's is "
                        f"{tuple(own[name].shape)}"
                    )
            missing, unexpected = model.load_state_dict(weights, strict=False)
            missing = [k for k in missing if k not in tied]
            if missing or unexpected:
                raise CheckpointError(
                    f"{self.source}: weights do not fit the model "
                    f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
                )
        return model


def _tied_names(model: transformers.PreTrainedModel) -> set[str]:
    return {"lm_head.weight"} if model.config.tie_word_embeddings else set()


def resolve_start(spec: RunSpec, verify: bool = True) -> StartPoint:
    """Decide where this run's weights and state come from: its own latest checkpoint, else the
    spec's start. A training run's ranks use ``agree_on_start`` instead."""
    return start_from(spec, latest_checkpoint(spec.run_dir), verify)


def agree_on_start(spec: RunSpec, rank: int) -> tuple[StartPoint, ExclusiveLock | None]:
    """The start point of a training run's ranks, the same on all (a collective), and on rank 0
    the run's saver lock, for its checkpointer.

    Rank 0 takes the lock before it reads ``latest``: a previous worker group that is still
    exiting commits its last save first, and that save is where this group resumes. It re-hashes
    every file of that checkpoint; the others load the checkpoint it picked, checking sizes only
    (each reading ``latest`` itself could pick another step, if a save lands in between).
    """
    lock: ExclusiveLock | None = None
    own: Path | None = None
    start: StartPoint | None = None
    if rank == 0:
        lock = take_saver_lock(spec.run_dir)
        own = latest_checkpoint(spec.run_dir)
        start = start_from(spec, own, verify=True)
    own = broadcast_path(own)
    if start is None:
        start = start_from(spec, own, verify=False)
    return start, lock


def broadcast_path(path: Path | None, src: int = 0) -> Path | None:
    """Rank ``src``'s ``path`` on every rank (a collective; a tensor of its bytes, no pickling)."""
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":  # NCCL moves GPU tensors only
        device = torch.device("cuda", torch.cuda.current_device())
    data = os.fsencode(path) if path is not None and dist.get_rank() == src else b""
    size = torch.tensor([len(data) if path is not None else -1], device=device)
    dist.broadcast(size, src)
    if size.item() < 0:
        return None
    if dist.get_rank() == src:
        buffer = torch.tensor(list(data), dtype=torch.uint8, device=device)
    else:
        buffer = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(buffer, src)
    return Path(os.fsdecode(bytes(buffer.tolist())))


def start_from(spec: RunSpec, own: Path | None, verify: bool) -> StartPoint:
    """The start point given the run's own checkpoint to resume from (None: the spec's start)."""
    seed = spec.train.seed
    if own is not None:
        ckpt = load_checkpoint(own, verify=verify)
        state = ckpt.trainer_state
        return StartPoint(
            kind="resume",
            source=str(ckpt.path),
            hf_config=load_hf_config(ckpt.path),
            tokenizer_dir=spec.model.tokenizer or str(ckpt.path),
            weights=ckpt.model_tensors,
            lr=state.get("rewarm_from_lr"),
            parent=ckpt.manifest.parent,
            optimizer=ckpt,
            optimizer_step=int(state["optimizer_step"]),
            resume_state=state,
            seed=seed,
        )
    if spec.resume:
        raise CheckpointError(f"{spec.run_dir}: no complete checkpoint to resume from")

    if spec.init_from is not None:
        ckpt = load_checkpoint(spec.init_from.checkpoint, verify=verify)
        config = load_hf_config(ckpt.path)
        _check_configured_shape(spec, config, str(ckpt.path))
        load_opt = spec.init_from.load_optimizer
        if load_opt and not ckpt.has_optimizer:
            raise CheckpointError(
                f"{ckpt.path}: init_from.load_optimizer is true but it holds no optimizer state"
            )
        return StartPoint(
            kind="init_from",
            source=str(ckpt.path),
            hf_config=config,
            tokenizer_dir=spec.model.tokenizer or str(ckpt.path),
            weights=ckpt.model_tensors,
            lr=ckpt.manifest.lr,
            parent=str(ckpt.path),
            optimizer=ckpt if load_opt else None,
            optimizer_step=int(ckpt.trainer_state.get("optimizer_step", ckpt.step))
            if load_opt
            else 0,
            seed=seed,
        )

    if spec.model.from_checkpoint is not None:
        path = Path(spec.model.from_checkpoint)
        weights: Callable[[], Mapping[str, torch.Tensor]] = partial(hf_dir_weights, path)
        if is_midtrain_path(path):
            # One of ours (a run dir follows `latest`): verified, and a staging or incomplete
            # checkpoint refused, not read as a plain Hugging Face directory.
            ckpt = load_checkpoint(path, verify=verify)
            path, weights = ckpt.path, ckpt.model_tensors
        return StartPoint(
            kind="from_checkpoint",
            source=str(path),
            hf_config=load_hf_config(path),
            tokenizer_dir=spec.model.tokenizer or str(path),
            weights=weights,
            parent=str(path),
            seed=seed,
        )

    assert spec.model.config is not None and spec.model.tokenizer is not None  # validated
    vocab = len(load_tokenizer(spec.model.tokenizer))
    config = llama_config(
        spec.model.config, vocab, spec.mixture.seq_length, spec.model.attn_implementation
    )
    return StartPoint("config", "model.config", config, spec.model.tokenizer, seed=seed)


def _check_configured_shape(
    spec: RunSpec, found: transformers.PretrainedConfig, where: str
) -> None:
    if spec.model.config is None:
        return
    vocab = found.vocab_size
    if spec.model.tokenizer is not None:
        vocab = len(load_tokenizer(spec.model.tokenizer))
    expected = llama_config(spec.model.config, vocab, spec.mixture.seq_length)
    check_same_shape(expected, found, where)


def check_start(spec: RunSpec, resuming: bool, verify: bool = True) -> StartPoint:
    """Driver-side checks before any worker starts: the start point loads and verifies (with
    ``verify=False``, every file is there at its size), its shape fits, and the model's
    tokenizer is the one the mixture's data was prepared with."""
    if not resuming and latest_checkpoint(spec.run_dir) is not None:
        raise ConfigError(f"{spec.run_dir} already holds checkpoints of a run")
    start = resolve_start(spec, verify=verify)
    if spec.train.backend == "megatron":  # here, not after every worker has set up its GPU
        par = spec.parallel
        check_model_fits(
            par.tensor, par.pipeline, start.hf_config, start.config_file, spec.mixture.seq_length
        )
    if start.tokenizer_dir is None or not Path(start.tokenizer_dir).is_dir():
        raise ConfigError(f"model.tokenizer: {start.tokenizer_dir}: no such directory")
    fingerprint = tokenizer_fingerprint(start.tokenizer_dir)
    for source in spec.mixture.sources:
        for prefix in source.path:
            tok = load_stats(prefix)["tokenizer"]
            if tok["fingerprint"] != fingerprint:
                raise ConfigError(
                    f"mixture.sources {source.name}: {prefix} was prepared with another tokenizer "
                    f"({tok['fingerprint'][:12]}) than the model's {start.tokenizer_dir} "
                    f"({fingerprint[:12]}); prepare it again with the model's tokenizer"
                )
            if tok["vocab_size"] > start.hf_config.vocab_size:
                raise ConfigError(
                    f"{prefix}: token ids up to {tok['vocab_size']} do not fit the model's "
                    f"vocabulary of {start.hf_config.vocab_size}"
                )
    return start


class RunCheckpointer:
    """The trainer's side of saving: who writes what, and the manifest's facts about the step."""

    def __init__(
        self,
        spec: RunSpec,
        rank: int,
        world: int,
        start: StartPoint,
        lock: ExclusiveLock | None = None,
    ) -> None:
        self.spec, self.rank, self.world = spec, rank, world
        self.parent = start.parent
        self.saver = CheckpointSaver(
            spec.run_dir,
            keep_last=spec.checkpoint.keep_last,
            rank=rank,
            world_size=world,
            barrier=dist.barrier if world > 1 else None,
            tokenizer_dir=start.tokenizer_dir,
            lock=lock,
            log=self._log if rank == 0 else None,
        )
        self.events = events_path(spec.run_dir)

    def save(
        self,
        *,
        step: int,
        backend: Backend,
        trainer_state: dict[str, Any],
        lr: float,
        phase: str,
        loss: float | None,
        blocking: bool,
    ) -> None:
        """Copy the model and this rank's share of the optimizer state into the saver's host
        buffers (a collective), then write them, in the background unless ``blocking``. Training
        may go on once this returns: nothing written later reads the training tensors."""
        buffers = self.saver.host_buffers()  # waits for the previous save: it reads them
        try:
            model_state = backend.full_model_state(buffers.copy)
            optimizer_state = backend.optimizer_state(buffers.copy)  # this rank's share
        finally:
            buffers.finish()
        keep_every = self.spec.checkpoint.keep_every
        meta = CheckpointMeta(
            step=step,
            tokens=trainer_state["tokens"],
            lr=lr,
            phase=phase,
            loss=loss,
            parent=self.parent,
            keep=bool(keep_every and step % keep_every == 0),
        )
        self.saver.save(
            meta,
            model_state=model_state,
            config=backend.hf_config if self.rank == 0 else None,
            trainer_state=trainer_state,
            run_spec=self.spec.to_yaml(),
            optimizer_state=optimizer_state,
            blocking=blocking,
            snapshot=False,  # already copied, into buffers nothing changes before the write ends
        )

    def close(self) -> None:
        self.saver.close()

    def _log(self, message: str) -> None:
        # Workers' output is not streamed to the terminal; the driver shows these lines.
        self.events.parent.mkdir(parents=True, exist_ok=True)
        with open(self.events, "a", encoding="utf-8") as f:
            f.write(message.rstrip() + "\n")


def events_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "control" / "events.log"
