"""Downstream tasks through EleutherAI's lm-evaluation-harness, an optional extra:
``pip install 'midtrain[eval]'``.

Tasks are the harness's own local YAML + jsonl format (see examples/tasks/); midtrain exports the
checkpoint as a plain Hugging Face directory (`export_hf`, which checks every file's sha256) and
runs the harness's ``hf`` model on it. The harness runs from the tasks directory, so relative
``data_files`` in a task's YAML are found next to it. Also here: building a multiple-choice
"which continuation is the real one" task from held-out text.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import random
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from midtrain.checkpoints import export_hf, load_checkpoint
from midtrain.data_mixing.indexed import open_indexed
from midtrain.data_mixing.stats import holdout_prefix, load_stats
from midtrain.errors import ConfigError, MidtrainError
from midtrain.fileio import atomic_write_text

INSTALL_HINT = "pip install 'midtrain[eval]'  (or: pip install 'lm-eval[hf]>=0.4.5')"


class MissingExtraError(MidtrainError):
    """An optional dependency is not installed; the message says how to install it."""


def require_lm_eval() -> Any:
    """The ``lm_eval`` module, or a clear error saying how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise MissingExtraError(
            "downstream tasks need EleutherAI's lm-evaluation-harness, which is not installed: "
            + INSTALL_HINT
        ) from None
    return lm_eval


# torch.distributed's launch variables. The harness (through accelerate) joins a process group when
# it sees them, e.g. inside a Slurm job step or a shell where a training launcher exported them;
# a downstream evaluation is one process on one device, so they are hidden from it.
_DISTRIBUTED_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


@contextlib.contextmanager
def _harness_process(path: Path) -> Iterator[None]:
    """Run from ``path`` (task YAMLs name their data files relative to it), as a single process."""
    old_cwd = Path.cwd()
    hidden = {k: os.environ.pop(k) for k in _DISTRIBUTED_ENV if k in os.environ}
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old_cwd)
        os.environ.update(hidden)


def run_tasks(
    ckpt: str | Path,
    tasks_dir: str | Path,
    tasks: list[str],
    out_dir: str | Path,
    *,
    device: str | None = None,
    batch_size: int = 8,
    limit: int | None = None,
) -> dict[str, Any]:
    """Run the harness's ``tasks`` (defined by the YAML files in ``tasks_dir``) on a checkpoint;
    writes ``out_dir/downstream.json`` and returns the per-task results."""
    lm_eval = require_lm_eval()  # before any work: the error is the first thing a user sees
    from lm_eval.tasks import TaskManager

    tasks_dir = Path(tasks_dir).absolute()
    if not tasks_dir.is_dir():
        raise ConfigError(f"{tasks_dir}: no such tasks directory")
    task_manager = TaskManager(include_path=str(tasks_dir))
    check_task_names(tasks, task_manager, tasks_dir)  # before the export and the out dir
    checked = load_checkpoint(ckpt)
    # Absolute: the harness runs from the tasks directory.
    out = Path(out_dir).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    if device in (None, "auto"):
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(dir=out, prefix=".hf-export-") as tmp:
        hf_dir = export_hf(checked.path, Path(tmp) / "model")
        with _harness_process(tasks_dir):
            results = lm_eval.simple_evaluate(
                model="hf",
                # A dict, not "k=v,k=v": a path may hold a comma. local_files_only: the
                # exported directory, never a Hub repo of the same name.
                model_args={
                    "pretrained": str(hf_dir),
                    "dtype": "float32",
                    "local_files_only": True,
                },
                tasks=tasks,
                task_manager=task_manager,
                batch_size=batch_size,
                device=device,
                limit=limit,
            )
    per_task = results["results"] if results else {}
    report = {"checkpoint": str(checked.path), "step": checked.step, "results": per_task}
    atomic_write_text(out / "downstream.json", json.dumps(report, indent=2, default=str) + "\n")
    return per_task


