"""``midtrain jobs``: status, logs and stop for runs on Slurm and on Ray clusters (Ray Jobs).

A job id that is a number (``1234``, ``1234_5``) is a Slurm job; anything else is a Ray Jobs
submission id, looked up at ``--ray-address`` or an ``http(s)://`` ``$RAY_ADDRESS``.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.table import Table

from midtrain.console import console, stdout
from midtrain.errors import ConfigError, MidtrainError
from midtrain.launch.ray_cluster import (
    env_jobs_address,
    jobs_client,
    ray_errors,
    stream_logs,
    without_ray_records,
)
from midtrain.launch.slurm import COMMENT_PREFIX

SLURM_JOB_ID = re.compile(r"\d+(_\d+)?")
# id, name, state, elapsed, limit, nodes, reason, comment (midtrain's: the run dir)
SQUEUE_FORMAT = "%i|%j|%T|%M|%l|%D|%R|%k"


def is_slurm_job(job_id: str) -> bool:
    return SLURM_JOB_ID.fullmatch(job_id) is not None


def _slurm(*args: str) -> str:
    if shutil.which(args[0]) is None:
        raise MidtrainError(f"{args[0]} was not found: run this on a Slurm login node")
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise MidtrainError(f"{' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def _ray_address(address: str | None) -> str:
    address = address or env_jobs_address()
    if not address:
        raise ConfigError(
            "a Ray job: give --ray-address http://HEAD:8265 (or set RAY_ADDRESS=http://HEAD:8265)"
        )
    return address


def _print(title: str, columns: Sequence[str], rows: list[tuple[str, ...]]) -> None:
    """A table on a terminal; tab-separated lines (a header first) into a pipe or file."""
    if not stdout.is_terminal:
        for row in (columns, *rows):
            print("\t".join(row))
        return
    # Folded rather than cropped: ids and paths are what the user copies from here.
    t = Table(title=title, title_justify="left", show_edge=False)
    for col in columns:
        t.add_column(col, overflow="fold")
    for row in rows:
        t.add_row(*row)
    stdout.print(t)


# --- Slurm --------------------------------------------------------------------------------------


def slurm_job_fields(job_id: str) -> dict[str, str]:
    """``scontrol show job``'s Key=Value fields (the job must still be known to slurmctld)."""
    out = _slurm("scontrol", "show", "job", "--oneliner", job_id)
    fields: dict[str, str] = {}
    for token in out.split():
        key, sep, value = token.partition("=")
        if sep:
            fields[key] = value
    return fields


def _run_dir(comment: str) -> str:
    return comment[len(COMMENT_PREFIX) :] if comment.startswith(COMMENT_PREFIX) else ""


def slurm_status_rows(job_id: str | None) -> list[tuple[str, ...]]:
    args = ["squeue", "--noheader", f"--format={SQUEUE_FORMAT}"]
    args += ["--jobs", job_id] if job_id else ["--me"]
    rows = []
    for line in _slurm(*args).splitlines():
        parts = line.split("|")
        if len(parts) != 8 or (job_id is None and not parts[7].startswith(COMMENT_PREFIX)):
            continue  # without a job id: midtrain's jobs only
        *shown, comment = parts
        rows.append((*shown, _run_dir(comment)))
    if job_id and not rows:  # finished: squeue no longer lists it, scontrol still knows it
        f = slurm_job_fields(job_id)
        rows = [
            (
                job_id,
                f.get("JobName", ""),
                f.get("JobState", ""),
                f.get("RunTime", ""),
                f.get("TimeLimit", ""),
                f.get("NumNodes", ""),
                f"exit {f.get('ExitCode', '?')}, restarts {f.get('Restarts', '0')}",
                _run_dir(f.get("Comment", "")),
            )
        ]
    return rows


def slurm_active(job_id: str) -> bool:
    return bool(_slurm("squeue", "--noheader", "--format=%T", "--jobs", job_id).strip())


def slurm_log_path(job_id: str) -> Path:
    path = slurm_job_fields(job_id).get("StdOut")
    if not path:
        raise MidtrainError(f"Slurm job {job_id}: no output file recorded")
    return Path(path)


def slurm_logs(job_id: str, follow: bool) -> None:
    path = slurm_log_path(job_id)
    offset = 0
    while True:
        if path.is_file():
            with open(path, encoding="utf-8", errors="replace") as f:
                f.seek(offset)
                text = f.read()
                offset = f.tell()
            sys.stdout.write(text)
            sys.stdout.flush()
        if not follow or not slurm_active(job_id):
            if not path.is_file():
                raise MidtrainError(f"Slurm job {job_id}: its log {path} does not exist (yet)")
            return
        time.sleep(1)


