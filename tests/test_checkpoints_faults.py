"""Checkpoints under faults and hostile input: SIGKILL mid-save, corrupt files, a full disk, pickle
payloads and remote code. Real subprocesses, real files; nothing is mocked."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from megatron_workers import free_port
from test_config import MIXTURE, SPEC

from midtrain.checkpoints import (
    CheckpointMeta,
    CheckpointSaver,
    import_hf,
    list_checkpoints,
    load_checkpoint,
    load_model,
    resolve_checkpoint,
    verify_checkpoint,
)
from midtrain.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]

# Shared by the child processes: a deterministic Llama-named state dict (no transformers import,
# so a child starts in about a second) and a saver for a run directory.
CHILD_PRELUDE = textwrap.dedent(
    """
    import json, os, resource, signal, sys, time
    import torch
    from midtrain.checkpoints import CheckpointMeta, CheckpointSaver

    CONFIG = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 176,
              "vocab_size": VOCAB}

    def state(seed):
        g = torch.Generator().manual_seed(seed)
        names = {"model.embed_tokens.weight": (VOCAB, 64), "model.norm.weight": (64,),
                 "lm_head.weight": (VOCAB, 64)}
        return {k: torch.randn(s, generator=g) for k, s in names.items()}

    def save(saver, step, **kw):
        meta = CheckpointMeta(step=step, tokens=step * 10, lr=1e-3, phase="stable", loss=1.0)
        return saver.save(meta, model_state=state(step), config=CONFIG,
                          trainer_state={"step": step}, **kw)
    """
)


CONFIG_JSON = json.dumps(
    {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
     "num_key_value_heads": 2, "intermediate_size": 176, "vocab_size": 512}
)  # fmt: skip


def expected_state(seed: int, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    names = {
        "model.embed_tokens.weight": (vocab, 64),
        "model.norm.weight": (64,),
        "lm_head.weight": (vocab, 64),
    }
    return {k: torch.randn(s, generator=g) for k, s in names.items()}


def child(script: str, vocab: int = 512) -> subprocess.Popen[str]:
    code = CHILD_PRELUDE.replace("VOCAB", str(vocab)) + textwrap.dedent(script)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MIDTRAIN_NO_PROGRESS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def assert_previous_checkpoint_survives(run: Path, vocab: int) -> None:
    infos = list_checkpoints(run, verify=True)
    complete = [i.step for i in infos if i.complete]
    assert complete == [10], [(i.path.name, i.status, i.problems) for i in infos]
    assert not any(i.complete for i in infos if i.step == 20)
    assert resolve_checkpoint(run).name == "step_00000010"
    sd = load_checkpoint(run).model_state_dict()
    assert all(torch.equal(sd[k], v) for k, v in expected_state(10, vocab).items())


# --- SIGKILL ------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["mid-file", "committer-waiting"])
def test_sigkill_during_async_save_keeps_previous(tmp_path: Path, where: str) -> None:
    run = tmp_path / "run"
    vocab = 4096  # 1 MiB per embedding: the kill lands while model.safetensors is half written
    if where == "mid-file":
        script = f"""
        saver = CheckpointSaver({str(run)!r}, keep_last=1, log=None)
        save(saver, 10)
        written = 0
        def progress(n):
            global written
            written += n
            if written > 1 << 20:
                print("MIDWAY", flush=True)
                time.sleep(600)
        save(saver, 20, blocking=False, progress=progress)
        time.sleep(600)  # training goes on
        """
    else:
        # Rank 0 of 2: its files are complete, the committer waits for rank 1, which never comes.
        script = f"""
        with CheckpointSaver({str(run)!r}, keep_last=1, log=None) as first:
            save(first, 10)
        saver = CheckpointSaver({str(run)!r}, world_size=2, barrier=lambda: None, log=None)
        save(saver, 20, blocking=False)
        # Its last file is the trainer state: once that is whole, the committer is waiting.
        from midtrain.checkpoints.state import dumps
        last = {str(run)!r} + "/checkpoints/.staging-step_00000020/trainer_state.json"
        while not (os.path.exists(last) and os.path.getsize(last) == len(dumps({{"step": 20}}))):
            time.sleep(0.01)
        time.sleep(0.2)
        print("MIDWAY", flush=True)
        time.sleep(600)
        """
    proc = child(script, vocab=vocab)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "MIDWAY", proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.communicate()

    staging = run / "checkpoints/.staging-step_00000020"
    assert staging.is_dir() and not (staging / "manifest.json").exists()
    assert_previous_checkpoint_survives(run, vocab)
    [incomplete] = [i for i in list_checkpoints(run) if i.step == 20]
    assert (incomplete.complete, incomplete.status) == (False, "incomplete")

    # The run resumes and saves the same step again: the stale staging dir is replaced.
    with CheckpointSaver(run, keep_last=1, log=None) as saver:
        state = expected_state(20, vocab)
        config = {"model_type": "llama", "vocab_size": vocab}
        saver.save(CheckpointMeta(step=20), model_state=state, config=config)
    assert [(i.step, i.complete) for i in list_checkpoints(run, verify=True)] == [(20, True)]


# --- two savers of one run ---------------------------------------------------------------------


def test_a_second_saver_of_a_run_is_refused_until_the_first_is_gone(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = child(f"""
    saver = CheckpointSaver({str(run)!r}, keep_last=1, log=None)
    save(saver, 10)
    print("SAVED", flush=True)
    time.sleep(600)  # still training, so still saving
    """)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "SAVED", proc.stderr.read() if proc.stderr else ""
        with pytest.raises(CheckpointError, match="another process is saving") as err:
            CheckpointSaver(run, lock_timeout_s=0.5, log=None)
        assert f"pid {proc.pid}" in str(err.value)  # says who holds it
        proc.send_signal(signal.SIGKILL)  # the kernel drops a dead holder's lock
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.communicate()
    with CheckpointSaver(run, keep_last=1, log=None) as saver:
        meta = CheckpointMeta(step=20, tokens=200, lr=1e-3, phase="stable", loss=1.0)
        saver.save(meta, model_state=expected_state(20, 512), config=json.loads(CONFIG_JSON))
    assert resolve_checkpoint(run).name == "step_00000020"


RANK = textwrap.dedent(
    """
    import json, sys
    import torch.distributed as dist
    from midtrain.config import load_run_spec
    from midtrain.training.checkpointing import agree_on_start

    dist.init_process_group("gloo")
    spec = load_run_spec(sys.argv[1])
    print("READY", flush=True)
    start, lock = agree_on_start(spec, dist.get_rank())
    print(json.dumps({"source": start.source, "step": start.resume_state["step"],
                      "holds_lock": lock is not None}), flush=True)
    """
)


def test_a_restarted_group_resumes_from_its_predecessors_last_save_on_every_rank(
    tmp_path: Path,
) -> None:
    """The old group's rank 0 is still writing step 20 when the new group starts: the new rank 0
    waits for its saver lock before reading ``latest``, and rank 1 loads what rank 0 picked."""
    run, go = tmp_path / "run", tmp_path / "go"
    old_rank0 = child(f"""
    from pathlib import Path

    def hold(_written):
        while not Path({str(go)!r}).exists():
            time.sleep(0.05)

    saver = CheckpointSaver({str(run)!r}, keep_last=None, log=None)
    for step, blocking in ((10, True), (20, False)):
        meta = CheckpointMeta(step=step, tokens=step * 10, lr=1e-3, phase="stable")
        saver.save(meta, model_state=state(step), config=CONFIG, blocking=blocking,
                   trainer_state={{"step": step, "optimizer_step": step}},
                   progress=None if blocking else hold)
    print("WRITING", flush=True)
    saver.close()  # waits for step 20 to be written and committed
    """)
    spec = tmp_path / "run.yaml"
    model = {**SPEC["model"], "tokenizer": str(tmp_path)}
    spec.write_text(
        yaml.safe_dump({**SPEC, "run_dir": str(run), "model": model, "mixture": MIXTURE})
    )
    port = str(free_port())
    ranks = []
    try:
        assert old_rank0.stdout is not None and old_rank0.stdout.readline().strip() == "WRITING"
        env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1"}
        for r in range(2):
            ranks.append(
                subprocess.Popen(
                    [sys.executable, "-c", RANK, str(spec)],
                    env={**env, "MASTER_PORT": port, "RANK": str(r), "WORLD_SIZE": "2"},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        for proc in ranks:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "READY", (
                proc.stderr.read() if proc.stderr else ""
            )
        time.sleep(1.0)  # the new group is up while step 20 is still being written
        go.touch()
        results = []
        for proc in ranks:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
        assert old_rank0.wait(timeout=60) == 0
    finally:
        for proc in [old_rank0, *ranks]:
            proc.kill()
            proc.communicate()
    assert [(Path(r["source"]).name, r["step"]) for r in results] == [("step_00000020", 20)] * 2
    assert [r["holds_lock"] for r in results] == [True, False]


def test_a_file_gone_from_staging_is_never_committed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = json.loads(CONFIG_JSON)
    with CheckpointSaver(run, keep_last=1, log=None) as saver:
        meta = CheckpointMeta(step=10, tokens=100, lr=1e-3, phase="stable", loss=1.0)
        saver.save(meta, model_state=expected_state(10, 512), config=config)
        staging = run / "checkpoints/.staging-step_00000020"

        def remove_weights(_n: int) -> None:
            # config.json is written after the weights: take them away now, as a second writer
            # into the same directory would.
            if (staging / "config.json").exists():
                (staging / "model.safetensors").unlink(missing_ok=True)

        meta = CheckpointMeta(step=20, tokens=200, lr=1e-3, phase="stable", loss=1.0)
        with pytest.raises(CheckpointError, match="not committed.*model.safetensors: missing"):
            saver.save(
                meta, model_state=expected_state(20, 512), config=config, progress=remove_weights
            )
    assert_previous_checkpoint_survives(run, 512)


# --- corrupt or hostile files -------------------------------------------------------------------


class Payload:
    """Unpickling this runs ``open(MARKER, "w")``: a real code-execution payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


