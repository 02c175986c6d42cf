"""The evaluation set: each source's held-out split packed into fixed windows, built once and shared
by every model evaluated, so that all models see exactly the same tokens.

A source's held-out documents (from each of its prefixes, in file order) are concatenated into one
token stream, cut to ``max_tokens + 1`` tokens, and split into windows of ``seq_length + 1`` tokens
that overlap by one token: window ``i`` is ``stream[i*L : i*L + L + 1]``. Every token but the first
is thus predicted exactly once; the last window may be shorter.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from midtrain.data_mixing.indexed import open_indexed
from midtrain.data_mixing.mixture import MixtureConfig
from midtrain.data_mixing.stats import holdout_prefix, load_stats
from midtrain.errors import DataError

DEFAULT_MAX_TOKENS = 200_000


@dataclass(frozen=True)
class SourceSpec:
    """What to evaluate: a named source, its kind (customer, curated or None) and its prefixes."""

    name: str
    kind: str | None
    prefixes: tuple[str, ...]


@dataclass
class HeldOutSource:
    """One source's evaluation windows and what they hold."""

    spec: SourceSpec
    windows: list[np.ndarray]
    fingerprint: str  # of the tokenizer the split was prepared with
    max_id: int
    target_tokens: int  # tokens predicted: the stream's length less its first token
    target_bytes: int  # utf-8 bytes of those tokens' text (see `count_bytes`)
    digest: str = field(default="")  # sha256 of the stream: equal digests, equal windows

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str | None:
        return self.spec.kind

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "prefixes": list(self.spec.prefixes),
            "windows": len(self.windows),
            "tokens": self.target_tokens,
            "bytes": self.target_bytes,
            "tokenizer_fingerprint": self.fingerprint,
            "sha256": self.digest,
        }


@dataclass
class EvalSet:
    seq_length: int
    max_tokens: int
    sources: list[HeldOutSource]
    # Where and in which precision the models were scored: bf16 and fp32 losses differ by about a
    # small forgetting value, so two reports compare only when these match too.
    device: str | None = None
    dtype: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "seq_length": self.seq_length,
            "max_tokens": self.max_tokens,
            "device": self.device,
            "dtype": self.dtype,
            "sources": [s.to_json() for s in self.sources],
        }


def sources_from_mixture(mixture: MixtureConfig) -> list[SourceSpec]:
    return [SourceSpec(s.name, s.kind, tuple(s.path)) for s in mixture.sources]


def sources_from_prefixes(prefixes: list[str]) -> list[SourceSpec]:
    """``--data PREFIX...``: one source per prefix, named after its file name, of no kind."""
    specs = [SourceSpec(Path(p).name, None, (str(Path(p).absolute()),)) for p in prefixes]
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"--data: two prefixes share the name {', '.join(dupes)}; rename one")
    return specs


def split_tokenizer(prefix: str) -> dict[str, Any]:
    """What ``PREFIX.stats.json`` says of the tokenizer the prefix was prepared with."""
    return dict(load_stats(prefix)["tokenizer"])


def read_stream(spec: SourceSpec, max_tokens: int) -> tuple[np.ndarray, str]:
    """The first ``max_tokens + 1`` held-out tokens of a source, and its tokenizer fingerprint."""
    parts: list[np.ndarray] = []
    need = max_tokens + 1
    fingerprints = set()
    for prefix in spec.prefixes:
        stats = load_stats(prefix)
        fingerprints.add(stats["tokenizer"]["fingerprint"])
        held = holdout_prefix(prefix)
        if stats["holdout_tokens"] == 0 or not Path(f"{held}.bin").is_file():
            raise DataError(
                f"{prefix}: no held-out split to evaluate on (prepare it again with "
                "`midtrain data prepare --holdout-fraction 0.01` or more)"
            )
        dataset = open_indexed(held)
        for i in range(len(dataset)):
            if need <= 0:
                break
            doc = np.asarray(dataset[i], dtype=np.int64)[:need]
            parts.append(doc)
            need -= doc.size
    if len(fingerprints) > 1:
        raise DataError(
            f"source {spec.name}: its prefixes were prepared with different tokenizers "
            f"({', '.join(spec.prefixes)})"
        )
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if stream.size < 2:
        raise DataError(
            f"{spec.prefixes[0]}: the held-out split holds {stream.size} token(s), too few to "
            "evaluate (prepare it again with a larger --holdout-fraction)"
        )
    return stream, fingerprints.pop()


def make_windows(stream: np.ndarray, seq_length: int) -> list[np.ndarray]:
    """Windows of ``seq_length + 1`` tokens overlapping by one; the last may be shorter."""
    return [stream[i : i + seq_length + 1] for i in range(0, stream.size - 1, seq_length)]


def count_bytes(tokenizer: Any, targets: np.ndarray) -> int:
    """UTF-8 bytes of the predicted tokens' text, for bits per byte.

    The tokens are decoded in one call without special tokens: the end-of-document marker is
    predicted (its loss counts) but is no text. Decoding the whole span at once keeps multi-byte
    characters that straddle two tokens whole.
    """
    text = tokenizer.decode(targets.tolist(), skip_special_tokens=True)
    return len(text.encode("utf-8"))


def build_eval_set(
    specs: list[SourceSpec], seq_length: int, max_tokens: int, tokenizer: Any
) -> EvalSet:
    """Read and window every source's held-out split. ``tokenizer`` decodes them for byte counts
    (the model's tokenizer, once `perplexity.check_tokenizer` has matched the fingerprints)."""
    if seq_length < 1 or max_tokens < 1:
        raise DataError(f"seq_length and max_tokens must be >= 1 (got {seq_length}, {max_tokens})")
    sources = []
    for spec in specs:
        stream, fingerprint = read_stream(spec, max_tokens)
        sources.append(
            HeldOutSource(
                spec=spec,
                windows=make_windows(stream, seq_length),
                fingerprint=fingerprint,
                max_id=int(stream.max()),
                target_tokens=int(stream.size - 1),
                target_bytes=count_bytes(tokenizer, stream[1:]),
                digest=hashlib.sha256(stream.astype("<i8").tobytes()).hexdigest(),
            )
        )
    return EvalSet(seq_length, max_tokens, sources)
