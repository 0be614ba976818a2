"""Artifact: GPTQ quantisation, the file format, the 16 MB accounting, export and load.

What is submitted is the artifact (the quantised weights) plus the bytes of the shipped
train_gpt.py, together at most SIZE_LIMIT_BYTES. The artifact's bytes are written once
and scored from memory, so a run scores exactly what it wrote.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import brotli
import numpy as np
import torch
from torch import Tensor

from trainer.data import make_sampler
from trainer.files import file_sha256, write_atomic
from trainer.model import GPT, ModelConfig
from trainer.optimizer import BANK_NAMES
from trainer.runtime import Runtime
from trainer.settings import SIZE_LIMIT_BYTES, Hyperparameters, InputError, RunError

# The code's identity: the pack step (tools/pack.py) writes the readable source's hash
# into SOURCE_SHA256 of the shipped file; run from the readable source, the trainer
# packs itself the same way to know what it would ship.
SOURCE_SHA256 = ""


class CodeIdentity(NamedTuple):
    source_sha256: str  # the readable source (src/trainer/*.py, in reading order)
    shipped_sha256: str  # the shipped train_gpt.py
    shipped_bytes: int  # what counts against the 16 MB


@functools.cache
def running_code() -> CodeIdentity:
    """The identity of the code now running, whichever form it runs in."""
    if SOURCE_SHA256:  # the shipped file: it is this very file
        shipped = Path(__file__).read_bytes()
        return CodeIdentity(SOURCE_SHA256, hashlib.sha256(shipped).hexdigest(), len(shipped))
    from tools.pack import pack_trainer  # the readable source: what the pack step would make of it

    source_sha256, shipped_text = pack_trainer()
    shipped = shipped_text.encode()
    return CodeIdentity(source_sha256, hashlib.sha256(shipped).hexdigest(), len(shipped))


# GPTQ. Two records' ways of choosing a row's scale, and a finer variant of the first:
# - PR #1217: the best of five clip quantiles by plain squared error, scales floored at 1/N
#   (coarse grids for small rows, much of why its artifact compresses to ~4.5 bits per
#   weight), H damped by 1% at calibration and by 1% again inside each matrix;
# - GPTQ_FINE_SCALES=1: the same search with no floor, one damping, Hessian-weighted error;
# - PR #1493, SDClip (MATRIX_CLIP_SIGMAS / EMBED_CLIP_SIGMAS > 0): one scale per row, k times
#   the row's standard deviation over the grid's half-width, no floor, H damped once.
CLIP_QUANTILES = (0.999, 0.9995, 0.9999, 0.99999, 1.0)


@dataclass(frozen=True)
class ClipRule:
    sigmas: float = 0.0  # > 0: SDClip at this many standard deviations
    fine: bool = False  # the quantile search without floor, damped once, by Hessian-weighted error


def row_scales(weight: Tensor, quantile: float, clip_range: int, floor: bool) -> Tensor:
    """float32 per-row scales putting the row's |w| quantile on the grid edge, inside fp16's
    range (stored as fp16, a scale is never 0 or inf)."""
    magnitude = weight.abs()
    clip = magnitude.amax(dim=1) if quantile >= 1.0 else torch.quantile(magnitude, quantile, dim=1)
    return (clip / clip_range).clamp(1.0 / clip_range if floor else 2.0**-24, 65504.0)


def sdclip_scales(weight: Tensor, sigmas: float, clip_range: int) -> Tensor:
    """fp16 per-row scales k * std(row) / N (the unbiased std, as the record takes it)."""
    return (sigmas * weight.std(dim=1) / clip_range).clamp_min(1e-10).to(torch.float16)


def round_to_grid(weight: Tensor, scale: Tensor, clip_range: int) -> Tensor:
    return torch.clamp(torch.round(weight / scale.float()[:, None]), -clip_range, clip_range).to(torch.int8)


def dequantize_rows(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale.float()[:, None]


def squared_error(weight: Tensor, q: Tensor, scale: Tensor) -> float:
    return float((weight - dequantize_rows(q, scale)).square().sum())


def hessian_error(weight: Tensor, q: Tensor, scale: Tensor, hessian: Tensor) -> float:
    """tr(E H E^T) with E = W - dequant(Q): the loss increase GPTQ minimises."""
    error = weight - dequantize_rows(q, scale)
    return float(((error @ hessian) * error).sum())


def quantize_rows_int6(weight: Tensor, clip_range: int = 31, floor: bool = True) -> tuple[Tensor, Tensor]:
    """Per-row rounding; the clip quantile with the lowest squared error wins."""
    candidates = [(round_to_grid(weight, scale, clip_range), scale)
                  for scale in (row_scales(weight, quantile, clip_range, floor).half() for quantile in CLIP_QUANTILES)]
    return min(candidates, key=lambda candidate: squared_error(weight, *candidate))


def quantize_rows_int8(weight: Tensor, floor: bool = True, quantile: float = 0.9999984) -> tuple[Tensor, Tensor]:
    scale = row_scales(weight, quantile, 127, floor)  # as the record: rounded with the float32 scale, stored as fp16
    return round_to_grid(weight, scale, 127), scale.half()


def gptq_quantize(weight: Tensor, hessian: Tensor, clip_range: int = 31, rule: ClipRule = ClipRule(),
                  block_size: int = 128) -> tuple[Tensor, Tensor, bool]:
    """GPTQ (Frantar et al. 2023) to rows on the [-clip_range, clip_range] grid; returns
    (q, scale, whether GPTQ was used). `hessian` is the mean X^T X of the layer's inputs.

    Columns go in order of decreasing H diagonal; each column's rounding error is fed
    forward to the columns not yet quantised through the upper Cholesky factor of H^-1.
    If H is not positive definite, plain per-row rounding.
    """
    weight, hessian = weight.float(), hessian.float()
    if not rule.sigmas:  # the PR #1217 record damps every Hessian once at calibration
        hessian = hessian + 0.01 * hessian.diagonal().mean().clamp_min(1e-8) * torch.eye(len(hessian), device=hessian.device)
    hessian = hessian.clone()
    dead = hessian.diagonal() == 0  # inputs that never fire: any value is free
    hessian[dead, dead] = 1.0
    if not rule.fine:
        hessian.diagonal().add_(0.01 * hessian.diagonal().mean())
    scales = [sdclip_scales(weight, rule.sigmas, clip_range)] if rule.sigmas else \
        [row_scales(weight, quantile, clip_range, floor=not rule.fine).half() for quantile in CLIP_QUANTILES]
    order = torch.argsort(hessian.diagonal(), descending=True)
    permuted_h = hessian[order][:, order]
    try:
        upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(permuted_h)), upper=True)
    except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
        upper = None
    if upper is None or not torch.isfinite(upper).all():
        if rule.sigmas:
            return round_to_grid(weight, scales[0], clip_range), scales[0], False
        return (*quantize_rows_int6(weight, clip_range, floor=not rule.fine), False)
    permuted_w = weight[:, order].clone()
    permuted_w[:, dead[order]] = 0
    inverse_order = torch.argsort(order)
    candidates = [(gptq_columns(permuted_w, upper, scale, clip_range, block_size)[:, inverse_order], scale) for scale in scales]
    error = (lambda c: hessian_error(weight, *c, hessian)) if rule.fine else (lambda c: squared_error(weight, *c))
    return (*min(candidates, key=error), True)


def gptq_columns(weight: Tensor, upper: Tensor, scale: Tensor, clip_range: int, block_size: int) -> Tensor:
    """The GPTQ sweep over (already permuted) columns, in blocks with lazy updates."""
    work = weight.clone()
    q = torch.zeros_like(work, dtype=torch.int8)
    scale_f = scale.float()
    for start in range(0, work.size(1), block_size):
        end = min(start + block_size, work.size(1))
        block = work[:, start:end].clone()
        errors = torch.zeros_like(block)
        for j in range(end - start):
            column = block[:, j]
            rounded = torch.clamp(torch.round(column / scale_f), -clip_range, clip_range)
            q[:, start + j] = rounded.to(torch.int8)
            errors[:, j] = (column - rounded * scale_f) / upper[start + j, start + j]
            block[:, j:] -= errors[:, j : j + 1] * upper[start + j, start + j : end][None, :]
        work[:, end:] -= errors @ upper[start:end, end:]
    return q

# Artifact format: magic, CRC-32 of the brotli stream (brotli has no checksum, so a
# flipped byte could otherwise decode to other weights), then brotli (quality 11, a 16 MiB
# window) of [4-byte header length][JSON header][payload]. The header lists each tensor as
# [name, storage, shape]; the tensors lie back to back in that order over the whole
# payload, the one-byte ones first (all the quantised values together compress better).
# Storage is the dtype, multi-byte tensors byte-shuffled (all first bytes, then all second
# bytes...), which groups the similar high bytes of fp16 values; or "int8pairs": int8
# values mostly in [-7, 7] (SDClip's int6 grids) coded two to a byte, as 15 x 15 = 225
# codes plus an escape code 225 whose two values follow in a side stream. Brotli codes a
# byte in a whole number of bits; a pair spreads that rounding over two values, which saves
# about 0.8% of the int6 bytes (measured: ~93 KB on the PR #1493 shapes). Loading never
# runs code.
ARTIFACT_MAGIC = b"PGOLF2\n"
ARTIFACT_DTYPES = {"int8": torch.int8, "float16": torch.float16, "float32": torch.float32, "int8pairs": torch.int8}
PAIR_RADIUS = 7
PAIR_LEVELS = 2 * PAIR_RADIUS + 1
PAIR_ESCAPE = PAIR_LEVELS**2
PAIR_MAX_ESCAPES = 0.01  # beyond this share of escaped pairs, plain int8 is smaller
SMALL_TENSOR_NUMEL = 65_536  # tensors this small: no pairs; other than block matrices, stored as fp16


def byte_shuffle(raw: bytes, width: int) -> bytes:
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, width).T.tobytes() if width > 1 else raw


def byte_unshuffle(raw: bytes, width: int) -> bytes:
    return np.frombuffer(raw, dtype=np.uint8).reshape(width, -1).T.tobytes() if width > 1 else raw


def value_pairs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first, second, both within PAIR_RADIUS) of consecutive values, padded with a 0."""
    flat = np.append(values.astype(np.int16).ravel(), [0] * (values.size % 2))
    first, second = flat[0::2], flat[1::2]
    return first, second, (np.abs(first) <= PAIR_RADIUS) & (np.abs(second) <= PAIR_RADIUS)


