"""Control files of a run: the stop request (preemption), worker pids, and the final status.

A preemption signal reaches the driver (``midtrain train``) or a worker; either writes
``RUN_DIR/control/STOP``. Every step the ranks agree (an all-reduce) on whether to stop, so all of
them save the same checkpoint at the same step and leave the loop together.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from midtrain.fileio import atomic_write_json

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def control_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "control"


def request_stop(run_dir: str | Path, reason: str) -> None:
    path = control_dir(run_dir) / "STOP"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(reason + "\n")


def clear_stop(run_dir: str | Path) -> None:
    (control_dir(run_dir) / "STOP").unlink(missing_ok=True)


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    path = control_dir(run_dir) / "status.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


class StopFlag:
    def __init__(self, run_dir: str | Path, device: torch.device | str = "cpu") -> None:
        self.run_dir = Path(run_dir)
        self.device = device  # where the collective's tensor lives: NCCL reduces GPU tensors only
        self._signalled = False
        if threading.current_thread() is threading.main_thread():
            for sig in PREEMPT_SIGNALS:
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signalled = True
        request_stop(self.run_dir, signal.Signals(signum).name)

    def requested(self) -> bool:
        """Collective: True on every rank if any rank saw a signal or the STOP file."""
        local = self._signalled or (control_dir(self.run_dir) / "STOP").exists()
        flag = torch.tensor([1 if local else 0], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def record_worker_pid(self, rank: int) -> None:
        path = control_dir(self.run_dir) / f"worker-{rank}.pid"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{os.getpid()}\n")

    def write_status(
        self, status: str, step: int, loss: float | None, timing: dict[str, float] | None = None
    ) -> None:
        atomic_write_json(
            control_dir(self.run_dir) / "status.json",
            {"status": status, "step": step, "loss": loss, "timing": timing},
        )
