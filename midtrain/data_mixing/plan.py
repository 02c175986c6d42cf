"""The plan of a mixture: sequences and tokens each stage draws from each source, and epochs.

The numbers come from the sampler's own schedule (``Interleaver``), so they are what the sampler
draws over the run, not an estimate. Planning reads only the ``PREFIX.stats.json`` files: it runs
in a second for a run of a million sequences and needs neither torch nor the token data.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from midtrain.data_mixing.interleave import Interleaver, exact_weights
from midtrain.data_mixing.mixture import MixtureConfig
from midtrain.data_mixing.stats import load_stats
from midtrain.errors import ConfigError, DataError


@dataclass(frozen=True)
class SourceData:
    """What a source holds, summed over its prefixes' stats files."""

    name: str
    kind: str
    prefixes: list[str]
    tokens: int
    documents: int
    tokenizer: str
    max_epochs: float | None


def sequences_per_epoch(tokens: int, seq_length: int) -> int:
    """Sequences one pass over a source yields, as the sampler cuts them: windows of
    ``seq_length`` tokens (plus the next one as the last label) laid end to end, the short tail
    dropped. An epoch is this many sequences, not ``tokens / seq_length``: for a small source
    the dropped tail is a large share, and ``max_epochs`` must count real passes."""
    return (tokens - 1) // seq_length


def epochs_drawn(sequences: int, tokens: int, seq_length: int) -> float:
    """Passes over a source of ``tokens`` tokens that drawing ``sequences`` sequences makes."""
    return sequences / sequences_per_epoch(tokens, seq_length)


@dataclass(frozen=True)
class SourceDraw:
    """What one stage draws from one source."""

    name: str
    kind: str
    weight: Fraction  # normalised, exact
    sequences: int
    seq_length: int
    available: int  # tokens the source holds
    cumulative_sequences: int  # drawn from the start of the run to the end of this stage

    @property
    def tokens(self) -> int:
        return self.sequences * self.seq_length

    @property
    def epochs(self) -> float:
        return epochs_drawn(self.sequences, self.available, self.seq_length)

    @property
    def cumulative_epochs(self) -> float:
        return epochs_drawn(self.cumulative_sequences, self.available, self.seq_length)


