"""Process-wide settings every midtrain entry point applies first: offline and quiet.

Nothing is ever downloaded at run time, and third-party libraries' banners and warnings are
silenced unless ``MIDTRAIN_VERBOSE=1``.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import re
import warnings
from pathlib import Path

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "1",
    "RAY_TRAIN_V2_ENABLED": "1",
    "DS_ACCELERATOR": "cpu",
}


def verbose() -> bool:
    return os.environ.get("MIDTRAIN_VERBOSE", "") not in ("", "0")


def setup_process(accelerator: str | None = None) -> None:
    """Make this process offline and quiet; call before importing heavy libraries."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    if accelerator is not None:
        os.environ["DS_ACCELERATOR"] = accelerator
    elif _cuda_available():
        os.environ["DS_ACCELERATOR"] = "cuda"
    if verbose():
        return
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    quiet_loggers()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")


def quiet_loggers() -> None:
    """Our dependencies' loggers at ERROR (unless verbose). Again after ``import ray``: importing
    it sets the ``ray`` logger back to INFO."""
    if verbose():
        return
    for name in (
        "DeepSpeed",
        "deepspeed",
        "ray",
        "ray.train",
        "ray.tune",
        "datasets",
        "transformers",
        "torch.distributed",
        "megatron",
        "filelock",
        "urllib3",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Some of Ray's modules set their own logger to INFO when imported (the Jobs SDK's).
    for name, logger in list(logging.root.manager.loggerDict.items()):  # others may add some
        if name.startswith("ray.") and isinstance(logger, logging.Logger) and logger.level:
            logger.setLevel(max(logger.level, logging.ERROR))


def _cuda_available() -> bool:
    # Cheap check without importing torch (nor starting CUDA in a process that may fork): a CUDA
    # build of torch, and a CUDA device node or an explicit visible-devices list.
    if not _torch_built_with_cuda():
        return False  # e.g. the CPU wheel `make` installs, on a machine that has a GPU
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return visible.strip() not in ("", "-1")
    return os.path.exists("/dev/nvidiactl") or bool(glob.glob("/dev/nvidia[0-9]*"))


def _torch_built_with_cuda() -> bool:
    """Whether the installed torch is a CUDA build, from its generated ``torch/version.py``."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return False
    version_file = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        return names_a_cuda_version(version_file.read_text(encoding="utf-8"))
    except OSError:
        return False


def names_a_cuda_version(version_py: str) -> bool:
    """``torch/version.py``'s text sets ``cuda`` to a version (a CUDA build), not ``None``."""
    found = re.search(r"^cuda\b[^=]*=\s*(.+)$", version_py, re.MULTILINE)
    return found is not None and found.group(1).strip() != "None"
