"""Checkpoints: format, save/load, async saves, retention, catalog, HF import/export (CPU, real files)."""

from __future__ import annotations

import json
import random
import re
import shutil
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from midtrain.checkpoints import (
    CheckpointMeta,
    CheckpointSaver,
    capture_rng_state,
    describe_checkpoint,
    export_hf,
    import_hf,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model,
    mark_keep,
    print_table,
    prune,
    resolve_checkpoint,
    restore_rng_state,
    show_checkpoint,
    to_json,
    verify_checkpoint,
)
from midtrain.checkpoints.host_buffers import HostBuffers
from midtrain.errors import CheckpointError
from midtrain.fileio import sha256_file

SHAPE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=176,
    vocab_size=512,
)


def tiny_llama(tie: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=tie)).eval()


def tiny_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", "the", "court", "held", "that"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.save_pretrained(path)
    return path


def opt_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        out[f"{name}/exp_avg"] = torch.full_like(p, 0.5)
        out[f"{name}/exp_avg_sq"] = p.detach() ** 2
        out[f"{name}/master"] = p.detach().clone()
    return out


def save(saver: CheckpointSaver, model: torch.nn.Module, step: int, **kw) -> Path:
    meta = CheckpointMeta(
        step=step,
        tokens=step * 1000,
        lr=3e-4,
        phase=kw.pop("phase", "stable"),
        loss=2.0 + 1 / (step + 1),
        keep=kw.pop("keep", False),
    )
    kw.setdefault("trainer_state", {"step": step, "sampler": {"epoch": 0, "offset": step}})
    kw.setdefault("model_state", model.state_dict())
    return saver.save(meta, config=model.config, **kw)


def save_held_back(
    saver: CheckpointSaver, model: torch.nn.Module, state: dict, release: threading.Event
) -> None:
    """Start writing ``state`` as handed over (no snapshot), the writer held until ``release``."""
    save(
        saver,
        model,
        1,
        model_state=state,
        blocking=False,
        snapshot=False,
        progress=lambda _n: release.wait(),
    )


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(40).reshape(2, 20) % 512
    with torch.no_grad():
        return model(ids).logits


# --- format -------------------------------------------------------------------------------------


def test_checkpoint_dir_is_hf_loadable_and_lists_every_file(tmp_path: Path) -> None:
    model = tiny_llama()
    tok = tiny_tokenizer(tmp_path / "tok")
    saver = CheckpointSaver(tmp_path / "run", tokenizer_dir=tok, log=None)
    path = save(saver, model, 20, run_spec="run_dir: /x\n", optimizer_state=opt_state(model))
    saver.close()

    assert path == tmp_path / "run" / "checkpoints" / "step_00000020"
    assert (tmp_path / "run/checkpoints/latest").read_text().strip() == "step_00000020"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == 1
    assert (manifest["step"], manifest["tokens"], manifest["phase"]) == (20, 20000, "stable")
    assert manifest["lr"] == pytest.approx(3e-4) and manifest["parent"] is None
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert on_disk - {"manifest.json"} == set(manifest["files"])
    for name, entry in manifest["files"].items():
        assert sha256_file(path / name) == entry["sha256"]
        assert (path / name).stat().st_size == entry["size"]
    assert {"tokenizer.json", "model.safetensors", "run_spec.yaml"} <= set(manifest["files"])
    assert not list(path.glob(".done-*"))

    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    assert torch.equal(logits(hf), logits(model))
    assert AutoTokenizer.from_pretrained(path)("the court held")["input_ids"] == [2, 3, 4]

    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.path == path and ckpt.step == 20 and ckpt.run_spec == "run_dir: /x\n"
    assert ckpt.trainer_state["sampler"] == {"epoch": 0, "offset": 20}
    sd = ckpt.model_state_dict()
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    assert ckpt.optimizer_tensors(["model.norm.weight/master"])["model.norm.weight/master"].equal(
        model.model.norm.weight.detach()
    )
    assert len(ckpt.optimizer_keys()) == 3 * len(list(model.parameters()))


