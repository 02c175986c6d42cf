"""Slurm launch: script validation, and real jobs on a real one-node Slurm cluster (munged,
slurmctld, slurmd started by ``tests/slurm_cluster.py``) that each run a Ray cluster and
``midtrain train`` inside the job.

The three jobs (uninterrupted, preempted with SIGUSR1, over its time limit) are submitted together
at the start of the module; each takes the whole node, so Slurm runs them one after another.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from slurm_cluster import SlurmCluster, SlurmUnavailable, start_cluster
from test_training import exact_view, final_weights, run_spec

from midtrain.checkpoints import list_checkpoints
from midtrain.checkpoints.layout import MANIFEST, RUN_SPEC, write_latest
from midtrain.cli import cli
from midtrain.config import load_run_spec
from midtrain.errors import ConfigError, MidtrainError
from midtrain.launch import slurm as slurm_module
from midtrain.launch.slurm import (
    SlurmOptions,
    fill_template,
    render_job,
    submit_job,
    time_limit_seconds,
)
from midtrain.training.control import read_status
from midtrain.training.metrics import read_metrics

JOB_TIMEOUT = 240  # seconds a test waits for its job, queueing and requeues included
# Long enough (a few seconds of steps) that a preemption sent from here lands mid-run; the tiny
# model's step takes ~40 ms.
STEPS = 240
LONG = {"train__max_steps": STEPS, "checkpoint__interval": 40}
TIMELIMIT_STEPS = 5000  # minutes: the time limit comes first


def midtrain(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MIDTRAIN_NO_PROGRESS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "midtrain.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- validation: no Slurm needed ----------------------------------------------------------------


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory, prepared_corpora: dict[str, Path]) -> Path:
    return run_spec(tmp_path_factory.mktemp("render"), prepared_corpora, "render")


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"partition": "gpu\n#SBATCH --uid=0"}, "--partition"),
        ({"partition": "gpu;reboot"}, "--partition"),
        ({"account": "lab\rother"}, "--account"),
        ({"account": "lab\x00"}, "--account"),
        ({"time": "1:00:00\n"}, "--time"),
        ({"time": "$(reboot)"}, "--time"),
        ({"job_name": "run`id`"}, "--job-name"),
        ({"extra_sbatch": ("--mem=10G\n#SBATCH --uid=0",)}, "--extra-sbatch"),
        ({"extra_sbatch": ("--comment=$(id)",)}, "--extra-sbatch"),
        ({"extra_sbatch": ("--output=/tmp/x",)}, "--extra-sbatch"),
        ({"extra_sbatch": ("--comment=mine",)}, "--extra-sbatch"),
        ({"extra_sbatch": ("--mem=10G --uid=0",)}, "--extra-sbatch"),
        ({"env": ("NCCL_DEBUG=INFO\nrm -rf /",)}, "--env"),
        ({"env": ("1BAD=x",)}, "--env"),
        ({"python": "/usr/bin/python3\n"}, "--python"),
        ({"python": "/opt/py\tthon"}, "--python"),
        ({"job_name": "a b"}, "--job-name"),
        ({"nodes": 0}, "--nodes"),
        ({"cpus_per_node": 0}, "--cpus-per-node"),
        ({"signal_seconds": 5}, "--signal-seconds"),
        ({"signal_seconds": 70000}, "--signal-seconds"),  # sbatch: 0-65535
        ({"time": "5", "signal_seconds": 300}, "--signal-seconds"),  # due before it starts
        # Slurm may signal up to 60 s early: at the start of a 3-minute job.
        ({"time": "3", "signal_seconds": 130}, "--signal-seconds"),
        ({"gpus_per_node": 1, "nodes": 1}, "workers"),  # 2 workers, 1 GPU
        ({"cpus_per_node": 1}, "--cpus-per-node"),  # 2 workers x 1 CPU on the one node
        # What the script sets itself, or what changes how bash or Ray reads it.
        ({"env": ("SPEC=/tmp/other.yaml",)}, "--env"),
        ({"env": ("RAY_CPUS=64",)}, "--env"),
        ({"env": ("EXIT_PREEMPTED=0",)}, "--env"),
        ({"env": ("IFS=/",)}, "--env"),
        ({"env": ("BASH_ENV=/tmp/x",)}, "--env"),
        ({"env": ("SHELLOPTS=xtrace",)}, "--env"),
        ({"env": ("RAY_ADDRESS=elsewhere:6379",)}, "--env"),
        ({"env": ("RAY_AUTH_MODE=disabled",)}, "--env"),
    ],
)
def test_render_rejects_unsafe_values_naming_the_field(
    spec: Path, options: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(field)):
        render_job(str(spec), [], SlurmOptions(**options))


def test_render_rejects_a_control_character_in_an_override(spec: Path) -> None:
    with pytest.raises(ConfigError, match="override"):
        render_job(str(spec), ["train.seed=1\nscancel -u root"], SlurmOptions())


def test_render_rejects_a_run_dir_that_cannot_go_on_an_sbatch_line(spec: Path) -> None:
    with pytest.raises(ConfigError, match="run_dir"):
        render_job(str(spec), ["run_dir=/tmp/a b"], SlurmOptions())


def test_shell_code_in_values_stays_data(spec: Path) -> None:
    script = render_job(
        str(spec), ["launch.ray_address=$(halt)"], SlurmOptions(env=("NOTE=`id`; $(reboot)",))
    ).script
    assert "export NOTE='`id`; $(reboot)'" in script
    assert "halt" not in script  # overrides go into the resolved spec, not the script


def shell_values(script: str, names: list[str]) -> list[str]:
    """What bash makes of the script's assignments and exports (the lines that hold values)."""
    assignments = [
        line
        for line in script.splitlines()
        if re.match(r"(PYTHON|RUN_DIR|SPEC|RAY_CPUS|RAY_GPUS)=|export ", line)
    ]
    printed = "\n".join([*assignments, 'printf "%s\\0" ' + " ".join(f'"${n}"' for n in names)])
    done = subprocess.run(["bash", "-c", printed], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("\0")[:-1]


def test_a_placeholder_inside_a_value_is_not_expanded_again(spec: Path, tmp_path: Path) -> None:
    # `midtrain slurm render SPEC 'launch.ray_address=x{{EXPORTS}}' --env 'A=$(touch ...)'`, and
    # the same through --python: a second expansion would put the export outside the quotes.
    marker = tmp_path / "pwned"
    python = "/opt/py{{EXPORTS}}thon"
    options = SlurmOptions(python=python, env=(f"A=$(touch {marker})",))
    script = render_job(str(spec), ["launch.ray_address=x{{EXPORTS}}"], options).script
    assert shell_values(script, ["PYTHON", "A"]) == [python, f"$(touch {marker})"]
    assert not marker.exists()
    assert script.count("$(touch") == 1  # only in the export, single-quoted


def test_template_placeholders_are_filled_in_one_pass_and_must_be_known() -> None:
    assert fill_template("a={{A}} b={{B}}", {"A": "{{B}}", "B": "2"}, "t") == "a={{B}} b=2"
    with pytest.raises(MidtrainError, match=re.escape("t: unknown placeholder {{NOPE}}")):
        fill_template("{{A}} {{NOPE}}", {"A": "1"}, "t")


def test_a_cluster_named_in_the_spec_gives_way_to_the_jobs_own(spec: Path) -> None:
    job = render_job(
        str(spec), ["launch.ray_address=http://elsewhere:8265"], SlurmOptions(time="UNLIMITED")
    )
    assert yaml.safe_load(job.spec_yaml)["launch"]["ray_address"] is None
    assert "#SBATCH --time=UNLIMITED" in job.script


@pytest.mark.parametrize(
    ("extra", "option"),
    [
        ("-t5", "--time"),
        ("-t", "--time"),
        ("-N4", "--nodes"),
        ("-pdebug", "--partition"),
        ("-p=debug", "--partition"),
        ("-vN4", "--nodes"),  # -v takes no value: sbatch reads -v -N4
        ("-Jname", "--job-name"),
        ("-Alab", "--account"),
        ("-c8", "--cpus-per-task"),
        ("-ox", "--output"),
        ("-ex", "--error"),
        ("--no-requeu", "--no-requeue"),
        ("--no-requeue", "--no-requeue"),
        ("--requeue", "--requeue"),
        ("--out=x", "--output"),
        ("--part=x", "--partition"),
        ("--time=5", "--time"),
        ("--sig=B:USR1@5", "--signal"),
        ("--gpus-per=2", "--gpus-per-node"),
        ("--comm=x", "--comment"),
    ],
)
def test_extra_sbatch_cannot_set_midtrains_own_options(spec: Path, extra: str, option: str) -> None:
    with pytest.raises(ConfigError, match=rf"--extra-sbatch: {re.escape(extra)} sets {option}\b"):
        render_job(str(spec), [], SlurmOptions(extra_sbatch=(extra,)))


@pytest.mark.parametrize(
    ("extra", "instead"),
    [
        # GPUs that Ray is not told about (RAY_GPUS comes from --gpus-per-node): a job that waits
        # for GPUs Ray does not have until its time limit.
        ("--gres=gpu:8", "--gpus-per-node"),
        ("--gres=shard:1,gpu:a100:2", "--gpus-per-node"),
        ("--gpus=8", "--gpus-per-node"),
        ("-G8", "--gpus-per-node"),
        ("--gpus-per-task=1", "--gpus-per-node"),
        ("--gpus-per-t=1", "--gpus-per-node"),
        ("--gpus-per-socket=1", "--gpus-per-node"),
        ("--array=0-3", "each run as a job of its own"),
        ("-a0-3", "each run as a job of its own"),
        ("--wait", "midtrain jobs logs"),
        ("-W", "midtrain jobs logs"),
        ("--test-only", "midtrain slurm render"),
        ("--export=NONE", "--env"),
    ],
)
def test_extra_sbatch_refuses_options_that_break_the_job(
    spec: Path, extra: str, instead: str
) -> None:
    with pytest.raises(ConfigError, match=rf"--extra-sbatch: {re.escape(extra)} .*{instead}"):
        render_job(str(spec), [], SlurmOptions(extra_sbatch=(extra,)))


def test_a_gpu_run_needs_gpus_per_node(spec: Path) -> None:
    with pytest.raises(ConfigError, match=r"launch\.use_gpu.*--gpus-per-node"):
        render_job(str(spec), ["launch.use_gpu=true"], SlurmOptions())


def test_the_job_asks_slurm_for_the_cpus_ray_is_told(spec: Path) -> None:
    # Without --cpus-per-task, Slurm gives the one task per node one CPU.
    default = render_job(str(spec), [], SlurmOptions()).script  # 2 workers x 1 CPU, + 1
    assert "#SBATCH --cpus-per-task=3\n" in default and "\nRAY_CPUS=3 " in default
    chosen = render_job(str(spec), [], SlurmOptions(cpus_per_node=8)).script
    assert "#SBATCH --cpus-per-task=8\n" in chosen and "\nRAY_CPUS=8 " in chosen


def test_env_cannot_set_any_variable_the_script_assigns(spec: Path) -> None:
    template = slurm_module.template_path().read_text()
    code = [line for line in template.splitlines() if not line.lstrip().startswith("#")]
    assigned = set(re.findall(r"(?:^|\s)([A-Z][A-Z0-9_]*)=", "\n".join(code)))
    assert {"PYTHON", "SPEC", "PORT", "RAY_AUTH_MODE"} <= assigned
    for name in assigned:
        with pytest.raises(ConfigError, match=rf"--env: {name} is set by the batch script"):
            render_job(str(spec), [], SlurmOptions(env=(f"{name}=x",)))
    assert "MIDTRAIN_HEAD_IFACE" not in slurm_module.SCRIPT_VARIABLES  # to pass with --env


def test_extra_sbatch_takes_other_options(spec: Path) -> None:
    extras = ("--mail-type=END", "--constraint=a100", "-Ca100", "--gres=nvme:1", "--ntasks=1", "-k")
    extras += ("--wait-all-nodes=1", "--export-file=/tmp/env")
    script = render_job(str(spec), [], SlurmOptions(extra_sbatch=extras)).script
    assert all(f"#SBATCH {extra}\n" in script for extra in extras)


def test_time_zero_means_no_limit_as_in_slurm(spec: Path) -> None:
    for value in ("0", "00:00:00", "0-0", "UNLIMITED", "INFINITE"):
        assert time_limit_seconds(value) is None, value
    assert (time_limit_seconds("5"), time_limit_seconds("1-00:00:30")) == (300, 86430)
    script = render_job(str(spec), [], SlurmOptions(time="0", signal_seconds=300)).script
    assert "#SBATCH --time=0\n" in script


def test_rendered_script_is_valid_bash_with_the_requested_options(spec: Path) -> None:
    options = SlurmOptions(
        nodes=2,
        gpus_per_node=1,
        partition="gpu,gpu-long",
        time="1-02:00:00",
        account="lab",
        signal_seconds=120,
        extra_sbatch=("--constraint=a100|h100", "--exclusive"),
        env=("NCCL_SOCKET_IFNAME=ib0", "WANDB_NOTES=it's a test"),
    )
    job = render_job(str(spec), ["train.seed=3"], options)
    script = job.script
    sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    for expected in (
        "--nodes=2",
        "--gpus-per-node=1",
        "--partition=gpu,gpu-long",
        "--time=1-02:00:00",
        "--account=lab",
        "--requeue",
        "--signal=B:USR1@120",
        "--constraint=a100|h100",
        "--exclusive",
    ):
        assert f"#SBATCH {expected}" in sbatch
    assert "export WANDB_NOTES='it'\"'\"'s a test'" in script
    assert f"\nSPEC={job.spec_path}\n" in script and "seed" not in script
    assert "{{" not in script
    checked = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert checked.returncode == 0, checked.stderr


def test_cli_render_exits_2_naming_the_field(spec: Path) -> None:
    done = midtrain("slurm", "render", str(spec), "--partition", "a\nb")
    assert done.returncode == 2
    assert "--partition" in done.stderr and "#SBATCH" not in done.stdout


def test_cli_commands_have_help() -> None:
    for args in (
        ["slurm", "render"],
        ["slurm", "submit"],
        ["jobs", "status"],
        ["jobs", "logs"],
        ["jobs", "stop"],
        ["train"],
    ):
        result = CliRunner().invoke(cli, [*args, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, args
    assert "--ray-address" in CliRunner().invoke(cli, ["train", "--help"]).output
    assert "slurm / jobs" in CliRunner().invoke(cli, ["--help"]).output


def test_cli_render_prints_the_script(spec: Path) -> None:
    result = CliRunner().invoke(
        cli, ["slurm", "render", str(spec), "--nodes", "2", "--extra-sbatch", "--exclusive"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith("#!/bin/bash") and "#SBATCH --nodes=2" in result.output


def test_jobs_need_a_ray_address_for_a_ray_job_id() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-m", "midtrain.cli", "jobs", "logs", "midtrain-x-1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "--ray-address" in done.stderr


def test_render_names_the_resolved_spec_and_writes_nothing(spec: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job = render_job(str(spec), [f"run_dir={run_dir}", "train.seed=11"], SlurmOptions())
    assert job.spec_path.parent == run_dir / "slurm" and job.spec_path.suffix == ".yaml"
    assert f"\nSPEC={job.spec_path}\n" in job.script
    assert not run_dir.exists()
    resolved = yaml.safe_load(job.spec_yaml)
    assert (resolved["run_dir"], resolved["train"]["seed"]) == (str(run_dir), 11)
    again = render_job(str(spec), [f"run_dir={run_dir}", "train.seed=11"], SlurmOptions())
    assert again.spec_path == job.spec_path  # named by content: render and submit agree


def stub_command(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


def test_submit_saves_the_resolved_spec_the_job_runs(
    spec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # sbatch only queues the script here: what the job will run is the script and the saved spec.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub_command(bin_dir / "sbatch", f'cp "$2" {tmp_path}/submitted\necho 4242\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    mine = tmp_path / "run.yaml"
    shutil.copy(spec, mine)
    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", "train.seed=11", "launch.ray_address=http://x:8265"]

    job_id, script = submit_job(str(mine), overrides, SlurmOptions())
    assert job_id == "4242" and (tmp_path / "submitted").read_text() == script.read_text()
    saved = Path(re.search(r"^SPEC=(\S+)$", script.read_text(), re.M).group(1))
    submitted = load_run_spec(saved)
    expected = load_run_spec(mine, [*overrides[:2], "launch.ray_address=null"])
    assert submitted == expected and saved.parent == run_dir / "slurm"

    # Editing the spec after submitting changes nothing for the job, queued or requeued.
    mine.write_text(mine.read_text().replace("seed:", "seed: 99 #"))
    assert load_run_spec(saved) == expected
    _, second = submit_job(str(mine), overrides, SlurmOptions())
    assert re.search(r"^SPEC=(\S+)$", second.read_text(), re.M).group(1) != str(saved)
    # Two submissions in the same second keep two scripts, and nothing half-written is left.
    _, third = submit_job(str(mine), overrides, SlurmOptions())
    assert len({script, second, third}) == 3 and all(p.is_file() for p in (script, second, third))
    assert {p.name for p in (run_dir / "slurm").iterdir() if p.name.startswith(".")} == set()


def sbatch_stub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub_command(bin_dir / "sbatch", body)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_a_failed_submission_leaves_no_files_of_its_own(
    spec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    sbatch_stub(tmp_path, monkeypatch, "echo 4242\n")
    _, kept = submit_job(str(spec), [f"run_dir={run_dir}"], SlurmOptions())
    before = sorted((run_dir / "slurm").iterdir())
    sbatch_stub(tmp_path, monkeypatch, "echo 'invalid partition specified: gpux' >&2; exit 1\n")
    with pytest.raises(MidtrainError, match="sbatch failed: invalid partition"):
        submit_job(str(spec), [f"run_dir={run_dir}"], SlurmOptions(partition="gpux"))
    # The spec the queued job of the first submission runs stays; nothing else was added.
    assert sorted((run_dir / "slurm").iterdir()) == before and kept in before
    with pytest.raises(MidtrainError, match="sbatch failed"):
        submit_job(str(spec), [f"run_dir={run_dir}", "train.seed=7"], SlurmOptions())
    assert sorted((run_dir / "slurm").iterdir()) == before


def test_a_slow_sbatch_says_the_job_may_be_queued(
    spec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sbatch_stub(tmp_path, monkeypatch, "exec sleep 30\n")
    monkeypatch.setattr(slurm_module, "SBATCH_TIMEOUT_S", 1)
    run_dir = tmp_path / "run"
    with pytest.raises(MidtrainError, match="may have been queued.*midtrain jobs status"):
        submit_job(str(spec), [f"run_dir={run_dir}"], SlurmOptions())
    assert not list((run_dir / "slurm").glob("*job-*"))
    assert len(list((run_dir / "slurm").glob("run-spec-*.yaml"))) == 1  # the job may run it


def test_render_checks_the_run_as_the_job_would_start_it(
    tmp_path: Path, prepared_corpora: dict[str, Path]
) -> None:
    # Missing data: found now, not after the queue and a Ray start-up.
    missing = tmp_path / "nowhere" / "legal"
    bad = run_spec(tmp_path, {**prepared_corpora, "legal": missing}, "bad")
    with pytest.raises(MidtrainError, match=re.escape(str(missing))):
        render_job(str(bad), [], SlurmOptions())

    # A run with a checkpoint is resumed (--auto-resume): a change that breaks exactness needs
    # --allow-changed-spec, at submission as in the job.
    good = run_spec(tmp_path, prepared_corpora, "good")
    job = render_job(str(good), [], SlurmOptions())
    step = job.run_dir / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    (step / MANIFEST).write_text("{}")
    (step / RUN_SPEC).write_text(job.spec_yaml)
    write_latest(step.parent, step.name)
    with pytest.raises(ConfigError, match="--allow-changed-spec"):
        render_job(str(good), ["train.seed=2"], SlurmOptions())


def test_allow_changed_spec_reaches_the_jobs_driver(spec: Path) -> None:
    plain = render_job(str(spec), [], SlurmOptions()).script
    assert 'train "$SPEC" --auto-resume)' in plain
    result = CliRunner().invoke(cli, ["slurm", "render", str(spec), "--allow-changed-spec"])
    assert result.exit_code == 0, result.output
    assert 'train "$SPEC" --auto-resume --allow-changed-spec)' in result.output


# --- the batch script, run with stub srun/scontrol and a stub driver: no Slurm, no Ray -----------

# The driver: like `midtrain train`, it starts with SIGUSR1 ignored (the script's `trap ''`) and
# only later installs its handler, which checkpoints and stops on SIGUSR1 or SIGTERM (exit 75, or
# the status given: a save that failed).
STUB_DRIVER = """
import signal, sys, time
time.sleep(float(sys.argv[1]))
stop = []
for sig in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(sig, lambda signum, _frame: stop.append(signal.Signals(signum).name))
print("[driver] listening", flush=True)
deadline = time.monotonic() + float(sys.argv[2])
while not stop and time.monotonic() < deadline:
    time.sleep(0.05)
print(f"[driver] stopped on {stop[0]}" if stop else "[driver] completed", flush=True)
sys.exit(int(sys.argv[3]) if stop else 0)
"""


class ScriptRun:
    """The rendered script running in bash; stubs record srun/scontrol calls in ``calls``."""

    def __init__(
        self,
        spec: Path,
        root: Path,
        job_id: int,
        *,
        healthy: bool = True,
        driver_start_s: float = 0,
        driver_run_s: float = 0,
        driver_stop_status: int = 75,
        token_s: float = 0,
        nodes: int = 1,
        env: dict[str, str] | None = None,
    ) -> None:
        root.mkdir(parents=True)
        self.root = root
        bin_dir = root / "bin"
        bin_dir.mkdir()
        # A Ray step runs until it is stopped; the clean-up step on the other nodes ends at once.
        stub_command(
            bin_dir / "srun",
            f'echo "srun $*" >> {root}/calls\ncase "$*" in *" rm -rf "*) exit 0;; esac\n'
            "exec sleep 60\n",
        )
        stub_command(
            bin_dir / "scontrol",
            f'if [ "$1" = show ]; then echo node1; else echo "scontrol $*" >> {root}/calls; fi\n',
        )
        (root / "driver.py").write_text(STUB_DRIVER)
        health = "exit 0" if healthy else "sleep 0.1; exit 1"  # the head starts, or never does
        python = stub_command(
            bin_dir / "python",
            f"""case "$*" in
  *health-check*) {health};;
  *"-m midtrain.cli train"*) echo "[driver] started: $*"
    exec {sys.executable} {root}/driver.py {driver_start_s} {driver_run_s} {driver_stop_status};;
  *secrets*) echo "token" >> {root}/calls; sleep {token_s}; exec {sys.executable} "$@";;
  *) exec {sys.executable} "$@";;
esac
""",
        )
        options = SlurmOptions(python=str(python), nodes=nodes)
        job = render_job(str(spec), [f"run_dir={root / 'run'}"], options)
        job.log_dir.mkdir(parents=True)
        job.spec_path.write_text(job.spec_yaml)  # what `submit_job` does
        (root / "job.sbatch").write_text(job.script)
        self.log = root / "out.log"
        env = {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "SLURM_JOB_ID": str(job_id),
            "SLURM_JOB_NODELIST": "node1",
            "SLURM_JOB_NUM_NODES": str(nodes),
            "MIDTRAIN_HEAD_IP": "127.0.0.1",
            **(env or {}),
        }
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                ["bash", str(root / "job.sbatch")],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: the cleanup ends every stub with it
            )

    def output(self) -> str:
        return self.log.read_text()

    def calls(self) -> str:
        path = self.root / "calls"
        return path.read_text() if path.exists() else ""

    def wait_for(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output() + self.calls():
            assert time.monotonic() < deadline, f"no {text!r} in:\n{self.output()}"
            time.sleep(0.05)

    def finish(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the script did not end:\n{self.output()}") from None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def script_runs() -> Iterator[list[ScriptRun]]:
    runs: list[ScriptRun] = []
    yield runs
    for run in runs:
        run.kill()


def test_a_stop_while_the_ray_head_starts_ends_the_job_without_requeue(
    spec: Path, tmp_path: Path, script_runs: list[ScriptRun]
) -> None:
    run = ScriptRun(spec, tmp_path / "job", 101, healthy=False)
    script_runs.append(run)
    run.wait_for("srun")  # the head is starting (and never answers)
    time.sleep(0.5)
    run.proc.send_signal(signal.SIGTERM)  # `midtrain jobs stop`: scancel --batch --signal=TERM
    assert run.finish() == 75, run.output()
    out = run.output()
    assert "stopped before the driver started" in out and "[driver]" not in out, out
    assert "scontrol requeue" not in run.calls()
    assert not list((tmp_path / "job" / "run" / "slurm").glob("ray-token-*"))  # Ray was stopped


def test_a_stop_while_the_driver_starts_up_reaches_it_once_it_listens(
    spec: Path, tmp_path: Path, script_runs: list[ScriptRun]
) -> None:
    run = ScriptRun(spec, tmp_path / "job", 102, driver_start_s=2, driver_run_s=60)
    script_runs.append(run)
    run.wait_for("[driver] started")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 75, run.output()
    out = run.output()
    assert "[driver] stopped on SIGUSR1" in out and "midtrain train exited 75" in out, out
    assert "scontrol requeue" not in run.calls()


def test_a_port_in_use_ends_the_job_before_ray_starts(
    spec: Path, tmp_path: Path, script_runs: list[ScriptRun]
) -> None:
    job_id = 4321
    port = 20000 + job_id % 3000 * 4 + 2  # its metrics port
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # an earlier run's TIME_WAIT
        taken.bind(("", port))
        taken.listen()
        run = ScriptRun(spec, tmp_path / "job", job_id)
        script_runs.append(run)
        assert run.finish() == 1, run.output()
    assert f"port {port} (of {port - 2}-{port + 1}, derived from the job id) is in use" in (
        run.output()
    )
    assert "srun" not in run.calls()  # nothing started
    # A port left in TIME_WAIT (by this job's own head, before a requeue) is not in use.
    with socket.socket() as server, socket.socket() as client:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen()
        client.connect(("127.0.0.1", port))
        conn, _ = server.accept()
        conn.close()  # the side that closes first keeps the port in TIME_WAIT
    again = ScriptRun(spec, tmp_path / "again", job_id)
    script_runs.append(again)
    assert again.finish() == 0, again.output()


def test_jobs_with_consecutive_ids_use_different_ports(
    spec: Path, tmp_path: Path, script_runs: list[ScriptRun]
) -> None:
    ids = [7, 8, 9, 2999, 3000, 3001, 67_043_327]  # 67043327: Slurm's largest job id
    for job_id in ids:
        script_runs.append(ScriptRun(spec, tmp_path / str(job_id), job_id))
    ports = {}
    for job_id, run in zip(ids, script_runs, strict=True):
        assert run.finish() == 0, run.output()
        head = run.calls()  # one srun: the head's `ray start` (the worker nodes' needs 2 nodes)
        assert head.count("srun ") == 1 and " --head " in head
        names = ("port", "dashboard-agent-listen-port", "metrics-export-port")
        names += ("ray-client-server-port",)  # Ray's default, 10001, is the same for every head
        ports[job_id] = {int(re.search(rf" --{n}=(\d+)", head).group(1)) for n in names}
        assert len(ports[job_id]) == 4 and all(20000 <= p < 32768 for p in ports[job_id])
        assert f"Ray head 127.0.0.1:{min(ports[job_id])}" in run.output()
    for a, b in itertools.pairwise(ids):
        assert not ports[a] & ports[b], (a, b, ports)


@pytest.mark.parametrize(("driver_status", "requeued"), [(75, True), (1, False)])
def test_after_sigusr1_only_a_checkpointed_stop_requeues(
    spec: Path, tmp_path: Path, script_runs: list[ScriptRun], driver_status: int, requeued: bool
) -> None:
    # A driver that fails (a save that raised: disk full) would fail again in every requeued run.
    run = ScriptRun(spec, tmp_path / "job", 103, driver_run_s=60, driver_stop_status=driver_status)
    script_runs.append(run)
    run.wait_for("[driver] listening")
    run.proc.send_signal(signal.SIGUSR1)
    assert run.finish() == driver_status, run.output()
    assert ("scontrol requeue 103" in run.calls()) == requeued, run.calls()


def test_a_signal_before_anything_started_is_handled(
    spec: Path, tmp_path: Path, script_runs: list[ScriptRun]
) -> None:
    # SIGUSR1 while the token is made (a cold Python start from a shared filesystem): the job
    # still stops its driver with a checkpoint and requeues.
    run = ScriptRun(spec, tmp_path / "job", 104, driver_run_s=60, token_s=2)
    script_runs.append(run)
    run.wait_for("token")
    run.proc.send_signal(signal.SIGUSR1)
    assert run.finish() == 75, run.output()
    assert "[driver] stopped on SIGUSR1" in run.output() and "scontrol requeue" in run.calls()


def test_ray_steps_keep_the_jobs_environment_and_every_node_cleans_up(
    spec: Path, tmp_path: Path, script_runs: list[ScriptRun]
) -> None:
    run = ScriptRun(spec, tmp_path / "job", 105, nodes=2)
    script_runs.append(run)
    assert run.finish() == 0, run.output()
    steps = [line for line in run.calls().splitlines() if line.startswith("srun ")]
    assert len(steps) == 3, steps  # the head, the other node, the clean-up there
    # sbatch --export=NONE (or SBATCH_EXPORT=NONE) reaches srun as SLURM_EXPORT_ENV=NONE.
    assert all(" --export=ALL " in step for step in steps), steps
    assert steps[2].endswith("--exclude=node1 rm -rf /tmp/ray-midtrain-105"), steps


def test_the_head_address_can_come_from_an_interface(
    spec: Path, tmp_path: Path, script_runs: list[ScriptRun]
) -> None:
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command here")
    # Looked up on the node the job runs on, also after a requeue onto another one.
    env = {"MIDTRAIN_HEAD_IFACE": "lo", "MIDTRAIN_HEAD_IP": "198.51.100.1"}
    run = ScriptRun(spec, tmp_path / "lo", 106, env=env)
    script_runs.append(run)
    assert run.finish() == 0, run.output()
    assert "Ray head 127.0.0.1:" in run.output()
    missing = ScriptRun(spec, tmp_path / "missing", 107, env={"MIDTRAIN_HEAD_IFACE": "nosuch0"})
    script_runs.append(missing)
    assert missing.finish() == 1
    assert "MIDTRAIN_HEAD_IFACE=nosuch0: no IPv4 address" in missing.output()
    assert "srun" not in missing.calls()


# --- real jobs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    # Not under pytest's tmp dir: munged runs as the munge user, who cannot enter that (0700).
    root = Path(tempfile.mkdtemp(prefix="midtrain-slurm-"))
    try:
        cluster = start_cluster(root)
    except SlurmUnavailable as exc:
        if os.environ.get("MIDTRAIN_REQUIRE_SLURM") == "1":
            pytest.fail(f"MIDTRAIN_REQUIRE_SLURM=1 but Slurm cannot run here: {exc}")
        pytest.skip(f"Slurm cannot run here: {exc}")
    saved = os.environ.get("SLURM_CONF")
    os.environ.update(cluster.env)
    yield cluster
    subprocess.run(["scancel", "--user", "root"], capture_output=True, timeout=30)
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)
    if saved is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = saved


def submit(spec: Path, *options: str) -> str:
    # Each job takes the whole (2-CPU) node: Slurm runs them one after another, as Ray start-up
    # beside a training run on 2 cores can time out.
    cpus = str(os.cpu_count() or 1)
    done = midtrain("slurm", "submit", str(spec), "--time", "10", "--cpus-per-node", cpus, *options)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip().splitlines()[-1]
    assert job_id.isdigit(), done.stdout
    return job_id


def in_queue(job_id: str) -> bool:
    out = subprocess.run(
        ["squeue", "--noheader", "--format=%T", "--jobs", job_id],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return bool(out.strip())


def job_field(job_id: str, key: str) -> str:
    out = subprocess.run(
        ["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True
    ).stdout
    match = re.search(rf"\b{key}=(\S*)", out)
    return match.group(1) if match else ""


def job_log(run_dir: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(run_dir.glob("slurm/*.out")))


def wait_until(check, what: str, slurm: SlurmCluster, run_dir: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out: {what}\n{job_log(run_dir)}\n{slurm.log_tail()}")


@pytest.fixture(scope="module")
def jobs(
    slurm: SlurmCluster, tmp_path_factory: pytest.TempPathFactory, prepared_corpora: dict
) -> Iterator[dict[str, tuple[str, Path]]]:
    """All the jobs, submitted at once (Slurm queues them): name -> (job id, run dir)."""
    tmp = tmp_path_factory.mktemp("slurm_runs")
    submitted = {}
    for name, extra, steps in (
        ("complete", (), STEPS),
        ("preempted", (), STEPS),
        # SIGUSR1 is due 55 s before a 2-minute limit (the least midtrain takes: Slurm may signal
        # up to 60 s early). slurmctld checks limits every 30 s and signals when the moment falls
        # before its next check: 35-65 s after the start, while this run (minutes long) goes on.
        ("timelimit", ("--time", "2", "--signal-seconds", "55"), TIMELIMIT_STEPS),
        ("stopped", (), STEPS),
    ):
        spec = run_spec(tmp, prepared_corpora, name, **{**LONG, "train__max_steps": steps})
        submitted[name] = (submit(spec, *extra), tmp / name)
        # The job runs the spec as submitted: an edit while it is queued (or requeued) is not
        # seen. Each test checks the submitted step count.
        run_spec(tmp, prepared_corpora, name, **{**LONG, "train__max_steps": 3})
    yield submitted
    # A job cancelled mid-run has no time to remove its Ray head's temp dir: do it for it.
    ids = [job_id for job_id, _ in submitted.values()]
    subprocess.run(["scancel", *ids], capture_output=True, timeout=30)
    deadline = time.monotonic() + 60
    while any(in_queue(job_id) for job_id in ids) and time.monotonic() < deadline:
        time.sleep(0.5)
    for job_id in ids:
        shutil.rmtree(f"/tmp/ray-midtrain-{job_id}", ignore_errors=True)


@pytest.mark.slow
@pytest.mark.slurm
def test_submitted_job_runs_to_the_end(
    jobs: dict, slurm: SlurmCluster, tmp_path: Path, prepared_corpora: dict[str, Path]
) -> None:
    job_id, run_dir = jobs["complete"]
    wait_until(lambda: not in_queue(job_id), "the job to end", slurm, run_dir, JOB_TIMEOUT)
    log = job_log(run_dir)
    status = read_status(run_dir)
    assert status is not None and (status["status"], status["step"]) == ("completed", STEPS), log
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, STEPS + 1))
    assert [i.step for i in list_checkpoints(run_dir)][-1] == STEPS
    assert job_field(job_id, "JobState") == "COMPLETED"
    assert job_field(job_id, "Restarts") == "0"
    assert "midtrain train exited 0" in log

    status = midtrain("jobs", "status", job_id)
    assert status.returncode == 0 and "COMPLETED" in status.stdout + status.stderr
    logs = midtrain("jobs", "logs", job_id)
    assert logs.returncode == 0 and "midtrain train exited 0" in logs.stdout
    # Without a job id: midtrain's jobs still in the queue, each with its run dir.
    queued_id, queued_dir = jobs["preempted"]
    listed = midtrain("jobs", "status")
    assert listed.returncode == 0, listed.stderr
    assert re.search(rf"^{queued_id}\t.*\t{re.escape(str(queued_dir))}$", listed.stdout, re.M)

    # Branching from its checkpoint: a submission checks the start's files by size, and leaves
    # hashing them to the job (not on a login node): a changed byte passes here, a cut file not.
    start = tmp_path / "start"
    shutil.copytree(list_checkpoints(run_dir)[-1].path, start)
    weights = max(start.rglob("*.safetensors"), key=lambda f: f.stat().st_size)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    branch = run_spec(tmp_path, prepared_corpora, "branch", init_from={"checkpoint": str(start)})
    assert f"checkpoint: {start}" in render_job(str(branch), [], SlurmOptions()).spec_yaml
    weights.write_bytes(bytes(data[:-1]))
    with pytest.raises(MidtrainError, match=re.escape(str(weights))):
        render_job(str(branch), [], SlurmOptions())


@pytest.mark.slow
@pytest.mark.slurm
def test_preempted_job_checkpoints_requeues_and_resumes_exactly(
    jobs: dict, slurm: SlurmCluster
) -> None:
    job_id, run_dir = jobs["preempted"]

    def past_step_20() -> bool:
        records = read_metrics(run_dir)
        return bool(records) and records[-1]["step"] >= 20

    wait_until(past_step_20, "step 20", slurm, run_dir, JOB_TIMEOUT)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=30)
    wait_until(lambda: not in_queue(job_id), "the requeued job to end", slurm, run_dir, JOB_TIMEOUT)

    log = job_log(run_dir)
    assert "requeueing job" in log and "midtrain train exited 75" in log, log
    assert "midtrain train exited 0" in log, log
    assert job_field(job_id, "Restarts") == "1"
    assert job_field(job_id, "JobState") == "COMPLETED"
    stopped_at = int(re.search(r"stopped at step (\d+)", log).group(1))
    assert 20 <= stopped_at < STEPS
    assert stopped_at in [i.step for i in list_checkpoints(run_dir)]

    complete_id, reference = jobs["complete"]
    wait_until(lambda: not in_queue(complete_id), "the reference job", slurm, reference, 60)
    assert exact_view(run_dir) == exact_view(reference)
    wa, wb = final_weights(run_dir), final_weights(reference)
    assert all(wa[name].equal(wb[name]) for name in wb)


@pytest.mark.slow
@pytest.mark.slurm
def test_job_over_its_time_limit_checkpoints_before_it_is_killed(
    jobs: dict, slurm: SlurmCluster
) -> None:
    job_id, run_dir = jobs["timelimit"]
    wait_until(
        lambda: "requeueing job" in job_log(run_dir), "the time-limit signal", slurm, run_dir, 150
    )
    subprocess.run(["scancel", job_id], check=True, timeout=30)
    log = job_log(run_dir)
    assert "SIGUSR1 (preemption or time limit)" in log and "midtrain train exited 75" in log, log
    # The first run's own words: it stopped with a checkpoint (the requeued one may run by now).
    stopped_at = int(re.search(r"stopped at step (\d+)", log).group(1))
    assert 1 <= stopped_at < TIMELIMIT_STEPS
    assert stopped_at in [i.step for i in list_checkpoints(run_dir)]


@pytest.mark.slow
@pytest.mark.slurm
def test_jobs_stop_checkpoints_and_ends_without_requeue(jobs: dict, slurm: SlurmCluster) -> None:
    job_id, run_dir = jobs["stopped"]

    def past_step_5() -> bool:
        records = read_metrics(run_dir)
        return bool(records) and records[-1]["step"] >= 5

    # Queued behind the other jobs: the whole-node jobs run one after another.
    wait_until(past_step_5, "step 5", slurm, run_dir, 2 * JOB_TIMEOUT)
    stop = midtrain("jobs", "stop", job_id)
    assert stop.returncode == 0 and "asked to checkpoint and stop" in stop.stderr, stop.stderr
    wait_until(lambda: not in_queue(job_id), "the stopped job to end", slurm, run_dir, JOB_TIMEOUT)

    log = job_log(run_dir)
    assert "SIGTERM: checkpoint and stop" in log and "midtrain train exited 75" in log, log
    assert "requeueing job" not in log and job_field(job_id, "Restarts") == "0"
    stopped_at = int(re.search(r"stopped at step (\d+)", log).group(1))
    assert 5 <= stopped_at < STEPS
    assert stopped_at in [i.step for i in list_checkpoints(run_dir)]
    status = read_status(run_dir)
    assert status is not None and (status["status"], status["step"]) == ("preempted", stopped_at)