def slurm_stop(job_id: str, force: bool) -> None:
    if force:
        _slurm("scancel", job_id)
        console.print(f"Slurm job {job_id}: cancelled")
    else:
        # SIGTERM to the batch shell only: the script forwards it to the driver, every rank saves
        # a checkpoint, and the job ends without requeueing (resume it with `slurm submit`).
        _slurm("scancel", "--batch", "--signal=TERM", job_id)
        console.print(f"Slurm job {job_id}: asked to checkpoint and stop")


# --- Ray Jobs -----------------------------------------------------------------------------------


def ray_status_rows(address: str, job_id: str | None) -> list[tuple[str, ...]]:
    client = jobs_client(address)
    with ray_errors(address):
        jobs = [client.get_job_info(job_id)] if job_id else client.list_jobs()
    rows = []
    for job in sorted(jobs, key=lambda j: j.start_time or 0):
        sid = job.submission_id or job.job_id or ""
        if job_id is None and not sid.startswith("midtrain-"):
            continue
        took = ((job.end_time or time.time() * 1000) - (job.start_time or 0)) / 1000
        rows.append(
            (
                sid,
                job.status.value,
                f"{took:.0f}s" if job.start_time else "",
                "" if job.driver_exit_code is None else str(job.driver_exit_code),
                (job.metadata or {}).get("midtrain_run_dir", ""),
            )
        )
    return rows


def ray_logs(address: str, job_id: str, follow: bool) -> None:
    client = jobs_client(address)
    with ray_errors(address):
        if follow:
            client.get_job_info(job_id)  # an unknown id: a one-line error, not a websocket 404
            asyncio.run(stream_logs(client, job_id))
        else:
            text = client.get_job_logs(job_id)
            print("\n".join(without_ray_records(text.split("\n"))), end="", flush=True)


def ray_stop(address: str, job_id: str) -> None:
    # Ray sends the driver SIGTERM (midtrain: checkpoint and stop), then SIGKILL after
    # RAY_JOB_STOP_WAIT_TIME_S, which midtrain's submissions set long enough to save.
    client = jobs_client(address)
    with ray_errors(address):
        if not client.stop_job(job_id):
            status = client.get_job_info(job_id).status.value
            raise MidtrainError(f"Ray job {job_id} is not running ({status}): nothing to stop")
    console.print(f"Ray job {job_id}: asked to checkpoint and stop")


# --- the commands -------------------------------------------------------------------------------


def show_status(job_id: str | None, ray_address: str | None) -> None:
    """Slurm jobs (when Slurm is here) and Ray jobs (when an address is known), one table each."""
    if job_id is not None:
        if is_slurm_job(job_id):
            _print("Slurm job", SLURM_COLUMNS, slurm_status_rows(job_id))
        else:
            address = _ray_address(ray_address)
            _print("Ray job", RAY_COLUMNS, ray_status_rows(address, job_id))
        return
    address = ray_address or env_jobs_address()
    if address:
        _print(f"Ray jobs at {address}", RAY_COLUMNS, ray_status_rows(address, None))
    if shutil.which("squeue"):
        try:
            _print("Slurm jobs", SLURM_COLUMNS, slurm_status_rows(None))
        except MidtrainError as exc:
            if not address:
                raise
            console.print(f"(no Slurm jobs shown: {exc})")
    elif not address:
        raise ConfigError("no Slurm here and no Ray cluster given (--ray-address or RAY_ADDRESS)")


SLURM_COLUMNS = ("job", "name", "state", "time", "limit", "nodes", "reason / exit", "run dir")
RAY_COLUMNS = ("job", "status", "time", "exit", "run dir")


def show_logs(job_id: str, ray_address: str | None, follow: bool) -> None:
    if is_slurm_job(job_id):
        slurm_logs(job_id, follow)
    else:
        ray_logs(_ray_address(ray_address), job_id, follow)


def stop_job(job_id: str, ray_address: str | None, force: bool = False) -> None:
    if is_slurm_job(job_id):
        slurm_stop(job_id, force)
    else:
        if force:  # Ray's stop is SIGTERM, then SIGKILL after the wait set at submission
            raise ConfigError(
                "jobs stop --force: only for Slurm jobs; a Ray job always checkpoints"
            )
        ray_stop(_ray_address(ray_address), job_id)
