"""EVALUATION: exact bytes, sliding windows, SLOT modes, TTT, the legality probes, and the
reference's leaky SLOT reproduced for comparison."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

import trainer
from conftest import ROOT, noisy_model, tiny_hp

REFERENCE_LOG = ROOT / "tests" / "data" / "reference-logs" / "train_seed1337.log"

# The FineWeb tokenizer normalises text (NFKC, whitespace collapsed) and has no byte
# pieces: characters outside its vocabulary become <unk>, which counts 0 bytes (the
# reference's rule). So counts are checked against the decoded text.
COVERED = ["Hello world", "  two  spaces\nand a newline\n\n", "digits 0123456789 and 3.14159, (x)!",
           "MiXeD CaSe: The quick brown fox; 'quotes' \"double\"", "a\ttab | pipe - dash"]
UNCOVERED = ["accents: café, naïve, Zürich", "emoji: 🎉🐍 done", "CJK 漢字かな 한국어", "brackets [y] {z} ~`\\"]


def counted_bytes(tokenizer, ids: list[int]) -> int:
    token_bytes = trainer.build_token_bytes(tokenizer, 1024, torch.device("cpu"))
    ids_t = torch.tensor([trainer.BOS_ID] + ids)
    return int(trainer.count_bytes(token_bytes, ids_t[:-1], ids_t[1:]).sum())


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
    token_bytes = trainer.build_token_bytes(ByteFallbackTokenizer(), 8, torch.device("cpu"))
    ids = torch.tensor([1, 6, 4, 5, 7])  # BOS " caf" 0xC3 0xA9 " x"  ->  "café x" after BOS
    assert trainer.count_bytes(token_bytes, ids[:-1], ids[1:]).tolist() == [3, 1, 1, 2]


@pytest.mark.parametrize("num_ordinals, seq_len, stride", [(1000, 64, 16), (1000, 64, 64), (999, 64, 10), (40, 64, 16),
                                                           (64, 64, 16), (65, 64, 64), (1, 8, 4)])
def test_sliding_windows_score_every_ordinal_once(num_ordinals, seq_len, stride):
    scored, previous_end = [], 0
    for start, end, first in trainer.sliding_windows(num_ordinals, seq_len, stride):
        assert first == previous_end and end - start == min(seq_len, num_ordinals) and 0 <= start <= first < end
        assert first - start >= min(seq_len - stride, first)  # full context where the data allows
        scored.extend(range(first, end))
        previous_end = end
    assert scored == list(range(num_ordinals))


def test_reference_windows_rescore_the_tail():
    windows = trainer.reference_windows(100, 64, 16)
    assert [w.start for w in windows] == list(range(0, 100, 16))
    scored = [o for w in windows for o in range(w.first, w.end)]
    assert set(scored) == set(range(100)) and len(scored) == 100 + 16 * 3  # windows at 48, 64, 80 score 84..99 again


def val_tokens(count: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 1024, (count,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def byte_table(tokenizer):
    return trainer.build_token_bytes(tokenizer, 1024, torch.device("cpu"))


def data_of(tokens, byte_table):
    return trainer.EvalData(val_tokens=tokens, token_bytes=byte_table)


def test_stride_equal_to_seq_len_is_standard_evaluation(byte_table):
    hp = tiny_hp(EVAL_STRIDE="64", SLOT_ENABLED="0")
    model, tokens, runtime = noisy_model(hp), val_tokens(64 * 10 + 1), trainer.Runtime()
    standard = trainer.evaluate_standard(model, tokens, 64, 64 * 3, byte_table, runtime)
    sliding = trainer.evaluate_sliding(model, data_of(tokens, byte_table), hp, runtime, slot=False)
    assert sliding.tokens == standard.tokens == 640 and sliding.bytes == standard.bytes
    assert sliding.bpb == pytest.approx(standard.bpb, rel=1e-9)


def nll_by_ordinal(batches, count: int) -> torch.Tensor:
    """Collect a scoring generator's output into one NLL per ordinal (NaN if never scored)."""
    nll = torch.full((count,), float("nan"), dtype=torch.float64)
    for batch in batches:
        nll[batch.ordinals[batch.scored]] = batch.nll[batch.scored].double()
    return nll


