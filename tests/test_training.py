"""The trainer end to end: real Ray (a local cluster shared by these tests), 2 DeepSpeed workers on
gloo, a tiny Llama, real prepared data. Runs go through the ``midtrain train`` command line.

Exactness is bit for bit: every per-step metric of an interrupted-and-resumed run equals the
uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pty
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import load_file

from midtrain.checkpoints import latest_checkpoint, list_checkpoints, load_checkpoint
from midtrain.data_mixing.mixture import MixtureConfig
from midtrain.data_mixing.plan import plan_mixture
from midtrain.training.metrics import read_metrics
from midtrain.training.schedule import ScheduleConfig

pytestmark = pytest.mark.slow

STEPS = 24
INTERVAL = 4
EXACT_KEYS = ("step", "loss", "loss_by_source", "tokens", "tokens_by_source", "lr", "grad_norm")


@pytest.fixture(scope="module")
def ray_address() -> Any:
    """One local Ray cluster for every run in this module (Ray's start-up dominates a tiny run)."""
    import ray

    from midtrain.launch.local import init_ray, shutdown_ray

    init_ray(None, num_cpus=4)
    yield ray.get_runtime_context().gcs_address
    shutdown_ray()


def run_spec(tmp: Path, corpora: dict[str, Path], name: str, **changes: Any) -> Path:
    spec: dict[str, Any] = {
        "run_dir": str(tmp / name),
        "model": {
            "tokenizer": str(corpora["tokenizer"]),
            "config": {
                "hidden_size": 64,
                "num_layers": 2,
                "num_heads": 4,
                "num_kv_heads": 2,
                "ffn_hidden_size": 176,
            },
        },
        "mixture": {
            "seq_length": 32,
            "seed": 5,
            "sources": [
                {
                    "name": "legal",
                    "kind": "customer",
                    "path": [str(corpora["legal"])],
                    "weight": 0.6,
                },
                {
                    "name": "general",
                    "kind": "curated",
                    "path": [str(corpora["general"])],
                    "weight": 0.4,
                },
            ],
        },
        "optimizer": {"lr": 3e-3, "weight_decay": 0.1},
        "schedule": {"kind": "wsd", "warmup_steps": 4, "decay_fraction": 0.25},
        "train": {"global_batch_size": 8, "micro_batch_size": 2, "max_steps": STEPS, "seed": 1},
        "checkpoint": {"interval": INTERVAL, "keep_last": 20},
        "workers": 2,
    }
    for key, value in changes.items():
        node = spec
        *parents, leaf = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def midtrain(ray_address: str | None, *args: str, **popen: Any) -> subprocess.Popen:
    env = {**os.environ, "MIDTRAIN_NO_PROGRESS": "1"}
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return subprocess.Popen(
        [sys.executable, "-m", "midtrain.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **popen,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def run_ok(ray_address: str | None, *args: str) -> str:
    rc, out = finish(midtrain(ray_address, *args))
    assert rc == 0, out
    return out


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        records = read_metrics(run_dir)
        if records and records[-1]["step"] >= step:
            return
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    raise AssertionError(f"{run_dir} did not reach step {step}")


def wait_for_checkpoint(
    run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120
) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        latest = latest_checkpoint(run_dir)
        if latest is not None and int(latest.name.removeprefix("step_")) >= step:
            return
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.02)
    raise AssertionError(f"{run_dir}: no checkpoint of step {step} or later was committed")


def exact_view(run_dir: Path) -> list[dict[str, Any]]:
    return [{k: r[k] for k in EXACT_KEYS} for r in read_metrics(run_dir)]


def final_weights(run_dir: Path) -> dict[str, Any]:
    ckpt = load_checkpoint(run_dir)
    return load_file(str(ckpt.path / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wa[name].equal(wb[name]), name


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory, prepared_corpora: dict[str, Path], ray_address: str
) -> Path:
    """The uninterrupted 2-worker run every other run is compared with."""
    tmp = tmp_path_factory.mktemp("reference")
    spec = run_spec(tmp, prepared_corpora, "ref")
    out = run_ok(ray_address, "train", str(spec))
    assert "completed" in out
    # The summary says what share of the time data loading and checkpoint saves took.
    assert "% of step time" in out and "% of the run" in out
    return tmp / "ref"


def test_reference_run_logs_every_step_and_checkpoints(reference: Path) -> None:
    records = read_metrics(reference)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        assert set(r["loss_by_source"]) == {"legal", "general"}
        assert r["tokens"] == r["step"] * 8 * 32
        assert sum(r["tokens_by_source"].values()) == r["tokens"]
        assert r["grad_norm"] > 0 and r["tokens_per_s"] > 0
        assert "data_time_s" in r  # drawing the batch, timed inside the step
    assert records[-1]["loss"] < records[0]["loss"] - 0.5  # it learns
    timing = json.loads((reference / "control" / "status.json").read_text())["timing"]
    # Parts of a whole: checkpoints and steps inside the loop's time, batches inside the steps.
    assert 0 < timing["data_s"] <= timing["steps_s"]
    assert (
        timing["checkpoint_s"] > 0 and timing["steps_s"] + timing["checkpoint_s"] <= timing["run_s"]
    )
    infos = list_checkpoints(reference)
    assert [i.step for i in infos] == list(range(INTERVAL, STEPS + 1, INTERVAL))
    assert all(i.complete for i in infos)
    phases = {i.step: i.phase for i in infos}
    assert (phases[4], phases[8], phases[STEPS]) == ("warmup", "stable", "decay")


def test_per_source_losses_differ(reference: Path) -> None:
    last = read_metrics(reference)[-1]["loss_by_source"]
    # License text and Python docstrings are very different: the model fits them differently.
    assert abs(last["legal"] - last["general"]) > 0.05


def test_sigkill_then_resume_is_bit_exact(
    tmp_path: Path, prepared_corpora: dict[str, Path], ray_address: str, reference: Path
) -> None:
    spec = run_spec(tmp_path, prepared_corpora, "killed")
    run_dir = tmp_path / "killed"
    proc = midtrain(ray_address, "train", str(spec))
    # Past the step-8 checkpoint, and that checkpoint committed (saves are asynchronous: on a busy
    # machine the write may still be going on a step later; the step-12 save waits for it).
    wait_for_step(run_dir, INTERVAL * 2 + 1, proc)
    wait_for_checkpoint(run_dir, INTERVAL * 2, proc)
    # The whole machine goes down at once: the driver and the training workers (Ray actors,
    # outside the driver's process group) are killed together, nothing gets to clean up.
    workers = [int(p.read_text()) for p in (run_dir / "control").glob("worker-*.pid")]
    assert len(workers) == 2
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    killed_at = read_metrics(run_dir)[-1]["step"]
    assert killed_at < STEPS
    resumed_from = load_checkpoint(run_dir).step
    assert INTERVAL * 2 <= resumed_from <= killed_at

    out = run_ok(ray_address, "train", "--resume", str(run_dir))
    assert "completed" in out
    assert exact_view(run_dir) == exact_view(reference)
    assert_same_weights(run_dir, reference)


def test_preemption_signal_checkpoints_and_exits_for_requeue(
    tmp_path: Path, prepared_corpora: dict[str, Path], ray_address: str, reference: Path
) -> None:
    spec = run_spec(tmp_path, prepared_corpora, "preempted")
    run_dir = tmp_path / "preempted"
    proc = midtrain(ray_address, "train", str(spec))
    wait_for_step(run_dir, 6, proc)
    os.kill(proc.pid, signal.SIGUSR1)
    rc, out = finish(proc)
    assert rc == 75, out
    stopped = json.loads((run_dir / "control" / "status.json").read_text())
    assert stopped["status"] == "preempted" and stopped["step"] < STEPS
    assert load_checkpoint(run_dir).step == stopped["step"]  # saved exactly where it stopped

    run_ok(ray_address, "train", "--resume", str(run_dir))
    assert exact_view(run_dir) == exact_view(reference)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_whole_process_group_checkpoints_an_embedded_run(
    tmp_path: Path,
    prepared_corpora: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    sig: signal.Signals,
) -> None:
    """Ctrl-C in a terminal, `timeout`, systemd and `kill -- -PGID` signal the whole process group,
    which holds the embedded Ray the driver started: the cluster must not die with it. The run
    checkpoints and exits for a requeue; a first Ctrl-C is a stop with a checkpoint."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # embedded Ray, as on a laptop
    name = f"group_{sig.name}"
    long_run = {"train__max_steps": 5000, "checkpoint__interval": 5000, "workers": 1}
    spec = run_spec(tmp_path, prepared_corpora, name, **long_run)
    proc = midtrain(None, "train", str(spec))
    wait_for_step(tmp_path / name, 3, proc)
    os.killpg(proc.pid, sig)
    rc, out = finish(proc)
    assert rc == 75, out
    stopped = json.loads((tmp_path / name / "control" / "status.json").read_text())
    assert stopped["status"] == "preempted" and 3 <= stopped["step"] < 5000
    assert load_checkpoint(tmp_path / name).step == stopped["step"]
    assert ("Ctrl-C again to abort" in out) == (sig == signal.SIGINT)


def test_after_a_hang_up_the_driver_writes_nowhere_instead_of_failing(tmp_path: Path) -> None:
    """A closed terminal: writing to it fails (EIO), which would end the driver before the
    workers' checkpoint; after a SIGHUP its output goes nowhere instead."""
    from midtrain.launch.local import _detach_from_terminal

    found = tmp_path / "found"
    pid, master = pty.fork()
    if pid == 0:  # the child: stdout and stderr are the terminal
        signal.signal(signal.SIGHUP, lambda *_: None)  # the driver handles it (stops the run)
        outcome = []
        time.sleep(1.0)  # the parent has closed the terminal by now
        for _ in range(2):
            try:
                os.write(1, b"step 7/100\n")  # fd 1 itself: pytest captures sys.stdout
                outcome.append("written")
            except OSError:
                outcome.append("failed")
            _detach_from_terminal()
        found.write_text(" ".join(outcome))
        os._exit(0)
    time.sleep(0.3)  # the child's SIGHUP handler is in place
    os.close(master)
    os.waitpid(pid, 0)
    assert found.read_text() == "failed written"


def test_what_ray_terminates_at_shutdown_is_killed_at_once() -> None:
    """An embedded Ray's processes have SIGTERM blocked (a stop signal to the whole process group
    reaches the driver only), so Ray's SIGTERM at shutdown stays pending: it is made a SIGKILL."""
    from midtrain.launch.local import _kill_when_terminated

    code = (
        "import signal, time; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}); "
        "print('ready', flush=True); time.sleep(120)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    done = threading.Event()
    reaper = threading.Thread(target=_kill_when_terminated, args=(done,))
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        child.terminate()  # as ray.shutdown() does: blocked, so it only stays pending
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=1)
        reaper.start()
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        done.set()
        if reaper.is_alive():
            reaper.join()
        child.kill()
        child.wait()


def test_an_unreachable_cluster_address_is_an_error_at_once(
    tmp_path: Path, prepared_corpora: dict[str, Path]
) -> None:
    spec = run_spec(tmp_path, prepared_corpora, "nowhere")
    started = time.time()
    rc, out = finish(midtrain("127.0.0.1:1", "train", str(spec)), timeout=60)
    assert rc == 2, out
    assert "Ray cluster at 127.0.0.1:1 (launch.ray_address or RAY_ADDRESS): cannot connect" in out
    assert time.time() - started < 50  # Ray alone retries for minutes


def test_a_reachable_address_passes_the_check_also_in_ipv6_brackets() -> None:
    from midtrain.launch.local import check_reachable

    for family, host, shown in (
        (socket.AF_INET, "127.0.0.1", "127.0.0.1"),
        (socket.AF_INET6, "::1", "[::1]"),
    ):
        with socket.socket(family) as server:
            try:
                server.bind((host, 0))
            except OSError:
                pytest.skip(f"no {host} loopback on this machine")
            server.listen()
            check_reachable(f"{shown}:{server.getsockname()[1]}")  # no error


def test_a_run_dir_the_workers_cannot_see_is_named(
    tmp_path: Path, prepared_corpora: dict[str, Path]
) -> None:
    """On a cluster whose nodes do not share run_dir, the workers would train into a directory
    the driver never sees (and it would report a failure at the end): they refuse to start."""
    from midtrain.config import load_run_spec
    from midtrain.errors import ConfigError
    from midtrain.training.loop import worker_entry

    spec = load_run_spec(run_spec(tmp_path, prepared_corpora, "elsewhere"))
    config = {"spec_yaml": spec.to_yaml(), "spec_path": f"{spec.run_dir}/run_spec.yaml"}
    with pytest.raises(ConfigError, match=r"elsewhere is not visible on node .*every node mounts"):
        worker_entry(config)


def test_lost_worker_is_restarted_and_run_matches(
    tmp_path: Path, prepared_corpora: dict[str, Path], ray_address: str, reference: Path
) -> None:
    spec = run_spec(tmp_path, prepared_corpora, "lost", launch__max_failures=1)
    run_dir = tmp_path / "lost"
    proc = midtrain(ray_address, "train", str(spec))
    wait_for_step(run_dir, INTERVAL + 2, proc)
    pid = int((run_dir / "control" / "worker-1.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    rc, out = finish(proc)
    assert rc == 0, out
    assert_same_weights(run_dir, reference)
    assert exact_view(run_dir) == exact_view(reference)


def test_resume_on_one_worker_continues_the_global_stream(
    tmp_path: Path, ray_address: str, reference: Path
) -> None:
    run_dir = tmp_path / "shrunk"
    shutil.copytree(reference, run_dir)
    (run_dir / "metrics.jsonl").unlink()
    ckpts = run_dir / "checkpoints"
    for info in list_checkpoints(run_dir):
        if info.step > 8:
            shutil.rmtree(info.path)
    (ckpts / "latest").write_text("step_00000008\n")

    run_ok(ray_address, "train", "--resume", str(run_dir), "--workers", "1")
    ref, got = read_metrics(reference)[8:], read_metrics(run_dir)
    assert [r["step"] for r in got] == list(range(9, STEPS + 1))
    for a, b in zip(ref, got, strict=True):
        # The same sequences in the same global batches: only the order of floating-point sums
        # differs (one rank accumulates what two ranks all-reduced). Stated tolerance: 1e-4.
        assert a["tokens_by_source"] == b["tokens_by_source"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)


def test_zero3_sigterm_then_resume_on_one_worker_with_a_new_lr(
    tmp_path: Path, prepared_corpora: dict[str, Path], ray_address: str
) -> None:
    """ZeRO-3 shards the parameters and optimizer over 2 workers; SIGTERM checkpoints; the run
    resumes on 1 worker (resharded) with a new peak LR, which wins over the checkpoint's; the
    TensorBoard option writes event files."""
    spec = run_spec(
        tmp_path,
        prepared_corpora,
        "zero3",
        train__zero_stage=3,
        train__tensorboard=True,
        checkpoint__interval=100,  # so the only mid-run checkpoint is the one SIGTERM makes
    )
    run_dir = tmp_path / "zero3"
    proc = midtrain(ray_address, "train", str(spec))
    wait_for_step(run_dir, 6, proc)
    os.kill(proc.pid, signal.SIGTERM)
    rc, out = finish(proc)
    assert rc == 75, out
    stopped = load_checkpoint(run_dir).step
    assert 6 <= stopped < STEPS
    before = read_metrics(run_dir)

    # optimizer.* breaks exactness: refused without the flag, accepted with it, and then used.
    refused = finish(midtrain(ray_address, "train", "--resume", str(run_dir), "optimizer.lr=1e-3"))
    assert refused[0] == 2 and "--allow-changed-spec" in refused[1]
    out = run_ok(
        ray_address,
        "train",
        "--resume",
        str(run_dir),
        "optimizer.lr=1e-3",
        "--workers",
        "1",
        "--allow-changed-spec",
    )
    assert "optimizer.lr: 0.003 -> 0.001  (breaks exact resume)" in out
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert records[:stopped] == before[:stopped]
    new = ScheduleConfig(kind="wsd", warmup_steps=4, decay_fraction=0.25).build(
        peak_lr=1e-3, total_steps=STEPS
    )
    assert [r["lr"] for r in records[stopped:]] == [new.lr(s) for s in range(stopped, STEPS)]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_continued_pretraining_from_an_exported_hugging_face_model(
    tmp_path: Path, prepared_corpora: dict[str, Path], ray_address: str, reference: Path
) -> None:
    """model.from_checkpoint on a plain HF directory (as `ckpt import-hf` users have): the run
    starts from those weights, not from scratch, and keeps learning."""
    from midtrain.checkpoints import export_hf

    hf_dir = export_hf(load_checkpoint(reference).path, tmp_path / "hf")
    spec = run_spec(
        tmp_path,
        prepared_corpora,
        "from_hf",
        model={"from_checkpoint": str(hf_dir)},
        train__max_steps=8,
        workers=1,
    )
    run_ok(ray_address, "train", str(spec))
    records = read_metrics(tmp_path / "from_hf")
    scratch = read_metrics(reference)
    assert [r["step"] for r in records] == list(range(1, 9))
    # Same data order as the reference (same seeds): on the same first batch, the loss is well
    # below the fresh model's and nearer to where the reference ended than where it began.
    first, start, end = records[0]["loss"], scratch[0]["loss"], scratch[-1]["loss"]
    assert first < start - 0.5
    assert abs(first - end) < abs(first - start)
    assert load_checkpoint(tmp_path / "from_hf").manifest.parent == str(hf_dir)


def test_branch_rewarms_and_draws_the_planned_proportions(
    tmp_path: Path, prepared_corpora: dict[str, Path], ray_address: str, reference: Path
) -> None:
    start = load_checkpoint(reference / "checkpoints" / "step_00000012")
    assert start.manifest.phase == "stable"
    steps, rewarm = 10, 4
    spec = run_spec(
        tmp_path,
        prepared_corpora,
        "branch",
        init_from={"checkpoint": str(start.path), "load_optimizer": True},
        schedule={"kind": "wsd", "rewarm_steps": rewarm, "decay_fraction": 0.3},
        optimizer={"lr": 2e-3, "weight_decay": 0.1},
        train__max_steps=steps,
        mixture__seed=11,
        mixture__sources=[
            {
                "name": "legal",
                "kind": "customer",
                "path": [str(prepared_corpora["legal"])],
                "weight": 0.75,
            },
            {
                "name": "general",
                "kind": "curated",
                "path": [str(prepared_corpora["general"])],
                "weight": 0.25,
            },
        ],
    )
    run_ok(ray_address, "train", str(spec))
    run_dir = tmp_path / "branch"
    records = read_metrics(run_dir)
    expected = ScheduleConfig(kind="wsd", rewarm_steps=rewarm, decay_fraction=0.3).build(
        peak_lr=2e-3, total_steps=steps, rewarm_from_lr=start.manifest.lr
    )
    assert [r["lr"] for r in records] == [expected.lr(s) for s in range(steps)]
    assert records[0]["lr"] == pytest.approx(start.manifest.lr)  # re-warm starts where it was
    assert records[rewarm]["lr"] == pytest.approx(2e-3)
    assert {r["phase"] for r in records[:rewarm]} == {"rewarm"}

    from midtrain.config import load_run_spec, run_spec_from_yaml

    mixture: MixtureConfig = load_run_spec(spec).mixture
    plan = plan_mixture(mixture, total_sequences=steps * 8).to_json()
    drawn = records[-1]["tokens_by_source"]
    assert drawn == {k: v["tokens"] for k, v in plan["stages"][0]["sources"].items()}
    manifest = load_checkpoint(run_dir).manifest
    assert manifest.parent == str(start.path)

    # Resume the branch from its step-4 checkpoint, as a Slurm requeue does (the spec and
    # --auto-resume): it goes on exactly as the uninterrupted branch did.
    resumed = tmp_path / "branch_resumed"
    shutil.copytree(run_dir, resumed)
    for info in list_checkpoints(resumed):
        if info.step > 4:
            shutil.rmtree(info.path)
    (resumed / "checkpoints" / "latest").write_text("step_00000004\n")
    run_ok(ray_address, "train", str(spec), f"run_dir={resumed}", "--auto-resume")
    assert exact_view(resumed) == exact_view(run_dir)
    assert_same_weights(resumed, run_dir)
    saved = run_spec_from_yaml(
        (load_checkpoint(resumed).path / "run_spec.yaml").read_text(), "saved"
    )
    assert saved.init_from == load_run_spec(spec).init_from and not saved.resume
    assert load_checkpoint(resumed).manifest.parent == str(start.path)


# --- bad input: clear errors from the driver, nothing overwritten (no Ray needed) ------------------


def _fails(*args: str) -> str:
    rc, out = finish(midtrain(None, *args), timeout=120)
    assert rc == 2, out
    return out


def test_init_from_and_resume_together(tmp_path: Path, prepared_corpora: dict[str, Path]) -> None:
    spec = run_spec(tmp_path, prepared_corpora, "both", init_from={"checkpoint": "x"}, resume=True)
    assert "not both" in _fails("train", str(spec))


def test_missing_start_checkpoint(tmp_path: Path, prepared_corpora: dict[str, Path]) -> None:
    spec = run_spec(
        tmp_path, prepared_corpora, "nock", init_from={"checkpoint": str(tmp_path / "nope")}
    )
    out = _fails("train", str(spec))
    assert str(tmp_path / "nope") in out and "no such checkpoint" in out
    assert not (tmp_path / "nock" / "checkpoints").exists()


def test_checkpoint_of_another_shape(
    tmp_path: Path, prepared_corpora: dict[str, Path], reference: Path
) -> None:
    spec = run_spec(
        tmp_path,
        prepared_corpora,
        "shape",
        init_from={"checkpoint": str(reference / "checkpoints" / "step_00000008")},
        model__config={
            "hidden_size": 128,
            "num_layers": 2,
            "num_heads": 4,
            "num_kv_heads": 2,
            "ffn_hidden_size": 176,
        },
    )
    out = _fails("train", str(spec))
    assert "another shape" in out and "hidden_size: 128" in out


def test_changed_spec_on_resume_is_refused(tmp_path: Path, reference: Path) -> None:
    run_dir = tmp_path / "copy"
    shutil.copytree(reference, run_dir)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    out = _fails("train", "--resume", str(run_dir), "train.seed=2", "mixture.seed=9")
    assert "train.seed: 1 -> 2" in out and "mixture.seed" in out and "--allow-changed-spec" in out
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert before == after


def test_new_run_into_a_used_run_dir_is_refused(
    tmp_path: Path, prepared_corpora: dict[str, Path], reference: Path
) -> None:
    spec = run_spec(tmp_path, prepared_corpora, "again", run_dir=str(reference))
    out = _fails("train", str(spec))
    assert "already holds checkpoints" in out and "--resume" in out


def test_mixture_errors_name_the_run_spec_and_resume_follows_symlinks(
    tmp_path: Path, prepared_corpora: dict[str, Path], reference: Path
) -> None:
    # An inline mixture has no file of its own: a planning error names the run spec.
    sources = [
        {"name": n, "kind": k, "path": [str(prepared_corpora[n])], "weight": 1, "max_epochs": 0.001}
        for n, k in (("legal", "customer"), ("general", "curated"))
    ]
    spec = run_spec(tmp_path, prepared_corpora, "greedy", mixture__sources=sources)
    out = _fails("train", str(spec))
    assert f"{spec}: mixture" in out and "epochs" in out
    # --resume through a symlinked directory names the same run as the spec's resolved run_dir.
    (tmp_path / "link").symlink_to(reference.parent)
    linked = tmp_path / "link" / reference.name
    spec = run_spec(tmp_path, prepared_corpora, "linked", run_dir=str(linked), train__seed=2)
    out = _fails("train", str(spec), "--resume", str(linked))
    assert "names another run_dir" not in out and "train.seed: 1 -> 2" in out
