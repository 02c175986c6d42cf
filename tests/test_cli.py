"""The command line: every user step is a subcommand with help; errors exit 2 with a message."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from transformers import LlamaConfig, LlamaForCausalLM

from midtrain.checkpoints import CheckpointMeta, CheckpointSaver
from midtrain.cli import cli

SUBCOMMANDS = {
    "tokenizer": ["train"],
    "data": ["prepare", "sample-corpora"],
    "mix": ["plan"],
    "ckpt": ["list", "show", "verify", "prune", "keep", "import-hf", "export-hf"],
    "schedule": ["plot"],
    "train": [],
}


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_help_lists_the_users_steps() -> None:
    code, out = invoke("--help")
    assert code == 0
    for group, commands in SUBCOMMANDS.items():
        assert group in out
        for command in commands:
            code, sub = invoke(group, command, "--help")
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
