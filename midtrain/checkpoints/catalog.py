"""The catalog: which checkpoints a run (or a root of runs) holds, what each is (step, tokens, LR
and phase, loss), whether it is complete and intact, and which retention keeps."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from midtrain import console
from midtrain.checkpoints.layout import (
    CHECKPOINTS_DIR,
    MANIFEST,
    OPTIMIZER_INDEX,
    TRAINER_STATE,
    checkpoints_dir_of,
    is_staging_dir,
    is_step_dir,
    parse_step,
    read_latest,
    resolve_checkpoint,
)
from midtrain.checkpoints.manifest import check_files, read_manifest
from midtrain.checkpoints.retention import mark_keep as mark_keep  # the catalog's commands
from midtrain.checkpoints.retention import prune as prune
from midtrain.checkpoints.tensorfile import read_json
from midtrain.errors import CheckpointError, MidtrainError


@dataclass
class CheckpointInfo:
    """One row of the catalog. ``complete``: a valid manifest whose files are all present at their
    size (and, when verified, their sha256). Staging directories are never complete."""

    path: Path
    run_dir: Path | None
    step: int | None
    tokens: int | None = None
    lr: float | None = None
    phase: str | None = None
    loss: float | None = None
    parent: str | None = None
    created: str | None = None
    keep: bool = False
    size: int = 0
    complete: bool = False
    verified: bool | None = None
    latest: bool = False
    staging: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.staging or (self.problems and not (self.path / MANIFEST).exists()):
            return "incomplete"
        if self.problems:
            return "damaged"
        return "verified" if self.verified else "complete"

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "run_dir": None if self.run_dir is None else str(self.run_dir),
            "step": self.step,
            "tokens": self.tokens,
            "lr": self.lr,
            "phase": self.phase,
            "loss": self.loss,
            "parent": self.parent,
            "created": self.created,
            "keep": self.keep,
            "size": self.size,
            "complete": self.complete,
            "verified": self.verified,
            "latest": self.latest,
            "status": self.status,
            "problems": self.problems,
        }


def inspect_checkpoint(
    path: Path, *, run_dir: Path | None = None, verify: bool = False, latest: bool = False
) -> CheckpointInfo:
    """Catalog entry of one directory; sizes are always checked, sha256 with ``verify``."""
    info = CheckpointInfo(path=path, run_dir=run_dir, step=parse_step(path.name), latest=latest)
    if is_staging_dir(path):
        info.staging = True
        info.size = _du(path)
        info.problems = [f"{path}: a save in progress or one that crashed (no {MANIFEST})"]
        return info
    try:
        manifest = read_manifest(path)
    except MidtrainError as exc:
        info.size = _du(path)
        info.problems = [str(exc)]
        return info
    info.step = manifest.step
    info.tokens = manifest.tokens
    info.lr = manifest.lr
    info.phase = manifest.phase
    info.loss = manifest.loss
    info.parent = manifest.parent
    info.created = manifest.created
    info.keep = manifest.keep
    info.size = manifest.total_size + (path / MANIFEST).stat().st_size
    info.problems = check_files(path, manifest, hash_files=verify)
    info.complete = not info.problems
    info.verified = info.complete if verify else None
    return info


def list_checkpoints(path: str | os.PathLike[str], *, verify: bool = False) -> list[CheckpointInfo]:
    """Checkpoints under a checkpoint dir, a run dir, its ``checkpoints/`` dir, or a root holding
    run dirs (and stand-alone checkpoints). Each run's checkpoints by step; runs ordered by their
    newest checkpoint, so the newest checkpoint comes last."""
    root = Path(path).expanduser().absolute()  # `ckpt list .` has a name
    if not root.is_dir():
        raise CheckpointError(f"{root}: no such directory")
    if (root / MANIFEST).exists() or is_step_dir(root) or is_staging_dir(root):
        return [inspect_checkpoint(root, verify=verify)]
    ckpts = checkpoints_dir_of(root)
    if ckpts is not None:
        return _list_run(ckpts, verify)
    groups: list[list[CheckpointInfo]] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if (sub / CHECKPOINTS_DIR).is_dir():
            groups.append(_list_run(sub / CHECKPOINTS_DIR, verify))
        elif (sub / MANIFEST).exists():
            groups.append([inspect_checkpoint(sub, verify=verify)])
    groups = [g for g in groups if g]
    groups.sort(key=lambda g: max((i.created or "") for i in g))
    return [info for group in groups for info in group]


def _list_run(ckpts: Path, verify: bool) -> list[CheckpointInfo]:
    try:
        latest = read_latest(ckpts)
    except CheckpointError:
        latest = None  # a damaged pointer: every entry is still listed, none marked latest
    # A run's checkpoints/ directory, or a directory of bare step directories: its own run.
    run_dir = ckpts.parent if ckpts.name == CHECKPOINTS_DIR else ckpts
    infos = [
        inspect_checkpoint(p, run_dir=run_dir, verify=verify, latest=p == latest)
        for p in ckpts.iterdir()
        if is_step_dir(p) or (is_staging_dir(p) and parse_step(p.name) is not None)
    ]
    infos.sort(key=lambda i: (i.step if i.step is not None else -1, i.staging))
    return infos


def to_json(infos: list[CheckpointInfo]) -> list[dict[str, Any]]:
    return [i.to_json() for i in infos]


def print_table(infos: list[CheckpointInfo], title: str = "checkpoints") -> None:
    """The catalog as a table on stderr (stdout stays free for --json); ``*`` marks ``latest``."""
    rows = []
    for i in infos:
        name = i.path.name if i.run_dir is None else f"{i.run_dir.name}/{i.path.name}"
        rows.append(
            (
                name + (" *" if i.latest else ""),
                i.step,
                i.tokens,
                i.lr,
                i.phase,
                i.loss,
                human_size(i.size),
                i.status,
                "keep" if i.keep else "",
            )
        )
    columns = ("checkpoint", "step", "tokens", "lr", "phase", "loss", "size", "status", "kept")
    table = console.table(title, columns, rows)
    table.caption = "* latest" if any(i.latest for i in infos) else None
    _print(table)
    for i in infos:
        if i.problems and not i.staging:
            for problem in i.problems:
                _say(f"  {problem}")


def verify_checkpoint(path: str | os.PathLike[str]) -> list[str]:
    """Re-hash every file of a checkpoint (or of the one a run's ``latest`` names). Returns the
    problems, one per bad file, each naming the file; empty when intact."""
    p = Path(path).expanduser()
    try:
        ckpt_dir = p if is_step_dir(p) else resolve_checkpoint(p)
        manifest = read_manifest(ckpt_dir)
    except MidtrainError as exc:
        return [str(exc)]
    return check_files(ckpt_dir, manifest, hash_files=True)


def describe_checkpoint(path: str | os.PathLike[str], *, verify: bool = False) -> dict[str, Any]:
    """Everything ``ckpt show`` prints, as JSON data."""
    ckpt_dir = resolve_checkpoint(path)
    info = inspect_checkpoint(ckpt_dir, verify=verify)
    manifest = read_manifest(ckpt_dir)
    out = info.to_json()
    out["format_version"] = manifest.format_version
    out["world_size"] = manifest.world_size
    out["extra"] = manifest.extra
    out["files"] = {name: e.model_dump() for name, e in manifest.files.items()}
    if OPTIMIZER_INDEX in manifest.files and info.complete:
        index = read_json(ckpt_dir / OPTIMIZER_INDEX)
        weight_map = index.get("weight_map", {}) if isinstance(index, dict) else {}
        out["optimizer"] = {"keys": len(weight_map), "shards": len(set(weight_map.values()))}
    if TRAINER_STATE in manifest.files and info.complete:
        state = read_json(ckpt_dir / TRAINER_STATE)
        if isinstance(state, dict):
            out["trainer_state"] = {
                k: v for k, v in state.items() if isinstance(v, (int, float, str, bool))
            }
    return out


def show_checkpoint(
    path: str | os.PathLike[str], *, as_json: bool = False, verify: bool = False
) -> dict[str, Any]:
    """Print one checkpoint's manifest, files and trainer-state summary (JSON on stdout with
    ``as_json``); returns the same data."""
    d = describe_checkpoint(path, verify=verify)
    if as_json:
        console.stdout.print(console.json_text(d), markup=False, highlight=False)
        return d
    fields = ["path", "step", "tokens", "lr", "phase", "loss", "parent", "created", "keep",
              "status", "format_version", "world_size"]  # fmt: skip
    rows = [(k, d[k]) for k in fields]
    rows.append(("size", human_size(d["size"])))
    if "optimizer" in d:
        rows.append(
            ("optimizer", f"{d['optimizer']['keys']} tensors in {d['optimizer']['shards']} shards")
        )
    rows += [(f"trainer_state.{k}", v) for k, v in d.get("trainer_state", {}).items()]
    _print(console.table(Path(d["path"]).name, ("field", "value"), rows))
    files = [(n, human_size(f["size"]), f["sha256"][:16]) for n, f in d["files"].items()]
    _print(console.table("files", ("file", "size", "sha256"), files))
    for problem in d["problems"]:
        _say(f"  {problem}")
    return d


def _say(text: str) -> None:
    # Paths may hold [brackets] (rich markup) and long lines must stay whole for grep.
    console.console.print(text, markup=False, highlight=False, soft_wrap=True)


def _print(table: Table) -> None:
    c = console.console
    natural = Measurement.get(c, c.options.update_width(1000), table).maximum
    if not c.is_terminal and natural > c.width:
        # A pipe or a log would get rich's default 80 columns and truncated cells: go wider.
        c = Console(stderr=True, width=natural, highlight=False)
    c.print(table)


def human_size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _du(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += (Path(dirpath) / f).stat().st_size
    return total
