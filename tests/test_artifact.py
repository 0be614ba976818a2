"""trainer.artifact: grids and floors, GPTQ against a textbook re-implementation, the
artifact format and its bounds, the 16 MB accounting, a run's own artifact."""

from __future__ import annotations

import hashlib
import json
import os
import re
import pickle
import resource
import zlib

import brotli
import numpy as np
import pytest
import torch

import trainer.artifact as artifact_module
import trainer.runtime as runtime_module
from trainer.artifact import (ARTIFACT_MAGIC, HEAD_INPUT, SMALL_TENSOR_NUMEL, ArtifactReport, ClipRule, artifact_payload,
                              artifact_target, bank_matrix_names, body_limit, bounded_decompress, byte_shuffle,
                              collect_hessians, decode_artifact, decode_pairs, dequantize_rows, encode_artifact, encode_pairs,
                              export_artifact, file_signature, gptq_jobs, gptq_quantize, hessian_error, load_quantized_model,
                              quantize_rows_int6, quantize_rows_int8, quantize_state, read_artifact, rebank, round_to_grid,
                              row_scales, running_code, sdclip_scales, storage_of, unbank)
from trainer.data import make_sampler
from trainer.model import ModelConfig
from trainer.runtime import Runtime
from trainer.settings import InputError, RunError
from conftest import ROOT, TOKENIZER, identity_hessians, noisy_model, tiny_hp, tiny_model


