"""EVALUATION section: exact bytes, sliding windows, SLOT modes and TTT, legality probes."""

from __future__ import annotations

import math
import os
import re
import socket

import pytest
import sentencepiece
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_gpt
from conftest import ROOT, TOKENIZER, noisy_model, tiny_hp

REFERENCE_LOG = ROOT / "tests" / "data" / "reference-logs" / "train_seed1337.log"

# The FineWeb tokenizer normalises text (NFKC, whitespace collapsed) and has no byte
# pieces: characters outside its vocabulary become <unk>, which counts 0 bytes (the
# reference's rule). So counts are checked against the decoded text.
COVERED = ["Hello world", "  two  spaces\nand a newline\n\n", "digits 0123456789 and 3.14159, (x)!",
           "MiXeD CaSe: The quick brown fox; 'quotes' \"double\"", "a\ttab | pipe - dash"]
UNCOVERED = ["accents: café, naïve, Zürich", "emoji: 🎉🐍 done", "CJK 漢字かな 한국어", "brackets [y] {z} ~`\\"]


def counted_bytes(tokenizer, ids: list[int]) -> int:
    token_bytes = train_gpt.build_token_bytes(tokenizer, 1024, torch.device("cpu"))
    ids_t = torch.tensor([train_gpt.BOS_ID] + ids)
    return int(train_gpt.count_bytes(token_bytes, ids_t[:-1], ids_t[1:]).sum())


@pytest.mark.parametrize("text", COVERED)
def test_byte_counts_equal_the_decoded_text(tokenizer, text):
    ids = tokenizer.encode(text)
    assert counted_bytes(tokenizer, ids) == len(tokenizer.decode(ids).encode("utf-8"))


@pytest.mark.parametrize("text", UNCOVERED)
def test_unknown_pieces_count_nothing_and_restart_the_text(tokenizer, text):
    ids = tokenizer.encode(text)
    unknown = tokenizer.unk_id()
    assert unknown in ids
    runs, run = [], []
    for piece in ids + [unknown]:  # decode each stretch between unknowns on its own
        if piece == unknown:
            runs.append(run)
            run = []
        else:
            run.append(piece)
    assert counted_bytes(tokenizer, ids) == sum(len(tokenizer.decode(r).encode("utf-8")) for r in runs)


class ByteFallbackTokenizer:
    """A stand-in with byte pieces (the FineWeb tokenizer has none) for the byte rule."""
    pieces = ["<pad>", "<s>", "</s>", "<unk>", "<0xC3>", "<0xA9>", "\u2581caf", "\u2581x"]

    def vocab_size(self):
        return len(self.pieces)

    def is_control(self, i):
        return i in (0, 1, 2)

    def is_unknown(self, i):
        return i == 3

    def is_unused(self, i):
        return False

    def is_byte(self, i):
        return i in (4, 5)

    def id_to_piece(self, i):
        return self.pieces[i]


def test_byte_fallback_pieces_count_one_byte_each():
    token_bytes = train_gpt.build_token_bytes(ByteFallbackTokenizer(), 8, torch.device("cpu"))
    ids = torch.tensor([1, 6, 4, 5, 7])  # BOS " caf" 0xC3 0xA9 " x"  ->  "café x" after BOS
    assert train_gpt.count_bytes(token_bytes, ids[:-1], ids[1:]).tolist() == [3, 1, 1, 2]
    assert sum(train_gpt.count_bytes(token_bytes, ids[:-1], ids[1:]).tolist()) == len("café x".encode())


@pytest.mark.parametrize("num_ordinals, seq_len, stride", [(1000, 64, 16), (1000, 64, 64), (999, 64, 10), (40, 64, 16),
                                                           (64, 64, 16), (65, 64, 64), (1, 8, 4)])
def test_sliding_windows_score_every_ordinal_once(num_ordinals, seq_len, stride):
    windows = train_gpt.sliding_windows(num_ordinals, seq_len, stride)
    scored = []
    previous_end = 0
    for start, end, first in windows:
        assert first == previous_end and end - start == min(seq_len, num_ordinals) and 0 <= start <= first < end
        assert first - start >= min(seq_len - stride, first)  # full context where the data allows
        scored.extend(range(first, end))
        previous_end = end
    assert scored == list(range(num_ordinals))


