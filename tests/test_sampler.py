"""The mixture sampler: packing, interleaving, stages, sharding, resume; against a direct reference."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mixture_data import make_prefix, random_docs, write_yaml

from midtrain.data_mixing.interleave import Interleaver
from midtrain.data_mixing.mixture import MixtureConfig, load_mixture
from midtrain.data_mixing.plan import plan_mixture
from midtrain.data_mixing.sampler import MixtureSampler, shard
from midtrain.data_mixing.stats import load_stats
from midtrain.errors import ConfigError, DataError

SEQ = 16
BATCH = 8
STEPS = 50
N = BATCH * STEPS  # 400 sequences: stage 1 is [0, 200), stage 2 [200, 400)
SEED = 7


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[np.ndarray]]]:
    """Three sources (one with two prefixes), small enough that the run repeats each of them."""
    root = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(1)
    docs = {
        "law": make_prefix(root / "law_a", random_docs(rng, 15, 3, 40, 1000))
        + make_prefix(root / "law_b", random_docs(rng, 10, 3, 40, 2000)),
        "news": make_prefix(root / "news", random_docs(rng, 30, 3, 60, 3000)),
        "web": make_prefix(root / "web", random_docs(rng, 60, 3, 80, 5000)),
    }
    write_yaml(
        root / "mix.yaml",
        {
            "seq_length": SEQ,
            "tokens": N * SEQ,
            "seed": SEED,
            "sources": [
                {
                    "name": "law",
                    "kind": "customer",
                    "path": [str(root / "law_a"), str(root / "law_b")],
                    "weight": 0.5,
                },
                {"name": "news", "kind": "customer", "path": [str(root / "news")], "weight": 0.2},
                {"name": "web", "kind": "curated", "path": [str(root / "web")], "weight": 0.3},
            ],
            "stages": [
                {"until": 0.5},
                {"until": 1.0, "weights": {"law": 0.2, "news": 0.2, "web": 0.6}},
            ],
        },
    )
    return root, docs


@pytest.fixture(scope="module")
def cfg(corpus: tuple[Path, dict]) -> MixtureConfig:
    return load_mixture(corpus[0] / "mix.yaml")


@pytest.fixture(scope="module")
def full_run(cfg: MixtureConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole uninterrupted stream: tokens [N, SEQ + 1] and source ids [N]."""
    sampler = MixtureSampler(cfg)
    batches = [sampler.next_global_batch(BATCH) for _ in range(STEPS)]
    return torch.cat([b.tokens for b in batches]), torch.cat([b.source_ids for b in batches])


def reference_sequence(
    docs: list[np.ndarray], name: str, seed: int, k: int, seq: int = SEQ
) -> np.ndarray:
    """The documented packing, written out directly: shuffle per epoch, concatenate, cut."""
    tokens = sum(len(d) for d in docs)
    per_epoch = (tokens - 1) // seq
    epoch, i = divmod(k, per_epoch)
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    order = np.random.default_rng([seed, key, epoch]).permutation(len(docs))
    stream = np.concatenate([docs[j] for j in order])
    return stream[i * seq : i * seq + seq + 1]


def test_plan_equals_what_the_sampler_draws(cfg: MixtureConfig, full_run: tuple) -> None:
    sampler = MixtureSampler(cfg)
    tokens, ids = full_run
    assert tokens.shape == (N, SEQ + 1) and tokens.dtype == torch.int64
    for stage in sampler.plan.stages:
        drawn = torch.bincount(ids[stage.start : stage.end], minlength=3).tolist()
        assert drawn == [d.sequences for d in stage.sources]
    assert [st.end for st in sampler.plan.stages] == [200, 400]
    sampler.draw_sources(N)
    assert sampler.tokens_by_source == {
        name: n * SEQ for name, n in sampler.plan.sequences_by_source().items()
    }
    with pytest.raises(DataError, match="the run is 400 sequences long"):
        sampler.next_global_batch(BATCH)


def test_stage_switches_at_the_exact_boundary(cfg: MixtureConfig, full_run: tuple) -> None:
    sampler = MixtureSampler(cfg)
    picks: list[int] = []
    while sampler.position < N:  # odd chunks, so one straddles the boundary at 200
        picks += sampler.draw_sources(min(7, N - sampler.position))[0]
    assert picks == full_run[1].tolist()
    for stage in sampler.plan.stages:
        own: list[int] = []
        Interleaver(stage.weights).advance([0, 0, 0], stage.sequences, own)
        assert picks[stage.start : stage.end] == own  # counts restart at the stage's first slot
    # The two stages' shares differ, so the boundary is visible: web is 3/10 then 6/10.
    assert picks[:200].count(2) == 60 and picks[200:].count(2) == 120


