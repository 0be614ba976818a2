"""Parameter-golf trainer: one file, read top to bottom.

Trains the "MuonEq-R + context-only SLOT + QK gain 5" GPT within a wall-clock budget,
quantises it with GPTQ int6 into a brotli artifact, loads the artifact back into a fresh
model and scores it with sliding-window evaluation, optionally with SLOT and score-first
test-time training. docs/design.md describes the reference run this reproduces.

Each section uses only the sections above it:
  CONFIGURATION   every setting, read from the environment, checked once
  RUNTIME         device, ranks, communication, compilation, logging, progress
  DATA            token shards, the coprime-stride sampler, the embedded corpus
  MODEL           the GPT and its small shape config
  OPTIMISER       MuonEq-R on the weight banks, AdamW on the rest
  QUANTISATION AND ARTIFACT   GPTQ int6, the file format, the 16 MB accounting
  EVALUATION      exact byte counts, sliding windows, SLOT, score-first TTT
  TRAINING LOOP   schedules, EMA, late QAT, stop flags, the timed loop
  MAIN            the run as a short list of phases, and the command line

This is the readable source. The shipped train_gpt.py is generated from it by
`python tools/pack.py` and behaves the same.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import difflib
import functools
import glob
import hashlib
import json
import lzma
import math
import os
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, NamedTuple

import brotli
import numpy as np
import sentencepiece
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

USAGE = """Parameter-golf trainer; settings are environment variables.
  torchrun --standalone --nproc_per_node=8 train_gpt.py   8 GPUs
  python train_gpt.py                                     1 process (no FineWeb: the embedded default)
"""

# -----------------------------------------------------------------------------
# CONFIGURATION
# -----------------------------------------------------------------------------
# Every setting is an environment variable, named as in the reference run. The
# defaults reproduce the reference run; SMOKE=1 swaps in the embedded default's small
# profile first, and variables that are set still win over it.

class ConfigError(ValueError):
    """A setting that cannot work; the message names the variable and what is allowed."""

def setting(default: Any, help: str) -> Any:
    """A field whose environment variable is its name in capitals."""
    return field(default=default, metadata={"help": help})

@dataclass
class Hyperparameters:
    # data and run
    data_path: str = setting("./data/datasets/fineweb10B_sp1024", "folder of fineweb_train_*.bin and fineweb_val_*.bin")
    tokenizer_path: str = setting("./data/tokenizers/fineweb_1024_bpe.model", "SentencePiece model used for byte counts")
    run_id: str = setting("", "log file logs/<RUN_ID>.txt, never reused (default: a UUID)")
    artifact_path: str = setting("final_model.int6.ptz", "where the quantised model is written")
    seed: int = setting(1337, "seed of weights and evaluation (data order: fixed by file names)")
    smoke: bool = setting(False, "the embedded default: a small model on vendored text")
    # model
    vocab_size: int = setting(1024, "tokenizer vocabulary size")
    num_layers: int = setting(11, "transformer blocks")
    model_dim: int = setting(512, "residual width")
    num_heads: int = setting(8, "query heads")
    num_kv_heads: int = setting(4, "key/value heads (grouped-query attention)")
    mlp_mult: float = setting(3.0, "MLP hidden width as a multiple of MODEL_DIM")
    qk_gain_init: float = setting(5.0, "initial per-head query gain")
    rope_dims: int = setting(16, "head dims that get rotary embedding (0: all)")
    rope_base: float = setting(10000.0, "rotary base")
    xsa_last_n: int = setting(11, "last N layers use XSA (remove the self-value component)")
    bigram_vocab_size: int = setting(2816, "BigramHash buckets (0 disables)")
    bigram_dim: int = setting(112, "BigramHash embedding width")
    ve_enabled: bool = setting(True, "value embeddings on VE_LAYERS")
    ve_dim: int = setting(128, "value-embedding table width")
    ve_layers: str = setting("9,10", "comma-separated layers that add the value embedding")
    logit_softcap: float = setting(30.0, "logits = c*tanh(z/c)")
    tied_embed_init_std: float = setting(0.005, "init std of the tied embedding")
    negative_slope: float = setting(0.5, "leaky_relu slope inside the squared MLP activation")
    # schedule
    train_batch_tokens: int = setting(786_432, "tokens per optimiser step, all ranks together")
    train_seq_len: int = setting(2048, "training sequence length")
    grad_accum_steps: int = setting(0, "micro-steps per step (0: 8 // WORLD_SIZE)")
    iterations: int = setting(20000, "step limit")
    warmup_steps: int = setting(20, "compile/prime steps, then everything is reset")
    warmdown_iters: int = setting(3500, "LR decays to 0 over the last N (average-length) steps")
    max_wallclock_seconds: float = setting(600.0, "training time cap, where the LR schedule ends (0: none)")
    safety_cap_seconds: float = setting(0.0, "stop (and say so) after this long; no effect on the schedule (0: none)")
    gptq_reserve_ms: float = setting(9000.0, "part of the cap kept for quantisation")
    val_loss_every: int = setting(4000, "validate every N steps (0: only at the end)")
    train_log_every: int = setting(500, "log the train loss every N steps")
    val_batch_size: int = setting(524_288, "tokens per validation batch, all ranks together")
    # optimiser
    matrix_lr: float = setting(0.03, "Muon LR of the weight banks")
    early_layers: int = setting(5, "layers 0..N-1 get EARLY_LAYERS_LR_SCALE")
    early_layers_lr_scale: float = setting(1.0, "Muon LR and decay multiplier of early layers (1: the reference, whose split cancels)")
    scalar_lr: float = setting(0.025, "AdamW LR of control tensors and small projections")
    tied_embed_lr: float = setting(0.035, "AdamW LR of token-like tables")
    muon_momentum: float = setting(0.99, "Muon Nesterov momentum")
    muon_momentum_warmup_start: float = setting(0.92, "momentum at step 0")
    muon_momentum_warmup_steps: int = setting(1500, "steps to reach MUON_MOMENTUM")
    muon_backend_steps: int = setting(5, "Newton-Schulz iterations")
    muon_wd: float = setting(0.04, "decoupled weight decay of the banks")
    muon_eq_r: bool = setting(True, "row-normalise updates before Newton-Schulz (0: plain Muon)")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    adam_eps: float = setting(1e-8, "AdamW epsilon")
    adam_wd: float = setting(0.04, "AdamW weight decay")
    grad_clip_norm: float = setting(0.3, "global gradient-norm clip (0: off)")
    ema_decay: float = setting(0.997, "EMA of the weights, applied before export")
    late_qat_threshold: float = setting(0.15, "fake-quantise small projections below this LR multiplier (0: off)")
    late_qat_min_step: int = setting(2000, "earliest step for late QAT")
    # quantisation and artifact
    gptq_calib_samples: int = setting(64, "training micro-batches for GPTQ Hessians")
    quant_clip_range: int = setting(31, "int6 grid is [-N, N]")
    gptq_fine_scales: bool = setting(False, "no scale floor, one damping, Hessian-weighted clip (finer, larger)")
    # evaluation
    eval_seq_len: int = setting(2048, "evaluation window length")
    eval_stride: int = setting(64, "sliding-window stride (new tokens scored per window)")
    eval_batch_seqs: int = setting(32, "windows per evaluation batch")
    slot_enabled: bool = setting(True, "context-only SLOT in the sliding-window evaluation")
    slot_mode: str = setting("window", "window | batch_causal | shared (the reference's: leaks)")
    slot_steps: int = setting(8, "SLOT optimisation steps per batch")
    slot_lr: float = setting(0.005, "SLOT AdamW learning rate")
    ttt_enabled: bool = setting(False, "score-first test-time training after sliding evaluation")
    ttt_lr: float = setting(0.002, "TTT SGD learning rate (cosine over chunks)")
    ttt_epochs: int = setting(3, "TTT passes over each scored chunk")
    ttt_chunk_tokens: int = setting(32768, "TTT chunk size")
    ttt_freeze_blocks: int = setting(2, "first N blocks stay frozen during TTT")
    ttt_momentum: float = setting(0.9, "TTT SGD momentum")
    ttt_batch_seqs: int = setting(32, "TTT sequences per batch")
    ttt_grad_clip: float = setting(1.0, "TTT gradient-norm clip")
    # machinery
    compile: str = setting("auto", "torch.compile: auto (CUDA only) | 1 | 0")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Hyperparameters:
        """Defaults, then the SMOKE profile, then every variable that is set."""
        environ = dict(os.environ if environ is None else environ)
        values = dict(SMOKE_PROFILE) if parse_setting("smoke", environ.get("SMOKE", "0")) else {}
        values.update({spec.name: parse_setting(spec.name, environ[env_of(spec.name)])
                       for spec in fields(cls) if env_of(spec.name) in environ})
        hp = cls(**values)
        hp.validate()
        return hp

    def validate(self) -> None:
        """Raise ConfigError for the first setting that cannot work (checked in order, so a
        later rule may divide by what an earlier one proved positive)."""
        rules: list[tuple[str, Callable[[], bool], str]] = [
            *((name, lambda name=name: getattr(self, name) > 0, "must be positive") for name in POSITIVE_SETTINGS),
            *((name, lambda name=name: getattr(self, name) >= 0, "must not be negative") for name in NON_NEGATIVE_SETTINGS),
            ("seed", lambda: self.seed < 2**32, "must be below 2**32"),
            ("num_heads", lambda: self.model_dim % self.num_heads == 0, f"must divide MODEL_DIM={self.model_dim}"),
            ("num_kv_heads", lambda: self.num_heads % self.num_kv_heads == 0, f"must divide NUM_HEADS={self.num_heads}"),
            ("rope_dims", lambda: self.head_dim % 2 == 0 and self.rope_dims in {0, *range(4, self.head_dim + 1, 2)},
             "must be 0 (all) or even in 4..the head dim"),
            ("mlp_mult", lambda: (self.mlp_mult * self.model_dim) % 1 == 0, "must give a whole hidden width"),
            ("bigram_vocab_size", lambda: self.bigram_vocab_size != 1, "must be 0 (off) or at least 2"),
            ("ve_layers", lambda: all(0 <= i < self.num_layers for i in self.value_embedding_layers),
             f"layers must lie in 0..{self.num_layers - 1}"),
            ("xsa_last_n", lambda: self.xsa_last_n <= self.num_layers, f"must be at most NUM_LAYERS={self.num_layers}"),
            ("slot_mode", lambda: self.slot_mode in SLOT_MODES, f"one of {', '.join(SLOT_MODES)}"),
            ("compile", lambda: self.compile in ("auto", "0", "1"), "auto, 0 or 1"),
            ("eval_stride", lambda: self.eval_stride <= self.eval_seq_len, f"must be at most EVAL_SEQ_LEN={self.eval_seq_len}"),
            ("quant_clip_range", lambda: self.quant_clip_range <= 127, "must lie in 1..127"),
            ("ema_decay", lambda: self.ema_decay < 1, "must lie in [0, 1)"),
            ("train_batch_tokens", lambda: self.train_batch_tokens % self.train_seq_len == 0,
             f"must be a multiple of TRAIN_SEQ_LEN={self.train_seq_len} (whole windows)")]
        for name, holds, allowed in rules:
            if not holds():
                raise ConfigError(f"{env_of(name)}={getattr(self, name)!r} is not allowed: {allowed}")

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def value_embedding_layers(self) -> list[int]:
        try:
            return [int(part) for part in self.ve_layers.split(",") if part.strip()] if self.ve_enabled else []
        except ValueError:
            raise ConfigError(f"VE_LAYERS={self.ve_layers!r} is not allowed: a comma-separated list of layer numbers") from None

    @property
    def train_files(self) -> str:
        return os.path.join(self.data_path, "fineweb_train_*.bin")

    @property
    def val_files(self) -> str:
        return os.path.join(self.data_path, "fineweb_val_*.bin")

POSITIVE_SETTINGS = ("num_layers", "model_dim", "num_heads", "num_kv_heads", "vocab_size", "train_seq_len",
                     "eval_seq_len", "train_batch_tokens", "eval_stride", "eval_batch_seqs", "val_batch_size",
                     "gptq_calib_samples", "quant_clip_range", "ttt_chunk_tokens", "ttt_batch_seqs", "mlp_mult")
NON_NEGATIVE_SETTINGS = ("seed", "iterations", "warmup_steps", "warmdown_iters", "max_wallclock_seconds",
                         "safety_cap_seconds", "gptq_reserve_ms", "val_loss_every", "train_log_every", "grad_accum_steps",
                         "early_layers", "xsa_last_n", "bigram_vocab_size", "rope_dims", "slot_steps", "ttt_epochs",
                         "ttt_freeze_blocks", "muon_momentum_warmup_steps", "muon_backend_steps", "late_qat_threshold",
                         "ema_decay", "grad_clip_norm")
SLOT_MODES = ("window", "batch_causal", "shared")

# The embedded default: a 0.65M-parameter model that trains in about two minutes on two
# CPU cores, on the vendored text of data/smoke/. Bounded by steps, so a seed gives the
# same score on any machine; the hour's safety cap only stops a machine that is far too
# slow (two busy cores made training 9x slower: 760 s).
SMOKE_PROFILE: dict[str, Any] = dict(
    data_path="./data/datasets/smoke_pydoc_sp1024", num_layers=4, model_dim=128,
    num_heads=4, num_kv_heads=2, mlp_mult=2.0, xsa_last_n=4, bigram_vocab_size=512,
    bigram_dim=32, ve_dim=32, ve_layers="2,3", train_batch_tokens=8192, train_seq_len=256,
    grad_accum_steps=1, iterations=150, warmup_steps=2, warmdown_iters=100, max_wallclock_seconds=0.0,
    safety_cap_seconds=3600.0, gptq_reserve_ms=0.0, val_loss_every=50, train_log_every=25, val_batch_size=16384,
    muon_momentum_warmup_steps=100, late_qat_min_step=100, gptq_calib_samples=4, ema_decay=0.95,
    eval_seq_len=256, eval_batch_seqs=16, slot_steps=4,
    ttt_enabled=True, ttt_chunk_tokens=8192, ttt_epochs=1, ttt_batch_seqs=8)
SMOKE_EXPECTED_BPB = 1.82  # the embedded default's final score for SEED=1337 (1.81563577 measured; README)

def env_of(name: str) -> str:
    return name.upper()

def parse_setting(name: str, raw: str) -> Any:
    """Parse one variable by its field's type; a bad value names the variable."""
    kind = next(spec.type for spec in fields(Hyperparameters) if spec.name == name)
    text = raw.strip().lower()
    if kind == "str":
        return raw
    try:
        if kind == "bool" and text in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
            return text in ("1", "true", "yes", "on")
        if kind in ("int", "float") and math.isfinite(value := (int if kind == "int" else float)(text)):
            return value
    except ValueError:
        pass
    expected = {"bool": "0 or 1", "int": "an integer", "float": "a finite number"}[kind]
    raise ConfigError(f"{env_of(name)}={raw!r} is not allowed: expected {expected}")

