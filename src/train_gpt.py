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

import base64
import copy
import glob
import io
import json
import lzma
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
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
    def from_env(cls, environ: dict[str, str] | None = None) -> "Hyperparameters":
        """Defaults, then the SMOKE profile, then every variable that is set."""
        environ = dict(os.environ if environ is None else environ)
        values: dict[str, Any] = {}
        smoke = parse_setting(cls, "smoke", environ["SMOKE"]) if "SMOKE" in environ else False
        if smoke:
            values.update(SMOKE_PROFILE)
        for spec in fields(cls):
            env_name = spec.metadata["env"]
            if env_name in environ:
                values[spec.name] = parse_setting(cls, spec.name, environ[env_name])
        hp = cls(**values)
        hp.validate()
        return hp

    def validate(self) -> None:
        def bad(env: str, value: Any, allowed: str) -> ConfigError:
            return ConfigError(f"{env}={value!r} is not allowed: {allowed}")

        for name in ("num_layers", "model_dim", "num_heads", "num_kv_heads", "vocab_size",
                     "train_seq_len", "eval_seq_len", "train_batch_tokens", "eval_stride", "eval_batch_seqs"):
            if getattr(self, name) <= 0:
                raise bad(env_of(name), getattr(self, name), "must be a positive integer")
        if self.model_dim % self.num_heads:
            raise bad("NUM_HEADS", self.num_heads, f"must divide MODEL_DIM={self.model_dim}")
        if self.num_heads % self.num_kv_heads:
            raise bad("NUM_KV_HEADS", self.num_kv_heads, f"must divide NUM_HEADS={self.num_heads}")
        head_dim = self.model_dim // self.num_heads
        if head_dim % 2 or not 0 <= self.rope_dims <= head_dim or self.rope_dims % 2:
            raise bad("ROPE_DIMS", self.rope_dims, f"must be even and at most the head dim {head_dim} (head dim must be even)")
        if self.rope_dims == 2:
            raise bad("ROPE_DIMS", self.rope_dims, "must be 0 (all dims) or at least 4 (the long-context base scaling divides by ROPE_DIMS-2)")
        if self.mlp_mult <= 0 or (self.mlp_mult * self.model_dim) % 1:
            raise bad("MLP_MULT", self.mlp_mult, "must be positive and give an integer hidden width")
        if self.bigram_vocab_size == 1 or self.bigram_vocab_size < 0:
            raise bad("BIGRAM_VOCAB_SIZE", self.bigram_vocab_size, "must be 0 (off) or at least 2")
        if self.ve_enabled:
            for layer in self.value_embedding_layers:
                if not 0 <= layer < self.num_layers:
                    raise bad("VE_LAYERS", self.ve_layers, f"layers must lie in 0..{self.num_layers - 1}")
        if not 0 <= self.xsa_last_n <= self.num_layers:
            raise bad("XSA_LAST_N", self.xsa_last_n, f"must lie in 0..NUM_LAYERS={self.num_layers}")
        if self.slot_mode not in SLOT_MODES:
            raise bad("SLOT_MODE", self.slot_mode, f"one of {', '.join(SLOT_MODES)}")
        if self.compile not in ("auto", "0", "1"):
            raise bad("COMPILE", self.compile, "auto, 0 or 1")
        if self.eval_stride > self.eval_seq_len:
            raise bad("EVAL_STRIDE", self.eval_stride, f"must be at most EVAL_SEQ_LEN={self.eval_seq_len}")
        if not 0 <= self.bank_split <= self.num_layers:
            raise bad("BANK_SPLIT", self.bank_split, f"must lie in 0..NUM_LAYERS={self.num_layers}")
        if not 1 <= self.quant_clip_range <= 127:
            raise bad("QUANT_CLIP_RANGE", self.quant_clip_range, "must lie in 1..127")
        if self.grad_accum_steps < 0:
            raise bad("GRAD_ACCUM_STEPS", self.grad_accum_steps, "must be 0 (automatic) or positive")

    @property
    def value_embedding_layers(self) -> list[int]:
        if not self.ve_enabled:
            return []
        try:
            return [int(part) for part in self.ve_layers.split(",") if part.strip()]
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
    muon_momentum_warmup_steps=100, matrix_lr_early=0.02, matrix_lr_late=0.025, late_qat_min_step=200,
    gptq_calib_samples=4, eval_seq_len=256, eval_stride=64, eval_batch_seqs=16, slot_steps=4,
    ttt_enabled=True, ttt_chunk_tokens=8192, ttt_epochs=1, ttt_batch_seqs=8,
)


