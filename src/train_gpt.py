"""Parameter-golf trainer: one file, read top to bottom.

Trains the "MuonEq-R + context-only SLOT + QK gain 5" GPT on FineWeb within a wall-clock
budget, quantises it with GPTQ int6 into a brotli artifact, checks the artifact by
loading it back, and scores it with sliding-window evaluation (optionally with SLOT
and score-first test-time training). The specification is DESIGN.md.

    torchrun --standalone --nproc_per_node=8 train_gpt.py     # the real run
    python train_gpt.py                                      # 1 process (any device)
    SMOKE=1 python train_gpt.py                              # small CPU run, no FineWeb

Settings come from environment variables; `python train_gpt.py --help` lists them all.
"""

from __future__ import annotations

import ast
import copy
import glob
import importlib.util
import json
import math
import os
import sys
import sysconfig
import time
import uuid
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import brotli
import numpy as np
import sentencepiece
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# -----------------------------------------------------------------------------
# CONFIGURATION
# -----------------------------------------------------------------------------
# Every setting is an environment variable with the reference run's name. The
# defaults reproduce the reference run; SMOKE=1 swaps in a small CPU-sized profile
# (explicit variables still win over it).

class ConfigError(ValueError):
    """A setting that cannot work; the message names the variable and what is allowed."""

def setting(env: str, default: Any, help: str) -> Any:
    return field(default=default, metadata={"env": env, "help": help})

@dataclass
class Hyperparameters:
    # data and run
    data_path: str = setting("DATA_PATH", "./data/datasets/fineweb10B_sp1024", "folder with fineweb_train_*.bin and fineweb_val_*.bin")
    tokenizer_path: str = setting("TOKENIZER_PATH", "./data/tokenizers/fineweb_1024_bpe.model", "SentencePiece model used for byte counts")
    run_id: str = setting("RUN_ID", "", "name of the log file under logs/ (default: a fresh UUID)")
    seed: int = setting("SEED", 1337, "seed for weights and evaluation (the data order is fixed by the file names)")
    smoke: bool = setting("SMOKE", False, "small embedded run on text every Python install carries")
    # model
    vocab_size: int = setting("VOCAB_SIZE", 1024, "tokenizer vocabulary size")
    num_layers: int = setting("NUM_LAYERS", 11, "transformer blocks")
    model_dim: int = setting("MODEL_DIM", 512, "residual width")
    num_heads: int = setting("NUM_HEADS", 8, "query heads")
    num_kv_heads: int = setting("NUM_KV_HEADS", 4, "key/value heads (grouped-query attention)")
    mlp_mult: float = setting("MLP_MULT", 3.0, "MLP hidden width as a multiple of MODEL_DIM")
    qk_gain_init: float = setting("QK_GAIN_INIT", 5.0, "initial per-head query gain")
    rope_dims: int = setting("ROPE_DIMS", 16, "head dims that get rotary embedding")
    rope_base: float = setting("ROPE_BASE", 10000.0, "rotary base")
    xsa_last_n: int = setting("XSA_LAST_N", 11, "last N layers use XSA (remove the self-value component)")
    bigram_vocab_size: int = setting("BIGRAM_VOCAB_SIZE", 2816, "BigramHash buckets (0 disables)")
    bigram_dim: int = setting("BIGRAM_DIM", 112, "BigramHash embedding width")
    ve_enabled: bool = setting("VE_ENABLED", True, "value embeddings on VE_LAYERS")
    ve_dim: int = setting("VE_DIM", 128, "value-embedding table width")
    ve_layers: str = setting("VE_LAYERS", "9,10", "comma-separated layers that add the value embedding")
    logit_softcap: float = setting("LOGIT_SOFTCAP", 30.0, "logits = c*tanh(z/c)")
    tied_embed_init_std: float = setting("TIED_EMBED_INIT_STD", 0.005, "init std of the tied embedding")
    negative_slope: float = setting("NEGATIVE_SLOPE", 0.5, "leaky_relu slope inside the squared MLP activation")
    # schedule
    train_batch_tokens: int = setting("TRAIN_BATCH_TOKENS", 786_432, "tokens per optimiser step, all ranks together")
    train_seq_len: int = setting("TRAIN_SEQ_LEN", 2048, "training sequence length")
    grad_accum_steps: int = setting("GRAD_ACCUM_STEPS", 0, "micro-steps per step (0: 8 // WORLD_SIZE)")
    iterations: int = setting("ITERATIONS", 20000, "step limit")
    warmup_steps: int = setting("WARMUP_STEPS", 20, "compile/prime steps, then weights, optimiser and loader reset")
    warmdown_iters: int = setting("WARMDOWN_ITERS", 3500, "LR decays to 0 over the last N (average-length) steps")
    max_wallclock_seconds: float = setting("MAX_WALLCLOCK_SECONDS", 600.0, "training time cap (0: none)")
    gptq_reserve_ms: float = setting("GPTQ_RESERVE_MS", 9000.0, "part of the cap kept for quantisation")
    val_loss_every: int = setting("VAL_LOSS_EVERY", 4000, "validate every N steps (0: only at the end)")
    train_log_every: int = setting("TRAIN_LOG_EVERY", 500, "log the train loss every N steps")
    val_batch_size: int = setting("VAL_BATCH_SIZE", 524_288, "tokens per validation batch, all ranks together")
    # optimiser
    matrix_lr: float = setting("MATRIX_LR", 0.03, "Muon LR for every layer when BANK_SPLIT=0")
    matrix_lr_early: float = setting("MATRIX_LR_EARLY", 0.025, "Muon LR for layers below BANK_SPLIT")
    matrix_lr_late: float = setting("MATRIX_LR_LATE", 0.03, "Muon LR for layers from BANK_SPLIT on")
    bank_split: int = setting("BANK_SPLIT", 5, "first layer that uses MATRIX_LR_LATE (0: one LR, MATRIX_LR)")
    scalar_lr: float = setting("SCALAR_LR", 0.025, "AdamW LR of control tensors and small projections")
    tied_embed_lr: float = setting("TIED_EMBED_LR", 0.035, "AdamW LR of token-like tables")
    muon_momentum: float = setting("MUON_MOMENTUM", 0.99, "Muon Nesterov momentum")
    muon_momentum_warmup_start: float = setting("MUON_MOMENTUM_WARMUP_START", 0.92, "momentum at step 0")
    muon_momentum_warmup_steps: int = setting("MUON_MOMENTUM_WARMUP_STEPS", 1500, "steps to reach MUON_MOMENTUM")
    muon_backend_steps: int = setting("MUON_BACKEND_STEPS", 5, "Newton-Schulz iterations")
    muon_wd: float = setting("MUON_WD", 0.04, "decoupled weight decay of the banks")
    muon_eq_r: bool = setting("MUON_EQ_R", True, "1: row-normalise the update before Newton-Schulz (MuonEq-R); 0: plain Muon")
    beta1: float = setting("BETA1", 0.9, "AdamW beta1")
    beta2: float = setting("BETA2", 0.95, "AdamW beta2")
    adam_eps: float = setting("ADAM_EPS", 1e-8, "AdamW epsilon")
    adam_wd: float = setting("ADAM_WD", 0.04, "AdamW weight decay")
    grad_clip_norm: float = setting("GRAD_CLIP_NORM", 0.3, "global gradient-norm clip (0: off)")
    ema_decay: float = setting("EMA_DECAY", 0.997, "EMA of the weights, applied before export")
    late_qat_threshold: float = setting("LATE_QAT_THRESHOLD", 0.15, "fake-quantise small projections once the LR multiplier drops below this (0: off)")
    late_qat_min_step: int = setting("LATE_QAT_MIN_STEP", 2000, "earliest step for late QAT")
    # quantisation and artifact
    gptq_calib_samples: int = setting("GPTQ_CALIB_SAMPLES", 64, "training batches for the GPTQ Hessians")
    quant_clip_range: int = setting("QUANT_CLIP_RANGE", 31, "int6 grid is [-N, N]")
    # evaluation
    eval_seq_len: int = setting("EVAL_SEQ_LEN", 2048, "evaluation window length")
    eval_stride: int = setting("EVAL_STRIDE", 64, "sliding-window stride (new tokens scored per window)")
    eval_batch_seqs: int = setting("EVAL_BATCH_SEQS", 32, "windows per evaluation batch")
    slot_enabled: bool = setting("SLOT_ENABLED", True, "context-only SLOT in the sliding-window evaluation")
    slot_mode: str = setting("SLOT_MODE", "window", "window | batch_causal | shared (shared leaks; see README)")
    slot_steps: int = setting("SLOT_STEPS", 8, "SLOT optimisation steps per batch")
    slot_lr: float = setting("SLOT_LR", 0.005, "SLOT AdamW learning rate")
    ttt_enabled: bool = setting("TTT_ENABLED", False, "score-first test-time training after the sliding evaluation")
    ttt_lr: float = setting("TTT_LR", 0.002, "TTT SGD learning rate (cosine over chunks)")
    ttt_epochs: int = setting("TTT_EPOCHS", 3, "TTT passes over each scored chunk")
    ttt_chunk_tokens: int = setting("TTT_CHUNK_TOKENS", 32768, "TTT chunk size")
    ttt_freeze_blocks: int = setting("TTT_FREEZE_BLOCKS", 2, "first N blocks stay frozen during TTT")
    ttt_momentum: float = setting("TTT_MOMENTUM", 0.9, "TTT SGD momentum")
    ttt_batch_seqs: int = setting("TTT_BATCH_SEQS", 32, "TTT sequences per batch")
    ttt_grad_clip: float = setting("TTT_GRAD_CLIP", 1.0, "TTT gradient-norm clip")
    # machinery
    compile: str = setting("COMPILE", "auto", "torch.compile: auto (CUDA only) | 1 | 0")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Hyperparameters:
        """Defaults, then the SMOKE profile, then every variable that is set."""
        environ = dict(os.environ if environ is None else environ)
        values = dict(SMOKE_PROFILE) if parse_setting("smoke", environ.get("SMOKE", "0")) else {}
        values.update({spec.name: parse_setting(spec.name, environ[spec.metadata["env"]])
                       for spec in fields(cls) if spec.metadata["env"] in environ})
        hp = cls(**values)
        hp.validate()
        return hp

    def validate(self) -> None:
        head_dim = self.model_dim // max(self.num_heads, 1)
        rules = [(name, getattr(self, name) > 0, "must be a positive integer") for name in
                 ("num_layers", "model_dim", "num_heads", "num_kv_heads", "vocab_size", "train_seq_len",
                  "eval_seq_len", "train_batch_tokens", "eval_stride", "eval_batch_seqs")] + [
            ("num_heads", self.model_dim % self.num_heads == 0, f"must divide MODEL_DIM={self.model_dim}"),
            ("num_kv_heads", self.num_heads % self.num_kv_heads == 0, f"must divide NUM_HEADS={self.num_heads}"),
            ("rope_dims", head_dim % 2 == 0 and self.rope_dims % 2 == 0 and self.rope_dims in {0, *range(4, head_dim + 1)},
             f"must be 0 (all) or even in 4..{head_dim}, the head dim (the NTK scaling divides by ROPE_DIMS-2)"),
            ("mlp_mult", self.mlp_mult > 0 and (self.mlp_mult * self.model_dim) % 1 == 0, "must give a whole hidden width"),
            ("bigram_vocab_size", self.bigram_vocab_size == 0 or self.bigram_vocab_size >= 2, "must be 0 (off) or at least 2"),
            ("ve_layers", all(0 <= i < self.num_layers for i in self.value_embedding_layers),
             f"layers must lie in 0..{self.num_layers - 1}"),
            ("xsa_last_n", 0 <= self.xsa_last_n <= self.num_layers, f"must lie in 0..NUM_LAYERS={self.num_layers}"),
            ("bank_split", 0 <= self.bank_split <= self.num_layers, f"must lie in 0..NUM_LAYERS={self.num_layers}"),
            ("slot_mode", self.slot_mode in SLOT_MODES, f"one of {', '.join(SLOT_MODES)}"),
            ("compile", self.compile in ("auto", "0", "1"), "auto, 0 or 1"),
            ("eval_stride", self.eval_stride <= self.eval_seq_len, f"must be at most EVAL_SEQ_LEN={self.eval_seq_len}"),
            ("quant_clip_range", 1 <= self.quant_clip_range <= 127, "must lie in 1..127"),
            ("grad_accum_steps", self.grad_accum_steps >= 0, "must be 0 (automatic) or positive")]
        for name, holds, allowed in rules:
            if not holds:
                raise ConfigError(f"{env_of(name)}={getattr(self, name)!r} is not allowed: {allowed}")

    @property
    def value_embedding_layers(self) -> list[int]:
        try:
            return [int(part) for part in self.ve_layers.split(",") if part.strip()] if self.ve_enabled else []
        except ValueError:
            raise ConfigError(f"VE_LAYERS={self.ve_layers!r} is not allowed: a comma-separated list of layer numbers") from None

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_mult * self.model_dim)

    @property
    def train_files(self) -> str:
        return os.path.join(self.data_path, "fineweb_train_*.bin")

    @property
    def val_files(self) -> str:
        return os.path.join(self.data_path, "fineweb_val_*.bin")