def misspelled_settings(environ: dict[str, str]) -> list[str]:
    """Warnings for variables that look like one of ours but are not (SLOT_STEP=4)."""
    ours = [env_of(spec.name) for spec in fields(Hyperparameters)]
    warnings = []
    for name in sorted(set(environ) - set(ours)):
        if close := difflib.get_close_matches(name, ours, n=1, cutoff=0.85):
            warnings.append(f"warning: {name} is not a setting (ignored); did you mean {close[0]}?")
    return warnings

def changed_settings(hp: Hyperparameters) -> str:
    """The settings that differ from the defaults, as VARIABLE=value."""
    return " ".join(f"{env_of(spec.name)}={getattr(hp, spec.name)}" for spec in fields(hp)
                    if getattr(hp, spec.name) != spec.default) or "none"

def describe_settings() -> str:
    """The --help text: every variable with its default and meaning."""
    return "\n".join(["Environment variables (default in brackets):"] + [
        f"  {env_of(spec.name):<28} [{int(spec.default) if isinstance(spec.default, bool) else spec.default}] "
        f"{spec.metadata['help']}" for spec in fields(Hyperparameters)])


# -----------------------------------------------------------------------------
# RUNTIME: device, ranks, communication, compilation, logging
# -----------------------------------------------------------------------------
# Every collective goes through Runtime, so the rest of the file never asks whether
# it is distributed: with one process each method is a no-op or a plain copy.

MIN_TORCH = (2, 5)  # scaled_dot_product_attention(enable_gqa=...) arrived in 2.5

class RunFailure(RuntimeError):
    """The run itself failed (non-finite loss or weights, a failed write); exit status 1."""

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
    where: str = "at start-up"  # what the run is doing, for the interrupt message
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
        """Rank 0 prints and appends to the run's log file."""
        if not self.is_main:
            return
        if console:
            print(message, flush=True)
        if self.log_path is not None:
            with open(self.log_path, "a", encoding="utf-8") as handle:
                print(message, file=handle)

    def fail(self, message: str) -> None:
        """A fatal error: to stderr (from every rank), and to the log when it can still be written."""
        print(message if self.is_main else f"rank {self.rank}: {message}", file=sys.stderr, flush=True)
        try:
            self.log(message, console=False)
        except OSError:
            pass  # the log itself cannot be written (full disk): stderr has it

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

FLASH_ATTENTION_3: Callable | None = None  # FlashAttention-3's function, once enabled

def enable_flash_attention_3(device: torch.device) -> bool:
    """Use FlashAttention-3 when its Python interface is installed and the GPU is a Hopper."""
    global FLASH_ATTENTION_3
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        try:
            from flash_attn_interface import flash_attn_func
        except ImportError:
            return False
        FLASH_ATTENTION_3 = flash_attn_func
    return FLASH_ATTENTION_3 is not None

def check_torch_version(version: str) -> None:
    found = tuple(int(part) for part in version.split("+")[0].split(".")[:2])
    if found < MIN_TORCH:
        raise ConfigError(f"torch {version} is too old: this trainer needs torch >= {'.'.join(map(str, MIN_TORCH))}")

def start_runtime(hp: Hyperparameters) -> Runtime:
    """Ranks, device and process group; seeds every generator."""
    check_torch_version(torch.__version__)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world_size < 1 or (hp.grad_accum_steps == 0 and 8 % world_size):
        raise ConfigError(f"WORLD_SIZE={world_size} is not allowed: must divide 8 (1, 2, 4 or 8 processes), "
                          "or set GRAD_ACCUM_STEPS")
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        enable_flash_attention_3(device)
    runtime = Runtime(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                      accum_steps=hp.grad_accum_steps or 8 // world_size,
                      compile_enabled=hp.compile == "1" or (hp.compile == "auto" and device.type == "cuda"))
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    if hp.smoke:  # the thread count changes the order of float sums: a fixed one gives one score everywhere
        torch.set_num_threads(max(1, 2 // world_size))
    torch.manual_seed(hp.seed)
    np.random.seed(hp.seed)
    return runtime

def open_run_files(hp: Hyperparameters, runtime: Runtime) -> None:
    """Rank 0 checks the artifact can be written and starts the run's own, new log."""
    if runtime.is_main:
        check_writable(Path(hp.artifact_path), "ARTIFACT_PATH")
        runtime.log_path = create_log_file(Path("logs") / f"{hp.run_id or uuid.uuid4()}.txt")

def create_log_file(path: Path) -> Path:
    """A new, empty log: a run never appends to another run's log."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.open("x", encoding="utf-8").close()
    except FileExistsError:
        raise ConfigError(f"RUN_ID={path.stem!r} is not allowed: {path} already holds another run's log "
                          "(choose another RUN_ID or remove that file)") from None
    except OSError as error:
        raise ConfigError(f"RUN_ID={path.stem!r} is not allowed: cannot create {path} ({error.strerror})") from None
    return path

def check_writable(path: Path, variable: str) -> None:
    """Fail in seconds, not after training, when the output cannot be written."""
    probe = path.with_name(f".{path.name}.{os.getpid()}.probe")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"{variable}={str(path)!r} is not allowed: cannot write there ({error.strerror}: {error.filename})") from None

class Progress:
    """Console lines with the time left, at most every `every` seconds, for long stretches."""

    def __init__(self, runtime: Runtime, label: str, total: int, every: float = 10.0):
        self.runtime, self.label, self.total, self.every = runtime, label, total, every
        self.started = self.last = time.perf_counter()

    def update(self, done: int, seconds_left: float | None = None) -> None:
        now = time.perf_counter()
        if now - self.last < self.every or done <= 0:
            return
        self.last = now
        elapsed = now - self.started
        left = elapsed / done * (self.total - done) if seconds_left is None else seconds_left
        if self.runtime.is_main:
            print(f"  {self.label}: {done}/{self.total}, {elapsed:.0f}s so far, ~{left:.0f}s left", flush=True)


# -----------------------------------------------------------------------------
# DATA
# -----------------------------------------------------------------------------
# A shard is 256 little-endian int32 (magic, version, token count, zeros) followed by
# that many little-endian uint16 tokens. Every document starts with BOS.

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS, BOS_ID = 20240520, 1, 256, 1
SHARD_HEADER_BYTES = 4 * SHARD_HEADER_INTS
SMOKE_TEXT = "data/smoke/pydoc_text.json.xz"  # the embedded default's text (tools/build_smoke_text.py)

class DataError(ValueError):
    """A data file that cannot be used; the message names the file."""

class WriteError(RuntimeError):
    """A file could not be written (read-only folder, full disk); nothing was left behind."""

def read_shard(path: str | Path) -> np.ndarray:
    """Memory-map a shard's tokens after checking its header and size."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise DataError(f"{path}: cannot read shard ({error.strerror})") from None
    if size < SHARD_HEADER_BYTES:
        raise DataError(f"{path}: {size} bytes is shorter than the {SHARD_HEADER_BYTES}-byte shard header")
    magic, version, count = (int(value) for value in np.fromfile(path, dtype="<i4", count=3))
    if magic != SHARD_MAGIC:
        raise DataError(f"{path}: bad magic {magic}, expected {SHARD_MAGIC} (not a token shard)")
    if version != SHARD_VERSION:
        raise DataError(f"{path}: unsupported shard version {version}, expected {SHARD_VERSION}")
    if count < 0 or size != SHARD_HEADER_BYTES + 2 * count:
        raise DataError(f"{path}: file is {size} bytes but its header promises {count} tokens "
                        f"({SHARD_HEADER_BYTES + 2 * count} bytes); truncated or corrupt")
    return np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_BYTES, shape=(count,))

def check_vocabulary(shards: list[np.ndarray], paths: list[Path], vocab_size: int, runtime: Runtime) -> None:
    """Every token id < vocab_size; the ranks share the reading and agree on the verdict."""
    first_bad = torch.tensor(len(paths), device=runtime.device)
    for index in range(runtime.rank, len(paths), runtime.world_size):
        if shards[index].size and int(shards[index].max()) >= vocab_size:
            first_bad.fill_(index)
            break
    bad = int(runtime.all_reduce_(first_bad, "min"))
    if bad < len(paths):
        raise DataError(f"{paths[bad]}: holds token ids >= VOCAB_SIZE={vocab_size} (made with another tokenizer?)")

def write_atomic(path: str | Path, data: bytes, overwrite: bool = True) -> None:
    """Write to a temporary name and rename, so a crash never leaves a complete-looking file;
    a failed write leaves nothing behind. With overwrite=False an existing file is an error."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)  # fails if the path exists: never replaces a file
    except FileExistsError:
        raise
    except OSError as error:
        raise WriteError(f"{path}: cannot write ({error.strerror}); nothing was written") from None
    finally:
        temporary.unlink(missing_ok=True)

def write_shard(path: str | Path, tokens: np.ndarray, overwrite: bool = True) -> None:
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > 65535):
        raise DataError(f"{path}: token ids must fit in uint16")
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    write_atomic(path, header.tobytes() + tokens.astype("<u2").tobytes(), overwrite)

def shard_paths(pattern: str) -> list[Path]:
    paths = [Path(p) for p in sorted(glob.glob(pattern))]
    if not paths:
        raise DataError(f"no shards match {pattern} (set DATA_PATH, or run tools/download_fineweb.py)")
    return paths

def load_validation_tokens(pattern: str, seq_len: int, vocab_size: int, runtime: Runtime) -> Tensor:
    """All validation shards concatenated, cut to a multiple of seq_len, plus one target."""
    paths = shard_paths(pattern)
    shards = [read_shard(path) for path in paths]
    check_vocabulary(shards, paths, vocab_size, runtime)
    tokens = np.concatenate([np.asarray(shard) for shard in shards])
    usable = (tokens.size - 1) // seq_len * seq_len
    if usable <= 0:
        raise DataError(f"{pattern}: {tokens.size} validation tokens are fewer than one sequence of {seq_len}")
    return torch.from_numpy(tokens[: usable + 1].astype(np.int64))

class ShardCursor:
    """Visits the seq_len blocks of one shard in a coprime-stride order, each once per pass."""

    def __init__(self, num_tokens: int, seq_len: int, rng: np.random.Generator):
        self.num_tokens, self.seq_len, self.rng = num_tokens, seq_len, rng
        self.new_pass()

    def new_pass(self) -> None:
        # A random phase shifts the block grid each pass, so block edges move.
        max_phase = min(self.seq_len - 1, max(0, self.num_tokens - self.seq_len - 1))
        self.phase = int(self.rng.integers(max_phase + 1)) if max_phase > 0 else 0
        self.num_blocks = (self.num_tokens - 1 - self.phase) // self.seq_len
        self.start = int(self.rng.integers(self.num_blocks)) if self.num_blocks > 1 else 0
        self.stride = 1
        while self.num_blocks > 1:
            self.stride = int(self.rng.integers(1, self.num_blocks))
            if math.gcd(self.stride, self.num_blocks) == 1:
                break
        self.taken = 0

    @property
    def remaining(self) -> int:
        return self.num_blocks - self.taken

    def take(self, count: int) -> list[int]:
        """Start offsets of the next `count` windows (seq_len + 1 tokens each)."""
        offsets = []
        for _ in range(count):
            if self.remaining == 0:
                self.new_pass()
            offsets.append(self.phase + (self.start + self.taken * self.stride) % self.num_blocks * self.seq_len)
            self.taken += 1
        return offsets

# How a step's windows are spread over shards: over the first MIX_RAMP_STEPS steps the
# exponent on each shard's remaining blocks falls from ALPHA_START to ALPHA_END (from
# favouring big shards towards an even spread) and the shards per step grow from
# SHARDS_START to SHARDS_END.
MIX_RAMP_STEPS, ALPHA_START, ALPHA_END, SHARDS_START, SHARDS_END = 1800, 0.9, 0.5, 8, 32

class TokenSampler:
    """The coprime-stride multi-shard sampler.

    Each step draws the step's global list of windows: a few shards, chosen with
    probability ~ remaining_blocks^alpha, interleaved round-robin. Every rank draws the
    same list (the RNG is seeded from the shard names, so the order is the same for every
    SEED: a quirk of the reference) and keeps its own slice, so ranks never share a
    window. Micro-batch m of rank r takes windows[m*world + r :: world*accum]: the same
    windows land in the same micro-batch whatever the split between ranks and
    accumulation, so a 2-rank run is the same math as 1 rank with 2 micro-steps.
    """

    def __init__(self, pattern: str, seq_len: int, windows_per_step: int, rank: int, world_size: int, accum_steps: int):
        if windows_per_step % (world_size * accum_steps):
            raise ConfigError(f"TRAIN_BATCH_TOKENS/TRAIN_SEQ_LEN={windows_per_step} windows is not allowed: "
                              f"must be a multiple of WORLD_SIZE*GRAD_ACCUM_STEPS={world_size * accum_steps}")
        self.paths = shard_paths(pattern)
        self.shards = [read_shard(path) for path in self.paths]
        self.seq_len, self.windows_per_step = seq_len, windows_per_step
        self.rank, self.world_size, self.accum_steps = rank, world_size, accum_steps
        self.eligible = [i for i, shard in enumerate(self.shards) if shard.size > seq_len]
        if not self.eligible:
            raise DataError(f"{pattern}: no shard holds a full window of {seq_len + 1} tokens")
        seed = 0xCBF29CE484222325  # FNV-1a of the shard names
        for byte in "\n".join(p.name for p in self.paths).encode():
            seed = ((seed ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.cursors: dict[int, ShardCursor] = {}
        self.steps_drawn = 0

    def cursor(self, shard: int) -> ShardCursor:
        if shard not in self.cursors:  # built once: a new cursor draws from the shared RNG
            self.cursors[shard] = ShardCursor(self.shards[shard].size, self.seq_len, self.rng)
        return self.cursors[shard]

    def draw_step_windows(self) -> list[tuple[int, int]]:
        """(shard, offset) of every window of the next step, all ranks together."""
        progress, total = min(self.steps_drawn / MIX_RAMP_STEPS, 1.0), self.windows_per_step
        remaining = np.array([max(self.cursors[s].remaining, 1) if s in self.cursors else (self.shards[s].size - 1) // self.seq_len
                              for s in self.eligible], dtype=np.float64)
        probs = remaining ** (ALPHA_START + (ALPHA_END - ALPHA_START) * progress)
        probs /= probs.sum()
        low = min(max(SHARDS_START, self.world_size), len(self.eligible), total)
        high = min(max(SHARDS_END, 8 * self.world_size), len(self.eligible), total)
        mix = max(1, int(round(low + progress * (high - low))))
        chosen = self.rng.choice(len(self.eligible), size=mix, replace=False, p=probs)
        counts = np.ones(mix, dtype=np.int64)
        if total > mix:
            counts += self.rng.multinomial(total - mix, probs[chosen] / probs[chosen].sum())
        buckets = []
        for index in self.rng.permutation(mix):
            shard = self.eligible[int(chosen[index])]
            offsets = self.cursor(shard).take(int(counts[index]))
            buckets.append([(shard, offsets[k]) for k in self.rng.permutation(len(offsets))])
        windows: list[tuple[int, int]] = []
        while buckets:  # round-robin in a fresh random order each round
            buckets = [buckets[k] for k in self.rng.permutation(len(buckets))]
            windows += [bucket.pop() for bucket in buckets]
            buckets = [bucket for bucket in buckets if bucket]
        self.steps_drawn += 1
        return windows

    def micro_batch_windows(self, windows: list[tuple[int, int]], micro_step: int) -> list[tuple[int, int]]:
        return windows[micro_step * self.world_size + self.rank :: self.world_size * self.accum_steps]

    def next_step(self, runtime: Runtime) -> list[tuple[Tensor, Tensor]]:
        """This rank's (inputs, targets) for each micro-step of the next step."""
        windows, batches = self.draw_step_windows(), []
        for micro_step in range(self.accum_steps):
            rows = np.stack([self.shards[s][o : o + self.seq_len + 1] for s, o in self.micro_batch_windows(windows, micro_step)])
            rows = runtime.to_device(torch.from_numpy(rows.astype(np.int64)))
            batches.append((rows[:, :-1], rows[:, 1:]))
        return batches

def make_sampler(hp: Hyperparameters, runtime: Runtime) -> TokenSampler:
    return TokenSampler(hp.train_files, hp.train_seq_len, hp.train_batch_tokens // hp.train_seq_len,
                        runtime.rank, runtime.world_size, runtime.accum_steps)

def bundled_file(relative: str) -> Path:
    """A path as given (under the working directory), else one of the project's files
    found beside this script: the tokenizer and the embedded text work from any folder."""
    here = Path(__file__).resolve().parent
    return next((base / relative for base in (Path.cwd(), here, here.parent) if (base / relative).exists()), Path(relative))

def build_smoke_corpus(data_path: str | Path, tokenizer: Any) -> None:
    """Shards for the embedded default from the vendored text; never replaces a file."""
    try:
        text = json.loads(lzma.decompress(bundled_file(SMOKE_TEXT).read_bytes()))
    except (OSError, lzma.LZMAError, ValueError) as error:
        raise DataError(f"{SMOKE_TEXT}: cannot read the embedded corpus ({error})") from None
    for split in ("val", "train"):
        tokens = np.concatenate([[BOS_ID] + ids for ids in tokenizer.encode(text[split])])
        try:
            write_shard(Path(data_path) / f"fineweb_{split}_000000.bin", tokens, overwrite=False)
        except FileExistsError:
            pass  # built before, or by another process at the same moment


# -----------------------------------------------------------------------------
# MODEL
# -----------------------------------------------------------------------------
# Block weights live in four 3-D "banks" so Muon can orthogonalise a whole bank in
# one batched call and shard it across ranks by its first axis:
#   qo_bank   [2L, d, d]      q of layer i at i, attention out-projection at L + i
#   kv_bank   [2L, kv, d]     k of layer i at i, v at L + i
#   mlp_up_bank [L, h, d], mlp_down_bank [L, d, h]

@dataclass(frozen=True)
class ModelConfig:
    """What fixes the model's function: derived once from the settings, stored in the
    artifact and compared on load (the two init fields excepted)."""
    vocab_size: int
    num_layers: int
    model_dim: int
    num_heads: int
    num_kv_heads: int
    mlp_hidden: int
    rope_dims: int
    rope_base: float
    xsa_last_n: int
    bigram_vocab_size: int
    bigram_dim: int
    ve_dim: int
    ve_layers: tuple[int, ...]
    logit_softcap: float
    negative_slope: float
    qk_gain_init: float
    tied_embed_init_std: float

    INIT_ONLY = ("qk_gain_init", "tied_embed_init_std")

    @classmethod
    def from_settings(cls, hp: Hyperparameters) -> ModelConfig:
        same_name = {spec.name: getattr(hp, spec.name) for spec in fields(cls) if hasattr(hp, spec.name)}
        return cls(**{**same_name, "mlp_hidden": int(hp.mlp_mult * hp.model_dim), "rope_dims": hp.rope_dims or hp.head_dim,
                      "ve_layers": tuple(hp.value_embedding_layers)})

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def function_fields(self) -> dict[str, Any]:
        """The fields a stored model must match (lists where JSON turns tuples into lists)."""
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items() if key not in self.INIT_ONLY}

