"""DATA: shard files, the vocabulary check, the coprime-stride sampler, the embedded corpus."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from trainer.data import (CoprimeSampler, ShardCursor, ShuffledSampler, build_smoke_corpus, load_validation_tokens, make_sampler,
                          shard_paths)
from trainer.files import file_sha256
from trainer.main import load_data
from trainer.runtime import Runtime
from trainer.settings import Hyperparameters, InputError
from trainer.shards import BOS_ID, read_shard, write_shard
from conftest import TOKENIZER, tiny_hp


def test_token_ids_beyond_the_vocabulary_name_the_shard(tmp_path):
    for i, top in enumerate((1023, 1024)):
        write_shard(tmp_path / f"fineweb_val_{i:06d}.bin", np.array([1, 5, top], dtype=np.uint16))
    with pytest.raises(InputError, match=r"fineweb_val_000001.bin: holds token ids >= VOCAB_SIZE=1024"):
        load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), 2, 1024, Runtime())
    assert load_validation_tokens(str(tmp_path / "fineweb_val_000000.bin"), 2, 1024, Runtime()).tolist() == [1, 5, 1023]


def test_a_training_shard_beyond_the_vocabulary_stops_the_run_at_start(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(1, 600) % 1024)
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(1, 600) % 1024)
    write_shard(tmp_path / "fineweb_train_000001.bin", np.array([1, 5, 2000] * 200))
    hp = tiny_hp(DATA_PATH=str(tmp_path), TOKENIZER_PATH=str(TOKENIZER))
    with pytest.raises(InputError, match=r"fineweb_train_000001.bin: holds token ids >= VOCAB_SIZE=1024"):
        load_data(hp, Runtime())


def test_missing_shards_say_where_they_were_looked_for(tmp_path):
    with pytest.raises(InputError, match="no shards match"):
        shard_paths(str(tmp_path / "fineweb_train_*.bin"))


def test_validation_tokens_are_cut_to_whole_sequences(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(150, dtype=np.uint16))
    write_shard(tmp_path / "fineweb_val_000001.bin", np.arange(150, 260, dtype=np.uint16))
    tokens = load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), 64, 1024, Runtime())
    assert tokens.tolist() == list(range(4 * 64 + 1))


def test_cursor_visits_every_block_once_per_pass():
    rng = np.random.Generator(np.random.PCG64(0))
    for num_tokens, seq_len in [(10_001, 100), (5_000, 64), (1_000, 999)]:
        cursor = ShardCursor(num_tokens, seq_len, rng)
        blocks = cursor.num_blocks
        offsets = cursor.take(blocks)
        assert sorted((o - cursor.phase) // seq_len for o in offsets) == list(range(blocks))
        assert all(o + seq_len + 1 <= num_tokens for o in offsets)
        assert cursor.remaining == 0


def test_every_pass_of_a_cursor_is_a_coprime_stride_over_all_its_blocks():
    """The invariant itself, over many shard sizes and block lengths, three passes each:
    a phase inside a block, a stride coprime with the block count, each block once."""
    rng = np.random.Generator(np.random.PCG64(1))
    strides, phases = set(), set()
    for num_tokens in [*range(2, 160), 1000, 4097, 10_001]:
        for seq_len in (1, 3, 16, 64):
            if num_tokens < seq_len + 1:
                continue
            cursor = ShardCursor(num_tokens, seq_len, rng)
            for _ in range(3):
                offsets = cursor.take(1)  # starts the pass (a cursor starts its next pass when asked for more)
                blocks, phase, stride = cursor.num_blocks, cursor.phase, cursor.stride
                offsets += cursor.take(blocks - 1)
                assert 0 <= phase <= min(seq_len - 1, max(0, num_tokens - seq_len - 1))
                assert blocks == (num_tokens - 1 - phase) // seq_len >= 1
                assert math.gcd(stride, blocks) == 1 and (1 <= stride < blocks or blocks == stride == 1)
                assert offsets == [phase + (offsets[0] - phase + i * stride * seq_len) % (blocks * seq_len) for i in range(blocks)]
                assert sorted(offsets) == [phase + b * seq_len for b in range(blocks)]
                assert max(offsets) + seq_len + 1 <= num_tokens  # every window's seq_len + 1 tokens inside
                strides.add(stride)
                phases.add(phase)
    assert len(strides) > 50 and len(phases) > 50  # and the passes do differ


def make_shards(folder, sizes):
    for i, size in enumerate(sizes):
        write_shard(folder / f"fineweb_train_{i:06d}.bin", np.full(size, i, dtype=np.uint16))
    return str(folder / "fineweb_train_*.bin")


def test_each_shard_gets_one_cursor_and_draws_only_for_it(tmp_path, monkeypatch):
    """A cursor draws from the shared RNG when it is built, so building one per use
    (instead of once per shard) would change the data stream."""
    built = []
    original = ShardCursor.__init__
    monkeypatch.setattr(ShardCursor, "__init__", lambda self, *a: (built.append(1), original(self, *a))[1])
    sampler = CoprimeSampler(make_shards(tmp_path, [3000 + 500 * i for i in range(12)]), 32, 16, 0, 1, 1)
    for _ in range(10):
        sampler.draw_step_windows()
    assert len(built) == len(sampler.cursors) == 12


def test_ranks_never_share_a_window(tmp_path):
    pattern = make_shards(tmp_path, [3000, 5000, 7000, 20000])
    samplers = [CoprimeSampler(pattern, 32, 16, rank, 2, 2) for rank in range(2)]
    for _ in range(20):
        windows = [sampler.draw_step_windows() for sampler in samplers]
        assert windows[0] == windows[1]  # every rank draws the same global list
        slices = [set(s.micro_batch_windows(windows[0], m)) for s in samplers for m in range(2)]
        assert sum(len(part) for part in slices) == 16 == len(set().union(*slices))


def test_micro_batches_do_not_depend_on_the_rank_split(tmp_path):
    pattern = make_shards(tmp_path, [4000, 9000])
    one_rank = CoprimeSampler(pattern, 32, 8, 0, 1, 2)
    two_ranks = [CoprimeSampler(pattern, 32, 8, rank, 2, 1) for rank in range(2)]
    windows = one_rank.draw_step_windows()
    assert [one_rank.micro_batch_windows(windows, m) for m in range(2)] == \
        [sampler.micro_batch_windows(windows, 0) for sampler in two_ranks]


def test_sampler_data_order_depends_only_on_file_names(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    first = CoprimeSampler(make_shards(a, [3000, 4000]), 32, 8, 0, 1, 1).draw_step_windows()
    second = CoprimeSampler(make_shards(b, [3000, 4000]), 32, 8, 0, 1, 1).draw_step_windows()
    assert first == second


def test_batches_hold_consecutive_tokens(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(5000, dtype=np.uint16))
    sampler = CoprimeSampler(str(tmp_path / "fineweb_train_*.bin"), 32, 4, 0, 1, 2)
    for inputs, targets in sampler.next_step(Runtime()):
        assert inputs.shape == (2, 32) and torch.equal(targets, inputs + 1)


def test_sampler_rejects_batches_that_do_not_split(tmp_path):
    with pytest.raises(InputError, match="multiple of WORLD_SIZE"):
        CoprimeSampler(make_shards(tmp_path, [3000]), 32, 6, 0, 4, 1)


def test_smoke_corpus_is_real_english(smoke_corpus, tokenizer):
    val = np.asarray(read_shard(smoke_corpus / "fineweb_val_000000.bin"))
    train = np.asarray(read_shard(smoke_corpus / "fineweb_train_000000.bin"))
    assert train.size > 700_000 and val.size > 19_000 and val[0] == train[0] == BOS_ID
    assert " the " in tokenizer.decode(val[:400].tolist())


def test_smoke_corpus_never_replaces_a_file(tmp_path, tokenizer):
    write_shard(tmp_path / "fineweb_val_000000.bin", np.array([1, 2, 3], dtype=np.uint16))
    build_smoke_corpus(tmp_path, tokenizer, TOKENIZER)
    assert read_shard(tmp_path / "fineweb_val_000000.bin").tolist() == [1, 2, 3]
    assert read_shard(tmp_path / "fineweb_train_000000.bin").size > 700_000


def test_smoke_corpus_is_only_built_in_its_own_folder(tmp_path, monkeypatch):
    """SMOKE=1 with a DATA_PATH of the user's never writes there."""
    monkeypatch.chdir(tmp_path)
    users = tmp_path / "mine"
    users.mkdir()
    write_shard(users / "fineweb_val_000000.bin", np.arange(300, dtype=np.uint16))
    hp = Hyperparameters.from_env({"SMOKE": "1", "DATA_PATH": str(users), "TOKENIZER_PATH": str(TOKENIZER)})
    with pytest.raises(InputError, match="no shards match .*mine/fineweb_train_"):
        load_data(hp, Runtime())
    assert [p.name for p in users.iterdir()] == ["fineweb_val_000000.bin"]
    assert read_shard(users / "fineweb_val_000000.bin").tolist() == list(range(300))


