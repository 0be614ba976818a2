"""Shared fixtures: the readable trainer on sys.path and tiny configurations."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import train_gpt  # noqa: E402

TOKENIZER = ROOT / "data" / "tokenizers" / "fineweb_1024_bpe.model"

TINY = {"SMOKE": "1", "NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
        "BANK_SPLIT": "1", "VE_LAYERS": "1", "XSA_LAST_N": "2", "BIGRAM_VOCAB_SIZE": "64", "BIGRAM_DIM": "16",
        "VE_DIM": "16", "TRAIN_SEQ_LEN": "64", "EVAL_SEQ_LEN": "64", "EVAL_STRIDE": "16"}


def tiny_hp(**overrides: str) -> train_gpt.Hyperparameters:
    return train_gpt.Hyperparameters.from_env({**TINY, **overrides})


def noisy_model(hp: train_gpt.Hyperparameters, seed: int = 0) -> train_gpt.GPT:
    """A model whose zero-initialised weights are filled in, so every path carries signal."""
    import torch

    torch.manual_seed(seed)
    model = train_gpt.build_model(hp)
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
    """Real English tokens (pydoc's pages) in shards, built once per test session."""
    folder = tmp_path_factory.mktemp("smoke_corpus")
    train_gpt.build_smoke_corpus(folder, tokenizer)
    return folder
