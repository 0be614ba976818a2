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
    (lambda p: corrupt(p, 8, 999), "file is 1224 bytes but its header promises 999 tokens (3022 bytes)"),
    (lambda p: corrupt(p, 8, 99), "promises 99 tokens (1222 bytes)"),  # one fewer than the file holds
    (lambda p: corrupt(p, 8, -1), "promises -1 tokens"),
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
    with pytest.raises(InputError, match=r"fineweb_train_000000.bin: not a regular file \(a shard is expected\)"):
        read_shard(fifo)


def test_the_manifest_records_the_tokenizer(tmp_path):
    assert recorded_tokenizer(tmp_path) is None
    (tmp_path / MANIFEST).write_text(json.dumps({"tokenizer_sha256": "ab" * 32, "files": []}))
    assert recorded_tokenizer(tmp_path) == "ab" * 32
    (tmp_path / MANIFEST).write_text("[not a manifest")
    with pytest.raises(InputError, match=r"manifest.json: not a readable manifest"):
        recorded_tokenizer(tmp_path)


def test_an_empty_shard_is_a_shard_and_tokens_are_read_only(tmp_path):
    write_shard(tmp_path / "empty.bin", np.array([], dtype=np.uint16))
    assert read_shard(tmp_path / "empty.bin").shape == (0,)
    write_shard(tmp_path / "a.bin", np.array([0, 65535]))
    tokens = read_shard(tmp_path / "a.bin")
    assert tokens.tolist() == [0, 65535] and not tokens.flags.writeable


@pytest.mark.parametrize("tokens", [[0, 65536], [-1, 5]])
def test_token_ids_outside_uint16_are_refused(tmp_path, tokens):
    with pytest.raises(InputError, match=r"a.bin: token ids must fit in uint16$"):
        write_shard(tmp_path / "a.bin", np.array(tokens))
    assert not (tmp_path / "a.bin").exists()


def test_a_shard_is_replaced_only_when_asked(tmp_path):
    write_shard(tmp_path / "a.bin", np.arange(3))
    with pytest.raises(FileExistsError):
        write_shard(tmp_path / "a.bin", np.arange(5), overwrite=False)
    write_shard(tmp_path / "a.bin", np.arange(5))
    assert read_shard(tmp_path / "a.bin").tolist() == [0, 1, 2, 3, 4]


def test_a_manifest_without_a_text_tokenizer_records_none(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps({"tokenizer_sha256": 5}))
    assert recorded_tokenizer(tmp_path) is None