def grid_matrix(rows: int, cols: int, clip_range: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.randint(-clip_range, clip_range + 1, (rows, cols), dtype=torch.int8)
    q[:, 0] = clip_range  # every row reaches the edge of the grid
    scale = (torch.rand(rows) + 0.1).to(torch.float16)
    return q, scale, q.float() * scale.float()[:, None]


@pytest.mark.parametrize("quantize, clip_range", [(quantize_rows_int6, 31), (quantize_rows_int8, 127)])
def test_round_trip_is_exact_on_the_grid(quantize, clip_range):
    torch.manual_seed(0)
    q, scale, weight = grid_matrix(16, 300, clip_range)
    got_q, got_scale = quantize(weight)
    assert torch.equal(dequantize_rows(got_q, got_scale), weight)
    assert got_q.dtype == torch.int8 and int(got_q.abs().max()) <= clip_range


def test_scale_floor_binds_below_one_unless_fine():
    weight = torch.tensor([[0.5, -0.25, 0.1], [62.0, 1.0, -3.0]])
    assert row_scales(weight, 1.0, 31, floor=True).float().tolist() == pytest.approx([1 / 31, 2.0], rel=1e-3)
    assert row_scales(weight, 1.0, 31, floor=False).float().tolist() == pytest.approx([0.5 / 31, 2.0], rel=1e-3)
    assert quantize_rows_int8(weight)[1].float()[0] == pytest.approx(1 / 127, rel=1e-3)
    assert quantize_rows_int8(weight, floor=False)[1].float()[0] == pytest.approx(0.5 / 127, rel=1e-3)


def test_int8_rows_round_with_the_float32_scale_and_store_it_as_fp16():
    torch.manual_seed(0)
    weight = torch.randn(64, 2048) * 3.0
    clip = torch.quantile(weight.abs(), 0.9999984, dim=1).clamp_min(1.0)  # the record's quantile and 1/127 floor
    expected = torch.clamp(torch.round(weight / (clip / 127)[:, None]), -127, 127).to(torch.int8)
    q, scale = quantize_rows_int8(weight)
    assert torch.equal(q, expected) and torch.equal(scale, (clip / 127).half())
    rounded_with_fp16 = torch.clamp(torch.round(weight / scale.float()[:, None]), -127, 127).to(torch.int8)
    assert not torch.equal(q, rounded_with_fp16)  # the two roundings really differ on such rows


def test_small_rows_keep_their_resolution_only_with_fine_scales():
    weight = torch.randn(8, 64) * 0.02  # max well below 1: the floor coarsens the whole row
    coarse = dequantize_rows(*quantize_rows_int6(weight))
    fine = dequantize_rows(*quantize_rows_int6(weight, floor=False))
    assert (fine - weight).abs().max() < 0.05 * weight.abs().max() < (coarse - weight).abs().max()


@pytest.mark.parametrize("row_scale", [0.0, 1e-7])
def test_zero_and_tiny_rows_quantise_to_finite_values(row_scale):
    weight = torch.randn(4, 64)
    weight[1] *= row_scale
    for floor in (True, False):
        for q, scale in (quantize_rows_int6(weight, floor=floor), quantize_rows_int8(weight, floor=floor)):
            restored = dequantize_rows(q, scale)
            assert scale.float().min() > 0 and torch.isfinite(restored).all()
            assert (restored[1] - weight[1]).abs().max() <= 1e-6


def correlated_layer(seed: int = 0):
    """A weight and the mean X^T X of strongly correlated inputs (undamped, as calibration gives it)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(64, 64, generator=generator) * torch.logspace(0, -2, 64)[:, None]
    inputs = torch.randn(4096, 64, generator=generator) @ mixing
    return torch.randn(48, 64, generator=generator) * 0.3, inputs.T @ inputs / len(inputs)


def damped(hessian: torch.Tensor) -> torch.Tensor:
    return hessian + 0.01 * hessian.diagonal().mean() * torch.eye(len(hessian), dtype=hessian.dtype)


def textbook_gptq(weight, hessian, rule: ClipRule, clip_range: int = 31):
    """GPTQ written out column by column in float64, with each variant's choices: PR #1217
    damps at calibration and again, floors the scale at 1/N and searches five quantiles by
    squared error; fine damps once, no floor, by Hessian-weighted error; SDClip damps once
    and takes k row standard deviations."""
    weight, hessian = weight.double(), hessian.double()
    hessian = damped(hessian) if rule.sigmas else damped(damped(hessian)) if not rule.fine else damped(hessian)
    order = torch.argsort(hessian.diagonal(), descending=True)
    upper = torch.linalg.cholesky(torch.linalg.inv(hessian[order][:, order])).T
    if rule.sigmas:
        scales = [(rule.sigmas * weight.float().std(dim=1) / clip_range).clamp_min(1e-10).half().double()]
    else:
        scales = []
        for quantile in (0.999, 0.9995, 0.9999, 0.99999, 1.0):
            clip = torch.quantile(weight.abs().float(), quantile, dim=1).double() if quantile < 1 else weight.abs().amax(1)
            scales.append((clip / clip_range).clamp_min(1 / clip_range if not rule.fine else 2.0**-24).half().double())
    best = None
    for scale in scales:
        work, q = weight[:, order].clone(), torch.zeros_like(weight)
        for j in range(weight.size(1)):
            q[:, j] = torch.clamp(torch.round(work[:, j] / scale), -clip_range, clip_range)
            error = (work[:, j] - q[:, j] * scale) / upper[j, j]
            work[:, j:] -= error[:, None] * upper[j, j:][None, :]
        q = q[:, torch.argsort(order)]
        residual = weight - q * scale[:, None]
        error = float(((residual @ hessian) * residual).sum()) if rule.fine else float(residual.square().sum())
        if best is None or error < best[0]:
            best = (error, q, scale)
    return best[1], best[2]


RULES = [(ClipRule(), 31), (ClipRule(fine=True), 31), (ClipRule(12.85), 31), (ClipRule(20.0), 127)]
RULE_IDS = ["pr1217", "fine_scales", "sdclip_int6", "sdclip_int8"]


@pytest.mark.parametrize("rule, clip_range", RULES, ids=RULE_IDS)
def test_gptq_matches_a_textbook_version(rule, clip_range):
    weight, hessian = correlated_layer()
    q, scale, used = gptq_quantize(weight, hessian, clip_range, rule, block_size=16)
    expected_q, expected_scale = textbook_gptq(weight, hessian, rule, clip_range)
    assert used and torch.equal(scale.double(), expected_scale)
    assert (q.double() == expected_q).float().mean() > 0.99  # float32 vs float64 may flip a rare rounding


@pytest.mark.parametrize("rule, clip_range", RULES, ids=RULE_IDS)
def test_gptq_beats_plain_rounding_on_the_hessian_weighted_error(rule, clip_range):
    weight, hessian = correlated_layer()
    q, scale, _ = gptq_quantize(weight, hessian, clip_range, rule, block_size=16)
    plain = round_to_grid(weight, scale, clip_range)
    assert hessian_error(weight, q, scale, hessian) < 0.8 * hessian_error(weight, plain, scale, hessian)


def outlier_layer(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A 24 x 1024 layer of correlated inputs whose every row holds two values 60 row stds
    out, past any clip point (even 20 stds of the row they inflate): one each way."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(2048, 1024, generator=generator) @ (torch.eye(1024) + 0.1 * torch.randn(1024, 1024, generator=generator))
    weight = torch.randn(24, 1024, generator=generator)
    rows = torch.arange(24)
    weight[rows, 5 * rows] = 60.0
    weight[rows, 5 * rows + 2] = -60.0
    return weight, inputs.T @ inputs / len(inputs)


@pytest.mark.parametrize("rule, clip_range", RULES, ids=RULE_IDS)
def test_values_past_the_clip_point_get_the_edge_codes_and_no_code_leaves_the_grid(rule, clip_range):
    weight, hessian = outlier_layer()
    q, scale, used = gptq_quantize(weight, hessian, clip_range, rule, block_size=256)
    assert used and q.dtype == torch.int8
    assert int(q.min()) >= -clip_range and int(q.max()) <= clip_range
    beyond = weight.abs() > clip_range * scale.float()[:, None]
    if rule.sigmas:  # SDClip's k stds sit far below the outliers
        assert beyond.sum() >= 2 * weight.size(0)
    assert torch.equal(q[beyond], (torch.sign(weight[beyond]) * clip_range).to(torch.int8))


@pytest.mark.parametrize("clip_range", [31, 15, 127])
def test_rounding_clamps_to_the_grid(clip_range):
    weight = torch.linspace(-3, 3, 601).repeat(2, 1)
    q = round_to_grid(weight, torch.tensor([1.0 / clip_range, 2.0 / clip_range]).half(), clip_range)
    expected = torch.clamp(torch.round(weight / torch.tensor([[1.0 / clip_range], [2.0 / clip_range]]).half().float()), -clip_range, clip_range)
    assert torch.equal(q.double(), expected.double()) and int(q.min()) == -clip_range and int(q.max()) == clip_range
    wide = torch.randn(4, 2000)
    q8, scale8 = quantize_rows_int8(wide, quantile=0.99)  # one value in a hundred past the clip point
    assert int(q8.abs().max()) == 127 and (q8.abs() == 127).sum() >= 4 * 2000 // 100
    assert torch.equal(q8, round_to_grid(wide, row_scales(wide, 0.99, 127, True), 127))


def test_scales_stop_at_the_largest_float16():
    huge = torch.tensor([[1e7, -3e6], [62.0, 0.5]])
    for quantile in (1.0, 0.999):
        scale = row_scales(huge, quantile, 31, floor=True)
        assert scale[0] == 65504.0 and torch.isfinite(scale.half()).all()
    assert torch.equal(row_scales(huge, 1.0, 31, floor=True)[1], torch.tensor(2.0))


def test_sdclip_scales_are_k_standard_deviations_and_have_no_floor():
    weight = torch.randn(6, 100, dtype=torch.float64) * torch.tensor([1e-4, 0.01, 0.1, 1, 3, 10], dtype=torch.float64)[:, None]
    scale = sdclip_scales(weight.float(), 12.85, 31)
    expected = 12.85 * weight.std(dim=1) / 31
    assert scale.dtype == torch.float16 and torch.allclose(scale.double(), expected, rtol=1e-3)
    assert float(scale[0]) < 1 / 31  # the PR #1217 floor would have made this row's grid 1/31


@pytest.mark.parametrize("hessian", [-torch.eye(32), torch.full((32, 32), float("nan"))], ids=["negative", "nan"])
def test_cholesky_failure_falls_back_to_rounding(hessian):
    weight = torch.randn(16, 32)
    q, scale, used = gptq_quantize(weight, hessian)
    plain_q, plain_scale = quantize_rows_int6(weight)
    assert not used and torch.equal(q, plain_q) and torch.equal(scale, plain_scale)
    q, scale, used = gptq_quantize(weight, hessian, 31, ClipRule(12.85))
    assert not used and torch.equal(scale, sdclip_scales(weight, 12.85, 31)) and torch.equal(q, round_to_grid(weight, scale, 31))
    small = weight * 0.01  # rows whose 1/N floor binds: PR #1217's fallback floors them, the fine rule's does not
    q, scale, used = gptq_quantize(small, hessian, 15)
    assert not used and torch.equal(scale, quantize_rows_int6(small, 15)[1])
    q, scale, used = gptq_quantize(small, hessian, 15, ClipRule(fine=True))
    plain_q, plain_scale = quantize_rows_int6(small, 15, floor=False)
    assert not used and torch.equal(q, plain_q) and torch.equal(scale, plain_scale)
    assert not torch.equal(scale, quantize_rows_int6(small, 15)[1]) and int(q.abs().max()) == 15


@pytest.mark.parametrize("rule, clip_range", RULES, ids=RULE_IDS)
def test_an_input_that_never_fires_gets_code_zero_under_sdclip_and_gptq_still_runs(rule, clip_range):
    """SDClip's Hessian is not damped at calibration, so an input that is always 0 leaves a
    zero on its diagonal: its weights are free, stored as 0. The PR #1217 damping makes
    that diagonal positive: the column is rounded like any other."""
    weight, hessian = correlated_layer()
    hessian[:, 5] = hessian[5, :] = 0.0
    q, scale, used = gptq_quantize(weight, hessian, clip_range, rule, block_size=16)
    assert used and bool((weight[:, 5].abs() > 2 * scale.float()).any()) and (q != 0).float().mean() > 0.5
    assert bool((q[:, 5] == 0).all()) == bool(rule.sigmas)


def test_the_damping_scales_with_the_hessian():
    """GPTQ's answer does not depend on the units of H: the damping is a share of its mean diagonal."""
    weight, hessian = correlated_layer()
    for rule in (ClipRule(), ClipRule(fine=True)):
        q, _, _ = gptq_quantize(weight, hessian, 31, rule, block_size=16)
        small_q, _, _ = gptq_quantize(weight, hessian * 1e-3, 31, rule, block_size=16)
        assert (q == small_q).float().mean() > 0.99


def test_the_token_table_goes_through_gptq_int8_with_the_heads_hessian(smoke_corpus):
    """EMBED_CLIP_SIGMAS: calibration also gathers the head's input, and the tied table is
    quantised by GPTQ to int8 with it (the PR #1493 record's treatment of its embedding)."""
    hp = tiny_hp(DATA_PATH=str(smoke_corpus), TRAIN_BATCH_TOKENS="512", GPTQ_CALIB_SAMPLES="2", MODEL_DIM="128",
                 NUM_HEADS="2", NUM_KV_HEADS="2", MATRIX_CLIP_SIGMAS="12.85", EMBED_CLIP_SIGMAS="20")
    model = tiny_model(hp)
    hessians = collect_hessians(hp, model, Runtime())
    assert HEAD_INPUT in hessians and hessians[HEAD_INPUT].shape == (128, 128)
    tensors, schemes, gptq_count = quantize_state(hp, model.state_dict(), hessians, Runtime())
    assert schemes["tok_emb.weight"] == "int8" and gptq_count == 6 * hp.num_layers + 1
    assert schemes.keys() == unbank(model.state_dict(), hp.num_layers).keys()  # every other tensor stored too
    expected, expected_scale, _ = gptq_quantize(model.tok_emb.weight.detach().float(), hessians[HEAD_INPUT], 127, ClipRule(20.0))
    assert torch.equal(tensors["tok_emb.weight.q"], expected) and torch.equal(tensors["tok_emb.weight.scale"], expected_scale)
    without = tiny_hp(DATA_PATH=str(smoke_corpus), TRAIN_BATCH_TOKENS="512", GPTQ_CALIB_SAMPLES="2", MODEL_DIM="128",
                      NUM_HEADS="2", NUM_KV_HEADS="2")
    assert HEAD_INPUT not in collect_hessians(without, model, Runtime())


def test_a_looped_layers_hessian_adds_up_every_pass(smoke_corpus):
    hp = tiny_hp(PROFILE="pr1493", DATA_PATH=str(smoke_corpus), TRAIN_BATCH_TOKENS="512", GPTQ_CALIB_SAMPLES="1",
                 NUM_LAYERS="4", LOOP_START="1", LOOP_END="2", XSA_LAST_N="4", BIGRAM_VOCAB_SIZE="0", VOCAB_SIZE="1024",
                 TOKENIZER_PATH=str(TOKENIZER), TRAIN_SAMPLER="coprime")
    model = tiny_model(hp)
    inputs = []
    model.blocks[1].mlp.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach()))
    model.looping = True
    hessians = collect_hessians(hp, model, Runtime())
    assert len(inputs) == 3  # layer 1 runs three times per forward
    expected = sum(x.flatten(0, 1).T @ x.flatten(0, 1) / x[..., 0].numel() for x in inputs)
    assert torch.allclose(hessians["blocks.1.up"], expected, rtol=1e-5, atol=1e-6)
    last_pass_only = inputs[-1].flatten(0, 1).T @ inputs[-1].flatten(0, 1) / inputs[-1][..., 0].numel()
    assert not torch.allclose(hessians["blocks.1.up"], last_pass_only, rtol=1e-2)


