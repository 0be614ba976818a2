"""QUANTISATION AND ARTIFACT: grids and floors, GPTQ against a textbook re-implementation,
the artifact format, the 16 MB accounting, the packed file."""

from __future__ import annotations

import ast
import json
import pickle
import subprocess
import sys
import zlib

import brotli
import pytest
import torch

import trainer
from conftest import ROOT, tiny_hp, tiny_model


def grid_matrix(rows: int, cols: int, clip_range: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.randint(-clip_range, clip_range + 1, (rows, cols), dtype=torch.int8)
    q[:, 0] = clip_range  # every row reaches the edge of the grid
    scale = (torch.rand(rows) + 0.1).to(torch.float16)
    return q, scale, q.float() * scale.float()[:, None]


@pytest.mark.parametrize("quantize, clip_range", [(trainer.quantize_rows_int6, 31), (trainer.quantize_rows_int8, 127)])
def test_round_trip_is_exact_on_the_grid(quantize, clip_range):
    torch.manual_seed(0)
    q, scale, weight = grid_matrix(16, 300, clip_range)
    got_q, got_scale = quantize(weight)
    assert torch.equal(trainer.dequantize_rows(got_q, got_scale), weight)
    assert got_q.dtype == torch.int8 and int(got_q.abs().max()) <= clip_range


def test_scale_floor_binds_below_one_unless_fine():
    weight = torch.tensor([[0.5, -0.25, 0.1], [62.0, 1.0, -3.0]])
    assert trainer.row_scales(weight, 1.0, 31, floor=True).float().tolist() == pytest.approx([1 / 31, 2.0], rel=1e-3)
    assert trainer.row_scales(weight, 1.0, 31, floor=False).float().tolist() == pytest.approx([0.5 / 31, 2.0], rel=1e-3)
    assert trainer.quantize_rows_int8(weight)[1].float()[0] == pytest.approx(1 / 127, rel=1e-3)
    assert trainer.quantize_rows_int8(weight, floor=False)[1].float()[0] == pytest.approx(0.5 / 127, rel=1e-3)


def test_int8_rows_round_with_the_float32_scale_and_store_it_as_fp16():
    torch.manual_seed(0)
    weight = torch.randn(64, 2048) * 3.0
    clip = torch.quantile(weight.abs(), 0.9999984, dim=1).clamp_min(1.0)  # the record's quantile and 1/127 floor
    expected = torch.clamp(torch.round(weight / (clip / 127)[:, None]), -127, 127).to(torch.int8)
    q, scale = trainer.quantize_rows_int8(weight)
    assert torch.equal(q, expected) and torch.equal(scale, (clip / 127).half())
    rounded_with_fp16 = torch.clamp(torch.round(weight / scale.float()[:, None]), -127, 127).to(torch.int8)
    assert not torch.equal(q, rounded_with_fp16)  # the two roundings really differ on such rows


def test_small_rows_keep_their_resolution_only_with_fine_scales():
    weight = torch.randn(8, 64) * 0.02  # max well below 1: the floor coarsens the whole row
    coarse = trainer.dequantize_rows(*trainer.quantize_rows_int6(weight))
    fine = trainer.dequantize_rows(*trainer.quantize_rows_int6(weight, floor=False))
    assert (fine - weight).abs().max() < 0.05 * weight.abs().max() < (coarse - weight).abs().max()


@pytest.mark.parametrize("row_scale", [0.0, 1e-7])
def test_zero_and_tiny_rows_quantise_to_finite_values(row_scale):
    weight = torch.randn(4, 64)
    weight[1] *= row_scale
    for floor in (True, False):
        for q, scale in (trainer.quantize_rows_int6(weight, floor=floor), trainer.quantize_rows_int8(weight, floor=floor)):
            restored = trainer.dequantize_rows(q, scale)
            assert scale.float().min() > 0 and torch.isfinite(restored).all()
            assert (restored[1] - weight[1]).abs().max() <= 1e-6


def correlated_layer(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(64, 64, generator=generator) * torch.logspace(0, -2, 64)[:, None]
    inputs = torch.randn(4096, 64, generator=generator) @ mixing  # strongly correlated features
    hessian = inputs.T @ inputs / len(inputs)
    hessian += 0.01 * hessian.diagonal().mean() * torch.eye(64)
    return torch.randn(48, 64, generator=generator) * 0.3, hessian


def textbook_gptq(weight, hessian, fine: bool):
    """GPTQ written out column by column in float64, with the variant's three choices."""
    weight, hessian = weight.double(), hessian.double().clone()
    if not fine:
        hessian += 0.01 * hessian.diagonal().mean() * torch.eye(len(hessian), dtype=torch.float64)
    order = torch.argsort(hessian.diagonal(), descending=True)
    upper = torch.linalg.cholesky(torch.linalg.inv(hessian[order][:, order])).T
    best = None
    for quantile in (0.999, 0.9995, 0.9999, 0.99999, 1.0):
        clip = torch.quantile(weight.abs().float(), quantile, dim=1).double() if quantile < 1 else weight.abs().amax(1)
        scale = (clip / 31).clamp_min(1 / 31 if not fine else 2.0**-24).half().double()
        work, q = weight[:, order].clone(), torch.zeros_like(weight)
        for j in range(weight.size(1)):
            q[:, j] = torch.clamp(torch.round(work[:, j] / scale), -31, 31)
            error = (work[:, j] - q[:, j] * scale) / upper[j, j]
            work[:, j:] -= error[:, None] * upper[j, j:][None, :]
        q = q[:, torch.argsort(order)]
        residual = weight - q * scale[:, None]
        error = float(((residual @ hessian) * residual).sum()) if fine else float(residual.square().sum())
        if best is None or error < best[0]:
            best = (error, q, scale)
    return best[1], best[2]


@pytest.mark.parametrize("fine", [False, True], ids=["reference", "fine_scales"])
def test_gptq_matches_a_textbook_version(fine):
    weight, hessian = correlated_layer()
    q, scale, used = trainer.gptq_quantize(weight, hessian, block_size=16, fine=fine)
    expected_q, expected_scale = textbook_gptq(weight, hessian, fine)
    assert used and torch.equal(scale.double(), expected_scale)
    assert (q.double() == expected_q).float().mean() > 0.99  # float32 vs float64 may flip a rare rounding


def test_gptq_beats_plain_rounding_on_the_hessian_weighted_error():
    weight, hessian = correlated_layer()
    for fine in (False, True):
        gptq = trainer.gptq_quantize(weight, hessian, block_size=16, fine=fine)[:2]
        plain = trainer.quantize_rows_int6(weight, floor=not fine)
        assert trainer.hessian_error(weight, *gptq, hessian) < 0.8 * trainer.hessian_error(weight, *plain, hessian)


@pytest.mark.parametrize("hessian", [-torch.eye(32), torch.full((32, 32), float("nan"))], ids=["negative", "nan"])
def test_cholesky_failure_falls_back_to_rounding(hessian):
    weight = torch.randn(16, 32)
    q, scale, used = trainer.gptq_quantize(weight, hessian)
    plain_q, plain_scale = trainer.quantize_rows_int6(weight)
    assert not used and torch.equal(q, plain_q) and torch.equal(scale, plain_scale)


def sample_tensors():
    return {"a.q": torch.randint(-31, 32, (7, 5), dtype=torch.int8), "a.scale": torch.rand(7).half(),
            "gain": torch.randn(3), "empty": torch.zeros(0, 4).half()}


def test_artifact_round_trip(tmp_path):
    tensors, meta = sample_tensors(), {"schemes": {"a": "int6"}, "model": {"num_layers": 2}}
    blob = trainer.encode_artifact(tensors, meta)
    loaded, loaded_meta = trainer.decode_artifact(blob, "m.ptz")
    assert loaded_meta == meta and loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) and loaded[k].dtype == tensors[k].dtype for k in tensors)


