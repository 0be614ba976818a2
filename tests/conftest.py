"""Shared fixtures: the tiny configuration, real tokens, in-process runs, a 2-rank harness.

The project is installed (`pip install -e .`), so `trainer` is the readable source and
`tools` the tools; the shipped train_gpt.py is only ever run as a file.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.artifact import encode_artifact, quantize_state, running_code
from trainer.data import SMOKE_TEXT, build_smoke_corpus
from trainer.evaluation import Window, sliding_windows
from trainer.main import run_cli
from trainer.model import GPT, ModelConfig
from trainer.runtime import Runtime
from trainer.settings import Hyperparameters
from trainer.shards import MANIFEST, read_shard, write_shard

ROOT = Path(__file__).resolve().parents[1]

# The code's identity, computed once at collection: mutmut's fork server collects the tests
# before it forks a process per mutant, each of which would otherwise pack its mutated
# (thirty times longer) copy of the source again.
running_code()
TOKENIZER = ROOT / "data" / "tokenizers" / "fineweb_1024_bpe.model"
TOKENIZER_8192 = ROOT / "data" / "tokenizers" / "fineweb_8192_bpe_vendored.model"  # 256 byte-fallback pieces

# The smallest model that still has every part: 2 layers (one encoder, one decoder with a
# skip), value embeddings, bigram hash, XSA, GQA.
TINY = {"SMOKE": "1", "NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
        "VE_LAYERS": "1", "XSA_LAST_N": "2", "BIGRAM_VOCAB_SIZE": "64", "BIGRAM_DIM": "16",
        "VE_DIM": "16", "TRAIN_SEQ_LEN": "64", "EVAL_SEQ_LEN": "64", "EVAL_STRIDE": "16"}

# A small model where no two shape settings coincide, so choosing the wrong one shows:
# XSA on 2 of 5 layers, RoPE on 4 of 8 head dims (and NTK-scaled past 16 tokens), two
# U-Net skips, 6 query heads on 2 KV heads, value embeddings on two layers, and table
# widths (bigram 20, value 12, MLP 120) unlike the model's 48; a soft cap that bites.
DISTINCT = {"SMOKE": "1", "NUM_LAYERS": "5", "MODEL_DIM": "48", "NUM_HEADS": "6", "NUM_KV_HEADS": "2", "ROPE_DIMS": "4",
            "ROPE_BASE": "500", "ROPE_TRAIN_SEQ_LEN": "16", "XSA_LAST_N": "2", "VE_LAYERS": "1,3", "VE_DIM": "12",
            "BIGRAM_VOCAB_SIZE": "50", "BIGRAM_DIM": "20", "MLP_MULT": "2.5", "LOGIT_SOFTCAP": "2.5",
            "QK_GAIN_INIT": "3.5", "NEGATIVE_SLOPE": "0.3", "TRAIN_SEQ_LEN": "64", "EVAL_SEQ_LEN": "64"}

# A whole run of the pipeline that takes a second or two: a few steps, every phase.
QUICK_RUN = {**TINY, "TRAIN_BATCH_TOKENS": "1024", "ITERATIONS": "3", "WARMUP_STEPS": "1", "VAL_LOSS_EVERY": "0",
             "TRAIN_LOG_EVERY": "1", "GPTQ_CALIB_SAMPLES": "1", "TTT_ENABLED": "0", "SLOT_STEPS": "1",
             "EVAL_STRIDE": "32", "EVAL_BATCH_SEQS": "64", "VAL_BATCH_SIZE": "65536", "SAFETY_CAP_SECONDS": "0",
             "TOKENIZER_PATH": str(TOKENIZER)}


def tiny_hp(**overrides: str) -> Hyperparameters:
    return Hyperparameters.from_env({**TINY, **overrides})


def distinct_hp(**overrides: str) -> Hyperparameters:
    return Hyperparameters.from_env({**DISTINCT, **overrides})


def tiny_model(hp: Hyperparameters, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig.from_settings(hp))


def noisy_model(hp: Hyperparameters, seed: int = 0) -> GPT:
    """A model whose zero-initialised weights are filled in, so every path carries signal."""
    model = tiny_model(hp, seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def identity_hessians(hp: Hyperparameters) -> dict[str, torch.Tensor]:
    """GPTQ Hessians of every block input as if the inputs were white noise."""
    return {f"blocks.{i}.{key}": torch.eye(n) for i in range(hp.num_layers)
            for key, n in (("qkv", hp.model_dim), ("out", hp.model_dim), ("up", hp.model_dim), ("down", int(hp.mlp_mult * hp.model_dim)))}


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory) -> Path:
    """An artifact of noisy_model(tiny_hp()), quantised as a run would: the tools' input."""
    hp = tiny_hp()
    model = noisy_model(hp)
    tensors, schemes, _ = quantize_state(hp, model.state_dict(), identity_hessians(hp), Runtime())
    path = tmp_path_factory.mktemp("artifact") / "tiny.int6.ptz"
    path.write_bytes(encode_artifact(tensors, {"schemes": schemes, "model": model.config.function_fields()}))
    return path


