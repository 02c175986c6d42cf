"""Slurm: render the Ray-on-Slurm batch script for a run spec, and submit it with ``sbatch``.

Every value that reaches the script is validated first and rejected with the field's name. Quoting
is not enough on its own: a newline in a value would start a new ``#SBATCH`` line or command,
and ``#SBATCH`` lines are parsed by sbatch, not by a shell. So each field has an allow-list of
characters (Slurm names, times, options), control characters are refused everywhere, and values
that go into shell code are also quoted.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from midtrain.errors import ConfigError, MidtrainError

TEMPLATE_NAME = "midtrain.sbatch"
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
SLURM_NAME = re.compile(r"[A-Za-z0-9_.+-]+")  # partition, account, job name
SLURM_NAMES = re.compile(r"[A-Za-z0-9_.+-]+(,[A-Za-z0-9_.+-]+)*")  # a partition list
# M, M:S, H:M:S, D-H, D-H:M, D-H:M:S, or no limit
SLURM_TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}|UNLIMITED|INFINITE")
# An sbatch option: --name or --name=value; values may hold constraint expressions (a100|h100)
# and lists, but no quotes, spaces, `$`, backticks, `;`, `<`, `>` or backslashes.
SBATCH_OPTION = re.compile(r"--?[A-Za-z][A-Za-z0-9-]*(=[A-Za-z0-9_.,:=/@%+*&|!()\[\]-]+)?")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Paths on an #SBATCH line (the job's log) cannot be quoted there; `%` is sbatch's pattern sign.
SBATCH_PATH = re.compile(r"[A-Za-z0-9_./+@:,=-]+")
# Options midtrain sets itself (a second value from --extra-sbatch would silently win or clash),
# with the midtrain option that sets each, if there is one.
OWN_OPTIONS: dict[str, str | None] = {
    "nodes": "--nodes",
    "ntasks-per-node": None,
    "gpus-per-node": "--gpus-per-node",
    "requeue": None,
    "no-requeue": None,
    "signal": "--signal-seconds",
    "output": None,
    "error": None,
    "open-mode": None,
    "job-name": "--job-name",
    "partition": "--partition",
    "time": "--time",
    "account": "--account",
    "cpus-per-task": "--cpus-per-node",
    "comment": None,
}
# Options that would break the job, with what to use instead: GPUs Ray is not told about (it is
# told --gpus-per-node), a job that is not one run, an sbatch that does not return a job id, an
# environment the job's steps do not get. `--gres` only when it names gpu.
REFUSED_OPTIONS: dict[str, str] = {
    "gres": "use --gpus-per-node",
    "gpus": "use --gpus-per-node",
    "gpus-per-task": "use --gpus-per-node",
    "gpus-per-socket": "use --gpus-per-node",
    "array": "submit each run as a job of its own",
    "wait": "follow the job with `midtrain jobs logs JOB --follow`",
    "test-only": "`midtrain slurm render` prints the script without submitting it",
    "export": "the job needs your environment; pass variables with --env",
}
# sbatch's short forms of those (`sbatch --help`): `-t5` is `--time=5`.
SHORT_OPTIONS = {
    "N": "nodes",
    "o": "output",
    "e": "error",
    "J": "job-name",
    "p": "partition",
    "t": "time",
    "A": "account",
    "c": "cpus-per-task",
    "G": "gpus",
    "a": "array",
    "W": "wait",
}
# sbatch's short options that take no value: getopt reads `-HN4` as `-H -N4`.
SHORT_FLAGS = set("HOQsvWhV")
# sbatch takes any unambiguous prefix of a long option (`--part` is --partition), but an exact
# name wins: this real option is a prefix of midtrain's own and is not it.
NOT_OWN_PREFIXES = {"ntasks"}
# --env cannot set what the script sets itself, nor what changes how bash or Ray reads it.
SCRIPT_VARIABLES = {
    "PYTHON", "RUN_DIR", "SPEC", "RAY_CPUS", "RAY_GPUS", "EXIT_PREEMPTED", "PYTHONUNBUFFERED",
    "MIDTRAIN_NO_PROGRESS", "RAY_USAGE_STATS_ENABLED", "RAY_CLI", "TOKEN_FILE", "RAY_TMP", "PORT",
    "HEAD_NODE", "HEAD_IP", "PREEMPTED", "STOPPING", "DRIVER", "HEAD", "WORKERS",
    "IFS", "BASH_ENV", "SHELLOPTS", "RAY_ADDRESS",
}  # fmt: skip
SCRIPT_VARIABLE_PREFIXES = ("RAY_AUTH_",)
MAX_SIGNAL_SECONDS = 65535  # sbatch --signal: 0-65535
SIGNAL_EARLY_SECONDS = 60  # "the signal may be sent up to 60 seconds earlier than specified"
SBATCH_TIMEOUT_S = 60
# `midtrain jobs status` lists the Slurm jobs whose comment starts with this.
COMMENT_PREFIX = "midtrain:"


@dataclass(frozen=True)
class SlurmOptions:
    """What the user chose for the job; everything else comes from the run spec."""

    nodes: int = 1
    gpus_per_node: int = 0
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    job_name: str | None = None
    cpus_per_node: int | None = None  # Slurm (and Ray) CPUs per node; default: what workers need
    signal_seconds: int = 300  # SIGUSR1 this long before the time limit: time to checkpoint
    allow_changed_spec: bool = False  # resume despite spec changes that break exactness
    extra_sbatch: tuple[str, ...] = ()
    env: tuple[str, ...] = ()  # KEY=VALUE exported in the job (NCCL_*, HF_HOME, ...)
    python: str = field(default_factory=lambda: sys.executable)


@dataclass(frozen=True)
class RenderedJob:
    script: str
    run_dir: Path
    log_dir: Path
    spec_yaml: str  # the resolved spec the job runs; `submit_job` writes it to `spec_path`
    spec_path: Path


def check_text(fieldname: str, value: str, pattern: re.Pattern[str] | None = None) -> str:
    """Reject control characters anywhere, and anything outside ``pattern`` when given."""
    bad = CONTROL_CHARS.search(value)
    if bad:
        raise ConfigError(
            f"{fieldname}: control character {bad.group()!r} is not allowed (value {value!r})"
        )
    if pattern is not None and not pattern.fullmatch(value):
        raise ConfigError(f"{fieldname}: {value!r} has characters that are not allowed here")
    return value


def _own_option(option: str) -> str | None:
    """The option of midtrain's own, or refused one, that sbatch reads ``option`` (``-t5``,
    ``--part=x``) as."""
    if not option.startswith("--"):
        for letter in option[1:]:
            if letter in SHORT_OPTIONS:
                return SHORT_OPTIONS[letter]
            if letter not in SHORT_FLAGS:  # takes a value: the rest of the word is that value
                return None
        return None
    name = option[2:].split("=", 1)[0]
    if name in OWN_OPTIONS or name in REFUSED_OPTIONS:
        return name
    if name in NOT_OWN_PREFIXES:
        return None
    return next((own for own in [*OWN_OPTIONS, *REFUSED_OPTIONS] if own.startswith(name)), None)


def _check_option(value: str) -> str:
    check_text("--extra-sbatch", value, SBATCH_OPTION)
    own = _own_option(value)
    if own in REFUSED_OPTIONS:
        if own != "gres" or re.search(r"(^|,)(gres/)?gpu\b", value.partition("=")[2]):
            raise ConfigError(
                f"--extra-sbatch: {value} (--{own}) would break the job: {REFUSED_OPTIONS[own]}"
            )
    elif own is not None:
        instead = OWN_OPTIONS[own]
        hint = f"use midtrain's {instead}" if instead else "midtrain needs its own value"
        raise ConfigError(
            f"--extra-sbatch: {value} sets --{own}, which midtrain sets itself ({hint})"
        )
    return value


def _check_env(value: str) -> tuple[str, str]:
    check_text("--env", value)
    name, sep, val = value.partition("=")
    if not sep or not ENV_NAME.fullmatch(name):
        raise ConfigError(f"--env: expected KEY=VALUE with a shell variable name, got {value!r}")
    if name in SCRIPT_VARIABLES or name.startswith(SCRIPT_VARIABLE_PREFIXES):
        raise ConfigError(f"--env: {name} is set by the batch script itself; it cannot be changed")
    return name, val


def check_numbers(o: SlurmOptions) -> SlurmOptions:
    if o.nodes < 1:
        raise ConfigError(f"--nodes: must be at least 1, got {o.nodes}")
    if o.gpus_per_node < 0:
        raise ConfigError(f"--gpus-per-node: must be 0 or more, got {o.gpus_per_node}")
    if o.cpus_per_node is not None and o.cpus_per_node < 1:
        raise ConfigError(f"--cpus-per-node: must be at least 1, got {o.cpus_per_node}")
    if not 10 <= o.signal_seconds <= MAX_SIGNAL_SECONDS:
        raise ConfigError(
            f"--signal-seconds: must be 10 to {MAX_SIGNAL_SECONDS}, got {o.signal_seconds}"
        )
    limit = time_limit_seconds(o.time) if o.time is not None else None
    if limit is not None and o.signal_seconds + SIGNAL_EARLY_SECONDS >= limit:
        # The signal (sent up to 60 s early) could come at the start of every run: checkpoint,
        # requeue, forever.
        raise ConfigError(
            f"--signal-seconds: {o.signal_seconds} s + {SIGNAL_EARLY_SECONDS} s (Slurm may signal "
            f"that much early) must be less than --time {o.time} ({limit} s)"
        )
    return o


def time_limit_seconds(value: str) -> int | None:
    """A Slurm time limit in seconds (None: no limit, as Slurm reads UNLIMITED, INFINITE and 0);
    raises naming --time if malformed."""
    check_text("--time", value, SLURM_TIME)
    if value in ("UNLIMITED", "INFINITE"):
        return None
    days, _, rest = value.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-H, D-H:M, D-H:M:S
        h, m, sec = (parts + [0, 0])[:3]
    elif len(parts) == 3:  # H:M:S
        h, m, sec = parts
    else:  # M, M:S
        h, m, sec = 0, parts[0], parts[1] if len(parts) == 2 else 0
    seconds = ((int(days or 0) * 24 + h) * 60 + m) * 60 + sec
    return seconds or None  # sbatch: "a time limit of zero requests that no time limit be imposed"


def sbatch_lines(options: SlurmOptions, job_name: str, log_dir: Path, cpus: int) -> list[str]:
    o = check_numbers(options)
    check_text("--job-name", job_name, SLURM_NAME)
    check_text("run_dir (the job's log directory)", str(log_dir), SBATCH_PATH)
    lines = [
        f"--job-name={job_name}",
        f"--nodes={o.nodes}",
        "--ntasks-per-node=1",
        "--requeue",
        f"--signal=B:USR1@{o.signal_seconds}",
        f"--output={log_dir}/slurm-%j.out",
        "--open-mode=append",  # a requeued job appends to the same log
        f"--comment={COMMENT_PREFIX}{log_dir.parent}",  # its run dir, for `midtrain jobs status`
        # The CPUs Ray is told each node has: without it Slurm gives the one task one CPU.
        f"--cpus-per-task={cpus}",
    ]
    if o.gpus_per_node:
        lines.append(f"--gpus-per-node={o.gpus_per_node}")
    if o.partition is not None:
        lines.append(f"--partition={check_text('--partition', o.partition, SLURM_NAMES)}")
    if o.time is not None:
        lines.append(f"--time={check_text('--time', o.time, SLURM_TIME)}")
    if o.account is not None:
        lines.append(f"--account={check_text('--account', o.account, SLURM_NAME)}")
    lines.extend(_check_option(extra) for extra in o.extra_sbatch)
    return ["#SBATCH " + line for line in lines]


def template_path() -> Path:
    from midtrain.fileio import project_path

    path = project_path("slurm", TEMPLATE_NAME)
    if path is None:
        raise MidtrainError(f"the sbatch template {TEMPLATE_NAME} was not found next to midtrain")
    return path


def fill_template(template: str, values: dict[str, str], source: str) -> str:
    """Replace every ``{{NAME}}`` in one pass: a value that holds ``{{NAME}}`` stays as it is
    (a second pass would expand it, outside the value's quotes)."""

    def value(match: re.Match[str]) -> str:
        if match.group(1) not in values:  # a template edited without the renderer
            raise MidtrainError(f"{source}: unknown placeholder {match.group()}")
        return values[match.group(1)]

    return re.sub(r"\{\{([A-Z_]+)\}\}", value, template)


def render_job(spec_path: str, overrides: list[str], options: SlurmOptions) -> RenderedJob:
    """The batch script for this run spec (+ overrides), after validating every value in it and
    checking the run as the job's `midtrain train --auto-resume` will (data, start point, changes
    to a run being resumed), so that a bad spec fails now rather than after the queue.

    The job runs the resolved spec (overrides applied, absolute paths), saved by `submit_job` as
    RUN_DIR/slurm/run-spec-HASH.yaml: editing the spec file later changes nothing for the job,
    queued or requeued. Rendering writes nothing.
    """
    from midtrain.launch.ray_cluster import resolved_spec
    from midtrain.launch.start import prepare_run

    check_numbers(options)
    for value in overrides:
        check_text("override", value)
    check_text("run spec path", spec_path)
    check_text("--python", options.python)
    exports = [f"export {name}={shlex.quote(val)}" for name, val in map(_check_env, options.env)]
    spec = resolved_spec(spec_path, list(overrides))
    run_dir = Path(spec.run_dir)
    check_text("run_dir", str(run_dir))
    if spec.launch.use_gpu and not options.gpus_per_node:
        raise ConfigError("launch.use_gpu: true, but the job asks for no GPUs: --gpus-per-node")
    gpus_total = options.nodes * options.gpus_per_node
    if options.gpus_per_node and spec.workers > gpus_total:
        raise ConfigError(
            f"workers: {spec.workers} data-parallel workers need a GPU each, but the job has "
            f"{options.nodes} node(s) x {options.gpus_per_node} GPU(s) = {gpus_total}"
        )
    workers_per_node = -(-spec.workers // options.nodes)
    needed = workers_per_node * spec.launch.cpus_per_worker  # Ray Train's controller takes none
    if options.cpus_per_node is not None and options.cpus_per_node < needed:
        raise ConfigError(
            f"--cpus-per-node: {options.cpus_per_node} is too few: {workers_per_node} worker(s) "
            f"per node x launch.cpus_per_worker {spec.launch.cpus_per_worker} need {needed}"
        )
    ray_cpus = options.cpus_per_node or needed + 1  # + 1 spare, as the local launcher gives Ray
    # What the job's driver runs first; the job names no Ray cluster (see resolved_spec). It
    # hashes the start checkpoint's files; here, on a login node, their sizes are checked.
    job_overrides = [*overrides, "launch.ray_address=null"]
    prepare_run(
        spec_path,
        job_overrides,
        None,
        options.allow_changed_spec,
        auto_resume=True,
        verify_start=False,
    )

    log_dir = run_dir / "slurm"
    job_name = options.job_name or f"midtrain-{run_dir.name}"
    if options.job_name is None:  # derived from the run dir: keep only what Slurm accepts
        job_name = re.sub(r"[^A-Za-z0-9_.+-]", "_", job_name)
    header = sbatch_lines(options, job_name, log_dir, ray_cpus)

    # The driver joins the job's own Ray head ($RAY_ADDRESS, set by the script): the resolved
    # spec names no cluster. Named by its content, so render and submit agree on the path.
    spec_yaml = spec.to_yaml()
    digest = hashlib.sha256(spec_yaml.encode("utf-8")).hexdigest()[:12]
    staged_spec = log_dir / f"run-spec-{digest}.yaml"
    values = {
        "SBATCH": "\n".join(header),
        "PYTHON": shlex.quote(options.python),
        "RUN_DIR": shlex.quote(str(run_dir)),
        "SPEC": shlex.quote(str(staged_spec)),
        "RAY_CPUS": str(ray_cpus),
        "RAY_GPUS": str(options.gpus_per_node),
        "EXPORTS": "\n".join(exports),
        "TRAIN_OPTIONS": "--auto-resume"
        + (" --allow-changed-spec" if options.allow_changed_spec else ""),
    }
    template = template_path()
    script = fill_template(template.read_text(encoding="utf-8"), values, str(template))
    return RenderedJob(script, run_dir, log_dir, spec_yaml, staged_spec)


def sbatch_command() -> str:
    path = shutil.which("sbatch")
    if path is None:
        raise MidtrainError("sbatch was not found: run this on a Slurm login node")
    return path


def submit_job(spec_path: str, overrides: list[str], options: SlurmOptions) -> tuple[str, Path]:
    """Render, save the script and the resolved spec under RUN_DIR/slurm/, submit the script;
    returns (job id, script path). A failed submission leaves no files of its own behind."""
    from midtrain.fileio import atomic_write_text

    job = render_job(spec_path, overrides, options)
    sbatch = sbatch_command()
    job.log_dir.mkdir(parents=True, exist_ok=True)  # sbatch does not create the log's directory
    # A queued job of an earlier submission may run the same spec file: keep one that was there.
    spec_is_new = not job.spec_path.exists()
    # Atomic: a queued job of an earlier submission may be about to read the same file.
    atomic_write_text(job.spec_path, job.spec_yaml)
    # Unique (two submissions in one second), and a job-*.sbatch only once it was submitted.
    name = f"job-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(2)}.sbatch"
    script = job.log_dir / name
    pending = job.log_dir / f".{name}.pending"
    atomic_write_text(pending, job.script)
    try:
        done = subprocess.run(
            [sbatch, "--parsable", str(pending)],
            capture_output=True,
            text=True,
            timeout=SBATCH_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        pending.unlink(missing_ok=True)  # sbatch has sent or not sent it; the spec stays
        raise MidtrainError(
            f"sbatch did not answer in {SBATCH_TIMEOUT_S} s: the job may have been queued all "
            f"the same; check with `midtrain jobs status` (or `squeue --me`) before submitting "
            f"again"
        ) from None
    if done.returncode != 0:
        pending.unlink(missing_ok=True)
        if spec_is_new:
            job.spec_path.unlink(missing_ok=True)
        raise MidtrainError(f"sbatch failed: {done.stderr.strip() or done.stdout.strip()}")
    os.replace(pending, script)
    job_id = done.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
    return job_id, script
