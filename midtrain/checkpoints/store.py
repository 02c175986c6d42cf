"""Saving a run's checkpoints: every rank writes its part into one staging directory,
the committer (rank 0) waits for all ranks, writes the manifest, renames the directory into place,
moves ``latest`` and applies retention. Saves can run in the background, one at a time.

Protocol, for step S and W ranks sharing a filesystem:
  1. rank 0 empties ``checkpoints/.staging-step_S`` (a crashed attempt may have left one); barrier;
  2. every rank r writes its files (rank 0: weights, config, tokenizer, trainer state, run spec;
     every rank: ``optimizer/optimizer-r-of-W.safetensors`` for the parameters it owns), then
     ``.done-rank{r}`` holding the sha256 and size of what it wrote (or ``.failed-rank{r}``);
  3. rank 0 waits for all W markers, indexes the optimizer shards, writes ``manifest.json``,
     fsyncs, renames the directory to ``step_S``, moves ``latest``, deletes what retention drops.
A crash anywhere before the rename leaves only a staging directory, which nothing reads.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from midtrain import console
from midtrain.checkpoints import state as state_json
from midtrain.checkpoints.host_buffers import HostBuffers
from midtrain.checkpoints.layout import (
    CHECKPOINTS_DIR,
    CONFIG,
    FORMAT_VERSION,
    GENERATION_CONFIG,
    LATEST,
    MANIFEST,
    OPTIMIZER_DIR,
    OPTIMIZER_INDEX,
    RUN_SPEC,
    SAVER_LOCK,
    TIED_WEIGHTS,
    TOKENIZER_FILES,
    TRAINER_STATE,
    checkpoints_dir_of,
    optimizer_shard_name,
    rank_state_name,
    read_latest,
    staging_dir,
    step_dir_name,
    write_latest,
)
from midtrain.checkpoints.manifest import FileEntry, Manifest, check_files, now_iso
from midtrain.checkpoints.retention import apply_retention, remove_leftovers
from midtrain.checkpoints.staging import StagingDir, commit
from midtrain.checkpoints.tensorfile import ProgressFn, read_json, split_shards
from midtrain.errors import CheckpointError, checkpoint_write_error
from midtrain.fileio import ExclusiveLock, LockHeldError

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


@dataclass(frozen=True)
class CheckpointMeta:
    """What the manifest says about a checkpoint, beyond its files."""

    step: int
    tokens: int = 0
    lr: float | None = None
    phase: str = "unknown"
    loss: float | None = None
    parent: str | None = None
    keep: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint a run's ``latest`` names, or None when the run has saved none yet.
    ``run_dir`` may also be its ``checkpoints/`` directory."""
    path = Path(run_dir).expanduser()
    ckpts = checkpoints_dir_of(path) if path.is_dir() else None
    target = None if ckpts is None else read_latest(ckpts)
    if ckpts is None or target is None:
        return None
    if not (target / MANIFEST).is_file():
        raise CheckpointError(
            f"{ckpts / LATEST}: names {target.name}, which is missing or incomplete"
        )
    return target


def take_saver_lock(run_dir: str | Path, timeout_s: float = 60.0) -> ExclusiveLock:
    """The lock of the one process that commits a run's checkpoints (see ``CheckpointSaver``),
    waiting up to ``timeout_s`` for a previous holder to finish and go."""
    ckpts = Path(run_dir).expanduser().absolute() / CHECKPOINTS_DIR
    ckpts.mkdir(parents=True, exist_ok=True)
    try:
        return ExclusiveLock(ckpts / SAVER_LOCK, timeout_s=timeout_s)
    except LockHeldError as exc:
        raise CheckpointError(
            f"{exc.strerror}: another process is saving this run's checkpoints (the same "
            "run started twice?); stop it, or give this run another run_dir"
        ) from None


def optimizer_key(param: str, state: str) -> str:
    """The key of one parameter's optimizer tensor: ``model.layers.0.mlp.up_proj.weight/exp_avg``."""
    return f"{param}/{state}"


def split_optimizer_key(key: str) -> tuple[str, str]:
    param, _, state = key.rpartition("/")
    return param, state


@dataclass
class _Job:
    meta: CheckpointMeta
    staging: Path
    final: Path
    model_state: Mapping[str, torch.Tensor] | None
    config: bytes | None
    trainer_state: bytes | None
    run_spec: str | None
    optimizer_state: Mapping[str, torch.Tensor] | None
    rank_state: bytes | None
    extra: dict[str, Any] | None = None  # the manifest's, as JSON data (rank 0's)
    progress: ProgressFn | None = None
    started: float = field(default_factory=time.perf_counter)