@pytest.fixture(scope="session")
def tokenizer():
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZER))


def built_once(tokenizer_path: Path) -> Path:
    """The smoke corpus made with this tokenizer, built once per machine: in the system's
    temporary folder, named by what it is made of, and renamed into place whole (test
    processes run side by side under mutation testing). Tests only read it."""
    import sentencepiece

    made_of = hashlib.sha256()
    for path in (tokenizer_path, ROOT / SMOKE_TEXT, ROOT / "src" / "trainer" / "data.py", ROOT / "src" / "trainer" / "shards.py"):
        made_of.update(path.read_bytes())
    folder = Path(tempfile.gettempdir()) / f"parameter-golf-smoke-{made_of.hexdigest()[:16]}"
    if not (folder / MANIFEST).is_file():
        building = Path(tempfile.mkdtemp(prefix=f"{folder.name}-"))
        build_smoke_corpus(building, sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_path)), tokenizer_path)
        try:
            os.rename(building, folder)
        except OSError:  # another process renamed its copy into place first
            shutil.rmtree(building)
    return folder


@pytest.fixture(scope="session")
def smoke_corpus() -> Path:
    """Real English tokens (the smoke run's corpus) in shards."""
    return built_once(TOKENIZER)


@pytest.fixture(scope="session")
def quick_corpus(tmp_path_factory, smoke_corpus) -> Path:
    """The embedded corpus with a short validation shard, so whole test runs evaluate fast."""
    folder = tmp_path_factory.mktemp("quick_corpus")
    for name in ("fineweb_train_000000.bin", MANIFEST):
        (folder / name).symlink_to(smoke_corpus / name)
    write_shard(folder / "fineweb_val_000000.bin", read_shard(smoke_corpus / "fineweb_val_000000.bin")[:4097])
    return folder


@pytest.fixture(scope="session")
def quick_corpus_8192(tmp_path_factory) -> Path:
    """The smoke corpus with the SP8192 tokenizer (PROFILE=pr1493's), its validation cut to
    2,049 tokens."""
    full = built_once(TOKENIZER_8192)
    folder = tmp_path_factory.mktemp("quick_corpus_8192")
    for name in ("fineweb_train_000000.bin", MANIFEST):
        (folder / name).symlink_to(full / name)
    write_shard(folder / "fineweb_val_000000.bin", read_shard(full / "fineweb_val_000000.bin")[:2049])
    return folder


def run_in_process(folder: Path, settings: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                   argv: list[str] | None = None) -> int:
    """run_cli in `folder` with exactly these settings in the environment (no leftovers)."""
    for name in [spec.name.upper() for spec in fields(Hyperparameters)] + ["WORLD_SIZE", "RANK"]:
        monkeypatch.delenv(name, raising=False)
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(folder)
    return run_cli(argv or [])


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
    start_runtime); returns each rank's result. The processes are forked: they start with
    what this one has imported, where spawned ones would spend seconds importing torch."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_gloo_worker, args=(free_port(), job, results), nprocs=2, join=True, start_method="fork")
        return [results[0], results[1]]


def batch_layouts(windows: list[Window], capacity: int):
    """Per batch of sliding_scores: its windows' starts and the window offset of its first
    scored position (the earliest first-scored offset in the batch)."""
    for first in range(0, len(windows), capacity):
        batch = windows[first : first + capacity]
        yield torch.tensor([w.start for w in batch]), min(w.first_scored - w.start for w in batch)


def nll_by_ordinal(batches, layouts, count: int, slot: bool) -> torch.Tensor:
    """Collect a scoring generator's output into one NLL per ordinal (NaN if never scored)."""
    nll = torch.full((count,), float("nan"), dtype=torch.float64)
    for batch, (starts, offset) in zip(batches, layouts, strict=True):
        ordinals = starts[:, None] + offset + torch.arange(batch.nll.size(1))
        nll[ordinals[batch.scored]] = (batch.slot_nll if slot else batch.nll)[batch.scored].double()
    return nll


def ttt_chunks(hp, num_ordinals: int) -> list[list[Window]]:
    """The windows of each chunk ttt_scores scores, in order."""
    chunks = [[] for _ in range(-(-num_ordinals // hp.ttt_chunk_tokens))]
    for window in sliding_windows(num_ordinals, hp.eval_seq_len, hp.eval_stride, hp.eval_full_last_window):
        chunks[min(window.first_scored // hp.ttt_chunk_tokens, len(chunks) - 1)].append(window)
    return chunks


def ttt_layout(hp, num_ordinals: int):
    """The batches ttt_scores scores, chunk after chunk."""
    for windows in ttt_chunks(hp, num_ordinals):
        yield from batch_layouts(windows, hp.eval_batch_seqs)
