"""`data prepare`: every input format round-trips, bad records are counted (or fatal), outputs are
complete or absent, and the held-out split is stable."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import stdlib_texts
from transformers import AutoTokenizer

from midtrain import console
from midtrain.data_mixing import prepare as prepare_module
from midtrain.data_mixing.indexed import IndexedWriter, open_indexed, write_indexed
from midtrain.data_mixing.prepare import PrepareConfig, holdout_score, prepare_corpus
from midtrain.data_mixing.stats import holdout_prefix, load_stats, stats_path
from midtrain.data_mixing.tokenizer import tokenizer_fingerprint, train_tokenizer
from midtrain.errors import DataError
from midtrain.fileio import sha256_file

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x + 1\n",
    "Unicode: é, ß, 中文, emoji 🙂 and a tab\there.",
    "  leading and trailing spaces are kept  ",
    "line one\nline two\nline three",
]


def direct(tokenizer_dir: Path, texts: list[str]) -> list[list[int]]:
    """What prepare must store: AutoTokenizer's ids (no special tokens) + the eos id."""
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return [tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id] for t in texts]


def stored(prefix: Path | str) -> list[list[int]]:
    """Documents of PREFIX.bin/.idx, read by megatron-core itself."""
    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


def prepare(tok: Path, inputs: list[Path | str], out: Path, **kw: object) -> dict:
    kw.setdefault("num_proc", 1)
    cfg = PrepareConfig(inputs=[str(i) for i in inputs], tokenizer=str(tok), output=str(out), **kw)
    return prepare_corpus(cfg)


def jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def files_of(prefix: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in prefix.parent.iterdir() if p.is_file()}


# --- formats --------------------------------------------------------------------------------------


def write_input(kind: str, root: Path, texts: list[str]) -> tuple[Path, list[str], dict]:
    """An input of ``kind`` holding ``texts``; returns it, the documents it holds, prepare kwargs."""
    if kind == "jsonl":
        return (
            jsonl(root / "c.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)]),
            texts,
            {},
        )
    if kind == "jsonl.gz":
        path = root / "c.jsonl.gz"
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
        return path, texts, {}
    if kind == "parquet":
        path = root / "c.parquet"
        pq.write_table(pa.table({"id": list(range(len(texts))), "content": texts}), path)
        return path, texts, {"text_field": "content"}
    if kind == "txt":
        (root / "docs").mkdir()
        for i, t in enumerate(texts):
            (root / "docs" / f"{i:02d}.txt").write_text(t, encoding="utf-8")
        return root / "docs", texts, {}
    if kind == "txt-paragraphs":
        path = root / "c.txt"
        path.write_text("\n\n\n".join(texts) + "\n", encoding="utf-8")
        return path, texts, {"paragraphs": True}
    if kind == "saved":
        from datasets import Dataset

        Dataset.from_dict({"text": texts}).save_to_disk(str(root / "saved"))
        return root / "saved", texts, {}
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "parquet", "txt", "txt-paragraphs", "saved"])
def test_round_trip_equals_direct_tokenization(
    kind: str, tiny_tokenizer: Path, tmp_path: Path
) -> None:
    texts = TEXTS if kind != "txt-paragraphs" else [t for t in TEXTS if "\n\n" not in t]
    if kind == "txt-paragraphs":  # a paragraph is a block of non-blank lines
        texts = [t.strip() for t in texts]
    source, docs, kw = write_input(kind, tmp_path, texts)
    stats = prepare(tiny_tokenizer, [source], tmp_path / "out" / "corpus", **kw)
    expected = direct(tiny_tokenizer, docs)
    assert stored(tmp_path / "out" / "corpus") == expected
    assert stats["documents"] == len(docs)
    assert stats["tokens"] == sum(map(len, expected))
    assert stats["rejected"] == {}


