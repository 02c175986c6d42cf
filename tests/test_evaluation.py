"""Evaluation: held-out loss / perplexity / bits per byte per source, baselines, curves, reports.

Real tiny Llama checkpoints (saved with CheckpointSaver, trained a few steps with a plain torch
loop) and the prepared legal + general sample corpora from conftest.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM

from midtrain.checkpoints import CheckpointMeta, CheckpointSaver, load_model
from midtrain.checkpoints import load as checkpoint_load
from midtrain.data_mixing.indexed import open_indexed
from midtrain.data_mixing.mixture import MixtureConfig
from midtrain.data_mixing.prepare import PrepareConfig, prepare_corpus
from midtrain.data_mixing.stats import holdout_prefix
from midtrain.data_mixing.tokenizer import load_tokenizer
from midtrain.errors import CheckpointError, ConfigError, DataError
from midtrain.evaluation import EvalOptions, check_report_dir, evaluate, perplexity, write_report
from midtrain.evaluation import report as report_module
from midtrain.evaluation.evaluate import Target, _unique_names
from midtrain.evaluation.heldout import build_eval_set, make_windows, sources_from_mixture

SEQ = 32
MAX_TOKENS = 1500
STEPS = (10, 20, 30)
EXAMPLE_TASKS = Path(__file__).parent.parent / "examples" / "tasks"
OPTS = EvalOptions(max_tokens=MAX_TOKENS, batch_size=16, device="cpu")


def tiny_model(vocab: int, seed: int = 0, positions: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=vocab,
        max_position_embeddings=positions,
    )
    return LlamaForCausalLM(cfg)


def train_tokens(prefix: Path, n: int = 20_000) -> torch.Tensor:
    ds = open_indexed(prefix)
    docs, total = [], 0
    for i in range(len(ds)):
        docs.append(np.asarray(ds[i], dtype=np.int64))
        total += docs[-1].size
        if total >= n:
            break
    return torch.from_numpy(np.concatenate(docs)[:n])


def train_steps(
    model: LlamaForCausalLM, tokens: torch.Tensor, steps: int, seed: int
) -> list[float]:
    """Plain AdamW steps on random windows of ``tokens``; returns each step's loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, tokens.numel() - SEQ - 1, (8,), generator=gen)
        batch = torch.stack([tokens[s : s + SEQ + 1] for s in starts.tolist()])
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def save(run_dir: Path, model: LlamaForCausalLM, step: int, tok: Path, **kw: Any) -> Path:
    with CheckpointSaver(run_dir, keep_last=None, tokenizer_dir=tok, log=None) as saver:
        return saver.save(
            CheckpointMeta(step=step, tokens=step * 8 * SEQ, lr=3e-3, phase="stable"),
            model_state=model.state_dict(),
            config=model.config,
            trainer_state={"step": step},
            **kw,
        )


