"""Mixture spec validation, the interleaving schedule, and `mix plan` (numbers and checks)."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mixture_data import make_prefix, write_yaml

from midtrain.data_mixing.interleave import Interleaver, exact_weights
from midtrain.data_mixing.mixture import MixtureConfig, load_mixture
from midtrain.data_mixing.plan import plan_mixture
from midtrain.data_mixing.sampler import MixtureSampler
from midtrain.errors import ConfigError, DataError

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "mixture.yaml"


def source(name: str, path: str, weight: float = 1.0, **extra: object) -> dict:
    return {"name": name, "kind": "customer", "path": [path], "weight": weight, **extra}


# --- schema -------------------------------------------------------------------------------------


def _load_error(tmp_path: Path, data: dict) -> str:
    path = write_yaml(tmp_path / "mix.yaml", data)
    with pytest.raises(ConfigError) as err:
        load_mixture(path)
    return str(err.value)


def test_non_positive_weight_is_rejected(tmp_path: Path) -> None:
    msg = _load_error(tmp_path, {"seq_length": 8, "sources": [source("a", "x", weight=0)]})
    assert "mix.yaml" in msg and "sources.0.weight" in msg and "greater than 0" in msg


def test_non_positive_stage_weight_is_rejected(tmp_path: Path) -> None:
    data = {
        "seq_length": 8,
        "sources": [source("a", "x")],
        "stages": [{"until": 1.0, "weights": {"a": -1}}],
    }
    msg = _load_error(tmp_path, data)
    assert "stages.0.weights" in msg and "'a' must be a positive number" in msg


def test_infinite_weights_are_rejected_by_key(tmp_path: Path) -> None:
    msg = _load_error(tmp_path, {"seq_length": 8, "sources": [source("a", "x", weight=math.inf)]})
    assert "sources.0.weight" in msg and "finite" in msg
    data = {
        "seq_length": 8,
        "sources": [source("a", "x")],
        "stages": [{"until": 1.0, "weights": {"a": math.inf}}],
    }
    msg = _load_error(tmp_path, data)
    assert "stages.0.weights.a: Input should be a finite number" in msg


def test_unknown_stage_source_is_rejected(tmp_path: Path) -> None:
    data = {
        "seq_length": 8,
        "sources": [source("a", "x"), source("b", "y")],
        "stages": [{"until": 1.0, "weights": {"a": 1, "b": 1, "c": 1}}],
    }
    assert "stages[0].weights: unknown source c" in _load_error(tmp_path, data)


def test_until_must_increase_and_end_at_one(tmp_path: Path) -> None:
    base = {"seq_length": 8, "sources": [source("a", "x")]}
    msg = _load_error(tmp_path, {**base, "stages": [{"until": 0.5}, {"until": 0.5}]})
    assert "stages[1].until must increase" in msg
    msg = _load_error(tmp_path, {**base, "stages": [{"until": 0.5}]})
    assert "the last stage must end at until: 1.0" in msg


def test_unknown_key_names_its_path(tmp_path: Path) -> None:
    data = {"seq_length": 8, "sources": [{**source("a", "x"), "wieght": 2}]}
    assert "mix.yaml: sources.0.wieght: unknown key" in _load_error(tmp_path, data)


# --- the interleaving schedule --------------------------------------------------------------------


def _schedule(weights: list[Fraction], n: int) -> np.ndarray:
    picks: list[int] = []
    Interleaver(weights).advance([0] * len(weights), n, picks)
    return np.array(picks)


WEIGHT = st.one_of(
    st.integers(1, 100).map(float),  # small periods
    st.integers(1, 999).map(lambda x: x / 1000),  # decimals as users write them
    st.floats(1e-3, 1e3),  # any float: periods of 10**17 and more
)


@settings(max_examples=60, deadline=None)
@given(raw=st.lists(WEIGHT, min_size=2, max_size=8), n=st.integers(1000, 20_000))
def test_every_prefix_is_within_one_sequence_of_its_share(raw: list[float], n: int) -> None:
    weights = exact_weights(raw)
    picks = _schedule(weights, n)
    # count_s(m) for every prefix length m = 1..n, as exact integers: |c*D - a*m| < D.
    counts = np.cumsum(picks[:, None] == np.arange(len(raw))[None, :], axis=0)
    interleaver = Interleaver(weights)
    period, shares = interleaver.period, np.array(interleaver.shares, dtype=object)
    m = np.arange(1, n + 1, dtype=object)[:, None]
    lag = counts.astype(object) * period - shares[None, :] * m
    assert max(abs(x) for x in lag.ravel()) < period


@settings(max_examples=40, deadline=None)
@given(raw=st.lists(st.integers(1, 30), min_size=2, max_size=6), n=st.integers(0, 3000))
def test_counts_at_jumps_whole_periods_exactly(raw: list[int], n: int) -> None:
    weights = exact_weights([float(r) for r in raw])
    picks = _schedule(weights, n)
    stepped = [int((picks == s).sum()) for s in range(len(raw))]
    assert Interleaver(weights).counts_at(n) == stepped
    # Resuming the schedule from a prefix's counts continues it exactly.
    half = n // 2
    counts = Interleaver(weights).counts_at(half)
    rest: list[int] = []
    Interleaver(weights).advance(counts, n - half, rest)
    assert rest == picks[half:].tolist()


def test_eight_sources_never_lag_a_whole_sequence() -> None:
    weights = exact_weights([0.37, 0.21, 0.13, 0.11, 0.07, 0.05, 0.04, 0.02])
    picks = _schedule(weights, 20_000)
    counts = np.zeros(len(weights))
    worst = 0.0
    for m, s in enumerate(picks, start=1):
        counts[s] += 1
        worst = max(worst, float(np.abs(counts - np.array(weights, dtype=float) * m).max()))
    assert worst < 1.0


def test_schedule_of_the_documented_weights_worked_by_hand() -> None:
    # 0.6/0.1/0.3: contracts' windows [0,2) [1,4) [3,5) [5,7) [6,9) [8,10), filings' [0,10), web's
    # [0,4) [3,7) [6,10). Slot 1 ties contracts and web at deadline 4 and slot 7 filings and web at
    # 10: the first source in the mixture wins.
    assert (
        _schedule(exact_weights([0.6, 0.1, 0.3]), 20).tolist() == [0, 0, 2, 0, 2, 0, 0, 1, 0, 2] * 2
    )


def test_exact_weights_are_the_decimals_written() -> None:
    assert exact_weights([0.6, 0.1, 0.3]) == [Fraction(3, 5), Fraction(1, 10), Fraction(3, 10)]
    assert exact_weights([2, 1, 1]) == [Fraction(1, 2), Fraction(1, 4), Fraction(1, 4)]
    assert Interleaver(exact_weights([0.6, 0.1, 0.3])).shares == [6, 1, 3]


# --- the plan -----------------------------------------------------------------------------------


def _example_data(root: Path, tokens: dict[str, int] | None = None) -> None:
    """The documented example's prefixes under root/data; stats may claim large token counts
    (planning reads only the stats)."""
    rng = np.random.default_rng(0)
    for name in ("contracts", "filings_a", "filings_b", "web"):
        docs = [np.append(rng.integers(1, 500, 1999), 0) for _ in range(40)]
        make_prefix(root / "data" / name, docs, stats_tokens=(tokens or {}).get(name))


def test_documented_example_validates_and_plans(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    _example_data(tmp_path)
    cfg = load_mixture(EXAMPLE, ["tokens=409600"])  # 200 sequences of 2048
    assert [s.name for s in cfg.sources] == ["contracts", "filings", "web"]
    assert cfg.sources[1].path == [
        str(tmp_path / "data/filings_a"),
        str(tmp_path / "data/filings_b"),
    ]
    plan = plan_mixture(cfg)
    out = plan.to_json()
    json.dumps(out)  # JSON-able
    assert set(out) == {"stages", "totals"}
    assert [s["until"] for s in out["stages"]] == [0.9, 1.0]
    for stage in out["stages"]:
        assert set(stage) == {"until", "sources"}
        assert list(stage["sources"]) == ["contracts", "filings", "web"]
        for draw in stage["sources"].values():
            assert isinstance(draw["tokens"], int) and isinstance(draw["epochs"], float)
            assert draw["tokens"] == draw["sequences"] * 2048
            per_epoch = (draw["available"] - 1) // 2048  # the sampler drops an epoch's tail
            assert draw["epochs"] == pytest.approx(draw["sequences"] / per_epoch, abs=1e-6)
    first, second = out["stages"]
    # 180 sequences at 6:1:3, then 20 at 4:1:5: whole periods of 10, exactly.
    assert {k: v["sequences"] for k, v in first["sources"].items()} == {
        "contracts": 108,
        "filings": 18,
        "web": 54,
    }
    assert {k: v["sequences"] for k, v in second["sources"].items()} == {
        "contracts": 8,
        "filings": 2,
        "web": 10,
    }
    assert first["sources"]["filings"]["available"] == 160_000  # both prefixes
    assert out["totals"]["sources"]["contracts"]["tokens"] == 116 * 2048
    assert out["totals"]["sources"]["contracts"]["epochs"] == pytest.approx(116 / 39, abs=1e-6)
    assert out["totals"]["tokens"] == 409_600
    plan.print()
    printed = capsys.readouterr().err
    assert "stage 1 of 2" in printed and "whole run" in printed and "contracts" in printed


def test_documented_example_at_full_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    big = {"contracts": 500_000_000, "filings_a": 300_000_000, "filings_b": 300_000_000}
    _example_data(tmp_path, {**big, "web": 10**11})
    plan = plan_mixture(load_mixture(EXAMPLE))
    assert plan.total_sequences == 976_562  # 2e9 // 2048
    first, second = plan.stages
    assert (first.start, first.end, second.end) == (0, 878_906, 976_562)
    for stage in plan.stages:
        counts = [d.sequences for d in stage.sources]
        assert sum(counts) == stage.sequences
        for d in stage.sources:
            assert abs(d.sequences - d.weight * stage.sequences) < 1
    contracts = plan.to_json()["totals"]["sources"]["contracts"]
    assert contracts["epochs"] == pytest.approx(
        contracts["sequences"] / (499_999_999 // 2048), abs=1e-6
    )
    assert contracts["epochs"] < 4


def test_max_epochs_violation_says_by_how_much_and_what_to_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _example_data(tmp_path)
    cfg = load_mixture(EXAMPLE, ["tokens=409600"])
    # contracts draws 116 sequences; one pass over its 80,000 tokens yields 79,999 // 2048 = 39
    cfg.sources[0].max_epochs = 1.0
    with pytest.raises(ConfigError) as err:
        plan_mixture(cfg)
    msg = str(err.value)
    assert str(EXAMPLE) in msg and "'contracts'" in msg
    assert "2.974 epochs (116 sequences; one pass over its 80,000 tokens yields 39)" in msg
    assert "max_epochs 1 by 1.974 epochs (77 sequences)" in msg
    assert "lower its weight" in msg and "raise max_epochs to 2.98" in msg
    assert "add at least 157,569 tokens" in msg  # 116 x 2048 + 1 - 80,000
    cfg.sources[0].max_epochs = 116 / 39
    plan_mixture(cfg)  # exactly at the cap is allowed


def _two_sources(tmp_path: Path, fp_b: str = "tok-A", b_tokens: int = 100) -> MixtureConfig:
    make_prefix(tmp_path / "a", [list(range(1, 100)) + [0]])
    make_prefix(tmp_path / "b", [list(range(1, b_tokens)) + [0]], fingerprint=fp_b)
    path = write_yaml(
        tmp_path / "mix.yaml",
        {
            "seq_length": 8,
            "tokens": 80,
            "sources": [source("a", str(tmp_path / "a")), source("b", str(tmp_path / "b"))],
        },
    )
    return load_mixture(path)


def test_missing_prefix_names_file_source_and_path(tmp_path: Path) -> None:
    cfg = _two_sources(tmp_path)
    cfg.sources[1].path = [str(tmp_path / "nowhere")]
    with pytest.raises(DataError) as err:
        plan_mixture(cfg)
    msg = str(err.value)
    assert "mix.yaml" in msg and "source 'b'" in msg and "nowhere.bin: no such file" in msg


def test_tokenizer_mismatch_names_both_sources_and_fingerprints(tmp_path: Path) -> None:
    cfg = _two_sources(tmp_path, fp_b="tok-B")
    with pytest.raises(DataError) as err:
        plan_mixture(cfg)
    msg = str(err.value)
    assert "sources 'a' and 'b'" in msg and "tok-A" in msg and "tok-B" in msg


def test_source_smaller_than_one_sequence(tmp_path: Path) -> None:
    cfg = _two_sources(tmp_path, b_tokens=8)  # 8 tokens < seq_length + 1
    with pytest.raises(DataError, match="source 'b' has 8 tokens, fewer than one sequence"):
        plan_mixture(cfg)


def test_epochs_count_the_samplers_passes_not_tokens_over_size(tmp_path: Path) -> None:
    # 100 distinct tokens at seq_length 8: a pass is 99 // 8 = 12 windows (the 3-token tail is
    # dropped), so the 13th sequence already repeats tokens, though 13 x 8 = 104 is barely more
    # than the source's 100 tokens (1.04 "epochs" by tokens).
    make_prefix(tmp_path / "a", [list(range(1, 100)) + [0]])
    cfg = load_mixture(
        write_yaml(
            tmp_path / "mix.yaml",
            {"seq_length": 8, "sources": [source("a", str(tmp_path / "a"), max_epochs=1.05)]},
        )
    )
    assert plan_mixture(cfg, total_sequences=12).stages[0].sources[0].epochs == 1.0
    with pytest.raises(ConfigError, match=r"would be drawn 1.083 epochs \(13 sequences"):
        plan_mixture(cfg, total_sequences=13)

    cfg.sources[0].max_epochs = None
    inputs = MixtureSampler(cfg, total_sequences=13).next_global_batch(13).tokens[:, :8]
    first_pass = inputs[:12].flatten().tolist()
    assert len(set(first_pass)) == len(first_pass)  # one pass: no token twice
    assert set(inputs[12].tolist()) <= set(first_pass)  # the 13th sequence: a second pass


def test_whole_run_epochs_are_the_samplers_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 39 tokens at seq_length 20: one pass is (39 - 1) // 20 = 1 sequence, so drawing 4 sequences
    # (80 tokens) is 4 epochs, which max_epochs 4 allows; tokens / size would say 2.05.
    make_prefix(tmp_path / "tiny", [list(range(1, 39)) + [0]])
    make_prefix(tmp_path / "big", [list(range(1, 1000)) + [0]])
    cfg = load_mixture(
        write_yaml(
            tmp_path / "mix.yaml",
            {
                "seq_length": 20,
                "tokens": 160,
                "sources": [
                    source("tiny", str(tmp_path / "tiny"), weight=0.5, max_epochs=4),
                    source("big", str(tmp_path / "big"), weight=0.5),
                ],
            },
        )
    )
    plan = plan_mixture(cfg)
    totals = plan.to_json()["totals"]["sources"]
    last_stage = {d.name: d.cumulative_epochs for d in plan.stages[-1].sources}
    rows = {row[0]: row for row in plan.whole_run_rows()}
    assert rows["tiny"][2:] == [80, 39, 4.0, 4]
    for name, row in rows.items():
        assert row[4] == pytest.approx(totals[name]["epochs"], abs=1e-6) == last_stage[name]
    plan.print()
    whole_run = capsys.readouterr().err.split("whole run")[1]
    tiny_line = next(line for line in whole_run.splitlines() if "tiny" in line)
    assert tiny_line.split()[-3:] == ["4", "│", "4"] and "2.051" not in whole_run


def test_run_length_comes_from_tokens_or_total_sequences(tmp_path: Path) -> None:
    cfg = _two_sources(tmp_path)
    assert plan_mixture(cfg).total_sequences == 10
    assert plan_mixture(cfg, total_sequences=7).total_sequences == 7
    cfg.tokens = None
    with pytest.raises(ConfigError, match="length of the run is unknown"):
        plan_mixture(cfg)