def test_tokenizer_from_a_checkpoint_that_retention_deletes(tmp_path: Path) -> None:
    # A resumed run takes its tokenizer from its start checkpoint, which retention later deletes.
    model = tiny_llama()
    run = tmp_path / "run"
    with CheckpointSaver(run, keep_last=1, tokenizer_dir=tiny_tokenizer(tmp_path / "tok")) as s:
        start = save(s, model, 1)
    with CheckpointSaver(run, keep_last=1, tokenizer_dir=start, log=None) as saver:
        save(saver, model, 2)
        assert not start.exists()
        last = save(saver, model, 3)
    assert verify_checkpoint(last) == [] and (last / "tokenizer.json").is_file()


def test_tied_embeddings_saved_once_and_restored(tmp_path: Path) -> None:
    model = tiny_llama(tie=True)
    with CheckpointSaver(tmp_path / "run", log=None) as saver:
        path = save(saver, model, 1)
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    sd = load_checkpoint(path).model_state_dict()
    fresh = LlamaForCausalLM(model.config).eval()
    fresh.load_state_dict(sd, strict=True)
    assert torch.equal(logits(fresh), logits(model))
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(path)), logits(model))


def test_sharded_weights_use_hf_index(tmp_path: Path) -> None:
    model = tiny_llama()
    with CheckpointSaver(tmp_path / "run", max_shard_bytes=200_000, log=None) as saver:
        path = save(saver, model, 3)
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(path)), logits(model))
    assert torch.equal(logits(load_model(path)), logits(model))


@pytest.mark.parametrize("exchange", ["atomic", "move-aside"])
def test_saving_a_step_again_replaces_it_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: str
) -> None:
    # A resumed run that saves a step it saved before (e.g. after a crash before ``latest``
    # moved on): the new checkpoint takes the old one's place in one atomic exchange, or, on a
    # file system that cannot exchange, after the old one is moved aside.
    if exchange == "move-aside":
        monkeypatch.setattr("midtrain.checkpoints.staging.exchange_paths", lambda a, b: False)
    first, second = tiny_llama(seed=0), tiny_llama(seed=1)
    with CheckpointSaver(tmp_path / "run", log=None) as saver:
        save(saver, first, 2)
        save(saver, second, 2)
    ckpts = tmp_path / "run/checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [".saver.lock", "latest", "step_00000002"]
    state = load_checkpoint(tmp_path / "run", verify=True).model_state_dict()
    assert set(state) == set(second.state_dict())
    assert all(torch.equal(state[k], v) for k, v in second.state_dict().items())
    embed = "model.embed_tokens.weight"
    assert not torch.equal(state[embed], first.state_dict()[embed])  # the first save is gone


def test_optimizer_keys_check_names_the_first_missing_tensor(tmp_path: Path) -> None:
    # What both training backends run on every rank before loading optimizer state.
    from midtrain.training.state_tensors import check_optimizer_keys

    model = tiny_llama()
    names = [name for name, _ in model.named_parameters()]
    state = opt_state(model)
    del state[f"{names[1]}/exp_avg_sq"]
    with CheckpointSaver(tmp_path / "run", log=None) as saver:
        path = save(saver, model, 1, optimizer_state=state)
    ckpt = load_checkpoint(path)
    check_optimizer_keys(ckpt, names[:1])  # the first parameter's state is all there
    with pytest.raises(CheckpointError, match=rf"lacks 1 tensors \(first: {names[1]}/exp_avg_sq\)"):
        check_optimizer_keys(ckpt, names)


