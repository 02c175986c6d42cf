"""The command line: every user step is a subcommand with help; errors exit 2 with a message."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from mixture_data import make_prefix
from transformers import LlamaConfig, LlamaForCausalLM

from midtrain.checkpoints import CheckpointMeta, CheckpointSaver
from midtrain.cli import cli
from midtrain.errors import ConfigError, DataError

SUBCOMMANDS = {
    "tokenizer": ["train"],
    "data": ["prepare", "sample-corpora"],
    "mix": ["plan"],
    "ckpt": ["list", "show", "verify", "prune", "keep", "import-hf", "export-hf"],
    "schedule": ["plot"],
    "train": [],
    "eval": [],
    "report": [],
    "eval-tasks": [],
    "demo": [],
    "slurm": ["render", "submit"],
    "jobs": ["status", "logs", "stop"],
}


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_help_lists_the_users_steps() -> None:
    code, out = invoke("--help")
    assert code == 0
    for group, commands in SUBCOMMANDS.items():
        assert group in out
        for command in commands or [None]:
            code, sub = invoke(group, *([command] if command else []), "--help")
            assert code == 0 and "Usage:" in sub, (group, command)


def test_errors_exit_2_with_the_message(tmp_path: Path) -> None:
    bad = tmp_path / "mix.yaml"
    bad.write_text("seq_length: 0\nsources: []\n")
    proc = subprocess.run(
        [sys.executable, "-m", "midtrain.cli", "mix", "plan", str(bad)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "seq_length" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_mix_plan_json_on_stdout(tmp_path: Path, prepared_corpora: dict[str, Path]) -> None:
    mixture = {
        "seq_length": 64,
        "tokens": 64 * 100,
        "seed": 1,
        "sources": [
            {
                "name": "legal",
                "kind": "customer",
                "path": [str(prepared_corpora["legal"])],
                "weight": 3,
            },
            {
                "name": "general",
                "kind": "curated",
                "path": [str(prepared_corpora["general"])],
                "weight": 1,
            },
        ],
    }
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(mixture))
    code, out = invoke("mix", "plan", str(path), "--json")
    assert code == 0
    plan = json.loads(out)
    sources = plan["stages"][0]["sources"]
    assert sources["legal"]["tokens"] == 75 * 64 and sources["general"]["tokens"] == 25 * 64


def test_mix_plan_of_a_run_spec_names_the_file(tmp_path: Path) -> None:
    # 39 tokens at seq_length 20 yield one sequence per pass: 20 sequences are 20 epochs
    make_prefix(tmp_path / "tiny", [list(range(1, 39)) + [0]])
    make_prefix(tmp_path / "big", [list(range(1, 1000)) + [0]])
    spec = tmp_path / "run.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(tmp_path / "runs" / "x"),
                "model": {
                    "tokenizer": str(tmp_path / "tok"),
                    "config": {
                        "hidden_size": 32,
                        "num_layers": 1,
                        "num_heads": 2,
                        "ffn_hidden_size": 64,
                        "vocab_size": 300,
                    },
                },
                "mixture": {
                    "seq_length": 20,
                    "sources": [
                        {
                            "name": "tiny",
                            "kind": "customer",
                            "path": str(tmp_path / "tiny"),
                            "weight": 0.5,
                            "max_epochs": 1,
                        },
                        {
                            "name": "big",
                            "kind": "curated",
                            "path": str(tmp_path / "big"),
                            "weight": 0.5,
                        },
                    ],
                },
                "optimizer": {"lr": 1e-3},
                "train": {"global_batch_size": 4, "micro_batch_size": 4, "max_steps": 10},
            }
        )
    )
    with pytest.raises(ConfigError) as err:
        invoke("mix", "plan", str(spec))
    assert str(err.value).startswith(f"{spec}: mixture: source 'tiny' would be drawn 20.000 epochs")
    with pytest.raises(DataError, match=re.escape(f"{spec}: mixture: source 'tiny': ")):
        invoke("mix", "plan", str(spec), f"mixture.sources.0.path={tmp_path / 'nowhere'}")


def test_data_prepare_bad_options_and_outputs_are_one_line_errors(
    tiny_tokenizer: Path, tmp_path: Path
) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "hello"}\n', encoding="utf-8")
    base = ["data", "prepare", "--input", str(corpus), "--tokenizer", str(tiny_tokenizer)]
    cases = [
        (["--output", str(tmp_path / "c"), "--text-field", ""], "data prepare: text_field: "),
        (["--output", str(corpus / "x")], f"{corpus} is a file, not a directory"),
    ]
    if Path("/proc/self").is_dir():  # Linux: nobody, root included, may create files in /proc
        cases.append(
            (["--output", "/proc/x"], "/proc/x: cannot create the directory /proc/.x.prepare-")
        )
    for extra, message in cases:
        proc = midtrain_cli(*base, *extra)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl"]  # nothing written


@pytest.fixture
def tiny_run(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=128,
        )
    )
    run = tmp_path / "run"
    with CheckpointSaver(run, keep_last=5) as saver:
        for step, phase in ((10, "stable"), (20, "decay")):
            saver.save(
                CheckpointMeta(step=step, tokens=step * 100, lr=1e-3, phase=phase, loss=2.0),
                model_state=model.state_dict(),
                config=model.config,
                trainer_state={"step": step},
            )
    return run


def test_ckpt_list_json_verify_and_export(tiny_run: Path, tmp_path: Path) -> None:
    code, out = invoke("ckpt", "list", str(tiny_run), "--json")
    assert code == 0
    listed = json.loads(out)
    assert [c["step"] for c in listed] == [10, 20]
    assert {"path", "step", "tokens", "lr", "phase", "complete"} <= set(listed[0])
    assert listed[0]["phase"] == "stable" and all(c["complete"] for c in listed)

    code, out = invoke("ckpt", "verify", str(tiny_run))
    assert code == 0 and "verified" in out
    weights = tiny_run / "checkpoints" / "step_00000020" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    proc = subprocess.run(
        [sys.executable, "-m", "midtrain.cli", "ckpt", "verify", str(tiny_run)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "model.safetensors" in proc.stderr

    out_dir = tmp_path / "hf"
    code, out = invoke(
        "ckpt", "export-hf", str(tiny_run / "checkpoints" / "step_00000010"), str(out_dir)
    )
    assert code == 0 and (out_dir / "model.safetensors").is_file()
    assert not (out_dir / "manifest.json").exists()

    code, out = invoke("ckpt", "import-hf", str(out_dir), str(tmp_path / "imported"))
    assert code == 0
    code, out = invoke("ckpt", "verify", str(tmp_path / "imported"))
    assert code == 0 and "verified" in out


def midtrain_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "midtrain.cli", *args], capture_output=True, text=True
    )


def test_ckpt_show_keep_and_prune(tiny_run: Path) -> None:
    first, second = (tiny_run / "checkpoints" / f"step_000000{s}" for s in (10, 20))
    shown = midtrain_cli("ckpt", "show", str(first), "--json")
    assert shown.returncode == 0
    assert json.loads(shown.stdout)["step"] == 10

    # Without --keep-last the run spec's checkpoint.keep_last decides; this run has none.
    no_spec = midtrain_cli("ckpt", "prune", str(tiny_run))
    assert no_spec.returncode != 0 and "--keep-last" in no_spec.stderr

    dry = midtrain_cli("ckpt", "prune", str(tiny_run), "--keep-last", "1", "--dry-run")
    assert dry.returncode == 0 and f"would delete {first}" in dry.stdout
    assert first.is_dir()

    assert midtrain_cli("ckpt", "keep", str(first)).returncode == 0
    kept = midtrain_cli("ckpt", "prune", str(tiny_run), "--keep-last", "1")
    assert kept.returncode == 0 and "deleted" not in kept.stdout
    assert first.is_dir() and second.is_dir()

    assert midtrain_cli("ckpt", "keep", str(first), "--unset").returncode == 0
    by_run = midtrain_cli("ckpt", "keep", str(tiny_run))  # marks (and names) what latest names
    assert by_run.returncode == 0 and by_run.stdout.strip() == f"{second}: keep=yes"
    assert midtrain_cli("ckpt", "keep", str(tiny_run), "--unset").returncode == 0
    (tiny_run / "run_spec.yaml").write_text("checkpoint: {keep_last: 1\n")  # malformed
    broken = midtrain_cli("ckpt", "prune", str(tiny_run))
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    assert broken.stderr.startswith(f"error: {tiny_run / 'run_spec.yaml'}:2: not valid YAML")
    (tiny_run / "run_spec.yaml").write_text(
        yaml.safe_dump({"run_dir": str(tiny_run), "checkpoint": {"keep_last": 1}})
    )
    # Its checkpoints/ directory is the run's too (the spec is the run dir's).
    pruned = midtrain_cli("ckpt", "prune", str(tiny_run / "checkpoints"))
    assert pruned.returncode == 0 and f"deleted {first}" in pruned.stdout
    assert not first.exists() and second.is_dir()


def test_training_progress_line_shows_loss_per_source_grad_norm_and_mfu() -> None:
    from midtrain.launch.local import progress_line

    record = {
        "loss": 2.5,
        "tokens": 1_600_000,
        "loss_by_source": {"legal": 2.0, "general": 3.0},
        "tokens_by_source": {"legal": 1_200_000, "general": 400_000},
        "lr": 3e-4,
        "grad_norm": 1.25,
        "tokens_per_s": 12345.6,
        "mfu": 0.125,
    }
    line = progress_line(record)
    for part in (
        "loss 2.5000",
        "1.6M tok",
        "legal 2.000 (1.2M tok) general 3.000 (400k tok)",
        "lr 3.00e-04",
        "gnorm 1.25",
    ):
        assert part in line
    assert "12,346 tok/s" in line and "MFU 12.5%" in line
    bare = progress_line(
        {**record, "loss_by_source": {"legal": 2.5}, "grad_norm": None, "mfu": None}
    )
    assert "legal" not in bare and "gnorm" not in bare and "MFU" not in bare
    assert "1.6M tok" in bare


def test_schedule_plot_draws_the_run_specs_schedule(tmp_path: Path) -> None:
    spec = Path(__file__).resolve().parents[1] / "examples" / "pretrain.yaml"
    out = tmp_path / "plots" / "lr.png"
    code, text = invoke("schedule", "plot", str(spec), "schedule.kind=cosine", "--out", str(out))
    assert code == 0 and f"wrote {out}" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A bad override is named, and no picture is written.
    bad = tmp_path / "bad.png"
    with pytest.raises(ConfigError, match=r"pretrain\.yaml: schedule\.kind: Input should be"):
        invoke("schedule", "plot", str(spec), "schedule.kind=bogus", "--out", str(bad))
    assert not bad.exists()


def test_schedule_plot_to_a_path_it_cannot_write_is_one_line_naming_it(tmp_path: Path) -> None:
    spec = str(Path(__file__).resolve().parents[1] / "examples" / "pretrain.yaml")
    (tmp_path / "adir").mkdir()
    into_dir = midtrain_cli("schedule", "plot", spec, "--out", str(tmp_path / "adir"))
    assert into_dir.returncode == 2 and "is a directory" in into_dir.stderr
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "lr.png"  # its directory is a file
    proc = midtrain_cli("schedule", "plot", spec, "--out", str(out))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: {out}: "), proc.stderr
    assert sorted(tmp_path.iterdir()) == [tmp_path / "adir", tmp_path / "afile"]  # nothing left


def test_train_takes_a_mixture_override_after_resume(tmp_path: Path) -> None:
    # `mixture=x.yaml` is an override, not a spec file, though it ends in .yaml.
    with pytest.raises(ConfigError, match="no complete checkpoint to resume from"):
        invoke("train", "mixture=x.yaml", "--resume", str(tmp_path / "run"))


def test_short_counts_round_before_choosing_the_unit() -> None:
    from midtrain.console import short_count

    got = [short_count(n) for n in (950, 12_345, 999_499, 999_500, 999_999_999, 4_567_000)]
    assert got == ["950", "12.3k", "999k", "1M", "1B", "4.57M"]


def test_tables_print_paths_with_brackets_as_they_are() -> None:
    """A run named sweep[lr] is listed as such (as markup, it printed as another run's path)."""
    from midtrain.console import console, print_table, table

    with console.capture() as captured:
        print_table(table("runs/a[b]", ("path", "keep"), [("runs/sweep[lr]/step_00000010", True)]))
    text = captured.get()
    assert "runs/a[b]" in text and "runs/sweep[lr]/step_00000010" in text