def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal GQA attention on [B, T, heads, D] tensors; returns [B, T, H, D]."""
    if FLASH_ATTENTION_3 is not None and q.is_cuda and q.dtype == torch.bfloat16:
        out = FLASH_ATTENTION_3(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, enable_gqa=q.size(2) != k.size(2))
    return y.transpose(1, 2)

def rotary_tables(seq_len: int, rope_dims: int, base: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos/sin for partial RoPE, shaped [1, T, 1, rope_dims/2].

    Quirk kept from the reference: the table believes training length is 1024, so at
    longer lengths the base grows by (L/1024)^(rd/(rd-2)) (NTK-style scaling).
    """
    if seq_len > 1024:
        base = base * (seq_len / 1024) ** (rope_dims / (rope_dims - 2))
    inv_freq = 1.0 / base ** (torch.arange(0, rope_dims, 2, dtype=torch.float32, device=device) / rope_dims)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]

def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first rope_dims dims of each head (pairs i and i + rope_dims/2)."""
    half = cos.size(-1)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)

def remove_self_value(y: Tensor, v: Tensor) -> Tensor:
    """XSA: drop from each head's output its component along its own unit value vector."""
    batch, seq, heads, dim = y.shape
    kv_heads = v.size(2)
    grouped = y.reshape(batch, seq, kv_heads, heads // kv_heads, dim)
    unit_v = F.normalize(v, dim=-1).unsqueeze(3)
    grouped = grouped - (grouped * unit_v).sum(-1, keepdim=True) * unit_v
    return grouped.reshape(batch, seq, heads, dim)

def soft_round_int6(weight: Tensor, sharpness: Tensor, clip_range: int = 31) -> Tensor:
    """Late-QAT fake quantisation: per-row int6 grid with a differentiable rounding.

    floor(w/s) + sigmoid(sharpness * (frac - 0.5)); sharpness 1 is nearly linear and 16
    nearly a hard round.
    """
    w32 = weight.float()
    scale = (w32.abs().amax(dim=1) / clip_range).clamp_min(1.0 / clip_range)[:, None]
    scaled = w32 / scale
    floor = scaled.floor()
    rounded = floor + torch.sigmoid(sharpness * (scaled - floor - 0.5))
    return rounded.clamp(-clip_range, clip_range) * scale

class QATLinear(nn.Module):
    """A bias-free linear layer that late QAT can switch to fake-quantised weights.

    Initialised orthogonal: the reference declares these projections zero, but its
    init pass then makes every linear layer with both sides >= 64 orthogonal (at its
    sizes, these two), and a zero projection behind a zero table never gets a gradient.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(nn.init.orthogonal_(torch.empty(out_features, in_features)))
        self.qat_sharpness: Tensor | None = None  # set by LateQAT

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if self.training and self.qat_sharpness is not None:  # this order: eval mode guards on nothing more
            weight = soft_round_int6(weight, self.qat_sharpness)
        return F.linear(x, weight.to(x.dtype))

class BigramHash(nn.Module):
    """A hashed embedding of (previous token, token) pairs, projected to the width."""

    def __init__(self, buckets: int, dim: int, model_dim: int):
        super().__init__()
        self.buckets = buckets
        self.table = nn.Embedding(buckets, dim)
        nn.init.zeros_(self.table.weight)
        self.proj = QATLinear(dim, model_dim)
        self.scale = nn.Parameter(torch.tensor(0.05))

    def bucket_ids(self, tokens: Tensor) -> Tensor:
        """(36313*x_t XOR 27191*x_{t-1}) mod (buckets-1); position 0 gets the last bucket."""
        t = tokens.to(torch.int64)
        mixed = torch.bitwise_xor(36313 * t[..., 1:], 27191 * t[..., :-1]) % (self.buckets - 1)
        first = torch.full_like(t[..., :1], self.buckets - 1)
        return torch.cat((first, mixed), dim=-1)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.proj(self.table(self.bucket_ids(tokens))) * self.scale

class ValueEmbedding(nn.Module):
    """One token table added to the attention values of a few layers, each with its own scalar."""

    def __init__(self, vocab_size: int, dim: int, kv_dim: int, num_layers: int):
        super().__init__()
        self.table = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.table.weight, std=0.01)
        self.proj = QATLinear(dim, kv_dim)
        self.scale = nn.Parameter(torch.tensor(0.1))
        self.layer_scales = nn.ParameterList([nn.Parameter(torch.ones(1)) for _ in range(num_layers)])

    def forward(self, tokens: Tensor) -> Tensor:
        return self.proj(self.table(tokens)) * self.scale

class SmearGate(nn.Module):
    """x_t <- (1-g) x_t + g x_{t-1}, with g = sigmoid(per-channel gate)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        g = torch.sigmoid(self.gate).to(x.dtype)
        previous = F.pad(x[:, :-1], (0, 0, 1, 0))
        return torch.lerp(x, previous, g)

class Attention(nn.Module):
    def __init__(self, config: ModelConfig, use_xsa: bool):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_gain = nn.Parameter(torch.full((config.num_heads,), config.qk_gain_init))
        self.use_xsa = use_xsa
        self.captured: dict[str, Tensor] | None = None  # GPTQ calibration inputs when set

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor], q_w: Tensor, k_w: Tensor, v_w: Tensor,
                out_w: Tensor, value_embed: Tensor | None) -> Tensor:
        batch, seq, width = x.shape
        if self.captured is not None:
            self.captured["qkv"] = x.detach()
        q = F.linear(x, q_w.to(x.dtype)).reshape(batch, seq, self.num_heads, self.head_dim)
        k = F.linear(x, k_w.to(x.dtype)).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        v = F.linear(x, v_w.to(x.dtype))
        if value_embed is not None:
            v = v + value_embed.to(v.dtype)
        v = v.reshape(batch, seq, self.num_kv_heads, self.head_dim)
        q = apply_rotary(F.rms_norm(q, (self.head_dim,)), *rotary)
        k = apply_rotary(F.rms_norm(k, (self.head_dim,)), *rotary)
        q = q * self.q_gain.to(q.dtype)[:, None]
        y = causal_attention(q.to(v.dtype), k.to(v.dtype), v)
        if self.use_xsa:
            y = remove_self_value(y, v)
        y = y.reshape(batch, seq, width)
        if self.captured is not None:
            self.captured["out"] = y.detach()
        return F.linear(y, out_w.to(y.dtype))

class MLP(nn.Module):
    def __init__(self, negative_slope: float):
        super().__init__()
        self.negative_slope = negative_slope
        self.captured: dict[str, Tensor] | None = None

    def forward(self, x: Tensor, up_w: Tensor, down_w: Tensor) -> Tensor:
        if self.captured is not None:
            self.captured["up"] = x.detach()
        hidden = F.leaky_relu(F.linear(x, up_w.to(x.dtype)), self.negative_slope).square()
        if self.captured is not None:
            self.captured["down"] = hidden.detach()
        return F.linear(hidden, down_w.to(hidden.dtype))

class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        dim = config.model_dim
        self.attn = Attention(config, use_xsa=layer >= config.num_layers - config.xsa_last_n)
        self.mlp = MLP(config.negative_slope)
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.norm_scale = 1.0 / math.sqrt(layer + 1)  # deeper layers see smaller normed inputs

    def forward(self, x: Tensor, x0: Tensor, rotary: tuple[Tensor, Tensor], weights: tuple[Tensor, ...],
                value_embed: Tensor | None) -> Tensor:
        q_w, k_w, v_w, out_w, up_w, down_w = weights
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        normed = F.rms_norm(x, (x.size(-1),)) * self.norm_scale
        x = x + self.attn_scale.to(x.dtype) * self.attn(normed, rotary, q_w, k_w, v_w, out_w, value_embed)
        normed = F.rms_norm(x, (x.size(-1),)) * self.norm_scale
        return x + self.mlp_scale.to(x.dtype) * self.mlp(normed, up_w, down_w)

