"""Tokenizers: train a small byte-level BPE (tests, demos), load any local HF tokenizer directory,
and fingerprint it so that every source of a mixture provably shares one tokenizer."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from midtrain import console
from midtrain.data_mixing.readers import (
    Rejections,
    describe,
    expand_inputs,
    iter_texts,
    make_dir,
    nothing_left,
)
from midtrain.errors import ConfigError, DataError
from midtrain.fileio import fsync_dir

EOT = "<|endoftext|>"
MIN_VOCAB = 257  # the 256 byte symbols of a byte-level BPE + <|endoftext|>

# Files that define a tokenizer when there is no tokenizer.json (slow tokenizers); model weights
# and config.json are left out, so retraining a model does not change its tokenizer's fingerprint.
_TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)
_TOKENIZER_SUFFIXES = (".model", ".tiktoken")
# What `tokenizer train` may replace: a directory holding nothing but these (what save_pretrained
# writes for a tokenizer). Anything else may be the user's data, which is never deleted.
_REPLACEABLE = ("tokenizer.json", "chat_template.jinja", *_TOKENIZER_FILES)
# The parts of a tokenizer.json that decide how text becomes ids without special tokens (which is
# how documents are tokenized). Left out: truncation and padding (runtime settings), the post-
# processor (bos/eos templates, which transformers may rewrite on save), decoder and version.
_ID_KEYS = ("added_tokens", "normalizer", "pre_tokenizer", "model")


def train_tokenizer(
    inputs: list[str],
    vocab_size: int,
    output: str | Path,
    *,
    text_field: str = "text",
    paragraphs: bool = False,
    min_frequency: int = 2,
) -> Path:
    """Train a byte-level BPE on local text and save it where ``AutoTokenizer`` loads it.

    ``<|endoftext|>`` is the only special token and serves as eos, bos, unk and pad. The output
    directory is written beside its final name and renamed into place when complete.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB:
        raise ConfigError(
            f"vocab size {vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB} "
            f"(256 byte symbols + {EOT})"
        )
    found = expand_inputs(inputs)
    sources = found.sources
    output = Path(output).absolute()
    _check_replaceable(output)  # before the training, not after it
    make_dir(output.parent, output)
    rejections = Rejections(text_field=text_field)
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    except OSError as exc:
        raise DataError(f"{output}: cannot write in {output.parent} ({exc.strerror})") from None
    try:
        counted = _Counted(iter_texts(sources, rejections, text_field, paragraphs))
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        if found.skipped:
            console.console.print(found.skipped_note(), markup=False)
        console.info(f"training a {vocab_size:,}-token byte-level BPE on {len(sources)} input(s)")
        tok.train_from_iterator(counted, trainer)
        if counted.documents == 0:
            raise DataError(nothing_left(inputs, rejections))
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token=EOT, bos_token=EOT, unk_token=EOT, pad_token=EOT
        )
        staged = work / "tokenizer"
        fast.save_pretrained(str(staged))
        _replace_dir(staged, output)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _report_rejections(rejections, text_field)
    if found.duplicates:
        console.console.print(found.duplicates_note(), markup=False)
    console.info(
        f"trained a {len(fast):,}-token byte-level BPE on {counted.documents:,} documents "
        f"-> {output}"
    )
    return output


class _Counted:
    """Counts the documents an iterator yields (the trainer consumes it)."""

    def __init__(self, texts: Any) -> None:
        self._texts = texts
        self.documents = 0

    def __iter__(self) -> Any:
        for text in self._texts:
            self.documents += 1
            yield text


def _check_replaceable(output: Path) -> None:
    """``output`` may be created or replaced: it is absent, empty, or an earlier tokenizer."""
    if not output.exists():
        return
    if not output.is_dir():
        raise DataError(f"{output}: exists and is not a directory")
    foreign = sorted(
        p.name + ("/" if p.is_dir() else "")
        for p in output.iterdir()
        if not (p.is_file() and _is_tokenizer_file(p.name))
    )
    if foreign:
        shown = ", ".join(foreign[:5]) + (
            f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        )
        raise DataError(
            f"{output}: not replacing it: it holds files that are not a tokenizer's ({shown}); "
            "give an empty or new --output directory"
        )


