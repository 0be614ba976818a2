"""DATA: shard files, the vocabulary check, the coprime-stride sampler, the embedded corpus."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import trainer
from conftest import TOKENIZER, tiny_hp


def test_shard_round_trip_leaves_no_temporary_file(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    trainer.write_shard(tmp_path / "a.bin", tokens)
    assert np.array_equal(trainer.read_shard(tmp_path / "a.bin"), tokens)
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
    trainer.write_shard(path, np.arange(100, dtype=np.uint16))
    damage(path)
    with pytest.raises(trainer.DataError) as caught:
        trainer.read_shard(path)
    assert str(path) in str(caught.value) and message in str(caught.value)


def test_token_ids_beyond_the_vocabulary_name_the_shard(tmp_path):
    for i, top in enumerate((1023, 1024)):
        trainer.write_shard(tmp_path / f"fineweb_val_{i:06d}.bin", np.array([1, 5, top], dtype=np.uint16))
    with pytest.raises(trainer.DataError, match=r"fineweb_val_000001.bin: holds token ids >= VOCAB_SIZE=1024"):
        trainer.load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), 2, 1024, trainer.Runtime())
    assert trainer.load_validation_tokens(str(tmp_path / "fineweb_val_000000.bin"), 2, 1024, trainer.Runtime()).tolist() == [1, 5, 1023]


def test_a_training_shard_beyond_the_vocabulary_stops_the_run_at_start(tmp_path):
    trainer.write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(1, 600) % 1024)
    trainer.write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(1, 600) % 1024)
    trainer.write_shard(tmp_path / "fineweb_train_000001.bin", np.array([1, 5, 2000] * 200))
    hp = tiny_hp(DATA_PATH=str(tmp_path), TOKENIZER_PATH=str(TOKENIZER))
    with pytest.raises(trainer.DataError, match=r"fineweb_train_000001.bin: holds token ids >= VOCAB_SIZE=1024"):
        trainer.load_data(hp, trainer.Runtime())


def test_missing_shards_say_where_they_were_looked_for(tmp_path):
    with pytest.raises(trainer.DataError, match="no shards match"):
        trainer.shard_paths(str(tmp_path / "fineweb_train_*.bin"))


def test_validation_tokens_are_cut_to_whole_sequences(tmp_path):
    trainer.write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(150, dtype=np.uint16))
    trainer.write_shard(tmp_path / "fineweb_val_000001.bin", np.arange(150, 260, dtype=np.uint16))
    tokens = trainer.load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), 64, 1024, trainer.Runtime())
    assert tokens.tolist() == list(range(4 * 64 + 1))


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer.os, "fsync", full_disk)
    with pytest.raises(trainer.WriteError, match=r"m.ptz: cannot write \(No space left on device\); nothing was written"):
        trainer.write_atomic(tmp_path / "m.ptz", b"weights")
    assert list(tmp_path.iterdir()) == []


def test_write_without_overwrite_never_replaces_a_file(tmp_path):
    trainer.write_atomic(tmp_path / "x", b"mine")
    with pytest.raises(FileExistsError):
        trainer.write_atomic(tmp_path / "x", b"other", overwrite=False)
    assert (tmp_path / "x").read_bytes() == b"mine" and [p.name for p in tmp_path.iterdir()] == ["x"]


def test_cursor_visits_every_block_once_per_pass():
    rng = np.random.Generator(np.random.PCG64(0))
    for num_tokens, seq_len in [(10_001, 100), (5_000, 64), (1_000, 999)]:
        cursor = trainer.ShardCursor(num_tokens, seq_len, rng)
        blocks = cursor.num_blocks
        offsets = cursor.take(blocks)
        assert sorted((o - cursor.phase) // seq_len for o in offsets) == list(range(blocks))
        assert all(o + seq_len + 1 <= num_tokens for o in offsets)
        assert cursor.remaining == 0


def make_shards(folder, sizes):
    for i, size in enumerate(sizes):
        trainer.write_shard(folder / f"fineweb_train_{i:06d}.bin", np.full(size, i, dtype=np.uint16))
    return str(folder / "fineweb_train_*.bin")


def test_each_shard_gets_one_cursor_and_draws_only_for_it(tmp_path, monkeypatch):
    """A cursor draws from the shared RNG when it is built, so building one per use
    (instead of once per shard) would change the data stream."""
    built = []
    original = trainer.ShardCursor.__init__
    monkeypatch.setattr(trainer.ShardCursor, "__init__", lambda self, *a: (built.append(1), original(self, *a))[1])
    sampler = trainer.TokenSampler(make_shards(tmp_path, [3000 + 500 * i for i in range(12)]), 32, 16, 0, 1, 1)
    for _ in range(10):
        sampler.draw_step_windows()
    assert len(built) == len(sampler.cursors) == 12


def test_ranks_never_share_a_window(tmp_path):
    pattern = make_shards(tmp_path, [3000, 5000, 7000, 20000])
    samplers = [trainer.TokenSampler(pattern, 32, 16, rank, 2, 2) for rank in range(2)]
    for _ in range(20):
        windows = [sampler.draw_step_windows() for sampler in samplers]
        assert windows[0] == windows[1]  # every rank draws the same global list
        slices = [set(s.micro_batch_windows(windows[0], m)) for s in samplers for m in range(2)]
        assert sum(len(part) for part in slices) == 16 == len(set().union(*slices))


def test_micro_batches_do_not_depend_on_the_rank_split(tmp_path):
    pattern = make_shards(tmp_path, [4000, 9000])
    one_rank = trainer.TokenSampler(pattern, 32, 8, 0, 1, 2)
    two_ranks = [trainer.TokenSampler(pattern, 32, 8, rank, 2, 1) for rank in range(2)]
    windows = one_rank.draw_step_windows()
    assert [one_rank.micro_batch_windows(windows, m) for m in range(2)] == \
        [sampler.micro_batch_windows(windows, 0) for sampler in two_ranks]


def test_sampler_data_order_depends_only_on_file_names(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    first = trainer.TokenSampler(make_shards(a, [3000, 4000]), 32, 8, 0, 1, 1).draw_step_windows()
    second = trainer.TokenSampler(make_shards(b, [3000, 4000]), 32, 8, 0, 1, 1).draw_step_windows()
    assert first == second


def test_batches_hold_consecutive_tokens(tmp_path):
    trainer.write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(5000, dtype=np.uint16))
    sampler = trainer.TokenSampler(str(tmp_path / "fineweb_train_*.bin"), 32, 4, 0, 1, 2)
    for inputs, targets in sampler.next_step(trainer.Runtime()):
        assert inputs.shape == (2, 32) and torch.equal(targets, inputs + 1)


def test_sampler_rejects_batches_that_do_not_split(tmp_path):
    with pytest.raises(trainer.ConfigError, match="multiple of WORLD_SIZE"):
        trainer.TokenSampler(make_shards(tmp_path, [3000]), 32, 6, 0, 4, 1)


def test_smoke_corpus_is_real_english(smoke_corpus, tokenizer):
    val = np.asarray(trainer.read_shard(smoke_corpus / "fineweb_val_000000.bin"))
    train = np.asarray(trainer.read_shard(smoke_corpus / "fineweb_train_000000.bin"))
    assert train.size > 700_000 and val.size > 19_000 and val[0] == train[0] == trainer.BOS_ID
    assert " the " in tokenizer.decode(val[:400].tolist())


def test_smoke_corpus_never_replaces_a_file(tmp_path, tokenizer):
    trainer.write_shard(tmp_path / "fineweb_val_000000.bin", np.array([1, 2, 3], dtype=np.uint16))
    trainer.build_smoke_corpus(tmp_path, tokenizer)
    assert trainer.read_shard(tmp_path / "fineweb_val_000000.bin").tolist() == [1, 2, 3]
    assert trainer.read_shard(tmp_path / "fineweb_train_000000.bin").size > 700_000


def test_smoke_corpus_is_only_built_in_its_own_folder(tmp_path, monkeypatch):
    """SMOKE=1 with a DATA_PATH of the user's never writes there."""
    monkeypatch.chdir(tmp_path)
    users = tmp_path / "mine"
    users.mkdir()
    trainer.write_shard(users / "fineweb_val_000000.bin", np.arange(300, dtype=np.uint16))
    hp = trainer.Hyperparameters.from_env({"SMOKE": "1", "DATA_PATH": str(users), "TOKENIZER_PATH": str(TOKENIZER)})
    with pytest.raises(trainer.DataError, match="no shards match .*mine/fineweb_train_"):
        trainer.load_data(hp, trainer.Runtime())
    assert [p.name for p in users.iterdir()] == ["fineweb_val_000000.bin"]
    assert trainer.read_shard(users / "fineweb_val_000000.bin").tolist() == list(range(300))