class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        dim, layers = config.model_dim, config.num_layers
        self.tok_emb = nn.Embedding(config.vocab_size, dim)
        nn.init.normal_(self.tok_emb.weight, std=config.tied_embed_init_std)
        self.bigram = BigramHash(config.bigram_vocab_size, config.bigram_dim, dim) if config.bigram_vocab_size else None
        self.smear = SmearGate(dim)
        self.ve_layers = list(config.ve_layers)
        self.value_embed = ValueEmbedding(config.vocab_size, config.ve_dim, config.kv_dim, len(self.ve_layers)) if self.ve_layers else None
        self.num_encoder = layers // 2
        num_skips = min(self.num_encoder, layers - self.num_encoder)
        self.skip_weights = nn.Parameter(torch.ones(num_skips, dim))
        self.skip_gates = nn.Parameter(torch.zeros(num_skips, dim))
        self.qo_bank = nn.Parameter(torch.zeros(2 * layers, dim, dim))
        self.kv_bank = nn.Parameter(torch.zeros(2 * layers, config.kv_dim, dim))
        self.mlp_up_bank = nn.Parameter(torch.zeros(layers, config.mlp_hidden, dim))
        self.mlp_down_bank = nn.Parameter(torch.zeros(layers, dim, config.mlp_hidden))
        for i in range(layers):  # out-projections and MLP-down stay zero
            for matrix in (self.qo_bank[i], self.kv_bank[i], self.kv_bank[layers + i], self.mlp_up_bank[i]):
                nn.init.orthogonal_(matrix.data)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(layers))

    def layer_weights(self, i: int) -> tuple[Tensor, ...]:
        n = self.config.num_layers
        return (self.qo_bank[i], self.kv_bank[i], self.kv_bank[n + i], self.qo_bank[n + i],
                self.mlp_up_bank[i], self.mlp_down_bank[i])

    def forward_hidden(self, input_ids: Tensor) -> Tensor:
        """Final normalised hidden states [B, T, d]."""
        x = self.tok_emb(input_ids)
        if self.bigram is not None:
            x = x + self.bigram(input_ids)
        x = self.smear(F.rms_norm(x, (x.size(-1),)))
        x0 = x
        rotary = rotary_tables(input_ids.size(1), self.config.rope_dims, self.config.rope_base, input_ids.device)
        value_base = self.value_embed(input_ids) if self.value_embed is not None else None
        skips: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            decoder_index = i - self.num_encoder
            if 0 <= decoder_index < len(self.skip_weights) and skips:
                # U-Net skip: the most recent encoder output, gated in by lerp.
                gate = torch.sigmoid(self.skip_gates[decoder_index]).to(x.dtype)
                x = torch.lerp(self.skip_weights[decoder_index].to(x.dtype) * skips.pop(), x, gate)
            value_embed = None
            if i in self.ve_layers:
                value_embed = value_base * self.value_embed.layer_scales[self.ve_layers.index(i)]
            x = block(x, x0, rotary, self.layer_weights(i), value_embed)
            if i < self.num_encoder:
                skips.append(x)
        return F.rms_norm(x, (x.size(-1),))

    def logits(self, hidden: Tensor) -> Tensor:
        """Tied output head with the tanh soft cap."""
        raw = F.linear(hidden, self.tok_emb.weight.to(hidden.dtype))
        return self.config.logit_softcap * torch.tanh(raw / self.config.logit_softcap)

    def token_nll(self, input_ids: Tensor, target_ids: Tensor) -> Tensor:
        """Cross-entropy of every position in nats, [B, T], in float32."""
        logits = self.logits(self.forward_hidden(input_ids)).float()
        return F.cross_entropy(logits.flatten(0, 1), target_ids.flatten(), reduction="none").view_as(target_ids)

    def forward(self, input_ids: Tensor, target_ids: Tensor) -> Tensor:
        """Mean cross-entropy in nats: the training loss."""
        return self.token_nll(input_ids, target_ids).mean()

    def qat_layers(self) -> list[QATLinear]:
        return [module for module in self.modules() if isinstance(module, QATLinear)]

    def capture_inputs(self, enabled: bool) -> list[tuple[dict[str, Tensor], dict[str, Tensor]]]:
        """Make every block record its linear-layer inputs (for GPTQ); returns the records."""
        records = []
        for block in self.blocks:
            block.attn.captured = {} if enabled else None
            block.mlp.captured = {} if enabled else None
            records.append((block.attn.captured, block.mlp.captured))
        return records


# -----------------------------------------------------------------------------
# OPTIMISER
# -----------------------------------------------------------------------------
# MuonEq-R for the four banks; AdamW for everything else. With several ranks the bank
# gradients are reduce-scattered along the bank's first axis, each rank
# orthogonalises its own matrices, and the updates are all-gathered; the next bank's
# Newton-Schulz runs while the previous all-gather is in flight.

NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

def newton_schulz(update: Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Approximately orthogonalise each matrix of a [..., m, n] batch (in bfloat16 by default)."""
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    x = update.to(dtype)
    transposed = x.size(-2) > x.size(-1)
    if transposed:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if transposed else x

def normalize_rows(update: Tensor, floor: float = 1e-7) -> Tensor:
    """MuonEq-R: every row of every matrix to unit L2 norm before Newton-Schulz."""
    return update / update.norm(dim=-1, keepdim=True).clamp_min(floor)

class MuonEqR(torch.optim.Optimizer):
    """Muon with optional row equalisation over banks of matrices, sharded over ranks.

    step(grad_shards) takes each bank's averaged gradient rows for this rank (the whole
    gradient with one process). Each group holds one bank and `lr_scale`, a per-matrix
    multiplier kept on the device; group["lr"] is the scheduled LR.
    """

    def __init__(self, banks: list[nn.Parameter], lr_scales: list[Tensor], lr: float, momentum: float,
                 backend_steps: int, weight_decay: float, row_normalize: bool, runtime: Runtime,
                 ns_dtype: torch.dtype = torch.bfloat16):
        groups = [dict(params=[bank], lr_scale=scale) for bank, scale in zip(banks, lr_scales)]
        super().__init__(groups, dict(lr=lr, base_lr=lr, momentum=momentum, backend_steps=backend_steps,
                                      weight_decay=weight_decay, row_normalize=row_normalize))
        self.runtime, self.ns_dtype = runtime, ns_dtype
        self.comm_dtype = torch.bfloat16 if runtime.device.type == "cuda" else torch.float32  # halves the traffic on GPUs

    @torch.no_grad()
    def step(self, grad_shards: list[Tensor]) -> None:  # type: ignore[override]
        in_flight: tuple[nn.Parameter, Tensor, Any, dict] | None = None
        for group, grad in zip(self.param_groups, grad_shards):
            bank = group["params"][0]
            update = self.orthogonal_update(bank, grad, group)
            if not self.runtime.distributed:
                self.apply_update(bank, update, group)
                continue
            update = update.to(self.comm_dtype)
            full = update.new_empty((update.size(0) * self.runtime.world_size, *update.shape[1:]))
            work = self.runtime.all_gather(full, update)
            if in_flight is not None:  # the previous bank's gather overlapped this bank's Newton-Schulz
                self.apply_gathered(*in_flight)
            in_flight = (bank, full, work, group)
        if in_flight is not None:
            self.apply_gathered(*in_flight)

    def orthogonal_update(self, bank: nn.Parameter, grad: Tensor, group: dict) -> Tensor:
        state = self.state[bank]
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(grad)
        momentum = state["momentum"]
        momentum.mul_(group["momentum"]).add_(grad)
        update = grad.add(momentum, alpha=group["momentum"])  # Nesterov
        if group["row_normalize"]:
            update = normalize_rows(update)
        update = newton_schulz(update, group["backend_steps"], dtype=self.ns_dtype)
        return update.to(grad.dtype) * max(1.0, bank.size(-2) / bank.size(-1)) ** 0.5

    def apply_gathered(self, bank: nn.Parameter, full: Tensor, work: Any, group: dict) -> None:
        work.wait()
        self.apply_update(bank, full[: bank.size(0)], group)

    def apply_update(self, bank: nn.Parameter, update: Tensor, group: dict) -> None:
        lr = group["lr"] * group["lr_scale"][:, None, None]
        bank.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay
        bank.sub_(lr * update.to(bank.dtype))

def matrix_lr_scales(hp: Hyperparameters, bank_size: int, device: torch.device) -> Tensor:
    """Per-matrix LR multiplier of a bank: matrix i belongs to layer i mod L.

    The reference scales the early layers' gradients by 0.025/0.03 before MuonEq-R,
    whose row normalisation and Newton-Schulz cancel the factor; 1.0 reproduces that.
    """
    early = torch.arange(bank_size, device=device) % hp.num_layers < hp.early_layers
    return torch.where(early, hp.early_layers_lr_scale, 1.0).float()

BANK_NAMES = ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank")
TOKEN_TABLE_NAMES = ("tok_emb.weight", "bigram.table.weight", "value_embed.table.weight")

@dataclass
class Optimizers:
    muon: MuonEqR
    adam: torch.optim.AdamW
    banks: list[nn.Parameter]
    replicated: list[nn.Parameter]  # everything outside the banks: averaged in full
    runtime: Runtime

    def all(self) -> list[torch.optim.Optimizer]:
        return [self.muon, self.adam]

    def zero_grad(self) -> None:
        for optimizer in self.all():
            optimizer.zero_grad(set_to_none=True)

    def set_schedule(self, lr_mul: float, muon_momentum: float) -> None:
        for optimizer in self.all():
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_mul
        for group in self.muon.param_groups:
            group["momentum"] = muon_momentum

    def step(self, clip_norm: float) -> None:
        """Average gradients over ranks, clip by the global norm of the average, step both."""
        pending = [self.runtime.reduce_scatter_mean(bank.grad, self.muon.comm_dtype) for bank in self.banks]  # starts first
        for param in self.replicated:
            if param.grad is None:  # a parameter the forward did not reach
                param.grad = torch.zeros_like(param)
        grads = [param.grad for param in self.replicated]
        self.runtime.mean_(grads)
        bank_shards = [shard.wait() for shard in pending]
        if clip_norm > 0:
            square = torch.stack([g.float().square().sum() for g in grads]).sum()
            bank_square = self.runtime.all_reduce_(torch.stack([s.square().sum() for s in bank_shards]).sum())
            coefficient = (clip_norm / ((square + bank_square).sqrt() + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads + bank_shards, coefficient)
        self.adam.step()
        self.muon.step(bank_shards)

def build_optimizers(hp: Hyperparameters, model: GPT, runtime: Runtime) -> Optimizers:
    named = dict(model.named_parameters())
    banks = [named[name] for name in BANK_NAMES]
    tables = [named[name] for name in TOKEN_TABLE_NAMES if name in named]
    controls = [p for name, p in named.items() if name not in BANK_NAMES and name not in TOKEN_TABLE_NAMES]
    adam = torch.optim.AdamW(
        [dict(params=tables, lr=hp.tied_embed_lr, base_lr=hp.tied_embed_lr),
         dict(params=controls, lr=hp.scalar_lr, base_lr=hp.scalar_lr)],
        betas=(hp.beta1, hp.beta2), eps=hp.adam_eps, weight_decay=hp.adam_wd, fused=runtime.device.type == "cuda")
    muon = MuonEqR(banks, [matrix_lr_scales(hp, bank.size(0), runtime.device) for bank in banks], lr=hp.matrix_lr,
                   momentum=hp.muon_momentum, backend_steps=hp.muon_backend_steps, weight_decay=hp.muon_wd,
                   row_normalize=hp.muon_eq_r, runtime=runtime)
    return Optimizers(muon=muon, adam=adam, banks=banks, replicated=tables + controls, runtime=runtime)


# -----------------------------------------------------------------------------
# QUANTISATION AND ARTIFACT
# -----------------------------------------------------------------------------
# What is submitted: the artifact (quantised weights) plus the bytes of the shipped
# train_gpt.py, together at most SIZE_LIMIT_BYTES.

SIZE_LIMIT_BYTES = 16_000_000

class ArtifactError(ValueError):
    """An artifact that cannot be loaded; the message names the file."""

# The shipped train_gpt.py is this file without comments and docstrings, LZMA2-compressed,
# base85-encoded and wrapped in three lines that unpack and run it (tools/pack.py writes
# it). The unpacked text is registered with linecache under its own name and tracebacks
# are printed through the traceback module (which reads linecache), so a traceback shows
# the unpacked lines, never the 30 KB blob. The pack step writes the readable
# source's hash into SOURCE_SHA256, so a log ties to the code that made it.
PACKED_HEADER = "import lzma as L,base64 as B,linecache as C,sys,traceback as T\n"
SOURCE_SHA256 = ""  # filled in by the pack step in the shipped file
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
PACK_STEP_ONLY = ("strip_source", "pack_source", "unpack_source")  # left out of the shipped file, which never runs them

def strip_source(source: str) -> str:
    """The same program without comments, docstrings, the annotations of functions and
    their variables (never evaluated: `from __future__ import annotations`; dataclass
    fields keep theirs) and the pack step's own functions, the source hash filled in."""
    import ast  # only the pack step needs it

    tree = ast.parse(source)
    tree.body = [node for node in tree.body if getattr(node, "name", None) not in PACK_STEP_ONLY]
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
        if isinstance(node, ast.FunctionDef):
            node.returns = None
            for argument in node.args.posonlyargs + node.args.args + node.args.kwonlyargs:
                argument.annotation = None
            for inner in ast.walk(node):  # `x: T = v` inside a function is just `x = v`
                for _, statements in ast.iter_fields(inner):
                    if isinstance(statements, list):
                        statements[:] = [ast.Assign([st.target], st.value, lineno=0) if isinstance(st, ast.AnnAssign)
                                         and st.value else st for st in statements]
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["SOURCE_SHA256"]:
            node.value = ast.Constant(hashlib.sha256(source.encode()).hexdigest())
    return ast.unparse(tree) + "\n"

def pack_source(source: str) -> str:
    """The three-line self-extracting form of the readable source."""
    payload = lzma.compress(strip_source(source).encode(), format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)
    encoded = base64.b85encode(payload).decode("ascii")  # base85 has no quote or backslash
    return (PACKED_HEADER + f'S=L.decompress(B.b85decode("{encoded}"),format=L.FORMAT_RAW,filters=[{{"id":L.FILTER_LZMA2}}]).decode()\n'
            'N=__file__+" (unpacked)";C.cache[N]=(len(S),None,S.splitlines(True),N);sys.excepthook=T.print_exception;'
            'exec(compile(S,N,"exec"))\n')

def unpack_source(packed: str) -> str:
    """The program a packed file runs."""
    encoded = packed.split('B.b85decode("', 1)[1].split('")', 1)[0]
    return lzma.decompress(base64.b85decode(encoded), format=lzma.FORMAT_RAW,
                           filters=[{"id": lzma.FILTER_LZMA2}]).decode()

