"""trainer.runtime: the launch environment, the run's own files, the log on a full disk,
progress, SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from trainer.files import temporary_name
from trainer.runtime import (Progress, Runtime, Terminated, check_torch_version, launch_ranks, open_run_files,
                             start_runtime, stop_on_signals)
from trainer.settings import InputError
from conftest import ROOT, tiny_hp

@pytest.mark.parametrize("version, fine", [("2.13.0+cpu", True), ("2.5.1", True), ("2.4.1+cu121", False), ("1.13.0", False)])
def test_torch_version_floor(version, fine):
    if fine:
        check_torch_version(version)
    else:
        with pytest.raises(InputError, match=rf"torch {re.escape(version)} is too old: this trainer needs torch >= 2.5"):
            check_torch_version(version)


def test_requirements_state_the_same_torch_floor():
    assert "torch>=2.5" in (ROOT / "requirements.txt").read_text()


def test_a_run_id_is_never_reused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hp = tiny_hp(RUN_ID="mine", ARTIFACT_PATH=str(tmp_path / "a.ptz"))
    open_run_files(hp, Runtime())
    assert (tmp_path / "logs" / "mine.txt").read_text() == ""
    with pytest.raises(InputError, match=r"RUN_ID='mine' is not allowed: logs/mine.txt already holds another run's log"):
        open_run_files(hp, Runtime())


def test_an_unwritable_artifact_folder_fails_at_start(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(InputError, match=r"ARTIFACT_PATH='.*file/model.ptz' is not allowed: cannot write there"):
        open_run_files(tiny_hp(ARTIFACT_PATH=str(tmp_path / "file" / "model.ptz")), Runtime())
    assert not list((tmp_path / "file").parent.glob(".*probe"))


RENDEZVOUS = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_world_size_must_divide_eight():
    with pytest.raises(InputError, match=r"WORLD_SIZE=3 is not allowed: must divide 8"):
        start_runtime(tiny_hp(GRAD_ACCUM_STEPS="0"), {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0", **RENDEZVOUS})


@pytest.mark.parametrize("environ, message", [
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not allowed: expected an integer"),
    ({"WORLD_SIZE": "1", "RANK": "1"}, "RANK=1 is not allowed: must lie in 0..WORLD_SIZE-1=0"),
    ({"WORLD_SIZE": "2", "RANK": "-1", "LOCAL_RANK": "0", **RENDEZVOUS}, "RANK=-1 is not allowed: must lie in 0..WORLD_SIZE-1=1"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 is not allowed: must be at least 1"),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "x"}, "LOCAL_RANK='x' is not allowed: expected an integer"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "1", **RENDEZVOUS}, "LOCAL_RANK=1 is not allowed: must lie in 0..RANK=0"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "WORLD_SIZE=2 is not allowed without LOCAL_RANK, MASTER_ADDR, MASTER_PORT: "
                                       "start several processes with torchrun, which sets them"),
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "0", **RENDEZVOUS}, "WORLD_SIZE=2 is not allowed without RANK"),
])
def test_a_malformed_or_inconsistent_launch_is_one_line_at_start(environ, message):
    with pytest.raises(InputError, match=re.escape(message)):
        launch_ranks(environ)
    with pytest.raises(InputError, match=re.escape(message)):
        start_runtime(tiny_hp(), environ)  # before any process group or training


def test_torchrun_ranks_are_read():
    assert launch_ranks({}) == (1, 0, 0)
    assert launch_ranks({"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "5", **RENDEZVOUS}) == (8, 5, 5)


def test_logs_being_a_file_is_said_as_such(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "logs").write_text("not a folder")
    with pytest.raises(InputError, match=r"^logs is not a folder: the run's log goes to logs/r.txt"):
        open_run_files(tiny_hp(RUN_ID="r", ARTIFACT_PATH=str(tmp_path / "a.ptz")), Runtime())


def test_an_existing_folder_as_the_artifact_is_refused_at_start(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.ptz").mkdir()
    with pytest.raises(InputError, match=r"ARTIFACT_PATH='model.ptz' is not allowed: it is a folder"):
        open_run_files(tiny_hp(ARTIFACT_PATH="model.ptz"), Runtime())
    assert not (tmp_path / "logs").exists()


def test_a_killed_write_left_behind_is_removed_and_said_at_start(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    leftover = temporary_name(tmp_path / "final_model.int6.ptz", dead)
    leftover.write_bytes(bytes(10_000))
    runtime = Runtime()
    open_run_files(tiny_hp(RUN_ID="r", ARTIFACT_PATH="final_model.int6.ptz"), runtime)
    assert not leftover.exists()
    assert "a temporary file left by a write that was killed" in (tmp_path / "logs" / "r.txt").read_text()


def test_a_log_that_cannot_be_written_is_said_once_and_remembered(tmp_path, capsys):
    runtime = Runtime(log_path=tmp_path / "missing-folder" / "run.txt")
    runtime.log("first")
    runtime.log("second")
    captured = capsys.readouterr()
    assert captured.out == "first\nsecond\n"
    assert captured.err.count("warning:") == 1 and str(runtime.log_path) in captured.err
    assert runtime.log_failure.startswith(f"{runtime.log_path}: cannot write the log (No such file or directory)")


def test_progress_reports_every_estimate_to_its_watcher(monkeypatch):
    seen = []
    progress = Progress(Runtime(), "batches", 10, every=1e9, watch=lambda label, left: seen.append((label, left)))
    progress.started -= 4.0  # 4 s in
    progress.update(2)
    progress.update(0)
    assert len(seen) == 1 and seen[0][0] == "batches" and seen[0][1] == pytest.approx(16.0, rel=0.01)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_become_an_exception(signum):
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        stop_on_signals()
        with pytest.raises(Terminated) as caught:
            os.kill(os.getpid(), signum)
        assert caught.value.signum == signum
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
