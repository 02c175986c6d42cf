"""Run a training job on Ray: an embedded local Ray by default, or an existing cluster's address.

The driver starts one Ray Train worker per data-parallel rank, shows progress from the run's
``metrics.jsonl``, turns SIGTERM/SIGUSR1 into a checkpoint-and-stop request, and returns an exit
status: 0 when the run completed, ``EXIT_PREEMPTED`` when it stopped early with a checkpoint saved
(a launcher requeues on it), 1 when it failed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import stat
import threading
import time
from pathlib import Path

from midtrain.console import console, make_progress, print_table, short_count, table
from midtrain.errors import ConfigError
from midtrain.fileio import FollowedFile, atomic_write_text
from midtrain.launch.start import PreparedRun
from midtrain.runtime_env import OFFLINE_ENV, verbose
from midtrain.training.checkpointing import events_path
from midtrain.training.control import PREEMPT_SIGNALS, clear_stop, read_status, request_stop
from midtrain.training.metrics import METRICS_FILE, read_metrics

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later", i.e. requeue and resume


# Signals that stop a run with a checkpoint when they reach the driver: a scheduler's or a
# launcher's (SIGTERM, SIGUSR1), a closed terminal (SIGHUP) and a first Ctrl-C (a second aborts).
STOP_SIGNALS = (*PREEMPT_SIGNALS, signal.SIGHUP, signal.SIGINT)


def init_ray(address: str | None, num_cpus: int) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict = {}
    if address is None:
        # Embedded Ray: a new local instance, never a cluster that `ray start` left on this
        # machine. Logical CPUs are what Ray schedules on; a laptop with 2 cores can still host 2
        # workers plus the trainer's controller.
        address, kwargs["num_cpus"] = "local", max(num_cpus, os.cpu_count() or 1)
    else:
        check_reachable(address)
    # Ray's processes inherit the signal mask they start with (its workers too, through the
    # raylet): with the stop signals blocked, a signal to the whole process group (Ctrl-C, a
    # closed terminal, `timeout`, systemd) reaches the driver only, which checkpoints and stops
    # the workers, instead of killing the embedded cluster under them. ``shutdown_ray`` still
    # stops them, with a SIGKILL.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=verbose(),
            logging_level=logging.INFO if verbose() else logging.ERROR,
            runtime_env={
                "env_vars": {
                    **OFFLINE_ENV,
                    "MIDTRAIN_VERBOSE": os.environ.get("MIDTRAIN_VERBOSE", ""),
                }
            },
            **kwargs,
        )
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def shutdown_ray() -> None:
    """``ray.shutdown()``, without its grace of 1 s for each of an embedded Ray's processes.

    They run with the stop signals blocked (see ``init_ray``), so the SIGTERM Ray sends each in
    turn stays pending until its SIGKILL a second later. While Ray shuts down, any of our
    descendants with a SIGTERM pending is sent that SIGKILL at once (Linux; elsewhere, or
    connected to a cluster, this is ``ray.shutdown()``).
    """
    import ray

    done = threading.Event()
    reaper = threading.Thread(target=_kill_when_terminated, args=(done,), daemon=True)
    reaper.start()
    try:
        ray.shutdown()
    finally:
        done.set()
        reaper.join()


def _kill_when_terminated(done: threading.Event, poll_s: float = 0.02) -> None:
    while not done.wait(poll_s):
        for pid in _descendants(os.getpid()):
            if _sigterm_pending(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            parents[int(stat_file.parent.name)] = int(
                stat_file.read_text().rpartition(")")[2].split()[1]
            )
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _sigterm_pending(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    bit = 1 << (signal.SIGTERM - 1)
    return any(
        int(line.split()[1], 16) & bit
        for line in status.splitlines()
        if line.startswith(("SigPnd:", "ShdPnd:"))
    )


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A ``HOST:PORT`` cluster address must accept a connection: Ray itself retries an unreachable
    one for minutes with a warning every 40 s and no error."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return  # "auto", ray://..., or not HOST:PORT: left to Ray
    host = host.removeprefix("[").removesuffix("]")  # [::1]:6379
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        hint = " (8265 is the Jobs API: give http://HOST:8265 to --ray-address)"
        raise ConfigError(
            f"Ray cluster at {address} (launch.ray_address or RAY_ADDRESS): cannot connect "
            f"({exc}){hint if port == '8265' else ''}"
        ) from None


def run_on_ray(prepared: PreparedRun) -> int:
    """Run to completion (or preemption) and return the process exit status."""
    spec = prepared.spec
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "run_spec.yaml", spec.to_yaml())
    clear_stop(run_dir)
    (run_dir / "control" / "status.json").unlink(missing_ok=True)

    use_gpu = spec.launch.use_gpu
    if use_gpu is None:
        import torch

        use_gpu = torch.cuda.is_available()
    init_ray(spec.launch.ray_address, spec.workers * spec.launch.cpus_per_worker + 1)
    try:
        return _train(prepared, use_gpu)
    finally:
        shutdown_ray()  # here, not at exit: quick, and before the caller's own output


def _train(prepared: PreparedRun, use_gpu: bool) -> int:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.config import LoggingConfig

    from midtrain.training.loop import worker_entry

    spec = prepared.spec
    run_dir = Path(spec.run_dir)
    trainer = TorchTrainer(
        worker_entry,
        train_loop_config={
            "spec_yaml": spec.to_yaml(),
            "spec_path": str(run_dir / "run_spec.yaml"),
        },
        scaling_config=ScalingConfig(
            num_workers=spec.workers,
            use_gpu=use_gpu,
            resources_per_worker={
                "CPU": spec.launch.cpus_per_worker,
                **({"GPU": 1} if use_gpu else {}),
            },
        ),
        run_config=RunConfig(
            name="train",
            storage_path=str(run_dir / "ray"),
            failure_config=FailureConfig(max_failures=spec.launch.max_failures),
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "ERROR"),
        ),
    )

    # fit() runs in a thread: the main thread must stay free to handle SIGTERM/SIGUSR1 promptly
    # (a signal handler only runs when the main thread is executing Python code).
    outcome: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except Exception as exc:  # Ray wraps worker errors; the cause is what the user needs
            outcome["error"] = exc

    interrupts = 0

    def stop(signum: int, _frame: object) -> None:
        nonlocal interrupts
        if signum == signal.SIGINT:
            interrupts += 1
            if interrupts > 1:
                raise KeyboardInterrupt
            # Printed for Ctrl-C only: after a hang-up the terminal is gone.
            console.print(
                "stopping at the next step with a checkpoint (Ctrl-C again to abort without one)"
            )
        elif signum == signal.SIGHUP:
            _detach_from_terminal()
        request_stop(run_dir, signal.Signals(signum).name)

    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)
    started = time.time()
    fitting = threading.Thread(target=fit, name="midtrain-fit", daemon=True)
    try:
        fitting.start()
        _show_progress(prepared, fitting)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    error = outcome.get("error")

    status = read_status(run_dir)
    if error is not None or status is None:
        console.print(f"[red]training failed[/red]: {_root_cause(error)}")
        return 1
    _summary(prepared, status, time.time() - started)
    if status["status"] == "preempted":
        console.print(
            f"stopped at step {status['step']} with a checkpoint saved; "
            f"resume with `midtrain train --resume {run_dir}`"
        )
        return EXIT_PREEMPTED
    return 0


def _detach_from_terminal() -> None:
    """After a hang-up, writing to the terminal fails (EIO) and would end the driver before the
    workers' checkpoint: what still goes to it goes nowhere, as under nohup."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        # A terminal is a character device (isatty fails once it is hung up); a log file or a
        # pipe keeps its output.
        with contextlib.suppress(OSError):
            if stat.S_ISCHR(os.fstat(fd).st_mode):
                os.dup2(devnull, fd)
    os.close(devnull)


