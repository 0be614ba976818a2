"""CONFIGURATION and DATA sections: settings, shard files, the coprime-stride sampler."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest
import torch

import train_gpt
from conftest import ROOT, TOKENIZER, tiny_hp


def test_defaults_are_the_reference_run():
    hp = train_gpt.Hyperparameters.from_env({})
    assert (hp.num_layers, hp.model_dim, hp.num_heads, hp.num_kv_heads) == (11, 512, 8, 4)
    assert (hp.qk_gain_init, hp.slot_enabled, hp.slot_steps, hp.slot_lr) == (5.0, True, 8, 0.005)
    assert (hp.train_batch_tokens, hp.train_seq_len, hp.muon_eq_r, hp.bank_split) == (786_432, 2048, True, 5)


def test_environment_overrides_and_smoke_profile():
    hp = train_gpt.Hyperparameters.from_env({"SMOKE": "1", "MODEL_DIM": "96", "MUON_EQ_R": "0"})
    assert hp.smoke and hp.model_dim == 96 and hp.num_layers == 4 and not hp.muon_eq_r


@pytest.mark.parametrize("environ, fragment", [
    ({"NUM_LAYERS": "eleven"}, "NUM_LAYERS='eleven' is not allowed: expected an integer"),
    ({"QK_GAIN_INIT": "nan"}, "QK_GAIN_INIT='nan' is not allowed: expected a finite number"),
    ({"MUON_EQ_R": "maybe"}, "MUON_EQ_R='maybe' is not allowed: expected 0 or 1"),
    ({"NUM_HEADS": "7"}, "NUM_HEADS=7 is not allowed: must divide MODEL_DIM=512"),
    ({"NUM_KV_HEADS": "3"}, "NUM_KV_HEADS=3 is not allowed: must divide NUM_HEADS=8"),
    ({"SLOT_MODE": "future"}, "SLOT_MODE='future' is not allowed"),
    ({"VE_LAYERS": "9,99"}, "VE_LAYERS='9,99' is not allowed"),
    ({"EVAL_STRIDE": "4096"}, "EVAL_STRIDE=4096 is not allowed"),
])
def test_bad_settings_name_the_variable(environ, fragment):
    with pytest.raises(train_gpt.ConfigError) as caught:
        train_gpt.Hyperparameters.from_env(environ)
    assert fragment in str(caught.value)


def test_world_size_must_divide_eight(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(train_gpt.ConfigError, match=r"WORLD_SIZE=3 is not allowed: must divide 8"):
        train_gpt.start_runtime(tiny_hp())


def test_tokenizer_vocab_must_match():
    with pytest.raises(train_gpt.ConfigError, match=r"VOCAB_SIZE=2048 is not allowed: the tokenizer .* has 1024 pieces"):
        train_gpt.load_tokenizer(tiny_hp(VOCAB_SIZE="2048", TOKENIZER_PATH=str(TOKENIZER)))


def test_shard_round_trip(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    train_gpt.write_shard(tmp_path / "a.bin", tokens)
    assert np.array_equal(train_gpt.read_shard(tmp_path / "a.bin"), tokens)
    assert not list(tmp_path.glob(".*tmp"))  # the temporary name is gone


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
    train_gpt.write_shard(path, np.arange(100, dtype=np.uint16))
    damage(path)
    with pytest.raises(train_gpt.DataError) as caught:
        train_gpt.read_shard(path)
    assert str(path) in str(caught.value) and message in str(caught.value)


def test_missing_shards_say_where_they_were_looked_for(tmp_path):
    with pytest.raises(train_gpt.DataError, match="no shards match"):
        train_gpt.shard_paths(str(tmp_path / "fineweb_train_*.bin"))


def test_validation_tokens_are_cut_to_whole_sequences(tmp_path):
    train_gpt.write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(150, dtype=np.uint16))
    train_gpt.write_shard(tmp_path / "fineweb_val_000001.bin", np.arange(150, 260, dtype=np.uint16))
    tokens = train_gpt.load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), 64)
    assert tokens.tolist() == list(range(4 * 64 + 1))


def test_cursor_visits_every_block_once_per_pass():
    rng = np.random.Generator(np.random.PCG64(0))
    for num_tokens, seq_len in [(10_001, 100), (5_000, 64), (1_000, 999)]:
        cursor = train_gpt.ShardCursor(num_tokens, seq_len, rng)
        blocks = cursor.num_blocks
        offsets = cursor.take(blocks)
        assert sorted((o - cursor.phase) // seq_len for o in offsets) == list(range(blocks))
        assert all(o + seq_len + 1 <= num_tokens for o in offsets)
        assert cursor.remaining == 0


def make_shards(folder, sizes):
    for i, size in enumerate(sizes):
        train_gpt.write_shard(folder / f"fineweb_train_{i:06d}.bin", np.full(size, i, dtype=np.uint16))
    return str(folder / "fineweb_train_*.bin")


def test_ranks_never_share_a_window(tmp_path):
    pattern = make_shards(tmp_path, [3000, 5000, 7000, 20000])
    samplers = [train_gpt.TokenSampler(pattern, 32, 16, rank, 2, 2) for rank in range(2)]
    for _ in range(20):
        windows = [sampler.draw_step_windows() for sampler in samplers]
        assert windows[0] == windows[1]  # every rank draws the same global list
        slices = [set(s.micro_batch_windows(windows[0], m)) for s in samplers for m in range(2)]
        assert sum(len(part) for part in slices) == 16 == len(set().union(*slices))


def test_micro_batches_do_not_depend_on_the_rank_split(tmp_path):
    pattern = make_shards(tmp_path, [4000, 9000])
    one_rank = train_gpt.TokenSampler(pattern, 32, 8, 0, 1, 2)
    two_ranks = [train_gpt.TokenSampler(pattern, 32, 8, rank, 2, 1) for rank in range(2)]
    windows = one_rank.draw_step_windows()
    assert [one_rank.micro_batch_windows(windows, m) for m in range(2)] == \
        [sampler.micro_batch_windows(windows, 0) for sampler in two_ranks]


def test_sampler_data_order_depends_only_on_file_names(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    first = train_gpt.TokenSampler(make_shards(a, [3000, 4000]), 32, 8, 0, 1, 1).draw_step_windows()
    second = train_gpt.TokenSampler(make_shards(b, [3000, 4000]), 32, 8, 0, 1, 1).draw_step_windows()
    assert first == second


def test_batches_hold_consecutive_tokens(tmp_path):
    train_gpt.write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(5000, dtype=np.uint16))
    sampler = train_gpt.TokenSampler(str(tmp_path / "fineweb_train_*.bin"), 32, 4, 0, 1, 2)
    for inputs, targets in sampler.next_step(torch.device("cpu")):
        assert inputs.shape == (2, 32) and torch.equal(targets, inputs + 1)


def test_sampler_rejects_batches_that_do_not_split(tmp_path):
    pattern = make_shards(tmp_path, [3000])
    with pytest.raises(train_gpt.ConfigError, match="multiple of WORLD_SIZE"):
        train_gpt.TokenSampler(pattern, 32, 6, 0, 4, 1)


def test_smoke_corpus_is_real_english(smoke_corpus, tokenizer):
    val = np.asarray(train_gpt.read_shard(smoke_corpus / "fineweb_val_000000.bin"))
    train = np.asarray(train_gpt.read_shard(smoke_corpus / "fineweb_train_000000.bin"))
    assert train.size > 80_000 and val.size > 8_000 and val[0] == train_gpt.BOS_ID
    assert " the " in tokenizer.decode(val[:400].tolist())


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    missing = [spec.metadata["env"] for spec in fields(train_gpt.Hyperparameters) if f"`{spec.metadata['env']}`" not in readme]
    assert not missing, f"README.md lacks {missing}"