class CheckpointSaver:
    """Saves the checkpoints of one run from one rank.

    ``rank``/``world_size``: this process's data-parallel rank and the number of ranks; with
    ``world_size > 1`` pass ``barrier`` (e.g. ``torch.distributed.barrier``), called once per save
    on the calling thread. Rank 0 writes the model and commits. ``keep_last=None`` keeps everything.

    Rank 0 holds ``checkpoints/.saver.lock`` from construction to ``close()``: a second saver of
    the same run (the run started twice) would delete the first one's staging directory and
    commit checkpoints with files missing. It waits up to ``lock_timeout_s`` for the holder to
    go (a restarted worker whose predecessor is still exiting), then refuses. A trainer takes it
    earlier with ``take_saver_lock`` and passes it as ``lock``: before it reads ``latest``.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        keep_last: int | None = 3,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], object] | None = None,
        tokenizer_dir: str | Path | None = None,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        commit_timeout_s: float = 3600.0,
        lock_timeout_s: float = 60.0,
        lock: ExclusiveLock | None = None,
        log: Callable[[str], None] | None = console.info,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if world_size > 1 and barrier is None:
            raise ValueError("a multi-rank save needs a barrier (e.g. torch.distributed.barrier)")
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        self.checkpoints_dir = Path(run_dir).expanduser().absolute() / CHECKPOINTS_DIR
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.world_size = world_size
        self.keep_last = keep_last
        self.max_shard_bytes = max_shard_bytes
        self.commit_timeout_s = commit_timeout_s
        self._barrier = barrier
        self._log = log
        self._tokenizer_files = _tokenizer_files(Path(tokenizer_dir)) if tokenizer_dir else {}
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._last: Path | None = None
        self._snapshots = HostBuffers()
        if self.is_committer:
            self._lock = lock or take_saver_lock(run_dir, lock_timeout_s)
        elif lock is not None:
            raise ValueError("only rank 0 holds the saver lock")
        else:
            self._lock = None

    @property
    def is_committer(self) -> bool:
        return self.rank == 0

    def save(
        self,
        meta: CheckpointMeta,
        *,
        model_state: Mapping[str, torch.Tensor] | None = None,
        config: Any = None,
        trainer_state: Mapping[str, Any] | None = None,
        run_spec: str | None = None,
        optimizer_state: Mapping[str, torch.Tensor] | None = None,
        rank_state: Mapping[str, Any] | None = None,
        blocking: bool = True,
        snapshot: bool = True,
        progress: ProgressFn | None = None,
    ) -> Path:
        """Save step ``meta.step``; returns the checkpoint's final path.

        Rank 0 passes ``model_state`` (full HF-named tensors) and ``config`` (an HF config or its
        dict); other ranks' model and trainer state are ignored. Every rank may pass
        ``optimizer_state`` (full fp32 tensors keyed ``"<param>/<state>"`` for the parameters it
        owns; all ranks or none) and ``rank_state`` (JSON data of its own, e.g. its RNG state).
        ``blocking=False`` copies the tensors to CPU memory, returns, and writes in the background;
        a previous background save is waited for first and its error, if any, is raised here.
        ``snapshot=False`` skips that copy: for a caller that hands over tensors it will not
        change until the save has finished (the trainer's copies in ``host_buffers()``), so that
        they are copied once, not twice.
        """
        self.wait()
        job = self._job(
            meta, model_state, config, trainer_state, run_spec, optimizer_state, rank_state
        )
        job.progress = progress
        if self.is_committer:
            StagingDir.fresh(job.staging)
        if self._barrier is not None:
            self._barrier()  # every rank now sees the fresh staging directory
        if blocking:
            self._run(job)
        else:
            if snapshot:
                job.model_state = self._snapshot("model", job.model_state)
                job.optimizer_state = self._snapshot("optimizer", job.optimizer_state)
                self._snapshots.finish()
            self._thread = threading.Thread(
                target=self._run_in_background, args=(job,), name="midtrain-checkpoint-save"
            )
            self._thread.start()
        return job.final

    def wait(self) -> Path | None:
        """Wait for the save in flight; raise its error if it failed. Returns the last path saved."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self._last

    def host_buffers(self) -> HostBuffers:
        """The saver's reusable host memory, for a caller that copies its tensors out itself
        and then saves with ``snapshot=False`` (the trainer gathers sharded state one tensor at a
        time). Waits for the save in flight first: it is still reading them."""
        self.wait()
        return self._snapshots

    def _snapshot(
        self, group: str, tensors: Mapping[str, torch.Tensor] | None
    ) -> dict[str, torch.Tensor] | None:
        if tensors is None:
            return None
        return {name: self._snapshots.copy(f"{group}:{name}", t) for name, t in tensors.items()}

    def close(self) -> None:
        """Wait for the save in flight (raising its error) and free the snapshot buffers."""
        try:
            self.wait()
        finally:
            self._snapshots.clear()
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> CheckpointSaver:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            if self._thread is not None:
                self._thread.join()  # finish writing, but let the original exception propagate
            if self._lock is not None:
                self._lock.release()

    # --- building a job (foreground: cheap, and errors in the arguments surface at once) ---------

    def _job(
        self,
        meta: CheckpointMeta,
        model_state: Mapping[str, torch.Tensor] | None,
        config: Any,
        trainer_state: Mapping[str, Any] | None,
        run_spec: str | None,
        optimizer_state: Mapping[str, torch.Tensor] | None,
        rank_state: Mapping[str, Any] | None,
    ) -> _Job:
        if meta.step < 0:
            raise ValueError(f"step must be >= 0, got {meta.step}")
        config_bytes = trainer_bytes = extra = None
        if self.is_committer:
            if model_state is None or config is None:
                raise ValueError("rank 0 must pass model_state and config")
            # Checked now, not after every rank has written its part; and a copy the caller may
            # change while the save goes on in the background.
            extra = state_json.to_json_data(dict(meta.extra), "extra")
            cfg = _config_dict(config)
            config_bytes = state_json.dumps(cfg, "config")
            trainer_bytes = state_json.dumps(dict(trainer_state or {}))
            model_state = _without_tied(model_state, cfg)
        else:
            model_state = None
        if optimizer_state is not None:
            bad = [k for k in optimizer_state if "/" not in k]
            if bad:
                raise ValueError(f"optimizer keys must be '<param>/<state>', got {bad[:3]}")
        return _Job(
            meta=meta,
            staging=staging_dir(self.checkpoints_dir, meta.step),
            final=self.checkpoints_dir / step_dir_name(meta.step),
            model_state=model_state,
            config=config_bytes,
            trainer_state=trainer_bytes,
            run_spec=run_spec if self.is_committer else None,
            optimizer_state=optimizer_state,
            rank_state=None if rank_state is None else state_json.dumps(rank_state, "rank_state"),
            extra=extra,
        )

    # --- writing ----------------------------------------------------------------------------------

    def _run_in_background(self, job: _Job) -> None:
        try:
            self._run(job)
        except BaseException as exc:  # surfaced by the next save()/wait(), and reported now
            self._error = exc
            console.error(f"checkpoint save of step {job.meta.step} failed: {exc}")

    def _run(self, job: _Job) -> None:
        staging = StagingDir(job.staging, job.progress)
        try:
            self._write_own_part(staging, job)
            if self.is_committer:
                self._commit(job, dict(staging.records))
            else:  # tells the committer what this rank wrote
                _write_marker(job.staging, f".done-rank{self.rank}", _records_json(staging.records))
        except BaseException as exc:
            with contextlib.suppress(CheckpointError):  # best effort: else the commit times out
                _write_marker(job.staging, f".failed-rank{self.rank}", str(exc) or repr(exc))
            if self.world_size == 1:
                staging.discard()  # nobody else writes here: leave no half checkpoint behind
            raise

    def _write_own_part(self, staging: StagingDir, job: _Job) -> None:
        if self.is_committer:
            assert job.model_state is not None and job.config is not None
            shards = split_shards(job.model_state, self.max_shard_bytes)
            staging.add_model([lambda s=s: s for s in shards])
            staging.add_bytes(CONFIG, job.config)
            assert job.trainer_state is not None
            staging.add_bytes(TRAINER_STATE, job.trainer_state)
            if job.run_spec is not None:
                staging.add_bytes(RUN_SPEC, job.run_spec.encode("utf-8"))
            for name, data in self._tokenizer_files.items():
                staging.add_bytes(name, data)
        if job.optimizer_state is not None:
            name = f"{OPTIMIZER_DIR}/{optimizer_shard_name(self.rank, self.world_size)}"
            metadata = {"format": "pt", "rank": str(self.rank), "world_size": str(self.world_size)}
            staging.add_tensors(name, job.optimizer_state, metadata)
        if job.rank_state is not None:
            staging.add_bytes(rank_state_name(self.rank), job.rank_state)

    def _commit(self, job: _Job, records: dict[str, FileEntry]) -> None:
        records.update(self._wait_for_ranks(job.staging))
        shards = sorted(n for n in records if n.startswith(f"{OPTIMIZER_DIR}/"))
        if shards and len(shards) != self.world_size:
            raise CheckpointError(
                f"{job.staging}: {len(shards)} of {self.world_size} ranks wrote optimizer state; "
                "all or none must"
            )
        if shards:
            index = _optimizer_index(job.staging, shards, self.world_size)
            staging = StagingDir(job.staging)
            staging.add_json(OPTIMIZER_INDEX, index)
            records.update(staging.records)
        meta = job.meta
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            step=meta.step,
            tokens=meta.tokens,
            lr=meta.lr,
            phase=meta.phase,
            loss=meta.loss,
            parent=meta.parent,
            created=now_iso(),
            keep=meta.keep,
            world_size=self.world_size,
            files=dict(sorted(records.items())),
            extra=job.extra or {},
        )
        for marker in job.staging.glob(".done-rank*"):
            marker.unlink()
        # Every rank said what it wrote; check that it is all still there before committing.
        problems = check_files(job.staging, manifest, hash_files=False)
        if problems:
            raise CheckpointError(
                f"{job.staging}: not committed, its files changed while they were written: "
                + "; ".join(problems[:5])
            )
        commit(job.staging, job.final, manifest, replace=True)
        write_latest(self.checkpoints_dir, job.final.name)  # moves last: the commit point of a run
        self._last = job.final
        seconds = time.perf_counter() - job.started
        size = manifest.total_size
        if self._log is not None:
            self._log(
                f"saved {job.final} ({size / 1e9:.3f} GB in {seconds:.2f} s, "
                f"{size / 1e9 / max(seconds, 1e-9):.2f} GB/s)"
            )
        remove_leftovers(self.checkpoints_dir, before_step=meta.step)
        if self.keep_last is not None:
            try:
                apply_retention(self.checkpoints_dir, self.keep_last)
            except OSError as exc:  # the save itself succeeded; say so loudly, do not fail the run
                console.error(f"retention in {self.checkpoints_dir} failed: {exc}")

    def _wait_for_ranks(self, staging: Path) -> dict[str, FileEntry]:
        """What the other ranks wrote, once each has said (its ``.done`` marker)."""
        deadline = time.monotonic() + self.commit_timeout_s
        pending = set(range(self.world_size)) - {self.rank}
        records: dict[str, FileEntry] = {}
        while True:
            for r in sorted(pending):
                failed = staging / f".failed-rank{r}"
                if failed.exists():
                    reason = failed.read_text(encoding="utf-8", errors="replace").strip()
                    raise CheckpointError(f"{staging}: rank {r} failed to write its part: {reason}")
                done = staging / f".done-rank{r}"
                if done.exists():
                    for name, entry in read_json(done).items():
                        records[name] = FileEntry.model_validate(entry)
                    pending.discard(r)
            if not pending:
                return records
            if time.monotonic() > deadline:
                raise CheckpointError(
                    f"{staging}: ranks {sorted(pending)} did not finish writing within "
                    f"{self.commit_timeout_s:.0f} s"
                )
            time.sleep(0.02)


