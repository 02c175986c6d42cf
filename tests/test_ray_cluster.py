"""An existing Ray cluster: a real ``ray start --head`` on 127.0.0.1 with token authentication,
started here and stopped after; runs go to it through the Jobs API with
``midtrain train --ray-address`` (or ``RAY_ADDRESS=http://...``), and ``midtrain jobs`` sees them.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from slurm_cluster import free_port
from test_training import exact_view, run_spec, wait_for_step

from midtrain.checkpoints import list_checkpoints
from midtrain.cli import cli
from midtrain.training.control import read_status
from midtrain.training.metrics import read_metrics

pytestmark = pytest.mark.slow

# Long enough (~10 s of steps at ~40 ms) that `jobs stop` lands mid-run.
STEPS = 300
LONG = {"train__max_steps": STEPS, "checkpoint__interval": 50}
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


@dataclass
class RayHead:
    url: str  # the Jobs (dashboard) address
    token_file: Path
    proc: subprocess.Popen

    def client_env(self, token: bool = True, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
        if token:
            env["RAY_AUTH_TOKEN_PATH"] = str(self.token_file)
        return {**env, "MIDTRAIN_NO_PROGRESS": "1", **extra}


def _stop(proc: subprocess.Popen) -> None:
    """`ray start --block` stops its node's processes on SIGTERM; the session's kill is a net
    (never `ray stop`: it would stop every Ray on the machine)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    # A short path: Ray's unix sockets live under its temp dir (~107 characters at most).
    root = Path(tempfile.mkdtemp(prefix="midtrain-ray-"))
    token_file = root / "token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    dashboard = free_port()
    venv_bin = str(Path(sys.executable).parent)
    env = {
        **{k: v for k, v in os.environ.items() if k not in AUTH_VARS},
        # The cluster's own environment: its `python` (the job's entrypoint) is this venv's.
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    cmd = [
        *(str(Path(venv_bin) / "ray"), "start", "--head", "--block"),
        "--node-ip-address=127.0.0.1",
        f"--port={free_port()}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        "--num-cpus=3",  # 2 workers + Ray Train's controller; the driver asks for none
        f"--temp-dir={root / 'ray'}",
        "--disable-usage-stats",
    ]
    log = open(root / "ray-start.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    head = RayHead(f"http://127.0.0.1:{dashboard}", token_file, proc)
    try:
        deadline = time.monotonic() + 120
        while not _jobs_api_up(head.url):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"ray start --head did not come up:\n{(root / 'ray-start.log').read_text()}"
                )
            time.sleep(1)
        yield head
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def _jobs_api_up(url: str) -> bool:
    # Any HTTP answer counts (without the token it is 401): the dashboard is listening.
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=5):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def midtrain(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "midtrain.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_a_client_without_the_token_is_refused(ray_head: RayHead) -> None:
    for env in (ray_head.client_env(token=False), ray_head.client_env(False, RAY_AUTH_TOKEN="x")):
        done = midtrain(env, "jobs", "status", "--ray-address", ray_head.url)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "refused" in done.stderr and "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def completed(
    ray_head: RayHead, tmp_path_factory: pytest.TempPathFactory, prepared_corpora: dict[str, Path]
) -> tuple[Path, str]:
    """A run submitted with --ray-address: (its run dir, what `midtrain train` printed)."""
    tmp = tmp_path_factory.mktemp("ray_jobs")
    spec = run_spec(tmp, prepared_corpora, "on_ray", **LONG)
    done = midtrain(
        ray_head.client_env(), "train", str(spec), "--ray-address", ray_head.url, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return tmp / "on_ray", done.stdout + done.stderr


def test_run_submitted_with_ray_address_streams_logs_and_exits_0(
    ray_head: RayHead, completed: tuple[Path, str]
) -> None:
    run_dir, out = completed
    # The driver's own output, streamed from the cluster.
    assert f"{STEPS}/{STEPS}" in out and "completed" in out, out
    job_id = re.search(r"submitted Ray job (\S+)", out).group(1)
    assert job_id.startswith("midtrain-on_ray-")
    assert read_status(run_dir)["status"] == "completed"
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, STEPS + 1))
    assert [i.step for i in list_checkpoints(run_dir)][-1] == STEPS

    env = ray_head.client_env()
    status = midtrain(env, "jobs", "status", job_id, "--ray-address", ray_head.url)
    assert status.returncode == 0, status.stderr
    assert "SUCCEEDED" in status.stdout and str(run_dir) in status.stdout
    listed = midtrain({**env, "RAY_ADDRESS": ray_head.url}, "jobs", "status")
    assert listed.returncode == 0 and job_id in listed.stdout, listed.stderr
    logs = midtrain(env, "jobs", "logs", job_id, "--ray-address", ray_head.url)
    assert logs.returncode == 0 and f"{STEPS}/{STEPS}" in logs.stdout
    # Quiet by default: none of Ray's INFO lines about uploading the package or the log stream.
    assert not re.search(r"INFO \S+\.py:\d+ --", out.split("run summary")[0]), out