def test_rng_and_trainer_state_are_json(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    rng = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    model = tiny_llama()
    with CheckpointSaver(tmp_path / "run", log=None) as saver:
        save(saver, model, 1, trainer_state={"rng": rng, "loss": float("nan"), "t": (1, 2)})
        with pytest.raises(TypeError, match=r"trainer_state\.bad"):
            save(saver, model, 2, trainer_state={"bad": torch.ones(2)})
    assert not (tmp_path / "run/checkpoints/.staging-step_00000002").exists()
    state = load_checkpoint(tmp_path / "run").trainer_state
    assert state["t"] == [1, 2] and state["loss"] != state["loss"]  # NaN survives
    random.random(), np.random.rand(), torch.rand(3)  # move every generator on
    restore_rng_state(state["rng"])
    assert random.random() == expected[0] and np.random.rand() == expected[1]
    assert torch.equal(torch.rand(3), expected[2])


# --- async saves --------------------------------------------------------------------------------


def test_async_save_snapshots_before_returning(tmp_path: Path) -> None:
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = opt_state(model)
    opt_before = {k: v.clone() for k, v in opt.items()}
    saver = CheckpointSaver(tmp_path / "run", log=None)
    path = save(saver, model, 5, optimizer_state=opt, blocking=False)
    with torch.no_grad():  # training goes on and changes everything in place
        for p in model.parameters():
            p.add_(1.0)
        for t in opt.values():
            t.mul_(-1)
    assert saver.wait() == path
    ckpt = load_checkpoint(path)
    sd = ckpt.model_state_dict()
    assert all(torch.equal(sd[k], v) for k, v in before.items())
    assert all(torch.equal(ckpt.optimizer_tensors()[k], v) for k, v in opt_before.items())
    saver.close()


def test_async_save_without_snapshot_writes_the_handed_over_tensors(tmp_path: Path) -> None:
    # snapshot=False is for a caller that hands over fresh copies (the trainer's gathered state):
    # the saver takes no second copy, so it writes the tensors as they are when it gets to them.
    model = tiny_llama()
    handed = {k: v.clone() for k, v in model.state_dict().items()}
    release = threading.Event()
    with CheckpointSaver(tmp_path / "run", log=None) as saver:
        save_held_back(saver, model, handed, release)
        with torch.no_grad():
            handed["model.norm.weight"].fill_(7.0)  # before the writer reached it: no copy taken
        release.set()
    saved = load_checkpoint(tmp_path / "run").model_state_dict()
    assert torch.equal(saved["model.norm.weight"], torch.full_like(saved["model.norm.weight"], 7))
    assert torch.equal(saved["lm_head.weight"], handed["lm_head.weight"])


def test_background_error_surfaces_and_leaves_nothing(tmp_path: Path) -> None:
    model = tiny_llama()
    saver = CheckpointSaver(tmp_path / "run", log=None)
    save(saver, model, 1)

    def broken(_n: int) -> None:
        raise RuntimeError("disk went away")

    save(saver, model, 2, blocking=False, progress=broken)
    with pytest.raises(RuntimeError, match="disk went away"):
        saver.wait()
    saver.wait()  # reported once, then cleared
    names = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert names == [".saver.lock", "latest", "step_00000001"]
    assert resolve_checkpoint(tmp_path / "run").name == "step_00000001"
    save(saver, model, 2, blocking=False, progress=broken)
    with pytest.raises(RuntimeError, match="disk went away"):  # also raised by the next save
        save(saver, model, 3)
    saver.close()


def test_at_most_one_save_in_flight(tmp_path: Path) -> None:
    model = tiny_llama()
    release = threading.Event()
    saver = CheckpointSaver(tmp_path / "run", log=None)
    save(saver, model, 1, blocking=False, progress=lambda _n: release.wait())
    second_called = threading.Event()

    def second() -> None:
        second_called.set()
        save(saver, model, 2, blocking=False)

    t = threading.Thread(target=second)
    t.start()
    second_called.wait()
    time.sleep(0.3)  # room for a wrong implementation to start the second save
    assert not (tmp_path / "run/checkpoints/.staging-step_00000002").exists()
    assert (tmp_path / "run/checkpoints/.staging-step_00000001").exists()
    release.set()
    t.join()
    saver.close()
    assert [i.step for i in list_checkpoints(tmp_path / "run", verify=True) if i.complete] == [1, 2]


def test_host_buffers_are_reused_and_pruned() -> None:
    buffers = HostBuffers()
    a, b = torch.arange(6.0).reshape(2, 3), torch.ones(4, dtype=torch.bfloat16)
    first = {"a": buffers.copy("a", a), "b": buffers.copy("b", b.t())}
    buffers.finish()
    assert torch.equal(first["a"], a) and torch.equal(first["b"], b)
    a.add_(1)  # training changes the original: the copy does not move
    assert torch.equal(first["a"], torch.arange(6.0).reshape(2, 3))
    with pytest.raises(ValueError, match="a: copied twice"):
        buffers.copy("a", a), buffers.copy("a", a)
    buffers.finish()
    again = buffers.copy("a", a)  # the same memory, refilled
    buffers.finish()  # "b" was not part of this save: freed
    assert again.data_ptr() == first["a"].data_ptr() and torch.equal(again, a)
    assert buffers.nbytes == a.numel() * a.element_size()
    wider = buffers.copy("a", torch.zeros(3, 3))  # another shape: a new buffer
    buffers.finish()
    assert wider.shape == (3, 3) and wider.data_ptr() != first["a"].data_ptr()


def test_host_buffers_wait_for_the_save_that_reads_them(tmp_path: Path) -> None:
    # The trainer copies into the saver's buffers and saves with snapshot=False; the next save's
    # copies must not start while the previous write still reads the same buffers.
    model = tiny_llama()
    release, refilled = threading.Event(), threading.Event()
    with CheckpointSaver(tmp_path / "run", log=None) as saver:
        buffers = saver.host_buffers()
        state = {k: buffers.copy(k, v) for k, v in model.state_dict().items()}
        buffers.finish()
        expected = {k: v.clone() for k, v in state.items()}
        save_held_back(saver, model, state, release)

        def next_save() -> None:
            again = saver.host_buffers()
            for k, v in model.state_dict().items():
                again.copy(k, v + 1)
            again.finish()
            refilled.set()

        t = threading.Thread(target=next_save)
        t.start()
        try:
            held_back = not refilled.wait(0.3)  # while step 1 is being written
        finally:
            release.set()
            t.join()
        assert held_back
        assert refilled.is_set()
        assert torch.equal(state["model.norm.weight"], expected["model.norm.weight"] + 1)
    saved = load_checkpoint(tmp_path / "run").model_state_dict()
    assert all(torch.equal(saved[k], v) for k, v in expected.items())


# --- retention ----------------------------------------------------------------------------------


def test_retention_keeps_newest_and_marked(tmp_path: Path) -> None:
    model = tiny_llama()
    with CheckpointSaver(tmp_path / "run", keep_last=2, log=None) as saver:
        for step in range(1, 7):
            save(saver, model, step, keep=step == 2)
    steps = [i.step for i in list_checkpoints(tmp_path / "run")]
    assert steps == [2, 5, 6]
    mark_keep(tmp_path / "run/checkpoints/step_00000005")
    assert verify_checkpoint(tmp_path / "run/checkpoints/step_00000005") == []
    assert [p.name for p in prune(tmp_path / "run", keep_last=1, dry_run=True)] == []
    mark_keep(tmp_path / "run/checkpoints/step_00000002", keep=False)
    assert [p.name for p in prune(tmp_path / "run", keep_last=1)] == ["step_00000002"]
    assert [i.step for i in list_checkpoints(tmp_path / "run")] == [5, 6]


def test_retention_with_async_saves_spares_latest_and_inflight(tmp_path: Path) -> None:
    model = tiny_llama()
    run = tmp_path / "run"
    saver = CheckpointSaver(run, keep_last=1, log=None)
    for step in (1, 2, 3):
        save(saver, model, step, blocking=False)
        saver.wait()
        assert resolve_checkpoint(run).name == f"step_{step:08d}"
        assert latest_checkpoint(run) == run / f"checkpoints/step_{step:08d}"
        assert [i.step for i in list_checkpoints(run)] == [step]
    release, started = threading.Event(), threading.Event()

    def hold(_n: int) -> None:
        started.set()
        release.wait()

    save(saver, model, 4, blocking=False, progress=hold)
    started.wait()
    staging = run / "checkpoints/.staging-step_00000004"
    assert prune(run, keep_last=1) == []  # the CLI pruning while the run saves
    assert staging.is_dir() and (run / "checkpoints/step_00000003").is_dir()
    release.set()
    saver.close()
    infos = list_checkpoints(run, verify=True)
    assert [(i.step, i.complete, i.latest) for i in infos] == [(4, True, True)]


def test_retention_never_lets_a_damaged_checkpoint_cost_an_intact_one(tmp_path: Path) -> None:
    model = tiny_llama()
    with CheckpointSaver(tmp_path / "run", keep_last=None, log=None) as saver:
        for step in (10, 20, 30):
            save(saver, model, step)
    newest = tmp_path / "run/checkpoints/step_00000030/model.safetensors"
    newest.write_bytes(newest.read_bytes()[:50])  # damaged: it must not count as one of the newest
    assert [p.name for p in prune(tmp_path / "run", keep_last=1)] == ["step_00000010"]
    infos = list_checkpoints(tmp_path / "run")
    assert [(i.step, i.status) for i in infos] == [(20, "complete"), (30, "damaged")]
    assert load_checkpoint(tmp_path / "run/checkpoints/step_00000020").step == 20


# --- catalog ------------------------------------------------------------------------------------


def test_catalog_lists_runs_newest_last(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_llama()
    with CheckpointSaver(tmp_path / "root/a", log=None) as saver:
        save(saver, model, 10, phase="stable")
        save(saver, model, 20, phase="decay")
    (tmp_path / "root/a/checkpoints/.staging-step_00000030").mkdir()  # a crashed save
    with CheckpointSaver(tmp_path / "root/b", log=None) as saver:
        save(saver, model, 5, phase="warmup")

    infos = list_checkpoints(tmp_path / "root")
    assert [(i.run_dir.name, i.step, i.complete) for i in infos] == [  # type: ignore[union-attr]
        ("a", 10, True),
        ("a", 20, True),
        ("a", 30, False),
        ("b", 5, True),
    ]
    rows = to_json(infos)
    assert {"path", "step", "tokens", "lr", "phase", "complete"} <= set(rows[0])
    assert rows[1]["phase"] == "decay" and rows[1]["latest"] and rows[2]["status"] == "incomplete"
    json.dumps(rows)
    assert [i.step for i in list_checkpoints(tmp_path / "root/a")] == [10, 20, 30]
    assert [i.step for i in list_checkpoints(tmp_path / "root/a/checkpoints")] == [10, 20, 30]
    one = list_checkpoints(tmp_path / "root/a/checkpoints/step_00000010", verify=True)
    assert [(i.step, i.verified) for i in one] == [(10, True)]

    print_table(infos)
    err = capsys.readouterr().err
    assert "decay" in err and "incomplete" in err
    d = show_checkpoint(tmp_path / "root/a", as_json=True)
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == d["step"] == 20 and "model.safetensors" in out["files"]
    assert describe_checkpoint(tmp_path / "root/b")["trainer_state"]["step"] == 5

    # Step directories copied into a plain directory: that directory is their run, by name.
    loose = tmp_path / "loose"
    shutil.copytree(tmp_path / "root/b/checkpoints/step_00000005", loose / "step_00000005")
    [info] = list_checkpoints(loose)
    assert info.run_dir == loose
    monkeypatch.chdir(loose)
    print_table(list_checkpoints("."))
    assert "loose/step_00000005" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path / "root/b/checkpoints")  # inside a run's checkpoints/
    print_table(list_checkpoints("."))
    assert "b/step_00000005" in capsys.readouterr().err


def test_resolve_checkpoint_errors_name_the_file(tmp_path: Path) -> None:
    ckpts = tmp_path / "run/checkpoints"
    assert latest_checkpoint(tmp_path / "run") is None  # no run yet
    ckpts.mkdir(parents=True)
    assert latest_checkpoint(tmp_path / "run") is None  # nothing saved yet
    with pytest.raises(CheckpointError, match="latest: missing"):
        resolve_checkpoint(tmp_path / "run")
    (ckpts / "latest").write_text("step_00000007\n")
    with pytest.raises(CheckpointError, match="step_00000007, which does not exist"):
        resolve_checkpoint(tmp_path / "run")
    with pytest.raises(CheckpointError, match="latest: names step_00000007, which is missing"):
        latest_checkpoint(tmp_path / "run")
    (ckpts / "latest").write_text("../../etc\n")
    with pytest.raises(CheckpointError, match="latest: expected a name"):
        resolve_checkpoint(ckpts)
    with pytest.raises(CheckpointError, match="no such"):
        resolve_checkpoint(tmp_path / "nope")


def test_a_staging_directory_is_never_loaded_even_with_a_manifest(tmp_path: Path) -> None:
    # A crash between writing the manifest and the rename leaves a staging dir that has one.
    with CheckpointSaver(tmp_path / "run", log=None) as saver:
        path = save(saver, tiny_llama(), 30)
    staging = path.parent / ".staging-step_00000030"
    shutil.copytree(path, staging)
    with pytest.raises(CheckpointError, match="a staging directory, not a checkpoint"):
        load_checkpoint(staging)
    [problem] = verify_checkpoint(staging)
    assert str(staging) in problem and "staging directory" in problem


def test_manifest_step_must_match_its_directory(tmp_path: Path) -> None:
    with CheckpointSaver(tmp_path / "run", log=None) as saver:
        path = save(saver, tiny_llama(), 20)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "step": 99}))
    with pytest.raises(CheckpointError, match="says step 99, but the directory is step_00000020"):
        load_checkpoint(path)
    assert "says step 99" in verify_checkpoint(path)[0]