def _root_cause(error: BaseException | None) -> str:
    if error is None:
        return "the workers ended without writing a status"
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


def _show_progress(prepared: PreparedRun, fitting: threading.Thread) -> None:
    """Follow the run's metrics and events files: a live bar on a terminal, else a line per 10%."""
    spec = prepared.spec
    total = spec.train.max_steps
    every = max(1, total // 10)
    events = FollowedFile(events_path(spec.run_dir), skip_existing=True)
    metrics = FollowedFile(Path(spec.run_dir) / METRICS_FILE)
    shown = 0
    with make_progress() as progress:
        task = progress.add_task("training", total=total, extra="")
        while fitting.is_alive():
            fitting.join(0.5)
            for line in events.new_lines():
                console.print(line)
            lines = metrics.new_lines()
            if not lines:
                continue
            try:
                last = json.loads(lines[-1])
            except json.JSONDecodeError:
                continue  # only a crash leaves a bad line; the summary reads the file properly
            extra = progress_line(last)
            progress.update(task, completed=last["step"], extra=extra)
            if progress.disable and last["step"] >= shown + every:
                shown = last["step"]
                console.print(f"step {last['step']}/{total}  {extra}")


def progress_line(record: dict) -> str:
    """One metrics record as a short line: loss and tokens so far (and per source), lr, grad norm,
    tokens/s, MFU."""
    parts = [f"loss {record['loss']:.4f}", f"{short_count(record['tokens'])} tok"]
    by_source = record.get("loss_by_source") or {}
    tokens_by_source = record.get("tokens_by_source") or {}
    if len(by_source) > 1:
        parts.append(
            " ".join(
                f"{name} {loss:.3f} ({short_count(tokens_by_source.get(name, 0))} tok)"
                for name, loss in by_source.items()
            )
        )
    parts.append(f"lr {record['lr']:.2e}")
    if record.get("grad_norm") is not None:
        parts.append(f"gnorm {record['grad_norm']:.2f}")
    parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    if record.get("mfu") is not None:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    return "  ".join(parts)


def _time_shares(timing: dict[str, float] | None) -> list[tuple[str, str]]:
    """Data loading as a share of step time, checkpoint blocking as a share of the training loop
    (rank 0, this session of the run)."""
    if not timing or not timing.get("steps_s") or not timing.get("run_s"):
        return []
    return [
        ("data loading", f"{100 * timing['data_s'] / timing['steps_s']:.2f}% of step time"),
        ("checkpoint saves", f"{100 * timing['checkpoint_s'] / timing['run_s']:.2f}% of the run"),
    ]


def _summary(prepared: PreparedRun, status: dict, seconds: float) -> None:
    records = read_metrics(prepared.spec.run_dir)
    if not records:
        return
    last = records[-1]
    rows = [
        ("status", status["status"]),
        ("steps", f"{last['step']}/{prepared.spec.train.max_steps}"),
        ("tokens", last["tokens"]),
        ("final loss", last["loss"]),
        *((f"loss · {k}", v) for k, v in last["loss_by_source"].items()),
        *((f"tokens · {k}", v) for k, v in last["tokens_by_source"].items()),
        ("wall time (s)", round(seconds, 1)),
        *_time_shares(status.get("timing")),
        ("run dir", prepared.spec.run_dir),
    ]
    print_table(table("run summary", ["", "value"], rows))
