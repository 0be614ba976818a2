"""EVALUATION section: exact bytes, sliding windows, SLOT modes, score-first TTT, legality probes."""

from __future__ import annotations

import io
import os
import re
import socket
from pathlib import Path

import pytest
import sentencepiece
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import eval_section as evaluation  # the one place to switch to `import train_gpt as evaluation`
from conftest import TOKENIZER, noisy_model, tiny_hp

BOS_ID = 1
REFERENCE_LOG = Path(__file__).parent / "data" / "reference-logs" / "train_seed1337.log"


def counted_bytes(token_bytes: evaluation.TokenBytes, ids: list[int]) -> int:
    """Bytes counted for every token of a document after its BOS."""
    stream = torch.tensor([BOS_ID] + ids)
    return int(evaluation.count_bytes(token_bytes, stream[:-1], stream[1:]).sum())


@pytest.fixture(scope="module")
def fineweb_bytes(tokenizer) -> evaluation.TokenBytes:
    return evaluation.build_token_bytes(tokenizer, 1024, torch.device("cpu"))


# The FineWeb tokenizer normalises text (NFKC, whitespace runs collapsed, no leading space)
# and has no byte pieces: ASCII text in normal form comes back byte for byte, except for
# characters it has no piece for (non-ASCII, and #*+<=>@[\]^_`{}~), which become <unk>.
NORMAL_TEXTS = ["Hello world", "digits 0123456789 and 3.14159, (x)!", "MiXeD CaSe: The quick brown fox; 'a' \"b\"",
                "a | pipe - dash", "x"]


@pytest.mark.parametrize("text", NORMAL_TEXTS)
def test_fineweb_byte_counts_equal_the_text(tokenizer, fineweb_bytes, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert counted_bytes(fineweb_bytes, ids) == len(text.encode("utf-8"))


@pytest.mark.parametrize("text", ["  two  spaces\nand a newline\n\n end ", "tab\there"])
def test_fineweb_byte_counts_equal_the_normalised_text(tokenizer, fineweb_bytes, text):
    normalised = tokenizer.normalize(text).replace("\u2581", " ")
    assert counted_bytes(fineweb_bytes, tokenizer.encode(text)) == len(normalised.encode("utf-8"))


@pytest.mark.parametrize("text", ["accents: café, naïve", "emoji 🎉🐍 done", "CJK 漢字かな 한국어", "snake_case x[0] = a+b"])
def test_fineweb_unknown_pieces_count_nothing_and_no_space_after_them(tokenizer, fineweb_bytes, text):
    ids = tokenizer.encode(text)
    assert tokenizer.unk_id() in ids
    # the rule's text: every stretch between unknowns, each decoded on its own (no leading space)
    stretches: list[list[int]] = [[]]
    for token in ids:
        if token == tokenizer.unk_id():
            stretches.append([])
        else:
            stretches[-1].append(token)
    expected = sum(len(tokenizer.decode(stretch).encode("utf-8")) for stretch in stretches)
    assert counted_bytes(fineweb_bytes, ids) == expected


@pytest.fixture(scope="module")
def byte_fallback_tokenizer() -> sentencepiece.SentencePieceProcessor:
    """A small real BPE model with byte fallback that keeps text as it is (the FineWeb one does neither)."""
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, hello there", "numbers 12345 and text"] * 50
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, model_type="bpe", vocab_size=320, byte_fallback=True,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False, minloglevel=2)
    return sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())


BYTE_TEXTS = ["café naïve Zürich", "emoji 🎉🐍 done", "CJK 漢字かな 한국어", "two  spaces\nnew\n\nlines\ttab", "the 42 foxes"]


@pytest.mark.parametrize("text", BYTE_TEXTS)
def test_byte_fallback_counts_equal_the_text(byte_fallback_tokenizer, text):
    tokenizer = byte_fallback_tokenizer
    token_bytes = evaluation.build_token_bytes(tokenizer, tokenizer.vocab_size(), torch.device("cpu"))
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert any(tokenizer.is_byte(token) for token in ids) or text.isascii()
    assert counted_bytes(token_bytes, ids) == len(text.encode("utf-8"))


