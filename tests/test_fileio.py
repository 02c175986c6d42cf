"""FollowedFile (how the driver follows a run's metrics and events files while workers append) and
the atomic directory exchange that re-saving a checkpoint uses."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from midtrain.fileio import FollowedFile, atomic_write_text, exchange_paths


def test_followed_file_reads_only_new_complete_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    followed = FollowedFile(path)
    assert followed.new_lines() == []  # not created yet
    path.write_text('{"step": 1}\n{"step": 2')  # the second line is still being written
    assert followed.new_lines() == ['{"step": 1}']
    assert followed.new_lines() == []
    with open(path, "a") as f:
        f.write('}\n\n{"step": 3}\n')
    assert followed.new_lines() == ['{"step": 2}', '{"step": 3}']


def test_followed_file_starts_over_when_replaced_or_truncated(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("a\nb\n")
    followed = FollowedFile(path, skip_existing=True)
    assert followed.new_lines() == []
    atomic_write_text(path, "a\n")  # a resume rewrites the file: a new inode, shorter
    assert followed.new_lines() == ["a"]
    os.truncate(path, 0)  # truncated in place, same inode
    assert followed.new_lines() == []
    path.write_text("c\n")
    assert followed.new_lines() == ["c"]


def test_exchange_paths_swaps_two_directories_in_one_step(tmp_path: Path) -> None:
    old, new = tmp_path / "step_00000002", tmp_path / ".staging-step_00000002"
    old.mkdir(), new.mkdir()
    (old / "from").write_text("old")
    (new / "from").write_text("new")
    swapped = exchange_paths(new, old)
    if sys.platform == "linux":
        assert swapped  # renameat2 on the test machine's file system
    if swapped:
        assert (old / "from").read_text() == "new" and (new / "from").read_text() == "old"
    else:  # nothing changed where the platform cannot exchange
        assert (old / "from").read_text() == "old"
    if swapped:  # an error from the system call names the path
        with pytest.raises(FileNotFoundError, match="missing"):
            exchange_paths(tmp_path / "missing", old)