SLOT_MODES = ("window", "batch_causal", "shared")

# The embedded default: a model small enough to train in about two minutes on two CPU
# cores, on text every Python install carries (see build_smoke_corpus).
SMOKE_PROFILE: dict[str, Any] = dict(
    smoke=True, data_path="./data/datasets/smoke_pydoc_sp1024", num_layers=4, model_dim=128,
    num_heads=4, num_kv_heads=2, mlp_mult=2.0, rope_dims=16, xsa_last_n=4, bigram_vocab_size=512,
    bigram_dim=32, ve_dim=32, ve_layers="2,3", train_batch_tokens=8192, train_seq_len=256,
    grad_accum_steps=1, iterations=400, warmup_steps=2, warmdown_iters=120, max_wallclock_seconds=100.0,
    gptq_reserve_ms=0.0, val_loss_every=100, train_log_every=25, val_batch_size=16384,
    muon_momentum_warmup_steps=100, bank_split=2, matrix_lr_early=0.02, matrix_lr_late=0.025, late_qat_min_step=200,
    gptq_calib_samples=4, ema_decay=0.95, eval_seq_len=256, eval_stride=64, eval_batch_seqs=16, slot_steps=4,
    ttt_enabled=True, ttt_chunk_tokens=8192, ttt_epochs=1, ttt_batch_seqs=8)

def env_of(name: str) -> str:
    return next(spec.metadata["env"] for spec in fields(Hyperparameters) if spec.name == name)

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

def describe_settings() -> str:
    """The --help text: every variable with its default and meaning."""
    return "\n".join(["Environment variables (default in brackets):"] + [
        f"  {spec.metadata['env']:<28} [{int(spec.default) if isinstance(spec.default, bool) else spec.default}] "
        f"{spec.metadata['help']}" for spec in fields(Hyperparameters)])


# -----------------------------------------------------------------------------
# DATA
# -----------------------------------------------------------------------------
# A shard is 256 little-endian int32 (magic, version, token count, zeros) followed by
# that many little-endian uint16 tokens. Every document starts with BOS.

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS, BOS_ID = 20240520, 1, 256, 1
SHARD_HEADER_BYTES = 4 * SHARD_HEADER_INTS

class DataError(ValueError):
    """A data file that cannot be used; the message names the file."""

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

def write_atomic(path: str | Path, data: bytes) -> None:
    """Write to a temporary name and rename, so a crash never leaves a complete-looking file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)

def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > 65535):
        raise DataError(f"{path}: token ids must fit in uint16")
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    write_atomic(path, header.tobytes() + tokens.astype("<u2").tobytes())

def shard_paths(pattern: str) -> list[Path]:
    paths = [Path(p) for p in sorted(glob.glob(pattern))]
    if not paths:
        raise DataError(f"no shards match {pattern} (set DATA_PATH, or run data/download_fineweb.py)")
    return paths

def load_validation_tokens(pattern: str, seq_len: int) -> Tensor:
    """All validation shards concatenated, cut to a multiple of seq_len, plus one target."""
    tokens = np.concatenate([np.asarray(read_shard(path)) for path in shard_paths(pattern)])
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
        self.phase = int(self.rng.integers(max_phase + 1))
        self.num_blocks = (self.num_tokens - 1 - self.phase) // self.seq_len
        self.start = int(self.rng.integers(self.num_blocks))
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

class TokenSampler:
    """The coprime-stride multi-shard sampler.

    Each step draws the step's global list of windows: a few shards, chosen with
    probability ~ remaining_blocks^alpha (alpha 0.9 -> 0.5 and 8 -> 32 shards over the
    first 1800 steps), interleaved round-robin. Every rank draws the same list (the RNG
    is seeded from the shard names, so the order is the same for every SEED: a quirk
    of the reference) and keeps its own slice, so ranks never share a window.
    Micro-batch m of rank r takes windows[m*world + r :: world*accum]: the same windows
    land in the same micro-batch whatever the split between ranks and accumulation, so
    a 2-rank run is the same math as 1 rank with 2 micro-steps.
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

    def draw_step_windows(self) -> list[tuple[int, int]]:
        """(shard, offset) of every window of the next step, all ranks together."""
        progress, total = min(self.steps_drawn / 1800.0, 1.0), self.windows_per_step
        remaining = np.array([max(self.cursors[s].remaining, 1) if s in self.cursors else (self.shards[s].size - 1) // self.seq_len
                              for s in self.eligible], dtype=np.float64)
        probs = remaining ** (0.9 - 0.4 * progress)
        probs /= probs.sum()
        low = min(max(8, self.world_size), len(self.eligible), total)
        high = min(max(32, 8 * self.world_size), len(self.eligible), total)
        mix = max(1, int(round(low + progress * (high - low))))
        chosen = self.rng.choice(len(self.eligible), size=mix, replace=False, p=probs)
        counts = np.ones(mix, dtype=np.int64)
        if total > mix:
            counts += self.rng.multinomial(total - mix, probs[chosen] / probs[chosen].sum())
        buckets = []
        for index in self.rng.permutation(mix):
            shard = self.eligible[int(chosen[index])]
            cursor = self.cursors.setdefault(shard, ShardCursor(self.shards[shard].size, self.seq_len, self.rng))
            offsets = cursor.take(int(counts[index]))
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

    def next_step(self, device: torch.device) -> list[tuple[Tensor, Tensor]]:
        """This rank's (inputs, targets) for each micro-step of the next step."""
        windows, batches = self.draw_step_windows(), []
        for micro_step in range(self.accum_steps):
            rows = torch.from_numpy(np.stack([self.shards[s][o : o + self.seq_len + 1]
                                              for s, o in self.micro_batch_windows(windows, micro_step)]).astype(np.int64))
            if device.type == "cuda":
                rows = rows.pin_memory().to(device, non_blocking=True)
            batches.append((rows[:, :-1], rows[:, 1:]))
        return batches