def _records_json(records: Mapping[str, FileEntry]) -> str:
    return json.dumps({k: v.model_dump() for k, v in records.items()})


def _write_marker(staging: Path, name: str, text: str) -> None:
    """A marker appears whole or not at all (the committer polls for it)."""
    if not staging.is_dir():
        return
    tmp = staging / f"{name}.tmp"
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(staging / name)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise checkpoint_write_error(staging / name, exc) from None


def _optimizer_index(staging: Path, shards: list[str], world_size: int) -> dict[str, Any]:
    from safetensors import safe_open

    weight_map: dict[str, str] = {}
    for rel in shards:
        with safe_open(str(staging / rel), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                if key in weight_map:
                    raise CheckpointError(
                        f"{staging / rel}: optimizer key {key!r} was also written to "
                        f"{weight_map[key]}; each parameter must have one owner"
                    )
                weight_map[key] = rel.split("/", 1)[1]
    return {"world_size": world_size, "weight_map": dict(sorted(weight_map.items()))}


def _config_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        cfg = dict(config)
    elif hasattr(config, "to_json_string"):  # a transformers PretrainedConfig
        cfg = json.loads(config.to_json_string(use_diff=False))
    else:
        raise TypeError(f"config must be a dict or a transformers config, got {type(config)}")
    if "model_type" not in cfg:
        raise ValueError("config has no model_type; AutoModelForCausalLM could not load it")
    return cfg


def _without_tied(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> Mapping[str, torch.Tensor]:
    if not config.get("tie_word_embeddings"):
        return state
    return {k: v for k, v in state.items() if not (k in TIED_WEIGHTS and TIED_WEIGHTS[k] in state)}


def _tokenizer_files(tokenizer_dir: Path) -> dict[str, bytes]:
    """The tokenizer's files, read once: the directory may be a checkpoint that retention deletes
    later in the run (a resumed run's tokenizer_dir is often its start checkpoint)."""
    names = (*TOKENIZER_FILES, GENERATION_CONFIG)
    files = {n: (tokenizer_dir / n).read_bytes() for n in names if (tokenizer_dir / n).is_file()}
    if not files:
        raise CheckpointError(
            f"{tokenizer_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)"
        )
    return files