def test_jobs_commands_on_a_finished_or_unknown_job_say_so(
    ray_head: RayHead, completed: tuple[Path, str]
) -> None:
    job_id = re.search(r"submitted Ray job (\S+)", completed[1]).group(1)
    env = ray_head.client_env()
    stop = midtrain(env, "jobs", "stop", job_id, "--ray-address", ray_head.url)
    assert stop.returncode != 0 and f"{job_id} is not running (SUCCEEDED)" in stop.stderr
    assert "asked to checkpoint" not in stop.stdout
    follow = midtrain(
        env, "jobs", "logs", "-f", "midtrain-nope-1234", "--ray-address", ray_head.url
    )
    assert follow.returncode != 0 and "midtrain-nope-1234" in follow.stderr
    assert "Traceback" not in follow.stderr, follow.stderr


def test_jobs_stop_checkpoints_and_the_run_resumes_exactly(
    ray_head: RayHead,
    completed: tuple[Path, str],
    tmp_path: Path,
    prepared_corpora: dict[str, Path],
) -> None:
    spec = run_spec(tmp_path, prepared_corpora, "stopped", **LONG)
    run_dir = tmp_path / "stopped"
    env = ray_head.client_env(RAY_ADDRESS=ray_head.url)  # RAY_ADDRESS=http://... : a Jobs submit
    import ray.job_submission  # noqa: F401  (now, not between the run's first step and the stop)

    proc = subprocess.Popen(
        [sys.executable, "-m", "midtrain.cli", "train", str(spec)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_step(run_dir, 1, proc, timeout=180)
        # In this process: a subprocess's start-up (~3 s) is most of this tiny run's length.
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            code, listed = invoke("jobs", "status")
            job_id = re.search(r"^(midtrain-stopped-\S+)\tRUNNING", listed, re.M).group(1)
            code, said = invoke("jobs", "stop", job_id)
            assert code == 0, said
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, out
    status = read_status(run_dir)
    assert status["status"] == "preempted" and 1 <= status["step"] < STEPS, out
    assert status["step"] in [i.step for i in list_checkpoints(run_dir)]

    # Resumed on the cluster, it ends as the uninterrupted run did, step for step.
    done = midtrain(env, "train", "--resume", str(run_dir), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert exact_view(run_dir) == exact_view(completed[0])


def test_a_run_that_fails_on_the_cluster_exits_with_its_status_and_says_why(
    ray_head: RayHead,
    completed: tuple[Path, str],
    tmp_path: Path,
    prepared_corpora: dict[str, Path],
) -> None:
    # A start checkpoint damaged after it was written. The spec is valid (checked here, before
    # anything is submitted); the job finds the damage on the cluster, when it verifies the files.
    damaged = tmp_path / "damaged"
    shutil.copytree(list_checkpoints(completed[0])[-1].path, damaged)
    victim = max(damaged.rglob("*.safetensors"), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:  # the last byte is tensor data: the file still parses
        f.seek(-1, os.SEEK_END)
        last = f.read(1)[0]
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last ^ 0xFF]))
    spec = run_spec(tmp_path, prepared_corpora, "broken", init_from={"checkpoint": str(damaged)})

    env = ray_head.client_env()
    done = midtrain(env, "train", str(spec), "--ray-address", ray_head.url, timeout=300)
    out = done.stdout + done.stderr
    submitted = re.search(r"submitted Ray job (\S+)", out)
    assert submitted, out  # the failure is the job's, on the cluster, not the client's
    job_id = submitted.group(1)
    # The driver's own exit status (a user error: 2), and its message streamed back.
    assert done.returncode == 2, out
    assert str(victim) in out and "altered" in out, out
    assert "Traceback" not in out
    status = midtrain(env, "jobs", "status", job_id, "--ray-address", ray_head.url)
    assert status.returncode == 0 and "FAILED" in status.stdout, status.stdout + status.stderr
    assert not (tmp_path / "broken" / "checkpoints").exists()  # it failed before writing any
