"""tools/compression_report.py: an artifact's tensors under each serialisation, the
trainer's own setting reproducing the artifact's body; a crafted file refused within the
model's bound."""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import brotli
import pytest

from tools import compression_report
from trainer.artifact import ARTIFACT_MAGIC, encode_artifact, quantize_state
from trainer.runtime import Runtime
from conftest import TINY, identity_hessians, noisy_model, tiny_hp


@pytest.fixture(autouse=True)
def settings(monkeypatch):
    for name, value in TINY.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def small_artifact(tmp_path) -> Path:
    """An artifact a sixth of TINY's size (each setting compresses it twice), quantised as a
    run would; TINY's bound still holds it."""
    hp = tiny_hp(VOCAB_SIZE="256", MODEL_DIM="32", NUM_HEADS="2", NUM_KV_HEADS="2")
    model = noisy_model(hp)
    tensors, schemes, _ = quantize_state(hp, model.state_dict(), identity_hessians(hp), Runtime())
    path = tmp_path / "small.int6.ptz"
    path.write_bytes(encode_artifact(tensors, {"schemes": schemes, "model": model.config.function_fields()}))
    return path


def test_one_line_per_setting_and_the_trainers_is_the_artifacts_own(small_artifact, capsys):
    assert compression_report.main([str(small_artifact)]) == 0
    first, header, *rows = capsys.readouterr().out.strip().splitlines()
    written, raw = map(int, re.fullmatch(r"\S+: (\d+) bytes as written; raw tensors (\d+) bytes", first).groups())
    assert written == small_artifact.stat().st_size and header.split() == ["setting", "laid", "out", "raw", "seconds"]
    sizes = {name.strip(): (int(laid_out), int(plain)) for name, laid_out, plain, _ in
             (re.fullmatch(r"(.+?)\s+(\d+)\s+(\d+)\s+([\d.]+)", row).groups() for row in rows)}
    assert list(sizes) == [name for name, _ in compression_report.SETTINGS]
    # the artifact is magic + CRC + brotli(header length, JSON header, payload): the first
    # row is the trainer's compression of that payload alone
    body = brotli.decompress(small_artifact.read_bytes()[len(ARTIFACT_MAGIC) + 4:])
    payload = body[4 + int.from_bytes(body[:4], "little"):]
    assert sizes["brotli q11 lgwin=24 (the trainer's)"][0] == len(brotli.compress(payload, quality=11, lgwin=24))
    assert raw > max(size for pair in sizes.values() for size in pair)


def test_a_crafted_file_is_refused_within_the_models_bound(tmp_path, capsys):
    bomb = tmp_path / "bomb.ptz"
    stream = brotli.compress(bytes(1 << 28), quality=1)
    bomb.write_bytes(ARTIFACT_MAGIC + zlib.crc32(stream).to_bytes(4, "little") + stream)
    assert compression_report.main([str(bomb)]) == 2
    assert re.fullmatch(r"error: \S+bomb\.ptz: decompresses to more than \d+ bytes.*", capsys.readouterr().err.strip())
