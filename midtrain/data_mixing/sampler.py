"""The mixture sampler: one deterministic global stream of packed sequences, tagged by source.

Packing: each source's documents (its prefixes concatenated in order) are shuffled once per epoch
by a permutation seeded with (seed, source name, epoch), laid end to end, and cut into windows of
``seq_length + 1`` tokens every ``seq_length`` tokens (a window's last token is the next one's
first: inputs and labels are the same window shifted by one). The epoch's short tail is dropped.
So the k-th sequence of a source is a pure function of (seed, source, k).

Interleaving: position p of the global stream belongs to the source that ``Interleaver`` (a Pfair
schedule) picks; every source stays within one sequence of its share at every point of a stage.

State: the position and a few counts per source. The stream is the same for any number of
data-parallel ranks (each takes an even slice of every global batch), so a run resumes exactly
where it stopped, on any world size.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from midtrain.data_mixing.indexed import open_indexed
from midtrain.data_mixing.interleave import Interleaver
from midtrain.data_mixing.mixture import MixtureConfig
from midtrain.data_mixing.plan import MixturePlan, plan_mixture, sequences_per_epoch
from midtrain.errors import ConfigError, DataError

with warnings.catch_warnings():  # megatron.core warns about optional GPU libraries on import
    warnings.simplefilter("ignore")

SAMPLER_FORMAT = "midtrain.sampler/1"


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, seq_length + 1] int64: inputs tokens[:, :-1], labels tokens[:, 1:]
    source_ids: torch.Tensor  # [B] int64, indices into MixtureSampler.source_names
    position: int  # position of the first row in the global stream


def shard(batch: Batch, rank: int, world_size: int) -> Batch:
    """Rank ``rank``'s even slice of a global batch."""
    size = _rows_per_rank(batch.tokens.size(0), rank, world_size)
    rows = slice(rank * size, (rank + 1) * size)
    return Batch(batch.tokens[rows], batch.source_ids[rows], batch.position + rank * size)


def _rows_per_rank(global_batch_size: int, rank: int, world_size: int) -> int:
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    if global_batch_size % world_size:
        raise ConfigError(
            f"global batch size {global_batch_size} is not divisible by the number of "
            f"data-parallel ranks {world_size}"
        )
    return global_batch_size // world_size


def _name_key(name: str) -> int:
    # Stable across processes and machines (Python's hash() of a str is salted per process).
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def _tokens(prefix: str, dataset: Any) -> np.ndarray:
    """The ``.bin`` as a token array: megatron's own mapping where it has one (no second file
    descriptor and mapping per prefix: a source may have thousands of shards), else a new one."""
    mapped = getattr(dataset.bin_reader, "_bin_buffer", None)
    if mapped is not None:
        return np.frombuffer(mapped, dtype=dataset.index.dtype)
    try:
        return np.memmap(f"{prefix}.bin", dtype=dataset.index.dtype, mode="r")
    except OSError as exc:
        raise DataError(f"{prefix}.bin: cannot map it ({exc})") from None