def damaged_blobs():
    blob = trainer.encode_artifact(sample_tensors(), {"x": 1})
    middle = len(blob) // 2
    yield "flipped", blob[:middle] + bytes([blob[middle] ^ 0xFF]) + blob[middle + 1:]
    for cut in (len(trainer.ARTIFACT_MAGIC), middle, len(blob) - 1):
        yield f"truncated{cut}", blob[:cut]
    yield "pickle", pickle.dumps({"w": torch.zeros(3)})
    yield "random", bytes(range(256)) * 4


@pytest.mark.parametrize("kind, blob", list(damaged_blobs()), ids=[k for k, _ in damaged_blobs()])
def test_damaged_artifacts_give_a_clear_error(tmp_path, kind, blob):
    path = tmp_path / "final_model.int6.ptz"
    path.write_bytes(blob)
    with pytest.raises(trainer.ArtifactError) as caught:
        trainer.read_artifact(path)
    assert str(path) in str(caught.value)


def forged_blob(entries: list[dict], payload: bytes) -> bytes:
    header = json.dumps({"tensors": entries, "meta": {}}).encode()
    stream = brotli.compress(len(header).to_bytes(4, "little") + header + payload)
    return trainer.ARTIFACT_MAGIC + zlib.crc32(stream).to_bytes(4, "little") + stream


