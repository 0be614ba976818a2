"""Data: validation tokens, the two records' training samplers, the smoke corpus.

TRAIN_SAMPLER picks the sampler: the PR #1217 record's coprime-stride mix of shards, or
the PR #1493 record's per-rank shuffle. The smoke corpus is built from the vendored text
on first use, with the profile's tokenizer.
"""

from __future__ import annotations

import glob
import json
import lzma
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from trainer.files import bundled_file, file_sha256, write_atomic
from trainer.shards import BOS_ID, MANIFEST, read_shard, write_shard
from trainer.runtime import Runtime
from trainer.settings import Hyperparameters, InputError

SMOKE_TEXT = "data/smoke/pydoc_text.json.xz"  # the smoke run's text (tools/build_smoke_text.py)


def check_vocabulary(shards: list[np.ndarray], paths: list[Path], vocab_size: int, runtime: Runtime) -> None:
    """Every token id < vocab_size; the ranks share the reading and agree on the verdict."""
    first_bad = torch.tensor(len(paths), device=runtime.device)
    for index in range(runtime.rank, len(paths), runtime.world_size):
        if shards[index].size and int(shards[index].max()) >= vocab_size:
            first_bad.fill_(index)
            break
    bad = int(runtime.all_reduce_(first_bad, "min"))
    if bad < len(paths):
        raise InputError(f"{paths[bad]}: holds token ids >= VOCAB_SIZE={vocab_size} (made with another tokenizer?)")

def shard_paths(pattern: str) -> list[Path]:
    paths = [Path(p) for p in sorted(glob.glob(pattern))]
    if not paths:
        raise InputError(f"no shards match {pattern} (set DATA_PATH, or run tools/download_fineweb.py)")
    return paths

def load_validation_tokens(pattern: str, seq_len: int, vocab_size: int, runtime: Runtime) -> Tensor:
    """All validation shards concatenated, cut to a multiple of seq_len, plus one target."""
    paths = shard_paths(pattern)
    shards = [read_shard(path) for path in paths]
    check_vocabulary(shards, paths, vocab_size, runtime)
    tokens = np.concatenate([np.asarray(shard) for shard in shards])
    usable = (tokens.size - 1) // seq_len * seq_len
    if usable <= 0:
        raise InputError(f"{pattern}: {tokens.size} validation tokens are fewer than one sequence of {seq_len}")
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

class CoprimeSampler:
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
            raise InputError(f"TRAIN_BATCH_TOKENS/TRAIN_SEQ_LEN={windows_per_step} windows is not allowed: "
                              f"must be a multiple of WORLD_SIZE*GRAD_ACCUM_STEPS={world_size * accum_steps}")
        self.paths = shard_paths(pattern)
        self.shards = [read_shard(path) for path in self.paths]
        self.seq_len, self.windows_per_step = seq_len, windows_per_step
        self.rank, self.world_size, self.accum_steps = rank, world_size, accum_steps
        self.eligible = [i for i, shard in enumerate(self.shards) if shard.size > seq_len]
        if not self.eligible:
            raise InputError(f"{pattern}: no shard holds a full window of {seq_len + 1} tokens")
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

class ShuffledSampler:
    """The PR #1493 record's sampler. Each rank reads only its own shards (every world-size-th
    file); each shard's sequences come in a random order from a random phase, and every
    sequence of a micro-batch is drawn from a shard chosen with probability proportional to
    the sequences it has left; when all of the rank's shards are used up, all start again.
    As in the record, the generator is seeded with the rank alone, so the order is the same
    for every SEED and differs between world sizes (docs/design.md)."""

    def __init__(self, pattern: str, seq_len: int, windows_per_step: int, rank: int, world_size: int, accum_steps: int):
        if windows_per_step % (world_size * accum_steps):
            raise InputError(f"TRAIN_BATCH_TOKENS/TRAIN_SEQ_LEN={windows_per_step} windows is not allowed: "
                             f"must be a multiple of WORLD_SIZE*GRAD_ACCUM_STEPS={world_size * accum_steps}")
        paths = shard_paths(pattern)
        self.paths = paths[rank::world_size]
        if not self.paths:
            raise InputError(f"{pattern}: {len(paths)} shards cannot give each of {world_size} ranks its own")
        self.shards = [read_shard(path) for path in self.paths]
        self.seq_len, self.accum_steps = seq_len, accum_steps
        self.per_micro_step = windows_per_step // (world_size * accum_steps)
        self.rng = np.random.Generator(np.random.PCG64(rank))
        self.starts = [self.shuffled_starts(shard.size) for shard in self.shards]
        if not any(self.starts):
            raise InputError(f"{pattern}: no shard of rank {rank} holds a full window of {seq_len + 1} tokens")

    def shuffled_starts(self, num_tokens: int) -> list[int]:
        """A shard's window starts for one pass, in the order they are taken (from the end)."""
        max_phase = min(self.seq_len - 1, max(0, num_tokens - self.seq_len - 1))
        phase = int(self.rng.integers(max_phase + 1)) if max_phase > 0 else 0
        return (phase + self.rng.permutation(max((num_tokens - 1 - phase) // self.seq_len, 0)) * self.seq_len).tolist()

    def micro_batch(self) -> np.ndarray:
        left = np.array([len(starts) for starts in self.starts], dtype=np.float64)
        rows = []
        for _ in range(self.per_micro_step):
            if left.sum() <= 0:
                self.starts = [self.shuffled_starts(shard.size) for shard in self.shards]
                left = np.array([len(starts) for starts in self.starts], dtype=np.float64)
            shard = int(self.rng.choice(len(self.shards), p=left / left.sum()))
            start = self.starts[shard].pop()
            left[shard] -= 1
            rows.append(self.shards[shard][start : start + self.seq_len + 1])
        return np.stack(rows)

    def next_step(self, runtime: Runtime) -> list[tuple[Tensor, Tensor]]:
        """This rank's (inputs, targets) for each micro-step of the next step."""
        batches = []
        for _ in range(self.accum_steps):
            rows = runtime.to_device(torch.from_numpy(self.micro_batch().astype(np.int64)))
            batches.append((rows[:, :-1], rows[:, 1:]))
        return batches


def make_sampler(hp: Hyperparameters, runtime: Runtime) -> CoprimeSampler | ShuffledSampler:
    kind = CoprimeSampler if hp.train_sampler == "coprime" else ShuffledSampler
    return kind(hp.train_files, hp.train_seq_len, hp.train_batch_tokens // hp.train_seq_len,
                runtime.rank, runtime.world_size, runtime.accum_steps)

def build_smoke_corpus(data_path: str | Path, tokenizer: Any, tokenizer_path: str | Path) -> None:
    """Shards for the smoke run from the vendored text, and a manifest naming the
    tokenizer that made them; never replaces a file."""
    try:
        text = json.loads(lzma.decompress(bundled_file(SMOKE_TEXT).read_bytes()))
    except (OSError, lzma.LZMAError, ValueError) as error:
        raise InputError(f"{SMOKE_TEXT}: cannot read the smoke corpus ({error})") from None
    made = []
    for split in ("val", "train"):
        tokens = np.concatenate([[BOS_ID] + ids for ids in tokenizer.encode(text[split])])
        try:
            write_shard(Path(data_path) / f"fineweb_{split}_000000.bin", tokens, overwrite=False)
            made.append(split)
        except FileExistsError:
            pass  # built before, or by another process at the same moment
    if "train" in made:
        manifest = {"text": SMOKE_TEXT, "tokenizer_sha256": file_sha256(tokenizer_path)}
        write_atomic(Path(data_path) / MANIFEST, json.dumps(manifest).encode())
