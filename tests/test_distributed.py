"""trainer.runtime, optimizer, evaluation and the whole run on 2 gloo processes: the same math as one.

One pair of processes serves every check: the sharded MuonEq-R with and without
reduce-scatter, every evaluation, and a whole training run of 2 ranks against 1 rank with
2 micro-steps.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from trainer.evaluation import EvalData, build_token_bytes, evaluate_sliding, evaluate_standard, evaluate_ttt, evaluation_windows, rank_share, sliding_scores, ttt_scores
from trainer.main import run
from trainer.optimizer import MuonEqR
from trainer.runtime import Runtime, open_run_files, start_runtime
from trainer.settings import Hyperparameters
from trainer.training import StopSignals
from conftest import (QUICK_RUN, TOKENIZER, batch_layouts, nll_by_ordinal, noisy_model, on_two_ranks, run_in_process, run_log,
                      tiny_hp, train_losses, ttt_chunks)

STEPS = 3
EVALUATION = {"TTT_CHUNK_TOKENS": "192", "TTT_EPOCHS": "2", "TTT_LR": "0.05", "TTT_BATCH_SEQS": "3",
              "TTT_FREEZE_BLOCKS": "1", "EVAL_BATCH_SEQS": "4", "SLOT_STEPS": "2", "SLOT_LR": "0.05"}
WHOLE_RUN = {**QUICK_RUN, "ITERATIONS": "6", "TTT_ENABLED": "1", "TTT_CHUNK_TOKENS": "4096", "RUN_ID": "run"}


def gradients(step: int, rank: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1000 * step + rank))


def run_muon(runtime: Runtime) -> list[torch.Tensor]:
    torch.manual_seed(0)
    banks = [torch.nn.Parameter(torch.randn(5, 24, 16)), torch.nn.Parameter(torch.randn(3, 16, 40))]
    muon = MuonEqR(banks, [torch.linspace(0.5, 1.5, len(b)) for b in banks], lr=0.03, momentum=0.9,
                           backend_steps=5, weight_decay=0.04, row_normalize=True, runtime=runtime)
    for step in range(STEPS):
        if runtime.distributed:
            shards = [runtime.reduce_scatter_mean(gradients(step, runtime.rank, b.shape), torch.float32).wait() for b in banks]
        else:  # what the ranks' average would be
            shards = [(gradients(step, 0, b.shape) + gradients(step, 1, b.shape)) / 2 for b in banks]
        muon.step(shards)
    return [bank.detach().clone() for bank in banks]


def all_evaluations(runtime: Runtime) -> dict[str, object]:
    import sentencepiece

    hp = tiny_hp(**EVALUATION)
    tokens = torch.randint(0, 1024, (500,), generator=torch.Generator().manual_seed(1))
    token_bytes = build_token_bytes(sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZER)), 1024, runtime.device)
    data = EvalData(tokens, token_bytes)
    model = noisy_model(hp)
    windows = rank_share(evaluation_windows(hp, 499, slot=True), runtime)
    plain, adapted = evaluate_sliding(model, data, hp, runtime)
    ttt_windows = [rank_share(chunk, runtime) for chunk in ttt_chunks(hp, 499)]
    return {"standard": evaluate_standard(model, tokens, 64, 64 * 6, token_bytes, runtime).bpb,
            "sliding": plain.bpb, "sliding_slot": adapted.bpb, "ttt": evaluate_ttt(model, data, hp, runtime).bpb,
            "sliding_nll": nll_by_ordinal(sliding_scores(model.eval().requires_grad_(False), tokens, windows, hp, runtime, True),
                                          batch_layouts(windows, hp.eval_batch_seqs), 499, slot=True),
            "ttt_nll": nll_by_ordinal(ttt_scores(model, tokens, hp, runtime),
                                      (layout for chunk in ttt_windows for layout in batch_layouts(chunk, hp.eval_batch_seqs)),
                                      499, slot=False)}


def two_rank_job(rank: int) -> dict[str, object]:
    """Everything rank `rank` computes; runs in a spawned process."""
    folder = Path(os.environ["HARNESS_FOLDER"])
    os.chdir(folder)
    os.environ.update({**WHOLE_RUN, "DATA_PATH": os.environ["HARNESS_DATA"], "GRAD_ACCUM_STEPS": "1"})
    hp = Hyperparameters.from_env()
    runtime = start_runtime(hp)
    open_run_files(hp, runtime)
    results: dict[str, object] = {"status": run(hp, runtime), "muon": run_muon(runtime)}
    # one rank hits the cap, the other sees a non-finite loss: both must stop, for both reasons
    loss = torch.tensor(float("nan") if rank == 1 else 1.0)
    signals = StopSignals(runtime)
    results["stop_flags"] = (signals.report(7, loss, cap_near=rank == 0), signals.drain())  # read a step late
    results.update(all_evaluations(runtime))
    runtime.reduce_scatter_works = False
    results["muon_fallback"] = run_muon(runtime)
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, quick_corpus):
    folder = tmp_path_factory.mktemp("two_ranks")
    os.environ.update(HARNESS_FOLDER=str(folder), HARNESS_DATA=str(quick_corpus))
    try:
        return folder, on_two_ranks(two_rank_job)
    finally:
        del os.environ["HARNESS_FOLDER"], os.environ["HARNESS_DATA"]


@pytest.mark.parametrize("key", ["muon", "muon_fallback"])
def test_sharded_muon_equals_one_process(two_ranks, key):
    single = run_muon(Runtime())
    for rank_result in two_ranks[1]:
        for ours, expected in zip(rank_result[key], single):
            assert torch.allclose(ours, expected, atol=2e-6), (ours - expected).abs().max()


def test_ranks_agree_on_stopping(two_ranks):
    assert [r["stop_flags"] for r in two_ranks[1]] == [(None, (7, True, True)), (None, (7, True, True))]


def test_two_ranks_score_as_one_process(two_ranks):
    single = all_evaluations(Runtime())
    ranks = two_ranks[1]
    for ranked in ranks:  # every rank gets the whole answer
        for key in ("standard", "sliding", "sliding_slot", "ttt"):
            assert ranked[key] == pytest.approx(single[key], rel=1e-6), key
    for key in ("sliding_nll", "ttt_nll"):  # each rank scored its own windows, together all of them
        merged = torch.where(ranks[0][key].isnan(), ranks[1][key], ranks[0][key])
        assert not merged.isnan().any() and torch.allclose(merged, single[key], rtol=1e-5, atol=1e-5)


def test_two_ranks_train_like_one_rank_with_two_micro_steps(two_ranks, tmp_path, quick_corpus, monkeypatch):
    folder, ranks = two_ranks
    assert [r["status"] for r in ranks] == [0, 0]
    status = run_in_process(tmp_path, {**WHOLE_RUN, "DATA_PATH": str(quick_corpus), "GRAD_ACCUM_STEPS": "2"}, monkeypatch)
    one, two = run_log(tmp_path), run_log(folder)
    assert status == 0 and "world_size:2 grad_accum_steps:1" in two and "world_size:1 grad_accum_steps:2" in one
    # Losses are logged to 4 decimals; float32 summation order differs between the two, so
    # allow one unit in the last place; a wrong sharding or averaging differs by far more.
    assert len(train_losses(one)) == 6 and train_losses(one) == pytest.approx(train_losses(two), abs=1e-4)