@pytest.mark.parametrize("entry, payload, message", [
    ({"shape": [1000], "offset": 0, "bytes": 2000}, b"\0" * 10, "outside the payload"),
    ({"shape": [-1], "offset": 0, "bytes": -2}, b"", "outside the payload"),
    ({"shape": [5], "offset": 0, "bytes": 10}, b"\0" * 12, "2 payload bytes belong to no tensor"),
    ({"shape": [2], "offset": 0, "bytes": 4}, torch.tensor([1.0, float("nan")]).half().numpy().tobytes(), "NaN or infinite"),
], ids=["past_the_end", "negative_shape", "trailing_bytes", "nan_weights"])
def test_forged_headers_are_refused(entry, payload, message):
    blob = forged_blob([{"name": "x", "dtype": "float16", **entry}], trainer.byte_shuffle(payload, 2))
    with pytest.raises(trainer.ArtifactError, match=message):
        trainer.decode_artifact(blob, "forged.ptz")


def test_missing_artifact_is_named(tmp_path):
    with pytest.raises(trainer.ArtifactError, match="nothing.ptz: cannot read artifact"):
        trainer.read_artifact(tmp_path / "nothing.ptz")


def test_model_state_survives_unbank_and_rebank():
    hp = tiny_hp()
    state = tiny_model(hp).state_dict()
    rebuilt = trainer.rebank(trainer.unbank(state, hp.num_layers), hp.num_layers)
    assert rebuilt.keys() == state.keys() and all(torch.equal(rebuilt[k], state[k]) for k in state)


def identity_hessians(hp):
    return {f"blocks.{i}.{key}": torch.eye(n) for i in range(hp.num_layers)
            for key, n in (("qkv", hp.model_dim), ("out", hp.model_dim), ("up", hp.model_dim), ("down", int(hp.mlp_mult * hp.model_dim)))}


def test_block_matrices_go_through_gptq_and_small_tensors_stay_fp16():
    hp = tiny_hp()
    tensors, schemes, gptq_count = trainer.quantize_state(hp, tiny_model(hp).state_dict(), identity_hessians(hp), trainer.Runtime())
    assert gptq_count == 6 * hp.num_layers and {schemes[n] for n in trainer.bank_matrix_names(hp.num_layers)} == {"int6"}
    assert schemes["smear.gate"] == schemes["bigram.proj.weight"] == "fp16"
    assert schemes["tok_emb.weight"] == "fp16"  # 1024 x 64 = 65,536 values: exactly the small-tensor limit
    hp = tiny_hp(MODEL_DIM="128", NUM_HEADS="2", NUM_KV_HEADS="2")
    _, schemes, _ = trainer.quantize_state(hp, tiny_model(hp).state_dict(), identity_hessians(hp), trainer.Runtime())
    assert schemes["tok_emb.weight"] == "int8"  # 1024 x 128: one past the limit