def sample_tensors():
    return {"a.q": torch.randint(-31, 32, (7, 5), dtype=torch.int8), "a.scale": torch.rand(7).half(),
            "gain": torch.randn(3), "empty": torch.zeros(0, 4).half()}


def test_artifact_round_trip(tmp_path):
    tensors, meta = sample_tensors(), {"schemes": {"a": "int6"}, "model": {"num_layers": 2}}
    blob = encode_artifact(tensors, meta)
    loaded, loaded_meta = decode_artifact(blob, "m.ptz", len(blob) * 100)
    assert loaded_meta == meta and loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) and loaded[k].dtype == tensors[k].dtype for k in tensors)


def test_the_payload_lies_in_element_size_order_shuffled_and_plain():
    tensors = {"a": torch.randn(3), "b": torch.randn(2).half(), "c": torch.randint(-9, 9, (5,), dtype=torch.int8)}
    entries, payload = artifact_payload(tensors)
    assert entries == [["c", "int8", [5]], ["b", "float16", [2]], ["a", "float32", [3]]]
    raw = {name: tensor.numpy().tobytes() for name, tensor in tensors.items()}
    # byte-shuffled: all first bytes of a tensor's values, then all second bytes...
    shuffled_b = bytes(raw["b"][i] for i in (0, 2, 1, 3))
    shuffled_a = bytes(raw["a"][4 * v + k] for k in range(4) for v in range(3))
    assert payload == raw["c"] + shuffled_b + shuffled_a
    entries, payload = artifact_payload(tensors, shuffle=False)
    assert entries == [["c", "int8", [5]], ["b", "float16", [2]], ["a", "float32", [3]]]
    assert payload == raw["c"] + raw["b"] + raw["a"]
    pairs = {"p": torch.zeros(SMALL_TENSOR_NUMEL + 2, dtype=torch.int8)}
    assert artifact_payload(pairs)[0] == [["p", "int8pairs", [SMALL_TENSOR_NUMEL + 2]]]
    assert artifact_payload(pairs, shuffle=False) == ([["p", "int8", [SMALL_TENSOR_NUMEL + 2]]], bytes(SMALL_TENSOR_NUMEL + 2))


