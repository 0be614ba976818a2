"""trainer.files: atomic writes, leftovers of killed writes, regular files only, hashes, the
project's own files from any folder."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.files import (bundled_file, file_sha256, process_alive, regular_file, remove_stale_temporaries, temporary_name,
                           write_atomic)
from trainer.settings import InputError, RunError
from conftest import ROOT


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


def test_a_live_process_is_seen_and_left_alone():
    """The check only asks (signal 0): a process that dies of SIGHUP is still running after it."""
    code = "import signal, time; signal.signal(signal.SIGHUP, signal.SIG_DFL); print('ready', flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n" and process_alive(child.pid)
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=0.3)
    finally:
        child.kill()
        child.wait()
    assert not process_alive(child.pid)


def test_a_device_is_not_a_regular_file():
    with pytest.raises(InputError, match=r"/dev/null: not a regular file \(a tokenizer is expected\)"):
        regular_file("/dev/null", "tokenizer")
    with pytest.raises(InputError, match=r"nowhere: no such tokenizer"):
        regular_file("nowhere", "tokenizer")


def test_a_write_goes_through_this_process_temporary_into_new_folders(tmp_path, monkeypatch):
    target = tmp_path / "a" / "b" / "m.ptz"
    seen = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (seen.append(sorted(p.name for p in target.parent.iterdir())), fsync(fd)))
    write_atomic(target, b"weights")
    assert seen == [[f".m.ptz.{os.getpid()}.tmp"]] and target.read_bytes() == b"weights"
    assert [p.name for p in target.parent.iterdir()] == ["m.ptz"]


@pytest.mark.parametrize("size", [0, 5, 3 << 20 | 7], ids=["empty", "small", "several_blocks"])
def test_file_sha256_is_the_hash_of_the_bytes(tmp_path, size):
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_bundled_files_are_found_from_any_folder_and_a_local_one_wins(tmp_path, monkeypatch):
    relative = "data/tokenizers/fineweb_1024_bpe.model"
    monkeypatch.chdir(tmp_path)
    assert bundled_file(relative) == ROOT / relative
    assert bundled_file("data/nothing.model") == Path("data/nothing.model")
    (tmp_path / "data" / "tokenizers").mkdir(parents=True)
    (tmp_path / relative).write_bytes(b"mine")
    assert bundled_file(relative) == tmp_path / relative
