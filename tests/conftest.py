"""Shared fixtures: the tiny configuration, real tokens, in-process runs, a 2-rank harness.

pytest.ini puts src/ and tools/ on the import path, so `import trainer` is the readable
source (the shipped train_gpt.py is only ever run as a file).
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import trainer

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "tokenizers" / "fineweb_1024_bpe.model"

# The smallest model that still has every part: 2 layers (one encoder, one decoder with a
# skip), value embeddings, bigram hash, XSA, GQA.
TINY = {"SMOKE": "1", "NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
        "VE_LAYERS": "1", "XSA_LAST_N": "2", "BIGRAM_VOCAB_SIZE": "64", "BIGRAM_DIM": "16",
        "VE_DIM": "16", "TRAIN_SEQ_LEN": "64", "EVAL_SEQ_LEN": "64", "EVAL_STRIDE": "16"}

# A whole run of the pipeline that takes a second or two: a few steps, every phase.
QUICK_RUN = {**TINY, "TRAIN_BATCH_TOKENS": "1024", "ITERATIONS": "3", "WARMUP_STEPS": "1", "VAL_LOSS_EVERY": "0",
             "TRAIN_LOG_EVERY": "1", "GPTQ_CALIB_SAMPLES": "1", "TTT_ENABLED": "0", "SLOT_STEPS": "1",
             "EVAL_STRIDE": "32", "EVAL_BATCH_SEQS": "64", "VAL_BATCH_SIZE": "65536", "SAFETY_CAP_SECONDS": "0",
             "TOKENIZER_PATH": str(TOKENIZER)}


def tiny_hp(**overrides: str) -> trainer.Hyperparameters:
    return trainer.Hyperparameters.from_env({**TINY, **overrides})


def tiny_model(hp: trainer.Hyperparameters, seed: int = 0) -> trainer.GPT:
    torch.manual_seed(seed)
    return trainer.GPT(trainer.ModelConfig.from_settings(hp))


def noisy_model(hp: trainer.Hyperparameters, seed: int = 0) -> trainer.GPT:
    """A model whose zero-initialised weights are filled in, so every path carries signal."""
    model = tiny_model(hp, seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


@pytest.fixture(scope="session")
def tokenizer():
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZER))


@pytest.fixture(scope="session")
def smoke_corpus(tmp_path_factory, tokenizer) -> Path:
    """Real English tokens (the embedded default's corpus) in shards, built once per session."""
    folder = tmp_path_factory.mktemp("smoke_corpus")
    trainer.build_smoke_corpus(folder, tokenizer)
    return folder


@pytest.fixture(scope="session")
def quick_corpus(tmp_path_factory, smoke_corpus) -> Path:
    """The embedded corpus with a short validation shard, so whole test runs evaluate fast."""
    folder = tmp_path_factory.mktemp("quick_corpus")
    (folder / "fineweb_train_000000.bin").symlink_to(smoke_corpus / "fineweb_train_000000.bin")
    trainer.write_shard(folder / "fineweb_val_000000.bin", trainer.read_shard(smoke_corpus / "fineweb_val_000000.bin")[:4097])
    return folder


def run_in_process(folder: Path, settings: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                   argv: list[str] | None = None) -> int:
    """run_cli in `folder` with exactly these settings in the environment (no leftovers)."""
    for name in [spec.name.upper() for spec in fields(trainer.Hyperparameters)] + ["WORLD_SIZE", "RANK"]:
        monkeypatch.delenv(name, raising=False)
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(folder)
    return trainer.run_cli(argv or [])


def run_log(folder: Path) -> str:
    """The one log a run in `folder` wrote."""
    (log,) = (folder / "logs").glob("*.txt")
    return log.read_text()


def train_losses(log: str) -> list[float]:
    return [float(x) for x in re.findall(r"^step:\d+/\d+ train_loss:([\d.]+)", log, re.MULTILINE)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gloo_worker(rank: int, port: int, job: Callable[[int], Any], results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    try:
        results[rank] = job(rank)
    finally:
        if dist.is_initialized():
            dist.barrier()  # neither rank leaves while the other still talks
            dist.destroy_process_group()


def on_two_ranks(job: Callable[[int], Any]) -> list[Any]:
    """Run job(rank) in 2 gloo processes (the job initialises the group, e.g. through
    trainer.start_runtime); returns each rank's result. job must be a module-level function."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_gloo_worker, args=(free_port(), job, results), nprocs=2, join=True)
        return [results[0], results[1]]
