"""`midtrain demo` end to end, at its fixed seeds: the product's promise holds on real runs.

The demo pretrains a tiny base model on general text, branches from an intermediate checkpoint
on a legal/general mixture, and for comparison continues the final checkpoint on legal text only.
Continued pretraining must teach the domain (legal perplexity below the base's), and replaying
curated data must keep more general ability than customer data alone.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from test_evaluation import png_ok

from midtrain.demo import final_perplexities

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("demo")
    done = subprocess.run(
        [sys.executable, "-m", "midtrain.cli", "demo", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    return out, done


def report(out: Path) -> dict[str, Any]:
    return json.loads((out / "reports" / "compare" / "report.json").read_text())


def test_branched_model_learns_the_domain_and_forgets_less(demo: tuple[Path, Any]) -> None:
    out, _ = demo
    rep = report(out)
    ppl = final_perplexities(rep)
    base, branched, customer_only = ppl["base (final)"], ppl["continue"], ppl["customer_only"]
    # Domain: lower than the final base model's, and than the checkpoint it branched from.
    assert branched["legal"] < base["legal"]
    base_run = next(r for r in rep["runs"] if r["name"] == "base")
    branch_point = next(c for c in base_run["checkpoints"] if c["step"] == 120)
    assert branched["legal"] < branch_point["sources"]["legal"]["perplexity"]
    # General ability: replaying curated data degrades it less than customer data alone.
    assert branched["general"] < customer_only["general"]
    assert customer_only["general"] > base["general"]  # the comparison run did forget


def test_demo_uses_the_public_commands_and_reports(demo: tuple[Path, Any]) -> None:
    out, done = demo
    for command in ("data prepare", "tokenizer train", "train", "ckpt list", "mix plan", "report"):
        assert f"$ midtrain {command}" in done.stderr
    assert "Held-out perplexity" in done.stderr and "legal ppl" in done.stderr

    # The base run published its stable-phase checkpoints and the final decayed one.
    catalog = subprocess.run(
        [sys.executable, "-m", "midtrain.cli", "ckpt", "list", str(out / "runs/base"), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    phases = {c["step"]: c["phase"] for c in json.loads(catalog.stdout)}
    assert phases[120] == "stable" and phases[200] == "decay"

    md = (out / "reports" / "compare" / "report.md").read_text()
    pngs = sorted(p.name for p in (out / "reports" / "compare").glob("*.png"))
    assert len(pngs) >= 4
    for name in pngs:
        assert f"]({name})" in md
        assert png_ok(out / "reports" / "compare" / name)
    assert re.search(r"demo finished in \d+ s", done.stderr)


def test_a_demo_folder_is_replaced_and_any_other_refused(tmp_path: Path) -> None:
    from midtrain.demo import MARKER, prepare_output_dir
    from midtrain.errors import MidtrainError

    mine = tmp_path / "mine"
    (mine / "runs").mkdir(parents=True)
    with pytest.raises(MidtrainError, match="not empty, and not a demo's output"):
        prepare_output_dir(mine)
    assert (mine / "runs").is_dir()  # nothing deleted

    out = tmp_path / "demo_out"
    prepare_output_dir(out)  # new
    (out / "runs" / "base").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    prepare_output_dir(out)  # a previous demo's: its runs go, so `make demo` runs again
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "notes.txt"])


def test_the_wheel_ships_the_examples_and_the_sbatch_template(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import midtrain.fileio as fileio

    repo = Path(__file__).resolve().parents[1]
    tracked = subprocess.run(
        ["git", "ls-files", "examples", "slurm"], cwd=repo, capture_output=True, text=True
    ).stdout.split()
    assert "examples/pretrain.yaml" in tracked
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info next to the sources
    for name in [*tracked, "pyproject.toml", "README.md", *_package_files(repo)]:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes((repo / name).read_bytes())
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", "dist", "."],
        cwd=src,
        check=True,
        capture_output=True,
    )
    # Installed by hand, as pip would (`pip install --prefix` would also uninstall this
    # environment's midtrain): data files under the prefix, the package in site-packages.
    prefix = tmp_path / "env"
    [wheel] = (src / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as whl:
        for name in whl.namelist():
            data, sep, rest = name.partition(".data/data/")
            target = prefix / rest if sep else prefix / "site-packages" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(whl.read(name))
    # As seen by a midtrain installed there: the checkout's folders are not beside it.
    monkeypatch.setattr(fileio, "__file__", str(prefix / "site-packages/midtrain/fileio.py"))
    monkeypatch.setattr(sys, "prefix", str(prefix))
    for name in tracked:
        assert fileio.project_path(*Path(name).parts) == prefix / "share" / "midtrain" / name


def _package_files(repo: Path) -> list[str]:
    files = (repo / "midtrain").rglob("*")
    return [str(p.relative_to(repo)) for p in files if p.is_file() and "__pycache__" not in p.parts]
