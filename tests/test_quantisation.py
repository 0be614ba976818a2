"""QUANTISATION AND ARTIFACT section: grids, GPTQ, the artifact format, the pack tool."""

from __future__ import annotations

import ast
import pickle
import subprocess
import sys

import pytest
import torch

import train_gpt
from conftest import ROOT, tiny_hp

sys.path.insert(0, str(ROOT / "tools"))
import pack  # noqa: E402


def grid_matrix(rows: int, cols: int, clip_range: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.randint(-clip_range, clip_range + 1, (rows, cols), dtype=torch.int8)
    q[:, 0] = clip_range  # every row reaches the edge of the grid
    scale = (torch.rand(rows) + 0.1).to(torch.float16)
    return q, scale, q.float() * scale.float()[:, None]


@pytest.mark.parametrize("quantize, clip_range", [(train_gpt.quantize_rows_int6, 31), (train_gpt.quantize_rows_int8, 127)])
def test_round_trip_is_exact_on_the_grid(quantize, clip_range):
    torch.manual_seed(0)
    q, scale, weight = grid_matrix(16, 300, clip_range)
    got_q, got_scale = quantize(weight)
    assert torch.equal(train_gpt.dequantize_rows(got_q, got_scale), weight)
    assert got_q.dtype == torch.int8 and int(got_q.abs().max()) <= clip_range


def test_int6_values_stay_on_the_grid_and_small_rows_keep_resolution():
    weight = torch.randn(8, 64)
    weight[3] *= 1e-4  # the reference's 1/31 scale floor would round this row to zero
    q, scale = train_gpt.quantize_rows_int6(weight)
    assert int(q.abs().max()) <= 31
    assert (train_gpt.dequantize_rows(q, scale)[3] - weight[3]).abs().max() < 0.05 * weight[3].abs().max()


def correlated_layer(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(64, 64, generator=generator) * torch.logspace(0, -2, 64)[:, None]
    inputs = torch.randn(4096, 64, generator=generator) @ mixing  # strongly correlated features
    hessian = inputs.T @ inputs / len(inputs)
    hessian += 0.01 * hessian.diagonal().mean() * torch.eye(64)
    return torch.randn(48, 64, generator=generator), hessian


def test_gptq_beats_plain_rounding_on_the_hessian_weighted_error():
    weight, hessian = correlated_layer()
    q_gptq, scale_gptq, used = train_gpt.gptq_quantize(weight, hessian, block_size=16)
    q_plain, scale_plain = train_gpt.quantize_rows_int6(weight)
    gptq_error = train_gpt.hessian_error(weight, q_gptq, scale_gptq, hessian)
    plain_error = train_gpt.hessian_error(weight, q_plain, scale_plain, hessian)
    assert used and gptq_error < 0.8 * plain_error, (gptq_error, plain_error)


def test_gptq_undoes_its_column_order():
    weight, hessian = correlated_layer(1)
    q, scale, _ = train_gpt.gptq_quantize(weight, hessian)
    error = (train_gpt.dequantize_rows(q, scale) - weight).abs()
    assert float(error.max()) < 4 * float(scale.float().max())  # column by column, close to W


@pytest.mark.parametrize("hessian", [-torch.eye(32), torch.full((32, 32), float("nan"))], ids=["negative", "nan"])
def test_cholesky_failure_falls_back_to_rounding(hessian):
    weight = torch.randn(16, 32)
    q, scale, used = train_gpt.gptq_quantize(weight, hessian)
    plain_q, plain_scale = train_gpt.quantize_rows_int6(weight)
    assert not used and torch.equal(q, plain_q) and torch.equal(scale, plain_scale)


def sample_tensors():
    return {"a.q": torch.randint(-31, 32, (7, 5), dtype=torch.int8), "a.scale": torch.rand(7).half(),
            "gain": torch.randn(3), "empty": torch.zeros(0, 4).half()}


def test_artifact_round_trip(tmp_path):
    tensors, meta = sample_tensors(), {"schemes": {"a": "int6"}, "model": {"NUM_LAYERS": 2}}
    written = train_gpt.write_artifact(tmp_path / "m.ptz", tensors, meta)
    assert written == (tmp_path / "m.ptz").stat().st_size
    loaded, loaded_meta = train_gpt.read_artifact(tmp_path / "m.ptz")
    assert loaded_meta == meta and loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) and loaded[k].dtype == tensors[k].dtype for k in tensors)


def damaged_blobs():
    blob = train_gpt.encode_artifact(sample_tensors(), {"x": 1})
    middle = len(blob) // 2
    yield "flipped", blob[:middle] + bytes([blob[middle] ^ 0xFF]) + blob[middle + 1:]
    for cut in (len(train_gpt.ARTIFACT_MAGIC), middle, len(blob) - 1):
        yield f"truncated{cut}", blob[:cut]
    yield "pickle", pickle.dumps({"w": torch.zeros(3)})
    yield "random", bytes(range(256)) * 4


@pytest.mark.parametrize("kind, blob", list(damaged_blobs()), ids=[k for k, _ in damaged_blobs()])
def test_damaged_artifacts_give_a_clear_error(tmp_path, kind, blob):
    path = tmp_path / "final_model.int6.ptz"
    path.write_bytes(blob)
    with pytest.raises(train_gpt.ArtifactError) as caught:
        train_gpt.read_artifact(path)
    assert str(path) in str(caught.value)