def write_payload(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"model.norm.weight": Payload(marker)}))


def test_payload_is_live_when_unpickled_unsafely(tmp_path: Path) -> None:
    # Control for the tests below: the payload really creates its file when unpickled.
    marker = tmp_path / "pwned"
    write_payload(tmp_path / "x.bin", marker)
    code = f"import pickle; pickle.load(open({str(tmp_path / 'x.bin')!r}, 'rb'))"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert marker.exists()


def _saved_run(tmp_path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=176, vocab_size=512)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    opt = {f"{n}/exp_avg": torch.zeros_like(p) for n, p in model.named_parameters()}
    with CheckpointSaver(tmp_path / "run", log=None) as saver:
        meta = CheckpointMeta(step=10, tokens=100, lr=1e-3, phase="stable")
        return saver.save(meta, model_state=model.state_dict(), config=cfg, optimizer_state=opt)


def _truncate(p: Path) -> None:
    data = (p / "model.safetensors").read_bytes()
    (p / "model.safetensors").write_bytes(data[: len(data) // 2])


def _flip(p: Path) -> None:
    f = p / "optimizer" / "optimizer-00000-of-00001.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) - 100] ^= 0x01
    f.write_bytes(bytes(data))


def _manifest_edit(p: Path, **changes: object) -> None:
    m = json.loads((p / "manifest.json").read_text())
    m.update(changes)
    (p / "manifest.json").write_text(json.dumps(m))


CORRUPTIONS = {
    "truncated": (_truncate, "model.safetensors: truncated"),
    "flipped byte": (_flip, "optimizer-00000-of-00001.safetensors: altered"),
    "missing file": (lambda p: (p / "config.json").unlink(), "config.json: missing"),
    "unknown format": (
        lambda p: _manifest_edit(p, format_version=99),
        "manifest.json: unknown format_version 99",
    ),
    "manifest not json": (
        lambda p: (p / "manifest.json").write_text('{"format_version": 1, "step":'),
        "manifest.json: not valid JSON",
    ),
    "manifest missing": (lambda p: (p / "manifest.json").unlink(), "manifest.json: missing"),
    "bad manifest field": (
        lambda p: _manifest_edit(p, tokens="many"),
        "manifest.json: tokens: ",
    ),
    "manifest escapes dir": (
        lambda p: _manifest_edit(p, files={"../x": {"sha256": "0" * 64, "size": 1}}),
        "not a plain relative path",
    ),
    "unlisted pickle": (
        lambda p: write_payload(p / "optimizer.pt", p.parent / "pwned"),
        "optimizer.pt: not listed in manifest.json",
    ),
    "symlinked dir": (
        lambda p: (p / "extra").symlink_to(p.parent, target_is_directory=True),
        "extra: not listed in manifest.json",
    ),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corruption_is_reported_and_never_loaded(tmp_path: Path, kind: str) -> None:
    path = _saved_run(tmp_path)
    corrupt, message = CORRUPTIONS[kind]
    corrupt(path)
    problems = verify_checkpoint(path)
    assert any(message in p for p in problems), problems
    assert all(str(path) in p for p in problems)  # every problem names its file
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(")) as err:
        load_checkpoint(tmp_path / "run")
    assert str(path) in str(err.value)
    [info] = list_checkpoints(tmp_path / "run", verify=True)
    assert not info.complete and info.status in ("damaged", "incomplete")
    assert not (tmp_path / "run/checkpoints/pwned").exists()


def test_truncation_caught_without_hashing(tmp_path: Path) -> None:
    path = _saved_run(tmp_path)
    _truncate(path)
    with pytest.raises(CheckpointError, match="model.safetensors: truncated"):
        load_checkpoint(path, verify=False)


# --- full disk ----------------------------------------------------------------------------------


def test_out_of_disk_space_is_a_clear_error(tmp_path: Path) -> None:
    run = tmp_path / "run"
    script = f"""
    saver = CheckpointSaver({str(run)!r}, keep_last=1, log=None)
    save(saver, 10)
    # Every file may now grow to 256 kB only; writes past it fail with EFBIG (SIGXFSZ ignored).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, resource.RLIM_INFINITY))
    errors = []
    try:
        save(saver, 20)
    except Exception as exc:
        errors.append(f"{{type(exc).__name__}}: {{exc}}")
    save(saver, 20, blocking=False)
    try:
        saver.wait()
    except Exception as exc:
        errors.append(f"{{type(exc).__name__}}: {{exc}}")
    print(json.dumps(errors))
    """
    proc = child(script, vocab=2048)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    errors = json.loads(out.strip().splitlines()[-1])
    assert len(errors) == 2
    for e in errors:
        assert e.startswith("CheckpointError: ")
        assert "out of disk space or over the file size limit" in e
        assert ".staging-step_00000020/model.safetensors" in e
    assert_previous_checkpoint_survives(run, 2048)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == [".saver.lock", "latest", "step_00000010"]


def test_out_of_space_at_the_end_of_a_save_is_said_at_once(tmp_path: Path) -> None:
    """The last small files of a save (the manifest; another rank's ``.done`` marker) do not fit:
    each save fails at once naming the file, instead of the committer waiting its whole commit
    timeout for a marker that never comes."""
    script = f"""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    errors = []
    for rank, limit in ((0, 400), (1, 200)):  # the data files fit, the last file does not
        saver = CheckpointSaver({str(tmp_path)!r} + f"/run{{rank}}", rank=rank, world_size=rank + 1,
                                barrier=lambda: None, commit_timeout_s=120, log=None)
        model = {{"w": torch.zeros(2)}} if rank == 0 else None
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        try:
            saver.save(CheckpointMeta(step=1), model_state=model, trainer_state={{"step": 1}},
                       config={{"model_type": "llama"}} if rank == 0 else None,
                       optimizer_state={{"w/exp_avg": torch.zeros(2)}}, rank_state={{"r": rank}})
        except Exception as exc:
            errors.append(f"{{type(exc).__name__}}: {{exc}}")
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    print(json.dumps(errors))
    """
    proc = child(script)
    out, err = proc.communicate(timeout=100)  # not the commit timeout, then an error
    assert proc.returncode == 0, err
    committer, rank1 = json.loads(out.strip().splitlines()[-1])
    assert committer.startswith("CheckpointError: ") and "manifest.json" in committer
    assert rank1.startswith("CheckpointError: ") and ".done-rank1" in rank1
    for message in (committer, rank1):
        assert "out of disk space or over the file size limit" in message
    assert not (tmp_path / "run0/checkpoints/step_00000001").exists()


def test_out_of_space_while_rewriting_a_manifest_is_a_clear_error(tmp_path: Path) -> None:
    run = tmp_path / "run"
    script = f"""
    with CheckpointSaver({str(run)!r}, log=None) as saver:
        path = save(saver, 10)
    from midtrain.checkpoints import mark_keep
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, resource.RLIM_INFINITY))  # < a manifest
    try:
        mark_keep(path)
    except Exception as exc:
        print(f"{{type(exc).__name__}}: {{exc}}")
    """
    proc = child(script)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    line = out.strip().splitlines()[-1]
    assert line.startswith("CheckpointError: ") and "step_00000010/manifest.json" in line
    assert "out of disk space or over the file size limit" in line
    [info] = list_checkpoints(run, verify=True)
    assert info.complete and not info.keep  # the old manifest, whole


# --- pickle and remote code ---------------------------------------------------------------------


def _hf_dir(tmp_path: Path) -> Path:
    src = tmp_path / "hf"
    src.mkdir()
    cfg = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 176,
           "vocab_size": 512}  # fmt: skip
    (src / "config.json").write_text(json.dumps(cfg))
    return src


def test_pickle_payload_in_bin_is_refused(tmp_path: Path) -> None:
    src = _hf_dir(tmp_path)
    marker = tmp_path / "pwned"
    write_payload(src / "pytorch_model.bin", marker)
    code = textwrap.dedent(
        f"""
        from midtrain.checkpoints import import_hf
        from midtrain.errors import CheckpointError
        try:
            import_hf({str(src)!r}, {str(tmp_path / "out")!r})
        except CheckpointError as exc:
            print("REFUSED", exc)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("REFUSED ") and "pytorch_model.bin: refused" in res.stdout
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no output, no staging left


def test_pickle_payload_as_torch_save_zip_is_refused(tmp_path: Path) -> None:
    # The modern .bin container (a zip holding data.pkl) with the same payload inside.
    src = _hf_dir(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"model.norm.weight": Payload(marker)}, src / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: refused"):
        import_hf(src, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_remote_code_is_never_run(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    src = tmp_path / "hf"
    LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                 intermediate_size=176, vocab_size=512)).save_pretrained(src)  # fmt: skip
    marker = tmp_path / "pwned"
    (src / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w')\n")
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (src / "config.json").write_text(json.dumps(cfg))

    out = import_hf(src, tmp_path / "out")
    assert not (out / "modeling_evil.py").exists()
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    load_model(out)
    assert not marker.exists()
    with pytest.raises(ValueError, match="never runs"):
        load_model(out, trust_remote_code=True)