class SourceStream:
    """One source's documents, shuffled per epoch and cut into overlapping windows."""

    def __init__(
        self,
        name: str,
        prefixes: list[str],
        seq_length: int,
        seed: int,
        stats_tokens: int,
        stats_documents: int,
    ) -> None:
        self.name = name
        self.seq_length = seq_length
        self.datasets = [open_indexed(p) for p in prefixes]
        # Each prefix's tokens as an array over its memory-mapped file: a window's pieces are
        # sliced or gathered from them.
        self._files = [_tokens(p, ds) for p, ds in zip(prefixes, self.datasets, strict=True)]
        # Each prefix's documents, tokens and a digest of its first and last document lengths, in
        # order (the sampler state records them: equal-sized shards listed in another order differ).
        self.layout = [_prefix_layout(ds.sequence_lengths) for ds in self.datasets]
        self._first_doc = np.cumsum([0, *(part[0] for part in self.layout)])  # global doc ids
        self._lengths = np.concatenate([ds.sequence_lengths for ds in self.datasets])  # int32
        self.tokens = sum(part[1] for part in self.layout)
        if (self.tokens, len(self._lengths)) != (stats_tokens, stats_documents):
            raise DataError(
                f"its indexed datasets hold {self.tokens:,} tokens in {len(self._lengths):,} "
                f"documents but their stats files say {stats_tokens:,} tokens in "
                f"{stats_documents:,} (stale or mixed-up files: prepare it again)"
            )
        self.windows_per_epoch = sequences_per_epoch(self.tokens, seq_length)
        self._seed = [seed % 2**64, _name_key(name)]
        self._epoch = -1
        self._order = np.empty(0, np.int64)  # document ids in this epoch's order
        self._starts = np.zeros(1, np.int64)  # token offset of each of them in the epoch's stream

    def _load_epoch(self, epoch: int) -> None:
        if epoch == self._epoch:
            return
        rng = np.random.default_rng([*self._seed, epoch])
        order = rng.permutation(len(self._lengths))
        self._order = order.astype(np.int32) if len(order) < 2**31 else order  # half the memory
        self._starts = np.zeros(len(self._order) + 1, np.int64)
        np.cumsum(self._lengths[self._order], out=self._starts[1:])
        self._epoch = epoch

    def sequence(self, k: int) -> np.ndarray:
        """The k-th sequence of this source: ``seq_length + 1`` token ids (int64)."""
        epoch, i = divmod(k, self.windows_per_epoch)
        self._load_epoch(epoch)
        pos, need = i * self.seq_length, self.seq_length + 1
        # The documents the window overlaps (it fits in the epoch's stream: (tokens - 1) // L
        # windows), and each one's piece of it: where it starts in the document, how long.
        first = int(np.searchsorted(self._starts, pos, side="right")) - 1
        end = int(np.searchsorted(self._starts, pos + need, side="left"))
        docs = self._order[first:end].astype(np.int64)
        begin = np.maximum(self._starts[first:end], pos)
        count = np.minimum(self._starts[first + 1 : end + 1], pos + need) - begin
        # Where each piece starts in its prefix's file, in tokens.
        part = np.searchsorted(self._first_doc, docs, side="right") - 1
        start = begin - self._starts[first:end]
        for p in np.unique(part):
            mine = part == p
            pointers = self.datasets[p].index.sequence_pointers[docs[mine] - self._first_doc[p]]
            start[mine] += pointers // self._files[p].itemsize
        if len(docs) <= 16:  # a few documents: copy each piece
            pieces = zip(part.tolist(), start.tolist(), count.tolist(), strict=True)
            return np.concatenate([self._files[p][a : a + n] for p, a, n in pieces], dtype=np.int64)
        # Many short documents: one gather per file, a file position for each token.
        piece = np.repeat(np.arange(len(docs)), count)
        index = start[piece] + np.arange(need) - (np.cumsum(count) - count)[piece]
        out = np.empty(need, np.int64)
        for p in np.unique(part):
            mine = part[piece] == p
            out[mine] = self._files[p][index[mine]]
        return out