def test_sequences_are_windows_of_the_documents(
    cfg: MixtureConfig, corpus: tuple, full_run: tuple
) -> None:
    docs = corpus[1]
    sampler = MixtureSampler(cfg)
    names = sampler.source_names
    tokens, ids = full_run
    seen = [0, 0, 0]
    for row in range(N):
        s = int(ids[row])
        expected = reference_sequence(docs[names[s]], names[s], SEED, seen[s])
        assert tokens[row].tolist() == expected.tolist()
        seen[s] += 1
    law_windows = (sum(len(d) for d in docs["law"]) - 1) // SEQ
    assert seen[0] > 2 * law_windows  # the run crossed several epochs of `law`
    # Source tags are honest: each source's token ids live in their own range.
    for s, (lo, hi) in enumerate([(1000, 3000), (3000, 4000), (5000, 6000)]):
        body = tokens[ids == s]
        assert bool(((body == 0) | ((body >= lo) & (body < hi))).all())


@pytest.mark.parametrize("seq", [5, 64])
def test_windows_over_many_short_and_empty_documents(tmp_path: Path, seq: int) -> None:
    """A window over dozens of tiny documents (and empty ones) across two files is still the
    documented packing (a long window is gathered token by token, a short one sliced)."""
    rng = np.random.default_rng(3)
    docs = [np.arange(100 * i + 1, 100 * i + 1 + n) for i, n in enumerate(rng.integers(0, 4, 400))]
    make_prefix(tmp_path / "a", docs[:250])
    make_prefix(tmp_path / "b", docs[250:])
    source = {"name": "s", "kind": "curated", "path": [str(tmp_path / "a"), str(tmp_path / "b")]}
    source["weight"] = 1
    cfg = MixtureConfig(seq_length=seq, tokens=seq * 500, seed=SEED, sources=[source])
    sampler = MixtureSampler(cfg)
    per_epoch = (sum(len(d) for d in docs) - 1) // seq
    for k in range(2 * per_epoch + 3):  # into a third epoch
        assert (
            sampler.sequence(0, k).tolist() == reference_sequence(docs, "s", SEED, k, seq).tolist()
        )


def test_each_data_file_is_mapped_once(tmp_path: Path) -> None:
    """A source may have thousands of shards: the sampler reads megatron's mapping of each .bin
    rather than mapping (and holding a descriptor for) it a second time."""
    rng = np.random.default_rng(0)
    prefixes = [tmp_path / f"shard{i}" for i in range(3)]
    for i, prefix in enumerate(prefixes):
        make_prefix(prefix, random_docs(rng, 5, 10, 20, 1000 * (i + 1)))
    source = {"name": "s", "kind": "curated", "path": [str(p) for p in prefixes], "weight": 1}
    sampler = MixtureSampler(MixtureConfig(seq_length=4, tokens=40, sources=[source]))
    sampler.next_global_batch(4)
    maps = Path("/proc/self/maps").read_text()
    assert [maps.count(f"{p}.bin") for p in prefixes] == [1, 1, 1]


def test_each_epoch_is_a_permutation_of_all_documents(cfg: MixtureConfig, corpus: tuple) -> None:
    sampler = MixtureSampler(cfg)
    docs = corpus[1]["news"]
    per_epoch = (sum(len(d) for d in docs) - 1) // SEQ
    for epoch in (0, 1):
        windows = [sampler.sequence(1, epoch * per_epoch + i) for i in range(per_epoch)]
        stream = np.concatenate([windows[0]] + [w[1:] for w in windows[1:]])
        # Split the stream at eod: whole documents, each at most once, the tail cut short.
        ends = np.flatnonzero(stream == 0)
        pieces = np.split(stream, ends + 1)
        whole = [tuple(p) for p in pieces[:-1]]
        assert len(set(whole)) == len(whole)
        assert set(whole) <= {tuple(d) for d in docs}
        assert len(whole) >= len(docs) - 2  # at most the last document or two fell in the tail
    first = [sampler.sequence(1, i).tolist() for i in range(3)]
    second = [sampler.sequence(1, per_epoch + i).tolist() for i in range(3)]
    assert first != second  # a fresh shuffle each epoch