def _is_tokenizer_file(name: str) -> bool:
    return name in _REPLACEABLE or name.endswith(_TOKENIZER_SUFFIXES)


def _replace_dir(staged: Path, output: Path) -> None:
    """Move a finished directory to ``output``, replacing an older tokenizer (never other files:
    see ``_check_replaceable``)."""
    _check_replaceable(output)
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{staged.parent.name}")
        output.rename(old)
    staged.rename(output)
    fsync_dir(output.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _report_rejections(rejections: Rejections, text_field: str) -> None:
    if not rejections.total:
        return
    rows = [
        (describe(reason, text_field), count, rejections.examples[reason])
        for reason, count in rejections.counts.items()
    ]
    table = console.table("skipped records", ("reason", "count", "first at"), rows)
    table.columns[-1].overflow = "fold"  # a location is only useful whole
    console.print_table(table)


def load_tokenizer(path: str | Path) -> Any:
    """A local HF tokenizer directory through ``AutoTokenizer``: never downloads, never runs code."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such tokenizer directory")
    try:
        return AutoTokenizer.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ... here
        raise DataError(f"{path}: not a loadable tokenizer ({type(exc).__name__}: {exc})") from None


def eod_id(tokenizer: Any) -> int:
    """The end-of-document id appended to every document: the tokenizer's eos token."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        where = getattr(tokenizer, "name_or_path", "the tokenizer")
        raise DataError(
            f"{where}: the tokenizer has no eos token, which marks the end of each document "
            '(set "eos_token" in its tokenizer_config.json)'
        )
    return int(eos)


def _eos_token(path: Path) -> str:
    """The eos token's text as tokenizer_config.json (or else special_tokens_map.json) names it."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = path / name
        if not file.is_file():
            continue
        try:
            eos = json.loads(file.read_text(encoding="utf-8")).get("eos_token")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise DataError(f"{file}: not a JSON object ({exc})") from None
        if isinstance(eos, dict):  # the AddedToken form: {"content": "</s>", ...}
            eos = eos.get("content")
        if isinstance(eos, str):
            return eos
    return ""


def tokenizer_fingerprint(path: str | Path) -> str:
    """sha256 identifying a tokenizer's vocabulary, merges and normalization.

    With a tokenizer.json: its added tokens, normalizer, pre-tokenizer and model, as canonical JSON
    (key order and whitespace do not matter), and the eos token, which ends every prepared
    document (a base model and its instruct variant often differ only there). Otherwise: the
    bytes of every tokenizer file.
    """
    path = Path(path)
    tokenizer_json = path / "tokenizer.json"
    h = hashlib.sha256()
    if tokenizer_json.is_file():
        try:
            spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{tokenizer_json}: not valid JSON ({exc})") from None
        if not isinstance(spec, dict) or "model" not in spec:
            raise DataError(f"{tokenizer_json}: not a tokenizers file (no 'model')")
        ids_part = {key: spec.get(key) for key in _ID_KEYS}
        h.update(b"tokenizer.json\0")
        h.update(json.dumps(ids_part, sort_keys=True, separators=(",", ":")).encode("utf-8"))
        h.update(b"\0eos_token\0" + _eos_token(path).encode("utf-8"))
        return h.hexdigest()
    files = sorted(
        p
        for p in path.iterdir()
        if p.is_file() and (p.name in _TOKENIZER_FILES or p.name.endswith(_TOKENIZER_SUFFIXES))
    )
    if not files:
        raise DataError(f"{path}: no tokenizer files (tokenizer.json, vocab, merges, ...)")
    for p in files:
        h.update(p.name.encode("utf-8") + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()