def check_task_names(tasks: list[str], task_manager: Any, tasks_dir: Path) -> None:
    """Every ``--task`` must be one the harness knows (from ``tasks_dir`` or its own); the error
    lists the tasks ``tasks_dir`` defines and the nearest names."""
    known = set(task_manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if not unknown:
        return
    local = sorted(n for n, e in task_manager.task_index.items() if _defined_in(e, tasks_dir))
    near = sorted({m for t in unknown for m in difflib.get_close_matches(t, known, n=3)})
    raise ConfigError(
        f"--task {', '.join(unknown)}: no such task in {tasks_dir} or the harness's own; "
        f"{tasks_dir} defines: {', '.join(local[:10]) or 'none'}"
        + (f"; similar names: {', '.join(near)}" if near else "")
    )


def _defined_in(entry: Any, tasks_dir: Path) -> bool:
    """Whether a task index entry comes from a YAML file under ``tasks_dir`` (entries are dicts
    in older harness releases, objects in newer ones)."""
    path = entry.get("yaml_path") if isinstance(entry, dict) else getattr(entry, "yaml_path", None)
    return isinstance(path, (str, os.PathLike)) and Path(path).is_relative_to(tasks_dir)


# --- building a local task from held-out text ------------------------------------------------------


def heldout_texts(prefix: str | Path, tokenizer: Any) -> list[str]:
    """The held-out documents of a prepared prefix, decoded back to text (eod dropped)."""
    stats = load_stats(prefix)
    eod = int(stats["tokenizer"]["eod_id"])
    dataset = open_indexed(holdout_prefix(prefix))
    texts = []
    for i in range(len(dataset)):
        ids = np.asarray(dataset[i]).tolist()
        texts.append(tokenizer.decode([t for t in ids if t != eod]))
    return texts


def build_continuation_task(
    texts: Iterable[str],
    out_dir: str | Path,
    name: str,
    *,
    items: int = 100,
    num_choices: int = 4,
    context_words: int = 40,
    continuation_words: int = 12,
    seed: int = 0,
) -> Path:
    """A multiple-choice task: given the start of a document, pick its real continuation among
    ``num_choices`` (the others are continuations from other documents). Writes ``NAME.jsonl``
    and ``NAME.yaml`` (lm-eval's local format) to ``out_dir``; returns the YAML's path."""
    need = context_words + continuation_words
    docs = [words for t in texts if len(words := t.split()) >= need]
    spans = [" ".join(words[context_words:need]) for words in docs]
    unique = sorted(set(spans))
    if len(unique) < num_choices:
        raise ConfigError(
            f"task {name}: only {len(unique)} distinct documents have {need}+ words; need at "
            f"least {num_choices}"
        )
    rng = random.Random(seed)
    lines = []
    for i in rng.sample(range(len(docs)), min(items, len(docs))):
        # Distractors: the same span of other documents (same length, same register), distinct.
        picks = [s for s in rng.sample(unique, num_choices) if s != spans[i]]
        choices = picks[: num_choices - 1]
        label = rng.randrange(num_choices)
        choices.insert(label, spans[i])
        context = " ".join(docs[i][:context_words])
        lines.append(json.dumps({"context": context, "choices": choices, "label": label}))
    out = Path(out_dir)
    atomic_write_text(out / f"{name}.jsonl", "\n".join(lines) + "\n")
    yaml_path = out / f"{name}.yaml"
    atomic_write_text(yaml_path, _task_yaml(name))
    return yaml_path


def _task_yaml(name: str) -> str:
    return f"""\
# Which continuation is the real one? Built by midtrain.evaluation.downstream.build_continuation_task.
# Run: midtrain eval-tasks CKPT --tasks-dir DIR --task {name}   (needs: pip install 'midtrain[eval]')
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {name}.jsonl   # relative to this directory (midtrain runs the harness from here)
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