@pytest.mark.parametrize(
    ("name", "problem"), [("x\u0000y", "not a plain relative path"), ("config.json/x", "missing")]
)
def test_odd_file_names_in_a_manifest_are_problems_not_tracebacks(
    tmp_path: Path, name: str, problem: str
) -> None:
    with CheckpointSaver(tmp_path / "run", log=None) as saver:
        path = save(saver, tiny_llama(), 20)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": "0" * 64, "size": 1}
    (path / "manifest.json").write_text(json.dumps(manifest))
    [found] = verify_checkpoint(path)
    assert problem in found
    [info] = list_checkpoints(tmp_path / "run")
    assert info.status == "damaged" and problem in info.problems[0]


def test_cli_json_is_strict_when_the_loss_diverged(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from midtrain.cli import cli

    model = tiny_llama()
    with CheckpointSaver(tmp_path / "run", log=None) as saver:
        meta = CheckpointMeta(step=5, tokens=50, lr=float("inf"), phase="stable", loss=float("nan"))
        saver.save(meta, model_state=model.state_dict(), config=model.config)

    def strict(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    for args in (
        ["list", str(tmp_path / "run"), "--json"],
        ["show", str(tmp_path / "run"), "--json"],
    ):
        result = CliRunner().invoke(cli, ["ckpt", *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout, parse_constant=strict)
        row = data[0] if isinstance(data, list) else data
        assert (row["step"], row["loss"], row["lr"]) == (5, None, None)


# --- Hugging Face import / export ---------------------------------------------------------------


def _hf_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(7)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
    if kind == "mistral":
        cfg = MistralConfig(**SHAPE, sliding_window=16)
    else:
        cfg = Qwen2Config(**SHAPE, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize(
    "kind,layout",
    [("llama", "safetensors"), ("mistral", "sharded"), ("qwen2", "bin"), ("llama", "bin-sharded")],
)
def test_import_export_round_trip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, layout: str
) -> None:
    model = _hf_model(kind)
    src = tmp_path / "hf"
    if layout in ("safetensors", "sharded"):
        model.save_pretrained(src, max_shard_size="150KB" if layout == "sharded" else "5GB")
    else:
        src.mkdir()
        model.config.save_pretrained(src)
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        if layout == "bin":
            torch.save(sd, src / "pytorch_model.bin")
        else:
            keys = list(sd)
            halves = {"a.bin": keys[: len(keys) // 2], "b.bin": keys[len(keys) // 2 :]}
            for f, ks in halves.items():
                torch.save({k: sd[k] for k in ks}, src / f)
            wm = {k: f for f, ks in halves.items() for k in ks}
            (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    if layout == "sharded":
        assert (src / "model.safetensors.index.json").exists()
    tiny_tokenizer(src)

    ckpt_dir = import_hf(src, tmp_path / "imported")
    assert verify_checkpoint(ckpt_dir) == []
    ckpt = load_checkpoint(ckpt_dir)
    assert (ckpt.manifest.phase, ckpt.manifest.parent, ckpt.manifest.keep) == (
        "imported",
        str(src),
        True,
    )
    assert "tokenizer.json" in ckpt.manifest.files
    imported = ckpt.model_state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(imported[k], v), k

    inside = AutoModelForCausalLM.from_config(model.config).eval()  # the model inside midtrain
    inside.load_state_dict(imported, strict=True)
    out = export_hf(ckpt_dir, tmp_path / "export")
    assert "holds no tokenizer" not in capsys.readouterr().err
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(exported), logits(inside))
    assert torch.equal(logits(exported), logits(model))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [type(model).__name__]
    assert not {"manifest.json", "trainer_state.json"} & {p.name for p in out.iterdir()}
    text = "the court held that"
    assert AutoTokenizer.from_pretrained(out)(text) == AutoTokenizer.from_pretrained(src)(text)

    again = load_checkpoint(import_hf(out, tmp_path / "again")).model_state_dict()
    assert again.keys() == imported.keys()
    assert all(torch.equal(again[k], imported[k]) for k in imported)


def test_export_of_training_checkpoint_drops_midtrain_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_llama(tie=True)
    with CheckpointSaver(tmp_path / "run", log=None) as saver:
        save(saver, model, 9, optimizer_state=opt_state(model), run_spec="a: 1\n")
    out = export_hf(tmp_path / "run", tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert "holds no tokenizer" in capsys.readouterr().err  # said, not silently left out
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out)), logits(model))
    with pytest.raises(CheckpointError, match="already exists"):
        export_hf(tmp_path / "run", out)
    inside = resolve_checkpoint(tmp_path / "run") / "hf"
    with pytest.raises(CheckpointError, match="inside the checkpoint"):
        export_hf(tmp_path / "run", inside)
    assert verify_checkpoint(tmp_path / "run") == []  # left intact


def test_import_rejects_bad_models(tmp_path: Path) -> None:
    from midtrain.training.model import load_hf_config

    model = _hf_model("llama")
    src = tmp_path / "hf"
    model.save_pretrained(src)
    with pytest.raises(CheckpointError, match="already exists"):
        import_hf(src, src)

    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match=r"config\.json: model_type 'gpt2' is not supported"):
        import_hf(src, tmp_path / "o1")
    (src / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor .* has shape"):
        import_hf(src, tmp_path / "o2")
    (src / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match="lack .* tensors"):
        import_hf(src, tmp_path / "o3")
    (src / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.1"):
        import_hf(src, tmp_path / "o4")
    # A config transformers' own validators reject (not with a ValueError): named, not a traceback.
    (src / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 5}))
    with pytest.raises(
        CheckpointError, match=r"config\.json: not a valid llama config \((?s:.*)multiple"
    ):
        import_hf(src, tmp_path / "o6")
    with pytest.raises(CheckpointError, match=r"config\.json: cannot read the model config"):
        load_hf_config(src)
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model weights"):
        import_hf(src, tmp_path / "o5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no partial output anywhere


# --- start weights, read a tensor at a time ------------------------------------------------------


def test_model_tensors_are_read_from_their_file_when_looked_up(tmp_path: Path) -> None:
    """A megatron rank builds its part of the model one tensor at a time from these: nothing is
    read until a tensor is looked up, and then only that tensor's file."""
    model = tiny_llama(tie=True)
    with CheckpointSaver(tmp_path / "run", max_shard_bytes=200_000, log=None) as saver:
        path = save(saver, model, 3)
    tensors = load_checkpoint(path).model_tensors()
    expected = model.state_dict()
    assert set(tensors) == set(expected) and len(tensors) == len(expected)
    assert all(torch.equal(tensors[k], v) for k, v in expected.items())  # lm_head: the embedding
    embed_file = tensors.files["model.embed_tokens.weight"]
    layer_file = tensors.files["model.layers.1.mlp.down_proj.weight"]
    assert embed_file != layer_file
    embed_file.unlink()  # after the listing: the other files' tensors are still read
    assert torch.equal(
        tensors["model.layers.1.mlp.down_proj.weight"],
        expected["model.layers.1.mlp.down_proj.weight"],
    )
    with pytest.raises(CheckpointError, match=re.escape(str(embed_file))):
        tensors["lm_head.weight"]


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_a_hugging_face_start_directory_is_read_as_is_and_checked(
    tmp_path: Path, layout: str
) -> None:
    """model.from_checkpoint on a plain HF directory: its files are read directly (safetensors
    one tensor at a time), a stale rotary buffer is ignored, and a tensor that does not fit the
    config is named with both shapes."""
    from midtrain.checkpoints.hf import hf_dir_weights
    from midtrain.training.checkpointing import StartPoint
    from midtrain.training.model import load_hf_config

    model = _hf_model("llama")
    src = tmp_path / "hf"
    if layout == "safetensors":
        model.save_pretrained(src)
    else:
        model.config.save_pretrained(src)
        stale = {"model.rotary_emb.inv_freq": torch.ones(8)}  # older checkpoints stored it
        torch.save({**model.state_dict(), **stale}, src / "pytorch_model.bin")

    def start() -> StartPoint:
        weights = partial(hf_dir_weights, src)
        return StartPoint("from_checkpoint", str(src), load_hf_config(src), None, weights)

    assert "model.rotary_emb.inv_freq" not in hf_dir_weights(src)
    assert torch.equal(logits(start().build_model().eval()), logits(model))
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(CheckpointError) as err:
        start().build_model()
    message = str(err.value)  # which projection comes first depends on the file's order
    assert message.startswith(f"{src}: model.layers.0.mlp.")
    assert re.search(
        r"has shape \((64, 176|176, 64)\), the model's is \((64, 128|128, 64)\)", message
    )


def test_a_tied_hugging_face_start_keeps_its_embedding_over_a_stored_lm_head(
    tmp_path: Path,
) -> None:
    """Some tied checkpoints also store lm_head.weight; the embedding is the weight (as in
    from_pretrained and ckpt import-hf), not whichever of the two loads last."""
    from safetensors.torch import save_file

    from midtrain.checkpoints.hf import hf_dir_weights
    from midtrain.training.checkpointing import StartPoint
    from midtrain.training.model import load_hf_config

    model = _hf_model("qwen2")  # tied
    src = tmp_path / "hf"
    model.config.save_pretrained(src)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    embed = state["model.embed_tokens.weight"]
    save_file({**state, "lm_head.weight": torch.randn_like(embed)}, str(src / "model.safetensors"))
    assert "lm_head.weight" not in hf_dir_weights(src)
    start = StartPoint(
        "from_checkpoint", str(src), load_hf_config(src), None, partial(hf_dir_weights, src)
    )
    assert torch.equal(start.build_model().model.embed_tokens.weight, embed)


def test_manifest_extra_that_is_not_json_is_refused_when_save_is_called(tmp_path: Path) -> None:
    """Not after every rank has written its part, at the next wait()."""
    model = tiny_llama()
    with CheckpointSaver(tmp_path / "run", log=None) as saver:
        meta = CheckpointMeta(step=1, extra={"grad_norm": torch.tensor(1.0)})
        with pytest.raises(TypeError, match="extra.grad_norm"):
            saver.save(meta, model_state=model.state_dict(), config=model.config, blocking=False)
        saver.wait()  # nothing was started
    assert not list((tmp_path / "run" / "checkpoints").glob("*step_00000001"))


def test_a_start_from_one_of_our_directories_goes_through_its_checks(tmp_path: Path) -> None:
    """model.from_checkpoint on a run directory follows ``latest``; a crashed save's staging
    directory or a checkpoint without its manifest is refused, never read as a plain HF one."""
    from test_config import MIXTURE, SPEC

    from midtrain.config import load_run_spec
    from midtrain.training.checkpointing import resolve_start

    with CheckpointSaver(tmp_path / "run", log=None) as saver:
        path = save(saver, tiny_llama(), 3)

    def start(src: Path) -> str:
        model = {"from_checkpoint": str(src), "tokenizer": str(tmp_path)}
        spec = {**SPEC, "run_dir": str(tmp_path / "new"), "model": model, "mixture": MIXTURE}
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(spec))
        return resolve_start(load_run_spec(tmp_path / "run.yaml")).source

    assert start(tmp_path / "run") == str(path)
    for name, error in [
        (".staging-step_00000009", "a staging directory, not a checkpoint; never loaded"),
        ("step_00000008", "manifest.json: missing; the checkpoint is incomplete"),
    ]:
        partial_copy = path.parent / name
        shutil.copytree(path, partial_copy)
        (partial_copy / "manifest.json").unlink()
        with pytest.raises(CheckpointError, match=re.escape(error)):
            start(partial_copy)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tensors_save_blocking_and_async(tmp_path: Path) -> None:
    model = tiny_llama().cuda()
    expected = {k: v.cpu().clone() for k, v in model.state_dict().items()}
    saver = CheckpointSaver(tmp_path / "run", log=None)
    save(saver, model, 1)
    save(saver, model, 2, blocking=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    saver.close()
    for step in (1, 2):
        sd = load_checkpoint(tmp_path / f"run/checkpoints/step_{step:08d}").model_state_dict()
        assert all(torch.equal(sd[k], v) for k, v in expected.items())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_host_buffers_copy_from_the_gpu_into_pinned_memory() -> None:
    source = {f"t{i}": torch.randn(256, 256, device="cuda") for i in range(8)}
    buffers = HostBuffers()
    copies = {k: buffers.copy(k, v) for k, v in source.items()}
    buffers.finish()  # the copies are asynchronous until here
    for k, v in source.items():
        v.mul_(2)
        assert copies[k].is_pinned() and torch.equal(copies[k] * 2, v.cpu())
    buffers.copy("t0", source["t0"])
    buffers.finish()  # the others were not part of this save: unpinned and freed
    assert copies["t0"].is_pinned() and not copies["t1"].is_pinned()
    assert buffers.nbytes == 256 * 256 * 4
    buffers.clear()
    assert not copies["t0"].is_pinned()
