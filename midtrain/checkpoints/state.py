"""Trainer state as plain JSON: checked and normalised at save time, and RNG states encoded as
data (base64 bytes, integer lists) so that restoring them never needs pickle."""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def to_json_data(obj: Any, where: str = "trainer_state") -> Any:
    """``obj`` as JSON-able data (tuples -> lists, numpy scalars -> Python numbers); a TypeError
    naming the key path for anything else (tensors: pass ``.item()`` or ``.tolist()``)."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj
    if isinstance(obj, np.generic):
        return to_json_data(obj.item(), where)
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if isinstance(key, int) and not isinstance(key, bool):
                key = str(key)  # as json.dumps would (HF configs key id2label by int)
            if not isinstance(key, str):
                raise TypeError(f"{where}: key {key!r} is not a string")
            out[key] = to_json_data(value, f"{where}.{key}")
        return out
    if isinstance(obj, (list, tuple)):
        return [to_json_data(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(
        f"{where}: {type(obj).__name__} is not JSON data (tensors go in the optimizer shards "
        "or as .item()/.tolist())"
    )


def dumps(obj: Any, where: str = "trainer_state") -> bytes:
    """Canonical JSON bytes for a state mapping (NaN/inf allowed: a loss can be NaN)."""
    return (json.dumps(to_json_data(obj, where), indent=2) + "\n").encode("utf-8")


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def capture_rng_state() -> dict[str, Any]:
    """The Python, numpy and torch (CPU and, when initialised, CUDA) RNG states as JSON data."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "kind": kind,
            "keys": keys.tolist(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Undo ``capture_rng_state``: the next random numbers are those that followed the capture."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["kind"],
            np.asarray(npst["keys"], dtype=np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
