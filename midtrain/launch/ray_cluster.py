"""Submit a run to an existing Ray cluster through the Ray Jobs API, stream its logs, return its
exit status.

Which address means what: ``--ray-address`` is always a cluster's Jobs (dashboard) address,
``http(s)://head:8265`` (a bare ``head:8265`` gets ``http://``). ``RAY_ADDRESS`` counts as one
only with an ``http(s)://`` scheme; a bare ``host:port`` there is a GCS address, which ``midtrain
train`` joins with ``ray.init`` and drives the run from this process (that is how a submitted
job itself, and a Slurm job's driver, run).

The job's runtime environment is the project: the ``midtrain`` package is uploaded
(``py_modules``) and the resolved run spec is the job's working directory, so the cluster needs
only the dependencies (torch, ray, deepspeed, ...), not a checkout. Data, the start checkpoint and
the run dir are paths the cluster's nodes must see (a shared filesystem).

Token authentication (Ray's ``RAY_AUTH_MODE=token``): when ``RAY_AUTH_MODE=token``,
``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH`` is set, the token is read where Ray reads it
(``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``) and sent as a
bearer header. It is never sent otherwise (Ray writes ``~/.ray/auth_token`` for local clusters on
its own; that must not go to every address given), and never put into the job's environment,
which anyone who can list jobs sees.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from midtrain.console import console
from midtrain.errors import ConfigError, MidtrainError
from midtrain.runtime_env import quiet_loggers, verbose

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

    from midtrain.config import RunSpec

JOBS_SCHEMES = ("http://", "https://")
# Ray gives a stopped job's driver this long between SIGTERM and SIGKILL (its default is 3 s):
# time for every rank to save a checkpoint.
STOP_WAIT_S = 600


def is_jobs_address(address: str | None) -> bool:
    return bool(address) and address.startswith(JOBS_SCHEMES)


def env_jobs_address() -> str | None:
    """``RAY_ADDRESS`` when it is a Jobs address (``http(s)://``), else None."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    return address if is_jobs_address(address) else None


def jobs_address(address: str) -> str:
    """``--ray-address`` always means the Jobs API: a bare host:port gets ``http://``."""
    if address.startswith("ray://"):
        raise ConfigError(
            f"--ray-address {address}: Ray Client addresses are not supported; give the "
            "dashboard's address, e.g. http://head:8265"
        )
    return address.rstrip("/") if address.startswith(JOBS_SCHEMES) else f"http://{address}"


def auth_token() -> str | None:
    """The Ray auth token, when the user asked for token auth (see the module's docstring)."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path_env = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not path_env and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return None
    path = Path(path_env).expanduser() if path_env else Path.home() / ".ray" / "auth_token"
    if not path.is_file():
        where = "RAY_AUTH_TOKEN_PATH" if path_env else "RAY_AUTH_MODE=token"
        raise ConfigError(f"{where}: the token file {path} does not exist")
    return path.read_text(encoding="utf-8").strip() or None


@contextmanager
def ray_errors(address: str) -> Iterator[None]:
    """Ray's client errors (unreachable, refused token, unknown job) as a one-line message."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as exc:
        raise MidtrainError(
            f"the Ray cluster at {address} refused the request: {str(exc).splitlines()[0]} "
            "(set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token)"
        ) from None
    except (OSError, RuntimeError, ValueError) as exc:
        raise MidtrainError(f"Ray cluster at {address}: {exc}") from None


def jobs_client(address: str) -> JobSubmissionClient:
    from ray.job_submission import JobSubmissionClient

    quiet_loggers()  # importing ray set its logger back to INFO (uploads, websocket closes)
    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    with ray_errors(address):
        return JobSubmissionClient(jobs_address(address), headers=headers)


def package_dir() -> Path:
    import midtrain

    return Path(midtrain.__file__).resolve().parent


def _submission_id(run_dir: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]", "_", Path(run_dir).name)[:40]
    return f"midtrain-{name}-{uuid.uuid4().hex[:8]}"


def resolved_spec(spec_path: str, overrides: list[str]) -> RunSpec:
    """The spec as a cluster job runs it: overrides applied, paths absolute, and no
    ``launch.ray_address`` (the job joins the cluster it runs on, whatever cluster the spec names).
    Staged for the job, so the cluster runs exactly what was validated here."""
    from midtrain.config import load_run_spec

    spec = load_run_spec(spec_path, overrides)
    return spec.model_copy(update={"launch": spec.launch.model_copy(update={"ray_address": None})})


def build_entrypoint(
    staged: Path,
    spec_path: str | None,
    overrides: list[str],
    resume_dir: str | None,
    auto_resume: bool,
    allow_changed_spec: bool,
    python: str,
) -> tuple[str, str]:
    """Stage the resolved spec in ``staged``; returns (entrypoint command, run dir)."""
    # The job's working directory is the staged folder: every path it gets must be absolute.
    resume_dir = str(Path(resume_dir).resolve()) if resume_dir is not None else None
    if spec_path is not None:
        # Resolved here, so a bad spec fails before anything is uploaded.
        spec = resolved_spec(spec_path, overrides)
        (staged / "run.yaml").write_text(spec.to_yaml(), encoding="utf-8")
        args = ["train", "run.yaml"]
        if resume_dir is not None:
            args += ["--resume", resume_dir]
        run_dir = spec.run_dir
    elif resume_dir is not None:
        args = ["train", "--resume", resume_dir, *overrides]
        run_dir = resume_dir
    else:
        raise ConfigError("give a run spec, or --resume RUN_DIR")
    if auto_resume:
        args.append("--auto-resume")
    if allow_changed_spec:
        args.append("--allow-changed-spec")
    command = f"{shlex.quote(python)} -m midtrain.cli {shlex.join(args)}"
    if verbose():  # for the driver; its ray.init passes it on to the workers
        command = f"MIDTRAIN_VERBOSE=1 {command}"
    return command, str(run_dir)


def submit_run(
    address: str,
    spec_path: str | None,
    overrides: list[str],
    resume_dir: str | None = None,
    auto_resume: bool = False,
    allow_changed_spec: bool = False,
    follow: bool = True,
) -> int:
    """Submit ``midtrain train`` as a Ray job; with ``follow``, stream its logs and return its
    exit status (0 completed, 75 stopped with a checkpoint, 1 failed), else return 0 at once."""
    python = os.environ.get("MIDTRAIN_RAY_PYTHON", "python")  # the cluster's, on its PATH
    staged = Path(tempfile.mkdtemp(prefix="midtrain-job-"))
    try:
        entrypoint, run_dir = build_entrypoint(
            staged, spec_path, overrides, resume_dir, auto_resume, allow_changed_spec, python
        )
        client = jobs_client(address)
        runtime_env = {
            "working_dir": str(staged),
            "py_modules": [str(package_dir())],
            "excludes": ["__pycache__", "*.pyc"],
            # Not OFFLINE_ENV nor MIDTRAIN_VERBOSE: the driver's ray.init sets those for the
            # workers, and Ray refuses a job whose env var keys clash with its driver's.
            "env_vars": {
                "MIDTRAIN_NO_PROGRESS": "1",
                "PYTHONUNBUFFERED": "1",
                "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_S),
            },
        }
        with ray_errors(address):  # uploads the package and the staged spec
            job_id = client.submit_job(
                entrypoint=entrypoint,
                submission_id=_submission_id(run_dir),
                runtime_env=runtime_env,
                metadata={"midtrain_run_dir": run_dir},
                entrypoint_num_cpus=0,  # the driver only coordinates; workers hold CPUs/GPUs
            )
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    console.print(f"submitted Ray job {job_id} to {address} (run dir {run_dir})")
    if not follow:
        return 0
    try:
        with ray_errors(address):
            asyncio.run(stream_logs(client, job_id))
            return job_exit_status(client, job_id, run_dir)
    except KeyboardInterrupt:
        console.print(
            f"stopped following; the job keeps running. Stop it (it checkpoints first) with "
            f"`midtrain jobs stop {job_id} --ray-address {address}`"
        )
        return 130


# Ray's own log records in a job's log ("... INFO job_manager.py:581 -- Runtime env is setting
# up."), left out unless MIDTRAIN_VERBOSE is set.
_RAY_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(DEBUG|INFO) \S+\.py:\d+ -- ")


def without_ray_records(lines: list[str]) -> list[str]:
    return lines if verbose() else [line for line in lines if not _RAY_RECORD.match(line)]


async def stream_logs(client: JobSubmissionClient, job_id: str) -> None:
    """Print a job's log as it grows (the whole log from its start), Ray's INFO records left out."""
    pending = ""
    async for chunk in client.tail_job_logs(job_id):
        *lines, pending = (pending + chunk).split("\n")
        if shown := without_ray_records(lines):
            print("\n".join(shown), flush=True)
    if pending:
        print(pending, flush=True)


def job_exit_status(client: JobSubmissionClient, job_id: str, run_dir: str) -> int:
    """The driver's exit status once the job is over (tail_job_logs ends with the job)."""
    from ray.job_submission import JobStatus

    from midtrain.launch.local import EXIT_PREEMPTED
    from midtrain.training.control import read_status

    info = client.get_job_info(job_id)
    for _ in range(100):  # the status may lag the end of the log stream by a moment
        if info.status.is_terminal():
            break
        time.sleep(0.1)
        info = client.get_job_info(job_id)
    if info.status == JobStatus.SUCCEEDED:
        return 0
    if not info.status.is_terminal():  # the stream broke (a dashboard restart, a proxy timeout)
        console.print(
            f"lost the log stream of Ray job {job_id}, which is still {info.status.value}: "
            f"follow it with `midtrain jobs logs -f {job_id}`"
        )
        return 1
    # Ray's message on a failure ends with the last 20,000 characters of the log just streamed.
    message = (info.message or "").strip().splitlines()[:1]
    console.print(f"Ray job {job_id}: {' '.join([info.status.value, *message])}")
    code = info.driver_exit_code
    if isinstance(code, int) and code > 0:
        return code
    # A stopped job has no exit code in Ray: the run's own status says whether it checkpointed
    # (the run dir is on the shared filesystem).
    status = read_status(run_dir) if Path(run_dir).is_dir() else None
    return EXIT_PREEMPTED if status and status.get("status") == "preempted" else 1
