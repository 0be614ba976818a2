"""trainer.runtime: the launch environment, the run's own files, the log on a full disk,
progress, SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import warnings

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

import trainer.runtime as runtime_module
from trainer.files import temporary_name
from trainer.runtime import (Progress, Runtime, Terminated, check_torch_version, check_writable, create_log_file, launch_ranks,
                             open_run_files, start_runtime, stop_on_signals)
from trainer.settings import Hyperparameters, InputError
from conftest import ROOT, tiny_hp


@pytest.mark.parametrize("version, fine", [("2.13.0+cpu", True), ("2.5.1", True), ("2.6.0a0+git1234", True),
                                           ("2.4.1+cu121", False), ("1.13.0", False)])
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
    with pytest.raises(InputError, match=r"^RUN_ID='mine' is not allowed: logs/mine.txt already holds another run's log "
                                         r"\(choose another RUN_ID or remove that file\)$"):
        open_run_files(hp, Runtime())


def test_an_unwritable_artifact_folder_fails_at_start(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(InputError, match=r"ARTIFACT_PATH='.*file/model.ptz' is not allowed: cannot write there"):
        open_run_files(tiny_hp(ARTIFACT_PATH=str(tmp_path / "file" / "model.ptz")), Runtime())
    assert not list((tmp_path / "file").parent.glob(".*probe"))


RENDEZVOUS = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_world_size_must_divide_eight():
    with pytest.raises(InputError, match=r"^WORLD_SIZE=3 is not allowed: must divide 8 \(1, 2, 4 or 8 processes\), or set GRAD_ACCUM_STEPS$"):
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
        assert caught.value.signum == signum and caught.value.args == (signum,)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def test_a_failure_goes_to_stderr_from_every_rank_and_to_the_log_only(tmp_path, capsys):
    main = Runtime()
    main.log_path = tmp_path / "run.txt"
    main.fail("error: boom")
    Runtime(rank=1, world_size=2).fail("error: boom")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "error: boom\nrank 1: error: boom\n"
    assert main.log_path.read_text() == "error: boom\n"


# The collectives, on rank 0 of two, with a stand-in for torch.distributed whose other rank
# holds `PEER` times this rank's values (a real 2-process run is tests/test_distributed.py,
# which runs these too; this one runs in one process, as mutation testing needs).
PEER = 3.0


class Work:
    def __init__(self):
        self.waited = False

    def wait(self):
        self.waited = True


class TwoRanks:
    """torch.distributed as rank 0 of 2 sees it; every call is recorded."""
    ReduceOp = dist.ReduceOp

    def __init__(self, peer_bytes=b""):
        self.calls, self.peer_bytes, self.works = [], peer_bytes, []

    def all_reduce(self, tensor, op=dist.ReduceOp.SUM):
        self.calls.append(("all_reduce", op))
        tensor.copy_(torch.maximum(tensor, PEER * tensor) if op == dist.ReduceOp.MAX else tensor * (1 + PEER))

    def broadcast(self, tensor, src):
        self.calls.append(("broadcast", src))
        if src == 1:  # the other rank's value: its length, then its bytes
            tensor.copy_(torch.tensor(len(self.peer_bytes)) if tensor.ndim == 0 else torch.frombuffer(bytearray(self.peer_bytes), dtype=torch.uint8))

    def reduce_scatter_tensor(self, shard, padded, async_op):
        self.calls.append(("reduce_scatter", async_op))
        shard.copy_((padded * (1 + PEER))[: shard.size(0)])
        self.works.append(Work())
        return self.works[-1]

    def all_gather_into_tensor(self, output, shard, async_op):
        self.calls.append(("all_gather", async_op))
        output.copy_(torch.cat((shard, PEER * shard)))
        return "work"

    def barrier(self):
        self.calls.append(("barrier",))


@pytest.fixture
def two_ranks(monkeypatch):
    fake = TwoRanks(peer_bytes=b"artifact bytes")
    monkeypatch.setattr(runtime_module, "dist", fake)
    return fake, Runtime(rank=0, world_size=2)


def test_one_process_calls_no_collective(monkeypatch):
    fake = TwoRanks()
    monkeypatch.setattr(runtime_module, "dist", fake)
    runtime, tensor = Runtime(), torch.arange(4.0)
    assert runtime.all_reduce_(tensor) is tensor and runtime.broadcast_(tensor, 0) is tensor
    runtime.mean_([tensor])
    runtime.barrier()
    assert runtime.broadcast_bytes(b"x", 0) == b"x" and torch.equal(tensor, torch.arange(4.0))
    assert torch.equal(runtime.reduce_scatter_mean(tensor, torch.bfloat16).wait(), tensor) and fake.calls == []


def test_sums_and_means_over_two_ranks(two_ranks):
    fake, runtime = two_ranks
    assert torch.equal(runtime.all_reduce_(torch.tensor([1.0, -2.0])), torch.tensor([4.0, -8.0]))
    assert torch.equal(runtime.all_reduce_(torch.tensor([1.0, -2.0]), "max"), torch.tensor([3.0, -2.0]))
    a, b = torch.ones(2, 3), torch.arange(4.0)
    runtime.mean_([a, b])
    assert torch.equal(a, torch.full((2, 3), 2.0)) and torch.equal(b, 2 * torch.arange(4.0))
    runtime.mean_([])
    assert fake.calls == [("all_reduce", dist.ReduceOp.SUM), ("all_reduce", dist.ReduceOp.MAX), ("all_reduce", dist.ReduceOp.SUM)]


def test_bytes_and_tensors_come_from_their_source(two_ranks):
    fake, runtime = two_ranks
    assert runtime.broadcast_bytes(None, 1) == b"artifact bytes"
    assert runtime.broadcast_bytes(b"mine", 0) == b"mine"
    runtime.barrier()
    assert fake.calls == [("broadcast", 1)] * 2 + [("broadcast", 0)] * 2 + [("barrier",)]


@pytest.mark.parametrize("rows", [5, 6])
def test_a_reduce_scatter_averages_this_ranks_padded_rows(two_ranks, rows):
    fake, runtime = two_ranks
    tensor = torch.arange(rows * 2.0).view(rows, 2)
    pending = runtime.reduce_scatter_mean(tensor, torch.float64)
    assert not fake.works[0].waited
    shard = pending.wait()
    assert fake.works[0].waited and fake.calls == [("reduce_scatter", True)]
    assert shard.dtype == torch.float32 and torch.equal(shard, 2 * tensor[:3].float())  # (1 + 3) / 2 ranks


def test_without_reduce_scatter_the_whole_sum_is_kept_in_part(two_ranks, monkeypatch):
    fake, runtime = two_ranks

    def unsupported(*args, **kwargs):
        raise NotImplementedError("gloo has no reduce_scatter")

    monkeypatch.setattr(fake, "reduce_scatter_tensor", unsupported)
    tensor = torch.arange(10.0).view(5, 2)
    assert torch.equal(runtime.reduce_scatter_mean(tensor, torch.float32).wait(), 2 * tensor[:3])
    assert not runtime.reduce_scatter_works  # and it is not tried again
    assert torch.equal(runtime.reduce_scatter_mean(tensor, torch.float32).wait(), 2 * tensor[:3])
    assert fake.calls == [("all_reduce", dist.ReduceOp.SUM)] * 2
    second = Runtime(rank=1, world_size=2, reduce_scatter_works=False)
    assert torch.equal(second.reduce_scatter_mean(tensor, torch.float32).wait(), torch.cat((2 * tensor[3:], torch.zeros(1, 2))))
    wide = torch.full((3, 8), 1.001)  # more columns than rows; sent in bfloat16, which rounds 1.001 to 1
    assert torch.equal(second.reduce_scatter_mean(wide, torch.bfloat16).wait(), torch.cat((torch.full((1, 8), 2.0), torch.zeros(1, 8))))


def test_all_gather_starts_one_gather(two_ranks):
    fake, runtime = two_ranks
    output = torch.empty(4)
    assert runtime.all_gather(output, torch.tensor([1.0, 2.0])) == "work"
    assert torch.equal(output, torch.tensor([1.0, 2.0, 3.0, 6.0])) and fake.calls == [("all_gather", True)]


def test_on_the_cpu_autocast_and_copies_change_nothing():
    runtime, tensor = Runtime(), torch.ones(2, 2)
    with runtime.autocast():
        assert (tensor @ tensor).dtype == torch.float32
    assert runtime.to_device(tensor) is tensor
    runtime.synchronize()


def test_compile_is_only_asked_for_where_it_is_enabled(monkeypatch):
    asked = []
    monkeypatch.setattr(runtime_module.torch, "compile", lambda function, **options: asked.append((function, options)) or "compiled")

    def double(x):
        return 2 * x

    assert Runtime().compile(double) is double and asked == []
    assert Runtime(compile_enabled=True).compile(double) == "compiled"
    assert asked == [(double, {"dynamic": False, "fullgraph": True, "backend": "inductor"})]


def test_autocast_is_bfloat16_on_cuda_only():
    for device in ("cpu", "cuda"):
        with warnings.catch_warnings():  # this machine has no CUDA, which torch says when asked for it
            warnings.simplefilter("ignore")
            context = Runtime(device=torch.device(device)).autocast()
        assert (context.device, context.fast_dtype) == ("cuda", torch.bfloat16)


class Launcher:
    """torch.distributed's init_process_group, recorded."""

    def __init__(self):
        self.groups = []

    def init_process_group(self, backend, device_id=None):
        self.groups.append((backend, device_id))


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu", "cuda"])
def test_a_rank_of_two_joins_its_group_on_its_device(monkeypatch, cuda):
    launcher, chosen = Launcher(), []
    monkeypatch.setattr(runtime_module, "dist", launcher)
    monkeypatch.setattr(runtime_module.torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(runtime_module.torch.cuda, "set_device", chosen.append)
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_num_threads())
    try:
        runtime = start_runtime(tiny_hp(GRAD_ACCUM_STEPS="0", COMPILE="auto"),
                                {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", **RENDEZVOUS})
        device = torch.device("cuda", 1) if cuda else torch.device("cpu")
        assert (runtime.rank, runtime.world_size, runtime.local_rank, runtime.device) == (1, 2, 1, device)
        assert runtime.accum_steps == 4 and type(runtime.accum_steps) is int and runtime.compile_enabled == cuda
        assert launcher.groups == [("nccl", device) if cuda else ("gloo", None)] and chosen == ([device] if cuda else [])
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == ((True, True) if cuda else flags[:2])
        assert torch.get_num_threads() == 1  # the smoke run's two threads, shared by two ranks
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags[:2]
        torch.set_num_threads(flags[2])


def test_one_process_joins_no_group(monkeypatch):
    launcher = Launcher()
    monkeypatch.setattr(runtime_module, "dist", launcher)
    threads = torch.get_num_threads()
    try:
        start_runtime(tiny_hp(), {})
    finally:
        torch.set_num_threads(threads)
    assert launcher.groups == []


@pytest.mark.parametrize("settings, accum, compiled", [({"GRAD_ACCUM_STEPS": "0"}, 8, False), ({"GRAD_ACCUM_STEPS": "3"}, 3, False),
                                                       ({"COMPILE": "1"}, 1, True), ({"COMPILE": "0"}, 1, False)])
def test_a_started_runtime_is_one_seeded_cpu_process(settings, accum, compiled):
    threads = torch.get_num_threads()
    try:
        hp = tiny_hp(SEED="77", **settings)
        runtime = start_runtime(hp, {})
        assert (runtime.rank, runtime.world_size, runtime.local_rank, runtime.device.type) == (0, 1, 0, "cpu")
        assert (runtime.accum_steps, runtime.compile_enabled) == (accum, compiled)
        assert torch.initial_seed() == 77 and np.random.get_state()[1][0] == np.random.RandomState(77).get_state()[1][0]
        assert torch.get_num_threads() == 2  # the smoke run's fixed thread count
    finally:
        torch.set_num_threads(threads)


def test_a_run_outside_the_smoke_run_keeps_the_thread_count():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start_runtime(Hyperparameters.from_env({"SEED": "5"}), {})
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_a_log_folder_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match=r"file is not a folder: the run's log goes to .*file/r.txt \(move that file away\)$"):
        create_log_file(tmp_path / "file" / "r.txt")
    with pytest.raises(InputError, match=r"^RUN_ID='r' is not allowed: cannot create /proc/nonesuch/r.txt \(No such file or directory\)$"):
        create_log_file(Path("/proc/nonesuch/r.txt"))
    made = create_log_file(tmp_path / "deep" / "er" / "r.txt")
    assert made.read_text() == "" and made == tmp_path / "deep" / "er" / "r.txt"
    assert create_log_file(tmp_path / "deep" / "er" / "s.txt").exists()  # another run's log beside it


def test_an_artifact_folder_is_made_and_the_probe_removed(tmp_path):
    check_writable(tmp_path / "new" / "er" / "model.ptz", "ARTIFACT_PATH")
    assert (tmp_path / "new" / "er").is_dir() and list((tmp_path / "new" / "er").iterdir()) == []
    with pytest.raises(InputError, match=r"^ARTIFACT_PATH='/proc/nonesuch/m.ptz' is not allowed: cannot write there "
                                         r"\(No such file or directory: /proc/nonesuch\)$"):
        check_writable(Path("/proc/nonesuch/m.ptz"), "ARTIFACT_PATH")


def test_the_log_goes_to_the_console_and_file_only_on_rank_0(tmp_path, capsys):
    main, other = Runtime(log_path=tmp_path / "a.txt"), Runtime(rank=1, world_size=2, log_path=tmp_path / "b.txt")
    (tmp_path / "a.txt").write_text("")
    main.log("one")
    main.log("two", console=False)
    other.log("three")
    assert capsys.readouterr().out == "one\n" and (tmp_path / "a.txt").read_text() == "one\ntwo\n"
    assert not (tmp_path / "b.txt").exists()


def test_progress_prints_its_line_at_most_every_period_and_only_on_rank_0(capsys):
    progress = Progress(Runtime(), "TTT passes", 4, every=5.0)
    progress.started -= 6.0  # 6 s in, and a line due
    progress.last -= 6.0
    progress.advance()
    progress.advance()  # too soon for another line
    Progress(Runtime(rank=1, world_size=2), "TTT passes", 4, every=0.0).advance()
    assert capsys.readouterr().out == "  TTT passes: 1/4, 6s so far, ~18s left\n"
    assert progress.done == 2


def test_progress_takes_a_given_estimate_and_says_every_ten_seconds_by_default():
    seen = []
    progress = Progress(Runtime(), "SLOT steps", 10, watch=lambda label, left: seen.append(left))
    progress.update(2, seconds_left=99.0)
    assert seen == [99.0] and progress.every == 10.0


def test_start_up_reads_the_process_environment_by_default(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "abc")
    with pytest.raises(InputError, match=r"^WORLD_SIZE='abc' is not allowed: expected an integer"):
        start_runtime(tiny_hp())