def env_of(name: str) -> str:
    return next(spec.metadata["env"] for spec in fields(Hyperparameters) if spec.name == name)


def parse_setting(cls: type, name: str, raw: str) -> Any:
    """Parse one variable by the type of its field; a bad value names the variable."""
    spec = next(spec for spec in fields(cls) if spec.name == name)
    kind, env = spec.type, spec.metadata["env"]
    text = raw.strip()
    try:
        if kind == "bool":
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if kind == "int":
            return int(text)
        if kind == "float":
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
            return value
        return raw
    except ValueError:
        expected = {"bool": "0 or 1", "int": "an integer", "float": "a finite number"}[kind]
        raise ConfigError(f"{env}={raw!r} is not allowed: expected {expected}") from None


def describe_settings() -> str:
    """The --help text: every variable with its default and meaning."""
    lines = ["Environment variables (default in brackets):"]
    for spec in fields(Hyperparameters):
        lines.append(f"  {spec.metadata['env']:<28} [{spec.default}] {spec.metadata['help']}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# DATA
# -----------------------------------------------------------------------------
# A shard is 256 little-endian int32 (magic, version, token count, zeros) followed by
# that many little-endian uint16 tokens. Every document starts with BOS.

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4
BOS_ID = 1


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
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if int(header[0]) != SHARD_MAGIC:
        raise DataError(f"{path}: bad magic {int(header[0])}, expected {SHARD_MAGIC} (not a token shard)")
    if int(header[1]) != SHARD_VERSION:
        raise DataError(f"{path}: unsupported shard version {int(header[1])}, expected {SHARD_VERSION}")
    count = int(header[2])
    expected = SHARD_HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        raise DataError(f"{path}: file is {size} bytes but its header promises {count} tokens ({expected} bytes); truncated or corrupt")
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
    usable = ((tokens.size - 1) // seq_len) * seq_len
    if usable <= 0:
        raise DataError(f"{pattern}: {tokens.size} validation tokens are fewer than one sequence of {seq_len}")
    return torch.from_numpy(tokens[: usable + 1].astype(np.int64))


def fnv1a_seed(names: list[str]) -> int:
    seed = 0xCBF29CE484222325
    for byte in "\n".join(names).encode():
        seed = ((seed ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return seed


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
        self.stride = self.coprime_stride(self.num_blocks)
        self.taken = 0

    def coprime_stride(self, n: int) -> int:
        if n <= 1:
            return 1
        while True:
            stride = int(self.rng.integers(1, n))
            if math.gcd(stride, n) == 1:
                return stride

    @property
    def remaining(self) -> int:
        return self.num_blocks - self.taken

    def take(self, count: int) -> list[int]:
        """Start offsets of the next `count` windows (seq_len + 1 tokens each)."""
        offsets = []
        while len(offsets) < count:
            if self.remaining == 0:
                self.new_pass()
            block = (self.start + self.taken * self.stride) % self.num_blocks
            offsets.append(self.phase + block * self.seq_len)
            self.taken += 1
        return offsets


class TokenSampler:
    """The coprime-stride multi-shard sampler.

    Each step draws the step's global list of windows: a few shards, chosen with
    probability ~ remaining_blocks^alpha (alpha 0.9 -> 0.5 and 8 -> 32 shards over the
    first 1800 steps), interleaved round-robin. Every rank draws the same list (the RNG
    is seeded from the shard names) and keeps its own slice, so ranks never share a
    window. Micro-batch m of rank r takes windows[m*world + r :: world*accum]: the same
    windows land in the same micro-batch whatever the split between ranks and
    accumulation, which makes a 2-rank run the same math as 1 rank with 2 micro-steps.
    """

    def __init__(self, pattern: str, seq_len: int, windows_per_step: int, rank: int, world_size: int, accum_steps: int):
        self.paths = shard_paths(pattern)
        self.shards = [read_shard(path) for path in self.paths]
        self.seq_len, self.windows_per_step = seq_len, windows_per_step
        self.rank, self.world_size, self.accum_steps = rank, world_size, accum_steps
        if windows_per_step % (world_size * accum_steps):
            raise ConfigError(
                f"TRAIN_BATCH_TOKENS/TRAIN_SEQ_LEN={windows_per_step} windows is not allowed: "
                f"must be a multiple of WORLD_SIZE*GRAD_ACCUM_STEPS={world_size * accum_steps}")
        self.eligible = [i for i, shard in enumerate(self.shards) if (shard.size - 1) // seq_len > 0]
        if not self.eligible:
            raise DataError(f"{pattern}: no shard holds a full window of {seq_len + 1} tokens")
        self.rng = np.random.Generator(np.random.PCG64(fnv1a_seed([p.name for p in self.paths])))
        self.cursors: dict[int, ShardCursor] = {}
        self.steps_drawn = 0

    def remaining_blocks(self, shard: int) -> int:
        cursor = self.cursors.get(shard)
        if cursor is None:
            return (self.shards[shard].size - 1) // self.seq_len
        return max(cursor.remaining, 1)

    def draw_step_windows(self) -> list[tuple[int, int]]:
        """(shard, offset) of every window of the next step, all ranks together."""
        progress = min(self.steps_drawn / 1800.0, 1.0)
        total = self.windows_per_step
        remaining = np.array([self.remaining_blocks(s) for s in self.eligible], dtype=np.float64)
        probs = remaining ** (0.9 - 0.4 * progress)
        probs /= probs.sum()
        low = min(max(8, self.world_size), len(self.eligible), total)
        high = min(max(32, 8 * self.world_size), len(self.eligible), total)
        mix = max(1, int(round(low + progress * (high - low))))
        chosen = self.rng.choice(len(self.eligible), size=mix, replace=False, p=probs)
        counts = np.ones(mix, dtype=np.int64)
        if total > mix:
            chosen_probs = probs[chosen] / probs[chosen].sum()
            counts += self.rng.multinomial(total - mix, chosen_probs)
        buckets = []
        for index in self.rng.permutation(mix):
            shard = self.eligible[int(chosen[index])]
            cursor = self.cursors.setdefault(shard, ShardCursor(self.shards[shard].size, self.seq_len, self.rng))
            offsets = cursor.take(int(counts[index]))
            buckets.append([(shard, offsets[k]) for k in self.rng.permutation(len(offsets))])
        windows: list[tuple[int, int]] = []
        while buckets:  # round-robin in a fresh random order each round
            buckets = [buckets[k] for k in self.rng.permutation(len(buckets))]
            for bucket in buckets:
                windows.append(bucket.pop())
            buckets = [bucket for bucket in buckets if bucket]
        self.steps_drawn += 1
        return windows

    def micro_batch_windows(self, windows: list[tuple[int, int]], micro_step: int) -> list[tuple[int, int]]:
        return windows[micro_step * self.world_size + self.rank :: self.world_size * self.accum_steps]

    def next_step(self, device: torch.device) -> list[tuple[Tensor, Tensor]]:
        """This rank's (inputs, targets) for each micro-step of the next step."""
        windows = self.draw_step_windows()
        batches = []
        for micro_step in range(self.accum_steps):
            mine = self.micro_batch_windows(windows, micro_step)
            rows = np.stack([self.shards[s][o : o + self.seq_len + 1] for s, o in mine]).astype(np.int64)
            rows_t = torch.from_numpy(rows)
            if device.type == "cuda":
                rows_t = rows_t.pin_memory().to(device, non_blocking=True)
            batches.append((rows_t[:, :-1], rows_t[:, 1:]))
        return batches