def test_two_fresh_samplers_agree_and_seeds_differ(cfg: MixtureConfig, full_run: tuple) -> None:
    a, b = MixtureSampler(cfg), MixtureSampler(cfg)
    for _ in range(3):
        x, y = a.next_global_batch(BATCH), b.next_global_batch(BATCH)
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.source_ids, y.source_ids)
    assert torch.equal(x.tokens, full_run[0][16:24])
    other = MixtureSampler(cfg.model_copy(update={"seed": SEED + 1}))
    z = other.next_global_batch(4 * BATCH)
    assert torch.equal(z.source_ids, full_run[1][: 4 * BATCH])  # the schedule is not random
    assert not torch.equal(z.tokens, full_run[0][: 4 * BATCH])  # the document order is


@settings(max_examples=25, deadline=None)
@given(position=st.integers(0, N - 1), ahead=st.integers(1, 40))
def test_resume_anywhere_continues_the_stream(
    cfg: MixtureConfig, full_run: tuple, position: int, ahead: int
) -> None:
    before = MixtureSampler(cfg)
    before.draw_sources(position)
    state = json.loads(json.dumps(before.state_dict()))
    assert set(state) >= {"position", "consumed", "stage_counts", "fingerprint"}
    after = MixtureSampler(cfg)
    after.load_state_dict(state)
    assert after.state_dict() == before.state_dict()
    ahead = min(ahead, N - position)
    batch = after.next_global_batch(ahead)
    assert batch.position == position
    assert torch.equal(batch.tokens, full_run[0][position : position + ahead])
    assert torch.equal(batch.source_ids, full_run[1][position : position + ahead])
    sought = MixtureSampler(cfg)
    sought.seek(position)
    assert sought.state_dict() == state


