"""``manifest.json``: what a checkpoint is (step, tokens, LR and phase, loss, parent) and the sha256
and size of every other file in it. A checkpoint is exactly what its manifest lists."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from midtrain.checkpoints.layout import FORMAT_VERSION, MANIFEST, is_step_dir, parse_step
from midtrain.config_io import format_validation_error
from midtrain.errors import CheckpointError, checkpoint_write_error
from midtrain.fileio import atomic_write_json, sha256_file

# Schedule phases the trainer reports; free text is allowed for schedules added later.
PHASES = ("warmup", "stable", "decay", "rewarm", "imported", "unknown")


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int
    step: int = Field(ge=0)
    tokens: int = Field(ge=0)
    lr: float | None = None
    phase: str
    loss: float | None = None
    parent: str | None = None
    created: str
    keep: bool = False
    world_size: int = Field(default=1, gt=0, description="data-parallel ranks that wrote it")
    files: dict[str, FileEntry]
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("files")
    @classmethod
    def _relative_names(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        # A crafted manifest must not make us hash or read files outside the checkpoint.
        for name in files:
            p = PurePosixPath(name)
            if (
                p.is_absolute()
                or ".." in p.parts
                or name in ("", MANIFEST)
                or "\\" in name
                or any(ord(c) < 32 or ord(c) == 127 for c in name)
            ):
                raise ValueError(f"file name {name!r} is not a plain relative path")
        return files

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files.values())


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def read_manifest(ckpt_dir: Path) -> Manifest:
    """Parse and validate ``ckpt_dir/manifest.json``; every error names the file."""
    path = ckpt_dir / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    version = data.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise CheckpointError(
            f"{path}: unknown format_version {version!r} (this midtrain reads {FORMAT_VERSION})"
        )
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        raise CheckpointError(format_validation_error(exc, str(path))) from None
    named = parse_step(ckpt_dir.name) if is_step_dir(ckpt_dir) else None
    if named is not None and named != manifest.step:
        raise CheckpointError(
            f"{path}: says step {manifest.step}, but the directory is {ckpt_dir.name} "
            "(an edited manifest or a renamed directory)"
        )
    return manifest


def write_manifest(ckpt_dir: Path, manifest: Manifest) -> None:
    path = ckpt_dir / MANIFEST
    try:
        atomic_write_json(path, manifest.model_dump(mode="json"))
    except OSError as exc:
        raise checkpoint_write_error(path, exc) from None


def check_files(ckpt_dir: Path, manifest: Manifest, *, hash_files: bool = True) -> list[str]:
    """Problems with the files of a checkpoint, one line each naming the file: missing, truncated,
    altered (size or sha256), or present but not listed. Sizes only when ``hash_files`` is False."""
    problems: list[str] = []
    to_hash: list[tuple[str, Path]] = []
    for name, entry in manifest.files.items():
        path = ckpt_dir / name
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            problems.append(f"{path}: missing")
            continue
        except OSError as exc:
            problems.append(f"{path}: cannot read ({exc.strerror or exc})")
            continue
        if not path.is_file():
            problems.append(f"{path}: not a regular file")
        elif st.st_size < entry.size:
            problems.append(f"{path}: truncated ({st.st_size} of {entry.size} bytes)")
        elif st.st_size != entry.size:
            problems.append(f"{path}: altered ({st.st_size} bytes, manifest says {entry.size})")
        elif hash_files:
            to_hash.append((name, path))
    # hashlib releases the GIL: hash a few files at once, largest first.
    to_hash.sort(key=lambda item: -manifest.files[item[0]].size)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        digests = pool.map(lambda item: _try_sha256(item[1]), to_hash)
        for (name, path), digest in zip(to_hash, digests, strict=True):
            if digest != manifest.files[name].sha256:
                problems.append(f"{path}: altered (sha256 differs from the manifest)")
    for path in unlisted_files(ckpt_dir, manifest):
        problems.append(f"{path}: not listed in {MANIFEST}")
    return problems


def unlisted_files(ckpt_dir: Path, manifest: Manifest) -> list[Path]:
    """Files not in the manifest, and symlinked directories (not walked into, so whatever they
    hold would go unseen)."""
    listed = set(manifest.files) | {MANIFEST}
    out = []
    for root, dirs, names in os.walk(ckpt_dir):
        for n in names + [d for d in dirs if (Path(root) / d).is_symlink()]:
            path = Path(root) / n
            if path.relative_to(ckpt_dir).as_posix() not in listed:
                out.append(path)
    return sorted(out)


def _try_sha256(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError as exc:
        return f"unreadable: {exc}"
