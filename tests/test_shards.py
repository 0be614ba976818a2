"""trainer.shards: the token file format and the manifest naming the tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trainer.settings import InputError
from trainer.shards import MANIFEST, read_shard, recorded_tokenizer, write_shard


def test_shard_round_trip_leaves_no_temporary_file(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    write_shard(tmp_path / "a.bin", tokens)
    assert np.array_equal(read_shard(tmp_path / "a.bin"), tokens)
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def corrupt(path, offset: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + 4] = np.int32(value).tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (lambda p: corrupt(p, 0, 12345), "bad magic 12345"),
    (lambda p: corrupt(p, 4, 7), "unsupported shard version 7"),
    (lambda p: p.write_bytes(p.read_bytes()[:-10]), "truncated or corrupt"),
    (lambda p: corrupt(p, 8, 999), "promises 999 tokens"),
    (lambda p: p.write_bytes(b"short"), "shorter than the 1024-byte shard header"),
])
def test_bad_shards_name_the_file(tmp_path, damage, message):
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, np.arange(100, dtype=np.uint16))
    damage(path)
    with pytest.raises(InputError) as caught:
        read_shard(path)
    assert str(path) in str(caught.value) and message in str(caught.value)


def test_a_shard_that_is_not_a_regular_file_is_refused_at_once(tmp_path):
    """A pipe named like a shard would block a read forever."""
    fifo = tmp_path / "fineweb_train_000000.bin"
    import os
    os.mkfifo(fifo)
    with pytest.raises(InputError, match=r"fineweb_train_000000.bin: not a regular file"):
        read_shard(fifo)


def test_the_manifest_records_the_tokenizer(tmp_path):
    assert recorded_tokenizer(tmp_path) is None
    (tmp_path / MANIFEST).write_text(json.dumps({"tokenizer_sha256": "ab" * 32, "files": []}))
    assert recorded_tokenizer(tmp_path) == "ab" * 32
    (tmp_path / MANIFEST).write_text("[not a manifest")
    with pytest.raises(InputError, match=r"manifest.json: not a readable manifest"):
        recorded_tokenizer(tmp_path)
