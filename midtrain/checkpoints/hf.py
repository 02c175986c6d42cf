"""Hugging Face interop: import a local HF model directory as a start checkpoint, export a
checkpoint as a plain HF directory. No remote code, no pickle beyond ``weights_only`` loading."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from midtrain import console
from midtrain.checkpoints.layout import (
    CONFIG,
    FORMAT_VERSION,
    GENERATION_CONFIG,
    MANIFEST,
    MODEL_FILE,
    MODEL_INDEX,
    OPTIMIZER_DIR,
    RANK_STATE_DIR,
    RUN_SPEC,
    STAGING_PREFIX,
    TIED_WEIGHTS,
    TOKENIZER_FILES,
    TRAINER_STATE,
    resolve_checkpoint,
)
from midtrain.checkpoints.load import Checkpoint, load_checkpoint
from midtrain.checkpoints.manifest import Manifest, now_iso, read_manifest
from midtrain.checkpoints.staging import StagingDir, commit
from midtrain.checkpoints.tensorfile import (
    LazyTensors,
    ProgressFn,
    read_json,
    read_safetensors,
)
from midtrain.errors import CheckpointError
from midtrain.fileio import atomic_write_json

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""Llama-family decoders (RMSNorm, SwiGLU, RoPE, grouped-query attention) the trainer builds."""

BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers older checkpoints stored; recomputed

# Files of a checkpoint that only midtrain needs: left out of an export.
_MIDTRAIN_ONLY = (TRAINER_STATE, RUN_SPEC, f"{OPTIMIZER_DIR}/", f"{RANK_STATE_DIR}/")


def import_hf(
    hf_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    step: int = 0,
    tokens: int = 0,
    progress: ProgressFn | None = None,
) -> Path:
    """Make a start checkpoint at ``out`` from a local Hugging Face causal-LM directory
    (safetensors, single or sharded, or ``pytorch_model.bin`` read with ``weights_only=True``).
    Tensors keep their names and dtypes; names and shapes are checked against the architecture.
    The result is marked ``keep``, phase ``imported``, parent ``hf_dir``."""
    src = Path(hf_dir).expanduser().absolute()
    if not src.is_dir():
        raise CheckpointError(f"{src}: no such directory")
    dst = _new_output_dir(out)
    config = _read_hf_config(src / CONFIG)
    expected, tied = _expected_tensors(src / CONFIG, config)
    config["tie_word_embeddings"] = tied  # explicit, so loaders agree without class defaults

    paths, load = _weight_files(src)
    seen: set[str] = set()

    def loader(path: Path) -> Callable[[], Any]:
        return lambda: _checked(path, load(path), expected, tied, seen)

    staging = StagingDir.fresh(dst.parent / f"{STAGING_PREFIX}{dst.name}", progress)
    try:
        staging.add_model([loader(path) for path in paths])
        missing = sorted(set(expected) - seen)
        if missing:
            raise CheckpointError(
                f"{src}: the weights lack {len(missing)} tensors the {config['model_type']} "
                f"architecture needs, e.g. {missing[:3]}"
            )
        staging.add_bytes(CONFIG, (json.dumps(config, indent=2) + "\n").encode("utf-8"))
        staging.add_json(TRAINER_STATE, {"step": step, "tokens": tokens, "imported_from": str(src)})
        for name in (*TOKENIZER_FILES, GENERATION_CONFIG):
            if (src / name).is_file():
                staging.copy_in(name, src / name)
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            step=step,
            tokens=tokens,
            phase="imported",
            parent=str(src),
            created=now_iso(),
            keep=True,
            files=dict(sorted(staging.records.items())),
        )
        commit(staging.path, dst, manifest, replace=False)
    except BaseException:
        staging.discard()
        raise
    return dst


def _new_output_dir(out: str | os.PathLike[str]) -> Path:
    """``out`` as an absolute path that does not exist yet and is not inside a checkpoint (a file
    added there would make that checkpoint fail its verification)."""
    dst = Path(out).expanduser().absolute()
    if dst.exists():
        raise CheckpointError(f"{dst}: already exists; choose a new directory")
    for parent in dst.parents:
        if (parent / MANIFEST).is_file():
            raise CheckpointError(
                f"{dst}: inside the checkpoint {parent}; choose a directory outside it"
            )
    return dst


def export_hf(
    ckpt: str | os.PathLike[str], out: str | os.PathLike[str], *, progress: ProgressFn | None = None
) -> Path:
    """Write a plain Hugging Face directory (config, safetensors weights, tokenizer, generation
    config) from a checkpoint, for serving and evaluation tools. Each file is checked against the
    manifest's sha256 as it is copied; a mismatch aborts and leaves nothing at ``out``."""
    ckpt_dir = resolve_checkpoint(ckpt)
    manifest = read_manifest(ckpt_dir)
    dst = _new_output_dir(out)
    names = [n for n in manifest.files if not n.startswith(_MIDTRAIN_ONLY)]
    if not any(n.startswith("tokenizer") for n in names):
        console.info(
            f"warning: {ckpt_dir} holds no tokenizer, so neither does {dst}; copy the tokenizer "
            "files the model was trained with into it before serving or evaluating it"
        )
    staging = StagingDir.fresh(dst.parent / f"{STAGING_PREFIX}{dst.name}", progress)
    try:
        for name in names:
            staging.copy_in(name, ckpt_dir / name)
            expected, got = manifest.files[name], staging.records[name]
            if got != expected:
                raise CheckpointError(
                    f"{ckpt_dir / name}: altered (sha256 or size differs from the manifest); "
                    "not exported"
                )
        _name_architecture(staging.path / CONFIG)
        commit(staging.path, dst, None, replace=False)
    except BaseException:
        staging.discard()
        raise
    return dst