def test_documents_restart_at_bos(byte_fallback_tokenizer):
    tokenizer = byte_fallback_tokenizer
    token_bytes = evaluation.build_token_bytes(tokenizer, 400, torch.device("cpu"))
    ids = tokenizer.encode(BYTE_TEXTS[0]) + [BOS_ID] + tokenizer.encode(BYTE_TEXTS[1])
    assert counted_bytes(token_bytes, ids) == len((BYTE_TEXTS[0] + BYTE_TEXTS[1]).encode("utf-8"))
    assert token_bytes.is_boundary[tokenizer.vocab_size():].all()  # ids past the tokenizer count nothing


@pytest.mark.parametrize("num_ordinals, seq_len, stride", [(1000, 64, 16), (1000, 64, 64), (999, 64, 10), (40, 64, 16),
                                                           (64, 64, 16), (65, 64, 64), (81, 64, 16), (1, 8, 4)])
def test_sliding_windows_score_every_ordinal_once(num_ordinals, seq_len, stride):
    scored = []
    previous_end = 0
    for start, end, first in evaluation.sliding_windows(num_ordinals, seq_len, stride):
        assert first == previous_end and end - start == min(seq_len, num_ordinals)
        assert first - start >= min(seq_len - stride, first)  # all the context the data allows
        scored.extend(range(first, end))
        previous_end = end
    assert scored == list(range(num_ordinals))


def test_reference_run_has_as_many_chunks():
    windows = evaluation.sliding_windows(62_021_632, 2048, 64)  # the validation set's ordinals
    chunks = evaluation.windows_by_chunk(windows, 62_021_632, 32_768)
    assert len(chunks) == 1893 and sum(len(chunk) for chunk in chunks) == len(windows)


def val_tokens(count: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 1024, (count,), generator=torch.Generator().manual_seed(seed))


def test_stride_equal_to_seq_len_is_standard_evaluation(fineweb_bytes):
    hp = tiny_hp(EVAL_STRIDE="64", EVAL_BATCH_SEQS="4")
    model, tokens, runtime = noisy_model(hp), val_tokens(64 * 10 + 1), evaluation.Runtime()
    standard = evaluation.evaluate_standard(model, tokens, 64, 64 * 3, fineweb_bytes, runtime)
    sliding = evaluation.evaluate_sliding(model, tokens, hp, fineweb_bytes, runtime, slot=False)
    assert sliding.tokens == standard.tokens == 640 and sliding.bytes == standard.bytes
    assert sliding.bpb == pytest.approx(standard.bpb, rel=1e-9)
    assert sliding.loss == pytest.approx(standard.loss, rel=1e-9)


def ordinal_nll(hp, tokens, token_bytes, slot: bool = False, ttt: bool = False) -> torch.Tensor:
    model, runtime = noisy_model(hp), evaluation.Runtime()
    if ttt:
        _, nll = evaluation.evaluate_ttt(model, tokens, hp, token_bytes, runtime, return_nll=True)
    else:
        _, nll = evaluation.evaluate_sliding(model, tokens, hp, token_bytes, runtime, slot=slot, return_nll=True)
    assert nll.dtype == torch.float64 and nll.numel() == tokens.numel() - 1 and bool((nll > 0).all())
    return nll


def test_batch_composition_does_not_change_plain_scores(fineweb_bytes):
    tokens = val_tokens(300)
    scores = [ordinal_nll(tiny_hp(EVAL_BATCH_SEQS=size), tokens, fineweb_bytes) for size in ("1", "5", "32")]
    for other in scores[1:]:
        torch.testing.assert_close(other, scores[0], rtol=1e-6, atol=1e-6)


def test_short_validation_set_is_one_window(fineweb_bytes):
    hp = tiny_hp()
    result, nll = evaluation.evaluate_sliding(noisy_model(hp), val_tokens(41), hp, fineweb_bytes, evaluation.Runtime(),
                                              slot=False, return_nll=True)
    assert result.tokens == 40 and nll.numel() == 40