class MixtureSampler:
    """The global stream of a mixture's run of ``total_sequences`` sequences.

    Every rank builds the same sampler and draws every global batch (drawing is cheap; only the
    rows a rank reads cost I/O), so all ranks hold the same state.
    """

    def __init__(self, cfg: MixtureConfig, total_sequences: int | None = None) -> None:
        self.plan: MixturePlan = plan_mixture(cfg, total_sequences)  # every check of `mix plan`
        self.source_names = self.plan.source_names
        self.seq_length = cfg.seq_length
        self.total_sequences = self.plan.total_sequences
        self._bounds = [st.start for st in self.plan.stages] + [self.total_sequences]
        self._interleavers = [Interleaver(st.weights) for st in self.plan.stages]
        self._fingerprint = self.plan.fingerprint()
        self._streams = []
        for s in self.plan.sources:
            try:
                stream = SourceStream(
                    s.name, s.prefixes, cfg.seq_length, cfg.seed, s.tokens, s.documents
                )
            except DataError as exc:
                raise DataError(f"{self.plan.where}: source {s.name!r}: {exc}") from None
            self._streams.append(stream)
        self.seek(0)

    # --- the stream ---------------------------------------------------------------------------

    @property
    def position(self) -> int:
        """Sequences drawn so far (the next global position)."""
        return self._position

    @property
    def tokens_by_source(self) -> dict[str, int]:
        """Tokens drawn per source since the start of the run (sequences x seq_length)."""
        return {
            n: c * self.seq_length for n, c in zip(self.source_names, self._consumed, strict=True)
        }

    def draw_sources(self, n: int) -> tuple[list[int], list[int]]:
        """Advance the stream by ``n`` positions without reading tokens: each position's source
        and that source's sequence index."""
        if n < 0 or self._position + n > self.total_sequences:
            raise DataError(
                f"{self.plan.where}: the run is {self.total_sequences:,} sequences long; "
                f"cannot draw {n:,} more at position {self._position:,}"
            )
        picks: list[int] = []
        while len(picks) < n:
            end = self._bounds[self._stage + 1]
            if self._position == end:  # the next stage starts: its counts restart from zero
                self._stage += 1
                self._stage_counts = [0] * len(self.source_names)
                continue
            steps = min(n - len(picks), end - self._position)
            self._interleavers[self._stage].advance(self._stage_counts, steps, picks)
            self._position += steps
        samples = []
        for s in picks:
            samples.append(self._consumed[s])
            self._consumed[s] += 1
        return picks, samples

    def sequence(self, source: int, index: int) -> np.ndarray:
        """Sequence ``index`` of source ``source`` (``seq_length + 1`` int64 token ids)."""
        return self._streams[source].sequence(index)

    def _batch(self, picks: list[int], samples: list[int], position: int) -> Batch:
        tokens = np.empty((len(picks), self.seq_length + 1), np.int64)
        for row, (s, k) in enumerate(zip(picks, samples, strict=True)):
            tokens[row] = self._streams[s].sequence(k)
        return Batch(torch.from_numpy(tokens), torch.tensor(picks, dtype=torch.long), position)

    def next_global_batch(self, global_batch_size: int) -> Batch:
        """The next ``global_batch_size`` sequences of the global stream."""
        start = self._position
        picks, samples = self.draw_sources(global_batch_size)
        return self._batch(picks, samples, start)

    def next_batch_for_rank(self, global_batch_size: int, rank: int, world_size: int) -> Batch:
        """``shard(next_global_batch(B), rank, world_size)``, reading only this rank's rows."""
        size = _rows_per_rank(global_batch_size, rank, world_size)
        start = self._position
        picks, samples = self.draw_sources(global_batch_size)
        rows = slice(rank * size, (rank + 1) * size)
        return self._batch(picks[rows], samples[rows], start + rank * size)

    shard = staticmethod(shard)

    # --- state --------------------------------------------------------------------------------

    def _replay(self, position: int) -> tuple[int, list[int], list[int]]:
        """(stage, counts in that stage, sequences per source) after ``position`` draws."""
        if not 0 <= position <= self.total_sequences:
            raise ConfigError(
                f"{self.plan.where}: position {position:,} is outside the run "
                f"(0 to {self.total_sequences:,} sequences)"
            )
        # The stage of the last drawn position (stage 0 before the first draw).
        stage = max([i for i, start in enumerate(self._bounds[:-1]) if start < position] or [0])
        consumed = [0] * len(self.source_names)
        for i in range(stage):
            full = self._interleavers[i].counts_at(self._bounds[i + 1] - self._bounds[i])
            consumed = [a + b for a, b in zip(consumed, full, strict=True)]
        counts = self._interleavers[stage].counts_at(position - self._bounds[stage])
        return stage, counts, [a + b for a, b in zip(consumed, counts, strict=True)]

    def seek(self, position: int) -> None:
        """Put the stream at ``position`` as if ``position`` sequences had been drawn."""
        self._stage, self._stage_counts, self._consumed = self._replay(position)
        self._position = position

    def state_dict(self) -> dict[str, Any]:
        names = self.source_names
        return {
            "format": SAMPLER_FORMAT,
            "fingerprint": self._fingerprint,
            "total_sequences": self.total_sequences,
            "position": self._position,
            "stage": self._stage,
            "stage_start": self._bounds[self._stage],
            "stage_counts": dict(zip(names, self._stage_counts, strict=True)),
            "consumed": dict(zip(names, self._consumed, strict=True)),
            # Documents and tokens of each prefix in order: the stream depends on the order of a
            # source's files, which the fingerprint (totals) does not see.
            "layout": {st.name: st.layout for st in self._streams},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was saved. The run may have been made longer or
        shorter as long as the current stage still starts where it did."""
        where = self.plan.where
        if not isinstance(state, dict) or state.get("format") != SAMPLER_FORMAT:
            raise ConfigError(f"{where}: not a sampler state of format {SAMPLER_FORMAT!r}")
        if state.get("fingerprint") != self._fingerprint:
            raise ConfigError(
                f"{where}: the saved sampler state belongs to a different mixture (fingerprint "
                f"{state.get('fingerprint')}, this one is {self._fingerprint}): the seed, "
                "seq_length, sources, their data, weights or stages changed"
            )
        for stream in self._streams:
            saved_layout = state.get("layout", {}).get(stream.name, stream.layout)  # older: none
            if saved_layout != stream.layout:
                raise ConfigError(
                    f"{where}: source {stream.name!r}: its files hold {_layout(stream.layout)}, "
                    f"the saved run's held {_layout(saved_layout)}: the source's path list was "
                    "reordered or its files changed, which changes its documents' order; "
                    "restore the original list"
                )
        position = state.get("position")
        if not isinstance(position, int) or not 0 <= position <= self.total_sequences:
            raise ConfigError(
                f"{where}: the saved sampler is at position {position}, beyond this run of "
                f"{self.total_sequences:,} sequences"
            )
        stage, counts, consumed = self._replay(position)
        names = self.source_names
        saved = (state.get("stage"), state.get("stage_counts"), state.get("consumed"))
        if saved != (
            stage,
            dict(zip(names, counts, strict=True)),
            dict(zip(names, consumed, strict=True)),
        ):
            old = state.get("total_sequences")
            why = (
                f"the run length changed from {old:,} to {self.total_sequences:,} sequences, "
                "which moves the stage boundaries before the saved position; resume with the "
                "original length (train.max_steps / mixture.tokens)"
                if isinstance(old, int) and old != self.total_sequences
                else "the saved counts are not those of this mixture at that position"
            )
            raise ConfigError(f"{where}: cannot resume the sampler at {position:,}: {why}")
        self._stage, self._stage_counts, self._consumed = stage, counts, consumed
        self._position = position


def _prefix_layout(lengths: np.ndarray) -> list[Any]:
    """[documents, tokens, digest] of one prefix from its document lengths (4 KB of them read)."""
    sample = np.concatenate([lengths[:512], lengths[-512:]]).astype("<i4")
    digest = hashlib.sha256(sample.tobytes()).hexdigest()[:12]
    return [len(lengths), int(lengths.sum(dtype=np.int64)), digest]


def _layout(layout: list[list[Any]]) -> str:
    return ", ".join(f"{part[0]:,} documents/{part[1]:,} tokens" for part in layout)