def build_smoke_corpus(data_path: str | Path, tokenizer: Any) -> None:
    """Shards for the embedded default, from English that every Python install carries.

    Validation: the last tenth of pydoc's topic pages (the language reference), split
    into paragraphs. Training: the other pages and the long docstrings of the standard
    library (about 1.8 MB of text together). Each document gets BOS in front.
    """
    import pydoc_data.topics

    pages = [paragraph.strip() for _, page in sorted(pydoc_data.topics.topics.items())
             for paragraph in page.split("\n\n") if len(paragraph.strip()) > 40]
    split = len(pages) - len(pages) // 10
    docstrings = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if {"site-packages", "test", "tests"} & set(path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        docstrings += [doc for node in ast.walk(tree) if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
                       and len(doc := ast.get_docstring(node) or "") > 200]
    for name, documents in (("val", pages[split:]), ("train", pages[:split] + docstrings)):
        tokens = np.concatenate([[BOS_ID] + ids for ids in tokenizer.encode(documents)])
        write_shard(Path(data_path) / f"fineweb_{name}_000000.bin", tokens)

# -----------------------------------------------------------------------------
# MODEL
# -----------------------------------------------------------------------------
# Block weights live in four 3-D "banks" so Muon can orthogonalise a whole bank in
# one batched call and shard it across ranks by its first axis:
#   qo_bank   [2L, d, d]      q of layer i at i, attention out-projection at L + i
#   kv_bank   [2L, kv, d]     k of layer i at i, v at L + i
#   mlp_up_bank [L, h, d], mlp_down_bank [L, d, h]

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
    """A bias-free linear layer that late QAT can switch to fake-quantised weights."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.qat_sharpness: Tensor | None = None  # set by GPT.set_late_qat

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if self.qat_sharpness is not None and self.training:
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
    def __init__(self, hp: Hyperparameters, use_xsa: bool):
        super().__init__()
        self.num_heads, self.num_kv_heads = hp.num_heads, hp.num_kv_heads
        self.head_dim = hp.model_dim // hp.num_heads
        self.q_gain = nn.Parameter(torch.full((hp.num_heads,), hp.qk_gain_init))
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
    def __init__(self, hp: Hyperparameters, layer: int):
        super().__init__()
        dim = hp.model_dim
        self.attn = Attention(hp, use_xsa=layer >= hp.num_layers - hp.xsa_last_n)
        self.mlp = MLP(hp.negative_slope)
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
    def __init__(self, hp: Hyperparameters):
        super().__init__()
        dim, layers = hp.model_dim, hp.num_layers
        kv_dim = hp.num_kv_heads * (dim // hp.num_heads)
        self.num_layers, self.rope_dims, self.rope_base = layers, hp.rope_dims or dim // hp.num_heads, hp.rope_base
        self.logit_softcap = hp.logit_softcap
        self.tok_emb = nn.Embedding(hp.vocab_size, dim)
        nn.init.normal_(self.tok_emb.weight, std=hp.tied_embed_init_std)
        self.bigram = BigramHash(hp.bigram_vocab_size, hp.bigram_dim, dim) if hp.bigram_vocab_size else None
        self.smear = SmearGate(dim)
        self.ve_layers = hp.value_embedding_layers
        self.value_embed = ValueEmbedding(hp.vocab_size, hp.ve_dim, kv_dim, len(self.ve_layers)) if self.ve_layers else None
        self.num_encoder = layers // 2
        num_skips = min(self.num_encoder, layers - self.num_encoder)
        self.skip_weights = nn.Parameter(torch.ones(num_skips, dim))
        self.skip_gates = nn.Parameter(torch.zeros(num_skips, dim))
        self.qo_bank = nn.Parameter(torch.zeros(2 * layers, dim, dim))
        self.kv_bank = nn.Parameter(torch.zeros(2 * layers, kv_dim, dim))
        self.mlp_up_bank = nn.Parameter(torch.zeros(layers, hp.mlp_hidden, dim))
        self.mlp_down_bank = nn.Parameter(torch.zeros(layers, dim, hp.mlp_hidden))
        for i in range(layers):  # out-projections and MLP-down stay zero
            for matrix in (self.qo_bank[i], self.kv_bank[i], self.kv_bank[layers + i], self.mlp_up_bank[i]):
                nn.init.orthogonal_(matrix.data)
        self.blocks = nn.ModuleList(Block(hp, i) for i in range(layers))

    def layer_weights(self, i: int) -> tuple[Tensor, ...]:
        n = self.num_layers
        return (self.qo_bank[i], self.kv_bank[i], self.kv_bank[n + i], self.qo_bank[n + i],
                self.mlp_up_bank[i], self.mlp_down_bank[i])

    def forward_hidden(self, input_ids: Tensor) -> Tensor:
        """Final normalised hidden states [B, T, d]."""
        x = self.tok_emb(input_ids)
        if self.bigram is not None:
            x = x + self.bigram(input_ids)
        x = self.smear(F.rms_norm(x, (x.size(-1),)))
        x0 = x
        rotary = rotary_tables(input_ids.size(1), self.rope_dims, self.rope_base, input_ids.device)
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
        return self.logit_softcap * torch.tanh(raw / self.logit_softcap)

    def forward_logits(self, input_ids: Tensor) -> Tensor:
        return self.logits(self.forward_hidden(input_ids))

    def forward(self, input_ids: Tensor, target_ids: Tensor | None = None) -> Tensor:
        """Mean cross-entropy in nats; the logits when no targets are given."""
        logits = self.forward_logits(input_ids)
        if target_ids is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), target_ids.flatten())

    def set_late_qat(self, sharpness: Tensor | None) -> None:
        """Route the small projections through fake quantisation (None switches it off)."""
        for module in self.modules():
            if isinstance(module, QATLinear):
                module.qat_sharpness = sharpness

    def capture_inputs(self, enabled: bool) -> list[tuple[dict[str, Tensor], dict[str, Tensor]]]:
        """Make every block record its linear-layer inputs (for GPTQ); returns the records."""
        records = []
        for block in self.blocks:
            block.attn.captured = {} if enabled else None
            block.mlp.captured = {} if enabled else None
            records.append((block.attn.captured, block.mlp.captured))
        return records

def build_model(hp: Hyperparameters) -> GPT:
    return GPT(hp)


# -----------------------------------------------------------------------------
# OPTIMISER
# -----------------------------------------------------------------------------
# MuonEq-R for the four banks; AdamW for everything else. With several ranks the bank
# gradients are reduce-scattered along the bank's first axis, each rank
# orthogonalises its own matrices, and the updates are all-gathered; the next bank's
# Newton-Schulz runs while the previous all-gather is in flight.

NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

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
    """Muon with optional row equalisation, sharded over ranks along the bank axis.

    Each param group holds one bank and `matrix_lrs`, that bank's per-matrix learning
    rates; group["lr"] is the schedule multiplier applied on top. Call
    `reduce_gradients()` right after backward (it starts the communication) and
    `step()` after the AdamW steps.
    """

    def __init__(self, banks: list[nn.Parameter], matrix_lrs: list[Tensor], momentum: float, backend_steps: int,
                 weight_decay: float, row_normalize: bool, comm_dtype: torch.dtype = torch.float32,
                 ns_dtype: torch.dtype = torch.bfloat16):
        groups = [dict(params=[bank], matrix_lrs=lrs) for bank, lrs in zip(banks, matrix_lrs)]
        super().__init__(groups, dict(lr=1.0, base_lr=1.0, momentum=momentum, backend_steps=backend_steps,
                                      weight_decay=weight_decay, row_normalize=row_normalize))
        self.comm_dtype, self.ns_dtype = comm_dtype, ns_dtype
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.use_reduce_scatter = True  # switched off where the backend lacks it
        self.pending: list[Any] = []

    def shard_rows(self, bank: Tensor) -> tuple[int, int]:
        """This rank's [start, end) matrices of a bank padded to a multiple of world size."""
        per_rank = -(-bank.size(0) // self.world_size)
        return self.rank * per_rank, (self.rank + 1) * per_rank

    def padded(self, tensor: Tensor) -> Tensor:
        per_rank = -(-tensor.size(0) // self.world_size)
        return F.pad(tensor, (0, 0, 0, 0, 0, per_rank * self.world_size - tensor.size(0)))

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Start averaging each bank's gradient; each rank ends with its own shard."""
        self.pending = []
        for group in self.param_groups:
            bank = group["params"][0]
            grad = bank.grad.to(self.comm_dtype)
            if self.world_size == 1:
                self.pending.append((grad, None))
                continue
            grad = self.padded(grad)
            shard = torch.empty_like(grad[: grad.size(0) // self.world_size])
            if self.use_reduce_scatter:
                try:
                    work = REDUCE_SCATTER(shard, grad, op=dist.ReduceOp.SUM, async_op=True)
                    self.pending.append((shard, work))
                    continue
                except (RuntimeError, NotImplementedError):
                    self.use_reduce_scatter = False
            dist.all_reduce(grad)  # fallback: the full sum, then keep our rows
            start, end = self.shard_rows(bank)
            self.pending.append((grad[start:end], None))

    @torch.no_grad()
    def reduced_grad_shards(self) -> list[Tensor]:
        """Wait for the reductions; this rank's averaged gradient shard of each bank (at least fp32)."""
        shards = []
        for shard, work in self.pending:
            if work is not None:
                work.wait()
            shards.append(shard.to(torch.promote_types(shard.dtype, torch.float32)) / self.world_size)
        return shards

    @torch.no_grad()
    def step(self, grad_shards: list[Tensor] | None = None) -> None:
        if grad_shards is None:  # used on its own, without Optimizers.step
            self.reduce_gradients()
            grad_shards = self.reduced_grad_shards()
        previous: tuple[Any, ...] | None = None
        for group, grad in zip(self.param_groups, grad_shards):
            bank = group["params"][0]
            start, end = self.shard_rows(bank) if self.world_size > 1 else (0, bank.size(0))
            state = self.state[bank]
            if "momentum" not in state:
                state["momentum"] = torch.zeros_like(grad)
            momentum = state["momentum"]
            momentum.mul_(group["momentum"]).add_(grad)
            update = grad.add(momentum, alpha=group["momentum"])  # Nesterov
            if group["row_normalize"]:
                update = normalize_rows(update)
            update = newton_schulz(update, group["backend_steps"], dtype=self.ns_dtype)
            update = update.to(self.comm_dtype) * max(1.0, bank.size(-2) / bank.size(-1)) ** 0.5
            if self.world_size == 1:
                self.apply_update(bank, update, group)
                continue
            full = torch.empty((end - start) * self.world_size, *update.shape[1:], dtype=update.dtype, device=update.device)
            work = ALL_GATHER(full, update, async_op=True)
            if previous is not None:
                self.finish_gather(*previous)
            previous = (bank, full, work, group)
        if previous is not None:
            self.finish_gather(*previous)

    def finish_gather(self, bank: Tensor, full: Tensor, work: Any, group: dict) -> None:
        work.wait()
        self.apply_update(bank, full[: bank.size(0)], group)

    def apply_update(self, bank: Tensor, update: Tensor, group: dict) -> None:
        lrs = group["matrix_lrs"].to(bank.device)[:, None, None] * group["lr"]
        bank.mul_(1 - lrs * group["weight_decay"])  # decoupled weight decay
        bank.sub_(lrs * update.to(bank.dtype))

def matrix_learning_rates(hp: Hyperparameters, bank_size: int) -> Tensor:
    """Per-matrix LR of a bank: matrix i belongs to layer i mod L (split early/late)."""
    layers = torch.arange(bank_size) % hp.num_layers
    if hp.bank_split == 0:
        return torch.full((bank_size,), hp.matrix_lr)
    return torch.where(layers < hp.bank_split, hp.matrix_lr_early, hp.matrix_lr_late).float()

BANK_NAMES = ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank")
TOKEN_TABLE_NAMES = ("tok_emb.weight", "bigram.table.weight", "value_embed.table.weight")

@dataclass
class Optimizers:
    muon: MuonEqR
    adam: torch.optim.AdamW
    replicated: list[nn.Parameter]  # everything outside the banks: all-reduced in full

    def all(self) -> list[torch.optim.Optimizer]:
        return [self.muon, self.adam]

    def zero_grad(self) -> None:
        for optimizer in self.all():
            optimizer.zero_grad(set_to_none=True)

    def set_schedule(self, lr_multiplier: float, muon_momentum: float) -> None:
        for optimizer in self.all():
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_multiplier
        for group in self.muon.param_groups:
            group["momentum"] = muon_momentum

    def step(self, clip_norm: float) -> None:
        """Average gradients over ranks, clip by the global norm, step both optimisers."""
        self.muon.reduce_gradients()  # bank communication starts first and overlaps the rest
        for param in self.replicated:
            if param.grad is None:  # a parameter the forward did not reach
                param.grad = torch.zeros_like(param)
        grads = [param.grad for param in self.replicated]
        if dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat([grad.flatten() for grad in grads])  # one collective for ~1M values
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            for grad, reduced in zip(grads, flat.split([grad.numel() for grad in grads])):
                grad.copy_(reduced.view_as(grad))
        bank_shards = self.muon.reduced_grad_shards()
        if clip_norm > 0:
            square = torch.stack([g.float().square().sum() for g in grads]).sum()
            bank_square = torch.stack([s.square().sum() for s in bank_shards]).sum()
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(bank_square)  # shards are disjoint: sum them
            coefficient = (clip_norm / ((square + bank_square).sqrt() + 1e-6)).clamp(max=1.0)
            for grad in grads:
                grad.mul_(coefficient)
            for shard in bank_shards:
                shard.mul_(coefficient)
        self.adam.step()
        self.muon.step(bank_shards)

def build_optimizers(hp: Hyperparameters, model: GPT, device: torch.device) -> Optimizers:
    named = dict(model.named_parameters())
    banks = [named[name] for name in BANK_NAMES]
    tables = [named[name] for name in TOKEN_TABLE_NAMES if name in named]
    controls = [p for name, p in named.items() if name not in BANK_NAMES and name not in TOKEN_TABLE_NAMES]
    adam = torch.optim.AdamW(
        [dict(params=tables, lr=hp.tied_embed_lr, base_lr=hp.tied_embed_lr),
         dict(params=controls, lr=hp.scalar_lr, base_lr=hp.scalar_lr)],
        betas=(hp.beta1, hp.beta2), eps=hp.adam_eps, weight_decay=hp.adam_wd, fused=device.type == "cuda")
    muon = MuonEqR(banks, [matrix_learning_rates(hp, bank.size(0)) for bank in banks],
                   momentum=hp.muon_momentum, backend_steps=hp.muon_backend_steps, weight_decay=hp.muon_wd,
                   row_normalize=hp.muon_eq_r, comm_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    return Optimizers(muon=muon, adam=adam, replicated=tables + controls)


# -----------------------------------------------------------------------------
# RUNTIME: devices, ranks, logging
# -----------------------------------------------------------------------------

@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    log_path: Path | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> Any:
        """bfloat16 autocast on CUDA; plain float elsewhere."""
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def log(self, message: str, console: bool = True) -> None:
        """Rank 0 prints and appends to the run's log file."""
        if not self.is_main:
            return
        if console:
            print(message, flush=True)
        if self.log_path is not None:
            with open(self.log_path, "a", encoding="utf-8") as handle:
                print(message, file=handle)


# -----------------------------------------------------------------------------
# QUANTISATION AND ARTIFACT
# -----------------------------------------------------------------------------

# The shipped train_gpt.py is this file without comments and docstrings, LZMA2-compressed,
# base85-encoded and wrapped in two lines that exec it (tools/pack.py makes it). Its bytes
# count against the 16 MB budget, so the accounting always measures the shipped form.
PACKED_HEADER = "import lzma as L,base64 as B\n"

def shipped_code_bytes() -> int:
    """Bytes of the shipped train_gpt.py, also when running from the readable source."""
    source = Path(__file__).read_text(encoding="utf-8")
    if source.startswith(PACKED_HEADER):
        return len(source.encode())
    spec = importlib.util.spec_from_file_location("pack", Path(__file__).resolve().parents[1] / "tools" / "pack.py")
    pack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pack)
    return len(pack.pack_source(source).encode())

class ArtifactError(ValueError):
    """An artifact that cannot be loaded; the message names the file."""

CLIP_QUANTILES = (0.999, 0.9995, 0.9999, 0.99999, 1.0)

def row_scales(weight: Tensor, quantile: float, clip_range: int) -> Tensor:
    """fp16 per-row scales putting the row's |w| quantile on the grid edge."""
    magnitude = weight.abs()
    clip = magnitude.amax(dim=1) if quantile >= 1.0 else torch.quantile(magnitude, quantile, dim=1)
    # Kept inside fp16's range (smallest subnormal .. max) so a scale is never 0 or inf;
    # the reference's floor of 1/clip_range instead crushes small rows.
    return (clip / clip_range).clamp(2.0**-24, 65504.0).to(torch.float16)

def round_to_grid(weight: Tensor, scale: Tensor, clip_range: int) -> Tensor:
    return torch.clamp(torch.round(weight / scale.float()[:, None]), -clip_range, clip_range).to(torch.int8)

def dequantize_rows(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale.float()[:, None]

def quantize_rows_int6(weight: Tensor, clip_range: int = 31) -> tuple[Tensor, Tensor]:
    """Per-row rounding; the clip quantile with the lowest squared error wins."""
    best = None
    for quantile in CLIP_QUANTILES:
        scale = row_scales(weight, quantile, clip_range)
        q = round_to_grid(weight, scale, clip_range)
        error = float((weight - dequantize_rows(q, scale)).square().sum())
        if best is None or error < best[0]:
            best = (error, q, scale)
    return best[1], best[2]

def quantize_rows_int8(weight: Tensor, quantile: float = 0.9999984) -> tuple[Tensor, Tensor]:
    scale = row_scales(weight, quantile, 127)
    return round_to_grid(weight, scale, 127), scale

def hessian_error(weight: Tensor, q: Tensor, scale: Tensor, hessian: Tensor) -> float:
    """tr(E H E^T) with E = W - dequant(Q): the loss increase GPTQ minimises."""
    error = weight - dequantize_rows(q, scale)
    return float(((error @ hessian) * error).sum())

def gptq_quantize(weight: Tensor, hessian: Tensor, clip_range: int = 31,
                  block_size: int = 128) -> tuple[Tensor, Tensor, bool]:
    """GPTQ (Frantar et al. 2023) to int6 rows; returns (q, scale, whether GPTQ was used).

    Columns go in order of decreasing H diagonal; each column's rounding error is fed
    forward to the columns not yet quantised through the upper Cholesky factor of
    H^-1. Every clip quantile is tried and the lowest Hessian-weighted error wins. If
    H is not positive definite, plain per-row rounding is used instead.
    """
    weight, hessian = weight.float(), hessian.float().clone()
    dead = hessian.diagonal() == 0  # inputs that never fire: any value is free
    hessian[dead, dead] = 1.0
    order = torch.argsort(hessian.diagonal(), descending=True)
    inverse_order = torch.argsort(order)
    permuted_h = hessian[order][:, order]
    try:
        upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(permuted_h)), upper=True)
    except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
        upper = None
    if upper is None or not torch.isfinite(upper).all():
        q, scale = quantize_rows_int6(weight, clip_range)
        return q, scale, False
    permuted_w = weight[:, order].clone()
    permuted_w[:, dead[order]] = 0
    best = None
    for quantile in CLIP_QUANTILES:
        scale = row_scales(weight, quantile, clip_range)
        q = gptq_columns(permuted_w, upper, scale, clip_range, block_size)[:, inverse_order]
        error = hessian_error(weight, q, scale, hessian)
        if best is None or error < best[0]:
            best = (error, q, scale)
    return best[1], best[2], True

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
# shape and byte range, back to back over the whole payload; multi-byte
# tensors are byte-shuffled (all first bytes, then all second bytes...), which groups
# the similar high bytes of fp16 values and helps brotli. Loading never runs code.
ARTIFACT_MAGIC = b"PGOLF1\n"
ARTIFACT_DTYPES = {"int8": torch.int8, "float16": torch.float16, "float32": torch.float32}

def byte_shuffle(raw: bytes, width: int) -> bytes:
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, width).T.tobytes() if width > 1 else raw

def byte_unshuffle(raw: bytes, width: int) -> bytes:
    return np.frombuffer(raw, dtype=np.uint8).reshape(width, -1).T.tobytes() if width > 1 else raw

def encode_artifact(tensors: dict[str, Tensor], meta: dict[str, Any]) -> bytes:
    entries, chunks, offset = [], [], 0
    for name, tensor in tensors.items():
        dtype = str(tensor.dtype).removeprefix("torch.")
        raw = tensor.detach().cpu().contiguous().numpy().tobytes()
        chunks.append(byte_shuffle(raw, tensor.element_size()))
        entries.append({"name": name, "dtype": dtype, "shape": list(tensor.shape), "offset": offset, "bytes": len(raw)})
        offset += len(raw)
    header = json.dumps({"tensors": entries, "meta": meta}).encode()
    body = len(header).to_bytes(4, "little") + header + b"".join(chunks)
    stream = brotli.compress(body, quality=11)
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
            tensors[str(entry["name"])] = torch.frombuffer(raw, dtype=dtype).reshape(shape) if raw else torch.empty(shape, dtype=dtype)
        if expected_start != len(payload):
            raise ValueError(f"{len(payload) - expected_start} payload bytes belong to no tensor")
        return tensors, dict(header["meta"])
    except brotli.error:
        raise ArtifactError(f"{source}: truncated or corrupt (brotli stream does not decode)") from None
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as error:
        raise ArtifactError(f"{source}: corrupt header ({error})") from None

def write_artifact(path: str | Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> int:
    blob = encode_artifact(tensors, meta)
    write_atomic(path, blob)
    return len(blob)

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
SMALL_TENSOR_NUMEL = 65_536  # at most this many values: stored as fp16
ARTIFACT_NAME = "final_model.int6.ptz"
SIZE_LIMIT_BYTES = 16_000_000

def bank_matrix_names(num_layers: int) -> list[str]:
    return [f"blocks.{layer}.{role}" for layer in range(num_layers) for role in BANK_ROLES]

def bank_slot(name: str, num_layers: int) -> tuple[str, int, str]:
    """(bank, index in the bank, Hessian key) of a matrix name like 'blocks.3.v'."""
    _, layer, role = name.split(".")
    bank, half, source = BANK_ROLES[role]
    return bank, half * num_layers + int(layer), f"blocks.{layer}.{source}"

def unbank(state: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """The state dict with the banks split into one 2-D matrix per layer and role."""
    matrices = {name: tensor for name, tensor in state.items() if name not in BANK_NAMES}
    for name in bank_matrix_names(num_layers):
        bank, index, _ = bank_slot(name, num_layers)
        matrices[name] = state[bank][index]
    return matrices

def rebank(matrices: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    names = bank_matrix_names(num_layers)
    state = {name: tensor for name, tensor in matrices.items() if name not in names}
    slots: dict[str, dict[int, Tensor]] = {bank: {} for bank in BANK_NAMES}
    for name in names:
        bank, index, _ = bank_slot(name, num_layers)
        slots[bank][index] = matrices[name]
    for bank, by_index in slots.items():
        state[bank] = torch.stack([by_index[i] for i in range(len(by_index))])
    return state

@torch.no_grad()
def collect_hessians(hp: Hyperparameters, model: GPT, runtime: Runtime) -> dict[str, Tensor]:
    """H = mean of X^T X for every linear input, over GPTQ_CALIB_SAMPLES training micro-batches
    per rank, averaged over ranks, plus 1% of the mean diagonal."""
    accum_steps = hp.grad_accum_steps or 8 // runtime.world_size
    sampler = make_sampler(hp, runtime, accum_steps)
    records = model.capture_inputs(True)
    was_training = model.training
    model.eval()
    hessians: dict[str, Tensor] = {}
    batches = 0
    while batches < hp.gptq_calib_samples:
        for inputs, _ in sampler.next_step(runtime.device)[: hp.gptq_calib_samples - batches]:
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
        hessian = runtime.all_reduce_sum(hessian) / (batches * runtime.world_size)
        hessians[name] = hessian + 0.01 * hessian.diagonal().mean().clamp_min(1e-8) * torch.eye(len(hessian), device=hessian.device)
    return hessians

def quantize_state(hp: Hyperparameters, state: dict[str, Tensor], hessians: dict[str, Tensor],
                   runtime: Runtime) -> tuple[dict[str, Tensor], dict[str, str], int]:
    """GPTQ int6 for block matrices, int8 rows for big tables, fp16 for the small rest.

    The GPTQ matrices are shared out over the ranks and broadcast back, so every rank
    ends with the whole quantised state. Returns tensors, scheme per name, GPTQ count.
    """
    matrices = unbank(state, hp.num_layers)
    tensors: dict[str, Tensor] = {}
    schemes: dict[str, str] = {}
    gptq_names = bank_matrix_names(hp.num_layers)
    gptq_used = torch.zeros(len(gptq_names), device=runtime.device)
    for index, name in enumerate(gptq_names):
        weight = matrices[name].float()
        if index % runtime.world_size == runtime.rank:
            q, scale, used = gptq_quantize(weight, hessians[bank_slot(name, hp.num_layers)[2]], hp.quant_clip_range)
            gptq_used[index] = float(used)
        else:
            q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
            scale = torch.empty(weight.size(0), dtype=torch.float16, device=weight.device)
        if runtime.distributed:
            dist.broadcast(q, src=index % runtime.world_size)
            dist.broadcast(scale, src=index % runtime.world_size)
        tensors[f"{name}.q"], tensors[f"{name}.scale"], schemes[name] = q, scale, "int6"
    for name, tensor in matrices.items():
        if name in schemes:
            continue
        if tensor.numel() > SMALL_TENSOR_NUMEL and tensor.ndim == 2:
            tensors[f"{name}.q"], tensors[f"{name}.scale"] = quantize_rows_int8(tensor.float())
            schemes[name] = "int8"
        else:
            tensors[name], schemes[name] = tensor.to(torch.float16), "fp16"
    return {k: v.cpu() for k, v in tensors.items()}, schemes, int(runtime.all_reduce_sum(gptq_used).sum())

def dequantize_state(tensors: dict[str, Tensor], schemes: dict[str, str], num_layers: int) -> dict[str, Tensor]:
    matrices = {}
    for name, scheme in schemes.items():
        if scheme == "fp16":
            matrices[name] = tensors[name].float()
        else:
            matrices[name] = dequantize_rows(tensors[f"{name}.q"], tensors[f"{name}.scale"])
    return rebank(matrices, num_layers)

def model_shape_settings(hp: Hyperparameters) -> dict[str, Any]:
    """Settings that fix the model's shapes; stored in the artifact and checked on load."""
    names = ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "rope_dims",
             "xsa_last_n", "bigram_vocab_size", "bigram_dim", "ve_enabled", "ve_dim", "ve_layers")
    return {env_of(name): getattr(hp, name) for name in names}

@dataclass
class ArtifactReport:
    path: Path
    model_bytes: int
    code_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.model_bytes + self.code_bytes

def export_artifact(hp: Hyperparameters, model: GPT, runtime: Runtime) -> ArtifactReport:
    """Calibrate, quantise, write the artifact (rank 0) and log the 16 MB accounting."""
    started = time.perf_counter()
    runtime.log(f"gptq:calibrating with {hp.gptq_calib_samples} batches (training data)...")
    hessians = collect_hessians(hp, model, runtime)
    runtime.log(f"gptq:calibrated {len(hessians)} layer inputs in {time.perf_counter() - started:.1f}s")
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    tensors, schemes, gptq_count = quantize_state(hp, state, hessians, runtime)
    runtime.log(f"gptq_quantize: {gptq_count} GPTQ layers, {len(bank_matrix_names(hp.num_layers)) - gptq_count} "
                f"naive layers, {time.perf_counter() - started:.1f}s in all")
    path = Path(ARTIFACT_NAME)
    meta = {"schemes": schemes, "model": model_shape_settings(hp)}
    model_bytes = torch.zeros((), dtype=torch.int64)
    if runtime.is_main:
        model_bytes += write_artifact(path, tensors, meta)
    model_bytes = int(runtime.all_reduce_sum(model_bytes.to(runtime.device)).item())
    report = ArtifactReport(path=path, model_bytes=model_bytes, code_bytes=shipped_code_bytes())
    runtime.log(f"Serialized model int6+brotli: {report.model_bytes} bytes")
    runtime.log(f"Code size: {report.code_bytes} bytes")
    runtime.log(f"Total submission size int6+brotli: {report.total_bytes} bytes")
    if report.total_bytes > SIZE_LIMIT_BYTES:
        runtime.log(f"SIZE LIMIT EXCEEDED: {report.total_bytes} bytes is {report.total_bytes - SIZE_LIMIT_BYTES} "
                    f"bytes over the {SIZE_LIMIT_BYTES} limit; this run cannot be submitted")
    return report

def load_quantized_model(hp: Hyperparameters, path: Path, runtime: Runtime) -> GPT:
    """A fresh model holding the dequantised artifact: what a submission would evaluate."""
    tensors, meta = read_artifact(path)
    expected = model_shape_settings(hp)
    stored = meta.get("model", {})
    for env, value in expected.items():
        if stored.get(env) != value:
            raise ArtifactError(f"{path}: made with {env}={stored.get(env)!r} but {env}={value!r} is set")
    model = build_model(hp)
    try:
        model.load_state_dict(dequantize_state(tensors, meta["schemes"], hp.num_layers))
    except (KeyError, RuntimeError) as error:
        raise ArtifactError(f"{path}: tensors do not fit the model ({error})") from None
    return model.to(runtime.device)

def report_size_verdict(report: ArtifactReport, runtime: Runtime) -> int:
    """Exit status: non-zero when the submission is over the size limit."""
    if report.total_bytes <= SIZE_LIMIT_BYTES:
        return 0
    runtime.log(f"SIZE LIMIT EXCEEDED: total {report.total_bytes} bytes (limit {SIZE_LIMIT_BYTES}); exit status 1")
    return 1


# -----------------------------------------------------------------------------
# EVALUATION
# -----------------------------------------------------------------------------

# Scores are bits per byte: NLL in nats / ln 2 / UTF-8 bytes of the scored text,
# summed in float64 over all ranks. "Ordinal" o is the prediction of token o+1 from
# tokens 0..o; evaluation-time adaptation may only use ordinals already scored.

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

class ScoreSum:
    """Running float64 sums of NLL, tokens and bytes on this rank."""

    def __init__(self, runtime: Runtime):
        self.runtime, self.started = runtime, time.perf_counter()
        self.sums = torch.zeros(3, dtype=torch.float64, device=runtime.device)

    def add(self, nll: Tensor, previous: Tensor, targets: Tensor, token_bytes: TokenBytes) -> None:
        self.sums += torch.stack((nll.double().sum(), torch.tensor(float(nll.numel()), device=nll.device,
                                  dtype=torch.float64), count_bytes(token_bytes, previous, targets).sum()))

    def result(self) -> EvalResult:
        nll, tokens, count = self.runtime.all_reduce_sum(self.sums.clone()).tolist()
        return EvalResult(nll, tokens, count, time.perf_counter() - self.started)

def rank_share(items: list, runtime: Runtime) -> list:
    """A contiguous 1/world_size of the items."""
    return items[len(items) * runtime.rank // runtime.world_size : len(items) * (runtime.rank + 1) // runtime.world_size]

@torch.no_grad()
def evaluate_standard(model: nn.Module, val_tokens: Tensor, seq_len: int, batch_tokens: int,
                      token_bytes: TokenBytes, runtime: Runtime) -> EvalResult:
    """Non-overlapping sequences of seq_len, each position scored with what precedes it in its sequence."""
    was_training = model.training
    model.eval()
    score = ScoreSum(runtime)
    starts = rank_share(list(range(0, val_tokens.numel() - seq_len, seq_len)), runtime)
    per_batch = max(1, batch_tokens // (seq_len * runtime.world_size))
    for first in range(0, len(starts), per_batch):
        rows = torch.stack([val_tokens[s : s + seq_len + 1] for s in starts[first : first + per_batch]]).to(runtime.device)
        with runtime.autocast():
            logits = model(rows[:, :-1])
        nll = F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten(), reduction="none")
        score.add(nll, rows[:, :-1].flatten(), rows[:, 1:].flatten(), token_bytes)
    model.train(was_training)
    return score.result()

def sliding_windows(num_ordinals: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) of each window; every ordinal is scored exactly once.

    Window k ends at min(seq_len + k*stride, N), is seq_len long where the data allows,
    and scores the ordinals after the previous window's end: all of the first window,
    then `stride` new ordinals per window, each with at least seq_len - stride of context.
    """
    windows, scored_to = [], 0
    while scored_to < num_ordinals:
        end = min(max(scored_to + stride, seq_len), num_ordinals)
        windows.append((max(end - seq_len, 0), end, scored_to))
        scored_to = end
    return windows

def context_masks(windows: list[tuple[int, int, int]], mode: str, device: torch.device) -> Tensor:
    """[B, T] bool: the positions whose targets a SLOT delta may be fitted on.

    window/shared: each window's own already-scored ordinals (< its first scored).
    batch_causal: only ordinals scored before this batch's first window.
    """
    length = windows[0][1] - windows[0][0]
    positions = torch.arange(length, device=device)
    starts = torch.tensor([start for start, _, _ in windows], device=device)[:, None]
    limits = torch.tensor([first for _, _, first in windows], device=device)[:, None]
    if mode == "batch_causal":
        limits = limits.min().expand_as(limits)
    return starts + positions < limits

def fit_slot_delta(model: GPT, hidden: Tensor, targets: Tensor, mask: Tensor, hp: Hyperparameters,
                   runtime: Runtime) -> Tensor:
    """Context-only SLOT: an additive vector on the final hidden states, fitted by AdamW to
    the masked (already scored) targets with the model frozen. One delta per window in
    `window` mode; one per batch otherwise."""
    per_window = hp.slot_mode == "window"
    delta = torch.zeros(hidden.size(0) if per_window else 1, 1, hidden.size(-1), device=hidden.device, requires_grad=True)
    optimizer = torch.optim.AdamW([delta], lr=hp.slot_lr, weight_decay=1e-8, eps=1e-5)
    weights = mask.float()
    if per_window:  # a mean per window, summed: each window's gradient is its own
        weights = weights / weights.sum(1, keepdim=True).clamp_min(1)
    else:
        weights = weights / weights.sum().clamp_min(1)
    for _ in range(hp.slot_steps):
        with runtime.autocast():
            logits = model.logits(hidden + delta)
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        optimizer.zero_grad(set_to_none=True)
        (nll * weights.flatten()).sum().backward()
        optimizer.step()
    return delta.detach()

def score_windows(model: GPT, hidden_fn: Callable, val_tokens: Tensor, windows: list[tuple[int, int, int]],
                  hp: Hyperparameters, runtime: Runtime, slot: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """NLL of each window's scored ordinals: (nll, previous tokens, targets, ordinals), flat."""
    rows = torch.stack([val_tokens[start : end + 1] for start, end, _ in windows]).to(runtime.device)
    inputs, targets = rows[:, :-1], rows[:, 1:]
    with torch.no_grad(), runtime.autocast():
        hidden = hidden_fn(inputs)
    if slot:
        with torch.enable_grad():
            hidden = hidden.float() + fit_slot_delta(model, hidden.float(), targets, context_masks(windows, hp.slot_mode, runtime.device), hp, runtime)
    with torch.no_grad(), runtime.autocast():
        logits = model.logits(hidden)
    scored = ~context_masks(windows, "window", runtime.device)
    nll = F.cross_entropy(logits.float()[scored], targets[scored], reduction="none")
    ordinals = torch.tensor([start for start, _, _ in windows], device=runtime.device)[:, None] + torch.arange(rows.size(1) - 1, device=runtime.device)
    return nll, inputs[scored], targets[scored], ordinals[scored]

def evaluate_sliding(model: GPT, val_tokens: Tensor, hp: Hyperparameters, token_bytes: TokenBytes,
                     runtime: Runtime, slot: bool, nll_out: Tensor | None = None) -> EvalResult:
    """Sliding-window evaluation, optionally with context-only SLOT. nll_out (length N,
    single process) receives each ordinal's NLL, for the legality tests."""
    was_training, trainable = model.training, [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    hidden_fn = torch.compile(model.forward_hidden, dynamic=False) if runtime.device.type == "cuda" else model.forward_hidden
    windows = rank_share(sliding_windows(val_tokens.numel() - 1, hp.eval_seq_len, hp.eval_stride), runtime)
    score = ScoreSum(runtime)
    for first in range(0, len(windows), hp.eval_batch_seqs):
        nll, previous, targets, ordinals = score_windows(model, hidden_fn, val_tokens, windows[first : first + hp.eval_batch_seqs], hp, runtime, slot)
        score.add(nll, previous, targets, token_bytes)
        if nll_out is not None:
            nll_out[ordinals.cpu()] = nll.double().cpu()
    model.train(was_training)
    for param, flag in zip(model.parameters(), trainable):
        param.requires_grad_(flag)
    return score.result()

def evaluate_ttt(model: GPT, val_tokens: Tensor, hp: Hyperparameters, token_bytes: TokenBytes,
                 runtime: Runtime, nll_out: Tensor | None = None) -> EvalResult:
    """Score-first test-time training on a copy of the model.

    The validation ordinals are cut into chunks; each window belongs to the chunk of its
    first scored ordinal. Each chunk's windows are scored first, then the copy trains on
    that chunk's (now scored) tokens, so a score never depends on a token after it.
    """
    model = copy.deepcopy(model)
    num_ordinals = val_tokens.numel() - 1
    num_chunks = -(-num_ordinals // hp.ttt_chunk_tokens)
    chunks: list[list[tuple[int, int, int]]] = [[] for _ in range(num_chunks)]
    all_windows = sliding_windows(num_ordinals, hp.eval_seq_len, hp.eval_stride)
    for window in all_windows:
        chunks[min(window[2] // hp.ttt_chunk_tokens, num_chunks - 1)].append(window)
    frozen = tuple(f"blocks.{i}." for i in range(hp.ttt_freeze_blocks))
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith(frozen))
        if param.requires_grad:
            param.grad = torch.zeros_like(param)  # zeroed in place each batch, reduced as one set
            params.append(param)
    optimizer = torch.optim.SGD(params, lr=hp.ttt_lr, momentum=hp.ttt_momentum)
    runtime.log(f"ttt_sliding:start chunks={num_chunks} chunk_tokens={hp.ttt_chunk_tokens} total_windows={len(all_windows)} "
                f"stride={hp.eval_stride} ttt_lr={hp.ttt_lr} ttt_epochs={hp.ttt_epochs} freeze_blocks={hp.ttt_freeze_blocks}")
    score = ScoreSum(runtime)
    for index, windows in enumerate(chunks):
        model.eval()
        mine = rank_share(windows, runtime)
        for first in range(0, len(mine), hp.eval_batch_seqs):
            nll, previous, targets, ordinals = score_windows(model, model.forward_hidden, val_tokens, mine[first : first + hp.eval_batch_seqs], hp, runtime, slot=False)
            score.add(nll, previous, targets, token_bytes)
            if nll_out is not None:
                nll_out[ordinals.cpu()] = nll.double().cpu()
        if index < num_chunks - 1:
            chunk_end = min((index + 1) * hp.ttt_chunk_tokens, num_ordinals)
            lr = hp.ttt_lr * 0.5 * (1 + math.cos(math.pi * index / max(num_chunks - 1, 1)))
            train_on_chunk(model, params, optimizer, val_tokens, index * hp.ttt_chunk_tokens, chunk_end, lr, hp, runtime)
        if index % 10 == 0 or index == num_chunks - 1:
            so_far = EvalResult(*score.sums.tolist(), 0.0)
            runtime.log(f"  ttt_chunk [{index + 1}/{num_chunks}] bpb={so_far.bpb if so_far.bytes else 0.0:.6f} "
                        f"time={time.perf_counter() - score.started:.1f}s")
    return score.result()

def train_on_chunk(model: GPT, params: list[nn.Parameter], optimizer: torch.optim.Optimizer, val_tokens: Tensor,
                   chunk_start: int, chunk_end: int, lr: float, hp: Hyperparameters, runtime: Runtime) -> None:
    """TTT_EPOCHS of SGD on the chunk's whole sequences (targets stay inside the chunk).

    Batches are the same whatever the world size; each rank takes its share of every
    batch (possibly none) and the gradients are summed, weighted by sequences, so the
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
                rows = torch.stack([val_tokens[s : s + length + 1] for s in mine]).to(runtime.device)
                with runtime.autocast():
                    loss = model(rows[:, :-1], rows[:, 1:])
                (loss * len(mine) / len(batch)).backward()
            if runtime.distributed:  # one collective for all gradients
                flat = torch.cat([param.grad.flatten() for param in params])
                dist.all_reduce(flat)
                for param, reduced in zip(params, flat.split([param.numel() for param in params])):
                    param.grad.copy_(reduced.view_as(param))
            torch.nn.utils.clip_grad_norm_(params, hp.ttt_grad_clip)
            optimizer.step()

def log_result(runtime: Runtime, name: str, result: EvalResult, extra: str = "") -> None:
    runtime.log(f"{name} val_loss:{result.loss:.4f} val_bpb:{result.bpb:.4f} {extra}eval_time:{1000 * result.seconds:.0f}ms")
    runtime.log(f"{name}_exact val_loss:{result.loss:.8f} val_bpb:{result.bpb:.8f}")

def log_post_ema_diagnostic(hp: Hyperparameters, model: GPT, data: "EvalData", runtime: Runtime) -> None:
    result = evaluate_standard(model, data.val_tokens, hp.train_seq_len, hp.val_batch_size, data.token_bytes, runtime)
    runtime.log(f"DIAGNOSTIC post_ema val_loss:{result.loss:.4f} val_bpb:{result.bpb:.4f} eval_time:{1000 * result.seconds:.0f}ms")

def evaluate_artifact(hp: Hyperparameters, model: GPT, data: "EvalData", runtime: Runtime) -> None:
    """Round trip, sliding window (with SLOT when enabled), TTT when enabled; names the score that counts."""
    roundtrip = evaluate_standard(compile_if_enabled(hp, model, runtime), data.val_tokens, hp.eval_seq_len,
                                  hp.val_batch_size, data.token_bytes, runtime)
    log_result(runtime, "final_int6_roundtrip", roundtrip)
    slot = hp.slot_enabled and hp.slot_steps > 0
    if slot and hp.slot_mode == "shared":
        runtime.log("slot:mode shared is NOT causal: one delta per batch is fitted on later windows' context, "
                    "which holds earlier windows' scored tokens; its score is not a legal submission")
    sliding = evaluate_sliding(model, data.val_tokens, hp, data.token_bytes, runtime, slot)
    log_result(runtime, "final_int6_sliding_window", sliding, f"stride:{hp.eval_stride} ")
    counted, name, seconds = sliding, "final_int6_sliding_window_exact", roundtrip.seconds + sliding.seconds
    if hp.ttt_enabled:
        ttt = evaluate_ttt(model, data.val_tokens, hp, data.token_bytes, runtime)
        log_result(runtime, "legal_ttt", ttt)
        counted, name, seconds = ttt, "legal_ttt_exact", seconds + ttt.seconds
    legal = "no (SLOT_MODE=shared leaks)" if slot and hp.slot_mode == "shared" and name.startswith("final") else "yes"
    runtime.log(f"final_score {name} val_bpb:{counted.bpb:.8f} slot:{hp.slot_mode if slot else 'off'} "
                f"legal:{legal} eval_total_time:{1000 * seconds:.0f}ms")


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

class LateQAT:
    """Fake-quantises the small projections once the LR multiplier falls below the threshold.

    The sharpness lives in a tensor so torch.compile sees one graph, not one per value.
    """

    def __init__(self, hp: Hyperparameters, model: GPT, device: torch.device):
        self.hp, self.model = hp, model
        self.sharpness = torch.ones((), device=device)
        self.start_step: int | None = None

    def update(self, step: int, lr_mul: float, runtime: Runtime) -> None:
        hp = self.hp
        if self.start_step is None:
            if hp.late_qat_threshold <= 0 or lr_mul >= hp.late_qat_threshold or step < hp.late_qat_min_step:
                return
            self.start_step = step
            self.model.set_late_qat(self.sharpness)
            runtime.log(f"late_qat:enabled step:{step} scale:{lr_mul:.4f}")
        progress = min((step - self.start_step) / 500, 1.0)
        self.sharpness.fill_(1.0 + 15.0 * progress)

class StopSignals:
    """Per-step stop flags (non-finite loss, wall-clock cap reached), agreed by all ranks.

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
        if self.runtime.distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        event = None
        if flags.is_cuda:
            host = torch.empty(2, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            flags = host
        previous, self.in_flight = self.in_flight, (step, flags, event)
        if event is None:  # CPU: the values are already here
            return self.drain()
        return self.read(previous) if previous is not None else None

    def drain(self) -> tuple[int, bool, bool] | None:
        pending, self.in_flight = self.in_flight, None
        return self.read(pending) if pending is not None else None

    @staticmethod
    def read(pending: tuple[int, Tensor, Any]) -> tuple[int, bool, bool]:
        step, flags, event = pending
        if event is not None:
            event.synchronize()
        not_finite, cap = flags.tolist()
        return step, bool(not_finite), bool(cap)

class NonFiniteLoss(RuntimeError):
    pass

def train_step(train_model: nn.Module, optimizers: Optimizers, batches: list[tuple[Tensor, Tensor]],
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

def make_sampler(hp: Hyperparameters, runtime: Runtime, accum_steps: int) -> TokenSampler:
    return TokenSampler(hp.train_files, hp.train_seq_len, hp.train_batch_tokens // hp.train_seq_len,
                        runtime.rank, runtime.world_size, accum_steps)

def warm_up_and_reset(hp: Hyperparameters, model: GPT, train_model: nn.Module, optimizers: Optimizers,
                      qat: LateQAT, runtime: Runtime, accum_steps: int) -> None:
    """Run WARMUP_STEPS real steps to compile and prime kernels, then undo them.

    The last warm-up step runs with late QAT on, so its graph is compiled now rather
    than in the middle of the timed run.
    """
    if hp.warmup_steps <= 0:
        return
    initial_weights = {name: t.detach().clone() for name, t in model.state_dict().items()}
    initial_states = [copy.deepcopy(optimizer.state_dict()) for optimizer in optimizers.all()]
    sampler = make_sampler(hp, runtime, accum_steps)
    for step in range(hp.warmup_steps):
        if step == hp.warmup_steps - 1 and hp.late_qat_threshold > 0:
            model.set_late_qat(qat.sharpness)
        train_step(train_model, optimizers, sampler.next_step(runtime.device), hp, runtime)
        runtime.log(f"warmup_step:{step + 1}/{hp.warmup_steps}")
    model.set_late_qat(None)
    model.load_state_dict(initial_weights)
    for optimizer, state in zip(optimizers.all(), initial_states):
        optimizer.load_state_dict(state)
    optimizers.zero_grad()

def train(hp: Hyperparameters, model: GPT, data: "EvalData", runtime: Runtime) -> None:
    """The timed loop: wall-clock LR schedule, EMA, late QAT, periodic validation."""
    accum_steps = hp.grad_accum_steps or 8 // runtime.world_size
    train_model = compile_if_enabled(hp, model, runtime)
    optimizers = build_optimizers(hp, model, runtime.device)
    qat = LateQAT(hp, model, runtime.device)
    warm_up_and_reset(hp, model, train_model, optimizers, qat, runtime, accum_steps)
    sampler = make_sampler(hp, runtime, accum_steps)
    ema = ExponentialMovingAverage(model, hp.ema_decay)
    signals = StopSignals(runtime)
    cap_ms = None
    if hp.max_wallclock_seconds > 0:
        cap_ms = 1000.0 * hp.max_wallclock_seconds - hp.gptq_reserve_ms
        runtime.log(f"gptq:reserving {hp.gptq_reserve_ms:.0f}ms from training budget, effective={cap_ms:.0f}ms")
    training_ms, step, stop_after = 0.0, 0, None
    runtime.synchronize()
    started = time.perf_counter()
    while True:
        last_step = step == hp.iterations or (stop_after is not None and step >= stop_after)
        if last_step or (hp.val_loss_every > 0 and step % hp.val_loss_every == 0):
            runtime.synchronize()
            training_ms += 1000.0 * (time.perf_counter() - started)
            result = evaluate_standard(train_model, data.val_tokens, hp.train_seq_len, hp.val_batch_size,
                                       data.token_bytes, runtime)
            runtime.log(f"step:{step}/{hp.iterations} val_loss:{result.loss:.4f} val_bpb:{result.bpb:.4f} "
                        f"train_time:{training_ms:.0f}ms step_avg:{training_ms / max(step, 1):.2f}ms")
            started = time.perf_counter()
        if last_step:
            if stop_after is not None and step < hp.iterations:
                runtime.log(f"stopping_early: wallclock_cap train_time:{training_ms:.0f}ms step:{step}/{hp.iterations}")
            break
        elapsed_ms = training_ms + 1000.0 * (time.perf_counter() - started)
        lr_mul = lr_multiplier(hp, step, elapsed_ms, cap_ms)
        optimizers.set_schedule(lr_mul, muon_momentum_at(hp, step))
        qat.update(step, lr_mul, runtime)
        loss = train_step(train_model, optimizers, sampler.next_step(runtime.device), hp, runtime)
        ema.update()
        step += 1
        elapsed_ms = training_ms + 1000.0 * (time.perf_counter() - started)
        signal = signals.push(step, loss, cap_ms is not None and elapsed_ms >= cap_ms)
        if hp.train_log_every > 0 and (step <= 10 or step % hp.train_log_every == 0 or stop_after is not None):
            mean_loss = runtime.all_reduce_sum(loss.detach().clone()) / runtime.world_size
            runtime.log(f"step:{step}/{hp.iterations} train_loss:{mean_loss.item():.4f} "
                        f"train_time:{elapsed_ms:.0f}ms step_avg:{elapsed_ms / step:.2f}ms")
        if signal is not None:
            flagged_step, not_finite, cap_reached = signal
            if not_finite:
                raise NonFiniteLoss(f"training loss is not finite at step {flagged_step}; stopping "
                                    f"(lower MATRIX_LR / TIED_EMBED_LR or check the data)")
            if cap_reached and stop_after is None:
                stop_after = step
    if runtime.device.type == "cuda":
        runtime.log(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
                    f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
    runtime.log("ema:applying EMA weights")
    ema.copy_to_model()
    model.set_late_qat(None)

def compile_if_enabled(hp: Hyperparameters, model: nn.Module, runtime: Runtime) -> nn.Module:
    enabled = hp.compile == "1" or (hp.compile == "auto" and runtime.device.type == "cuda")
    return torch.compile(model, dynamic=False) if enabled else model


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
        print(f"smoke: no FineWeb shards under {Hyperparameters().data_path}; running the embedded default "
              "(SMOKE=1). Download FineWeb with data/download_fineweb.py for the real run.", flush=True)
        environ["SMOKE"] = "1"
    return environ

def start_runtime(hp: Hyperparameters) -> Runtime:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world_size < 1 or 8 % world_size:
        raise ConfigError(f"WORLD_SIZE={world_size} is not allowed: must divide 8 (1, 2, 4 or 8 processes)")
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        enable_flash_attention_3(device)
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    runtime = Runtime(rank=rank, world_size=world_size, local_rank=local_rank, device=device)
    if runtime.is_main:
        os.makedirs("logs", exist_ok=True)
        runtime.log_path = Path("logs") / f"{hp.run_id or uuid.uuid4()}.txt"
        print(runtime.log_path, flush=True)
    torch.manual_seed(hp.seed)
    np.random.seed(hp.seed)
    return runtime

def resolve_tokenizer_path(hp: Hyperparameters) -> Path:
    """TOKENIZER_PATH as given, or (for the default) the copy vendored beside this script."""
    path = Path(hp.tokenizer_path)
    if not path.exists() and hp.tokenizer_path == Hyperparameters().tokenizer_path:
        here = Path(__file__).resolve().parent
        path = next((p / hp.tokenizer_path for p in (here, here.parent) if (p / hp.tokenizer_path).exists()), path)
    if not path.exists():
        raise ConfigError(f"TOKENIZER_PATH={hp.tokenizer_path!r} is not allowed: no such file")
    return path

def load_tokenizer(hp: Hyperparameters) -> Any:
    path = resolve_tokenizer_path(hp)
    try:
        tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as error:
        raise ConfigError(f"TOKENIZER_PATH={str(path)!r} is not allowed: not a SentencePiece model ({error})") from None
    if tokenizer.vocab_size() != hp.vocab_size:
        raise ConfigError(f"VOCAB_SIZE={hp.vocab_size} is not allowed: the tokenizer {path} has "
                          f"{tokenizer.vocab_size()} pieces")
    return tokenizer

@dataclass
class EvalData:
    val_tokens: Tensor
    token_bytes: "TokenBytes"

def load_data(hp: Hyperparameters, runtime: Runtime) -> EvalData:
    tokenizer = load_tokenizer(hp)
    if hp.smoke:  # rank 0 builds the corpus once; every rank waits, whoever saw what
        if runtime.is_main and not glob.glob(hp.train_files):
            build_smoke_corpus(hp.data_path, tokenizer)
        if runtime.distributed:
            dist.barrier()
    val_tokens = load_validation_tokens(hp.val_files, max(hp.train_seq_len, hp.eval_seq_len))
    runtime.log(f"val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path={hp.tokenizer_path}")
    runtime.log(f"train_loader:dataset:{Path(hp.data_path).name} train_shards:{len(shard_paths(hp.train_files))}")
    runtime.log(f"val_loader:shards pattern={hp.val_files} tokens:{val_tokens.numel() - 1}")
    return EvalData(val_tokens=val_tokens, token_bytes=build_token_bytes(tokenizer, hp.vocab_size, runtime.device))

def log_run_header(hp: Hyperparameters, model: GPT, runtime: Runtime) -> None:
    accum_steps = hp.grad_accum_steps or 8 // runtime.world_size
    runtime.log(f"model_params:{sum(p.numel() for p in model.parameters())}")
    xsa_layers = [i for i, block in enumerate(model.blocks) if block.attn.use_xsa]
    runtime.log(f"XSA:last_{hp.xsa_last_n} active_layers:{xsa_layers}")
    runtime.log(f"world_size:{runtime.world_size} grad_accum_steps:{accum_steps}")
    backend = "flash_attention_3" if FLASH_ATTENTION_3 is not None else "sdpa"
    runtime.log(f"attention_backend:{backend} attention_mode:gqa num_heads:{hp.num_heads} num_kv_heads:{hp.num_kv_heads}")
    runtime.log(f"tie_embeddings:True embed_lr:{hp.tied_embed_lr} head_lr:0.0 matrix_lr:{hp.matrix_lr} "
                f"scalar_lr:{hp.scalar_lr} matrix_lr_early:{hp.matrix_lr_early} matrix_lr_late:{hp.matrix_lr_late} "
                f"bank_split:{hp.bank_split} muon_eq_r:{int(hp.muon_eq_r)}")
    runtime.log(f"train_batch_tokens:{hp.train_batch_tokens} train_seq_len:{hp.train_seq_len} "
                f"iterations:{hp.iterations} warmup_steps:{hp.warmup_steps} "
                f"max_wallclock_seconds:{hp.max_wallclock_seconds:.3f}")
    runtime.log(f"seed:{hp.seed}")
    if runtime.device.type == "cuda":
        runtime.log(f"hardware: {runtime.world_size}x{torch.cuda.get_device_name(runtime.device)}")
    else:
        runtime.log(f"hardware: {runtime.world_size}xCPU ({os.cpu_count()} cores)")
    runtime.log(f"torch:{torch.__version__} python:{sys.version.split()[0]}", console=False)

def main() -> int:
    hp = Hyperparameters.from_env(environ_with_profile())
    runtime = start_runtime(hp)
    try:
        data = load_data(hp, runtime)
        model = build_model(hp).to(runtime.device)
        log_run_header(hp, model, runtime)
        train(hp, model, data, runtime)
        log_post_ema_diagnostic(hp, model, data, runtime)
        artifact = export_artifact(hp, model, runtime)
        quantized = load_quantized_model(hp, artifact.path, runtime)
        evaluate_artifact(hp, quantized, data, runtime)
        if runtime.distributed:  # no rank tears the group down while another still talks
            dist.barrier()
        return report_size_verdict(artifact, runtime)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

def run_cli() -> int:
    """Entry point: a bad setting or file ends the run with one clear line, not a traceback."""
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print(__doc__ or "", describe_settings(), sep="\n")
        return 0
    try:
        return main()
    except (ConfigError, DataError, ArtifactError, NonFiniteLoss) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(run_cli())