def test_quantised_model_loads_into_a_fresh_model_and_checks_its_config(tmp_path):
    hp = tiny_hp(MODEL_DIM="128", NUM_HEADS="2", NUM_KV_HEADS="2", MLP_MULT="5")
    model = tiny_model(hp)
    hessians = identity_hessians(hp)
    with torch.no_grad():
        model.mlp_down_bank.normal_(std=0.05)  # zero at init: give GPTQ something to round
    tensors, schemes, _ = trainer.quantize_state(hp, model.state_dict(), hessians, trainer.Runtime())
    path = tmp_path / "m.ptz"
    trainer.write_atomic(path, trainer.encode_artifact(tensors, {"schemes": schemes, "model": model.config.function_fields()}))
    fresh = trainer.load_quantized_model(model.config, path, trainer.Runtime())
    for name, original in model.state_dict().items():
        assert torch.allclose(fresh.state_dict()[name], original, atol=0.02), name
    other = trainer.ModelConfig.from_settings(tiny_hp(MODEL_DIM="128", NUM_HEADS="2", NUM_KV_HEADS="2", MLP_MULT="5",
                                                       NEGATIVE_SLOPE="0.3"))
    with pytest.raises(trainer.ArtifactError, match="m.ptz: made with a model whose negative_slope is 0.5, but these settings give 0.3"):
        trainer.load_quantized_model(other, path, trainer.Runtime())
    reseeded = trainer.ModelConfig.from_settings(tiny_hp(MODEL_DIM="128", NUM_HEADS="2", NUM_KV_HEADS="2", MLP_MULT="5",
                                                          QK_GAIN_INIT="1.5"))
    trainer.load_quantized_model(reseeded, path, trainer.Runtime())  # an init setting does not matter


def test_over_the_size_limit_is_exactly_one_byte_past_16mb():
    fits = trainer.ArtifactReport(path=ROOT / "x.ptz", model_bytes=15_972_601, code_bytes=27_399)
    over = trainer.ArtifactReport(path=ROOT / "x.ptz", model_bytes=15_972_602, code_bytes=27_399)
    assert fits.total_bytes == 16_000_000 and not fits.over_limit and over.over_limit


@pytest.mark.packed
def test_shipped_file_is_the_packed_source_and_counts_its_own_bytes():
    source = (ROOT / "src" / "trainer.py").read_text()
    shipped = (ROOT / "train_gpt.py").read_text()
    assert shipped == trainer.pack_source(source), "run python tools/pack.py"
    assert shipped.count("\n") == 3 and len(shipped.encode()) <= 30_000  # the budget the packed code keeps to
    assert trainer.running_code()[2] == len(shipped.encode())
    unpacked = trainer.unpack_source(shipped)
    assert ast.dump(ast.parse(unpacked)) == ast.dump(ast.parse(trainer.strip_source(source)))
    assert '"""' not in unpacked and "# " not in unpacked.replace("'# '", "")


def test_strip_source_keeps_the_code_and_drops_docs_and_annotations():
    source = ('"""doc"""\nfrom __future__ import annotations\nimport dataclasses\nSOURCE_SHA256 = ""\n'
              'def f(x: int) -> int:\n    """doc"""\n    y: int = x  # note\n    return y\nclass C:\n    """only a doc"""\n'
              '@dataclasses.dataclass\nclass D:\n    size: float = 2.0\n')
    stripped = trainer.strip_source(source)
    namespace: dict = {}
    exec(stripped, namespace)
    assert namespace["f"](3) == 3 and "doc" not in stripped and "note" not in stripped and "int" not in stripped
    assert namespace["D"]().size == 2.0 and "size: float" in stripped  # a dataclass keeps its fields
    assert namespace["SOURCE_SHA256"] == trainer.hashlib.sha256(source.encode()).hexdigest()


def test_a_traceback_from_a_packed_file_shows_source_lines_not_the_blob(tmp_path):
    source = "def inner(x):\n    return 1 / x\n\ndef outer():\n    return inner(0)\n\nouter()\n"
    script = tmp_path / "packed.py"
    script.write_text(trainer.pack_source(source))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert result.returncode == 1 and "ZeroDivisionError" in result.stderr
    assert "return 1 / x" in result.stderr and "packed.py (unpacked)\", line 2, in inner" in result.stderr
    assert len(result.stderr) < 1500 and "b85decode(\"" not in result.stderr
