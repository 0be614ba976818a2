"""Runtime: device, ranks, communication, compilation, the run's log, progress, signals.

Every collective goes through Runtime, so the rest of the trainer never asks whether it
is distributed: with one process each method is a no-op or a plain copy.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from trainer.files import remove_stale_temporaries
from trainer.settings import Hyperparameters, InputError

MIN_TORCH = (2, 5)  # scaled_dot_product_attention(enable_gqa=...) arrived in 2.5


class PendingShard:
    """A reduce-scatter in flight; wait() gives this rank's averaged shard in float32."""

    def __init__(self, shard: Tensor, work: Any, world_size: int):
        self.shard, self.work, self.world_size = shard, work, world_size

    def wait(self) -> Tensor:
        if self.work is not None:
            self.work.wait()
        return self.shard.float() / self.world_size if self.world_size > 1 else self.shard.float()


@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    accum_steps: int = 1  # micro-steps per optimiser step on this rank
    compile_enabled: bool = False
    compile_backend: str = "inductor"
    log_path: Path | None = None
    log_failure: str | None = None  # why the log could not be written, once that happened
    stage: str = "at start-up"  # what the run is doing, for the interrupt message
    reduce_scatter_works: bool = True  # cleared where the backend lacks reduce-scatter

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> Any:
        """bfloat16 autocast on CUDA; plain float elsewhere."""
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def to_device(self, tensor: Tensor) -> Tensor:
        """Copy a host tensor to the device without blocking the host (pinned on CUDA)."""
        if self.device.type != "cuda":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def all_reduce_(self, tensor: Tensor, op: str = "sum") -> Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op.upper()))
        return tensor

    def mean_(self, tensors: list[Tensor]) -> None:
        """Average tensors over ranks in place, in one collective."""
        if not self.distributed or not tensors:
            return
        flat = torch.cat([t.flatten() for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world_size
        for tensor, reduced in zip(tensors, flat.split([t.numel() for t in tensors])):
            tensor.copy_(reduced.view_as(tensor))

    def broadcast_(self, tensor: Tensor, source: int) -> Tensor:
        if self.distributed:
            dist.broadcast(tensor, src=source)
        return tensor

    def broadcast_bytes(self, data: bytes | None, source: int) -> bytes:
        """The bytes `source` holds, on every rank (others pass None)."""
        if not self.distributed:
            return data
        length = self.broadcast_(torch.tensor(len(data) if self.rank == source else 0, device=self.device), source)
        buffer = torch.empty(int(length), dtype=torch.uint8, device=self.device)
        if self.rank == source:
            buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        return bytes(self.broadcast_(buffer, source).cpu().numpy())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def reduce_scatter_mean(self, tensor: Tensor, dtype: torch.dtype) -> PendingShard:
        """Start averaging `tensor` over ranks; this rank keeps its share of the rows, the
        rows padded to a multiple of the world size."""
        if not self.distributed:
            return PendingShard(tensor, None, 1)
        per_rank = -(-tensor.size(0) // self.world_size)
        start, end = self.rank * per_rank, (self.rank + 1) * per_rank
        padded = F.pad(tensor.to(dtype), (0, 0) * (tensor.ndim - 1) + (0, per_rank * self.world_size - tensor.size(0)))
        if self.reduce_scatter_works:
            shard = torch.empty_like(padded[:per_rank])
            try:
                return PendingShard(shard, dist.reduce_scatter_tensor(shard, padded, async_op=True), self.world_size)
            except (RuntimeError, NotImplementedError):
                self.reduce_scatter_works = False
        dist.all_reduce(padded)  # fallback: the whole sum, then keep our rows
        return PendingShard(padded[start:end], None, self.world_size)

    def all_gather(self, output: Tensor, shard: Tensor) -> Any:
        return dist.all_gather_into_tensor(output, shard, async_op=True)

    def compile(self, function: Callable) -> Callable:
        """torch.compile with fullgraph, so a graph break fails loudly instead of slowing down."""
        if not self.compile_enabled:
            return function
        return torch.compile(function, dynamic=False, fullgraph=True, backend=self.compile_backend)

    def log(self, message: str, console: bool = True) -> None:
        """Rank 0 prints and appends to the run's log file. A log that cannot be written
        (a full disk) is said once on stderr; the run goes on and ends with status 1."""
        if not self.is_main:
            return
        if console:
            print(message, flush=True)
        if self.log_path is None or self.log_failure is not None:
            return
        try:
            with open(self.log_path, "a", encoding="utf-8") as handle:
                print(message, file=handle)
        except OSError as error:
            self.log_failure = f"{self.log_path}: cannot write the log ({error.strerror}); it is incomplete"
            print(f"warning: {self.log_failure}", file=sys.stderr, flush=True)

    def fail(self, message: str) -> None:
        """A fatal error: to stderr (from every rank), and to the log when it can still be written."""
        print(message if self.is_main else f"rank {self.rank}: {message}", file=sys.stderr, flush=True)
        self.log(message, console=False)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived (torchrun and cluster schedulers stop a job with SIGTERM; a
    closed terminal sends SIGHUP)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def stop_on_signals() -> None:
    """Turn SIGTERM and SIGHUP into an exception, so the run ends with one line, as Ctrl-C does."""
    def handler(signum: int, frame: Any) -> None:
        raise Terminated(signum)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, handler)


def check_torch_version(version: str) -> None:
    found = tuple(int(part) for part in version.split("+")[0].split(".")[:2])
    if found < MIN_TORCH:
        raise InputError(f"torch {version} is too old: this trainer needs torch >= {'.'.join(map(str, MIN_TORCH))}")


def launch_ranks(environ: dict[str, str]) -> tuple[int, int, int]:
    """(WORLD_SIZE, RANK, LOCAL_RANK) as torchrun sets them, checked to agree."""
    values = {}
    for name, default in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        raw = environ.get(name, default)
        try:
            values[name] = int(raw)
        except ValueError:
            raise InputError(f"{name}={raw!r} is not allowed: expected an integer (as torchrun sets it)") from None
    world_size, rank, local_rank = values["WORLD_SIZE"], values["RANK"], values["LOCAL_RANK"]
    if world_size < 1:
        raise InputError(f"WORLD_SIZE={world_size} is not allowed: must be at least 1")
    missing = [name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if world_size > 1 and name not in environ]
    if missing:
        raise InputError(f"WORLD_SIZE={world_size} is not allowed without {', '.join(missing)}: start several "
                         "processes with torchrun, which sets them")
    if not 0 <= rank < world_size:
        raise InputError(f"RANK={rank} is not allowed: must lie in 0..WORLD_SIZE-1={world_size - 1}")
    if not 0 <= local_rank <= rank:
        raise InputError(f"LOCAL_RANK={local_rank} is not allowed: must lie in 0..RANK={rank}")
    return world_size, rank, local_rank


def start_runtime(hp: Hyperparameters, environ: dict[str, str] | None = None) -> Runtime:
    """Ranks, device and process group; seeds every generator."""
    check_torch_version(torch.__version__)
    world_size, rank, local_rank = launch_ranks(dict(os.environ if environ is None else environ))
    if hp.grad_accum_steps == 0 and 8 % world_size:
        raise InputError(f"WORLD_SIZE={world_size} is not allowed: must divide 8 (1, 2, 4 or 8 processes), "
                         "or set GRAD_ACCUM_STEPS")
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    runtime = Runtime(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                      accum_steps=hp.grad_accum_steps or 8 // world_size,
                      compile_enabled=hp.compile == "1" or (hp.compile == "auto" and device.type == "cuda"))
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    if hp.smoke:  # the thread count changes the order of float sums: a fixed one gives one score per machine
        torch.set_num_threads(max(1, 2 // world_size))
    torch.manual_seed(hp.seed)
    np.random.seed(hp.seed)
    return runtime


def open_run_files(hp: Hyperparameters, runtime: Runtime) -> None:
    """Rank 0 checks the artifact can be written and starts the run's own, new log."""
    if runtime.is_main:
        check_writable(Path(hp.artifact_path), "ARTIFACT_PATH")
        runtime.log_path = create_log_file(Path("logs") / f"{hp.run_id or uuid.uuid4()}.txt")
        for leftover in remove_stale_temporaries(hp.artifact_path):
            runtime.log(f"artifact: removed {leftover}, a temporary file left by a write that was killed")


def create_log_file(path: Path) -> Path:
    """A new, empty log: a run never appends to another run's log."""
    if path.parent.exists() and not path.parent.is_dir():
        raise InputError(f"{path.parent} is not a folder: the run's log goes to {path} (move that file away)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.open("x", encoding="utf-8").close()
    except FileExistsError:
        raise InputError(f"RUN_ID={path.stem!r} is not allowed: {path} already holds another run's log "
                         "(choose another RUN_ID or remove that file)") from None
    except OSError as error:
        raise InputError(f"RUN_ID={path.stem!r} is not allowed: cannot create {path} ({error.strerror})") from None
    return path


def check_writable(path: Path, variable: str) -> None:
    """Fail in seconds, not after training, when the output cannot be written."""
    if path.is_dir():
        raise InputError(f"{variable}={str(path)!r} is not allowed: it is a folder (name a file)")
    probe = path.with_name(f".{path.name}.{os.getpid()}.probe")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise InputError(f"{variable}={str(path)!r} is not allowed: cannot write there ({error.strerror}: {error.filename})") from None


class Progress:
    """Console lines with the time left, at most every `every` seconds, for long stretches.
    `watch`, when given, sees every estimate of the seconds left (to compare with a budget)."""

    def __init__(self, runtime: Runtime, label: str, total: int, every: float = 10.0,
                 watch: Callable[[str, float], None] | None = None):
        self.runtime, self.label, self.total, self.every, self.watch = runtime, label, total, every, watch
        self.started = self.last = time.perf_counter()
        self.done = 0

    def advance(self) -> None:
        """One more unit done."""
        self.done += 1
        self.update(self.done)

    def update(self, done: int, seconds_left: float | None = None) -> None:
        now = time.perf_counter()
        if done <= 0:
            return
        elapsed = now - self.started
        left = elapsed / done * (self.total - done) if seconds_left is None else seconds_left
        if self.watch is not None:
            self.watch(self.label, left)
        if now - self.last < self.every:
            return
        self.last = now
        if self.runtime.is_main:
            print(f"  {self.label}: {done}/{self.total}, {elapsed:.0f}s so far, ~{left:.0f}s left", flush=True)