@pytest.fixture(scope="module")
def runs(prepared_corpora: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An untrained base checkpoint, and two runs branched from it: one trained on legal (the
    customer source), one on general (the curated source), each with 3 checkpoints + metrics."""
    tok = prepared_corpora["tokenizer"]
    vocab = len(load_tokenizer(tok))
    root = tmp_path_factory.mktemp("eval_runs")
    mixture = {
        "seq_length": SEQ,
        "sources": [
            {
                "name": "legal",
                "kind": "customer",
                "path": [str(prepared_corpora["legal"])],
                "weight": 1.0,
            },
            {
                "name": "general",
                "kind": "curated",
                "path": [str(prepared_corpora["general"])],
                "weight": 1.0,
            },
        ],
    }
    base = save(root / "base", tiny_model(vocab), 0, tok)
    out: dict[str, Any] = {"base": base, "root": root, "vocab": vocab, "tok": tok}
    for i, source in enumerate(("legal", "general")):
        run_dir = root / f"{source}_run"
        spec = {"run_dir": str(run_dir), "init_from": {"checkpoint": str(base)}, "mixture": mixture}
        spec_text = yaml.safe_dump(spec, sort_keys=False)
        run_dir.mkdir()
        (run_dir / "run_spec.yaml").write_text(spec_text)
        model = load_model(base)
        tokens = train_tokens(prepared_corpora[source])
        metrics, done = [], 0
        for step in STEPS:
            for loss in train_steps(model, tokens, step - done, seed=i * 100 + step):
                done += 1
                metrics.append(
                    {
                        "step": done,
                        "loss": loss,
                        "loss_by_source": {source: loss},
                        "lr": 3e-3 * done / STEPS[-1],
                        "phase": "stable",
                    }
                )
            save(run_dir, model, step, tok, run_spec=spec_text)
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        out[source] = run_dir
    return out


def final(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / f"step_{STEPS[-1]:08d}"


def heldout_stream(prefix: Path, max_tokens: int) -> np.ndarray:
    ds = open_indexed(holdout_prefix(prefix))
    stream = np.concatenate([np.asarray(ds[i], dtype=np.int64) for i in range(len(ds))])
    return stream[: max_tokens + 1]


def test_numbers_equal_a_direct_computation(runs: dict, prepared_corpora: dict) -> None:
    ckpt = final(runs["legal"])
    ev = evaluate([ckpt], OPTS)
    (run,) = ev.runs
    assert [c.step for c in run.checkpoints] == [STEPS[-1]]
    scores = run.final.scores
    assert list(scores) == ["legal", "general"]
    assert scores["legal"].kind == "customer" and scores["general"].kind == "curated"

    model = load_model(ckpt).eval()
    tokenizer = load_tokenizer(prepared_corpora["tokenizer"])
    for name in ("legal", "general"):
        stream = heldout_stream(prepared_corpora[name], MAX_TOKENS)
        assert stream.size == MAX_TOKENS + 1  # the cap applies: the splits are larger
        nats = 0.0
        with torch.no_grad():
            for start in range(0, stream.size - 1, SEQ):  # one window at a time, no batching
                w = torch.from_numpy(stream[start : start + SEQ + 1])[None]
                logits = model(input_ids=w[:, :-1]).logits
                nats += F.cross_entropy(logits[0], w[0, 1:], reduction="sum").item()
        text = tokenizer.decode(stream[1:].tolist(), skip_special_tokens=True)
        n_bytes = len(text.encode("utf-8"))
        s = scores[name]
        assert s.tokens == MAX_TOKENS and s.bytes == n_bytes
        assert s.loss == pytest.approx(nats / MAX_TOKENS, rel=1e-5)
        assert s.perplexity == pytest.approx(math.exp(nats / MAX_TOKENS), rel=1e-5)
        assert s.bits_per_byte == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-5)


def test_windows_overlap_by_one_and_cover_every_target() -> None:
    stream = np.arange(10)
    windows = make_windows(stream, 4)
    assert [w.tolist() for w in windows] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9]]
    assert sum(w.size - 1 for w in windows) == stream.size - 1


def test_the_first_runs_mixture_gives_the_windows_of_every_model(
    runs: dict, prepared_corpora: dict, tmp_path: Path
) -> None:
    # A second run whose saved mixture differs (other seq_length, sources in the other order):
    # `report A B` is scored on A's mixture's windows, `report B A` on B's, every model alike.
    legal, general = (str(prepared_corpora[n]) for n in ("legal", "general"))
    other_mixture = {
        "seq_length": 16,
        "sources": [
            {"name": "general", "kind": "curated", "path": [general], "weight": 1.0},
            {"name": "legal", "kind": "customer", "path": [legal], "weight": 1.0},
        ],
    }
    other = tmp_path / "other_run"
    spec = {"run_dir": str(other), "mixture": other_mixture}
    save(other, tiny_model(runs["vocab"]), 5, runs["tok"], run_spec=yaml.safe_dump(spec))
    mixtures = {
        "a": validate_mixture(yaml.safe_load((runs["legal"] / "run_spec.yaml").read_text())),
        "b": validate_mixture(other_mixture),
    }
    tokenizer = load_tokenizer(runs["tok"])
    opts = EvalOptions(max_tokens=200, device="cpu")
    for order, first in (((runs["legal"], other), "a"), ((other, runs["legal"]), "b")):
        ev = evaluate(list(order), opts, all_checkpoints=False)
        m = mixtures[first]
        expected = build_eval_set(sources_from_mixture(m), m.seq_length, 200, tokenizer)
        assert ev.eval_set.seq_length == m.seq_length
        assert [s.name for s in ev.eval_set.sources] == [s.name for s in expected.sources]
        assert [s.digest for s in ev.eval_set.sources] == [s.digest for s in expected.sources]
        for got, want in zip(ev.eval_set.sources, expected.sources, strict=True):
            assert [w.tolist() for w in got.windows] == [w.tolist() for w in want.windows]
        for run in ev.runs:  # both runs scored on those sources
            assert list(run.final.scores) == [s.name for s in expected.sources]


def validate_mixture(data: dict) -> MixtureConfig:
    return MixtureConfig.model_validate(data.get("mixture", data))


def test_base_without_run_spec_needs_a_mixture(runs: dict) -> None:
    with pytest.raises(ConfigError, match="--mixture or --data"):
        evaluate([runs["base"]], OPTS)


def test_baseline_gives_domain_gain_and_forgetting(runs: dict) -> None:
    ev = evaluate(
        [runs["legal"], runs["general"]], OPTS, baseline=runs["base"], all_checkpoints=False
    )
    legal_run, general_run = ev.runs
    assert legal_run.baseline is not None and legal_run.baseline.path == runs["base"]
    assert [c.step for c in legal_run.checkpoints] == [STEPS[-1]]  # final checkpoint only
    legal_vs_base = legal_run.comparisons()[-1]
    change = legal_vs_base.changes["legal"]
    assert (
        change.metric == "domain gain" and legal_vs_base.changes["general"].metric == "forgetting"
    )
    assert (
        legal_run.final.scores["legal"].perplexity < legal_run.baseline.scores["legal"].perplexity
    )
    assert change.value > 0 and change.value == pytest.approx(-change.delta_loss)
    assert change.perplexity_change_pct < 0
    # Training on legal helps legal more than training on general does, and vice versa.
    general_vs_base = general_run.comparisons()[-1]
    assert legal_vs_base.domain_gain > general_vs_base.domain_gain
    assert legal_vs_base.forgetting > general_vs_base.forgetting


def png_ok(path: Path) -> bool:
    with Image.open(path) as img:
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
        return img.width > 100 and img.height > 100 and (colours is None or len(colours) > 1)


def test_eval_run_dir_gives_curves_and_a_report(runs: dict, tmp_path: Path) -> None:
    ev = evaluate([runs["legal"]], OPTS)
    (run,) = ev.runs
    assert [c.step for c in run.checkpoints] == list(STEPS)
    assert run.baseline is not None and run.baseline.path == runs["base"]  # from init_from
    assert len(run.metrics) == STEPS[-1]

    md = write_report(ev, tmp_path / "report")
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    (jrun,) = report["runs"]
    assert [c["step"] for c in jrun["checkpoints"]] == list(STEPS)
    for c, scores in zip(jrun["checkpoints"], run.checkpoints, strict=True):
        for name in ("legal", "general"):
            entry = c["sources"][name]
            assert entry["perplexity"] == pytest.approx(scores.scores[name].perplexity)
            assert entry["bits_per_byte"] > 0 and entry["tokens"] == MAX_TOKENS
        assert c["comparison"]["sources"]["legal"]["metric"] == "domain gain"
    assert (
        jrun["baseline"]["sources"]["legal"]["loss"]
        > jrun["checkpoints"][-1]["sources"]["legal"]["loss"]
    )
    assert report["eval_set"]["seq_length"] == SEQ
    # fp32 and bf16 losses differ: what the models ran in is part of what makes reports compare
    assert report["eval_set"]["device"] == "cpu" and report["eval_set"]["dtype"] == "float32"

    text = md.read_text()
    assert "on cpu in float32" in text
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert pngs == sorted(
        [
            "training_loss.png",
            "learning_rate.png",
            "heldout_perplexity.png",
            "gain_vs_forgetting.png",
        ]
    )
    assert report["plots"] and set(report["plots"]) == set(pngs)
    for name in pngs:
        assert f"]({name})" in text
        assert png_ok(tmp_path / "report" / name), name
    # one curve row per checkpoint plus the baseline's
    for step in STEPS:
        assert re.search(rf"^\| {step} \|", text, re.M)
    assert re.search(r"^\| baseline \|", text, re.M)


def test_report_compares_runs_side_by_side(runs: dict, tmp_path: Path) -> None:
    ev = evaluate(
        [runs["legal"], runs["general"]], OPTS, baseline=runs["base"], all_checkpoints=False
    )
    md = write_report(ev, tmp_path / "cmp")
    report = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert [r["name"] for r in report["runs"]] == ["legal_run", "general_run"]
    for r in report["runs"]:
        (c,) = r["checkpoints"]
        assert c["comparison"]["domain_gain"] is not None
        assert c["comparison"]["forgetting"] is not None
    text = md.read_text()
    assert "| legal_run |" in text and "| general_run |" in text
    assert png_ok(tmp_path / "cmp" / "gain_vs_forgetting.png")


def test_corrupted_checkpoint_is_refused_naming_the_file(runs: dict, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(final(runs["legal"]), bad)
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        evaluate([bad], OPTS)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        evaluate([final(runs["legal"])], OPTS, baseline=bad)


@pytest.fixture
def no_scoring(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any model is scored: the refusal under test must come before that."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was scored before the refusal")

    monkeypatch.setattr(perplexity, "score_model", refuse)


def test_seq_length_past_the_models_positions_is_refused(
    runs: dict, prepared_corpora: dict, tmp_path: Path, no_scoring: None
) -> None:
    opts = EvalOptions(data=[str(prepared_corpora["legal"])], seq_length=128, device="cpu")
    with pytest.raises(ConfigError) as exc:
        evaluate([runs["base"]], opts)
    msg = str(exc.value)
    assert str(runs["base"] / "config.json") in msg and "64" in msg and "128" in msg
    assert "--seq-length" in msg
    # A baseline too (here the mixture's seq_length, 32, against 16 positions).
    short = save(tmp_path / "short", tiny_model(runs["vocab"], positions=16), 0, runs["tok"])
    with pytest.raises(ConfigError) as exc:
        evaluate([final(runs["legal"])], OPTS, baseline=short)
    msg = str(exc.value)
    assert str(short / "config.json") in msg and "16" in msg and "32" in msg


def test_every_checkpoint_is_checked_before_any_is_scored(
    runs: dict, tiny_tokenizer: Path, tmp_path: Path, no_scoring: None
) -> None:
    spec = (runs["legal"] / "run_spec.yaml").read_text()

    def run_copy(name: str) -> Path:
        run = tmp_path / name
        shutil.copytree(runs["legal"], run, symlinks=True)
        return run

    damaged = run_copy("damaged")
    weights = damaged / "checkpoints" / f"step_{STEPS[-1]:08d}" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        evaluate([damaged], OPTS)

    other_tok = run_copy("other_tok")  # a last checkpoint that carries another tokenizer
    save(other_tok, tiny_model(runs["vocab"]), 40, tiny_tokenizer, run_spec=spec)
    with pytest.raises(DataError, match="another tokenizer"):
        evaluate([other_tok], OPTS)

    small = run_copy("small_vocab")  # a last checkpoint whose vocabulary the data overflows
    save(small, tiny_model(300), 40, runs["tok"], run_spec=spec)
    with pytest.raises(DataError, match="outside the vocabulary"):
        evaluate([small], OPTS)

    short = run_copy("short_context")  # a last checkpoint with fewer positions than a window
    save(short, tiny_model(runs["vocab"], positions=16), 40, runs["tok"], run_spec=spec)
    with pytest.raises(ConfigError, match="max_position_embeddings is 16"):
        evaluate([short], OPTS)


def test_each_checkpoint_is_hashed_once(runs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    hashed: list[Path] = []
    real = checkpoint_load.check_files

    def counting(ckpt_dir: Path, manifest: Any, *, hash_files: bool = True) -> list[str]:
        if hash_files:
            hashed.append(ckpt_dir)
        return real(ckpt_dir, manifest, hash_files=hash_files)

    monkeypatch.setattr(checkpoint_load, "check_files", counting)
    ev = evaluate([runs["legal"]], EvalOptions(max_tokens=2 * SEQ, device="cpu"))
    scored = [ev.runs[0].baseline.path] + [c.path for c in ev.runs[0].checkpoints]
    assert sorted(hashed) == sorted(scored) and len(scored) == 1 + len(STEPS)


def test_max_tokens_less_than_a_window_is_refused(runs: dict, no_scoring: None) -> None:
    with pytest.raises(ConfigError, match="--max-tokens 5 is less than one window"):
        evaluate([final(runs["legal"])], EvalOptions(max_tokens=5, device="cpu"))


def test_a_heldout_split_shorter_than_a_window_is_reported(
    runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = prepare(tmp_path, runs["tok"], "short", 0.02)
    ev = evaluate([runs["base"]], EvalOptions(data=[str(prefix)], seq_length=SEQ, device="cpu"))
    (source,) = ev.eval_set.sources
    assert 0 < source.target_tokens < SEQ  # the premise: less than one window
    assert ev.runs[0].final.scores["short"].tokens == source.target_tokens
    err = capsys.readouterr().err
    assert "warning: short" in err and f"only {source.target_tokens} tokens" in err
    text = write_report(ev, tmp_path / "r").read_text()
    assert f"| short |  | {source.target_tokens} |" in text  # the real count, in the table
    assert f"shorter than one window: {source.target_tokens} predicted tokens" in text


def test_run_names_are_made_unique() -> None:
    targets = [Target(n, None, []) for n in ("legal", "legal", "legal-2", "legal")]
    _unique_names(targets)
    names = [t.name for t in targets]
    assert len(set(names)) == len(names) and names[0] == "legal"


def test_chunked_loss_equals_the_full_logits_cross_entropy(
    runs: dict, prepared_corpora: dict
) -> None:
    model = load_model(final(runs["legal"])).eval()
    stream = heldout_stream(prepared_corpora["legal"], 4 * (SEQ + 1))
    windows = torch.from_numpy(stream[: 4 * (SEQ + 1)]).view(4, SEQ + 1)
    with torch.no_grad():
        logits = model(input_ids=windows[:, :-1]).logits
    plain = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), windows[:, 1:].reshape(-1), reduction="none"
    )
    expected = plain.view(4, SEQ).double().sum(dim=1)
    for chunk in (7, SEQ, perplexity.LOSS_CHUNK):  # 7: many chunks, the last one partial
        got = perplexity.window_nats(model, windows, chunk=chunk)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def report_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_a_new_report_replaces_the_previous_one_whole(
    runs: dict, prepared_corpora: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = EvalOptions(max_tokens=2 * SEQ, device="cpu")
    with_gain = evaluate([runs["legal"]], small, all_checkpoints=False)
    by_prefix = EvalOptions(
        data=[str(prepared_corpora["legal"])], seq_length=SEQ, max_tokens=2 * SEQ, device="cpu"
    )
    without_gain = evaluate([final(runs["legal"])], by_prefix)  # no kinds: no gain chart
    out = tmp_path / "out"
    write_report(with_gain, out)
    assert "gain_vs_forgetting.png" in report_files(out)
    write_report(without_gain, out)
    files = report_files(out)
    report = json.loads(files["report.json"])
    assert "gain_vs_forgetting.png" not in files  # the previous report's chart is gone
    assert set(files) == {"report.md", "report.json", *report["plots"]}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left

    # A failure while writing leaves the previous report exactly as it was.
    write_report(with_gain, out)
    before = report_files(out)

    def disk_full(*args: Any) -> str:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report_module, "report_markdown", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_report(without_gain, out)
    assert report_files(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_out_dir_that_cannot_take_a_report_is_refused(runs: dict, tmp_path: Path) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep me")
    with pytest.raises(ConfigError, match="a file, not a directory"):
        check_report_dir(a_file)
    with pytest.raises(ConfigError, match=r"--out .*cannot write in .*file\.txt"):
        check_report_dir(a_file / "report")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    (notes / "report.md").write_text("an old report")
    with pytest.raises(ConfigError, match=r"not a midtrain report's \(todo\.txt\)"):
        check_report_dir(notes)
    assert check_report_dir(tmp_path / "new" / "dir") == tmp_path / "new" / "dir"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    # The CLI checks --out before anything else (here, before finding the checkpoint is missing).
    done = midtrain_cli("eval", str(tmp_path / "missing"), "--out", str(notes))
    assert done.returncode != 0 and "todo.txt" in done.stderr and "Traceback" not in done.stderr
    assert (notes / "todo.txt").read_text() == "mine" and (notes / "report.md").is_file()


def midtrain_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "midtrain.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=None if env is None else {**os.environ, **env},
        cwd=cwd,
    )


def test_cli_eval_writes_a_report_and_exits_nonzero_on_a_bad_checkpoint(
    runs: dict, tmp_path: Path
) -> None:
    options = ["--max-tokens", str(MAX_TOKENS), "--device", "cpu"]
    done = midtrain_cli("eval", str(runs["legal"]), "--out", str(tmp_path / "r"), *options)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "domain gain" in done.stderr and "forgetting" in done.stderr  # the summary table
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [c["step"] for c in report["runs"][0]["checkpoints"]] == list(STEPS)
    assert (tmp_path / "r" / "report.md").is_file()

    bad = tmp_path / "bad"
    shutil.copytree(final(runs["legal"]), bad)
    (bad / "model.safetensors").write_bytes(b"")
    done = midtrain_cli("eval", str(bad), "--out", str(tmp_path / "r2"), *options)
    assert done.returncode != 0 and "model.safetensors" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "r2" / "report.md").exists()


def prepare(tmp_path: Path, tok: Path, name: str, fraction: float) -> Path:
    corpus = tmp_path / f"{name}.jsonl"
    docs = [f"Clause {i}: the licensee shall keep notice {i} in every copy." for i in range(60)]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prefix = tmp_path / name
    prepare_corpus(
        PrepareConfig(
            inputs=[str(corpus)],
            tokenizer=str(tok),
            output=str(prefix),
            holdout_fraction=fraction,
            num_proc=1,
        )
    )
    return prefix


def test_heldout_from_another_tokenizer_names_both(
    runs: dict, tiny_tokenizer: Path, tmp_path: Path
) -> None:
    prefix = prepare(tmp_path, tiny_tokenizer, "other", 0.3)
    with pytest.raises(DataError) as exc:
        evaluate([runs["base"]], EvalOptions(data=[str(prefix)], seq_length=SEQ))
    msg = str(exc.value)
    assert str(prefix) in msg and str(tiny_tokenizer) in msg and str(runs["base"]) in msg


def test_empty_heldout_split_suggests_holdout_fraction(runs: dict, tmp_path: Path) -> None:
    prefix = prepare(tmp_path, runs["tok"], "nohold", 0.0)
    with pytest.raises(DataError, match="--holdout-fraction") as exc:
        evaluate([runs["base"]], EvalOptions(data=[str(prefix)], seq_length=SEQ))
    assert str(prefix) in str(exc.value)


def test_token_id_outside_the_model_vocabulary(runs: dict, prepared_corpora: dict) -> None:
    small = save(runs["root"] / "small_vocab", tiny_model(300), 0, runs["tok"])
    with pytest.raises(DataError, match="outside the vocabulary") as exc:
        evaluate([small], EvalOptions(data=[str(prepared_corpora["legal"])], seq_length=SEQ))
    assert "300" in str(exc.value) and str(small) in str(exc.value)


# --- downstream tasks (lm-evaluation-harness: the optional `eval` extra, installed by `make`) ---


def test_downstream_without_lm_eval_says_how_to_install(runs: dict, tmp_path: Path) -> None:
    # A Python where `import lm_eval` fails, as on an install without the extra.
    code = (
        "import sys; sys.modules['lm_eval'] = None\n"
        "from midtrain.evaluation.downstream import run_tasks\n"
        f"run_tasks({str(runs['base'])!r}, {str(EXAMPLE_TASKS)!r}, ['legal_continuation'], "
        f"{str(tmp_path / 'out')!r})"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0
    assert "MissingExtraError" in done.stderr and "pip install 'midtrain[eval]'" in done.stderr
    assert not (tmp_path / "out").exists()  # nothing was exported or written


def test_downstream_task_runs_in_lm_eval_on_the_exported_model(
    runs: dict, prepared_corpora: dict, tmp_path: Path
) -> None:
    from midtrain.evaluation.downstream import build_continuation_task, heldout_texts

    # A task from held-out legal text, short enough for the tiny model's 64 positions.
    texts = heldout_texts(prepared_corpora["legal"], load_tokenizer(prepared_corpora["tokenizer"]))
    tasks = tmp_path / "tasks"
    build_continuation_task(
        texts, tasks, "legal_continuation", items=12, context_words=8, continuation_words=4
    )
    ckpt = final(runs["legal"])
    # Launch variables of a training job (as in a Slurm step), with its rendezvous port taken:
    # the one-process evaluation must not try to join that group.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        launch_env = {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(busy.getsockname()[1]),
            "RANK": "0",
            "WORLD_SIZE": "2",
            "LOCAL_RANK": "0",
        }
        done = midtrain_cli(
            "eval-tasks",
            str(ckpt),
            "--tasks-dir",
            str(tasks),
            "--task",
            "legal_continuation",
            "--out",
            "out,1",  # relative (the harness runs from the tasks dir) and with a comma
            "--limit",
            "12",
            "--device",
            "cpu",
            env=launch_env,
            cwd=tmp_path,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout)
    saved = json.loads((tmp_path / "out,1" / "downstream.json").read_text())
    assert saved["checkpoint"] == str(ckpt) and saved["step"] == STEPS[-1]
    for results in (printed, saved["results"]):
        acc = results["legal_continuation"]["acc,none"]
        assert 0.0 <= acc <= 1.0 and acc * 12 == pytest.approx(round(acc * 12))  # k of 12 items
    assert not list((tmp_path / "out,1").glob(".hf-export-*"))  # the exported model is removed


def test_downstream_unknown_task_is_refused_before_any_work(runs: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = midtrain_cli(
        "eval-tasks",
        str(final(runs["legal"])),
        "--tasks-dir",
        str(EXAMPLE_TASKS),
        "--task",
        "legal_continuatoin",
        "--out",
        str(out),
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "--task legal_continuatoin" in done.stderr
    assert "legal_continuation" in done.stderr.split("defines:")[1]  # what the directory has
    assert not out.exists()  # nothing exported, nothing created


def test_continuation_task_from_heldout_text(prepared_corpora: dict, tmp_path: Path) -> None:
    from midtrain.evaluation.downstream import build_continuation_task, heldout_texts

    texts = heldout_texts(prepared_corpora["legal"], load_tokenizer(prepared_corpora["tokenizer"]))
    assert texts and all("<|endoftext|>" not in t for t in texts)
    path = build_continuation_task(
        texts, tmp_path, "legal_cont", items=20, context_words=20, continuation_words=8
    )
    spec = yaml.safe_load(path.read_text())
    assert spec["task"] == "legal_cont" and spec["output_type"] == "multiple_choice"
    assert (tmp_path / spec["dataset_kwargs"]["data_files"]["test"]).is_file()
    items = [json.loads(x) for x in (tmp_path / "legal_cont.jsonl").read_text().splitlines()]
    assert 0 < len(items) <= 20
    normalised = [" ".join(t.split()) for t in texts]
    for item in items:
        choices = item["choices"]
        assert len(choices) == 4 and len(set(choices)) == 4 and 0 <= item["label"] < 4
        real = f"{item['context']} {choices[item['label']]}"
        assert any(t.startswith(real) for t in normalised)


def test_example_task_is_well_formed() -> None:
    spec = yaml.safe_load((EXAMPLE_TASKS / "legal_continuation.yaml").read_text())
    data = EXAMPLE_TASKS / spec["dataset_kwargs"]["data_files"]["test"]
    items = [json.loads(x) for x in data.read_text().splitlines()]
    assert len(items) >= 20
    assert all(len(set(i["choices"])) == 4 and 0 <= i["label"] < 4 for i in items)


def test_data_prefixes_have_no_kind_and_no_gain_chart(
    runs: dict, prepared_corpora: dict, tmp_path: Path
) -> None:
    opts = EvalOptions(
        data=[str(prepared_corpora["legal"]), str(prepared_corpora["general"])],
        seq_length=16,
        max_tokens=400,
        device="cpu",
    )
    ev = evaluate([final(runs["legal"])], opts, baseline=runs["base"])
    assert ev.eval_set.seq_length == 16
    (comparison,) = ev.runs[0].comparisons()
    assert {c.metric for c in comparison.changes.values()} == {"change in loss"}
    assert comparison.domain_gain is None and comparison.forgetting is None
    md = write_report(ev, tmp_path / "r").read_text()
    assert not (tmp_path / "r" / "gain_vs_forgetting.png").exists()
    assert "gain_vs_forgetting.png" not in md and "](heldout_perplexity.png)" in md


def test_a_source_of_several_prefixes_reads_them_in_order(
    runs: dict, prepared_corpora: dict, tmp_path: Path
) -> None:
    mixture = tmp_path / "mix.yaml"
    paths = [str(prepared_corpora["legal"]), str(prepared_corpora["general"])]
    mixture.write_text(
        yaml.safe_dump(
            {
                "seq_length": SEQ,
                "sources": [{"name": "both", "kind": "customer", "path": paths, "weight": 1}],
            }
        )
    )
    ev = evaluate([runs["base"]], EvalOptions(mixture=str(mixture), max_tokens=10**9))
    (source,) = ev.eval_set.sources
    stream = np.concatenate([heldout_stream(Path(p), 10**9) for p in paths])
    assert source.target_tokens == stream.size - 1
    assert np.array_equal(np.concatenate([w[:-1] for w in source.windows]), stream[:-1])


def test_device_must_exist() -> None:
    from midtrain.evaluation.perplexity import pick_device

    assert pick_device("cpu").type == "cpu"
    with pytest.raises(ConfigError, match="--device 'gpu'"):
        pick_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            pick_device("cuda")


def test_baseline_is_the_checkpoint_a_run_branched_from(runs: dict, tmp_path: Path) -> None:
    # init_from may name a run directory; its `latest` moves on after the branch, so the
    # baseline comes from what the branch's checkpoints record (`parent`), not from the spec.
    from midtrain.evaluation.evaluate import find_target, start_checkpoint_of

    base_run = tmp_path / "base"
    shutil.copytree(runs["base"].parent.parent, base_run)
    branched_from = base_run / "checkpoints" / runs["base"].name
    model = tiny_model(runs["vocab"])
    spec = {"run_dir": str(tmp_path / "branch"), "init_from": {"checkpoint": str(base_run)}}
    with CheckpointSaver(tmp_path / "branch", log=None) as saver:
        meta = CheckpointMeta(step=5, tokens=5, lr=1e-3, phase="stable", parent=str(branched_from))
        saver.save(
            meta, model_state=model.state_dict(), config=model.config, run_spec=yaml.safe_dump(spec)
        )
    save(base_run, model, 7, runs["tok"])  # the base run goes on training
    target = find_target(tmp_path / "branch", all_checkpoints=False)
    assert start_checkpoint_of(target) == branched_from


def test_report_of_a_diverged_model_shows_infinite_perplexity(tmp_path: Path) -> None:
    from midtrain.evaluation.evaluate import Evaluation, RunEval
    from midtrain.evaluation.heldout import EvalSet, HeldOutSource, SourceSpec
    from midtrain.evaluation.perplexity import CheckpointScores, SourceScore

    def held_out(name: str, kind: str) -> HeldOutSource:
        return HeldOutSource(SourceSpec(name, kind, ("x",)), [np.zeros(3)], "fp", 1, 100, 300, "ab")

    def scores(step: int, legal: float, general: float) -> CheckpointScores:
        return CheckpointScores(
            tmp_path / f"step_{step}",
            step,
            step * 10,
            {
                "legal": SourceScore("legal", "customer", 100, 300, legal * 100),
                "general": SourceScore("general", "curated", 100, 300, general * 100),
            },
        )

    eval_set = EvalSet(128, 100, [held_out("legal", "customer"), held_out("general", "curated")])
    diverged = [scores(1, 4.0, 3.0), scores(2, 800.0, 900.0)]  # exp(800) is past float range
    ev = Evaluation(eval_set, [RunEval("r", None, diverged, scores(0, 4.0, 3.0), [])])
    md = write_report(ev, tmp_path / "report").read_text()
    assert "inf" in md
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    last = report["runs"][0]["checkpoints"][-1]["sources"]["legal"]
    assert last["loss"] == 800.0 and last["perplexity"] is None  # strict JSON: inf -> null