def forged_blob(entries: list[dict], payload: bytes) -> bytes:
    import json
    import zlib

    import brotli

    header = json.dumps({"tensors": entries, "meta": {}}).encode()
    stream = brotli.compress(len(header).to_bytes(4, "little") + header + payload)
    return train_gpt.ARTIFACT_MAGIC + zlib.crc32(stream).to_bytes(4, "little") + stream


@pytest.mark.parametrize("entry, payload, message", [
    ({"shape": [1000], "offset": 0, "bytes": 2000}, b"\0" * 10, "outside the payload"),
    ({"shape": [-1], "offset": 0, "bytes": -2}, b"", "outside the payload"),
    ({"shape": [5], "offset": 0, "bytes": 10}, b"\0" * 12, "2 payload bytes belong to no tensor"),
], ids=["past_the_end", "negative_shape", "trailing_bytes"])
def test_forged_headers_are_refused(entry, payload, message):
    blob = forged_blob([{"name": "x", "dtype": "float16", **entry}], payload)
    with pytest.raises(train_gpt.ArtifactError, match=message):
        train_gpt.decode_artifact(blob, "forged.ptz")


@pytest.mark.parametrize("row_scale", [0.0, 1e-7])
def test_zero_and_tiny_rows_quantise_to_finite_values(row_scale):
    weight = torch.randn(4, 64)
    weight[1] *= row_scale
    for q, scale in (train_gpt.quantize_rows_int6(weight), train_gpt.quantize_rows_int8(weight)):
        restored = train_gpt.dequantize_rows(q, scale)
        assert scale.float().min() > 0 and torch.isfinite(restored).all()
        assert (restored[1] - weight[1]).abs().max() <= 1e-6


def test_missing_artifact_is_named(tmp_path):
    with pytest.raises(train_gpt.ArtifactError, match="nothing.ptz: cannot read artifact"):
        train_gpt.read_artifact(tmp_path / "nothing.ptz")


def test_model_state_survives_unbank_and_rebank():
    hp = tiny_hp()
    state = train_gpt.build_model(hp).state_dict()
    rebuilt = train_gpt.rebank(train_gpt.unbank(state, hp.num_layers), hp.num_layers)
    assert rebuilt.keys() == state.keys() and all(torch.equal(rebuilt[k], state[k]) for k in state)


def test_quantised_state_loads_into_a_fresh_model():
    hp = tiny_hp()
    model = train_gpt.build_model(hp)
    runtime = train_gpt.Runtime()
    hessians = {f"blocks.{i}.{key}": torch.eye(n) for i in range(hp.num_layers)
                for key, n in (("qkv", 64), ("out", 64), ("up", 64), ("down", 128))}
    tensors, schemes, gptq_count = train_gpt.quantize_state(hp, model.state_dict(), hessians, runtime)
    assert gptq_count == 6 * hp.num_layers and schemes["smear.gate"] == "fp16"
    assert schemes["tok_emb.weight"] == "fp16"  # 1024 x 64 = 65,536 values: exactly the small-tensor limit
    fresh = train_gpt.build_model(hp)
    fresh.load_state_dict(train_gpt.dequantize_state(tensors, schemes, hp.num_layers))
    for name, original in model.state_dict().items():
        assert torch.allclose(fresh.state_dict()[name], original, atol=0.02), name


def test_packed_file_holds_the_stripped_source():
    source = (ROOT / "src" / "train_gpt.py").read_text()
    shipped = (ROOT / "train_gpt.py").read_text()
    assert shipped == pack.pack_source(source), "run python tools/pack.py"
    assert shipped.count("\n") == 2 and len(shipped.encode()) <= 30_000
    unpacked = pack.unpack_source(shipped)
    assert ast.dump(ast.parse(unpacked)) == ast.dump(ast.parse(pack.strip_source(source)))
    assert '"""' not in unpacked and "# " not in unpacked.replace("'# '", "")


def test_strip_source_keeps_the_code_and_drops_docs():
    source = '"""doc"""\nfrom __future__ import annotations\ndef f(x):\n    """doc"""\n    return x  # note\nclass C:\n    """only a doc"""\n'
    stripped = pack.strip_source(source)
    namespace: dict = {}
    exec(stripped, namespace)
    assert namespace["f"](3) == 3 and "doc" not in stripped and "note" not in stripped


def test_pack_check_detects_a_stale_file(tmp_path, monkeypatch):
    monkeypatch.setattr(pack, "SHIPPED", tmp_path / "train_gpt.py")
    (tmp_path / "train_gpt.py").write_text("stale")
    for argv, status in ((["--check"], 1), ([], 0), (["--check"], 0)):
        monkeypatch.setattr(sys, "argv", ["pack.py", *argv])
        assert pack.main() == status
    repository_check = subprocess.run([sys.executable, str(ROOT / "tools" / "pack.py"), "--check"], capture_output=True, text=True)
    assert repository_check.returncode == 0, repository_check.stderr


def test_over_the_size_limit_is_impossible_to_miss(capsys):
    runtime = train_gpt.Runtime()
    fits = train_gpt.ArtifactReport(path=ROOT / "x.ptz", model_bytes=15_972_601, code_bytes=27_399)
    over = train_gpt.ArtifactReport(path=ROOT / "x.ptz", model_bytes=15_972_602, code_bytes=27_399)
    assert fits.total_bytes == 16_000_000 and train_gpt.report_size_verdict(fits, runtime) == 0
    assert capsys.readouterr().out == ""
    assert train_gpt.report_size_verdict(over, runtime) == 1
    assert "SIZE LIMIT EXCEEDED: total 16000001 bytes (limit 16000000); exit status 1" in capsys.readouterr().out