def per_ordinal_nll(hp, tokens, slot=False, ttt=False, model=None):
    model = model or noisy_model(hp)
    runtime = trainer.Runtime()
    if ttt:
        batches = trainer.ttt_scores(model, tokens, hp, runtime)
    else:
        windows = trainer.evaluation_windows(hp, tokens.numel() - 1, slot)
        batches = trainer.sliding_scores(model.eval().requires_grad_(False), tokens, windows, hp, runtime, slot)
    nll = nll_by_ordinal(batches, tokens.numel() - 1)
    assert not nll.isnan().any()
    return nll


def legality_probe(hp, probe: int, **mode):
    """NLL per ordinal before and after changing token probe+1 (the target of ordinal `probe`)."""
    tokens = val_tokens(600)
    changed = tokens.clone()
    changed[probe + 1] = (changed[probe + 1] + 1) % 1024
    return per_ordinal_nll(hp, tokens, **mode), per_ordinal_nll(hp, changed, **mode)


# Windows of 64 with stride 16 in batches of 8: ordinal 230 is scored by window 11, in
# the middle of the batch of windows 8-15; windows 12-15 hold it as context.
PROBE = 230
SLOT = {"EVAL_BATCH_SEQS": "8", "SLOT_STEPS": "3", "SLOT_LR": "0.05"}


@pytest.mark.parametrize("mode", trainer.LEGAL_SLOT_MODES)
def test_causal_slot_modes_never_look_ahead(mode):
    before, after = legality_probe(tiny_hp(SLOT_MODE=mode, **SLOT), PROBE, slot=True)
    assert torch.equal(before[:PROBE], after[:PROBE])  # every earlier score, to the last bit
    assert before[PROBE] != after[PROBE]  # the probe does reach the model


def test_the_probe_catches_the_shared_slot_leak():
    before, after = legality_probe(tiny_hp(SLOT_MODE="shared", **SLOT), PROBE, slot=True)
    assert not torch.equal(before[:PROBE], after[:PROBE])


def test_ttt_never_looks_ahead():
    hp = tiny_hp(TTT_CHUNK_TOKENS="128", TTT_EPOCHS="2", TTT_LR="0.05", TTT_BATCH_SEQS="2", TTT_FREEZE_BLOCKS="1")
    before, after = legality_probe(hp, PROBE, ttt=True)
    assert torch.equal(before[:PROBE], after[:PROBE])
    assert before[PROBE] != after[PROBE]
    # and adaptation happens: a later chunk's scores differ from plain sliding
    plain = per_ordinal_nll(hp, val_tokens(600))
    assert torch.equal(plain[:128], before[:128]) and not torch.equal(plain[128:], before[128:])


def test_slot_changes_scores_and_modes_differ():
    tokens = val_tokens(600)
    plain = per_ordinal_nll(tiny_hp(**SLOT), tokens)
    scores = {mode: per_ordinal_nll(tiny_hp(SLOT_MODE=mode, **SLOT), tokens, slot=True) for mode in trainer.SLOT_MODES}
    assert torch.equal(scores["window"][:64], plain[:64])  # the first window has no context: delta stays 0
    assert all(not torch.equal(nll, plain) for nll in scores.values())
    assert not torch.equal(scores["window"], scores["batch_causal"])


