"""trainer.evaluation: exact bytes, sliding windows, SLOT modes, TTT, the legality probes,
the PR #1217 record's leaky SLOT reproduced for comparison, the labels and the budget."""

from __future__ import annotations

import copy
import functools
import math
import re

import pytest
import torch
import torch.nn.functional as F

import trainer.evaluation as evaluation_module
from trainer.evaluation import (CAUSAL_SLOT_MODES, EvalData, EvalResult, EvaluationClock, ScoreSum, Window, build_token_bytes,
                                count_bytes, evaluate_artifact, evaluate_sliding, evaluate_standard, evaluate_ttt,
                                evaluation_windows, log_result, rank_share, record_1217_windows, score_kind, slot_label,
                                sliding_scores, sliding_windows, ttt_scores, with_slot)
from trainer.runtime import Progress, Runtime
from trainer.settings import SLOT_MODES
from trainer.shards import BOS_ID
from conftest import ROOT, TOKENIZER_8192, batch_layouts, nll_by_ordinal, noisy_model, tiny_hp, ttt_layout

RECORD_LOG = ROOT / "tests" / "data" / "record-logs" / "train_seed1337.log"

# The FineWeb tokenizer normalises text (NFKC, whitespace collapsed) and has no byte
# pieces: characters outside its vocabulary become <unk>, which counts 0 bytes (the
# reference's rule). So counts are checked against the decoded text.
COVERED = ["Hello world", "  two  spaces\nand a newline\n\n", "digits 0123456789 and 3.14159, (x)!",
           "MiXeD CaSe: The quick brown fox; 'quotes' \"double\"", "a\ttab | pipe - dash"]
UNCOVERED = ["accents: café, naïve, Zürich", "emoji: 🎉🐍 done", "CJK 漢字かな 한국어", "brackets [y] {z} ~`\\"]


def counted_bytes(tokenizer, ids: list[int]) -> int:
    token_bytes = build_token_bytes(tokenizer, 1024, torch.device("cpu"))
    ids_t = torch.tensor([BOS_ID] + ids)
    return int(count_bytes(token_bytes, ids_t[:-1], ids_t[1:]).sum())


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


BYTE_FALLBACK = ["accents: café, naïve, Zürich", "emoji: 🎉🐍 done", "CJK 漢字かな 한국어", "brackets [y] {z} ~`\\",
                 "Hello world", "  two  spaces\nand a newline\n\n"]


@pytest.fixture(scope="module")
def tokenizer_8192():
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZER_8192))


def test_the_sp8192_tokenizer_has_256_byte_pieces_of_one_byte_each(tokenizer_8192):
    token_bytes = build_token_bytes(tokenizer_8192, 8192, torch.device("cpu"))
    byte_pieces = [i for i in range(tokenizer_8192.vocab_size()) if tokenizer_8192.is_byte(i)]
    assert len(byte_pieces) == 256 and token_bytes.base[byte_pieces].tolist() == [1] * 256
    assert not token_bytes.leading_space[byte_pieces].any() and not token_bytes.boundary[byte_pieces].any()


@pytest.mark.parametrize("text", BYTE_FALLBACK)
def test_with_byte_fallback_every_text_counts_its_own_bytes(tokenizer_8192, text):
    """Nothing is <unk> with byte fallback: the count is the decoded text's UTF-8 length."""
    ids = tokenizer_8192.encode(text)
    token_bytes = build_token_bytes(tokenizer_8192, 8192, torch.device("cpu"))
    ids_t = torch.tensor([BOS_ID] + ids)
    counted = int(count_bytes(token_bytes, ids_t[:-1], ids_t[1:]).sum())
    assert tokenizer_8192.unk_id() not in ids and counted == len(tokenizer_8192.decode(ids).encode("utf-8"))


class ByteFallbackTokenizer:
    """A stand-in with byte pieces, for the byte rule by hand."""
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
    token_bytes = build_token_bytes(ByteFallbackTokenizer(), 8, torch.device("cpu"))
    ids = torch.tensor([1, 6, 4, 5, 7])  # BOS " caf" 0xC3 0xA9 " x"  ->  "café x" after BOS
    assert count_bytes(token_bytes, ids[:-1], ids[1:]).tolist() == [3, 1, 1, 2]


@pytest.mark.parametrize("full_last", [True, False], ids=["full_last", "on_the_grid"])
@pytest.mark.parametrize("num_ordinals, seq_len, stride", [(1000, 64, 16), (1000, 64, 64), (999, 64, 10), (40, 64, 16),
                                                           (64, 64, 16), (65, 64, 64), (1, 8, 4), (1005, 64, 16)])
def test_sliding_windows_score_every_ordinal_once(num_ordinals, seq_len, stride, full_last):
    scored, previous_end = [], 0
    windows = sliding_windows(num_ordinals, seq_len, stride, full_last)
    for index, (start, end, first) in enumerate(windows):
        assert first == previous_end and 0 <= start <= first < end and end - start <= seq_len
        assert first - start >= min(seq_len - stride, first)  # full context where the data allows
        if full_last or end < num_ordinals:
            assert end - start == min(seq_len, num_ordinals)
        if not full_last or end < num_ordinals:
            assert start == index * stride  # on the stride grid, as the PR #1493 record lays them out
        scored.extend(range(first, end))
        previous_end = end
    assert scored == list(range(num_ordinals))


