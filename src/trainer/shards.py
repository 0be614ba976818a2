"""Shards: the token files, and the manifest that says which tokenizer made them.

A shard is 256 little-endian int32 (magic, version, token count, zeros) followed by that
many little-endian uint16 tokens; every document starts with BOS. The project's data
tools write a manifest.json beside their shards that records the tokenizer's sha256, so
a run can refuse data made with another tokenizer of the same size. numpy only: the data
tools use this module without torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from trainer.files import regular_file, write_atomic
from trainer.settings import InputError

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS, BOS_ID = 20240520, 1, 256, 1
SHARD_HEADER_BYTES = 4 * SHARD_HEADER_INTS
MANIFEST = "manifest.json"


def read_shard(path: str | Path) -> np.ndarray:
    """Memory-map a shard's tokens after checking its header and size."""
    path = regular_file(path, "shard")
    size = path.stat().st_size
    if size < SHARD_HEADER_BYTES:
        raise InputError(f"{path}: {size} bytes is shorter than the {SHARD_HEADER_BYTES}-byte shard header")
    magic, version, count = (int(value) for value in np.fromfile(path, dtype="<i4", count=3))
    if magic != SHARD_MAGIC:
        raise InputError(f"{path}: bad magic {magic}, expected {SHARD_MAGIC} (not a token shard)")
    if version != SHARD_VERSION:
        raise InputError(f"{path}: unsupported shard version {version}, expected {SHARD_VERSION}")
    if count < 0 or size != SHARD_HEADER_BYTES + 2 * count:
        raise InputError(f"{path}: file is {size} bytes but its header promises {count} tokens "
                         f"({SHARD_HEADER_BYTES + 2 * count} bytes); truncated or corrupt")
    return np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_BYTES, shape=(count,))


def write_shard(path: str | Path, tokens: np.ndarray, overwrite: bool = True) -> None:
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > 65535):
        raise InputError(f"{path}: token ids must fit in uint16")
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    write_atomic(path, header.tobytes() + tokens.astype("<u2").tobytes(), overwrite)


def recorded_tokenizer(folder: str | Path) -> str | None:
    """The tokenizer sha256 the folder's manifest records, or None when nothing is recorded."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text(encoding="utf-8")).get("tokenizer_sha256")
    except (OSError, ValueError, AttributeError) as error:
        raise InputError(f"{path}: not a readable manifest ({error})") from None
    return recorded if isinstance(recorded, str) else None