def val_tokens(count: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 1024, (count,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def byte_table(tokenizer):
    return train_gpt.build_token_bytes(tokenizer, 1024, torch.device("cpu"))


def test_stride_equal_to_seq_len_is_standard_evaluation(byte_table):
    hp = tiny_hp(EVAL_STRIDE="64", SLOT_ENABLED="0")
    model, tokens, runtime = noisy_model(hp), val_tokens(64 * 10 + 1), train_gpt.Runtime()
    standard = train_gpt.evaluate_standard(model, tokens, 64, 64 * 3, byte_table, runtime)
    sliding = train_gpt.evaluate_sliding(model, tokens, hp, byte_table, runtime, slot=False)
    assert sliding.tokens == standard.tokens == 640 and sliding.bytes == standard.bytes
    assert sliding.bpb == pytest.approx(standard.bpb, rel=1e-9)


def per_ordinal_nll(hp, tokens, byte_table, slot=False, ttt=False):
    model = noisy_model(hp)
    nll = torch.full((tokens.numel() - 1,), float("nan"), dtype=torch.float64)
    if ttt:
        train_gpt.evaluate_ttt(model, tokens, hp, byte_table, train_gpt.Runtime(), nll_out=nll)
    else:
        train_gpt.evaluate_sliding(model, tokens, hp, byte_table, train_gpt.Runtime(), slot=slot, nll_out=nll)
    assert not nll.isnan().any()
    return nll


def legality_probe(hp, byte_table, probe: int, **mode):
    """NLL per ordinal before and after changing token probe+1 (the target of ordinal `probe`)."""
    tokens = val_tokens(600)
    changed = tokens.clone()
    changed[probe + 1] = (changed[probe + 1] + 1) % 1024
    return per_ordinal_nll(hp, tokens, byte_table, **mode), per_ordinal_nll(hp, changed, byte_table, **mode)


# Windows of 64 with stride 16 in batches of 8: ordinal 230 is scored by window 11, in
# the middle of the batch of windows 8-15; windows 12-15 hold it as context.
PROBE = 230
SLOT = {"EVAL_BATCH_SEQS": "8", "SLOT_STEPS": "3", "SLOT_LR": "0.05"}


@pytest.mark.parametrize("mode", ["window", "batch_causal"])
def test_causal_slot_modes_never_look_ahead(byte_table, mode):
    before, after = legality_probe(tiny_hp(SLOT_MODE=mode, **SLOT), byte_table, PROBE, slot=True)
    assert torch.equal(before[:PROBE], after[:PROBE])  # every earlier score, to the last bit
    assert before[PROBE] != after[PROBE]  # the probe does reach the model


def test_the_probe_catches_the_shared_slot_leak(byte_table):
    before, after = legality_probe(tiny_hp(SLOT_MODE="shared", **SLOT), byte_table, PROBE, slot=True)
    assert not torch.equal(before[:PROBE], after[:PROBE])


def test_ttt_never_looks_ahead(byte_table):
    hp = tiny_hp(TTT_CHUNK_TOKENS="128", TTT_EPOCHS="2", TTT_LR="0.05", TTT_BATCH_SEQS="2", TTT_FREEZE_BLOCKS="1")
    before, after = legality_probe(hp, byte_table, PROBE, ttt=True)
    assert torch.equal(before[:PROBE], after[:PROBE])
    assert before[PROBE] != after[PROBE]
    # and adaptation happens: a later chunk's scores differ from plain sliding
    plain = per_ordinal_nll(hp, val_tokens(600), byte_table)
    assert torch.equal(plain[:128], before[:128]) and not torch.equal(plain[128:], before[128:])


def test_slot_changes_scores_and_modes_differ(byte_table):
    tokens = val_tokens(600)
    plain = per_ordinal_nll(tiny_hp(**SLOT), tokens, byte_table)
    scores = {mode: per_ordinal_nll(tiny_hp(SLOT_MODE=mode, **SLOT), tokens, byte_table, slot=True)
              for mode in ("window", "batch_causal", "shared")}
    assert torch.equal(scores["window"][:64], plain[:64])  # the first window has no context: delta stays 0
    assert all(not torch.equal(nll, plain) for nll in scores.values())
    assert not torch.equal(scores["window"], scores["batch_causal"])


def test_sliding_evaluation_restores_the_trainable_flags(byte_table):
    hp = tiny_hp(**SLOT)
    model = noisy_model(hp)
    model.smear.gate.requires_grad_(False)
    train_gpt.evaluate_sliding(model, val_tokens(300), hp, byte_table, train_gpt.Runtime(), slot=True)
    assert [p.requires_grad for p in model.parameters()].count(False) == 1 and not model.smear.gate.requires_grad


def test_ttt_leaves_the_callers_model_unchanged(byte_table):
    hp = tiny_hp(TTT_CHUNK_TOKENS="128", TTT_LR="0.05")
    model = noisy_model(hp)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_gpt.evaluate_ttt(model, val_tokens(400), hp, byte_table, train_gpt.Runtime())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def line_shape(line: str) -> str:
    return re.sub(r"\d+", "N", line)


def test_log_lines_have_the_reference_shapes(capsys):
    reference = {line_shape(line) for line in REFERENCE_LOG.read_text().splitlines()}
    nll = 1.86009741 * 1000
    result = train_gpt.EvalResult(nll=nll, tokens=1000.0, bytes=nll / math.log(2) / 1.10165738, seconds=165.229)
    runtime = train_gpt.Runtime()
    train_gpt.log_result(runtime, "final_int6_roundtrip", result)
    train_gpt.log_result(runtime, "final_int6_sliding_window", result, "stride:64 ")
    train_gpt.log_result(runtime, "legal_ttt", result)
    lines = capsys.readouterr().out.splitlines()
    assert "final_int6_sliding_window val_loss:1.8601 val_bpb:1.1017 stride:64 eval_time:165229ms" in lines
    assert "final_int6_sliding_window_exact val_loss:1.86009741 val_bpb:1.10165738" in lines
    assert len(lines) == 6 and all(line_shape(line) in reference for line in lines), lines


# Two gloo ranks against one process: the same scores. Windows and TTT sequences split
# unevenly on purpose (3 sequences per TTT batch, an odd number of windows per rank).
DISTRIBUTED = {"TTT_CHUNK_TOKENS": "192", "TTT_EPOCHS": "2", "TTT_LR": "0.05", "TTT_BATCH_SEQS": "3",
               "TTT_FREEZE_BLOCKS": "1", "EVAL_BATCH_SEQS": "4", "SLOT_STEPS": "2", "SLOT_LR": "0.05"}


def all_evaluations(runtime: train_gpt.Runtime) -> dict[str, object]:
    hp = tiny_hp(**DISTRIBUTED)
    tokens = val_tokens(500)
    token_bytes = train_gpt.build_token_bytes(sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZER)), 1024,
                                              torch.device("cpu"))
    model = noisy_model(hp)
    sliding_nll, ttt_nll = (torch.full((499,), float("nan"), dtype=torch.float64) for _ in range(2))
    return {"standard": train_gpt.evaluate_standard(model, tokens, 64, 64 * 6, token_bytes, runtime).bpb,
            "sliding": train_gpt.evaluate_sliding(model, tokens, hp, token_bytes, runtime, True, sliding_nll).bpb,
            "ttt": train_gpt.evaluate_ttt(model, tokens, hp, token_bytes, runtime, ttt_nll).bpb,
            "sliding_nll": sliding_nll, "ttt_nll": ttt_nll}


def distributed_worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results[rank] = all_evaluations(train_gpt.Runtime(rank=rank, world_size=2))
        dist.barrier()  # neither rank leaves while the other still talks
    finally:
        dist.destroy_process_group()


def test_two_ranks_score_as_one_process():
    single = all_evaluations(train_gpt.Runtime())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(distributed_worker, args=(port, results), nprocs=2, join=True)
        ranks = [results[0], results[1]]
    for ranked in ranks:  # every rank gets the whole answer
        for key in ("standard", "sliding", "ttt"):
            assert ranked[key] == pytest.approx(single[key], rel=1e-6), key
    for key in ("sliding_nll", "ttt_nll"):  # each rank scored its own windows, together all of them
        merged = torch.where(ranks[0][key].isnan(), ranks[1][key], ranks[0][key])
        assert not merged.isnan().any()
        torch.testing.assert_close(merged, single[key], rtol=1e-5, atol=1e-5)