def shuffled(tmp_path, sizes, rank=0, world=1, accum=2, seq_len=16, windows=4):
    """Shard i holds 10000*i + 0, 1, 2...: a window's first token says where it came from."""
    for i, size in enumerate(sizes):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", (10000 * i + np.arange(size)).astype(np.uint16))
    return ShuffledSampler(str(tmp_path / "fineweb_train_*.bin"), seq_len, windows, rank, world, accum)


def test_the_shuffled_sampler_takes_every_window_of_its_shards_once_per_pass(tmp_path):
    sampler = shuffled(tmp_path, [330, 170, 90])
    per_pass = sum(len(starts) for starts in sampler.starts)
    taken = [row[0] for _ in range(per_pass // 2) for row in sampler.micro_batch().tolist()]
    assert len(taken) == per_pass and len(set(taken)) == per_pass  # no window twice before every one was taken
    assert all(len(starts) == 0 for starts in sampler.starts)
    again = sampler.micro_batch()  # all used up: every shard starts a new pass (with a new phase)
    assert again.shape == (2, 17) and per_pass - 3 - 2 <= sum(len(starts) for starts in sampler.starts) <= per_pass - 2


def test_the_shuffled_sampler_gives_each_rank_its_own_shards_and_seeds_by_rank(tmp_path):
    ranks = [shuffled(tmp_path, [330, 170, 90], rank=r, world=2, accum=1) for r in range(2)]
    assert [[p.name for p in s.paths] for s in ranks] == [["fineweb_train_000000.bin", "fineweb_train_000002.bin"],
                                                           ["fineweb_train_000001.bin"]]
    first = shuffled(tmp_path, [330, 170, 90], rank=0, world=2, accum=1).micro_batch()
    assert np.array_equal(first, ranks[0].micro_batch())  # the same for any SEED: seeded by the rank


def test_the_shuffled_sampler_draws_shards_by_what_they_have_left(tmp_path):
    """Over many draws from a fresh pass, a shard's share follows its windows left."""
    sampler = shuffled(tmp_path, [16 * 300 + 1, 16 * 100 + 1], windows=200, accum=1)
    from_big = sum(int(row[0]) < 10000 for row in sampler.micro_batch())
    assert 120 < from_big < 180  # 3 to 1 by windows left: about 150 of 200


def test_the_shuffled_sampler_refuses_ranks_without_shards(tmp_path):
    with pytest.raises(InputError, match="2 shards cannot give each of 4 ranks its own"):
        shuffled(tmp_path, [330, 170], rank=3, world=4, accum=1)


def coprime_steps_by_hand(names, sizes, seq_len, windows, world_size, steps, start_step):
    """The PR #1217 record's mix, written out: an RNG seeded by FNV-1a of the shard names;
    each step, `mix` shards (8 -> 32 over 1,800 steps, at least the world size, at most
    what there is) drawn without replacement with p ~ blocks left ^ (0.9 -> 0.5), one
    window each plus a multinomial share of the rest, taken in a random shard order, each
    shard's windows shuffled, then dealt round-robin in a fresh random order each round."""
    seed = 0xCBF29CE484222325
    for byte in "\n".join(names).encode():
        seed = ((seed ^ byte) * 0x100000001B3) % 2**64
    rng, cursors, drawn = np.random.Generator(np.random.PCG64(seed)), {}, []
    eligible = [i for i, size in enumerate(sizes) if size > seq_len]
    for step in range(start_step, start_step + steps):
        progress = min(step / 1800, 1.0)
        left = np.array([max(cursors[s].remaining, 1) if s in cursors else (sizes[s] - 1) // seq_len for s in eligible], float)
        p = left ** (0.9 - 0.4 * progress)
        p = p / p.sum()
        low = min(max(8, world_size), len(eligible), windows)
        high = min(max(32, 8 * world_size), len(eligible), windows)
        mix = max(1, round(low + progress * (high - low)))
        chosen = rng.choice(len(eligible), size=mix, replace=False, p=p)
        counts = 1 + (rng.multinomial(windows - mix, p[chosen] / p[chosen].sum()) if windows > mix else np.zeros(mix, int))
        buckets = []
        for k in rng.permutation(mix):
            shard = eligible[chosen[k]]
            if shard not in cursors:
                cursors[shard] = ShardCursor(sizes[shard], seq_len, rng)
            offsets = cursors[shard].take(int(counts[k]))
            buckets.append([(shard, offsets[j]) for j in rng.permutation(len(offsets))])
        step_windows = []
        while buckets:
            buckets = [buckets[k] for k in rng.permutation(len(buckets))]
            step_windows += [bucket.pop() for bucket in buckets]
            buckets = [bucket for bucket in buckets if bucket]
        drawn.append(step_windows)
    return drawn


@pytest.mark.parametrize("world_size, windows, start_step", [(1, 24, 0), (2, 40, 900), (4, 8, 5000), (1, 3, 0)])
def test_the_coprime_mix_is_the_records_step_by_step(tmp_path, world_size, windows, start_step):
    sizes = [3000, 17, 16, 900, 64 * 40 + 1, 5000, 250, 65, 1200, 64, 7000, 333, 2500] + [400 + 37 * i for i in range(30)]
    pattern = make_shards(tmp_path, sizes)
    sampler = CoprimeSampler(pattern, 16, windows, 0, world_size, 1)
    sampler.steps_drawn = start_step
    names = [f"fineweb_train_{i:06d}.bin" for i in range(len(sizes))]
    expected = coprime_steps_by_hand(names, sizes, 16, windows, world_size, 6, start_step)
    assert [sampler.draw_step_windows() for _ in range(6)] == expected
    assert sampler.steps_drawn == start_step + 6



def shuffled_batches_by_hand(sizes, seq_len, per_micro_step, rank, world_size, micro_steps):
    """The PR #1493 record's loader, written out: rank r reads shards r, r + world, ...; an
    RNG seeded by the rank; per shard a phase inside a window and its window starts in a
    random order (taken from the end); each row from a shard drawn by windows left; when
    every shard is used up, new orders for all."""
    rng = np.random.Generator(np.random.PCG64(rank))
    mine = [(i, size) for i, size in enumerate(sizes)][rank::world_size]

    def starts_of(size):
        max_phase = min(seq_len - 1, max(0, size - seq_len - 1))
        phase = int(rng.integers(max_phase + 1)) if max_phase > 0 else 0
        return [phase + seq_len * int(k) for k in rng.permutation(max((size - 1 - phase) // seq_len, 0))]

    starts = [starts_of(size) for _, size in mine]
    batches = []
    for _ in range(micro_steps):
        rows = []
        for _ in range(per_micro_step):
            if not any(starts):
                starts = [starts_of(size) for _, size in mine]
            left = np.array([len(s) for s in starts], float)
            k = int(rng.choice(len(mine), p=left / left.sum()))
            start = starts[k].pop()
            rows.append((mine[k][0], start))
        batches.append(rows)
    return batches


@pytest.mark.parametrize("rank, world_size, accum", [(0, 1, 2), (1, 2, 1), (2, 3, 2)])
def test_the_shuffled_sampler_is_the_records_loader_row_by_row(tmp_path, rank, world_size, accum):
    sizes = [200, 17, 90, 16, 400, 33, 150]
    for i, size in enumerate(sizes):  # token k of shard i is 1000 * i + k: a row names its shard and start
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", 1000 * i + np.arange(size))
    runtime = Runtime(rank=rank, world_size=world_size, accum_steps=accum)
    sampler = make_sampler(Hyperparameters.from_env({"TRAIN_SAMPLER": "shuffled", "DATA_PATH": str(tmp_path),
                                                     "TRAIN_SEQ_LEN": "16", "TRAIN_BATCH_TOKENS": str(16 * 6 * world_size * accum),
                                                     "VOCAB_SIZE": "65536"}), runtime)
    assert isinstance(sampler, ShuffledSampler) and sampler.per_micro_step == 6
    expected = shuffled_batches_by_hand(sizes, 16, 6, rank, world_size, 5 * accum)
    got = []
    for _ in range(5):
        steps = sampler.next_step(runtime)
        assert len(steps) == accum
        for inputs, targets in steps:
            assert inputs.dtype == torch.int64 and torch.equal(inputs[:, 1:], targets[:, :-1]) and inputs.shape == (6, 16)
            got.append([(int(row[0]) // 1000, int(row[0]) % 1000) for row in inputs])
    assert got == expected


def test_the_coprime_sampler_is_made_from_the_settings(tmp_path):
    make_shards(tmp_path, [500, 600])
    runtime = Runtime(rank=1, world_size=2, accum_steps=3)
    sampler = make_sampler(Hyperparameters.from_env({"DATA_PATH": str(tmp_path), "TRAIN_SEQ_LEN": "16",
                                                     "TRAIN_BATCH_TOKENS": str(16 * 12)}), runtime)
    assert isinstance(sampler, CoprimeSampler) and (sampler.seq_len, sampler.windows_per_step) == (16, 12)
    assert (sampler.rank, sampler.world_size, sampler.accum_steps) == (1, 2, 3) and sampler.steps_drawn == 0
    with pytest.raises(InputError, match=r"^TRAIN_BATCH_TOKENS/TRAIN_SEQ_LEN=10 windows is not allowed: must be a multiple "
                                         r"of WORLD_SIZE\*GRAD_ACCUM_STEPS=6$"):
        CoprimeSampler(str(tmp_path / "fineweb_train_*.bin"), 16, 10, 1, 2, 3)
    with pytest.raises(InputError, match=r"fineweb_train_\*.bin: no shard holds a full window of 1001 tokens$"):
        CoprimeSampler(str(tmp_path / "fineweb_train_*.bin"), 1000, 6, 0, 1, 1)
    with pytest.raises(InputError, match=r"^TRAIN_BATCH_TOKENS/TRAIN_SEQ_LEN=10 windows is not allowed: must be a multiple "
                                         r"of WORLD_SIZE\*GRAD_ACCUM_STEPS=6$"):
        ShuffledSampler(str(tmp_path / "fineweb_train_*.bin"), 16, 10, 1, 2, 3)
    with pytest.raises(InputError, match=r"fineweb_train_\*.bin: no shard of rank 1 holds a full window of 601 tokens$"):
        ShuffledSampler(str(tmp_path / "fineweb_train_*.bin"), 600, 2, 1, 2, 1)


def test_validation_keeps_whole_sequences_and_one_target(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(256))
    tokens = load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), 64, 1024, Runtime())
    assert tokens.dtype == torch.int64 and tokens.tolist() == list(range(193))  # 255 targets hold 3 whole sequences
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(2))
    assert load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), 1, 1024, Runtime()).tolist() == [0, 1]
    with pytest.raises(InputError, match=r"fineweb_val_\*.bin: 2 validation tokens are fewer than one sequence of 2$"):
        load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), 2, 1024, Runtime())


def test_the_smoke_corpus_manifest_names_its_text_and_tokenizer(tmp_path, tokenizer):
    build_smoke_corpus(tmp_path, tokenizer, TOKENIZER)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest == {"text": "data/smoke/pydoc_text.json.xz", "tokenizer_sha256": file_sha256(TOKENIZER)}
    (tmp_path / "manifest.json").unlink()
    build_smoke_corpus(tmp_path, tokenizer, TOKENIZER)  # both shards there: nothing is made, the manifest neither
    assert not (tmp_path / "manifest.json").exists()