@pytest.mark.parametrize("world", [1, 2, 4])
def test_any_world_size_gives_the_same_global_stream(
    cfg: MixtureConfig, full_run: tuple, world: int
) -> None:
    ranks = [MixtureSampler(cfg) for _ in range(world)]  # one sampler per rank, as in training
    whole = MixtureSampler(cfg)
    rows, ids = [], []
    for _ in range(6):
        parts = [s.next_batch_for_rank(BATCH, r, world) for r, s in enumerate(ranks)]
        global_ = whole.position
        batch = whole.next_global_batch(BATCH)
        sliced = [shard(batch, r, world) for r in range(world)]
        for r, (p, q) in enumerate(zip(parts, sliced, strict=True)):
            assert p.tokens.shape == (BATCH // world, SEQ + 1)
            assert torch.equal(p.tokens, q.tokens) and torch.equal(p.source_ids, q.source_ids)
            assert p.position == q.position == global_ + r * BATCH // world
        rows += [p.tokens for p in parts]
        ids += [p.source_ids for p in parts]
    assert torch.equal(torch.cat(rows), full_run[0][: 6 * BATCH])
    assert torch.equal(torch.cat(ids), full_run[1][: 6 * BATCH])
    assert all(s.state_dict() == whole.state_dict() for s in ranks)


def test_resume_on_a_different_world_size(cfg: MixtureConfig, full_run: tuple) -> None:
    two = [MixtureSampler(cfg) for _ in range(2)]
    for _ in range(5):
        for r, s in enumerate(two):
            s.next_batch_for_rank(BATCH, r, 2)
    state = json.loads(json.dumps(two[0].state_dict()))
    four = [MixtureSampler(cfg) for _ in range(4)]
    for s in four:
        s.load_state_dict(state)
    parts = [s.next_batch_for_rank(BATCH, r, 4) for r, s in enumerate(four)]
    assert torch.equal(torch.cat([p.tokens for p in parts]), full_run[0][40:48])


def test_batch_must_divide_among_ranks(cfg: MixtureConfig) -> None:
    sampler = MixtureSampler(cfg)
    with pytest.raises(ConfigError, match="global batch size 8 is not divisible .* 3"):
        sampler.next_batch_for_rank(BATCH, 0, 3)
    assert sampler.position == 0  # nothing was drawn
    with pytest.raises(ConfigError, match="not divisible"):
        shard(sampler.next_global_batch(BATCH), 1, 3)


def test_state_of_another_mixture_is_refused(cfg: MixtureConfig) -> None:
    sampler = MixtureSampler(cfg)
    sampler.draw_sources(10)
    state = sampler.state_dict()
    reweighted = cfg.model_copy(deep=True)
    reweighted.sources[0].weight = 0.6
    with pytest.raises(ConfigError, match="belongs to a different mixture"):
        MixtureSampler(reweighted).load_state_dict(state)
    with pytest.raises(ConfigError, match="belongs to a different mixture"):
        MixtureSampler(cfg.model_copy(update={"seed": 0})).load_state_dict(state)
    broken = {**state, "consumed": {**state["consumed"], "law": 0}}
    with pytest.raises(ConfigError, match="not those of this mixture"):
        MixtureSampler(cfg).load_state_dict(broken)


def test_reordered_files_of_a_source_are_refused_on_resume(cfg: MixtureConfig) -> None:
    """The totals (the fingerprint) stay the same, but the documents' order would not."""
    sampler = MixtureSampler(cfg)
    sampler.draw_sources(10)
    state = sampler.state_dict()
    swapped = cfg.model_copy(deep=True)
    swapped.sources[0].path.reverse()
    with pytest.raises(
        ConfigError,
        match=r"source 'law': its files hold 10 documents/.* the saved run's held 15 documents/.*reordered",
    ):
        MixtureSampler(swapped).load_state_dict(state)
    # Equal-sized shards (the usual case) listed the other way round are refused too.
    tmp = Path(cfg.sources[0].path[0]).parent
    make_prefix(tmp / "even_a", [[1, 2, 3, 0], [4, 5, 0], [6, 0]])
    make_prefix(tmp / "even_b", [[7, 0], [8, 9, 0], [10, 11, 12, 0]])
    even = cfg.model_copy(deep=True)
    even.sources[0].path = [str(tmp / "even_a"), str(tmp / "even_b")]
    state = json.loads(json.dumps(MixtureSampler(even).state_dict()))  # as a checkpoint holds it
    even.sources[0].path.reverse()
    with pytest.raises(ConfigError, match=r"source 'law': .*reordered"):
        MixtureSampler(even).load_state_dict(state)
    state = sampler.state_dict()
    older = {k: v for k, v in state.items() if k != "layout"}  # saved before layouts were
    again = MixtureSampler(cfg)
    again.load_state_dict(older)
    assert again.position == 10


def test_a_longer_run_resumes_within_the_first_stage_only(cfg: MixtureConfig) -> None:
    early, late = MixtureSampler(cfg), MixtureSampler(cfg)
    early.draw_sources(150)
    late.draw_sources(250)
    longer = MixtureSampler(cfg, total_sequences=480)  # stage 2 now starts at 240
    longer.load_state_dict(early.state_dict())
    fresh = MixtureSampler(cfg, total_sequences=480)
    fresh.draw_sources(150)
    assert torch.equal(
        longer.next_global_batch(BATCH).tokens, fresh.next_global_batch(BATCH).tokens
    )
    with pytest.raises(ConfigError, match="run length changed from 400 to 480"):
        MixtureSampler(cfg, total_sequences=480).load_state_dict(late.state_dict())


def test_stats_that_disagree_with_the_index_are_an_error(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    make_prefix(tmp_path / "a", random_docs(rng, 5, 10, 20, 1), stats_tokens=10_000)
    path = write_yaml(
        tmp_path / "m.yaml",
        {
            "seq_length": 4,
            "tokens": 40,
            "sources": [{"name": "a", "kind": "curated", "path": str(tmp_path / "a"), "weight": 1}],
        },
    )
    with pytest.raises(DataError, match=r"m.yaml: source 'a': .* but their stats files say 10,000"):
        load_mixture(path).build()


def test_a_document_count_that_disagrees_with_the_index_is_an_error(tmp_path: Path) -> None:
    """Same tokens, other boundaries: another index beside the right data must not pass."""
    rng = np.random.default_rng(0)
    make_prefix(tmp_path / "a", random_docs(rng, 5, 10, 20, 1))
    stats_file = tmp_path / "a.stats.json"
    stats_file.write_text(json.dumps({**json.loads(stats_file.read_text()), "documents": 6}))
    source = {"name": "a", "kind": "curated", "path": str(tmp_path / "a"), "weight": 1}
    cfg = MixtureConfig(seq_length=4, tokens=40, sources=[source])
    with pytest.raises(DataError, match=r"source 'a': .* tokens in 5 documents but .* in 6"):
        MixtureSampler(cfg)


def test_a_prefix_listed_twice_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    make_prefix(tmp_path / "a", random_docs(rng, 5, 10, 20, 1))
    for suffix in (".bin", ".idx", ".stats.json"):
        (tmp_path / f"link{suffix}").symlink_to(tmp_path / f"a{suffix}")
    a, link = str(tmp_path / "a"), str(tmp_path / "link")
    for sources in (
        [{"name": "x", "path": [a, a]}],
        [{"name": "x", "path": [a]}, {"name": "y", "path": [link]}],
    ):
        sources = [{**s, "kind": "curated", "weight": 1} for s in sources]
        cfg = MixtureConfig(seq_length=4, tokens=40, sources=sources)
        with pytest.raises(DataError, match=r"is the same data as .*a \(source 'x'\).*seen twice"):
            plan_mixture(cfg)


def test_an_empty_data_file_is_named(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    make_prefix(tmp_path / "a", [list(range(1, 40)) + [0]])
    (tmp_path / "a.bin").write_bytes(b"")
    source = {"name": "a", "kind": "curated", "path": str(tmp_path / "a"), "weight": 1}
    with pytest.raises(DataError, match=r"a\.bin: 0 bytes, but its index describes 160"):
        MixtureSampler(MixtureConfig(seq_length=4, tokens=40, sources=[source]))
    assert "Exception ignored" not in capfd.readouterr().err


def test_stats_without_the_tokenizer_vocab_size_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    make_prefix(tmp_path / "a", random_docs(rng, 5, 10, 20, 1))
    stats_file = tmp_path / "a.stats.json"
    stats = json.loads(stats_file.read_text())
    del stats["tokenizer"]["vocab_size"]
    stats_file.write_text(json.dumps(stats))
    with pytest.raises(DataError, match=r"a.stats.json: tokenizer must hold .*'vocab_size'"):
        load_stats(tmp_path / "a")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("tokens", None, "tokens must be a non-negative integer, got null"),
        ("documents", "5", 'documents must be a non-negative integer, got "5"'),
        ("holdout_tokens", -1, "holdout_tokens must be a non-negative integer, got -1"),
        ("tokenizer.eod_id", 1.5, "tokenizer.eod_id must be a non-negative integer, got 1.5"),
        ("tokenizer.vocab_size", True, "tokenizer.vocab_size must be a positive integer, got true"),
        (
            "tokenizer.fingerprint",
            None,
            "tokenizer.fingerprint must be a non-empty string, got null",
        ),
    ],
)
def test_stats_with_a_bad_value_name_the_file_and_key(
    key: str, value: object, message: str, tmp_path: Path
) -> None:
    # a hand-written stats file (e.g. for data from another tool) must fail here, not later with
    # a TypeError in the planner
    rng = np.random.default_rng(0)
    make_prefix(tmp_path / "a", random_docs(rng, 5, 10, 20, 1))
    stats_file = tmp_path / "a.stats.json"
    stats = json.loads(stats_file.read_text())
    section, _, name = key.rpartition(".")
    (stats[section] if section else stats)[name] = value
    stats_file.write_text(json.dumps(stats))
    mixture = write_yaml(
        tmp_path / "m.yaml",
        {
            "seq_length": 4,
            "tokens": 40,
            "sources": [{"name": "a", "kind": "curated", "path": str(tmp_path / "a"), "weight": 1}],
        },
    )
    with pytest.raises(DataError) as err:
        plan_mixture(load_mixture(mixture))
    assert str(err.value) == f"{mixture}: source 'a': {stats_file}: {message}"


def test_an_empty_stage_is_skipped(cfg: MixtureConfig) -> None:
    sampler = MixtureSampler(cfg, total_sequences=1)  # stage 1 ends at round(0.5) = 0
    assert [(st.start, st.end) for st in sampler.plan.stages] == [(0, 0), (0, 1)]
    # Stage 2's weights 0.2/0.2/0.6 give the first slot to web (stage 1's would give it to law).
    assert sampler.next_global_batch(1).source_ids.tolist() == [2]
    state = sampler.state_dict()
    assert state["stage"] == 1 and state["consumed"] == {"law": 0, "news": 0, "web": 1}
    sampler.seek(1)
    assert sampler.state_dict() == state


def test_a_corrupt_index_is_a_data_error(tmp_path: Path) -> None:
    make_prefix(tmp_path / "a", [list(range(1, 40)) + [0]])
    (tmp_path / "a.idx").write_bytes(b"not an index")
    path = write_yaml(
        tmp_path / "m.yaml",
        {
            "seq_length": 4,
            "tokens": 40,
            "sources": [{"name": "a", "kind": "curated", "path": str(tmp_path / "a"), "weight": 1}],
        },
    )
    with pytest.raises(DataError, match=r"m.yaml: source 'a': .*a.idx: truncated index"):
        MixtureSampler(load_mixture(path))