@functools.cache
def running_code() -> tuple[str, str, int]:
    """(readable source sha256, shipped file sha256, shipped file bytes) of the code now
    running, either form (packing the readable source once per process)."""
    text = Path(__file__).read_text(encoding="utf-8")
    packed = text.startswith(PACKED_HEADER)
    shipped = (text if packed else pack_source(text)).encode()
    return SOURCE_SHA256 if packed else hashlib.sha256(text.encode()).hexdigest(), hashlib.sha256(shipped).hexdigest(), len(shipped)

# GPTQ int6. By default the reference's choices: per-row scales floored at 1/N (coarse
# grids for small rows, which is much of why its artifact compresses to ~4.5 bits per
# weight), a second 1% damping of H inside each matrix, and the clip quantile with the
# lowest plain squared error. GPTQ_FINE_SCALES=1 instead keeps every row's own
# resolution, damps once and picks the clip by Hessian-weighted error.
CLIP_QUANTILES = (0.999, 0.9995, 0.9999, 0.99999, 1.0)

def row_scales(weight: Tensor, quantile: float, clip_range: int, floor: bool) -> Tensor:
    """float32 per-row scales putting the row's |w| quantile on the grid edge, inside fp16's
    range (stored as fp16, a scale is never 0 or inf)."""
    magnitude = weight.abs()
    clip = magnitude.amax(dim=1) if quantile >= 1.0 else torch.quantile(magnitude, quantile, dim=1)
    return (clip / clip_range).clamp(1.0 / clip_range if floor else 2.0**-24, 65504.0)

def round_to_grid(weight: Tensor, scale: Tensor, clip_range: int) -> Tensor:
    return torch.clamp(torch.round(weight / scale.float()[:, None]), -clip_range, clip_range).to(torch.int8)

def dequantize_rows(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale.float()[:, None]

def squared_error(weight: Tensor, q: Tensor, scale: Tensor) -> float:
    return float((weight - dequantize_rows(q, scale)).square().sum())

def hessian_error(weight: Tensor, q: Tensor, scale: Tensor, hessian: Tensor) -> float:
    """tr(E H E^T) with E = W - dequant(Q): the loss increase GPTQ minimises."""
    error = weight - dequantize_rows(q, scale)
    return float(((error @ hessian) * error).sum())

def quantize_rows_int6(weight: Tensor, clip_range: int = 31, floor: bool = True) -> tuple[Tensor, Tensor]:
    """Per-row rounding; the clip quantile with the lowest squared error wins."""
    candidates = [(round_to_grid(weight, scale, clip_range), scale)
                  for scale in (row_scales(weight, quantile, clip_range, floor).half() for quantile in CLIP_QUANTILES)]
    return min(candidates, key=lambda candidate: squared_error(weight, *candidate))

def quantize_rows_int8(weight: Tensor, floor: bool = True, quantile: float = 0.9999984) -> tuple[Tensor, Tensor]:
    scale = row_scales(weight, quantile, 127, floor)  # as the record: rounded with the float32 scale, stored as fp16
    return round_to_grid(weight, scale, 127), scale.half()

def gptq_quantize(weight: Tensor, hessian: Tensor, clip_range: int = 31, block_size: int = 128,
                  fine: bool = False) -> tuple[Tensor, Tensor, bool]:
    """GPTQ (Frantar et al. 2023) to int6 rows; returns (q, scale, whether GPTQ was used).

    Columns go in order of decreasing H diagonal; each column's rounding error is fed
    forward to the columns not yet quantised through the upper Cholesky factor of H^-1.
    Every clip quantile is tried. If H is not positive definite, plain per-row rounding.
    """
    weight, hessian = weight.float(), hessian.float().clone()
    dead = hessian.diagonal() == 0  # inputs that never fire: any value is free
    hessian[dead, dead] = 1.0
    if not fine:
        hessian.diagonal().add_(0.01 * hessian.diagonal().mean())
    order = torch.argsort(hessian.diagonal(), descending=True)
    permuted_h = hessian[order][:, order]
    try:
        upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(permuted_h)), upper=True)
    except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
        upper = None
    if upper is None or not torch.isfinite(upper).all():
        return (*quantize_rows_int6(weight, clip_range, floor=not fine), False)
    permuted_w = weight[:, order].clone()
    permuted_w[:, dead[order]] = 0
    inverse_order = torch.argsort(order)
    candidates = []
    for quantile in CLIP_QUANTILES:
        scale = row_scales(weight, quantile, clip_range, floor=not fine).half()
        candidates.append((gptq_columns(permuted_w, upper, scale, clip_range, block_size)[:, inverse_order], scale))
    error = (lambda c: hessian_error(weight, *c, hessian)) if fine else (lambda c: squared_error(weight, *c))
    return (*min(candidates, key=error), True)

def gptq_columns(weight: Tensor, upper: Tensor, scale: Tensor, clip_range: int, block_size: int) -> Tensor:
    """The GPTQ sweep over (already permuted) columns, in blocks with lazy updates."""
    work = weight.clone()
    q = torch.zeros_like(work, dtype=torch.int8)
    scale_f = scale.float()
    for start in range(0, work.size(1), block_size):
        end = min(start + block_size, work.size(1))
        block = work[:, start:end].clone()
        errors = torch.zeros_like(block)
        for j in range(end - start):
            column = block[:, j]
            rounded = torch.clamp(torch.round(column / scale_f), -clip_range, clip_range)
            q[:, start + j] = rounded.to(torch.int8)
            errors[:, j] = (column - rounded * scale_f) / upper[start + j, start + j]
            block[:, j:] -= errors[:, j : j + 1] * upper[start + j, start + j : end][None, :]
        work[:, end:] -= errors @ upper[start:end, end:]
    return q

# Artifact format: magic, CRC-32 of the brotli stream (brotli has no checksum, so a
# flipped byte could otherwise decode to other weights), then brotli(quality 11) of
# [4-byte header length][JSON header][payload]. The header lists each tensor's dtype,
# shape and byte range, back to back over the whole payload; multi-byte tensors are
# byte-shuffled (all first bytes, then all second bytes...), which groups the similar
# high bytes of fp16 values and helps brotli. Loading never runs code.
ARTIFACT_MAGIC = b"PGOLF1\n"
ARTIFACT_DTYPES = {"int8": torch.int8, "float16": torch.float16, "float32": torch.float32}

def byte_shuffle(raw: bytes, width: int) -> bytes:
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, width).T.tobytes() if width > 1 else raw

def byte_unshuffle(raw: bytes, width: int) -> bytes:
    return np.frombuffer(raw, dtype=np.uint8).reshape(width, -1).T.tobytes() if width > 1 else raw

def artifact_payload(tensors: dict[str, Tensor], shuffle: bool = True) -> tuple[list[dict], bytes]:
    """The header's tensor entries and the payload bytes."""
    entries, chunks, offset = [], [], 0
    for name, tensor in tensors.items():
        raw = tensor.detach().cpu().contiguous().numpy().tobytes()
        chunks.append(byte_shuffle(raw, tensor.element_size()) if shuffle else raw)
        entries.append({"name": name, "dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape),
                        "offset": offset, "bytes": len(raw)})
        offset += len(raw)
    return entries, b"".join(chunks)

def encode_artifact(tensors: dict[str, Tensor], meta: dict[str, Any]) -> bytes:
    entries, payload = artifact_payload(tensors)
    header = json.dumps({"tensors": entries, "meta": meta}).encode()
    stream = brotli.compress(len(header).to_bytes(4, "little") + header + payload, quality=11)
    return ARTIFACT_MAGIC + zlib.crc32(stream).to_bytes(4, "little") + stream

def decode_artifact(blob: bytes, source: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    if not blob.startswith(ARTIFACT_MAGIC):
        raise ArtifactError(f"{source}: not a parameter-golf artifact (bad magic)")
    stream = blob[len(ARTIFACT_MAGIC) + 4:]
    if zlib.crc32(stream).to_bytes(4, "little") != blob[len(ARTIFACT_MAGIC) : len(ARTIFACT_MAGIC) + 4]:
        raise ArtifactError(f"{source}: truncated or corrupt (checksum mismatch)")
    try:
        body = brotli.decompress(stream)
        header_len = int.from_bytes(body[:4], "little")
        header = json.loads(body[4 : 4 + header_len])
        payload = memoryview(body)[4 + header_len:]
        tensors, expected_start = {}, 0
        for entry in header["tensors"]:
            dtype = ARTIFACT_DTYPES[entry["dtype"]]
            start, size, shape = int(entry["offset"]), int(entry["bytes"]), [int(n) for n in entry["shape"]]
            width = torch.empty((), dtype=dtype).element_size()
            if (start != expected_start or min(shape, default=0) < 0 or start + size > len(payload)
                    or size != math.prod(shape) * width):
                raise ValueError(f"tensor {entry['name']} lies outside the payload or has the wrong size")
            expected_start = start + size
            raw = bytearray(byte_unshuffle(bytes(payload[start : start + size]), width))
            tensor = torch.frombuffer(raw, dtype=dtype).reshape(shape) if raw else torch.empty(shape, dtype=dtype)
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f"tensor {entry['name']} holds NaN or infinite values")
            tensors[str(entry["name"])] = tensor
        if expected_start != len(payload):
            raise ValueError(f"{len(payload) - expected_start} payload bytes belong to no tensor")
        return tensors, dict(header["meta"])
    except brotli.error:
        raise ArtifactError(f"{source}: truncated or corrupt (brotli stream does not decode)") from None
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as error:
        raise ArtifactError(f"{source}: corrupt ({error})") from None

