"""Checkpoints: the on-disk format, atomic (optionally asynchronous, multi-rank) saves, verified
loads, the catalog and retention, and Hugging Face import/export. See docs/checkpoints.md.

This package imports nothing from the rest of midtrain except errors, fileio, console and
config_io; transformers is imported only by the functions in ``hf`` that need it.
"""

from midtrain.checkpoints.catalog import (
    CheckpointInfo,
    describe_checkpoint,
    list_checkpoints,
    print_table,
    show_checkpoint,
    to_json,
    verify_checkpoint,
)
from midtrain.checkpoints.hf import export_hf, import_hf, load_model
from midtrain.checkpoints.layout import FORMAT_VERSION, resolve_checkpoint
from midtrain.checkpoints.load import Checkpoint, load_checkpoint
from midtrain.checkpoints.manifest import PHASES, Manifest
from midtrain.checkpoints.retention import mark_keep, prune
from midtrain.checkpoints.state import capture_rng_state, restore_rng_state
from midtrain.checkpoints.store import (
    CheckpointMeta,
    CheckpointSaver,
    latest_checkpoint,
    optimizer_key,
    split_optimizer_key,
)

__all__ = [
    "FORMAT_VERSION",
    "PHASES",
    "Checkpoint",
    "CheckpointInfo",
    "CheckpointMeta",
    "CheckpointSaver",
    "Manifest",
    "capture_rng_state",
    "describe_checkpoint",
    "export_hf",
    "import_hf",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model",
    "mark_keep",
    "optimizer_key",
    "print_table",
    "prune",
    "resolve_checkpoint",
    "restore_rng_state",
    "show_checkpoint",
    "split_optimizer_key",
    "to_json",
    "verify_checkpoint",
]