@dataclass(frozen=True)
class StagePlan:
    until: float
    start: int  # first position of the stage in the global stream
    end: int  # one past its last position
    weights: list[Fraction]  # normalised, exact, in source order
    sources: list[SourceDraw]

    @property
    def sequences(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class MixturePlan:
    where: str  # the mixture file (or "mixture"), for messages
    seq_length: int
    seed: int
    total_sequences: int
    sources: list[SourceData]
    stages: list[StagePlan]

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    @property
    def total_tokens(self) -> int:
        return self.total_sequences * self.seq_length

    def sequences_by_source(self) -> dict[str, int]:
        return {d.name: d.cumulative_sequences for d in self.stages[-1].sources}

    def fingerprint(self) -> str:
        """What the token stream depends on, except the run length (a run may be extended)."""
        key = {
            "seed": self.seed,
            "seq_length": self.seq_length,
            "sources": [[s.name, s.documents, s.tokens] for s in self.sources],
            "stages": [[st.until, [str(w) for w in st.weights]] for st in self.stages],
        }
        blob = json.dumps(key, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        stages = [
            {
                "until": st.until,
                "sources": {
                    d.name: {
                        "tokens": d.tokens,
                        "epochs": round(d.epochs, 6),
                        "sequences": d.sequences,
                        "weight": float(d.weight),
                        "available": d.available,
                        "cumulative_epochs": round(d.cumulative_epochs, 6),
                    }
                    for d in st.sources
                },
            }
            for st in self.stages
        ]
        drawn = self.sequences_by_source()
        totals = {
            "sequences": self.total_sequences,
            "tokens": self.total_tokens,
            "seq_length": self.seq_length,
            "sources": {
                s.name: {
                    "tokens": drawn[s.name] * self.seq_length,
                    "epochs": round(epochs_drawn(drawn[s.name], s.tokens, self.seq_length), 6),
                    "sequences": drawn[s.name],
                    "available": s.tokens,
                    "max_epochs": s.max_epochs,
                }
                for s in self.sources
            },
        }
        return {"stages": stages, "totals": totals}

    def whole_run_rows(self) -> list[list[Any]]:
        """Per source: name, kind, tokens drawn, tokens available, epochs, max epochs."""
        drawn = self.sequences_by_source()
        return [
            [
                s.name,
                s.kind,
                drawn[s.name] * self.seq_length,
                s.tokens,
                # the sampler's passes, as in the stage tables and max_epochs, not tokens / size
                epochs_drawn(drawn[s.name], s.tokens, self.seq_length),
                s.max_epochs if s.max_epochs is not None else "-",
            ]
            for s in self.sources
        ]

    def print(self) -> None:
        """One table per stage and one for the whole run, on the console (stderr)."""
        from midtrain.console import info, print_table, table

        columns = ["source", "kind", "weight", "tokens drawn", "tokens available", "epochs"]
        prev = 0.0
        for i, st in enumerate(self.stages):
            title = (
                f"stage {i + 1} of {len(self.stages)}: {prev:.0%} to {st.until:.0%} of the run "
                f"(sequences {st.start:,} to {st.end:,})"
            )
            rows = [
                [d.name, d.kind, float(d.weight), d.tokens, d.available, d.epochs]
                for d in st.sources
            ]
            print_table(table(title, columns, rows))
            prev = st.until
        cols = ["source", "kind", "tokens drawn", "tokens available", "epochs", "max epochs"]
        print_table(table("whole run", cols, self.whole_run_rows()))
        info(
            f"total: {self.total_sequences:,} sequences x {self.seq_length:,} tokens = "
            f"{self.total_tokens:,} tokens in {len(self.stages)} stage(s), seed {self.seed}"
        )


def run_length(cfg: MixtureConfig, total_sequences: int | None, where: str) -> int:
    """Sequences in the run: a run spec's max_steps x global_batch, else mixture tokens."""
    if total_sequences is not None:
        if total_sequences <= 0:
            raise ConfigError(f"{where}: the run must have at least one sequence")
        return total_sequences
    if cfg.tokens is None:
        raise ConfigError(
            f"{where}: tokens: the length of the run is unknown; give `tokens` in the mixture "
            "or plan a run spec (its length is train.max_steps x train.global_batch_size)"
        )
    if cfg.tokens < cfg.seq_length:
        raise ConfigError(
            f"{where}: tokens ({cfg.tokens:,}) is less than one sequence of seq_length "
            f"{cfg.seq_length:,}"
        )
    return cfg.tokens // cfg.seq_length


def read_sources(cfg: MixtureConfig, where: str) -> list[SourceData]:
    """Each source's stats, with the checks that need no schedule: prefixes exist, one tokenizer,
    enough tokens for a sequence."""
    sources = []
    first: tuple[str, str, str] | None = None  # (source, prefix, tokenizer fingerprint)
    listed: dict[Path, tuple[str, str]] = {}  # each prefix's data file -> (source, prefix)
    for src in cfg.sources:
        tokens = documents = 0
        fingerprint = ""
        for prefix in src.path:
            data = Path(f"{prefix}.bin").resolve()
            if data in listed:
                other, again = listed[data]
                raise DataError(
                    f"{where}: {prefix} (source {src.name!r}) is the same data as {again} "
                    f"(source {other!r}): its documents would be seen twice per epoch; list each "
                    "prepared prefix once (weights set how often a source is seen)"
                )
            listed[data] = (src.name, prefix)
            try:
                stats = load_stats(prefix)
            except DataError as exc:
                raise DataError(f"{where}: source {src.name!r}: {exc}") from None
            tokens += int(stats["tokens"])
            documents += int(stats["documents"])
            fingerprint = str(stats["tokenizer"]["fingerprint"])
            if first is None:
                first = (src.name, prefix, fingerprint)
            elif fingerprint != first[2]:
                who = (
                    f"source {src.name!r} mixes tokenizers"
                    if first[0] == src.name
                    else f"sources {first[0]!r} and {src.name!r} were prepared with different "
                    "tokenizers"
                )
                raise DataError(
                    f"{where}: {who}: {first[1]} has tokenizer fingerprint {first[2]}, {prefix} "
                    f"has {fingerprint}; prepare every source with the same tokenizer"
                )
        if tokens < cfg.seq_length + 1:
            raise DataError(
                f"{where}: source {src.name!r} has {tokens:,} tokens, fewer than one sequence "
                f"needs (seq_length + 1 = {cfg.seq_length + 1:,}); add data or lower seq_length"
            )
        sources.append(
            SourceData(
                name=src.name,
                kind=src.kind,
                prefixes=list(src.path),
                tokens=tokens,
                documents=documents,
                tokenizer=fingerprint,
                max_epochs=src.max_epochs,
            )
        )
    return sources


def stage_bounds(cfg: MixtureConfig, total_sequences: int) -> list[int]:
    """Stage ``i`` covers positions ``[bounds[i], bounds[i + 1])`` of the global stream."""
    ends = [round(Fraction(str(st.until)) * total_sequences) for st in cfg.stage_list()]
    return [0, *ends]


def plan_mixture(
    cfg: MixtureConfig, total_sequences: int | None = None, *, where: str | None = None
) -> MixturePlan:
    """Plan the run and check it: missing prefixes, tokenizer mismatches, sources too small for a
    sequence and repetition beyond ``max_epochs`` are errors that name the file and the source."""
    where = where or cfg.source_file or "mixture"
    n = run_length(cfg, total_sequences, where)
    sources = read_sources(cfg, where)
    bounds = stage_bounds(cfg, n)
    names = [s.name for s in sources]
    cumulative = [0] * len(sources)
    stages = []
    for st, start, end in zip(cfg.stage_list(), bounds[:-1], bounds[1:], strict=True):
        assert st.weights is not None  # stage_list() fills them in
        weights = exact_weights([st.weights[name] for name in names])
        counts = Interleaver(weights).counts_at(end - start)
        draws = []
        for i, (src, w, c) in enumerate(zip(sources, weights, counts, strict=True)):
            cumulative[i] += c
            draws.append(
                SourceDraw(src.name, src.kind, w, c, cfg.seq_length, src.tokens, cumulative[i])
            )
        stages.append(StagePlan(st.until, start, end, weights, draws))
    plan = MixturePlan(where, cfg.seq_length, cfg.seed, n, sources, stages)
    check_repetition(plan)
    return plan


def check_repetition(plan: MixturePlan) -> None:
    """A source drawn beyond its ``max_epochs`` is an error now, not a surprise mid-run."""
    problems = []
    drawn = plan.sequences_by_source()
    for src in plan.sources:
        if src.max_epochs is None:
            continue
        sequences = drawn[src.name]
        drawn_epochs = epochs_drawn(sequences, src.tokens, plan.seq_length)
        if drawn_epochs <= src.max_epochs:
            continue
        per_epoch = sequences_per_epoch(src.tokens, plan.seq_length)
        excess = sequences - math.floor(src.max_epochs * per_epoch)
        # The fewest tokens whose epoch is long enough: per_epoch' = ceil(sequences / max_epochs).
        needed = math.ceil(sequences / src.max_epochs) * plan.seq_length + 1
        problems.append(
            f"source {src.name!r} would be drawn {drawn_epochs:.3f} epochs ({sequences:,} "
            f"sequences; one pass over its {src.tokens:,} tokens yields {per_epoch:,}), over its "
            f"max_epochs {src.max_epochs:g} by {drawn_epochs - src.max_epochs:.3f} epochs "
            f"({excess:,} sequences); lower its weight, shorten the run, add at least "
            f"{needed - src.tokens:,} tokens of data to it, or raise max_epochs to "
            f"{math.ceil(drawn_epochs * 100) / 100:g}"
        )
    if problems:
        raise ConfigError("\n".join(f"{plan.where}: {p}" for p in problems))
