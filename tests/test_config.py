"""Run spec loading: overrides, validation messages with key paths, resolved form round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from midtrain.config import (
    RunSpec,
    apply_run_overrides,
    breaks_exactness,
    diff_specs,
    load_run_spec,
    run_spec_from_yaml,
    validate_run_spec,
)
from midtrain.config_io import apply_overrides, load_yaml_text, parse_override
from midtrain.errors import ConfigError

MIXTURE = {
    "seq_length": 32,
    "seed": 3,
    "sources": [
        {"name": "law", "kind": "customer", "path": ["data/law"], "weight": 0.7},
        {"name": "web", "kind": "curated", "path": "data/web", "weight": 0.3, "max_epochs": 2},
    ],
}

SPEC = {
    "run_dir": "runs/tiny",
    "model": {
        "tokenizer": "tok",
        "config": {
            "hidden_size": 64,
            "num_layers": 2,
            "num_heads": 4,
            "num_kv_heads": 2,
            "ffn_hidden_size": 176,
        },
    },
    "init_from": None,
    "mixture": "mix.yaml",
    "optimizer": {"lr": 3.0e-3, "weight_decay": 0.1},
    "schedule": {"kind": "wsd", "warmup_steps": 10, "decay_fraction": 0.2},
    "train": {"global_batch_size": 8, "micro_batch_size": 4, "max_steps": 60, "seed": 1},
    "checkpoint": {"interval": 20, "keep_last": 3},
    "workers": 2,
}


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(MIXTURE))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    return path


def test_contract_keys_load_and_mixture_is_inlined(spec_file: Path) -> None:
    spec = load_run_spec(spec_file)
    assert spec.mixture.sources[0].name == "law"
    assert spec.workers == 2 and spec.grad_accum_steps == 1
    assert spec.total_sequences == 60 * 8
    assert Path(spec.run_dir).is_absolute() and Path(spec.model.tokenizer).is_absolute()
    assert spec.mixture.sources[1].path == [str(Path("data/web").resolve())]
    assert spec.mixture.source_file == str(spec_file.parent / "mix.yaml")  # planning errors name it


def test_overrides_are_typed(spec_file: Path) -> None:
    spec = load_run_spec(spec_file, ["optimizer.lr=1e-4", "train.max_steps=30", "workers=1"])
    assert spec.optimizer.lr == pytest.approx(1e-4)
    assert spec.train.max_steps == 30 and spec.workers == 1


def test_checkpoints_are_periodic_by_default(tmp_path: Path) -> None:
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(MIXTURE))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in SPEC.items() if k != "checkpoint"}))
    assert load_run_spec(path).checkpoint.interval == 1000
    assert load_run_spec(path, ["checkpoint.interval=null"]).checkpoint.interval is None


def test_resolved_yaml_round_trips(spec_file: Path) -> None:
    spec = load_run_spec(spec_file)
    again = run_spec_from_yaml(spec.to_yaml(), "saved")
    assert again == spec
    assert diff_specs(spec, again) == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.bogus=1", "train.bogus: unknown key"),
        ("optimizer.lr=-1", "optimizer.lr: Input should be greater than 0"),
        ("train.max_steps=many", "train.max_steps: Input should be a valid integer"),
        ("train.global_batch_size=6", "multiple of train.micro_batch_size x workers"),
        ("model.config.num_heads=3", "divisible by num_heads"),
        ("mixture.sources.0.weight=0", "mixture.sources.0.weight"),
        ("schedule.kind=step", "schedule.kind"),
        ("checkpoint.keep_every=7", "keep_every (7) must be a multiple of checkpoint.interval"),
        # Numbers are finite, and YAML's booleans are not numbers (nor numbers booleans).
        ("optimizer.lr=.inf", "optimizer.lr: Input should be a finite number"),
        ("optimizer.weight_decay=.nan", "optimizer.weight_decay: Input should be a finite number"),
        ("model.config.rope_theta=.inf", "model.config.rope_theta: Input should be a finite"),
        ("optimizer.lr=true", "optimizer.lr: a number is expected here, not a boolean"),
        ("train.seed=true", "train.seed: a number is expected here, not a boolean (got True)"),
        (
            "checkpoint.keep_last=yes",
            "checkpoint.keep_last: a number is expected here, not a boolean",
        ),
        ("model.compile=1", "model.compile: Input should be a valid boolean"),
        # An empty path is not the current directory.
        ("run_dir=", "run_dir: an empty path"),
        ("mixture.sources.0.path=", "mixture.sources.0.path.0: an empty path"),
    ],
)
def test_bad_values_name_the_key(spec_file: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_run_spec(spec_file, [override])
    assert str(spec_file) in str(err.value)
    assert message in str(err.value)


def test_init_from_and_resume_together_is_an_error(spec_file: Path) -> None:
    with pytest.raises(ConfigError, match="not both"):
        load_run_spec(spec_file, ["init_from.checkpoint=ckpt", "resume=true"])


def test_model_from_checkpoint_and_init_from_together_is_an_error(spec_file: Path) -> None:
    both = ["model.config=null", "model.from_checkpoint=a", "init_from.checkpoint=b"]
    with pytest.raises(ConfigError, match="model.from_checkpoint and init_from both"):
        load_run_spec(spec_file, both)
    assert load_run_spec(spec_file, both[:2]).model.from_checkpoint == str(Path("a").resolve())


def test_zero_stage_is_refused_with_the_megatron_backend(spec_file: Path) -> None:
    with pytest.raises(ConfigError, match=r"train.zero_stage \(3\) applies to the deepspeed"):
        load_run_spec(spec_file, ["train.backend=megatron", "train.zero_stage=3"])


def test_a_key_given_twice_is_an_error_naming_the_line(spec_file: Path) -> None:
    text = spec_file.read_text().replace("optimizer:", "optimizer:\n  lr: 5.0", 1)
    spec_file.write_text(text)
    line = text.splitlines().index("  lr: 0.003") + 1
    with pytest.raises(ConfigError, match=rf"run.yaml:{line}: not valid YAML: key 'lr' is given"):
        load_run_spec(spec_file)
    # In a saved spec too.
    with pytest.raises(ConfigError, match="saved:2: not valid YAML: key 'a' is given twice"):
        run_spec_from_yaml("a: 1\na: 2\n", "saved")


def test_the_mixture_file_can_be_overridden_and_then_edited(
    spec_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = spec_file.parent / "other.yaml"
    other.write_text(yaml.safe_dump({**MIXTURE, "seq_length": 16}))
    spec = load_run_spec(spec_file, ["mixture.sources.1.weight=0.5", f"mixture={other}"])
    assert spec.mixture.seq_length == 16 and spec.mixture.sources[1].weight == 0.5
    assert spec.mixture.source_file == str(other)
    # A relative path on the command line is from the current directory, as every path override
    # (the spec's own `mixture: mix.yaml` is found beside the spec).
    here = tmp_path / "elsewhere"
    here.mkdir()
    (here / "mix.yaml").write_text(yaml.safe_dump({**MIXTURE, "seq_length": 8}))
    monkeypatch.chdir(here)
    assert load_run_spec(spec_file, ["mixture=mix.yaml"]).mixture.seq_length == 8
    assert load_run_spec(spec_file).mixture.seq_length == 32
    # And on a saved spec (resuming with overrides).
    data = load_run_spec(spec_file).model_dump(mode="json")
    found = apply_run_overrides(data, ["mixture=mix.yaml", "mixture.seed=5"], "saved")
    spec = validate_run_spec(data, "saved", found)
    assert (spec.mixture.seq_length, spec.mixture.seed, found) == (8, 5, here / "mix.yaml")


def test_a_saved_spec_of_an_older_version_loads_as_it_was_meant(spec_file: Path) -> None:
    # Settings older versions accepted and ignored, now refused in a spec file: a run saved
    # with them still resumes, with them rewritten to what they meant.
    saved = yaml.safe_load(load_run_spec(spec_file).to_yaml())
    saved["schedule"].update(rewarm_steps=5, warmup_steps=10, warmup_start_ratio=0.5)
    saved["optimizer"]["grad_clip"] = float("inf")
    saved["mixture"]["sources"][0]["max_epochs"] = float("inf")
    saved["model"] = {"from_checkpoint": "/ckpt/a", "tokenizer": "/tok"}
    saved["init_from"] = {"checkpoint": "/ckpt/b"}
    spec = run_spec_from_yaml(yaml.safe_dump(saved), "old/run_spec.yaml")
    assert (spec.schedule.rewarm_steps, spec.schedule.warmup_steps) == (5, 0)
    assert spec.optimizer.grad_clip is None and spec.mixture.sources[0].max_epochs is None
    assert spec.model.from_checkpoint is None and spec.init_from.checkpoint == "/ckpt/b"
    with pytest.raises(ConfigError, match="not used with rewarm_steps"):  # not in a new spec
        load_run_spec(spec_file, ["schedule.rewarm_steps=5"])


def test_numbers_are_lax_but_not_booleans() -> None:
    from midtrain.data_mixing.mixture import MixtureConfig

    source = {"name": "a", "kind": "customer", "path": "/d/a", "weight": 1}
    ok = MixtureConfig(seq_length=np.int64(8), tokens=2.0e9, sources=[source])
    assert (ok.seq_length, ok.tokens) == (8, 2_000_000_000)  # YAML reads 2.0e+9 as a float
    for bad in (True, 1.5, "x"):
        with pytest.raises(ValueError, match="seq_length"):
            MixtureConfig(seq_length=bad, sources=[source])


def test_yaml_merge_keys_are_not_duplicates() -> None:
    text = "m: &M {k: 1, j: 1}\nx: {y: {n: &N {<<: *M, k: 2}}}\nz: {<<: *N}\n"
    assert load_yaml_text(text) == yaml.safe_load(text)  # (how PyYAML merges varies by version)
    with pytest.raises(yaml.YAMLError, match="key 'k' is given twice"):
        load_yaml_text("m: &M {k: 1}\nz: {<<: *M, k: 2, k: 3}\n")


def test_errors_inside_a_mixture_file_name_that_file(spec_file: Path) -> None:
    mixture = spec_file.parent / "mix.yaml"
    bad = {**MIXTURE, "sources": [{**MIXTURE["sources"][0], "weight": -1}]}
    mixture.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError) as err:
        load_run_spec(spec_file)
    assert str(err.value).startswith(f"{spec_file} (mixture from {mixture}): ")
    assert "mixture.sources.0.weight: Input should be greater than 0" in str(err.value)
    # Errors outside the mixture still name only the run spec.
    with pytest.raises(ConfigError) as err:
        load_run_spec(spec_file, ["optimizer.lr=0"])
    assert str(err.value).splitlines()[1].startswith(f"{spec_file}: optimizer.lr: ")


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_run_spec(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_run_spec(bad)


def test_override_syntax() -> None:
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a.b=null") == (["a", "b"], None)
    # YAML would drop ` #2` as a comment, and read `#x` as null: plain strings stay as typed.
    assert parse_override("run_dir=runs/exp #2") == (["run_dir"], "runs/exp #2")
    assert parse_override("a=#x") == (["a"], "#x")
    assert parse_override("a=5 #c") == (["a"], "5 #c")  # refused as a number, not silently 5
    assert parse_override("a='quoted #1'") == (["a"], "quoted #1")
    with pytest.raises(ConfigError, match="expected key.path=value"):
        parse_override("a.b")
    with pytest.raises(ConfigError, match="a is not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_diff_marks_exactness_keys(spec_file: Path) -> None:
    a = load_run_spec(spec_file)
    b = load_run_spec(spec_file, ["train.seed=2", "train.max_steps=80"])
    keys = {k for k, _, _ in diff_specs(a, b)}
    assert keys == {"train.seed", "train.max_steps"}
    assert breaks_exactness("train.seed") and breaks_exactness("mixture.sources")
    assert breaks_exactness("train.precision") and breaks_exactness("train.deterministic")
    assert not breaks_exactness("train.max_steps") and not breaks_exactness("workers")
    assert not breaks_exactness("train.zero_stage")
    assert breaks_exactness("schedule.decay_fraction")  # moves the LR curve, as optimizer.lr does


def test_spec_is_a_typed_tree(spec_file: Path) -> None:
    spec = load_run_spec(spec_file)
    assert isinstance(spec, RunSpec)
    assert spec.schedule.kind == "wsd" and spec.checkpoint.keep_last == 3


def test_bf16_without_zero_is_refused_by_key(spec_file: Path) -> None:
    with pytest.raises(ConfigError, match="train.precision bf16 needs train.zero_stage 1, 2 or 3"):
        load_run_spec(spec_file, ["train.precision=bf16", "train.zero_stage=0"])
    assert (
        load_run_spec(spec_file, ["train.precision=bf16", "train.zero_stage=1"]).train.zero_stage
        == 1
    )