def encode_pairs(values: np.ndarray) -> bytes:
    first, second, near = value_pairs(values)
    codes = np.where(near, (first + PAIR_RADIUS) * PAIR_LEVELS + second + PAIR_RADIUS, PAIR_ESCAPE).astype(np.uint8)
    return codes.tobytes() + np.stack([first[~near], second[~near]], 1).astype(np.int8).tobytes()


def decode_pairs(chunk: memoryview, count: int) -> tuple[np.ndarray, int]:
    """`count` int8 values from the start of `chunk`, and how many bytes they took."""
    pairs = (count + 1) // 2
    if pairs > len(chunk):
        raise ValueError("paired values lie outside the payload")
    codes = np.frombuffer(chunk, dtype=np.uint8, count=pairs).astype(np.int16)
    if (codes > PAIR_ESCAPE).any():
        raise ValueError("a pair code beyond the escape code")
    escaped = codes == PAIR_ESCAPE
    side_bytes = 2 * int(escaped.sum())
    if pairs + side_bytes > len(chunk):
        raise ValueError("the escaped pairs run past the payload")
    side = np.frombuffer(chunk, dtype=np.int8, count=side_bytes, offset=pairs).reshape(-1, 2)
    values = np.stack([codes // PAIR_LEVELS - PAIR_RADIUS, codes % PAIR_LEVELS - PAIR_RADIUS], 1)
    values[escaped] = side
    return values.ravel()[:count].astype(np.int8), pairs + side_bytes


def storage_of(tensor: Tensor) -> str:
    """How a tensor is stored: in pairs when that is smaller (many values, few escapes;
    below about 65,536 values the larger code table costs more than pairs save)."""
    if tensor.dtype == torch.int8 and tensor.numel() > SMALL_TENSOR_NUMEL:
        near = value_pairs(tensor.cpu().numpy())[2]
        if 1 - near.mean() <= PAIR_MAX_ESCAPES:
            return "int8pairs"
    return str(tensor.dtype).removeprefix("torch.")


def artifact_payload(tensors: dict[str, Tensor], shuffle: bool = True) -> tuple[list[list], bytes]:
    """The header's tensor entries and the payload bytes."""
    entries, chunks = [], []
    for name, tensor in sorted(tensors.items(), key=lambda item: item[1].element_size()):
        values = tensor.detach().cpu().contiguous().numpy()
        storage = storage_of(tensor) if shuffle else str(tensor.dtype).removeprefix("torch.")
        if storage == "int8pairs":
            chunks.append(encode_pairs(values))
        else:
            chunks.append(byte_shuffle(values.tobytes(), tensor.element_size()) if shuffle else values.tobytes())
        entries.append([name, storage, list(tensor.shape)])
    return entries, b"".join(chunks)


def encode_artifact(tensors: dict[str, Tensor], meta: dict[str, Any]) -> bytes:
    entries, payload = artifact_payload(tensors)
    header = json.dumps({"tensors": entries, "meta": meta}, separators=(",", ":")).encode()
    stream = brotli.compress(len(header).to_bytes(4, "little") + header + payload, quality=11, lgwin=24)
    return ARTIFACT_MAGIC + zlib.crc32(stream).to_bytes(4, "little") + stream


def body_limit(config: ModelConfig) -> int:
    """The most bytes a valid artifact of this model can decompress to: at most 4 bytes per
    parameter (int8 values, fp16 scales and tensors all take less) plus a header of up to
    1 KiB per tensor. A crafted stream that expands further is refused before it can fill
    the memory."""
    with torch.device("meta"):
        model = GPT(config)
    tensors = list(model.parameters())
    return 4 + 4 * sum(t.numel() for t in tensors) + 1024 * (len(tensors) + 64)


def bounded_decompress(stream: bytes, limit: int, source: str) -> bytes:
    """brotli.decompress that stops as soon as the output passes `limit` bytes."""
    decompressor, parts, size = brotli.Decompressor(), [], 0
    chunk = decompressor.process(stream, output_buffer_limit=limit + 1)
    while True:
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            raise InputError(f"{source}: decompresses to more than {limit} bytes, more than any artifact of "
                             "this model can hold (crafted or corrupt)")
        if decompressor.is_finished():
            return b"".join(parts)
        if decompressor.can_accept_more_data():
            raise InputError(f"{source}: truncated or corrupt (the brotli stream ends early)")
        chunk = decompressor.process(b"", output_buffer_limit=limit + 1 - size)


def checked(value: Any, kind: type, what: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{what} is {type(value).__name__}, expected {kind.__name__}")
    return value


def decode_artifact(blob: bytes, source: str, limit: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and metadata of an artifact's bytes; InputError naming `source` for
    anything that is not a well-formed artifact."""
    if not blob.startswith(ARTIFACT_MAGIC):
        raise InputError(f"{source}: not a parameter-golf artifact (bad magic)")
    stream = blob[len(ARTIFACT_MAGIC) + 4:]
    if zlib.crc32(stream).to_bytes(4, "little") != blob[len(ARTIFACT_MAGIC) : len(ARTIFACT_MAGIC) + 4]:
        raise InputError(f"{source}: truncated or corrupt (checksum mismatch)")
    try:
        body = bounded_decompress(stream, limit, source)
    except brotli.error:
        raise InputError(f"{source}: truncated or corrupt (brotli stream does not decode)") from None
    try:
        header_len = int.from_bytes(body[:4], "little")
        header = checked(json.loads(body[4 : 4 + header_len]), dict, "the header")
        payload = memoryview(body)[4 + header_len:]
        tensors, start = {}, 0
        for entry in checked(header.get("tensors"), list, "the tensor list"):
            if not isinstance(entry, list) or len(entry) != 3:
                raise ValueError(f"a tensor entry is {entry!r}, expected [name, storage, shape]")
            name = checked(entry[0], str, "a tensor name")
            storage = checked(entry[1], str, f"{name}'s storage")
            dtype = ARTIFACT_DTYPES[storage]
            shape = [checked(n, int, f"{name}'s shape") for n in checked(entry[2], list, f"{name}'s shape")]
            if min(shape, default=0) < 0:
                raise ValueError(f"tensor {name} has a negative size")
            count = math.prod(shape)
            if storage == "int8pairs":
                values, size = decode_pairs(payload[start:], count)
                tensor = torch.from_numpy(values).reshape(shape)
            else:
                width = torch.empty((), dtype=dtype).element_size()
                size = count * width
                if start + size > len(payload):
                    raise ValueError(f"tensor {name} lies outside the payload")
                raw = bytearray(byte_unshuffle(bytes(payload[start : start + size]), width))
                tensor = torch.frombuffer(raw, dtype=dtype).reshape(shape) if raw else torch.empty(shape, dtype=dtype)
            start += size
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f"tensor {name} holds NaN or infinite values")
            tensors[name] = tensor
        if start != len(payload):
            raise ValueError(f"{len(payload) - start} payload bytes belong to no tensor")
        return tensors, checked(header.get("meta"), dict, "the metadata")
    except (ValueError, KeyError) as error:
        raise InputError(f"{source}: corrupt ({error})") from None


def read_artifact(path: str | Path, limit: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
    try:
        blob = Path(path).read_bytes()
    except OSError as error:
        raise InputError(f"{path}: cannot read artifact ({error.strerror})") from None
    return decode_artifact(blob, str(path), limit)


# Which bank slice is which matrix, and which captured input its Hessian comes from
# (q, k and v read the same input, so they share one Hessian).
BANK_ROLES = {"q": ("qo_bank", 0, "qkv"), "out": ("qo_bank", 1, "out"), "k": ("kv_bank", 0, "qkv"),
              "v": ("kv_bank", 1, "qkv"), "up": ("mlp_up_bank", 0, "up"), "down": ("mlp_down_bank", 0, "down")}

def bank_matrix_names(num_layers: int) -> list[str]:
    return [f"blocks.{layer}.{role}" for layer in range(num_layers) for role in BANK_ROLES]

def matrix_location(name: str, num_layers: int) -> tuple[str, int, str]:
    """(bank, index in the bank, Hessian key) of a matrix name like 'blocks.3.v'."""
    _, layer, role = name.split(".")
    bank, half, source = BANK_ROLES[role]
    return bank, half * num_layers + int(layer), f"blocks.{layer}.{source}"

def unbank(state: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """The state dict with the banks split into one 2-D matrix per layer and role."""
    matrices = {name: tensor for name, tensor in state.items() if name not in BANK_NAMES}
    for name in bank_matrix_names(num_layers):
        bank, index, _ = matrix_location(name, num_layers)
        matrices[name] = state[bank][index]
    return matrices

def rebank(matrices: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    names = bank_matrix_names(num_layers)
    state = {name: tensor for name, tensor in matrices.items() if name not in names}
    slots: dict[str, dict[int, Tensor]] = {bank: {} for bank in BANK_NAMES}
    for name in names:
        bank, index, _ = matrix_location(name, num_layers)
        slots[bank][index] = matrices[name]
    for bank, by_index in slots.items():
        state[bank] = torch.stack([by_index[i] for i in range(len(by_index))])
    return state

HEAD_INPUT = "head"  # the Hessian of the tied head's input: the token table's, for its GPTQ


def collect_hessians(hp: Hyperparameters, model: GPT, runtime: Runtime) -> dict[str, Tensor]:
    """H = mean of X^T X for every linear input (a looped layer's passes added up), over
    GPTQ_CALIB_SAMPLES training micro-batches per rank, averaged over ranks; with
    EMBED_CLIP_SIGMAS also the head's input, for the tied token table."""
    with torch.no_grad():
        sampler = make_sampler(hp, runtime)
        records = model.capture_inputs(True)
        was_training = model.training
        model.eval()
        hessians: dict[str, Tensor] = {}
        batches = 0
        while batches < hp.gptq_calib_samples:
            for inputs, _ in sampler.next_step(runtime)[: hp.gptq_calib_samples - batches]:
                with runtime.autocast():
                    hidden = model.forward_hidden(inputs)
                captured = {f"blocks.{layer}.{key}": passes for layer, (attn_inputs, mlp_inputs) in enumerate(records)
                            for key, passes in {**attn_inputs, **mlp_inputs}.items()}
                if hp.embed_clip_sigmas:
                    captured[HEAD_INPUT] = [hidden]
                for name, passes in captured.items():
                    for x in passes:
                        x = x.float().flatten(0, -2)
                        hessians[name] = hessians.get(name, 0) + x.T @ x / x.size(0)
                for attn_inputs, mlp_inputs in records:
                    attn_inputs.clear()
                    mlp_inputs.clear()
                batches += 1
        model.capture_inputs(False)
        model.train(was_training)
        return {name: runtime.all_reduce_(hessian) / (batches * runtime.world_size) for name, hessian in hessians.items()}


def gptq_jobs(hp: Hyperparameters, matrices: dict[str, Tensor]) -> list[tuple[str, str, int, ClipRule, str]]:
    """(matrix, Hessian, grid half-width, clip rule, scheme) of every matrix GPTQ quantises:
    the block matrices to int6, and the tied token table to int8 with EMBED_CLIP_SIGMAS."""
    jobs = [(name, matrix_location(name, hp.num_layers)[2], hp.quant_clip_range,
             ClipRule(hp.matrix_clip_sigmas, hp.gptq_fine_scales), "int6") for name in bank_matrix_names(hp.num_layers)]
    if hp.embed_clip_sigmas and matrices["tok_emb.weight"].numel() > SMALL_TENSOR_NUMEL:
        jobs.append(("tok_emb.weight", HEAD_INPUT, 127, ClipRule(hp.embed_clip_sigmas), "int8"))
    return jobs


def quantize_state(hp: Hyperparameters, state: dict[str, Tensor], hessians: dict[str, Tensor],
                   runtime: Runtime) -> tuple[dict[str, Tensor], dict[str, str], int]:
    """GPTQ for every block matrix (int6) and, with EMBED_CLIP_SIGMAS, the token table
    (int8); per-row int8 rounding for the other matrices of more than SMALL_TENSOR_NUMEL
    values, fp16 for the rest. The GPTQ matrices are shared out over the ranks and
    broadcast back, so every rank ends with the whole quantised state. Returns tensors,
    scheme per name, and how many matrices GPTQ quantised.

    The records store any tensor of at most SMALL_TENSOR_NUMEL values as fp16, block
    matrices included; at their sizes every block matrix is larger, so the two agree, and
    here small models (the smoke run, the tests) still go through GPTQ."""
    matrices = unbank(state, hp.num_layers)
    tensors: dict[str, Tensor] = {}
    schemes: dict[str, str] = {}
    jobs = gptq_jobs(hp, matrices)
    gptq_used = torch.zeros(len(jobs), device=runtime.device)
    for index, (name, hessian, clip_range, rule, scheme) in enumerate(jobs):
        weight, owner = matrices[name].float(), index % runtime.world_size
        if owner == runtime.rank:
            q, scale, used = gptq_quantize(weight, hessians[hessian], clip_range, rule)
            gptq_used[index] = float(used)
        else:
            q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
            scale = torch.empty(weight.size(0), dtype=torch.float16, device=weight.device)
        runtime.broadcast_(q, owner)
        runtime.broadcast_(scale, owner)
        tensors[f"{name}.q"], tensors[f"{name}.scale"], schemes[name] = q, scale, scheme
    for name, tensor in matrices.items():
        if name in schemes:
            continue
        if tensor.numel() > SMALL_TENSOR_NUMEL and tensor.ndim == 2:
            tensors[f"{name}.q"], tensors[f"{name}.scale"] = quantize_rows_int8(tensor.float(), floor=not hp.gptq_fine_scales)
            schemes[name] = "int8"
        else:
            tensors[name], schemes[name] = tensor.to(torch.float16), "fp16"
    return {k: v.cpu() for k, v in tensors.items()}, schemes, int(runtime.all_reduce_(gptq_used).sum())


def dequantize_state(tensors: dict[str, Tensor], schemes: dict[str, str], num_layers: int) -> dict[str, Tensor]:
    matrices = {}
    for name, scheme in schemes.items():
        if scheme == "fp16":
            matrices[name] = tensors[name].float()
        else:
            matrices[name] = dequantize_rows(tensors[f"{name}.q"], tensors[f"{name}.scale"])
    return rebank(matrices, num_layers)

@dataclass
class ArtifactReport:
    path: Path
    blob: bytes  # what was written, which is what the run scores
    code_bytes: int
    calibration_seconds: float = 0.0  # GPTQ's Hessians: the part of the training budget it reserves

    @property
    def model_bytes(self) -> int:
        return len(self.blob)

    @property
    def total_bytes(self) -> int:
        return self.model_bytes + self.code_bytes

    @property
    def over_limit(self) -> bool:
        return self.total_bytes > SIZE_LIMIT_BYTES

    def replaced(self) -> bool:
        """Whether the file on disk no longer holds what this run wrote (another process
        wrote the same path since)."""
        try:
            return file_sha256(self.path) != hashlib.sha256(self.blob).hexdigest()
        except OSError:
            return True


def file_signature(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime) of a file, None when there is none: tells whether another
    process wrote it since."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def artifact_target(hp: Hyperparameters, seen_at_start: tuple[int, int, int] | None, run_name: str,
                    runtime: Runtime) -> Path:
    """ARTIFACT_PATH, unless another run wrote that file after this run started: then a
    name of this run's own beside it, so neither run replaces the other's artifact."""
    path = Path(hp.artifact_path)
    if file_signature(path) == seen_at_start:
        return path
    own = path.with_name(f"{path.stem}.{run_name}{path.suffix}")
    runtime.log(f"warning: {path} was written by another process after this run started; "
                f"this run writes its artifact to {own} instead")
    return own


def export_artifact(hp: Hyperparameters, model: GPT, runtime: Runtime, target: Path) -> ArtifactReport:
    """Calibrate, quantise, write the artifact (rank 0; every rank gets its bytes) and log
    the 16 MB accounting."""
    runtime.stage = "during quantisation"
    for name, tensor in model.state_dict().items():
        if not torch.isfinite(tensor).all():
            raise RunError(f"the trained weights hold NaN or infinite values ({name}); nothing was exported")
    started = time.perf_counter()
    runtime.log(f"gptq:calibrating with {hp.gptq_calib_samples} batches (training data)...")
    hessians = collect_hessians(hp, model, runtime)
    runtime.synchronize()
    calibration_seconds = time.perf_counter() - started
    runtime.log(f"gptq:calibrated {len(hessians)} layer inputs in {calibration_seconds:.1f}s")
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    tensors, schemes, gptq_count = quantize_state(hp, state, hessians, runtime)
    for name, tensor in tensors.items():  # finite in float32 is not enough: fp16 ends at 65504
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise RunError(f"the trained weights do not fit the artifact ({name} overflows float16); nothing was exported")
    quantised = sum(scheme != "fp16" for scheme in schemes.values())
    runtime.log(f"gptq_quantize: {gptq_count} GPTQ matrices, {quantised - gptq_count} rounded per row, "
                f"{time.perf_counter() - started:.1f}s in all")
    blob = None
    if runtime.is_main:
        blob = encode_artifact(tensors, {"schemes": schemes, "model": model.config.function_fields()})
        write_atomic(target, blob)
    report = ArtifactReport(path=target, blob=runtime.broadcast_bytes(blob, 0), code_bytes=running_code().shipped_bytes,
                            calibration_seconds=calibration_seconds)
    runtime.log(f"Serialized model int6+brotli: {report.model_bytes} bytes")
    runtime.log(f"Code size: {report.code_bytes} bytes")
    runtime.log(f"Total submission size int6+brotli: {report.total_bytes} bytes")
    if report.over_limit:
        runtime.log(f"SIZE LIMIT EXCEEDED: {report.total_bytes} bytes is {report.total_bytes - SIZE_LIMIT_BYTES} bytes "
                    f"over the {SIZE_LIMIT_BYTES} limit; this run cannot be submitted (exit status 1)")
    runtime.log(f"artifact: {target.resolve()} sha256:{hashlib.sha256(report.blob).hexdigest()[:16]}")
    return report


def load_quantized_model(config: ModelConfig, blob: bytes, source: str, runtime: Runtime) -> GPT:
    """A fresh model holding the dequantised artifact: what a submission would evaluate."""
    tensors, meta = decode_artifact(blob, source, body_limit(config))
    stored, expected = meta.get("model"), config.function_fields()
    if not isinstance(stored, dict) or not isinstance(meta.get("schemes"), dict):
        raise InputError(f"{source}: corrupt (the metadata lacks the model's shape or the tensors' schemes)")
    for key, value in expected.items():
        if stored.get(key) != value:
            raise InputError(f"{source}: made with a model whose {key} is {stored.get(key)!r}, "
                             f"but these settings give {value!r}")
    model = GPT(config)
    try:
        model.load_state_dict(dequantize_state(tensors, meta["schemes"], config.num_layers))
    except (KeyError, RuntimeError, ValueError, TypeError) as error:
        raise InputError(f"{source}: tensors do not fit the model ({error})") from None
    model.looping = config.num_loops > 0  # a looped model is evaluated looped, as the PR #1493 record does
    return model.to(runtime.device)
