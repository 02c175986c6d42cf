"""Run spec loading: overrides, validation messages with key paths, resolved form round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from midtrain.config import RunSpec, breaks_exactness, diff_specs, load_run_spec, run_spec_from_yaml
from midtrain.config_io import apply_overrides, parse_override
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


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_run_spec(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_run_spec(bad)


def test_override_syntax() -> None:
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
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