def test_the_header_is_compact_json_after_its_length():
    tensors, meta = sample_tensors(), {"schemes": {"a": "int6"}}
    body = brotli.decompress(encode_artifact(tensors, meta)[len(ARTIFACT_MAGIC) + 4:])
    length = int.from_bytes(body[:4], "little")
    entries, _ = artifact_payload(tensors)
    assert body[4 : 4 + length] == json.dumps({"tensors": entries, "meta": meta}).replace(", ", ",").replace(": ", ":").encode()


class PieceByPiece:
    """A brotli decompressor that hands its output out in pieces of at most 700 bytes and
    never more than asked, as the interface allows (the real one returns all it can)."""
    handed = 0

    def __init__(self):
        self.pending = b""

    def process(self, data: bytes, output_buffer_limit: int) -> bytes:
        assert output_buffer_limit > 0, "asked for no output"
        if data:
            self.pending = brotli.decompress(data)
        piece, self.pending = self.pending[: min(700, output_buffer_limit)], self.pending[min(700, output_buffer_limit):]
        PieceByPiece.handed += len(piece)
        return piece

    def is_finished(self) -> bool:
        return not self.pending

    def can_accept_more_data(self) -> bool:
        return False


@pytest.mark.parametrize("pieces", [False, True], ids=["at_once", "piece_by_piece"])
def test_decompression_stops_one_byte_past_the_limit(monkeypatch, pieces):
    data = bytes(range(256)) * 20  # 5,120 bytes
    stream = brotli.compress(data)
    if pieces:
        monkeypatch.setattr(artifact_module.brotli, "Decompressor", PieceByPiece)
    assert bounded_decompress(stream, len(data), "m.ptz") == data
    for limit in (4000, 300):  # refused as soon as one byte too many has come, however it comes
        PieceByPiece.handed = 0
        with pytest.raises(InputError) as caught:
            bounded_decompress(stream, limit, "m.ptz")
        assert str(caught.value) == (f"m.ptz: decompresses to more than {limit} bytes, more than any artifact of "
                                     "this model can hold (crafted or corrupt)")
        assert PieceByPiece.handed == (limit + 1 if pieces else 0)


def with_checksum(stream: bytes) -> bytes:
    return ARTIFACT_MAGIC + zlib.crc32(stream).to_bytes(4, "little") + stream


def damaged_blobs():
    """(kind, bytes, the reason the loader must give)."""
    blob = encode_artifact(sample_tensors(), {"x": 1})
    middle = len(blob) // 2
    checksum = "truncated or corrupt (checksum mismatch)"
    yield "flipped", blob[:middle] + bytes([blob[middle] ^ 0xFF]) + blob[middle + 1:], checksum
    for where, cut in (("magic", len(ARTIFACT_MAGIC)), ("half", middle), ("last_byte", len(blob) - 1)):
        yield f"truncated_after_{where}", blob[:cut], checksum
    stream = blob[len(ARTIFACT_MAGIC) + 4:]
    yield "cut_with_its_checksum", with_checksum(stream[:-1]), "truncated or corrupt (the brotli stream ends early)"
    yield "garbage_with_a_checksum", with_checksum(bytes(range(256)) * 4), "truncated or corrupt (brotli stream does not decode)"
    yield "pickle", pickle.dumps({"w": torch.zeros(3)}), "not a parameter-golf artifact (bad magic)"
    yield "random", bytes(range(256)) * 4, "not a parameter-golf artifact (bad magic)"