def reference_slot_bpb(model, tokens, byte_table, seq_len, stride, batch_windows, world_size, steps, lr):
    """The reference's sliding evaluation with its shared SLOT, written out plainly: a
    window every `stride` tokens (short ones at the end, zero-padded, scoring their last
    `stride` tokens again); each rank takes a contiguous share; per batch one delta,
    fitted on positions [0, seq_len - stride - 1) of every window, hidden states cast to
    bfloat16 before the head."""
    total = tokens.numel() - 1
    starts = list(range(0, total, stride))
    nll_sum, byte_sum = 0.0, 0.0
    for rank in range(world_size):
        mine = starts[len(starts) * rank // world_size : len(starts) * (rank + 1) // world_size]
        for first in range(0, len(mine), batch_windows):
            batch = mine[first : first + batch_windows]
            x = torch.zeros(len(batch), seq_len, dtype=torch.int64)
            y = torch.zeros_like(x)
            lengths = []
            for i, start in enumerate(batch):
                end = min(start + seq_len, total)
                lengths.append(end - start)
                x[i, : end - start], y[i, : end - start] = tokens[start:end], tokens[start + 1 : end + 1]
            with torch.no_grad():
                hidden = model.forward_hidden(x).float()
            delta = torch.zeros(1, 1, hidden.size(-1), requires_grad=True)
            optimizer = torch.optim.AdamW([delta], lr=lr, weight_decay=1e-8, eps=1e-5)
            fit = max(seq_len - stride, 1) - 1
            for _ in range(steps):
                optimizer.zero_grad()
                logits = model.logits((hidden + delta).to(torch.bfloat16)).float()
                F.cross_entropy(logits[:, :fit].reshape(-1, logits.size(-1)), y[:, :fit].reshape(-1)).backward()
                optimizer.step()
            with torch.no_grad():
                logits = model.logits((hidden + delta).to(torch.bfloat16)).float()
                nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none").view(len(batch), -1)
            for i, start in enumerate(batch):
                scored = slice(0 if start == 0 else max(lengths[i] - stride, 0), lengths[i])
                nll_sum += float(nll[i, scored].double().sum())
                byte_sum += float(trainer.count_bytes(byte_table, x[i, scored], y[i, scored]).sum())
    return nll_sum / math.log(2) / byte_sum


@pytest.mark.parametrize("world_size", [1, 8])
def test_shared_mode_is_the_references_slot(byte_table, world_size):
    hp = tiny_hp(SLOT_MODE="shared", EVAL_BATCH_SEQS="4", SLOT_STEPS="3", SLOT_LR="0.05")
    model = noisy_model(hp).eval().requires_grad_(False)
    tokens = val_tokens(500)
    windows = trainer.evaluation_windows(hp, tokens.numel() - 1, slot=True)
    score = trainer.ScoreSum(trainer.Runtime(), byte_table)
    for rank in range(world_size):
        for batch in trainer.sliding_scores(model, tokens, trainer.rank_share(windows, trainer.Runtime(rank=rank, world_size=world_size)),
                                            hp, trainer.Runtime(), slot=True):
            score.add(batch)
    expected = reference_slot_bpb(model, tokens, byte_table, 64, 16, 4, world_size, 3, 0.05)
    assert score.result().bpb == pytest.approx(expected, rel=1e-9)  # the same up to the order of float64 sums


def test_sliding_evaluation_restores_the_trainable_flags(byte_table):
    hp = tiny_hp(**SLOT)
    model = noisy_model(hp)
    model.smear.gate.requires_grad_(False)
    trainer.evaluate_sliding(model, data_of(val_tokens(300), byte_table), hp, trainer.Runtime(), slot=True)
    assert [p.requires_grad for p in model.parameters()].count(False) == 1 and not model.smear.gate.requires_grad
    assert model.training


def test_ttt_leaves_the_callers_model_unchanged(byte_table):
    hp = tiny_hp(TTT_CHUNK_TOKENS="128", TTT_LR="0.05")
    model = noisy_model(hp)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.evaluate_ttt(model, data_of(val_tokens(400), byte_table), hp, trainer.Runtime())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def line_shape(line: str) -> str:
    return re.sub(r"\d+", "N", line)


def test_log_lines_have_the_reference_shapes(capsys):
    reference = {line_shape(line) for line in REFERENCE_LOG.read_text().splitlines()}
    nll = 1.86009741 * 1000
    result = trainer.EvalResult(nll=nll, tokens=1000.0, bytes=nll / math.log(2) / 1.10165738, seconds=165.229)
    runtime = trainer.Runtime()
    trainer.log_result(runtime, "final_int6_roundtrip", result)
    trainer.log_result(runtime, "final_int6_sliding_window", result, "stride:64 ")
    trainer.log_result(runtime, "legal_ttt", result)
    lines = capsys.readouterr().out.splitlines()
    assert "final_int6_sliding_window val_loss:1.8601 val_bpb:1.1017 stride:64 eval_time:165229ms" in lines
    assert "final_int6_sliding_window_exact val_loss:1.86009741 val_bpb:1.10165738" in lines
    assert len(lines) == 6 and all(line_shape(line) in reference for line in lines), lines
