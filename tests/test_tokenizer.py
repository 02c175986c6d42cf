"""Training, loading and fingerprinting tokenizers (all local, tiny vocabularies)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import stdlib_texts
from tokenizers import Tokenizer, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from midtrain.data_mixing.tokenizer import (
    EOT,
    eod_id,
    load_tokenizer,
    tokenizer_fingerprint,
    train_tokenizer,
)
from midtrain.errors import ConfigError, DataError


def write_corpus(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def test_trained_tokenizer_loads_with_autotokenizer(tiny_tokenizer: Path) -> None:
    assert (tiny_tokenizer / "tokenizer.json").is_file()
    assert (tiny_tokenizer / "tokenizer_config.json").is_file()
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer), local_files_only=True)
    assert len(tok) == 400
    assert tok.eos_token == EOT
    assert tok.convert_tokens_to_ids(EOT) == eod_id(tok)
    text = "def f(x):\n    return x + 1  # é ✓ 🙂\n"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text  # byte-level: any text round-trips
    assert eod_id(tok) not in ids  # no special token appears by itself


def test_load_tokenizer_matches_autotokenizer(tiny_tokenizer: Path) -> None:
    ours = load_tokenizer(tiny_tokenizer)
    theirs = AutoTokenizer.from_pretrained(str(tiny_tokenizer))
    text = stdlib_texts()[0][:2000]
    assert ours(text).input_ids == theirs(text).input_ids


def test_fingerprint_changes_with_vocab_and_ignores_formatting(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "c.jsonl", stdlib_texts()[:2])
    small = train_tokenizer([str(corpus)], 300, tmp_path / "small")
    large = train_tokenizer([str(corpus)], 350, tmp_path / "large")
    assert tokenizer_fingerprint(small) != tokenizer_fingerprint(large)
    assert len(tokenizer_fingerprint(small)) == 64

    # the same ids, formatted differently, with padding and a bos template: the same tokenizer
    copy = tmp_path / "copy"
    shutil.copytree(small, copy)
    tok = Tokenizer.from_file(str(copy / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token=EOT)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOT} $A", special_tokens=[(EOT, 0)]
    )
    tok.save(str(copy / "tokenizer.json"), pretty=False)
    assert Tokenizer.from_file(str(copy / "tokenizer.json")).encode("def x").ids[0] == 0
    assert tokenizer_fingerprint(copy) == tokenizer_fingerprint(small)

    # one merge less, or another normalizer: a different tokenizer
    spec = json.loads((copy / "tokenizer.json").read_text(encoding="utf-8"))
    merges = spec["model"]["merges"]
    spec["model"]["merges"] = merges[:-1]
    (copy / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    assert tokenizer_fingerprint(copy) != tokenizer_fingerprint(small)
    spec["model"]["merges"] = merges
    spec["normalizer"] = {"type": "Lowercase"}
    (copy / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    assert tokenizer_fingerprint(copy) != tokenizer_fingerprint(small)

    # a tokenizer re-saved by transformers (as a checkpoint does) keeps its fingerprint
    load_tokenizer(small).save_pretrained(str(tmp_path / "resaved"))
    assert tokenizer_fingerprint(tmp_path / "resaved") == tokenizer_fingerprint(small)


def test_fingerprint_changes_with_the_eos_token(tmp_path: Path) -> None:
    # Same vocabulary, another end-of-document token (a base model vs. its instruct variant):
    # data prepared with one must not be mixed with, or trained under, the other.
    corpus = write_corpus(tmp_path / "c.jsonl", stdlib_texts()[:2])
    base = train_tokenizer([str(corpus)], 300, tmp_path / "base")
    variant = tmp_path / "variant"
    shutil.copytree(base, variant)
    config_file = variant / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    other = next(t for t in load_tokenizer(base).get_vocab() if t != config["eos_token"])
    config["eos_token"] = other
    config_file.write_text(json.dumps(config), encoding="utf-8")
    assert eod_id(load_tokenizer(variant)) != eod_id(load_tokenizer(base))
    assert tokenizer_fingerprint(variant) != tokenizer_fingerprint(base)


def test_fingerprint_without_tokenizer_json_hashes_the_tokenizer_files(tmp_path: Path) -> None:
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "vocab.json").write_text('{"a": 0, "b": 1}', encoding="utf-8")
    (slow / "merges.txt").write_text("#version: 0.2\na b\n", encoding="utf-8")
    (slow / "model.safetensors").write_bytes(b"weights")
    before = tokenizer_fingerprint(slow)
    (slow / "model.safetensors").write_bytes(b"other weights")  # not part of the tokenizer
    assert tokenizer_fingerprint(slow) == before
    (slow / "merges.txt").write_text("#version: 0.2\nb a\n", encoding="utf-8")
    assert tokenizer_fingerprint(slow) != before

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no tokenizer files"):
        tokenizer_fingerprint(empty)


def test_retraining_replaces_the_output_directory(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "c.jsonl", stdlib_texts()[:2])
    out = tmp_path / "tok"
    train_tokenizer([str(corpus)], 300, out)
    first = tokenizer_fingerprint(out)
    train_tokenizer([str(corpus)], 320, out)
    assert tokenizer_fingerprint(out) != first
    assert len(load_tokenizer(out)) == 320
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers


def test_output_directory_holding_other_files_is_refused_and_kept(tmp_path: Path) -> None:
    # the reviewer's case: the corpus lives in the directory given as --output
    out = tmp_path / "work"
    out.mkdir()
    corpus = write_corpus(out / "corpus.jsonl", stdlib_texts()[:2])
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DataError) as err:
        train_tokenizer([str(corpus)], 300, out)
    assert str(err.value).startswith(f"{out}: not replacing it")
    assert "(corpus.jsonl, notes.txt)" in str(err.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["work"]  # nothing staged beside it either

    # a tokenizer directory with anything else in it (a subdirectory, a model) is refused too
    tok = train_tokenizer([str(corpus)], 300, tmp_path / "tok")
    (tok / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(DataError, match=r"\(model\.safetensors\)"):
        train_tokenizer([str(corpus)], 320, tok)
    (tok / "model.safetensors").unlink()
    (tok / "sub").mkdir()
    with pytest.raises(DataError, match=r"\(sub/\)"):
        train_tokenizer([str(corpus)], 320, tok)
    assert len(load_tokenizer(tok)) == 300

    # an empty directory is fine
    (tmp_path / "empty").mkdir()
    assert len(load_tokenizer(train_tokenizer([str(corpus)], 300, tmp_path / "empty"))) == 300


def test_output_under_a_file_is_an_error_naming_it(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "c.jsonl", stdlib_texts()[:1])
    with pytest.raises(DataError, match=re.escape(f"{corpus} is a file, not a directory")):
        train_tokenizer([str(corpus)], 300, corpus / "tok")


def test_train_reads_txt_paragraphs_and_a_custom_field(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("\n\n".join(stdlib_texts()[:2]), encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"body": stdlib_texts()[2]}) + "\n", encoding="utf-8"
    )
    out = train_tokenizer(
        [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")],
        300,
        tmp_path / "tok",
        text_field="body",
        paragraphs=True,
    )
    assert len(load_tokenizer(out)) == 300


def test_vocab_below_the_byte_alphabet_is_rejected(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "c.jsonl", ["hello"])
    with pytest.raises(ConfigError, match="at least 257"):
        train_tokenizer([str(corpus)], 100, tmp_path / "tok")
    assert not (tmp_path / "tok").exists()


def test_training_without_any_document_fails(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"other": 1}\nnot json\n{"other": 2}\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        train_tokenizer([str(bad)], 300, tmp_path / "tok")
    # why, as `data prepare` says it: each reason, how often and where first
    assert str(err.value) == (
        "no documents: every record was rejected: "
        f"2 no 'text' field (first at {bad}:1), 1 not valid JSON (first at {bad}:2)"
    )
    assert not (tmp_path / "tok").exists()


def test_missing_tokenizer_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such tokenizer directory"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="junk"):
        load_tokenizer(tmp_path / "junk")


def test_tokenizer_without_eos_is_a_clear_error(tiny_tokenizer: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(tiny_tokenizer / "tokenizer.json"))
    PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(str(tmp_path / "no_eos"))
    tok = load_tokenizer(tmp_path / "no_eos")
    with pytest.raises(DataError, match="no eos token"):
        eod_id(tok)