@pytest.mark.parametrize("kind, blob, reason", list(damaged_blobs()), ids=[k for k, _, _ in damaged_blobs()])
def test_damaged_artifacts_give_the_reason(tmp_path, kind, blob, reason):
    path = tmp_path / "final_model.int6.ptz"
    path.write_bytes(blob)
    with pytest.raises(InputError) as caught:
        read_artifact(path, 10**6)
    assert str(caught.value) == f"{path}: {reason}"


def forged_blob(entries: list, payload: bytes) -> bytes:
    header = json.dumps({"tensors": entries, "meta": {}}).encode()
    return with_checksum(brotli.compress(len(header).to_bytes(4, "little") + header + payload))


@pytest.mark.parametrize("shape, payload, reason", [
    ([1000], b"\0" * 10, "tensor x lies outside the payload"),
    ([-1, 2], b"", "tensor x has a negative size"),
    ([5], b"\0" * 12, "2 payload bytes belong to no tensor"),
    ([2], torch.tensor([1.0, float("nan")]).half().numpy().tobytes(), "tensor x holds NaN or infinite values"),
], ids=["past_the_end", "negative_shape", "trailing_bytes", "nan_weights"])
def test_forged_headers_are_refused(shape, payload, reason):
    blob = forged_blob([["x", "float16", shape]], byte_shuffle(payload, 2))
    with pytest.raises(InputError) as caught:
        decode_artifact(blob, "forged.ptz", 10**6)
    assert str(caught.value) == f"forged.ptz: corrupt ({reason})"


def test_missing_artifact_is_named(tmp_path):
    with pytest.raises(InputError, match="nothing.ptz: cannot read artifact"):
        read_artifact(tmp_path / "nothing.ptz", 10**6)