def read_artifact(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    try:
        blob = Path(path).read_bytes()
    except OSError as error:
        raise ArtifactError(f"{path}: cannot read artifact ({error.strerror})") from None
    return decode_artifact(blob, str(path))

# Which bank slice is which matrix, and which captured input its Hessian comes from
# (q, k and v read the same input, so they share one Hessian).
BANK_ROLES = {"q": ("qo_bank", 0, "qkv"), "out": ("qo_bank", 1, "out"), "k": ("kv_bank", 0, "qkv"),
              "v": ("kv_bank", 1, "qkv"), "up": ("mlp_up_bank", 0, "up"), "down": ("mlp_down_bank", 0, "down")}
SMALL_TENSOR_NUMEL = 65_536  # other tensors of at most this many values are stored as fp16

def bank_matrix_names(num_layers: int) -> list[str]:
    return [f"blocks.{layer}.{role}" for layer in range(num_layers) for role in BANK_ROLES]

def matrix_location(name: str, num_layers: int) -> tuple[str, int, str]:
    """(bank, index in the bank, Hessian key) of a matrix name like 'blocks.3.v'."""
    _, layer, role = name.split(".")
    bank, half, source = BANK_ROLES[role]
    return bank, half * num_layers + int(layer), f"blocks.{layer}.{source}"

def unbank(state: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """The state dict with the banks split into one 2-D matrix per layer and role."""
    matrices = {name: tensor for name, tensor in state.items() if name not in BANK_NAMES}
    for name in bank_matrix_names(num_layers):
        bank, index, _ = matrix_location(name, num_layers)
        matrices[name] = state[bank][index]
    return matrices

def rebank(matrices: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    names = bank_matrix_names(num_layers)
    state = {name: tensor for name, tensor in matrices.items() if name not in names}
    slots: dict[str, dict[int, Tensor]] = {bank: {} for bank in BANK_NAMES}
    for name in names:
        bank, index, _ = matrix_location(name, num_layers)
        slots[bank][index] = matrices[name]
    for bank, by_index in slots.items():
        state[bank] = torch.stack([by_index[i] for i in range(len(by_index))])
    return state

@torch.no_grad()
def collect_hessians(hp: Hyperparameters, model: GPT, runtime: Runtime) -> dict[str, Tensor]:
    """H = mean of X^T X for every linear input, over GPTQ_CALIB_SAMPLES training micro-batches
    per rank, averaged over ranks, plus 1% of the mean diagonal."""
    sampler = make_sampler(hp, runtime)
    records = model.capture_inputs(True)
    was_training = model.training
    model.eval()
    hessians: dict[str, Tensor] = {}
    batches = 0
    while batches < hp.gptq_calib_samples:
        for inputs, _ in sampler.next_step(runtime)[: hp.gptq_calib_samples - batches]:
            with runtime.autocast():
                model.forward_hidden(inputs)
            for layer, (attn_inputs, mlp_inputs) in enumerate(records):
                for key, x in {**attn_inputs, **mlp_inputs}.items():
                    x = x.float().flatten(0, -2)
                    name = f"blocks.{layer}.{key}"
                    hessians[name] = hessians.get(name, 0) + x.T @ x / x.size(0)
            batches += 1
    model.capture_inputs(False)
    model.train(was_training)
    for name, hessian in hessians.items():
        hessian = runtime.all_reduce_(hessian) / (batches * runtime.world_size)
        hessians[name] = hessian + 0.01 * hessian.diagonal().mean().clamp_min(1e-8) * torch.eye(len(hessian), device=hessian.device)
    return hessians

def quantize_state(hp: Hyperparameters, state: dict[str, Tensor], hessians: dict[str, Tensor],
                   runtime: Runtime) -> tuple[dict[str, Tensor], dict[str, str], int]:
    """GPTQ int6 for every block matrix, int8 rows for the other matrices of more than
    SMALL_TENSOR_NUMEL values, fp16 for the rest. The GPTQ matrices are shared out over
    the ranks and broadcast back, so every rank ends with the whole quantised state.
    Returns tensors, scheme per name, and how many matrices GPTQ quantised.

    The reference stores any tensor of at most SMALL_TENSOR_NUMEL values as fp16, block
    matrices included; at its sizes every block matrix is larger, so the two agree, and
    here small models (the embedded default, the tests) still go through GPTQ."""
    matrices = unbank(state, hp.num_layers)
    tensors: dict[str, Tensor] = {}
    schemes: dict[str, str] = {}
    gptq_names = bank_matrix_names(hp.num_layers)
    gptq_used = torch.zeros(len(gptq_names), device=runtime.device)
    for index, name in enumerate(gptq_names):
        weight, owner = matrices[name].float(), index % runtime.world_size
        if owner == runtime.rank:
            q, scale, used = gptq_quantize(weight, hessians[matrix_location(name, hp.num_layers)[2]], hp.quant_clip_range,
                                           fine=hp.gptq_fine_scales)
            gptq_used[index] = float(used)
        else:
            q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
            scale = torch.empty(weight.size(0), dtype=torch.float16, device=weight.device)
        runtime.broadcast_(q, owner)
        runtime.broadcast_(scale, owner)
        tensors[f"{name}.q"], tensors[f"{name}.scale"], schemes[name] = q, scale, "int6"
    for name, tensor in matrices.items():
        if name in schemes:
            continue
        if tensor.numel() > SMALL_TENSOR_NUMEL and tensor.ndim == 2:
            tensors[f"{name}.q"], tensors[f"{name}.scale"] = quantize_rows_int8(tensor.float(), floor=not hp.gptq_fine_scales)
            schemes[name] = "int8"
        else:
            tensors[name], schemes[name] = tensor.to(torch.float16), "fp16"
    return {k: v.cpu() for k, v in tensors.items()}, schemes, int(runtime.all_reduce_(gptq_used).sum())

def dequantize_state(tensors: dict[str, Tensor], schemes: dict[str, str], num_layers: int) -> dict[str, Tensor]:
    matrices = {}
    for name, scheme in schemes.items():
        if scheme == "fp16":
            matrices[name] = tensors[name].float()
        else:
            matrices[name] = dequantize_rows(tensors[f"{name}.q"], tensors[f"{name}.scale"])
    return rebank(matrices, num_layers)

@dataclass
class ArtifactReport:
    path: Path
    model_bytes: int
    code_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.model_bytes + self.code_bytes

    @property
    def over_limit(self) -> bool:
        return self.total_bytes > SIZE_LIMIT_BYTES

def export_artifact(hp: Hyperparameters, model: GPT, runtime: Runtime) -> ArtifactReport:
    """Calibrate, quantise, write the artifact (rank 0) and log the 16 MB accounting."""
    runtime.where = "during quantisation"
    for name, tensor in model.state_dict().items():
        if not torch.isfinite(tensor).all():
            raise RunFailure(f"the trained weights hold NaN or infinite values ({name}); nothing was exported")
    started = time.perf_counter()
    runtime.log(f"gptq:calibrating with {hp.gptq_calib_samples} batches (training data)...")
    hessians = collect_hessians(hp, model, runtime)
    runtime.log(f"gptq:calibrated {len(hessians)} layer inputs in {time.perf_counter() - started:.1f}s")
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    tensors, schemes, gptq_count = quantize_state(hp, state, hessians, runtime)
    for name, tensor in tensors.items():  # finite in float32 is not enough: fp16 ends at 65504
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise RunFailure(f"the trained weights do not fit the artifact ({name} overflows float16); nothing was exported")
    runtime.log(f"gptq_quantize: {gptq_count} GPTQ layers, {sum(s == 'int6' for s in schemes.values()) - gptq_count} "
                f"naive layers, {time.perf_counter() - started:.1f}s in all")
    path = Path(hp.artifact_path)
    model_bytes = torch.zeros((), dtype=torch.int64, device=runtime.device)
    if runtime.is_main:
        blob = encode_artifact(tensors, {"schemes": schemes, "model": model.config.function_fields()})
        write_atomic(path, blob)
        model_bytes += len(blob)
    report = ArtifactReport(path=path, model_bytes=int(runtime.all_reduce_(model_bytes)), code_bytes=running_code()[2])
    runtime.log(f"Serialized model int6+brotli: {report.model_bytes} bytes")
    runtime.log(f"Code size: {report.code_bytes} bytes")
    runtime.log(f"Total submission size int6+brotli: {report.total_bytes} bytes")
    if report.over_limit:
        runtime.log(f"SIZE LIMIT EXCEEDED: {report.total_bytes} bytes is {report.total_bytes - SIZE_LIMIT_BYTES} bytes "
                    f"over the {SIZE_LIMIT_BYTES} limit; this run cannot be submitted (exit status 1)")
    runtime.log(f"artifact: {path.resolve()}")
    return report

def load_quantized_model(config: ModelConfig, path: Path, runtime: Runtime) -> GPT:
    """A fresh model holding the dequantised artifact: what a submission would evaluate."""
    tensors, meta = read_artifact(path)
    stored, expected = meta.get("model", {}), config.function_fields()
    for key, value in expected.items():
        if stored.get(key) != value:
            raise ArtifactError(f"{path}: made with a model whose {key} is {stored.get(key)!r}, "
                                f"but these settings give {value!r}")
    model = GPT(config)
    try:
        model.load_state_dict(dequantize_state(tensors, meta["schemes"], config.num_layers))
    except (KeyError, RuntimeError) as error:
        raise ArtifactError(f"{path}: tensors do not fit the model ({error})") from None
    return model.to(runtime.device)


# -----------------------------------------------------------------------------
# EVALUATION
# -----------------------------------------------------------------------------
# Scores are bits per byte: NLL in nats / ln 2 / UTF-8 bytes of the scored text,
# summed in float64 over all ranks. "Ordinal" o is the prediction of token o+1 from
# tokens 0..o. The rule: evaluation-time adaptation may only use ordinals already
# scored. SLOT_MODE=shared (the reference's) breaks it; LEGAL_SLOT_MODES keep it.

LEGAL_SLOT_MODES = ("window", "batch_causal")

@dataclass
class TokenBytes:
    """Per-piece byte counts from the SentencePiece model."""
    base: Tensor  # UTF-8 bytes of the piece without its leading "▁" (byte pieces: 1)
    leading_space: Tensor  # the piece starts with "▁" (one more byte, unless after a boundary)
    boundary: Tensor  # control, unknown and unused pieces: no bytes, and no space after them

def build_token_bytes(tokenizer: Any, vocab_size: int, device: torch.device) -> TokenBytes:
    size = max(vocab_size, tokenizer.vocab_size())
    base, leading, boundary = np.zeros(size, np.int64), np.zeros(size, bool), np.ones(size, bool)
    for piece_id in range(tokenizer.vocab_size()):
        if tokenizer.is_control(piece_id) or tokenizer.is_unknown(piece_id) or tokenizer.is_unused(piece_id):
            continue
        boundary[piece_id] = False
        if tokenizer.is_byte(piece_id):
            base[piece_id] = 1
            continue
        piece = tokenizer.id_to_piece(piece_id)
        leading[piece_id] = piece.startswith("\u2581")
        base[piece_id] = len(piece.removeprefix("\u2581").encode("utf-8"))
    return TokenBytes(*(torch.tensor(array, device=device) for array in (base, leading, boundary)))

def count_bytes(token_bytes: TokenBytes, previous: Tensor, targets: Tensor) -> Tensor:
    space = token_bytes.leading_space[targets] & ~token_bytes.boundary[previous]
    return (token_bytes.base[targets] + space).double()

@dataclass
class EvalData:
    val_tokens: Tensor
    token_bytes: TokenBytes

@dataclass
class EvalResult:
    nll: float  # nats, summed
    tokens: float
    bytes: float
    seconds: float

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def bpb(self) -> float:
        return self.nll / math.log(2) / self.bytes

@dataclass
class ScoredBatch:
    """The scores of one batch: NLL of each position, and which positions count."""
    nll: Tensor  # [B, P] nats
    scored: Tensor  # [B, P] bool
    ordinals: Tensor  # [B, P] the ordinal each position predicts
    previous: Tensor  # [B, P] input token at the position (for the byte count)
    targets: Tensor  # [B, P]
    count: int  # scored positions, known on the host

class ScoreSum:
    """Running float64 sums of NLL and bytes on this rank; tokens counted on the host."""

    def __init__(self, runtime: Runtime, token_bytes: TokenBytes):
        self.runtime, self.token_bytes, self.started = runtime, token_bytes, time.perf_counter()
        self.sums = torch.zeros(2, dtype=torch.float64, device=runtime.device)
        self.tokens = 0

    def add(self, batch: ScoredBatch) -> None:
        weight = batch.scored.double()
        self.sums += torch.stack(((batch.nll.double() * weight).sum(),
                                  (count_bytes(self.token_bytes, batch.previous, batch.targets) * weight).sum()))
        self.tokens += batch.count

    def result(self) -> EvalResult:
        totals = torch.cat((self.sums, self.sums.new_tensor([float(self.tokens)])))
        nll, byte_count, tokens = self.runtime.all_reduce_(totals).tolist()
        return EvalResult(nll, tokens, byte_count, time.perf_counter() - self.started)

def rank_share(items: list, runtime: Runtime) -> list:
    """A contiguous 1/world_size of the items."""
    return items[len(items) * runtime.rank // runtime.world_size : len(items) * (runtime.rank + 1) // runtime.world_size]

def padded_rows(val_tokens: Tensor, starts: list[int], ends: list[int], rows: int, length: int,
                runtime: Runtime) -> tuple[Tensor, Tensor]:
    """(inputs, targets) [rows, length] on the device: tokens[start:end] and the tokens one
    later, zero-padded after end - start (as the record pads its short windows, which
    shared SLOT fits on). Compiled runs pad every batch to one shape, so a graph is never
    rebuilt for a short last batch. Both are copied at once (a pinned copy never waits)."""
    batch = torch.zeros(2, rows, length, dtype=torch.int64)
    for row, (start, end) in enumerate(zip(starts, ends)):
        batch[0, row, : end - start] = val_tokens[start:end]
        batch[1, row, : end - start] = val_tokens[start + 1 : end + 1]
    batch = runtime.to_device(batch)
    return batch[0], batch[1]

@torch.no_grad()
def evaluate_standard(model: GPT, val_tokens: Tensor, seq_len: int, batch_tokens: int, token_bytes: TokenBytes,
                      runtime: Runtime, token_nll: Callable | None = None) -> EvalResult:
    """Non-overlapping sequences of seq_len, each position scored with what precedes it in
    its sequence. token_nll: the model's token_nll, compiled where the caller compiled it."""
    was_training = model.training
    model.eval()
    token_nll = token_nll or model.token_nll
    score = ScoreSum(runtime, token_bytes)
    starts = rank_share(list(range(0, val_tokens.numel() - seq_len, seq_len)), runtime)
    per_batch = max(1, batch_tokens // (seq_len * runtime.world_size * runtime.accum_steps))  # as the record splits it
    positions = torch.arange(seq_len, device=runtime.device)
    for first in range(0, len(starts), per_batch):
        chunk = starts[first : first + per_batch]
        rows = per_batch if runtime.compile_enabled else len(chunk)
        inputs, targets = padded_rows(val_tokens, chunk, [s + seq_len for s in chunk], rows, seq_len, runtime)
        with runtime.autocast():
            nll = token_nll(inputs, targets)
        ordinals = runtime.to_device(torch.tensor(chunk + [0] * (rows - len(chunk))))[:, None] + positions
        scored = (torch.arange(rows, device=runtime.device) < len(chunk))[:, None].expand_as(nll)
        score.add(ScoredBatch(nll, scored, ordinals, inputs, targets, len(chunk) * seq_len))
    model.train(was_training)
    return score.result()

class Window(NamedTuple):
    start: int  # first input position
    end: int  # one past the last ordinal (end - start <= seq_len)
    first: int  # first ordinal this window scores

def sliding_windows(num_ordinals: int, seq_len: int, stride: int) -> list[Window]:
    """Every ordinal scored exactly once: window k ends at min(seq_len + k*stride, N), is
    seq_len long where the data allows, and scores the ordinals after the previous
    window's end: all of the first window, then `stride` new ordinals per window, each
    with at least seq_len - stride of context."""
    windows, scored_to = [], 0
    while scored_to < num_ordinals:
        end = min(max(scored_to + stride, seq_len), num_ordinals)
        windows.append(Window(max(end - seq_len, 0), end, scored_to))
        scored_to = end
    return windows

def reference_windows(num_ordinals: int, seq_len: int, stride: int) -> list[Window]:
    """The reference's layout, for SLOT_MODE=shared: a window starts every `stride`
    ordinals; windows that run past the end are cut short and each scores the last
    `stride` ordinals of the data again (so those count several times)."""
    windows = []
    for start in range(0, num_ordinals, stride):
        end = min(start + seq_len, num_ordinals)
        windows.append(Window(start, end, start if start == 0 else max(end - stride, start)))
    return windows

def slot_objective(model: GPT, hidden: Tensor, delta: Tensor, targets: Tensor, weights: Tensor, in_bf16: bool) -> Tensor:
    """Weighted cross-entropy of the head on hidden + delta (what SLOT minimises)."""
    adapted = hidden + delta
    logits = model.logits(adapted.to(torch.bfloat16) if in_bf16 else adapted).float()
    return (F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none") * weights.flatten()).sum()

def fit_slot_delta(objective: Callable, model: GPT, hidden: Tensor, targets: Tensor, context: Tensor,
                   hp: Hyperparameters, runtime: Runtime) -> Tensor:
    """Context-only SLOT: an additive vector on the final hidden states, fitted by AdamW to
    the context targets (already scored ordinals) with the model frozen. One delta per
    window in `window` mode, one per batch otherwise."""
    per_window = hp.slot_mode == "window"
    delta = torch.zeros(hidden.size(0) if per_window else 1, 1, hidden.size(-1), device=hidden.device, requires_grad=True)
    optimizer = torch.optim.AdamW([delta], lr=hp.slot_lr, weight_decay=1e-8, eps=1e-5)
    weights = context.float()
    weights = weights / weights.sum(1 if per_window else (0, 1), keepdim=True).clamp_min(1)  # a mean per window, or per batch
    for _ in range(hp.slot_steps):
        optimizer.zero_grad(set_to_none=True)
        with runtime.autocast():
            loss = objective(model, hidden, delta, targets, weights, hp.slot_mode == "shared")
        loss.backward()
        optimizer.step()
    return delta.detach()

def context_limits(windows: list[Window], mode: str, seq_len: int, stride: int) -> list[int]:
    """Per window, the positions [0, limit) whose targets a SLOT delta may be fitted on.

    window: the window's own already-scored ordinals. batch_causal: only ordinals that
    an earlier batch scored. shared: the reference's [0, seq_len - stride - 1) of
    every window, the first window and padded positions included (not causal).
    """
    if mode == "shared":
        return [max(seq_len - stride, 1) - 1] * len(windows)
    limit = min(w.first for w in windows) if mode == "batch_causal" else None
    return [max((limit if limit is not None else w.first) - w.start, 0) for w in windows]

def sliding_scores(model: GPT, val_tokens: Tensor, windows: list[Window], hp: Hyperparameters, runtime: Runtime,
                   slot: bool, hidden_fn: Callable | None = None, objective: Callable | None = None) -> Iterator[ScoredBatch]:
    """Score this rank's windows in batches of EVAL_BATCH_SEQS (the last one padded), with
    context-only SLOT when asked. The model is frozen; yields one ScoredBatch per batch."""
    length, capacity = hp.eval_seq_len, hp.eval_batch_seqs
    hidden_fn = hidden_fn or model.forward_hidden
    positions = torch.arange(length, device=runtime.device)
    for first in range(0, len(windows), capacity):
        batch = windows[first : first + capacity]
        rows = capacity if runtime.compile_enabled else len(batch)
        inputs, targets = padded_rows(val_tokens, [w.start for w in batch], [w.end for w in batch], rows, length, runtime)
        starts, ends, firsts = (runtime.to_device(torch.tensor([w[k] for w in batch] + [0] * (rows - len(batch)))) for k in range(3))
        with torch.no_grad(), runtime.autocast():
            hidden = hidden_fn(inputs)
        if slot:
            limits = runtime.to_device(torch.tensor(context_limits(batch, hp.slot_mode, length, hp.eval_stride) + [0] * (rows - len(batch))))
            hidden = hidden.float()
            with torch.enable_grad():
                delta = fit_slot_delta(objective or slot_objective, model, hidden, targets, positions < limits[:, None], hp, runtime)
            hidden = hidden + delta
            if hp.slot_mode == "shared":
                hidden = hidden.to(torch.bfloat16)
        offset = min(w.first - w.start for w in batch)  # only positions some window scores get logits
        with torch.no_grad(), runtime.autocast():
            logits = model.logits(hidden[:, offset:]).float()
        tail = slice(offset, None)
        nll = F.cross_entropy(logits.flatten(0, 1), targets[:, tail].flatten(), reduction="none").view(rows, -1)
        ordinals = starts[:, None] + positions[tail]
        scored = (ordinals >= firsts[:, None]) & (ordinals < ends[:, None])
        yield ScoredBatch(nll, scored, ordinals, inputs[:, tail], targets[:, tail], sum(w.end - w.first for w in batch))

def evaluation_windows(hp: Hyperparameters, num_ordinals: int, slot: bool) -> list[Window]:
    layout = reference_windows if slot and hp.slot_mode == "shared" else sliding_windows
    return layout(num_ordinals, hp.eval_seq_len, hp.eval_stride)

def evaluate_sliding(model: GPT, data: EvalData, hp: Hyperparameters, runtime: Runtime, slot: bool) -> EvalResult:
    """Sliding-window evaluation, optionally with context-only SLOT."""
    trainable = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval().requires_grad_(False)
    windows = rank_share(evaluation_windows(hp, data.val_tokens.numel() - 1, slot), runtime)
    total = -(-len(windows) // hp.eval_batch_seqs)
    progress, score = Progress(runtime, "sliding evaluation batches", total), ScoreSum(runtime, data.token_bytes)
    scores = sliding_scores(model, data.val_tokens, windows, hp, runtime, slot, runtime.compile(model.forward_hidden),
                            runtime.compile(slot_objective))
    for done, batch in enumerate(scores, 1):
        score.add(batch)
        progress.update(done)
    model.train(was_training)
    for param, flag in zip(model.parameters(), trainable):
        param.requires_grad_(flag)
    return score.result()

def ttt_scores(model: GPT, val_tokens: Tensor, hp: Hyperparameters, runtime: Runtime,
               progress: Progress | None = None) -> Iterator[ScoredBatch]:
    """Score-first test-time training on a copy of the model: each chunk's windows are
    scored first, then the copy trains on that chunk's (now scored) tokens, so no score
    depends on a token after it. The caller's model is left unchanged."""
    model = copy.deepcopy(model)
    num_ordinals = val_tokens.numel() - 1
    chunks: list[list[Window]] = [[] for _ in range(-(-num_ordinals // hp.ttt_chunk_tokens))]
    for window in sliding_windows(num_ordinals, hp.eval_seq_len, hp.eval_stride):  # by its first scored ordinal
        chunks[min(window.first // hp.ttt_chunk_tokens, len(chunks) - 1)].append(window)
    frozen = tuple(f"blocks.{i}." for i in range(hp.ttt_freeze_blocks))
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith(frozen))
        if param.requires_grad:
            param.grad = torch.zeros_like(param)  # zeroed in place each batch, averaged as one set
            params.append(param)
    optimizer = torch.optim.SGD(params, lr=hp.ttt_lr, momentum=hp.ttt_momentum)
    runtime.log(f"ttt_sliding:start chunks={len(chunks)} chunk_tokens={hp.ttt_chunk_tokens} stride={hp.eval_stride} "
                f"ttt_lr={hp.ttt_lr} ttt_epochs={hp.ttt_epochs} freeze_blocks={hp.ttt_freeze_blocks} "
                f"unfrozen={sum(p.numel() for p in params)} frozen={sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in params)}")
    hidden_fn, train_forward = runtime.compile(model.forward_hidden), runtime.compile(model)
    for index, windows in enumerate(chunks):
        model.eval()
        yield from sliding_scores(model, val_tokens, rank_share(windows, runtime), hp, runtime, False, hidden_fn)
        if index < len(chunks) - 1:
            chunk_end = min((index + 1) * hp.ttt_chunk_tokens, num_ordinals)
            lr = hp.ttt_lr * 0.5 * (1 + math.cos(math.pi * index / max(len(chunks) - 1, 1)))
            train_on_chunk(model, train_forward, params, optimizer, val_tokens, index * hp.ttt_chunk_tokens,
                           chunk_end, lr, hp, runtime)
        if progress is not None:
            progress.update(index + 1)

def train_on_chunk(model: GPT, train_forward: Callable, params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                   val_tokens: Tensor, chunk_start: int, chunk_end: int, lr: float, hp: Hyperparameters,
                   runtime: Runtime) -> None:
    """TTT_EPOCHS of SGD on the chunk's whole sequences (targets stay inside the chunk).

    Batches are the same whatever the world size; each rank takes its share of every
    batch (possibly none) and the gradients are averaged, weighted by sequences, so the
    update is the batch mean and every rank runs the same collectives.
    """
    length = hp.eval_seq_len
    starts = list(range(chunk_start, chunk_end - length + 1, length))
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.train()
    for _ in range(hp.ttt_epochs):
        for first in range(0, len(starts), hp.ttt_batch_seqs):
            batch = starts[first : first + hp.ttt_batch_seqs]
            mine = rank_share(batch, runtime)
            optimizer.zero_grad(set_to_none=False)
            if mine:
                rows = runtime.to_device(torch.stack([val_tokens[s : s + length + 1] for s in mine]))
                with runtime.autocast():
                    loss = train_forward(rows[:, :-1], rows[:, 1:])
                (loss * len(mine) * runtime.world_size / len(batch)).backward()
            runtime.mean_([param.grad for param in params])
            torch.nn.utils.clip_grad_norm_(params, hp.ttt_grad_clip)
            optimizer.step()

def evaluate_ttt(model: GPT, data: EvalData, hp: Hyperparameters, runtime: Runtime) -> EvalResult:
    score = ScoreSum(runtime, data.token_bytes)
    progress = Progress(runtime, "TTT chunks", -(-(data.val_tokens.numel() - 1) // hp.ttt_chunk_tokens))
    for batch in ttt_scores(model, data.val_tokens, hp, runtime, progress):
        score.add(batch)
    return score.result()

def log_result(runtime: Runtime, name: str, result: EvalResult, extra: str = "") -> None:
    runtime.log(f"{name} val_loss:{result.loss:.4f} val_bpb:{result.bpb:.4f} {extra}eval_time:{1000 * result.seconds:.0f}ms")
    runtime.log(f"{name}_exact val_loss:{result.loss:.8f} val_bpb:{result.bpb:.8f}")

def evaluate_artifact(hp: Hyperparameters, model: GPT, data: EvalData, runtime: Runtime) -> EvalResult:
    """Round trip, sliding window (with SLOT when enabled), TTT when enabled; logs and
    returns the score that counts, with whether it is legal."""
    runtime.where = "during evaluation"
    roundtrip = evaluate_standard(model, data.val_tokens, hp.eval_seq_len, hp.val_batch_size, data.token_bytes,
                                  runtime, runtime.compile(model.token_nll))
    log_result(runtime, "final_int6_roundtrip", roundtrip)
    slot = hp.slot_enabled and hp.slot_steps > 0
    legal = not slot or hp.slot_mode in LEGAL_SLOT_MODES
    if not legal:
        runtime.log("slot:mode shared is NOT causal (later windows' context holds earlier windows' scored tokens): "
                    "not a legal score")
    sliding = evaluate_sliding(model, data, hp, runtime, slot)
    log_result(runtime, "final_int6_sliding_window", sliding, f"stride:{hp.eval_stride} ")
    counted, name, seconds = sliding, "final_int6_sliding_window_exact", roundtrip.seconds + sliding.seconds
    if hp.ttt_enabled:
        ttt = evaluate_ttt(model, data, hp, runtime)
        log_result(runtime, "legal_ttt", ttt)
        counted, name, seconds, legal = ttt, "legal_ttt_exact", seconds + ttt.seconds, True
    runtime.log(f"final_score {name} val_bpb:{counted.bpb:.8f} slot:{hp.slot_mode if slot else 'off'} "
                f"legal:{'yes' if legal else 'no'} eval_total_time:{1000 * seconds:.0f}ms")
    if not math.isfinite(counted.bpb):
        raise RunFailure(f"the final score is not finite ({counted.bpb}); the artifact is not usable")
    return counted


# -----------------------------------------------------------------------------
# TRAINING LOOP
# -----------------------------------------------------------------------------

def lr_multiplier(hp: Hyperparameters, step: int, elapsed_ms: float, cap_ms: float | None) -> float:
    """1 until the last WARMDOWN_ITERS steps, then linear to 0.

    With a wall-clock cap the warmdown is measured in time: it starts when the time
    left is less than WARMDOWN_ITERS average steps, so it ends exactly at the cap.
    """
    if hp.warmdown_iters <= 0:
        return 1.0
    if cap_ms is None:
        return min(max((hp.iterations - step) / hp.warmdown_iters, 0.0), 1.0)
    warmdown_ms = hp.warmdown_iters * elapsed_ms / max(step, 1)
    remaining_ms = max(cap_ms - elapsed_ms, 0.0)
    return min(remaining_ms / max(warmdown_ms, 1e-9), 1.0)

def muon_momentum_at(hp: Hyperparameters, step: int) -> float:
    fraction = min(step / hp.muon_momentum_warmup_steps, 1.0) if hp.muon_momentum_warmup_steps > 0 else 1.0
    return (1 - fraction) * hp.muon_momentum_warmup_start + fraction * hp.muon_momentum

class ExponentialMovingAverage:
    """fp32 EMA of every parameter, updated each step, copied in before export."""

    def __init__(self, model: nn.Module, decay: float):
        self.params = list(model.parameters())
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1 - self.decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for param, average in zip(self.params, self.shadow):
            param.copy_(average)

QAT_RAMP_STEPS, QAT_FINAL_SHARPNESS = 500, 16.0

class LateQAT:
    """Fake-quantises the small projections once the LR multiplier falls below the threshold.

    As in the reference, the step that first ran below the threshold (at or after
    LATE_QAT_MIN_STEP) switches it on for the next step; the rounding sharpness then goes
    from 1 to 16 over 500 steps. It lives in a tensor so torch.compile sees one graph.
    """

    def __init__(self, hp: Hyperparameters, model: GPT, runtime: Runtime):
        self.hp, self.model, self.runtime = hp, model, runtime
        self.sharpness = torch.ones((), device=runtime.device)
        self.start_step: int | None = None

    def switch(self, on: bool) -> None:
        for layer in self.model.qat_layers():
            layer.qat_sharpness = self.sharpness if on else None

    def after_step(self, steps_done: int, lr_mul: float) -> None:
        """Called once `steps_done` steps have run, the last one at `lr_mul`."""
        hp = self.hp
        if self.start_step is None:
            if hp.late_qat_threshold <= 0 or lr_mul >= hp.late_qat_threshold or steps_done < hp.late_qat_min_step:
                return
            self.start_step = steps_done
            self.switch(True)
            self.runtime.log(f"late_qat:enabled step:{steps_done} scale:{lr_mul:.4f}")
        progress = min((steps_done - self.start_step) / QAT_RAMP_STEPS, 1.0)
        self.sharpness.fill_(1.0 + (QAT_FINAL_SHARPNESS - 1.0) * progress)

class StopSignals:
    """Per-step stop flags (non-finite loss, time cap reached), agreed by all ranks.

    On CUDA the flags are read one step late through a pinned copy and an event, so
    checking them never stalls the GPU queue.
    """

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.in_flight: tuple[int, Tensor, Any] | None = None

    def push(self, step: int, loss: Tensor, cap_reached: bool) -> tuple[int, bool, bool] | None:
        """Queue this step's flags; return (step, loss_not_finite, cap_reached) of the oldest unread."""
        # new_full launches a fill kernel: no host-to-device copy that could stall the queue
        flags = torch.stack(((~torch.isfinite(loss.detach())).float(), loss.new_full((), float(cap_reached))))
        self.runtime.all_reduce_(flags, "max")
        event = None
        if flags.is_cuda:
            host = torch.empty(2, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            flags = host
        if event is None:  # CPU: the values are already here
            return self.read((step, flags, None))
        previous, self.in_flight = self.in_flight, (step, flags, event)
        return self.read(previous) if previous is not None else None

    @staticmethod
    def read(pending: tuple[int, Tensor, Any]) -> tuple[int, bool, bool]:
        step, flags, event = pending
        if event is not None:
            event.synchronize()
        not_finite, cap = flags.tolist()
        return step, bool(not_finite), bool(cap)

def train_step(train_model: Callable, optimizers: Optimizers, batches: list[tuple[Tensor, Tensor]],
               hp: Hyperparameters, runtime: Runtime) -> Tensor:
    """One optimiser step over this rank's micro-batches; returns the mean loss (a tensor)."""
    optimizers.zero_grad()
    total = torch.zeros((), device=runtime.device)
    for inputs, targets in batches:
        with runtime.autocast():
            loss = train_model(inputs, targets)
        (loss / len(batches)).backward()
        total += loss.detach()
    optimizers.step(hp.grad_clip_norm)
    return total / len(batches)

def warm_up_and_reset(hp: Hyperparameters, model: GPT, train_model: Callable, optimizers: Optimizers,
                      qat: LateQAT, runtime: Runtime) -> None:
    """Run WARMUP_STEPS real steps to compile and prime kernels, then undo them: weights and
    optimiser state return to their initial values (the caller starts a fresh sampler).

    The last warm-up step runs with late QAT on, so its graph is compiled now rather
    than in the middle of the timed run.
    """
    if hp.warmup_steps <= 0:
        return
    initial_weights = {name: t.detach().clone() for name, t in model.state_dict().items()}
    initial_states = [copy.deepcopy(optimizer.state_dict()) for optimizer in optimizers.all()]
    sampler = make_sampler(hp, runtime)
    for step in range(hp.warmup_steps):
        if step == hp.warmup_steps - 1 and hp.late_qat_threshold > 0:
            qat.switch(True)
        train_step(train_model, optimizers, sampler.next_step(runtime), hp, runtime)
        runtime.log(f"warmup_step:{step + 1}/{hp.warmup_steps}")
    qat.switch(False)
    model.load_state_dict(initial_weights)
    for optimizer, state in zip(optimizers.all(), initial_states):
        optimizer.load_state_dict(state)
    optimizers.zero_grad()

def train(hp: Hyperparameters, model: GPT, data: EvalData, runtime: Runtime,
          clock: Callable[[], float] = time.perf_counter) -> None:
    """The timed loop: LR schedule, EMA, late QAT, periodic validation, stop at the cap.

    Ends with the EMA weights in the model and their validation score logged. `clock`
    (seconds) is the wall clock; tests pass a fake one.
    """
    train_model = runtime.compile(model)
    validation_nll = runtime.compile(model.token_nll)
    optimizers = build_optimizers(hp, model, runtime)
    qat = LateQAT(hp, model, runtime)
    runtime.where = "during warm-up"
    warm_up_and_reset(hp, model, train_model, optimizers, qat, runtime)
    sampler = make_sampler(hp, runtime)
    ema = ExponentialMovingAverage(model, hp.ema_decay)
    signals = StopSignals(runtime)
    cap_ms = None
    if hp.max_wallclock_seconds > 0:
        cap_ms = 1000.0 * hp.max_wallclock_seconds - hp.gptq_reserve_ms
        runtime.log(f"gptq:reserving {hp.gptq_reserve_ms:.0f}ms from training budget, effective={cap_ms:.0f}ms")
    stop_ms = min(cap_ms or math.inf, 1000.0 * hp.safety_cap_seconds or math.inf)
    progress = Progress(runtime, "training steps", hp.iterations)
    training_ms, step, stop_after = 0.0, 0, None
    runtime.synchronize()
    started = clock()
    while True:
        runtime.where = f"during training at step {step}"
        last_step = step == hp.iterations or (stop_after is not None and step >= stop_after)
        if last_step or (hp.val_loss_every > 0 and step % hp.val_loss_every == 0):
            runtime.synchronize()
            training_ms += 1000.0 * (clock() - started)
            result = evaluate_standard(model, data.val_tokens, hp.train_seq_len, hp.val_batch_size,
                                       data.token_bytes, runtime, validation_nll)
            runtime.log(f"step:{step}/{hp.iterations} val_loss:{result.loss:.4f} val_bpb:{result.bpb:.4f} "
                        f"train_time:{training_ms:.0f}ms step_avg:{training_ms / max(step, 1):.2f}ms")
            started = clock()
        if last_step:
            if stop_after is not None and step < hp.iterations:
                reason = "wallclock_cap" if stop_ms == cap_ms else "safety_cap"
                runtime.log(f"stopping_early: {reason} train_time:{training_ms:.0f}ms step:{step}/{hp.iterations}")
                if reason == "safety_cap":
                    runtime.log("warning: SAFETY_CAP_SECONDS stopped training before ITERATIONS; this score depends on "
                                "the machine's speed")
            break
        elapsed_ms = training_ms + 1000.0 * (clock() - started)
        lr_mul = lr_multiplier(hp, step, elapsed_ms, cap_ms)
        optimizers.set_schedule(lr_mul, muon_momentum_at(hp, step))
        loss = train_step(train_model, optimizers, sampler.next_step(runtime), hp, runtime)
        ema.update()
        step += 1
        qat.after_step(step, lr_mul)
        elapsed_ms = training_ms + 1000.0 * (clock() - started)
        signal = signals.push(step, loss, elapsed_ms >= stop_ms)
        if hp.train_log_every > 0 and (step <= 10 or step % hp.train_log_every == 0):
            mean_loss = runtime.all_reduce_(loss.detach().clone()) / runtime.world_size
            runtime.log(f"step:{step}/{hp.iterations} train_loss:{mean_loss.item():.4f} "
                        f"train_time:{elapsed_ms:.0f}ms step_avg:{elapsed_ms / step:.2f}ms")
        progress.update(step, max(min((hp.iterations - step) * elapsed_ms / step, stop_ms - elapsed_ms), 0.0) / 1000.0)
        if signal is not None:
            flagged_step, not_finite, cap_reached = signal
            if not_finite:
                raise RunFailure(f"training loss is not finite at step {flagged_step}; stopping "
                                 f"(lower the LRs or check the data)")
            if cap_reached and stop_after is None:
                stop_after = step
    if runtime.device.type == "cuda":
        runtime.log(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
                    f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
    runtime.log("ema:applying EMA weights")
    ema.copy_to_model()
    qat.switch(False)
    result = evaluate_standard(model, data.val_tokens, hp.train_seq_len, hp.val_batch_size, data.token_bytes, runtime,
                               validation_nll)
    runtime.log(f"DIAGNOSTIC post_ema val_loss:{result.loss:.4f} val_bpb:{result.bpb:.4f} eval_time:{1000 * result.seconds:.0f}ms")


# -----------------------------------------------------------------------------
# MAIN
# -----------------------------------------------------------------------------

def environ_with_profile() -> dict[str, str]:
    """The environment, switched to the embedded default when there is nothing to train on.

    With neither SMOKE nor DATA_PATH set and no shards at the default path, a bare
    `python train_gpt.py` runs the small embedded default instead of failing.
    """
    environ = dict(os.environ)
    if "SMOKE" not in environ and "DATA_PATH" not in environ and not glob.glob(Hyperparameters().train_files):
        print(f"smoke: no FineWeb under {Hyperparameters().data_path}: running the embedded default (SMOKE=1); "
              "tools/download_fineweb.py gets FineWeb", flush=True)
        environ["SMOKE"] = "1"
    return environ

def load_tokenizer(hp: Hyperparameters) -> Any:
    path = bundled_file(hp.tokenizer_path)
    if not path.exists():
        raise ConfigError(f"TOKENIZER_PATH={hp.tokenizer_path!r} is not allowed: no such file")
    try:
        tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as error:
        raise ConfigError(f"TOKENIZER_PATH={str(path)!r} is not allowed: not a SentencePiece model ({error})") from None
    if tokenizer.vocab_size() != hp.vocab_size:
        raise ConfigError(f"VOCAB_SIZE={hp.vocab_size} is not allowed: the tokenizer {path} has "
                          f"{tokenizer.vocab_size()} pieces")
    return tokenizer

def load_data(hp: Hyperparameters, runtime: Runtime) -> EvalData:
    """The tokenizer's byte table and the validation tokens; every shard checked."""
    tokenizer = load_tokenizer(hp)
    if hp.smoke and hp.data_path == SMOKE_PROFILE["data_path"] and runtime.is_main:
        build_smoke_corpus(hp.data_path, tokenizer)  # only into its own folder, never over a file
    runtime.barrier()  # every rank waits for the corpus, whoever built it
    val_tokens = load_validation_tokens(hp.val_files, max(hp.train_seq_len, hp.eval_seq_len), hp.vocab_size, runtime)
    train_paths = shard_paths(hp.train_files)
    train_shards = [read_shard(path) for path in train_paths]
    check_vocabulary(train_shards, train_paths, hp.vocab_size, runtime)
    runtime.log(f"val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path={hp.tokenizer_path}")
    runtime.log(f"train_loader:dataset:{Path(hp.data_path).name} train_shards:{len(train_paths)} "
                f"tokens:{sum(shard.size for shard in train_shards)}")
    runtime.log(f"val_loader:shards pattern={hp.val_files} tokens:{val_tokens.numel() - 1}")
    return EvalData(val_tokens=val_tokens, token_bytes=build_token_bytes(tokenizer, hp.vocab_size, runtime.device))

def gpu_description(device: torch.device) -> str:
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10).stdout.split("\n")[0].strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        driver = "unknown"
    major, minor = torch.cuda.get_device_capability(device)
    return f"gpu:{torch.cuda.get_device_name(device)} capability:{major}.{minor} driver:{driver} cuda:{torch.version.cuda}"

def log_run_header(hp: Hyperparameters, runtime: Runtime) -> None:
    """What ties the log to its code, settings and machine."""
    source_hash, shipped_hash, _ = running_code()
    runtime.log(f"code: source_sha256:{source_hash[:16]} shipped_sha256:{shipped_hash[:16]}")
    runtime.log(f"settings_changed: {changed_settings(hp)}")
    for warning in misspelled_settings(dict(os.environ)):
        runtime.log(warning)
    if runtime.device.type == "cuda":
        runtime.log(f"hardware: {runtime.world_size}x{torch.cuda.get_device_name(runtime.device)}")
        runtime.log(gpu_description(runtime.device))
    else:
        runtime.log(f"hardware: {runtime.world_size}xCPU ({os.cpu_count()} cores)")
    runtime.log(f"torch:{torch.__version__} python:{sys.version.split()[0]}")
    runtime.log(f"seed:{hp.seed}")
    if Path(hp.artifact_path).exists():
        runtime.log(f"artifact: {hp.artifact_path} exists (an earlier run's); this run replaces it "
                    "(set ARTIFACT_PATH to keep it)")

def log_model(hp: Hyperparameters, model: GPT, runtime: Runtime) -> None:
    runtime.log(f"model_params:{sum(p.numel() for p in model.parameters())}")
    runtime.log(f"XSA:last_{hp.xsa_last_n} active_layers:{[i for i, block in enumerate(model.blocks) if block.attn.use_xsa]}")
    runtime.log(f"world_size:{runtime.world_size} grad_accum_steps:{runtime.accum_steps}")
    backend = "flash_attention_3" if FLASH_ATTENTION_3 is not None else "sdpa"
    runtime.log(f"attention_backend:{backend} attention_mode:gqa num_heads:{hp.num_heads} num_kv_heads:{hp.num_kv_heads}")
    runtime.log(f"tie_embeddings:True embed_lr:{hp.tied_embed_lr} head_lr:0.0 matrix_lr:{hp.matrix_lr} scalar_lr:{hp.scalar_lr}")
    runtime.log(f"train_batch_tokens:{hp.train_batch_tokens} train_seq_len:{hp.train_seq_len} "
                f"iterations:{hp.iterations} warmup_steps:{hp.warmup_steps} "
                f"max_wallclock_seconds:{hp.max_wallclock_seconds:.3f} safety_cap_seconds:{hp.safety_cap_seconds:.3f}")

def explain_score(hp: Hyperparameters, score: EvalResult, runtime: Runtime) -> None:
    """For the embedded default: what the number means and what to expect."""
    runtime.log(f"result: {score.bpb:.4f} bits per byte of held-out text (lower is better; guessing uniformly "
                f"scores {math.log2(hp.vocab_size) * score.tokens / score.bytes:.2f}; SEED=1337 gives {SMOKE_EXPECTED_BPB:.2f})")

def run(hp: Hyperparameters, runtime: Runtime) -> int:
    """The whole run as phases; returns the exit status."""
    log_run_header(hp, runtime)
    data = load_data(hp, runtime)
    model = GPT(ModelConfig.from_settings(hp)).to(runtime.device)
    log_model(hp, model, runtime)
    train(hp, model, data, runtime)
    report = export_artifact(hp, model, runtime)
    quantized = load_quantized_model(model.config, report.path, runtime)
    score = evaluate_artifact(hp, quantized, data, runtime)
    if hp.smoke:
        explain_score(hp, score, runtime)
    runtime.log(f"log: {runtime.log_path.resolve() if runtime.log_path else 'none'}")
    runtime.barrier()  # no rank tears the group down while another still talks
    return 1 if report.over_limit else 0

def run_cli(argv: list[str]) -> int:
    """Entry point: bad input ends the run with one clear line (exit 2), a failed run with
    one line (exit 1), Ctrl-C with where it stopped (exit 130); all of them in the log too."""
    if any(arg in ("-h", "--help") for arg in argv):
        print(USAGE, describe_settings(), sep="\n")
        return 0
    if argv:
        print(f"error: unknown argument {argv[0]!r}: settings are environment variables (see --help)", file=sys.stderr)
        return 2
    runtime = None
    try:
        hp = Hyperparameters.from_env(environ_with_profile())
        runtime = start_runtime(hp)
        open_run_files(hp, runtime)
        return run(hp, runtime)
    except (ConfigError, DataError, ArtifactError) as error:
        status, message = 2, f"error: {error}"
    except (RunFailure, WriteError, OSError) as error:
        status, message = 1, f"error: {error}"
    except KeyboardInterrupt:
        status, message = 130, f"interrupted {runtime.where if runtime else 'at start-up'}"
    except Exception as error:
        if runtime is not None:
            runtime.fail(f"error: unexpected {type(error).__name__}: {error} (traceback on the console)")
        raise
    finally:
        if runtime is not None:
            runtime.close()
    if runtime is not None:
        runtime.fail(message)
    else:
        print(message, file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(run_cli(sys.argv[1:]))