def test_the_two_layouts_differ_only_in_the_last_window():
    full, grid = sliding_windows(1005, 64, 16, True), sliding_windows(1005, 64, 16, False)
    assert full[:-1] == grid[:-1] and full[-1] == Window(941, 1005, 992) and grid[-1] == Window(944, 1005, 992)


def test_record_1217_windows_rescore_the_tail():
    windows = record_1217_windows(100, 64, 16)
    assert [w.start for w in windows] == list(range(0, 100, 16))
    scored = [o for w in windows for o in range(w.first_scored, w.end)]
    assert set(scored) == set(range(100)) and len(scored) == 100 + 16 * 3  # windows at 48, 64, 80 score 84..99 again


def val_tokens(count: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 1024, (count,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def byte_table(tokenizer):
    return build_token_bytes(tokenizer, 1024, torch.device("cpu"))


def data_of(tokens, byte_table):
    return EvalData(val_tokens=tokens, token_bytes=byte_table)


def test_stride_equal_to_seq_len_is_standard_evaluation(byte_table):
    hp = tiny_hp(EVAL_STRIDE="64", SLOT_ENABLED="0")
    model, tokens, runtime = noisy_model(hp), val_tokens(64 * 10 + 1), Runtime()
    standard = evaluate_standard(model, tokens, 64, 64 * 3, byte_table, runtime)
    sliding, adapted = evaluate_sliding(model, data_of(tokens, byte_table), hp, runtime)
    assert adapted is None and sliding.tokens == standard.tokens == 640 and sliding.bytes == standard.bytes
    assert sliding.bpb == pytest.approx(standard.bpb, rel=1e-9)


def per_ordinal_nll(hp, tokens, ttt=False, model=None):
    """Every ordinal's NLL as the evaluation scores it (through SLOT when the settings say so)."""
    model = model or noisy_model(hp)
    runtime, slot, count = Runtime(), hp.slot_enabled and hp.slot_steps > 0, tokens.numel() - 1
    if ttt:
        batches = list(ttt_scores(model, tokens, hp, runtime))
        assert all(batch.slot_nll is None for batch in batches)  # TTT scores without SLOT
        nll = nll_by_ordinal(batches, ttt_layout(hp, count), count, False)
    else:
        windows = evaluation_windows(hp, count, slot)
        batches = sliding_scores(model.eval().requires_grad_(False), tokens, windows, hp, runtime, slot)
        nll = nll_by_ordinal(batches, batch_layouts(windows, hp.eval_batch_seqs), count, slot)
    assert not nll.isnan().any()
    return nll


@functools.cache
def probe_tokens(probe: int | None) -> torch.Tensor:
    """The probes' validation text, or that text with the target of ordinal `probe` changed."""
    tokens = val_tokens(600)
    if probe is not None:
        tokens[probe + 1] = (tokens[probe + 1] + 1) % 1024
    return tokens


@functools.cache
def cached_nll(settings: tuple[tuple[str, str], ...], probe: int | None, ttt: bool = False) -> torch.Tensor:
    """per_ordinal_nll, computed once per settings and text for the whole module."""
    return per_ordinal_nll(tiny_hp(**dict(settings)), probe_tokens(probe), ttt=ttt)


def legality_probe(settings: dict, probe: int, ttt: bool = False):
    """NLL per ordinal before and after changing token probe+1 (the target of ordinal `probe`)."""
    key = tuple(sorted(settings.items()))
    return cached_nll(key, None, ttt), cached_nll(key, probe, ttt)


# Windows of 64 with stride 16 in batches of 8: ordinal 230 is scored by window 11, in
# the middle of the batch of windows 8-15; windows 12-15 hold it as context.
PROBE = 230
SLOT = {"EVAL_BATCH_SEQS": "8", "SLOT_STEPS": "3", "SLOT_LR": "0.05"}


@pytest.mark.parametrize("mode", CAUSAL_SLOT_MODES)
def test_causal_slot_modes_never_look_ahead(mode):
    before, after = legality_probe({"SLOT_MODE": mode, **SLOT}, PROBE)
    assert torch.equal(before[:PROBE], after[:PROBE])  # every earlier score, to the last bit
    assert before[PROBE] != after[PROBE]  # the probe does reach the model


def test_the_probe_catches_the_shared_slot_leak():
    before, after = legality_probe({"SLOT_MODE": "shared", **SLOT}, PROBE)
    assert not torch.equal(before[:PROBE], after[:PROBE])


TTT = {"TTT_CHUNK_TOKENS": "128", "TTT_EPOCHS": "2", "TTT_LR": "0.05", "TTT_BATCH_SEQS": "2", "TTT_FREEZE_BLOCKS": "1",
       "SLOT_ENABLED": "0"}
# The PR #1493 model (loops over 1..2, parallel residuals from layer 3) and its TTT (all
# parameters trainable, the last window on the stride grid).
LOOPED = {"PROFILE": "pr1493", "NUM_LAYERS": "4", "LOOP_START": "1", "LOOP_END": "2", "PARALLEL_RESIDUAL_START": "3",
          "XSA_LAST_N": "4", "BIGRAM_VOCAB_SIZE": "0", "VOCAB_SIZE": "1024", "TOKENIZER_PATH": str(ROOT / "data/tokenizers/fineweb_1024_bpe.model"),
          "TTT_CHUNK_TOKENS": "128", "TTT_EPOCHS": "2", "TTT_LR": "0.05", "TTT_BATCH_SEQS": "2"}


def test_ttt_never_looks_ahead():
    before, after = legality_probe(TTT, PROBE, ttt=True)
    assert torch.equal(before[:PROBE], after[:PROBE])
    assert before[PROBE] != after[PROBE]
    # and adaptation happens: a later chunk's scores differ from plain sliding
    plain = cached_nll(tuple(sorted(TTT.items())), None)
    assert torch.equal(plain[:128], before[:128]) and not torch.equal(plain[128:], before[128:])


def looped_nll(probe, ttt):
    hp = tiny_hp(**LOOPED)
    model = noisy_model(hp)
    model.looping = True
    return per_ordinal_nll(hp, probe_tokens(probe), ttt=ttt, model=model)


@pytest.mark.parametrize("ttt", [False, True], ids=["sliding", "ttt"])
def test_the_looped_parallel_model_and_its_ttt_never_look_ahead(ttt):
    before, after = looped_nll(None, ttt), looped_nll(PROBE, ttt)
    assert torch.equal(before[:PROBE], after[:PROBE])
    assert before[PROBE] != after[PROBE]


def test_pr1493_ttt_trains_every_parameter(byte_table):
    hp = tiny_hp(**LOOPED)
    assert hp.ttt_freeze_blocks == 0
    lines = []
    runtime = Runtime()
    runtime.log = lambda message, console=True: lines.append(message)
    model = noisy_model(hp)
    evaluate_ttt(model, data_of(val_tokens(400), byte_table), hp, runtime)
    assert f"unfrozen={sum(p.numel() for p in model.parameters())} frozen=0" in lines[0]


def test_slot_changes_scores_and_modes_differ():
    plain = cached_nll(tuple(sorted({**SLOT, "SLOT_ENABLED": "0"}.items())), None)
    scores = {mode: cached_nll(tuple(sorted({"SLOT_MODE": mode, **SLOT}.items())), None) for mode in SLOT_MODES}
    assert torch.equal(scores["window"][:64], plain[:64])  # the first window has no context: delta stays 0
    assert all(not torch.equal(nll, plain) for nll in scores.values())
    assert not torch.equal(scores["window"], scores["batch_causal"])


def record_1217_slot_bpb(model, tokens, byte_table, seq_len, stride, batch_windows, world_size, steps, lr):
    """The PR #1217 record's sliding evaluation with its shared SLOT, written out plainly: a
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
                byte_sum += float(count_bytes(byte_table, x[i, scored], y[i, scored]).sum())
    return nll_sum / math.log(2) / byte_sum


@pytest.mark.parametrize("world_size", [1, 8])
def test_shared_mode_is_the_record_1217_slot(byte_table, world_size):
    hp = tiny_hp(SLOT_MODE="shared", EVAL_BATCH_SEQS="4", SLOT_STEPS="3", SLOT_LR="0.05")
    model = noisy_model(hp).eval().requires_grad_(False)
    tokens = val_tokens(500)
    windows = evaluation_windows(hp, tokens.numel() - 1, slot=True)
    score = ScoreSum(Runtime(), byte_table)
    for rank in range(world_size):
        for batch in sliding_scores(model, tokens, rank_share(windows, Runtime(rank=rank, world_size=world_size)),
                                    hp, Runtime(), slot=True):
            score.add(batch, batch.slot_nll)
    expected = record_1217_slot_bpb(model, tokens, byte_table, 64, 16, 4, world_size, 3, 0.05)
    assert score.result().bpb == pytest.approx(expected, rel=1e-9)  # the same up to the order of float64 sums


def test_sliding_evaluation_restores_the_trainable_flags(byte_table):
    hp = tiny_hp(**SLOT)
    model = noisy_model(hp)
    model.smear.gate.requires_grad_(False)
    evaluate_sliding(model, data_of(val_tokens(300), byte_table), hp, Runtime())
    assert [p.requires_grad for p in model.parameters()].count(False) == 1 and not model.smear.gate.requires_grad
    assert model.training


def test_ttt_leaves_the_callers_model_unchanged(byte_table):
    hp = tiny_hp(TTT_CHUNK_TOKENS="128", TTT_LR="0.05")
    model = noisy_model(hp)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate_ttt(model, data_of(val_tokens(400), byte_table), hp, Runtime())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def line_shape(line: str) -> str:
    return re.sub(r"\d+", "N", line)


def test_log_lines_have_the_record_shapes(capsys):
    reference = {line_shape(line) for line in RECORD_LOG.read_text().splitlines()}
    nll = 1.86009741 * 1000
    result = EvalResult(nll=nll, tokens=1000.0, bytes=nll / math.log(2) / 1.10165738, seconds=165.229)
    runtime = Runtime()
    log_result(runtime, "final_int6_roundtrip", result)
    log_result(runtime, "final_int6_sliding_window", result, "stride:64 ")
    log_result(runtime, "legal_ttt", result)
    lines = capsys.readouterr().out.splitlines()
    assert "final_int6_sliding_window val_loss:1.8601 val_bpb:1.1017 stride:64 eval_time:165229ms" in lines
    assert "final_int6_sliding_window_exact val_loss:1.86009741 val_bpb:1.10165738" in lines
    assert len(lines) == 6 and all(line_shape(line) in reference for line in lines), lines


@pytest.mark.parametrize("mode", SLOT_MODES)
def test_the_plain_score_beside_slot_is_the_score_without_slot(byte_table, mode):
    hp = tiny_hp(SLOT_MODE=mode, **SLOT)
    model, data = noisy_model(hp), data_of(val_tokens(600), byte_table)
    plain, adapted = evaluate_sliding(model, data, hp, Runtime())
    without, none = evaluate_sliding(model, data, with_slot(hp, "off"), Runtime())
    assert none is None and adapted is not None and adapted.bpb != plain.bpb
    assert (plain.nll, plain.tokens, plain.bytes) == (without.nll, without.tokens, without.bytes)


@pytest.mark.parametrize("settings, counted, slot, causal, accepted", [
    ({"SLOT_ENABLED": "0"}, "final_int6_sliding_window_exact", "off", "yes", "yes"),
    ({"SLOT_MODE": "window"}, "final_int6_sliding_window_slot_exact", "window", "yes", "no"),
    ({"SLOT_MODE": "shared"}, "final_int6_sliding_window_slot_exact", "shared", "no", "no"),
    ({"SLOT_MODE": "shared", "TTT_ENABLED": "1", "TTT_CHUNK_TOKENS": "256"}, "legal_ttt_exact", "off", "yes", "yes"),
], ids=["plain", "causal_slot", "shared_slot", "ttt"])
def test_the_final_score_says_whether_it_is_causal_and_accepted(byte_table, settings, counted, slot, causal, accepted):
    hp = tiny_hp(**{**SLOT, "TTT_ENABLED": "0", **settings})
    lines = []
    runtime = Runtime()
    runtime.log = lambda message, console=True: lines.append(message)
    evaluate_artifact(hp, noisy_model(hp), data_of(val_tokens(400), byte_table), runtime)
    (final,) = [line for line in lines if line.startswith("final_score ")]
    assert re.fullmatch(rf"final_score {counted} val_bpb:[\d.]+ slot:{slot} causal:{causal} accepted:{accepted} "
                        r"eval_total_time:\d+ms", final)
    assert any(line.startswith("final_int6_sliding_window_exact ") for line in lines)  # the plain score, always
    assert any("never accepted" in line for line in lines) == (slot != "off")
    assert score_kind(slot) == (slot, causal == "yes", accepted == "yes")


def test_the_evaluation_budget_is_warned_about_once_as_soon_as_an_estimate_passes_it(monkeypatch):
    lines = []
    runtime = Runtime()
    runtime.log = lambda message, console=True: lines.append(message)
    clock = EvaluationClock(runtime)
    clock.watch("sliding evaluation", 500.0)
    assert lines == []
    clock.watch("sliding evaluation", 700.0)
    clock.watch("TTT chunks", 900.0)
    assert len(lines) == 1 and lines[0].startswith("warning: evaluation is on course for ~700s (sliding evaluation), "
                                                   "over the challenge's 600s")
    # an estimate of exactly the budget is no warning
    monkeypatch.setattr(EvaluationClock, "seconds", property(lambda self: 100.0))
    lines.clear()
    clock = EvaluationClock(runtime)
    clock.watch("TTT passes", 500.0)
    assert lines == []
    clock.watch("TTT passes", 500.5)
    assert lines == ["warning: evaluation is on course for ~600s (TTT passes), over the challenge's 600s for all evaluation"]


def test_slot_evaluation_reports_progress_after_every_step(byte_table, monkeypatch):
    """A huge SLOT_STEPS is seen at once: progress counts SLOT steps, not finished batches."""
    seen = []
    monkeypatch.setattr(evaluation_module.Progress, "update", lambda self, done, seconds_left=None: seen.append((done, self.total)))
    hp = tiny_hp(**{**SLOT, "SLOT_STEPS": "5"})
    evaluate_sliding(noisy_model(hp), data_of(val_tokens(300), byte_table), hp, Runtime())
    batches = -(-len(evaluation_windows(hp, 299, True)) // 8)
    assert seen == [(done, 5 * batches) for done in range(1, 5 * batches + 1)]


@pytest.mark.parametrize("count, chunk_tokens, chunks", [(400, 128, 4), (401, 100, 4), (402, 100, 5)])
def test_ttt_reports_progress_after_every_pass(byte_table, monkeypatch, count, chunk_tokens, chunks):
    """A huge TTT_EPOCHS is seen at once: progress counts each chunk's scoring and each epoch
    of training on it, not finished chunks (count - 1 ordinals; the last chunk may be short)."""
    seen = []
    monkeypatch.setattr(evaluation_module.Progress, "update", lambda self, done, seconds_left=None: seen.append((done, self.total)))
    hp = tiny_hp(**{**TTT, "TTT_EPOCHS": "3", "TTT_CHUNK_TOKENS": str(chunk_tokens)})
    evaluate_ttt(noisy_model(hp), data_of(val_tokens(count), byte_table), hp, Runtime())
    assert seen == [(done, chunks + 3 * (chunks - 1)) for done in range(1, chunks + 3 * (chunks - 1) + 1)]


def test_a_non_finite_final_score_is_a_failure(byte_table, monkeypatch):
    hp = tiny_hp(SLOT_ENABLED="0", TTT_ENABLED="0")
    nan = EvalResult(math.nan, 1.0, 1.0, 0.0)
    monkeypatch.setattr(evaluation_module, "evaluate_sliding", lambda *args: (nan, None))
    lines = []
    runtime = Runtime()
    runtime.log = lambda message, console=True: lines.append(message)
    with pytest.raises(evaluation_module.RunError, match=r"the final score is not finite \(nan\); the artifact is not usable"):
        evaluate_artifact(hp, noisy_model(hp), data_of(val_tokens(300), byte_table), runtime)
    assert lines[-1].startswith("final_score final_int6_sliding_window_exact val_bpb:nan ")


# Evaluation ranges, each against a straightforward re-implementation.
def windows_by_hand(num_ordinals, seq_len, stride, full_last):
    """Window k starts at k * stride and scores what its predecessor left, up to its end;
    the one that reaches the end starts seq_len before it when full_last."""
    windows, k = [], 0
    while not windows or windows[-1].end < num_ordinals:
        start, end = k * stride, min(k * stride + seq_len, num_ordinals)
        first = windows[-1].end if windows else 0
        if end == num_ordinals and full_last:
            start = max(num_ordinals - seq_len, 0)
        if end > first:
            windows.append(Window(start, end, first))
        k += 1
    return windows


@pytest.mark.parametrize("full_last", [True, False], ids=["full_last", "on_the_grid"])
def test_a_sliding_evaluation_scores_every_ordinal_once_from_its_own_window(byte_table, full_last):
    """Stride 16 < 64: the exact tokens, bytes and NLL, window by window, as a plain loop
    over the model makes them."""
    hp = tiny_hp(SLOT_ENABLED="0", EVAL_STRIDE="16", EVAL_BATCH_SEQS="5", EVAL_FULL_LAST_WINDOW=str(int(full_last)))
    model, tokens = noisy_model(hp).eval(), val_tokens(300)
    windows = windows_by_hand(299, 64, 16, full_last)
    assert sliding_windows(299, 64, 16, full_last) == windows
    nll, byte_count = 0.0, 0.0
    with torch.no_grad():
        for start, end, first in windows:
            window_nll = model.token_nll(tokens[None, start:end], tokens[None, start + 1 : end + 1])[0]
            nll += window_nll[first - start :].double().sum().item()
            byte_count += count_bytes(byte_table, tokens[first:end], tokens[first + 1 : end + 1]).sum().item()
    result, _ = evaluate_sliding(model, data_of(tokens, byte_table), hp, Runtime())
    assert result.tokens == 299 and result.bytes == byte_count
    assert result.nll == pytest.approx(nll, rel=1e-6)


@pytest.mark.parametrize("mode", CAUSAL_SLOT_MODES)
def test_causal_slot_fits_on_exactly_the_ordinals_already_scored(byte_table, mode):
    """window: the positions of the window whose ordinals an earlier window scored;
    batch_causal: those that an earlier batch scored. Not one position fewer or more."""
    hp = tiny_hp(SLOT_MODE=mode, EVAL_STRIDE="16", EVAL_BATCH_SEQS="5", SLOT_STEPS="1")
    tokens = val_tokens(300)
    windows = sliding_windows(299, 64, 16, True)
    fitted = []

    def recording_objective(model, hidden, delta, targets, weights, in_bf16):
        fitted.append(weights > 0)
        return evaluation_module.slot_objective(model, hidden, delta, targets, weights, in_bf16)

    list(sliding_scores(noisy_model(hp).eval().requires_grad_(False), tokens, windows, hp, Runtime(), True,
                        objective=recording_objective))
    expected = []
    for first in range(0, len(windows), 5):
        batch = windows[first : first + 5]
        earlier_batches_scored = batch[0].first_scored  # everything before the batch's first window's scores
        for start, end, first_scored in batch:
            known = first_scored if mode == "window" else earlier_batches_scored
            expected.append([start + p < known and start + p < end for p in range(64)])
    assert torch.cat(fitted).tolist() == expected
    assert any(any(row) for row in expected) and not all(all(row) for row in expected)


def test_ttt_trains_after_every_chunk_but_the_last_with_a_cosine_learning_rate(byte_table, monkeypatch):
    calls = []
    monkeypatch.setattr(evaluation_module, "train_on_chunk",
                        lambda model, forward, params, optimizer, tokens, start, end, lr, *rest: calls.append((start, end, lr)))
    hp = tiny_hp(**{**TTT, "TTT_LR": "0.03", "TTT_CHUNK_TOKENS": "70"})
    result = evaluate_ttt(noisy_model(hp), data_of(val_tokens(300), byte_table), hp, Runtime())
    chunks = 5  # 299 ordinals in chunks of 70
    assert [(start, end) for start, end, _ in calls] == [(0, 70), (70, 140), (140, 210), (210, 280)]
    assert [lr for _, _, lr in calls] == pytest.approx([0.03 * (1 + math.cos(math.pi * i / (chunks - 1))) / 2 for i in range(4)])
    assert result.tokens == 299


def test_a_run_with_ttt_counts_the_ttt_score(byte_table):
    hp = tiny_hp(**TTT)
    lines = []
    runtime = Runtime()
    runtime.log = lambda message, console=True: lines.append(message)
    counted = evaluate_artifact(hp, noisy_model(hp), data_of(val_tokens(300), byte_table), runtime)
    ttt = evaluate_ttt(noisy_model(hp), data_of(val_tokens(300), byte_table), hp, Runtime())
    sliding = next(line for line in lines if line.startswith("final_int6_sliding_window_exact "))
    assert counted.bpb == ttt.bpb and f"val_bpb:{ttt.bpb:.8f}" not in sliding
    assert any(line == f"legal_ttt_exact val_loss:{ttt.loss:.8f} val_bpb:{ttt.bpb:.8f}" for line in lines)
    (final,) = [line for line in lines if line.startswith("final_score ")]
    assert final.startswith(f"final_score legal_ttt_exact val_bpb:{ttt.bpb:.8f} slot:off causal:yes accepted:yes ")


def test_with_slot_switches_slot_and_keeps_the_mode_when_off():
    hp = tiny_hp(SLOT_MODE="batch_causal", SLOT_ENABLED="0")
    assert (with_slot(hp, "off").slot_enabled, with_slot(hp, "off").slot_mode) == (False, "batch_causal")
    assert (with_slot(hp, "shared").slot_enabled, with_slot(hp, "shared").slot_mode) == (True, "shared")
    assert with_slot(tiny_hp(SLOT_MODE="shared"), "off").slot_mode == "shared"


@pytest.mark.parametrize("stride", [16, 63])
@pytest.mark.parametrize("mode", CAUSAL_SLOT_MODES)
def test_causal_slot_scores_are_a_plain_fit_of_the_delta(byte_table, mode, stride):
    """window: one delta per window fitted to the mean NLL of its already-scored positions;
    batch_causal: one delta per batch, fitted to the mean over the batch's; AdamW with
    weight decay 1e-8 and eps 1e-5, SLOT_STEPS steps; then the scored positions through it.
    The model is 96 wide, so a delta shaped by the window length instead would not fit."""
    hp = tiny_hp(SLOT_MODE=mode, EVAL_STRIDE=str(stride), EVAL_BATCH_SEQS="5", SLOT_STEPS="3", SLOT_LR="0.05",
                 MODEL_DIM="96", NUM_HEADS="2", NUM_KV_HEADS="2")
    model, tokens = noisy_model(hp).eval().requires_grad_(False), val_tokens(300)
    windows = sliding_windows(299, 64, stride, True)
    got = list(sliding_scores(model, tokens, windows, hp, Runtime(), True))
    for batch, first in zip(got, range(0, len(windows), 5)):
        rows = windows[first : first + 5]
        inputs, targets = (torch.stack([F.pad(tokens[w.start + shift : w.end + shift], (0, 64 - (w.end - w.start))) for w in rows])
                           for shift in (0, 1))  # zero-padded after a short window's end
        hidden = model.forward_hidden(inputs).float()
        known = min(w.first_scored for w in rows)
        mask = torch.tensor([[w.start + p < (w.first_scored if mode == "window" else known) for p in range(64)] for w in rows],
                            dtype=torch.float32)
        delta = torch.zeros(len(rows) if mode == "window" else 1, 1, hidden.size(-1), requires_grad=True)
        adam = torch.optim.AdamW([delta], lr=0.05, weight_decay=1e-8, eps=1e-5)
        weights = mask / (mask.sum(1, keepdim=True) if mode == "window" else mask.sum()).clamp_min(1)
        for _ in range(3):
            adam.zero_grad()
            logits = model.logits(hidden + delta).float()
            (F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none") * weights.flatten()).sum().backward()
            adam.step()
        offset = min(w.first_scored - w.start for w in rows)
        with torch.no_grad():
            logits = model.logits(hidden + delta)[:, offset:]
        nll = F.cross_entropy(logits.flatten(0, 1), targets[:, offset:].flatten(), reduction="none").view(len(rows), -1)
        assert torch.allclose(batch.slot_nll[batch.scored], nll[batch.scored], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_tokens, clip", [(191, 0.5), (192, 1e9)], ids=["191_clipped", "192_unclipped"])
def test_ttt_is_score_first_then_sgd_on_each_chunk_as_a_plain_loop_does_it(byte_table, chunk_tokens, clip):
    """Chunk by chunk: its windows scored by the model as trained so far; then, for every
    chunk but the last, TTT_EPOCHS of SGD with momentum (one optimiser for the whole run)
    over the chunk's whole sequences (whose targets lie inside it: two of 64 in 191 tokens,
    three in 192) in batches of TTT_BATCH_SEQS (the last one short), gradient-clipped, at
    the chunk's cosine learning rate; the first TTT_FREEZE_BLOCKS blocks never train."""
    hp = tiny_hp(**{**TTT, "TTT_CHUNK_TOKENS": str(chunk_tokens), "TTT_GRAD_CLIP": str(clip), "EVAL_STRIDE": "32",
                    "TTT_LR": "0.5"})
    model, tokens = noisy_model(hp), val_tokens(3 * chunk_tokens - 20)
    count = tokens.numel() - 1
    result = evaluate_ttt(model, data_of(tokens, byte_table), hp, Runtime())
    model = copy.deepcopy(model)
    params = [param.requires_grad_(not name.startswith("blocks.0.")) for name, param in model.named_parameters()]
    trained = [param for param in params if param.requires_grad]
    sgd = torch.optim.SGD(trained, lr=0.5, momentum=0.9)
    nll = 0.0
    for chunk in range(3):
        model.eval()
        with torch.no_grad():
            for start, end, first in windows_by_hand(count, 64, 32, True):
                if first // chunk_tokens == chunk:
                    window_nll = model.token_nll(tokens[None, start:end], tokens[None, start + 1 : end + 1])[0]
                    nll += window_nll[first - start :].double().sum().item()
        if chunk == 2:
            break
        for group in sgd.param_groups:
            group["lr"] = 0.5 * (1 + math.cos(math.pi * chunk / 2)) / 2
        first_token, last_target = chunk * chunk_tokens, (chunk + 1) * chunk_tokens
        starts = [first_token + 64 * k for k in range(3) if first_token + 64 * k + 64 <= last_target]
        model.train()
        for _ in range(2):
            for batch in (starts[:2], starts[2:]):
                if batch:
                    rows = torch.stack([tokens[s : s + 65] for s in batch])
                    sgd.zero_grad()
                    model(rows[:, :-1], rows[:, 1:]).backward()
                    torch.nn.utils.clip_grad_norm_(trained, clip)
                    sgd.step()
    assert result.tokens == count and result.nll == pytest.approx(nll, rel=1e-6)


def test_every_evaluation_phase_reports_its_progress_to_the_console_and_the_clock(byte_table, monkeypatch, capsys):
    monkeypatch.setattr(Progress.__init__, "__defaults__", (0.0, None))  # a line after every unit of work
    watched = []
    monkeypatch.setattr(EvaluationClock, "watch", lambda self, label, seconds_left: watched.append(label))
    hp = tiny_hp(**{**SLOT, **TTT, "SLOT_ENABLED": "1", "SLOT_MODE": "shared", "SLOT_STEPS": "2", "EVAL_BATCH_SEQS": "6",
                    "EVAL_STRIDE": "32"})
    evaluate_artifact(hp, noisy_model(hp), data_of(val_tokens(400), byte_table), Runtime())
    plain_batches = -(-len(windows_by_hand(399, 64, 32, True)) // 6)  # 12 windows
    slot_batches = -(-len(record_1217_windows(399, 64, 32)) // 6)  # the shared layout's 13
    assert (plain_batches, slot_batches) == (2, 3)
    expected = ([f"sliding evaluation ({plain_batches} batches)"] * plain_batches
                + [f"sliding evaluation with SLOT ({slot_batches} batches)"] * (2 * slot_batches)
                + ["TTT passes (scoring a chunk, or an epoch on it)"] * (4 + 3 * 2))  # 399 ordinals in chunks of 128
    printed = [re.fullmatch(r"  (.+): (\d+)/(\d+), \d+s so far, ~\d+s left", line) for line in capsys.readouterr().out.splitlines()
               if line.startswith("  ")]
    assert [match.group(1) for match in printed] == expected and watched == expected
    assert all(match.group(3) == str(expected.count(match.group(1))) for match in printed)


def lines_of_a_whole_evaluation(byte_table, monkeypatch, seconds=12.3456, **settings) -> tuple[list[str], Runtime]:
    monkeypatch.setattr(EvaluationClock, "seconds", property(lambda self: seconds))
    hp = tiny_hp(**{**SLOT, "TTT_ENABLED": "0", **settings})
    lines = []
    runtime = Runtime()
    runtime.log = lambda message, console=True: lines.append(message)
    evaluate_artifact(hp, noisy_model(hp), data_of(val_tokens(400), byte_table), runtime)
    return lines, runtime


def test_a_whole_evaluation_logs_each_score_once_in_order(byte_table, monkeypatch):
    lines, runtime = lines_of_a_whole_evaluation(byte_table, monkeypatch, SLOT_MODE="shared",
                                                 **{**TTT, "SLOT_ENABLED": "1", "TTT_ENABLED": "1"})
    scores = [re.sub(r"eval_time:\d+ms", "T", re.sub(r"val_loss:[\d.]+ val_bpb:[\d.]+", "V", line))
              for line in lines[:-1] if not line.startswith("ttt_sliding:start ")]
    assert scores == [
        "final_int6_roundtrip V T", "final_int6_roundtrip_exact V",
        "slot:mode shared is NOT causal (later windows' context holds earlier windows' scored tokens): not a legal score",
        "final_int6_sliding_window V stride:16 T", "final_int6_sliding_window_exact V",
        "final_int6_sliding_window_slot V stride:16 slot:shared T", "final_int6_sliding_window_slot_exact V",
        "legal_ttt V T", "legal_ttt_exact V"]
    assert re.fullmatch(r"final_score legal_ttt_exact val_bpb:[\d.]+ slot:off causal:yes accepted:yes "
                        r"eval_total_time:12346ms", lines[-1])
    assert all(int(ms) < 60_000 for ms in re.findall(r"eval_time:(\d+)ms", "\n".join(lines)))
    assert runtime.stage == "during evaluation"


def test_a_counted_slot_score_is_followed_by_the_note_that_the_challenge_never_accepted_slot(byte_table, monkeypatch):
    lines, _ = lines_of_a_whole_evaluation(byte_table, monkeypatch, seconds=700.0, SLOT_MODE="window")
    warnings = [line for line in lines if line.startswith("warning: ")]  # the run's clock: past the budget at once
    assert len(warnings) == 1 and re.fullmatch(r"warning: evaluation is on course for ~7\d\ds \(sliding evaluation with SLOT "
                                               r"\(\d+ batches\)\), over the challenge's 600s for all evaluation", warnings[0])
    assert lines[-2].startswith("final_score final_int6_sliding_window_slot_exact ")
    assert lines[-1] == ("note: the counted score is a SLOT score, which the challenge has never accepted; "
                         "final_int6_sliding_window above is the plain score, of a kind it has accepted")
    assert not any(line.startswith("slot:mode shared") for line in lines)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("batch_tokens, per_batch", [(64 * 3, 3), (64, 1)])
def test_standard_evaluation_batches_as_the_record_and_pads_only_compiled_runs(byte_table, compiled, batch_tokens, per_batch):
    """Ten sequences of 64; a compiled run pads the short last batch to the others' shape."""
    model, tokens = noisy_model(tiny_hp()), val_tokens(64 * 10 + 1)
    shapes = []

    def recording_nll(inputs, targets):
        shapes.append(tuple(inputs.shape))
        return model.token_nll(inputs, targets)

    result = evaluate_standard(model, tokens, 64, batch_tokens, byte_table, Runtime(compile_enabled=compiled), recording_nll)
    sizes = [min(per_batch, 10 - first) for first in range(0, 10, per_batch)]
    assert shapes == [((per_batch if compiled else size), 64) for size in sizes]
    plain = evaluate_standard(model, tokens, 64, 64 * 10, byte_table, Runtime())
    assert result.tokens == plain.tokens == 640 and result.bytes == plain.bytes and result.nll == pytest.approx(plain.nll, rel=1e-6)


def test_slot_with_no_steps_is_off():
    assert slot_label(tiny_hp(SLOT_MODE="window", SLOT_STEPS="0")) == "off"
    assert slot_label(tiny_hp(SLOT_MODE="window", SLOT_STEPS="1")) == "window"
    assert slot_label(tiny_hp(SLOT_MODE="window", SLOT_STEPS="1", SLOT_ENABLED="0")) == "off"


def test_shared_slot_fits_on_the_records_first_positions_of_every_window():
    """The PR #1217 record fits on positions [0, seq_len - stride - 1) of every window."""
    windows = record_1217_windows(299, 64, 16)
    assert evaluation_module.context_limits(windows, "shared", 64, 16) == [47] * len(windows)
    assert evaluation_module.context_limits(windows, "shared", 64, 63) == [0] * len(windows)
    assert evaluation_module.context_limits(windows, "shared", 64, 64) == [0] * len(windows)


@pytest.mark.parametrize("mode", ["off", *CAUSAL_SLOT_MODES])
def test_compiled_runs_pad_every_batch_to_one_shape_and_score_the_same(byte_table, mode):
    """11 windows in batches of 4: the compiled run's last batch is padded with a fourth row,
    which neither scores nor moves a SLOT fit."""
    hp = tiny_hp(SLOT_MODE=mode if mode != "off" else "window", SLOT_ENABLED=str(int(mode != "off")), EVAL_STRIDE="24",
                 EVAL_BATCH_SEQS="4", SLOT_STEPS="2", SLOT_LR="0.05")
    model, tokens = noisy_model(hp).eval().requires_grad_(False), val_tokens(300)
    windows = sliding_windows(299, 64, 24, True)
    shapes = []

    def recording_hidden(inputs):
        shapes.append(tuple(inputs.shape))
        return model.forward_hidden(inputs)

    slot = mode != "off"
    eager = list(sliding_scores(model, tokens, windows, hp, Runtime(), slot))
    padded = list(sliding_scores(model, tokens, windows, hp, Runtime(compile_enabled=True), slot, recording_hidden))
    assert len(windows) == 11 and shapes == [(4, 64)] * 3
    for plain, compiled in zip(eager, padded, strict=True):
        rows = plain.nll.size(0)
        assert torch.equal(compiled.scored[:rows], plain.scored) and not compiled.scored[rows:].any()
        assert torch.allclose(compiled.nll[:rows][plain.scored], plain.nll[plain.scored], rtol=1e-5, atol=1e-6)
        if slot:
            assert torch.allclose(compiled.slot_nll[:rows][plain.scored], plain.slot_nll[plain.scored], rtol=1e-5, atol=1e-6)