def test_gptq_jobs_carry_the_settings_rule_and_take_the_table_only_past_the_small_tensor_limit():
    hp = tiny_hp(MATRIX_CLIP_SIGMAS="12.85", EMBED_CLIP_SIGMAS="20")
    at_limit = {"tok_emb.weight": torch.zeros(SMALL_TENSOR_NUMEL // 64, 64)}
    reads = {"q": "qkv", "k": "qkv", "v": "qkv", "out": "out", "up": "up", "down": "down"}  # q, k, v share an input
    assert gptq_jobs(hp, at_limit) == [(f"blocks.{layer}.{role}", f"blocks.{layer}.{reads[role]}", 31, ClipRule(12.85, False), "int6")
                                       for layer in range(hp.num_layers) for role in ("q", "out", "k", "v", "up", "down")]
    past_limit = {"tok_emb.weight": torch.zeros(SMALL_TENSOR_NUMEL // 64 + 1, 64)}
    assert gptq_jobs(hp, past_limit)[-1] == ("tok_emb.weight", HEAD_INPUT, 127, ClipRule(20.0), "int8")
    fine = tiny_hp(GPTQ_FINE_SCALES="1", QUANT_CLIP_RANGE="15")
    assert {job[2:] for job in gptq_jobs(fine, past_limit)} == {(15, ClipRule(0.0, True), "int6")}


@pytest.mark.parametrize("fine", ["0", "1"], ids=["floor", "fine_scales"])
def test_large_tables_outside_gptq_round_per_row_with_the_settings_floor(fine):
    hp = tiny_hp(MODEL_DIM="128", NUM_HEADS="2", NUM_KV_HEADS="2", GPTQ_FINE_SCALES=fine)
    model = tiny_model(hp)
    with torch.no_grad():
        model.tok_emb.weight.mul_(1e-3)  # rows far below the 1/127 floor
    tensors, schemes, _ = quantize_state(hp, model.state_dict(), identity_hessians(hp), Runtime())
    table = model.tok_emb.weight.detach().float()
    expected_q, expected_scale = quantize_rows_int8(table, floor=fine == "0")
    assert schemes["tok_emb.weight"] == "int8" and torch.equal(tensors["tok_emb.weight.q"], expected_q)
    assert torch.equal(tensors["tok_emb.weight.scale"], expected_scale)
    assert bool((expected_scale == torch.tensor(1 / 127).half()).all()) == (fine == "0")


class RankOneSends:
    """torch.distributed as rank 0 of 2 sees it: whatever rank 1 broadcasts is all ones, and
    rank 1 used GPTQ on every matrix it owns."""
    ReduceOp = torch.distributed.ReduceOp

    def __init__(self):
        self.broadcasts = []

    def broadcast(self, tensor, src):
        self.broadcasts.append((src, tensor.dtype, tuple(tensor.shape)))
        if src == 1:
            tensor.fill_(1)

    def all_reduce(self, tensor, op):
        assert op == torch.distributed.ReduceOp.SUM
        tensor[1::2] += 1


def test_ranks_share_out_the_gptq_matrices_and_broadcast_them_back(monkeypatch):
    fake = RankOneSends()
    monkeypatch.setattr(runtime_module, "dist", fake)
    hp = tiny_hp()
    state = noisy_model(hp).state_dict()
    tensors, schemes, count = quantize_state(hp, state, identity_hessians(hp), Runtime(rank=0, world_size=2))
    alone, alone_schemes, _ = quantize_state(hp, state, identity_hessians(hp), Runtime())
    names, matrices = bank_matrix_names(hp.num_layers), unbank(state, hp.num_layers)
    assert fake.broadcasts == [(index % 2, dtype, shape) for index, name in enumerate(names)
                               for dtype, shape in ((torch.int8, tuple(matrices[name].shape)),
                                                    (torch.float16, (matrices[name].size(0),)))]
    for index, name in enumerate(names):
        q, scale = tensors[f"{name}.q"], tensors[f"{name}.scale"]
        if index % 2:  # rank 1's matrix: what it sent
            assert bool((q == 1).all()) and bool((scale == 1).all())
        else:
            assert torch.equal(q, alone[f"{name}.q"]) and torch.equal(scale, alone[f"{name}.scale"])
    assert schemes == alone_schemes and count == len(names) and tensors.keys() == alone.keys()


def test_model_state_survives_unbank_and_rebank():
    hp = tiny_hp()
    state = tiny_model(hp).state_dict()
    rebuilt = rebank(unbank(state, hp.num_layers), hp.num_layers)
    assert rebuilt.keys() == state.keys() and all(torch.equal(rebuilt[k], state[k]) for k in state)


def test_block_matrices_go_through_gptq_and_small_tensors_stay_fp16():
    hp = tiny_hp()
    tensors, schemes, gptq_count = quantize_state(hp, tiny_model(hp).state_dict(), identity_hessians(hp), Runtime())
    assert gptq_count == 6 * hp.num_layers and {schemes[n] for n in bank_matrix_names(hp.num_layers)} == {"int6"}
    assert schemes["smear.gate"] == schemes["bigram.proj.weight"] == "fp16"
    assert schemes["tok_emb.weight"] == "fp16"  # 1024 x 64 = 65,536 values: exactly the small-tensor limit (past it, int8:
    # test_large_tables_outside_gptq_round_per_row_with_the_settings_floor)


def test_quantised_model_loads_into_a_fresh_model_and_checks_its_config(tmp_path):
    hp = tiny_hp(MODEL_DIM="96", NUM_HEADS="2", NUM_KV_HEADS="2", MLP_MULT="1.5")
    model = tiny_model(hp)
    hessians = identity_hessians(hp)
    with torch.no_grad():
        model.mlp_down_bank.normal_(std=0.05)  # zero at init: give GPTQ something to round
    tensors, schemes, _ = quantize_state(hp, model.state_dict(), hessians, Runtime())
    blob = encode_artifact(tensors, {"schemes": schemes, "model": model.config.function_fields()})
    fresh = load_quantized_model(model.config, blob, "m.ptz", Runtime())
    for name, original in model.state_dict().items():
        assert torch.allclose(fresh.state_dict()[name], original, atol=0.02), name
    other = ModelConfig.from_settings(tiny_hp(MODEL_DIM="96", NUM_HEADS="2", NUM_KV_HEADS="2", MLP_MULT="1.5",
                                                       NEGATIVE_SLOPE="0.3"))
    with pytest.raises(InputError, match="m.ptz: made with a model whose negative_slope is 0.5, but these settings give 0.3"):
        load_quantized_model(other, blob, "m.ptz", Runtime())
    reseeded = ModelConfig.from_settings(tiny_hp(MODEL_DIM="96", NUM_HEADS="2", NUM_KV_HEADS="2", MLP_MULT="1.5",
                                                          QK_GAIN_INIT="1.5"))
    load_quantized_model(reseeded, blob, "m.ptz", Runtime())  # an init setting does not matter


def test_over_the_size_limit_is_exactly_one_byte_past_16mb():
    fits = ArtifactReport(path=ROOT / "x.ptz", blob=bytes(15_972_601), code_bytes=27_399)
    over = ArtifactReport(path=ROOT / "x.ptz", blob=bytes(15_972_602), code_bytes=27_399)
    assert fits.total_bytes == 16_000_000 and not fits.over_limit and over.over_limit


def test_a_crafted_stream_that_expands_hugely_is_refused_without_filling_the_memory():
    bomb = brotli.compress(bytes(1 << 30), quality=1)  # 1 GiB of zeros in about 200 KB
    assert len(bomb) < 250_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InputError, match=r"^bomb.ptz: decompresses to more than 2000000 bytes"):
        decode_artifact(with_checksum(bomb), "bomb.ptz", 2_000_000)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: far below 1 GiB


def test_the_limit_is_what_a_valid_artifact_of_the_model_can_hold(tiny_artifact):
    hp = tiny_hp()
    config = ModelConfig.from_settings(hp)
    params = sum(p.numel() for p in tiny_model(hp).parameters())
    assert 4 * params < body_limit(config) < 4 * params + 2**20
    load_quantized_model(config, tiny_artifact.read_bytes(), "m.ptz", Runtime())  # a real one fits well inside


@pytest.mark.parametrize("header, reason", [
    ([], "the header is list, expected dict"),
    ({"tensors": {"x": 1}, "meta": {}}, "the tensor list is dict, expected list"),
    ({"tensors": [["x"]], "meta": {}}, "a tensor entry is ['x'], expected [name, storage, shape]"),
    ({"tensors": [{"name": "x"}], "meta": {}}, "a tensor entry is {'name': 'x'}, expected [name, storage, shape]"),
    ({"tensors": [], "meta": []}, "the metadata is list, expected dict"),
    ({"tensors": []}, "the metadata is NoneType, expected dict"),
    ({"tensors": [[5, "float16", [2]]], "meta": {}}, "a tensor name is int, expected str"),
    ({"tensors": [["x", 16, [2]]], "meta": {}}, "x's storage is int, expected str"),
    ({"tensors": [["x", "float16", "2"]], "meta": {}}, "x's shape is str, expected list"),
    ({"tensors": [["x", "float16", [True, 2]]], "meta": {}}, "x's shape is bool, expected int"),
    ({"tensors": [["x", "bfloat17", [2]]], "meta": {}}, "'bfloat17'"),
], ids=["list_header", "dict_tensors", "short_entry", "dict_entry", "list_meta", "no_meta", "int_name", "int_storage",
        "string_shape", "bool_dimension", "unknown_dtype"])
def test_metadata_of_the_wrong_types_is_one_line_that_names_it(header, reason):
    body = json.dumps(header).encode()
    payload = b"" if not isinstance(header, dict) or not header.get("tensors") else bytes(4)
    blob = with_checksum(brotli.compress(len(body).to_bytes(4, "little") + body + payload))
    with pytest.raises(InputError) as caught:
        decode_artifact(blob, "crafted.ptz", 10**6)
    assert str(caught.value) == f"crafted.ptz: corrupt ({reason})"


def test_an_artifact_that_does_not_fit_the_model_is_one_line_that_names_it(tiny_artifact):
    config = ModelConfig.from_settings(tiny_hp())
    tensors, meta = decode_artifact(tiny_artifact.read_bytes(), "tiny", body_limit(config))
    del tensors["smear.gate"]
    blob = encode_artifact(tensors, meta)
    with pytest.raises(InputError) as caught:
        load_quantized_model(config, blob, "m.ptz", Runtime())
    assert str(caught.value) == "m.ptz: tensors do not fit the model ('smear.gate')"
    with pytest.raises(InputError) as caught:
        load_quantized_model(config, b"junk", "m.ptz", Runtime())
    assert str(caught.value) == "m.ptz: not a parameter-golf artifact (bad magic)"


@pytest.mark.parametrize("loops", ["0", "1"])
def test_a_loaded_model_loops_when_its_settings_loop(loops):
    hp = tiny_hp(PROFILE="pr1493", NUM_LAYERS="4", LOOP_START="1", LOOP_END="2", NUM_LOOPS=loops, XSA_LAST_N="4",
                 BIGRAM_VOCAB_SIZE="0", VOCAB_SIZE="1024", TOKENIZER_PATH=str(TOKENIZER))
    model = tiny_model(hp)
    tensors, schemes, _ = quantize_state(hp, model.state_dict(), identity_hessians(hp), Runtime())
    blob = encode_artifact(tensors, {"schemes": schemes, "model": model.config.function_fields()})
    assert load_quantized_model(model.config, blob, "m.ptz", Runtime()).looping is (loops == "1")


@pytest.mark.parametrize("meta", [{"schemes": [], "model": {}}, {"schemes": {}, "model": 3}, {}])
def test_an_artifact_without_the_model_or_schemes_is_one_line(meta):
    config = ModelConfig.from_settings(tiny_hp())
    with pytest.raises(InputError, match=r"crafted.ptz: corrupt \(the metadata lacks"):
        load_quantized_model(config, encode_artifact({}, meta), "crafted.ptz", Runtime())


def test_a_run_writes_beside_a_file_another_run_wrote_after_it_started(tmp_path):
    path = tmp_path / "final_model.int6.ptz"
    hp = tiny_hp(ARTIFACT_PATH=str(path))
    logged = []
    runtime = Runtime()
    runtime.log = lambda message, console=True: logged.append(message)
    assert artifact_target(hp, file_signature(path), "run1", runtime) == path  # nothing there: its own path
    path.write_bytes(b"an earlier run's")
    seen = file_signature(path)
    assert artifact_target(hp, seen, "run1", runtime) == path  # there at start: replaced, as the start said
    path.write_bytes(b"another run's, written meanwhile")
    assert artifact_target(hp, seen, "run1", runtime) == tmp_path / "final_model.int6.run1.ptz"
    assert "was written by another process after this run started" in logged[-1]


def test_a_replaced_artifact_is_noticed(tmp_path):
    path = tmp_path / "m.ptz"
    path.write_bytes(b"mine")
    report = ArtifactReport(path=path, blob=b"mine", code_bytes=1)
    assert not report.replaced()
    path.write_bytes(b"theirs")
    assert report.replaced()
    path.unlink()
    assert report.replaced()


@pytest.fixture
def calibration_data(smoke_corpus):
    return {"DATA_PATH": str(smoke_corpus), "TRAIN_BATCH_TOKENS": "512", "GPTQ_CALIB_SAMPLES": "1"}


def test_export_writes_what_it_scores_and_says_where(tmp_path, calibration_data):
    hp = tiny_hp(**calibration_data)
    lines = []
    runtime = Runtime()
    runtime.log = lambda message, console=True: lines.append(message)
    model = tiny_model(hp)
    report = export_artifact(hp, model, runtime, tmp_path / "m.ptz")
    blob = (tmp_path / "m.ptz").read_bytes()
    assert blob == report.blob and report.path == tmp_path / "m.ptz" and runtime.stage == "during quantisation"
    assert 0 < report.calibration_seconds < 60 and report.code_bytes == running_code().shipped_bytes
    inputs = len(collect_hessians(hp, model, Runtime()))
    assert lines[:2] == ["gptq:calibrating with 1 batches (training data)...",
                         f"gptq:calibrated {inputs} layer inputs in {report.calibration_seconds:.1f}s"]
    _, meta = decode_artifact(blob, "m.ptz", body_limit(model.config))
    assert meta["model"] == model.config.function_fields()
    quantised = sum(scheme != "fp16" for scheme in meta["schemes"].values())
    seconds = re.fullmatch(rf"gptq_quantize: 12 GPTQ matrices, {quantised - 12} rounded per row, ([\d.]+)s in all", lines[2])
    assert report.calibration_seconds <= float(seconds.group(1)) + 0.05 < 60
    assert lines[3:] == [f"Serialized model int6+brotli: {len(blob)} bytes", f"Code size: {report.code_bytes} bytes",
                         f"Total submission size int6+brotli: {len(blob) + report.code_bytes} bytes",
                         f"artifact: {tmp_path / 'm.ptz'} sha256:{hashlib.sha256(blob).hexdigest()[:16]}"]


def test_an_artifact_over_the_limit_says_by_how_much(tmp_path, calibration_data, monkeypatch):
    monkeypatch.setattr(artifact_module, "SIZE_LIMIT_BYTES", 1000)
    lines = []
    runtime = Runtime()
    runtime.log = lambda message, console=True: lines.append(message)
    hp = tiny_hp(**calibration_data)
    report = export_artifact(hp, tiny_model(hp), runtime, tmp_path / "m.ptz")
    assert report.over_limit and lines[-2] == (f"SIZE LIMIT EXCEEDED: {report.total_bytes} bytes is {report.total_bytes - 1000} bytes "
                                               "over the 1000 limit; this run cannot be submitted (exit status 1)")


def test_non_finite_weights_are_never_exported(tmp_path, calibration_data):
    hp = tiny_hp(**calibration_data)
    model = tiny_model(hp)
    with torch.no_grad():
        model.skip_weights.fill_(float("nan"))
    with pytest.raises(RunError, match=r"the trained weights hold NaN or infinite values \(skip_weights\); nothing was exported"):
        export_artifact(hp, model, Runtime(), tmp_path / "m.ptz")
    assert list(tmp_path.iterdir()) == []


def test_weights_that_overflow_float16_are_never_exported(tmp_path, calibration_data):
    hp = tiny_hp(**calibration_data)
    model = tiny_model(hp)
    (tmp_path / "m.ptz").write_bytes(b"an earlier run's artifact")
    with torch.no_grad():
        model.skip_weights.fill_(1e6)
    with pytest.raises(RunError, match=r"the trained weights do not fit the artifact \(skip_weights overflows float16\)"):
        export_artifact(hp, model, Runtime(), tmp_path / "m.ptz")
    assert (tmp_path / "m.ptz").read_bytes() == b"an earlier run's artifact"


def test_a_failed_artifact_write_is_one_line_and_leaves_nothing(tmp_path, calibration_data, monkeypatch):
    def full_disk(descriptor):
        raise OSError(28, "No space left on device")

    hp = tiny_hp(**calibration_data)
    model = tiny_model(hp)
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(RunError, match=r"m.ptz: cannot write \(No space left on device\); nothing was written"):
        export_artifact(hp, model, Runtime(), tmp_path / "m.ptz")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("values", [
    [0, 1, -7, 7, 3], [8, -8, 0, 127, -127, 5], list(range(-31, 32)), [], [4], [-128, 127, 0, 0],
], ids=["near_odd", "escapes", "whole_int6_grid", "empty", "one", "int8_extremes"])
def test_value_pairs_round_trip_exactly(values):
    array = np.array(values, dtype=np.int8)
    encoded = encode_pairs(array)
    decoded, used = decode_pairs(memoryview(encoded + b"trailing"), len(values))
    assert used == len(encoded) and decoded.dtype == np.int8 and decoded.tolist() == values
    decoded, used = decode_pairs(memoryview(encoded), len(values))  # the last tensor of a payload
    assert used == len(encoded) and decoded.tolist() == values


def test_values_up_to_the_pair_radius_share_a_byte_and_one_past_it_escapes():
    # (first + 7) * 15 + second + 7, an odd count padded with a 0; 225 marks a pair that follows as two bytes
    assert encode_pairs(np.array([7, -7, -7, 7, 0], dtype=np.int8)) == bytes([14 * 15 + 0, 0 * 15 + 14, 7 * 15 + 7])
    assert encode_pairs(np.array([8, 0, 1, -8], dtype=np.int8)) == bytes([225, 225, 8, 0, 1, 248])


def test_sdclip_grids_are_stored_in_pairs_and_wide_grids_as_bytes():
    generator = torch.Generator().manual_seed(0)
    narrow = torch.clamp(torch.round(torch.randn(512, 256, generator=generator) * 31 / 12.85), -31, 31).to(torch.int8)
    wide = torch.randint(-31, 32, (512, 256), generator=generator, dtype=torch.int8)
    assert storage_of(narrow) == "int8pairs" and storage_of(wide) == "int8" and storage_of(narrow[:256]) == "int8"
    assert storage_of(torch.zeros(3).half()) == "float16"
    blob = encode_artifact({"narrow": narrow, "wide": wide, "scale": torch.rand(64).half()}, {})
    tensors, _ = decode_artifact(blob, "m.ptz", 10**7)
    assert torch.equal(tensors["narrow"], narrow) and torch.equal(tensors["wide"], wide)
    plain = len(brotli.compress(narrow.numpy().tobytes(), quality=11))
    assert len(brotli.compress(encode_pairs(narrow.numpy()), quality=11)) < plain  # the point of pairs


@pytest.mark.parametrize("chunk, message", [(bytes([226, 0]), "a pair code beyond the escape code"),
                                           (bytes([225, 3]), "the escaped pairs run past the payload"),
                                           (bytes([1]), "paired values lie outside the payload")],
                         ids=["bad_code", "short_side_stream", "short_codes"])
def test_crafted_pairs_are_refused(chunk, message):
    blob = forged_blob([["x", "int8pairs", [4]]], chunk)
    with pytest.raises(InputError) as caught:
        decode_artifact(blob, "forged.ptz", 10**6)
    assert str(caught.value) == f"forged.ptz: corrupt ({message})"


def test_hessians_are_the_mean_input_products_over_the_calibration_batches(calibration_data):
    """Three micro-batches, two steps of two micro-steps: the second step's last one unused."""
    hp = tiny_hp(**{**calibration_data, "GPTQ_CALIB_SAMPLES": "3"})
    model, runtime = tiny_model(hp), Runtime(accum_steps=2)
    hessians = collect_hessians(hp, model, runtime)
    assert all(block.attn.captured is None and block.mlp.captured is None for block in model.blocks) and model.training
    sampler, by_hand = make_sampler(hp, runtime), {}
    micro_batches = sampler.next_step(runtime) + sampler.next_step(runtime)
    assert len(micro_batches) == 4
    for inputs, _ in micro_batches[:3]:
        records = model.capture_inputs(True)
        with torch.no_grad():
            model.forward_hidden(inputs)
        for layer, (attention, mlp) in enumerate(records):
            for key, (x,) in {**attention, **mlp}.items():
                x = x.flatten(0, -2)
                by_hand[f"blocks.{layer}.{key}"] = by_hand.get(f"blocks.{layer}.{key}", 0) + x.T @ x / x.size(0) / 3
    model.capture_inputs(False)
    assert hessians.keys() == by_hand.keys()
    assert all(torch.allclose(hessians[name], by_hand[name], rtol=1e-5, atol=1e-7) for name in by_hand)
