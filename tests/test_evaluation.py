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
from midtrain.data_mixing.indexed import open_indexed
from midtrain.data_mixing.prepare import PrepareConfig, prepare_corpus
from midtrain.data_mixing.stats import holdout_prefix
from midtrain.data_mixing.tokenizer import load_tokenizer
from midtrain.errors import CheckpointError, ConfigError, DataError
from midtrain.evaluation import EvalOptions, evaluate, write_report
from midtrain.evaluation.heldout import make_windows

SEQ = 32
MAX_TOKENS = 1500
STEPS = (10, 20, 30)
EXAMPLE_TASKS = Path(__file__).parent.parent / "examples" / "tasks"
OPTS = EvalOptions(max_tokens=MAX_TOKENS, batch_size=16, device="cpu")


def tiny_model(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=vocab,
        max_position_embeddings=64,
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


def test_windows_are_identical_whichever_model_comes_first(runs: dict) -> None:
    a = evaluate([final(runs["legal"])], OPTS).eval_set
    b = evaluate([final(runs["general"])], OPTS).eval_set
    assert a.seq_length == SEQ  # from the mixture in the run spec
    assert [s.digest for s in a.sources] == [s.digest for s in b.sources]
    assert all(
        np.array_equal(x, y)
        for sa, sb in zip(a.sources, b.sources, strict=True)
        for x, y in zip(sa.windows, sb.windows, strict=True)
    )


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

    text = md.read_text()
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


def midtrain_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "midtrain.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=None if env is None else {**os.environ, **env},
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
            str(tmp_path / "out"),
            "--limit",
            "12",
            "--device",
            "cpu",
            env=launch_env,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout)
    saved = json.loads((tmp_path / "out" / "downstream.json").read_text())
    assert saved["checkpoint"] == str(ckpt) and saved["step"] == STEPS[-1]
    for results in (printed, saved["results"]):
        acc = results["legal_continuation"]["acc,none"]
        assert 0.0 <= acc <= 1.0 and acc * 12 == pytest.approx(round(acc * 12))  # k of 12 items
    assert not list((tmp_path / "out").glob(".hf-export-*"))  # the exported model is cleaned up


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
