"""trainer.files: atomic writes, leftovers of killed writes, regular files only."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from trainer.files import regular_file, remove_stale_temporaries, temporary_name, write_atomic
from trainer.settings import InputError, RunError


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(RunError, match=r"m.ptz: cannot write \(No space left on device\); nothing was written"):
        write_atomic(tmp_path / "m.ptz", b"weights")
    assert list(tmp_path.iterdir()) == []


def test_write_without_overwrite_never_replaces_a_file(tmp_path):
    write_atomic(tmp_path / "x", b"mine")
    with pytest.raises(FileExistsError):
        write_atomic(tmp_path / "x", b"other", overwrite=False)
    assert (tmp_path / "x").read_bytes() == b"mine" and [p.name for p in tmp_path.iterdir()] == ["x"]


def test_leftovers_of_killed_writes_are_removed_and_live_ones_kept(tmp_path):
    target = tmp_path / "final_model.int6.ptz"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = temporary_name(target, int(dead.stdout))
    killed.write_bytes(b"x" * 1000)  # as SIGKILL during the fsync leaves it
    alive = temporary_name(target, os.getpid())
    alive.write_bytes(b"being written")
    other = temporary_name(tmp_path / "other.ptz", int(dead.stdout))
    other.write_bytes(b"not ours")
    assert remove_stale_temporaries(target) == [killed]
    assert not killed.exists() and alive.exists() and other.exists()


def test_a_device_is_not_a_regular_file():
    with pytest.raises(InputError, match=r"/dev/null: not a regular file \(a tokenizer is expected\)"):
        regular_file("/dev/null", "tokenizer")
    with pytest.raises(InputError, match=r"nowhere: no such tokenizer"):
        regular_file("nowhere", "tokenizer")