def load_model(ckpt: str | os.PathLike[str] | Checkpoint, **kwargs: Any) -> Any:
    """The checkpoint's model as ``AutoModelForCausalLM.from_pretrained`` builds it, after the
    manifest check; safetensors only, never remote code. ``kwargs`` go to ``from_pretrained``."""
    from transformers import AutoModelForCausalLM

    if kwargs.get("trust_remote_code"):
        raise ValueError("midtrain never runs a model's remote code")
    checked = ckpt if isinstance(ckpt, Checkpoint) else load_checkpoint(ckpt)
    kwargs.update(trust_remote_code=False, local_files_only=True, use_safetensors=True)
    return AutoModelForCausalLM.from_pretrained(str(checked.path), **kwargs)


# --- import helpers -------------------------------------------------------------------------------


def _read_hf_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; not a Hugging Face model directory")
    config = read_json(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{path}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if config.pop("auto_map", None) is not None:
        # Custom code is neither run nor copied; the built-in class of model_type is used.
        console.info(f"{path}: ignoring auto_map (custom model code is never used)")
    return config


def _expected_tensors(
    path: Path, config: dict[str, Any]
) -> tuple[dict[str, tuple[int, ...]], bool]:
    """Tensor names and shapes the architecture needs (built on the meta device: no memory), and
    whether the output embedding is tied to the input one."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception as exc:  # transformers' validators raise huggingface_hub's own classes too
        raise CheckpointError(
            f"{path}: not a valid {config['model_type']} config ({exc})"
        ) from None
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if tied:
        for name in TIED_WEIGHTS:
            shapes.pop(name, None)
    return shapes, tied


def hf_dir_weights(src: Path) -> Mapping[str, torch.Tensor]:
    """The weights of a local HF model directory by name, for training from it directly:
    safetensors read lazily (each tensor when looked up, see ``LazyTensors``),
    ``pytorch_model.bin`` whole (``weights_only``). Buffers older checkpoints stored are left
    out, and so is a stored ``lm_head.weight`` of a tied model (the embedding is the weight, as
    in ``from_pretrained`` and ``import_hf``); names and shapes are for the model that loads them
    to check."""
    _, tied = _expected_tensors(src / CONFIG, _read_hf_config(src / CONFIG))

    def kept(name: str) -> bool:
        return not name.endswith(_IGNORED_SUFFIXES) and not (tied and name in TIED_WEIGHTS)

    paths, load = _weight_files(src)
    if load is read_safetensors:
        files = LazyTensors.over(paths).files
        return LazyTensors({k: p for k, p in files.items() if kept(k)})
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        for name, tensor in load(path).items():
            if name in state:
                raise CheckpointError(f"{path}: tensor {name!r} is also in another weight file")
            if kept(name):
                state[name] = tensor
    return state


def _weight_files(src: Path) -> tuple[list[Path], Callable[[Path], dict[str, torch.Tensor]]]:
    """The weight files of an HF directory and the function that reads one: safetensors (one
    file or an index) first, then ``pytorch_model.bin``, as HF looks for them."""
    for index_name, single, load in (
        (MODEL_INDEX, MODEL_FILE, read_safetensors),
        (BIN_INDEX, BIN_FILE, _load_bin),
    ):
        if (src / index_name).is_file():
            files = _index_files(src / index_name)
        elif (src / single).is_file():
            files = [single]
        else:
            continue
        return [src / f for f in files], load
    raise CheckpointError(
        f"{src}: no model weights ({MODEL_FILE}, {MODEL_INDEX}, {BIN_FILE} or {BIN_INDEX})"
    )


def _index_files(index_path: Path) -> list[str]:
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: no weight_map object")
    files = sorted(set(weight_map.values()))
    for f in files:
        if not isinstance(f, str) or PurePosixPath(f).name != f:
            raise CheckpointError(f"{index_path}: {f!r} is not a file name in this directory")
        if not (index_path.parent / f).is_file():
            raise CheckpointError(f"{index_path.parent / f}: missing (named in {index_path.name})")
    return files


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A ``pytorch_model.bin``: tensors only. ``weights_only=True`` refuses any pickle that would
    build other objects or call functions, so a crafted file cannot run code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, zip errors: all mean "refused"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: refused: not a plain tensor file (loaded with weights_only=True: {reason})"
        ) from None
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise CheckpointError(f"{path}: expected a mapping of tensor names to tensors")
    return dict(state)


def _checked(
    path: Path,
    tensors: dict[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    tied: bool,
    seen: set[str],
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(_IGNORED_SUFFIXES) or (tied and name in TIED_WEIGHTS):
            continue
        if name not in expected:
            raise CheckpointError(f"{path}: unexpected tensor {name!r} for this architecture")
        if tuple(t.shape) != expected[name]:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {tuple(t.shape)}, "
                f"the config implies {expected[name]}"
            )
        if name in seen:
            raise CheckpointError(f"{path}: tensor {name!r} appears in more than one weight file")
        seen.add(name)
        out[name] = t
    return out


def _name_architecture(config_path: Path) -> None:
    """Evaluation and serving tools pick the model class from ``architectures``; a config built
    with ``from_config`` has none, so name the causal-LM class of its ``model_type``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = read_json(config_path)
    if config.get("architectures"):
        return
    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type", ""))
    if arch is None:
        return
    config["architectures"] = [arch]
    atomic_write_json(config_path, config)