# Windows of 64 every 16 in batches of 8: ordinal 230 is scored by window 11, in the
# middle of the batch of windows 8-15; windows 12-15 hold it as context.
PROBE = 230
SLOT = {"EVAL_BATCH_SEQS": "8", "SLOT_STEPS": "3", "SLOT_LR": "0.05"}
TTT = {"TTT_CHUNK_TOKENS": "128", "TTT_EPOCHS": "2", "TTT_LR": "0.05", "TTT_BATCH_SEQS": "2", "TTT_FREEZE_BLOCKS": "1"}


def legality_probe(hp, token_bytes, **how) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL per ordinal before and after changing val_tokens[PROBE + 1], the target of ordinal PROBE."""
    tokens = val_tokens(600)
    changed = tokens.clone()
    changed[PROBE + 1] = (changed[PROBE + 1] + 1) % 1024
    return ordinal_nll(hp, tokens, token_bytes, **how), ordinal_nll(hp, changed, token_bytes, **how)


@pytest.mark.parametrize("mode", ["window", "batch_causal"])
def test_causal_slot_modes_never_look_ahead(fineweb_bytes, mode):
    before, after = legality_probe(tiny_hp(SLOT_MODE=mode, **SLOT), fineweb_bytes, slot=True)
    assert torch.equal(before[:PROBE], after[:PROBE])  # every earlier score, to the last bit
    assert before[PROBE] != after[PROBE]  # the change does reach the model


def test_the_probe_catches_the_shared_slot_leak(fineweb_bytes):
    before, after = legality_probe(tiny_hp(SLOT_MODE="shared", **SLOT), fineweb_bytes, slot=True)
    assert not torch.equal(before[:PROBE], after[:PROBE])


def test_shared_slot_says_it_is_not_causal(fineweb_bytes, capsys):
    hp = tiny_hp(SLOT_MODE="shared", **SLOT)
    evaluation.evaluate_sliding(noisy_model(hp), val_tokens(100), hp, fineweb_bytes, evaluation.Runtime(), slot=True)
    assert "slot:mode shared is NOT causal" in capsys.readouterr().out


def test_ttt_never_looks_ahead(fineweb_bytes):
    before, after = legality_probe(tiny_hp(**TTT), fineweb_bytes, ttt=True)
    assert torch.equal(before[:PROBE], after[:PROBE])
    assert before[PROBE] != after[PROBE]


def test_slot_and_ttt_change_scores_only_where_they_can(fineweb_bytes):
    tokens = val_tokens(600)
    plain = ordinal_nll(tiny_hp(**SLOT), tokens, fineweb_bytes)
    slot = {mode: ordinal_nll(tiny_hp(SLOT_MODE=mode, **SLOT), tokens, fineweb_bytes, slot=True)
            for mode in ("window", "batch_causal", "shared")}
    assert torch.equal(slot["window"][:64], plain[:64])  # the first window has no context: its delta stays 0
    assert torch.equal(slot["batch_causal"][:176], plain[:176])  # the first batch has no earlier batch
    assert all(not torch.equal(nll[176:], plain[176:]) for nll in slot.values())
    assert not torch.equal(slot["window"], slot["batch_causal"])
    ttt = ordinal_nll(tiny_hp(**TTT), tokens, fineweb_bytes, ttt=True)
    assert torch.equal(ttt[:128], plain[:128]) and not torch.equal(ttt[128:], plain[128:])  # chunk 0 precedes training


def test_evaluation_leaves_the_callers_model_unchanged(fineweb_bytes):
    hp = tiny_hp(**TTT)
    model = noisy_model(hp)
    model.blocks[1].requires_grad_(False)  # flags and modes come back as they were, not all set to one value
    model.blocks[0].eval()
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    flags = [(param.requires_grad, param.grad) for param in model.parameters()]
    modes = [module.training for module in model.modules()]
    runtime = evaluation.Runtime()
    evaluation.evaluate_ttt(model, val_tokens(400), hp, fineweb_bytes, runtime)
    evaluation.evaluate_sliding(model, val_tokens(400), hp, fineweb_bytes, runtime, slot=True)
    evaluation.evaluate_standard(model, val_tokens(400), 64, 128, fineweb_bytes, runtime)
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())
    assert [(param.requires_grad, param.grad) for param in model.parameters()] == flags
    assert [module.training for module in model.modules()] == modes


def line_shape(line: str) -> str:
    return re.sub(r"\d+", "N", line)


def test_log_lines_have_the_reference_shapes(fineweb_bytes, capsys):
    reference = {line_shape(line) for line in REFERENCE_LOG.read_text().splitlines()}
    result = evaluation.EvalResult(loss=1.86009741, bpb=1.10165738, tokens=1000.0, bytes=2400.0, seconds=165.229)
    runtime = evaluation.Runtime()
    evaluation.log_result(runtime, "final_int6_roundtrip", result)
    evaluation.log_result(runtime, "final_int6_sliding_window", result, stride=64)
    evaluation.log_result(runtime, "legal_ttt", result)
    hp = tiny_hp(TTT_CHUNK_TOKENS="64", TTT_EPOCHS="1", EVAL_STRIDE="64")
    evaluation.evaluate_ttt(noisy_model(hp), val_tokens(150), hp, fineweb_bytes, runtime)  # 3 chunks
    lines = capsys.readouterr().out.splitlines()
    assert "final_int6_sliding_window val_loss:1.8601 val_bpb:1.1017 stride:64 eval_time:165229ms" in lines
    assert "final_int6_sliding_window_exact val_loss:1.86009741 val_bpb:1.10165738" in lines
    assert len(lines) == 6 + 4 and all(line_shape(line) in reference for line in lines), lines


# Two gloo ranks against one process: the same scores, with the windows and each TTT
# step's sequences split unevenly on purpose (3 sequences per TTT step).
DISTRIBUTED = {"TTT_CHUNK_TOKENS": "192", "TTT_EPOCHS": "2", "TTT_LR": "0.05", "TTT_BATCH_SEQS": "3",
               "TTT_FREEZE_BLOCKS": "1", "SLOT_MODE": "window", "EVAL_BATCH_SEQS": "4", "SLOT_STEPS": "2",
               "SLOT_LR": "0.05"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_all_evaluations(runtime: evaluation.Runtime) -> dict[str, object]:
    hp = tiny_hp(**DISTRIBUTED)
    tokens = val_tokens(500)
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZER))
    token_bytes = evaluation.build_token_bytes(tokenizer, 1024, torch.device("cpu"))
    model = noisy_model(hp)
    standard = evaluation.evaluate_standard(model, tokens, 64, 64 * 6, token_bytes, runtime)
    sliding, sliding_nll = evaluation.evaluate_sliding(model, tokens, hp, token_bytes, runtime, slot=True, return_nll=True)
    ttt, ttt_nll = evaluation.evaluate_ttt(model, tokens, hp, token_bytes, runtime, return_nll=True)
    return {"standard": standard.bpb, "sliding": sliding.bpb, "sliding_nll": sliding_nll, "ttt": ttt.bpb, "ttt_nll": ttt_nll}


def distributed_worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results[rank] = run_all_evaluations(evaluation.Runtime(rank=rank, world_size=2))
        dist.barrier()  # neither rank leaves while the other still talks
    finally:
        dist.destroy_process_group()


def test_two_ranks_score_as_one_process():
    single = run_all_evaluations(evaluation.Runtime())
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(distributed_worker, args=(free_port(), results), nprocs=2, join=True)
        per_rank = [results[0], results[1]]
    for ranked in per_rank:  # every rank gets the whole answer
        for key in ("standard", "sliding", "ttt"):
            assert ranked[key] == pytest.approx(single[key], rel=1e-6), key
        torch.testing.assert_close(ranked["sliding_nll"], single["sliding_nll"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ranked["ttt_nll"], single["ttt_nll"], rtol=1e-5, atol=1e-5)
