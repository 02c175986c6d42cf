"""Process-wide settings every midtrain entry point applies first: offline and quiet.

Nothing is ever downloaded at run time, and third-party libraries' banners and warnings are
silenced unless ``MIDTRAIN_VERBOSE=1``.
"""

from __future__ import annotations

import logging
import os
import warnings

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
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")


def _cuda_available() -> bool:
    # Cheap check without importing torch: a CUDA device node or an explicit visible-devices list.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return visible.strip() not in ("", "-1")
    return os.path.exists("/dev/nvidiactl")