def test_txt_paragraph_mode_splits_on_blank_lines(tiny_tokenizer: Path, tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("first para\nstill first\n\n  \n\nsecond\n\nthird\n", encoding="utf-8")
    prepare(tiny_tokenizer, [path], tmp_path / "par", paragraphs=True)
    assert stored(tmp_path / "par") == direct(
        tiny_tokenizer, ["first para\nstill first", "second", "third"]
    )
    prepare(tiny_tokenizer, [path], tmp_path / "doc")  # one document per file
    assert stored(tmp_path / "doc") == direct(tiny_tokenizer, [path.read_text(encoding="utf-8")])


def test_worker_processes_write_the_same_bytes(tiny_tokenizer: Path, tmp_path: Path) -> None:
    paragraphs = [p for text in stdlib_texts() for p in text.split("\n\n") if p.strip()]
    source = jsonl(tmp_path / "c.jsonl", [{"text": p} for p in paragraphs[:300]])
    one = prepare(tiny_tokenizer, [source], tmp_path / "one" / "c", holdout_fraction=0.2)
    # small batches: many in flight at once, which must still be written in input order
    two = prepare(
        tiny_tokenizer,
        [source],
        tmp_path / "two" / "c",
        holdout_fraction=0.2,
        num_proc=2,
        batch_size=7,
    )
    for suffix in (".bin", ".idx", ".holdout.bin", ".holdout.idx"):
        assert (tmp_path / "one" / f"c{suffix}").read_bytes() == (
            tmp_path / "two" / f"c{suffix}"
        ).read_bytes()
    assert one["tokens"] == two["tokens"] and one["holdout_documents"] > 0


def test_directories_and_globs(tiny_tokenizer: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    jsonl(data / "b.jsonl", [{"text": "bee"}])
    jsonl(data / "sub" / "a.jsonl", [{"text": "ay"}])
    (data / "notes.md").write_text("not a corpus file", encoding="utf-8")
    (data / ".hidden.jsonl").write_text('{"text": "hidden"}\n', encoding="utf-8")
    stats = prepare(tiny_tokenizer, [data], tmp_path / "dir")
    assert stored(tmp_path / "dir") == direct(tiny_tokenizer, ["bee", "ay"])  # sorted walk
    assert [i["path"] for i in stats["inputs"]] == [
        str(data / "b.jsonl"),
        str(data / "sub" / "a.jsonl"),
    ]
    # a glob, and the same file twice: read once
    stats = prepare(tiny_tokenizer, [data / "**" / "*.jsonl", data / "b.jsonl"], tmp_path / "glob")
    assert stats["documents"] == 2
    with pytest.raises(DataError, match="matches no file"):
        prepare(tiny_tokenizer, [data / "*.parquet"], tmp_path / "none")
    with pytest.raises(DataError, match="unsupported file type"):
        prepare(tiny_tokenizer, [data / "notes.md"], tmp_path / "none")


def test_names_with_brackets_and_stars_are_read_as_they_are(
    tiny_tokenizer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # [2024] in the current directory, [1] and * in real file names: all are literal names
    project = tmp_path / "proj[2024]"
    project.mkdir()
    jsonl(project / "part[1].jsonl", [{"text": "one one one"}])
    jsonl(project / "a*b.jsonl", [{"text": "two two two"}])
    monkeypatch.chdir(project)
    stats = prepare(tiny_tokenizer, ["part[1].jsonl", "a*b.jsonl"], Path("out[1]") / "c")
    assert stored(project / "out[1]" / "c") == direct(
        tiny_tokenizer, ["one one one", "two two two"]
    )
    assert [i["path"] for i in stats["inputs"]] == [
        str(project / "part[1].jsonl"),
        str(project / "a*b.jsonl"),
    ]
    # a glob that does not exist as a name is still a glob, relative to a bracketed directory
    stats = prepare(tiny_tokenizer, ["*.jsonl", "."], Path("out[1]") / "g")
    assert stats["documents"] == 2 and stats["rejected"] == {}
    tok = train_tokenizer(["part[1].jsonl", "."], 300, "tok[2]")
    assert tok == project / "tok[2]"
    # it learned from both files: each word is one token
    trained = AutoTokenizer.from_pretrained(str(tok))
    assert len(trained("one", add_special_tokens=False).input_ids) == 1
    assert len(trained("two", add_special_tokens=False).input_ids) == 1


def test_output_inside_an_input_directory_is_not_read_back(
    tiny_tokenizer: Path, tmp_path: Path
) -> None:
    data = tmp_path / "dd"
    data.mkdir()
    jsonl(data / "corpus.jsonl", [{"text": t} for t in TEXTS])
    first = prepare(tiny_tokenizer, [data], data / "prepared", strict=True, holdout_fraction=0.3)
    files = files_of(data / "prepared")
    assert "prepared.stats.json" in files and first["holdout_documents"] > 0
    # the second run sees its own stats, .bin/.idx and holdout files: it reads none of them
    for inputs in ([data], [data / "*"], [data / "**" / "*.json*"]):
        again = prepare(
            tiny_tokenizer, inputs, data / "prepared", strict=True, holdout_fraction=0.3
        )
        assert again["inputs"] == first["inputs"] and again["rejected"] == {}
        assert files_of(data / "prepared") == files
    with pytest.raises(DataError, match="holds no corpus file"):
        prepare(tiny_tokenizer, [data / "*.json"], tmp_path / "x")  # only prepared.stats.json


def test_symlinked_directories_are_walked_and_loops_end(
    tiny_tokenizer: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    jsonl(elsewhere / "b.jsonl", [{"text": "linked"}])
    data = tmp_path / "data"
    data.mkdir()
    jsonl(data / "a.jsonl", [{"text": "own"}])
    (data / "link").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(data, target_is_directory=True)  # data -> link -> loop -> data
    stats = prepare(tiny_tokenizer, [data], tmp_path / "c")
    assert stored(tmp_path / "c") == direct(tiny_tokenizer, ["own", "linked"])
    assert [i["path"] for i in stats["inputs"]] == [
        str(data / "a.jsonl"),
        str(data / "link" / "b.jsonl"),
    ]
    # the same as the glob, which also follows the link
    assert prepare(tiny_tokenizer, [data / "*" / "*.jsonl"], tmp_path / "g")["documents"] == 1


# --- bad input ------------------------------------------------------------------------------------


def write_bad_inputs(root: Path) -> list[Path]:
    bad = root / "bad.jsonl"
    bad.write_bytes(
        b'{"text": "good one"}\n'  # 1
        b"not json\n"  # 2
        b"\n"  # 3: blank lines are skipped, not counted
        b'["a list"]\n'  # 4
        b'{"title": "no text"}\n'  # 5
        b'{"text": 42}\n'  # 6
        b'{"text": "   "}\n'  # 7
        b'{"text": "caf\xe9"}\n'  # 8: latin-1, not UTF-8
        b'{"text": null}\n'  # 9
        b'{"text": ""}\n'  # 10
        b"{broken\n"  # 11
        b'{"text": "good two"}\n'  # 12
    )
    empty = root / "empty.jsonl"
    empty.write_bytes(b"")
    txt = root / "bad.txt"
    txt.write_bytes(b"para one\n\npara two\nhas a bad byte \xff here\n")
    table = pa.table({"text": ["row one", None, "  ", "row four"]})
    pq.write_table(table, root / "rows.parquet")
    pq.write_table(pa.table({"body": ["x", "y"]}), root / "nofield.parquet")
    return [bad, empty, txt, root / "rows.parquet", root / "nofield.parquet"]


def test_bad_records_are_counted_with_their_first_location(
    tiny_tokenizer: Path, tmp_path: Path
) -> None:
    inputs = write_bad_inputs(tmp_path)
    stats = prepare(tiny_tokenizer, inputs, tmp_path / "out" / "c", paragraphs=True)
    bad, empty, txt, rows, nofield = (str(p) for p in inputs)
    assert stats["rejected"] == {
        "empty_file": 1,
        "empty_text": 3,
        "invalid_json": 2,
        "invalid_utf8": 2,
        "missing_field": 3,
        "not_a_string": 3,
        "not_an_object": 1,
    }
    assert stats["rejected_examples"] == {
        "invalid_json": f"{bad}:2",
        "not_an_object": f"{bad}:4",
        "missing_field": f"{bad}:5",
        "not_a_string": f"{bad}:6",
        "empty_text": f"{bad}:7",
        "invalid_utf8": f"{bad}:8",
        "empty_file": empty,
    }
    good = ["good one", "good two", "para one", "row one", "row four"]
    assert stored(tmp_path / "out" / "c") == direct(tiny_tokenizer, good)  # nothing empty
    assert [i["documents"] for i in stats["inputs"]] == [2, 0, 1, 2, 0]


def test_invalid_utf8_in_txt_names_its_line(tiny_tokenizer: Path, tmp_path: Path) -> None:
    path = tmp_path / "doc.txt"
    path.write_bytes(b"ok\nok\nbad \xc3\x28 byte\nok\n")
    jsonl(tmp_path / "good.jsonl", [{"text": "fine"}])
    stats = prepare(tiny_tokenizer, [path, tmp_path / "good.jsonl"], tmp_path / "out")
    assert stats["rejected_examples"] == {"invalid_utf8": f"{path}:3"}


@pytest.mark.parametrize(
    ("content", "where", "message"),
    [
        (b'{"text": "ok"}\nnope\n', 2, "not valid JSON"),
        (b'{"text": "ok"}\n\n7\n', 3, "not a JSON object"),
        (b'{"text": "ok"}\n{"body": "x"}\n', 2, "no 'text' field"),
        (b'{"text": ["x"]}\n', 1, "the 'text' field is not a string"),
        (b'{"text": "ok"}\n{"text": "\\n\\t "}\n', 2, "empty or whitespace-only"),
        (b'{"text": "ok"}\n{"text": "\xff"}\n', 2, "not valid UTF-8"),
        (b'{"text": "\\ud800 lone surrogate"}\n', 1, "not valid UTF-8"),
    ],
)
def test_strict_fails_on_the_first_bad_record(
    content: bytes, where: int, message: str, tiny_tokenizer: Path, tmp_path: Path
) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(content)
    out = tmp_path / "out" / "c"
    with pytest.raises(DataError, match=re.escape(f"{path}:{where}: {message}")):
        prepare(tiny_tokenizer, [path], out, strict=True)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []  # nothing left behind


def test_strict_fails_on_an_empty_file(tiny_tokenizer: Path, tmp_path: Path) -> None:
    good = jsonl(tmp_path / "good.jsonl", [{"text": "fine"}])
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(DataError, match=f"{tmp_path / 'empty.txt'}: empty file"):
        prepare(tiny_tokenizer, [good, tmp_path / "empty.txt"], tmp_path / "c", strict=True)


def test_parquet_and_saved_datasets_without_rows_are_empty_files(
    tiny_tokenizer: Path, tmp_path: Path
) -> None:
    from datasets import Dataset, DatasetDict

    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "none.parquet")
    Dataset.from_dict({"text": []}).save_to_disk(str(tmp_path / "none_saved"))
    DatasetDict(
        {"train": Dataset.from_dict({"text": ["kept"]}), "test": Dataset.from_dict({"text": []})}
    ).save_to_disk(str(tmp_path / "half_empty"))
    inputs = [tmp_path / "none.parquet", tmp_path / "none_saved", tmp_path / "half_empty"]
    stats = prepare(tiny_tokenizer, inputs, tmp_path / "c")
    assert stored(tmp_path / "c") == direct(tiny_tokenizer, ["kept"])
    assert stats["rejected"] == {"empty_file": 2}
    assert stats["rejected_examples"] == {"empty_file": str(tmp_path / "none.parquet")}
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'none_saved'}: empty file")):
        prepare(tiny_tokenizer, [tmp_path / "none_saved"], tmp_path / "d", strict=True)


def test_missing_input_is_counted_or_fails_in_strict_mode(
    tiny_tokenizer: Path, tmp_path: Path
) -> None:
    good = jsonl(tmp_path / "good.jsonl", [{"text": "fine"}])
    missing = tmp_path / "missing.jsonl"
    out = tmp_path / "strict" / "c"
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        prepare(tiny_tokenizer, [good, missing], out, strict=True)
    assert not out.parent.exists()  # checked before anything is written

    stats = prepare(tiny_tokenizer, [good, missing], tmp_path / "lenient" / "c")
    assert stats["documents"] == 1
    assert stats["rejected"] == {"missing_file": 1}
    assert stats["rejected_examples"] == {"missing_file": str(missing)}
    assert [i["path"] for i in stats["inputs"]] == [str(good)]

    with pytest.raises(DataError, match="none of the inputs exists"):
        prepare(tiny_tokenizer, [missing], tmp_path / "none" / "c")
    assert not (tmp_path / "none").exists()


def test_all_records_rejected_is_an_error(tiny_tokenizer: Path, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"body": "x"}\n{"text": ""}\n', encoding="utf-8")
    with pytest.raises(DataError, match=f"every record was rejected.*first at {path}:1"):
        prepare(tiny_tokenizer, [path], tmp_path / "out" / "c")
    assert list((tmp_path / "out").iterdir()) == []


# --- outputs --------------------------------------------------------------------------------------


def test_stats_fields(
    tiny_tokenizer: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(console.console, "width", 300)  # the summary's locations on one line
    a = jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS] + [{"text": ""}])
    b = jsonl(tmp_path / "b.jsonl", [{"text": "one more"}])
    prefix = tmp_path / "out" / "corpus"
    stats = prepare(tiny_tokenizer, [a, b], prefix, holdout_fraction=0.5)
    assert load_stats(prefix) == json.loads(stats_path(prefix).read_text()) == stats
    train, held = stored(prefix), stored(holdout_prefix(prefix))
    assert stats["documents"] == len(train) and stats["holdout_documents"] == len(held)
    assert stats["tokens"] == sum(map(len, train))
    assert stats["holdout_tokens"] == sum(map(len, held))
    assert sorted(train + held) == sorted(direct(tiny_tokenizer, TEXTS + ["one more"]))
    assert stats["rejected"] == {"empty_text": 1}
    assert stats["rejected_examples"] == {"empty_text": f"{a}:6"}
    assert stats["tokenizer"] == {
        "path": str(tiny_tokenizer),
        "fingerprint": tokenizer_fingerprint(tiny_tokenizer),
        "vocab_size": 400,
        "eod_id": AutoTokenizer.from_pretrained(str(tiny_tokenizer)).eos_token_id,
    }
    assert stats["inputs"] == [
        {"path": str(a), "sha256": sha256_file(a), "documents": 5},
        {"path": str(b), "sha256": sha256_file(b), "documents": 1},
    ]
    assert (stats["dtype"], stats["text_field"], stats["holdout_fraction"]) == (
        "uint16",
        "text",
        0.5,
    )
    err = capsys.readouterr().err  # the summary
    assert "holdout documents" in err and f"{a}:6" in err


def test_holdout_split_is_stable_when_data_is_appended(
    tiny_tokenizer: Path, tmp_path: Path
) -> None:
    texts = [f"document number {i}: {'x' * (i % 7)}" for i in range(300)]
    first = jsonl(tmp_path / "first.jsonl", [{"text": t} for t in texts[:200]])
    prepare(tiny_tokenizer, [first], tmp_path / "v1", holdout_fraction=0.25)
    jsonl(tmp_path / "more.jsonl", [{"text": t} for t in texts[200:]])
    prepare(
        tiny_tokenizer, [first, tmp_path / "more.jsonl"], tmp_path / "v2", holdout_fraction=0.25
    )

    ids = dict(zip(map(tuple, direct(tiny_tokenizer, texts)), texts, strict=True))
    held_v1 = {ids[tuple(d)] for d in stored(holdout_prefix(tmp_path / "v1"))}
    held_v2 = {ids[tuple(d)] for d in stored(holdout_prefix(tmp_path / "v2"))}
    assert held_v2 & set(texts[:200]) == held_v1  # the old documents stay where they were
    assert held_v1 == {t for t in texts[:200] if holdout_score(t) < 0.25}
    assert 30 <= len(held_v1) <= 70  # about a quarter (fixed texts, so no flakiness)
    train_v2 = {ids[tuple(d)] for d in stored(tmp_path / "v2")}
    assert train_v2 | held_v2 == set(texts) and not train_v2 & held_v2


def test_no_holdout_files_without_a_holdout_fraction(tiny_tokenizer: Path, tmp_path: Path) -> None:
    source = jsonl(tmp_path / "c.jsonl", [{"text": t} for t in TEXTS])
    prefix = tmp_path / "c"
    prepare(tiny_tokenizer, [source], prefix, holdout_fraction=0.5)
    assert Path(f"{holdout_prefix(prefix)}.idx").exists()
    stats = prepare(tiny_tokenizer, [source], prefix)
    assert stats["holdout_documents"] == 0 and stats["documents"] == len(TEXTS)
    assert not Path(f"{holdout_prefix(prefix)}.idx").exists()  # a stale split is removed
    assert not Path(f"{holdout_prefix(prefix)}.bin").exists()


def test_an_empty_holdout_split_is_readable(tiny_tokenizer: Path, tmp_path: Path) -> None:
    text = next(t for t in (f"doc {i}" for i in range(100)) if holdout_score(t) >= 0.01)
    source = jsonl(tmp_path / "c.jsonl", [{"text": text}])
    stats = prepare(tiny_tokenizer, [source], tmp_path / "c", holdout_fraction=0.01)
    assert stats["holdout_documents"] == 0
    assert len(IndexedDataset(holdout_prefix(tmp_path / "c"))) == 0
    assert len(open_indexed(holdout_prefix(tmp_path / "c"))) == 0


def test_rerun_replaces_the_output(tiny_tokenizer: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "c"
    prepare(tiny_tokenizer, [jsonl(tmp_path / "a.jsonl", [{"text": "old"}])], prefix)
    prepare(tiny_tokenizer, [jsonl(tmp_path / "b.jsonl", [{"text": "new text"}])], prefix)
    assert stored(prefix) == direct(tiny_tokenizer, ["new text"])
    assert load_stats(prefix)["inputs"][0]["path"] == str(tmp_path / "b.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from midtrain.data_mixing import indexed
    from midtrain.data_mixing.prepare import PrepareConfig, prepare_corpus

    # Die by SIGKILL in the middle of writing: after the third batch reached the .bin file.
    add = indexed.IndexedWriter.add_documents
    calls = []
    def add_then_die(self, tokens, lengths):
        add(self, tokens, lengths)
        calls.append(1)
        if len(calls) == 6:  # train + holdout writer per batch
            self._builder.data_file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    indexed.IndexedWriter.add_documents = add_then_die

    tok, out, *inputs = sys.argv[1:]
    prepare_corpus(PrepareConfig(inputs=inputs, tokenizer=tok, output=out, num_proc=1,
                                 batch_size=2, holdout_fraction=0.2))
    """
)


def run_killed(tok: Path, prefix: Path, source: Path) -> None:
    env = {**os.environ, "MIDTRAIN_NO_PROGRESS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(tok), str(prefix), str(source)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_killed_run_leaves_nothing_complete(tiny_tokenizer: Path, tmp_path: Path) -> None:
    source = jsonl(tmp_path / "c.jsonl", [{"text": f"doc {i}"} for i in range(20)])
    prefix = tmp_path / "out" / "c"

    # no previous output: nothing that looks complete, only the dead run's work directory
    run_killed(tiny_tokenizer, prefix, source)
    assert not stats_path(prefix).exists()
    assert not Path(f"{prefix}.bin").exists() and not Path(f"{prefix}.idx").exists()
    with pytest.raises(DataError):
        load_stats(prefix)
    leftovers = [p for p in prefix.parent.iterdir() if p.name.startswith(".c.prepare-")]
    assert leftovers and any(any(p.rglob("*.bin")) for p in leftovers)

    # a previous complete output survives a killed re-run byte for byte
    prepare(tiny_tokenizer, [source], prefix, holdout_fraction=0.2)
    assert not any(p.exists() for p in leftovers)  # the dead run's work dir was cleaned up
    before = files_of(prefix)
    run_killed(tiny_tokenizer, prefix, source)
    assert files_of(prefix) == before
    assert load_stats(prefix)["documents"] == len(stored(prefix))


# --- indexed datasets -----------------------------------------------------------------------------


def test_large_vocabulary_is_stored_as_int32(tmp_path: Path) -> None:
    docs = [[1, 2, 70_000], [65_535, 3]]
    write_indexed(tmp_path / "big", docs, vocab_size=80_000)
    ds = open_indexed(tmp_path / "big")
    assert ds.index.dtype == np.int32 and [ds[i].tolist() for i in range(2)] == docs
    write_indexed(tmp_path / "small", [[1, 2]], vocab_size=1000)
    assert open_indexed(tmp_path / "small").index.dtype == np.uint16


@pytest.mark.parametrize("vocab_size", [300, 80_000])
@pytest.mark.parametrize("n", [0, 1, 3000])
def test_index_is_byte_identical_to_megatron_cores_builder(
    vocab_size: int, n: int, tmp_path: Path
) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(n)
    docs = [rng.integers(0, vocab_size, int(rng.integers(1, 40))) for _ in range(n)]
    with IndexedWriter(tmp_path / "ours", vocab_size) as writer:
        for start in range(0, n, 700):  # batches: the length buffer grows several times
            batch = docs[start : start + 700]
            writer.add_documents(np.concatenate(batch), np.array([len(d) for d in batch]))
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=writer.dtype)
    for doc in docs:
        builder.add_item(torch.from_numpy(doc))
        builder.end_document()
    builder.finalize(str(tmp_path / "ref.idx"))
    assert (tmp_path / "ours.idx").read_bytes() == (tmp_path / "ref.idx").read_bytes()
    if n:  # (an empty dataset's .bin holds one padding element, see IndexedWriter.finish)
        assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "ref.bin").read_bytes()


def test_writer_memory_does_not_grow_a_python_object_per_document(tmp_path: Path) -> None:
    import tracemalloc

    lengths = np.ones(10_000, np.int64)
    tokens = np.ones(10_000, np.uint16)
    writer = IndexedWriter(tmp_path / "c", vocab_size=300)
    tracemalloc.start()
    try:
        for _ in range(50):  # 500,000 documents
            writer.add_documents(tokens, lengths)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        writer.abort()
    # a Python int per length and per document index: about 40 MB; int32 lengths: 2-4 MB
    assert peak < 8 << 20, f"{peak / 2**20:.1f} MiB"


def test_writer_rejects_ids_outside_the_vocabulary(tmp_path: Path) -> None:
    with (
        pytest.raises(DataError, match="outside the vocabulary"),
        IndexedWriter(tmp_path / "c", vocab_size=100) as writer,
    ):
        writer.add_document([1, 2, 300])
    assert list(tmp_path.iterdir()) == []  # aborted: no temporary files left


def test_open_indexed_reports_missing_and_damaged_files(tmp_path: Path) -> None:
    prefix = tmp_path / "c"
    with pytest.raises(DataError, match=r"c\.bin: no such file"):
        open_indexed(prefix)
    write_indexed(prefix, [[1, 2, 3], [4, 5]], vocab_size=10)
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    good_idx, good_bin = idx.read_bytes(), bin_.read_bytes()

    bin_.write_bytes(good_bin[:-2])
    with pytest.raises(DataError, match="truncated"):
        open_indexed(prefix)
    bin_.write_bytes(good_bin)
    idx.write_bytes(good_idx[:-8])
    with pytest.raises(DataError, match="truncated or corrupt index"):
        open_indexed(prefix)
    idx.write_bytes(b"NOTANIDX!" + good_idx[9:])
    with pytest.raises(DataError, match="bad header"):
        open_indexed(prefix)
    idx.write_bytes(good_idx[:20])
    with pytest.raises(DataError, match="truncated index"):
        open_indexed(prefix)
    idx.write_bytes(good_idx)
    ds = open_indexed(prefix)  # keep it: megatron unmaps the file when the dataset is collected
    assert [ds[i].tolist() for i in range(2)] == [[1, 2, 3], [4, 5]]


def test_saved_dataset_dict_reads_every_split(tiny_tokenizer: Path, tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    splits = {
        "train": Dataset.from_dict({"text": ["a b", "c"]}),
        "test": Dataset.from_dict({"text": ["d"]}),
    }
    DatasetDict(splits).save_to_disk(str(tmp_path / "dd"))
    stats = prepare(tiny_tokenizer, [tmp_path / "dd"], tmp_path / "c")
    assert stored(tmp_path / "c") == direct(tiny_tokenizer, ["a b", "c", "d"])
    assert stats["inputs"][0]["documents"] == 3

    Dataset.from_dict({"body": ["x", "y"]}).save_to_disk(str(tmp_path / "nofield"))
    jsonl(tmp_path / "ok.jsonl", [{"text": "ok"}])
    stats = prepare(tiny_tokenizer, [tmp_path / "nofield", tmp_path / "ok.jsonl"], tmp_path / "d")
    assert stats["rejected"] == {"missing_field": 2}
    assert stats["rejected_examples"] == {"missing_field": f"{tmp_path / 'nofield'}:1"}


@pytest.mark.parametrize("name", ["bad.jsonl.gz", "bad.parquet"])
def test_unreadable_file_is_an_error_naming_it(
    name: str, tiny_tokenizer: Path, tmp_path: Path
) -> None:
    (tmp_path / name).write_bytes(b"this is neither gzip nor parquet")
    out = tmp_path / "out" / "c"
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / name}: cannot read it")):
        prepare(tiny_tokenizer, [tmp_path / name], out)
    assert list(out.parent.iterdir()) == []


# --- compressed files, encodings, special tokens --------------------------------------------------


def compress(path: Path, data: bytes) -> Path:
    """``data`` written to ``path``, compressed by its suffix."""
    import bz2
    import lzma

    import zstandard

    compressors = {
        ".gz": gzip.compress,
        ".bz2": bz2.compress,
        ".xz": lzma.compress,
        ".zst": zstandard.ZstdCompressor().compress,
    }
    path.write_bytes(compressors.get(path.suffix, bytes)(data))
    return path


@pytest.mark.parametrize(
    "name", ["c.jsonl", "c::1.jsonl.gz", "c.json.zst", "c.jsonl.bz2", "c.jsonl.xz"]
)
def test_jsonl_is_read_as_bytes_compressed_or_not(
    name: str, tiny_tokenizer: Path, tmp_path: Path
) -> None:
    # UTF-8 as it is (not \u escapes), a blank line, a bad byte and \r\n: the bad line alone is
    # rejected, at its own line number
    good = ["Привет, “мир” — 10 €", "café Åland"]
    lines = [
        json.dumps({"text": good[0]}, ensure_ascii=False).encode() + b"\r\n",
        b"\n",
        b'{"text": "bad \xff byte"}\n',
        json.dumps({"text": good[1]}, ensure_ascii=False).encode() + b"\n",
    ]
    path = compress(tmp_path / name, b"".join(lines))
    stats = prepare(tiny_tokenizer, [path], tmp_path / "c")
    assert stored(tmp_path / "c") == direct(tiny_tokenizer, good)
    assert stats["rejected"] == {"invalid_utf8": 1}
    assert stats["rejected_examples"] == {"invalid_utf8": f"{path}:3"}


@pytest.mark.parametrize("paragraphs", [False, True])
def test_txt_is_read_compressed_or_not(
    paragraphs: bool, tiny_tokenizer: Path, tmp_path: Path
) -> None:
    text = "première partie\n\nseconde partie\n"
    inputs = [
        compress(tmp_path / f"t{ext}", text.encode()) for ext in (".txt", ".txt.gz", ".txt.zst")
    ]
    stats = prepare(tiny_tokenizer, inputs, tmp_path / "c", paragraphs=paragraphs)
    docs = ["première partie", "seconde partie"] if paragraphs else [text]
    assert stored(tmp_path / "c") == direct(tiny_tokenizer, docs * 3)
    assert stats["rejected"] == {}


def test_a_byte_order_mark_is_not_text(tiny_tokenizer: Path, tmp_path: Path) -> None:
    bom = b"\xef\xbb\xbf"
    inputs = [
        compress(tmp_path / "a.jsonl", bom + b'{"text": "first"}\r\n{"text": "second"}\r\n'),
        compress(tmp_path / "b.jsonl.gz", bom + b'{"text": "third"}\n'),
        compress(tmp_path / "c.txt", bom + b"a txt file\r\n"),
    ]
    stats = prepare(tiny_tokenizer, inputs, tmp_path / "doc")
    assert stored(tmp_path / "doc") == direct(
        tiny_tokenizer, ["first", "second", "third", "a txt file\n"]
    )
    assert stats["rejected"] == {}
    (tmp_path / "p.txt").write_bytes(bom + b"para one\r\n\r\npara two\r\n")
    prepare(tiny_tokenizer, [tmp_path / "p.txt"], tmp_path / "par", paragraphs=True)
    assert stored(tmp_path / "par") == direct(tiny_tokenizer, ["para one", "para two"])


def test_special_token_text_in_a_document_is_text(tiny_tokenizer: Path, tmp_path: Path) -> None:
    # a second tokenizer, loaded from its directory, whose eos is another special token
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer))
    tok.add_special_tokens({"eos_token": "</s>"})
    tok.save_pretrained(str(tmp_path / "s_tok"))
    text = "a post quoting <|endoftext|> and </s> in the middle"
    source = jsonl(tmp_path / "c.jsonl", [{"text": text}, {"text": "next"}])
    for tok_dir in (tiny_tokenizer, tmp_path / "s_tok"):
        tok = AutoTokenizer.from_pretrained(str(tok_dir))
        special = set(tok.all_special_ids)
        stats = prepare(tok_dir, [source], tmp_path / "c")
        first, second = stored(tmp_path / "c")
        assert stats["documents"] == 2
        assert first[-1] == second[-1] == stats["tokenizer"]["eod_id"] == tok.eos_token_id
        assert not special & set(first[:-1]), first  # no special id but the document's end
        assert tok.decode(first[:-1]) == text


# --- what the inputs hold -------------------------------------------------------------------------


def test_files_a_walk_cannot_read_are_reported(
    tiny_tokenizer: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    jsonl(data / "a.jsonl", [{"text": "plain"}])
    compress(data / "b.jsonl.zst", b'{"text": "zstd"}\n')
    compress(data / "c.txt.xz", b"xz text")
    compress(data / "d.json.lz4", b"not read")
    (data / "notes.md").write_text("not a corpus file", encoding="utf-8")
    (data / "README").write_text("not a corpus file", encoding="utf-8")
    prepare(tiny_tokenizer, [data / "a.jsonl"], data / "old")  # output inside the input: not listed
    capsys.readouterr()
    stats = prepare(tiny_tokenizer, [data], tmp_path / "c")
    assert stored(tmp_path / "c") == direct(tiny_tokenizer, ["plain", "zstd", "xz text"])
    skipped = [str(data / n) for n in ("README", "d.json.lz4", "notes.md")]
    assert stats["skipped_files"] == {
        "count": 3,
        "by_extension": {".lz4": 1, ".md": 1, "no extension": 1},
        "first": skipped,
    }
    assert load_stats(tmp_path / "c")["skipped_files"] == stats["skipped_files"]
    err = capsys.readouterr().err
    assert "warning: skipped 3 file(s) of other types (.lz4: 1, .md: 1, no extension: 1)" in err
    assert skipped[0] in err
    with pytest.raises(DataError, match="d.json.lz4: unsupported file type"):
        prepare(tiny_tokenizer, [data / "d.json.lz4"], tmp_path / "e")


def test_a_file_reached_twice_is_read_once(
    tiny_tokenizer: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    jsonl(data / "a.jsonl", [{"text": "only one document"}])
    (data / "copy.jsonl").symlink_to(data / "a.jsonl")
    (tmp_path / "link").symlink_to(data)
    stats = prepare(tiny_tokenizer, [data, tmp_path / "link", data / "a.jsonl"], tmp_path / "c")
    assert stored(tmp_path / "c") == direct(tiny_tokenizer, ["only one document"])
    assert [i["path"] for i in stats["inputs"]] == [str(data / "a.jsonl")]
    err = capsys.readouterr().err
    assert f"read once: 4 input(s) were a file already read ({data / 'copy.jsonl'} is" in err


# --- worker processes -----------------------------------------------------------------------------


def die_on_marker(self: object, raw: object) -> object:
    """Encoder.__call__ in a worker that the system kills (out of memory) on one batch."""
    if any("die here" in item for item in raw.items):  # type: ignore[attr-defined]
        os.kill(os.getpid(), signal.SIGKILL)
    return ENCODER_CALL(self, raw)


ENCODER_CALL = prepare_module.Encoder.__call__


def slowly(read_raw: Callable[..., Iterator[object]]) -> Callable[..., Iterator[object]]:
    def read(*args: object, **kw: object) -> Iterator[object]:
        for batch in read_raw(*args, **kw):
            yield batch
            time.sleep(1)  # long enough for the pool to see a worker die

    return read


@pytest.mark.parametrize("at", [0, 20])  # the next batch's submit fails; a result fails
def test_a_killed_worker_is_an_error_naming_the_lines(
    at: int, tiny_tokenizer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prepare_module.Encoder, "__call__", die_on_marker)  # forked workers too
    if at == 0:
        monkeypatch.setattr(prepare_module, "read_raw", slowly(prepare_module.read_raw))
    records = [{"text": f"doc {i}"} for i in range(20)]
    records.insert(at, {"text": "die here"})
    source = jsonl(tmp_path / "c.jsonl", records)
    with pytest.raises(DataError) as err:
        prepare(tiny_tokenizer, [source], tmp_path / "out" / "c", num_proc=2, batch_size=4)
    assert re.fullmatch(
        re.escape(f"{source}: a tokenizer worker process died (killed for lack of memory?) ")
        + r"while lines \d+-\d+ were being tokenized; try fewer worker processes \(--num-proc 1\)",
        str(err.value),
    )
    assert list((tmp_path / "out").iterdir()) == []


TERM_SCRIPT = textwrap.dedent(
    """
    import multiprocessing, os, signal, sys
    from midtrain.data_mixing import indexed
    from midtrain.data_mixing.prepare import PrepareConfig, prepare_corpus

    # SIGTERM (Slurm's scancel, a time limit) while the workers are up: no cleanup runs here
    def add_then_term(self, tokens, lengths):
        print(*[p.pid for p in multiprocessing.active_children()], flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
    indexed.IndexedWriter.add_documents = add_then_term

    tok, out, *inputs = sys.argv[1:]
    prepare_corpus(PrepareConfig(inputs=inputs, tokenizer=tok, output=out, num_proc=2))
    """
)


def running(pid: int) -> bool:
    """A process that has not ended (a zombie waiting to be reaped has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_end_with_a_terminated_main_process(tiny_tokenizer: Path, tmp_path: Path) -> None:
    source = jsonl(tmp_path / "c.jsonl", [{"text": f"doc {i}"} for i in range(20)])
    env = {**os.environ, "MIDTRAIN_NO_PROGRESS": "1"}
    args = [str(tiny_tokenizer), str(tmp_path / "c"), str(source)]
    pids = tmp_path / "pids.txt"
    with open(pids, "w") as out:  # a file, not a pipe: orphans would hold a pipe open
        proc = subprocess.run(
            [sys.executable, "-c", TERM_SCRIPT, *args],
            env=env,
            stdout=out,
            stderr=subprocess.DEVNULL,
            timeout=120,
        )
    workers = [int(pid) for pid in pids.read_text().split()]
    try:
        assert proc.returncode == -signal.SIGTERM and len(workers) == 2
        deadline = time.monotonic() + 10
        while any(map(running, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(running, workers)), "workers outlived the main process"
    finally:
        for pid in filter(running, workers):
            os.kill(pid, signal.SIGKILL)


# --- progress -------------------------------------------------------------------------------------


def test_progress_lines_where_stderr_is_not_a_terminal(
    tiny_tokenizer: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inputs = [jsonl(tmp_path / f"{n}.jsonl", [{"text": n}]) for n in ("a", "b")]
    monkeypatch.setattr(console, "PROGRESS_LINE_S", 0.0)  # a line at every chance
    monkeypatch.delenv("MIDTRAIN_NO_PROGRESS", raising=False)
    assert not console.console.is_terminal  # captured
    prepare(tiny_tokenizer, inputs, tmp_path / "c")
    err = capsys.readouterr().err
    assert "hashing inputs: 0/2 files  0B of " in err and "hashing inputs: 1/2 files" in err
    assert "tokenizing: 0/2 files  1 docs  " in err and f"tok/s  {inputs[1]}" in err

    monkeypatch.setenv("MIDTRAIN_NO_PROGRESS", "1")
    prepare(tiny_tokenizer, inputs, tmp_path / "c")
    err = capsys.readouterr().err
    assert "hashing" not in err and "tokenizing" not in err
