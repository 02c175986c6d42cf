"""What both backends put in a checkpoint's optimizer state, and how they copy it out.

Optimizer state is saved per parameter under its Hugging Face name: ``<name>/master`` (fp32
master weights) and the AdamW moments ``<name>/exp_avg``, ``<name>/exp_avg_sq``.
"""

from __future__ import annotations

import torch

ADAM_STATES = ("exp_avg", "exp_avg_sq")
STATE_KEYS = ("master", *ADAM_STATES)


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy nobody else holds: one copy whether the tensor is on a GPU or already on CPU."""
    return tensor.detach().to("cpu", copy=True)
