"""Optimizer state saved by 2 real data-parallel processes (torch.distributed, gloo) loads on 1 and
on 3 readers with identical values: entries are per parameter and full, so resharding is reading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from megatron_workers import free_port
from safetensors.torch import load_file

from midtrain.checkpoints import list_checkpoints, load_checkpoint, split_optimizer_key

REPO = Path(__file__).resolve().parents[1]

# Parameters of a small Llama-named model; each rank owns every W-th one (as a ZeRO partition does).
COMMON = textwrap.dedent(
    """
    import zlib
    import torch

    PARAMS = {"model.embed_tokens.weight": (128, 16), "model.norm.weight": (16,),
              "lm_head.weight": (128, 16)}
    for i in range(3):
        for proj, shape in (("self_attn.q_proj", (16, 16)), ("self_attn.o_proj", (16, 16)),
                            ("mlp.up_proj", (40, 16)), ("mlp.down_proj", (16, 40))):
            PARAMS[f"model.layers.{i}.{proj}.weight"] = shape
    NAMES = sorted(PARAMS)
    STATES = ("exp_avg", "exp_avg_sq", "master")

    def value(name, state, step):
        g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{state}/{step}".encode()))
        return torch.randn(PARAMS[name], generator=g)

    def owned(rank, world):
        return [n for i, n in enumerate(NAMES) if i % world == rank]
    """
)

WRITER = textwrap.dedent(
    """
    import os, sys, json
    import torch.distributed as dist
    from midtrain.checkpoints import CheckpointMeta, CheckpointSaver
    from midtrain.errors import CheckpointError

    run_dir = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    saver = CheckpointSaver(run_dir, keep_last=2, rank=rank, world_size=world,
                            barrier=dist.barrier, commit_timeout_s=60, log=None)

    def save(step, blocking=True, progress=None):
        opt = {f"{n}/{s}": value(n, s, step) for n in owned(rank, world) for s in STATES}
        model = {n: value(n, "master", step) for n in NAMES} if rank == 0 else None
        config = {"model_type": "llama"} if rank == 0 else None
        meta = CheckpointMeta(step=step, tokens=step * 64, lr=1e-3, phase="stable")
        return saver.save(meta, model_state=model, config=config, trainer_state={"step": step},
                          optimizer_state=opt, rank_state={"rank": rank}, blocking=blocking,
                          progress=progress)

    # Step 5: rank 1's writer fails; rank 0 (the committer) must report it, not hang or commit.
    def fail(_n):
        raise OSError("rank 1 lost its disk")
    errors = []
    try:
        save(5, progress=fail if rank == 1 else None)
    except (CheckpointError, OSError) as exc:
        errors.append(str(exc))
    save(10)                 # blocking
    save(20, blocking=False)  # in the background on every rank
    saver.close()
    print(json.dumps({"rank": rank, "errors": errors}), flush=True)
    dist.destroy_process_group()
    """
)

READER = textwrap.dedent(
    """
    import sys
    from safetensors.torch import save_file
    from midtrain.checkpoints import load_checkpoint, split_optimizer_key

    path, rank, world, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    mine = set(owned(rank, world))
    # Ranks > 0 may skip hashing once rank 0 has verified; here each checks for itself.
    ckpt = load_checkpoint(path, verify=True)
    tensors = ckpt.optimizer_tensors(lambda key: split_optimizer_key(key)[0] in mine)
    save_file(tensors, out)
    """
)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _expected(step: int) -> dict[str, torch.Tensor]:
    scope: dict[str, object] = {}
    exec(COMMON, scope)
    value, names, states = scope["value"], scope["NAMES"], scope["STATES"]
    return {f"{n}/{s}": value(n, s, step) for n in names for s in states}  # type: ignore[operator,union-attr]


def test_optimizer_state_from_2_ranks_loads_on_1_and_3(tmp_path: Path) -> None:
    run = tmp_path / "run"
    port = str(free_port())
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", COMMON + WRITER, str(run)],
            env=_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(r), WORLD_SIZE="2"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    results = []
    for p in writers:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    by_rank = {r["rank"]: r["errors"] for r in results}
    assert "rank 1 failed to write its part" in by_rank[0][0] and "lost its disk" in by_rank[0][0]
    assert "lost its disk" in by_rank[1][0]

    infos = list_checkpoints(run, verify=True)
    assert [(i.step, i.complete) for i in infos] == [(10, True), (20, True)]  # 5 never committed
    ckpt = load_checkpoint(run)
    assert ckpt.step == 20 and ckpt.manifest.world_size == 2
    shards = sorted(n for n in ckpt.manifest.files if n.startswith("optimizer/optimizer-0"))
    assert shards == [
        "optimizer/optimizer-00000-of-00002.safetensors",
        "optimizer/optimizer-00001-of-00002.safetensors",
    ]
    assert ckpt.rank_state(1) == {"rank": 1}
    expected = _expected(20)

    # One reader: everything, in one process.
    got = ckpt.optimizer_tensors()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], v) for k, v in expected.items())

    # Three readers: each reads only the parameters a 3-way partition gives it.
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", COMMON + READER, str(run), str(r), "3", str(tmp_path / f"r{r}")],
            env=_env(),
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(3)
    ]
    for p in readers:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    parts = [load_file(tmp_path / f"r{r}") for r in range(3)]
    assert sum(len(p) for p in parts) == len(expected)
    merged = {k: v for part in parts for k, v in part.items()}
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], v) for k, v in expected.items())
    params = [{split_optimizer_key(k)[0] for k in part} for part in parts]
    assert not (params[0] & params[1]) and not (params[1] & params[2])

    step10 = load_checkpoint(run / "checkpoints/step_00000010").optimizer_tensors(
        ["lm_head.weight/exp_avg"]
    )
    assert torch.equal(step10["lm_head.weight/exp_avg"], _expected(10)["lm_head.weight/exp_avg"])
