"""How many bytes the artifact codec needs for a model shaped like the real one.

    python tools/measure_compression.py                  # the full 11-layer model
    python tools/measure_compression.py --layers 2       # a quick look
    python tools/measure_compression.py --clip-choice matrix

Fills every tensor of the default model (27,041,372 parameters) with random Gaussian
values, quantises them as the artifact does (int6 rows for block matrices, int8 rows for
the three tables, fp16 for tensors of at most 65,536 values) and compresses the payload
with each byte-shuffle layout and brotli setting, one line each. Gaussian weights are a
pessimistic stand-in: trained weights have heavier tails, so most rows use fewer grid
levels and compress better; the figures rank settings, they do not predict the artifact.
The codec measured is the draft section src/quant_section.py (kept out of git, like the
other section drafts); once it is pasted into src/train_gpt.py, import that instead.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import brotli
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import quant_section  # noqa: E402

MODEL_DIM, KV_DIM, HIDDEN = 512, 256, 1536
BLOCK_MATRICES = {"q": (MODEL_DIM, MODEL_DIM), "out": (MODEL_DIM, MODEL_DIM), "k": (KV_DIM, MODEL_DIM),
                  "v": (KV_DIM, MODEL_DIM), "up": (HIDDEN, MODEL_DIM), "down": (MODEL_DIM, HIDDEN)}
BLOCK_SMALL = {"resid_mix": (2, MODEL_DIM), "attn_scale": (MODEL_DIM,), "mlp_scale": (MODEL_DIM,),
               "attn.q_gain": (8,)}
TABLES = {"tok_emb.weight": (1024, MODEL_DIM), "bigram.table.weight": (2816, 112),
          "value_embed.table.weight": (1024, 128)}
MODEL_SMALL = {"skip_weights": (5, MODEL_DIM), "skip_gates": (5, MODEL_DIM), "bigram.scale": (),
               "bigram.proj.weight": (MODEL_DIM, 112), "smear.gate": (MODEL_DIM,), "value_embed.scale": (),
               "value_embed.proj.weight": (KV_DIM, 128), "value_embed.layer_scales.0": (1,),
               "value_embed.layer_scales.1": (1,)}

SHUFFLE_LAYOUTS = {
    "none": {"int8": 1, "float16": 1, "float32": 1, "int64": 1},
    "multi-byte (chosen)": quant_section.SHUFFLE_WIDTHS,
    "all, int8 at stride 2": {**quant_section.SHUFFLE_WIDTHS, "int8": 2},
}
BROTLI_SETTINGS = {
    "q11 lgwin=22 (default)": {"quality": 11},
    "q11 lgwin=24": {"quality": 11, "lgwin": 24},
    "q11 lgwin=24 lgblock=24": {"quality": 11, "lgwin": 24, "lgblock": 24},
    "q11 lgwin=24 mode=text": {"quality": 11, "lgwin": 24, "mode": brotli.MODE_TEXT},
    "q11 lgwin=24 mode=font": {"quality": 11, "lgwin": 24, "mode": brotli.MODE_FONT},
}


def synthetic_model(num_layers: int, clip_choice: str, seed: int) -> tuple[dict[str, torch.Tensor], int, float]:
    """Quantised tensors in artifact form, the parameter count, and the int6 relative MSE."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {f"blocks.{layer}.{name}": shape for layer in range(num_layers)
              for name, shape in {**BLOCK_MATRICES, **BLOCK_SMALL}.items()}
    shapes.update(TABLES)
    shapes.update(MODEL_SMALL)
    tensors: dict[str, torch.Tensor] = {}
    squared_error = squared_norm = 0.0
    for name, shape in shapes.items():
        weight = torch.randn(shape, generator=generator)
        if name.split(".")[-1] in BLOCK_MATRICES:
            q, scale = quant_section.quantize_rows_int6(weight, per_row_clip=clip_choice == "row")
            squared_error += float((quant_section.dequantize_rows(q, scale) - weight).square().sum())
            squared_norm += float(weight.square().sum())
            tensors[f"{name}.q"], tensors[f"{name}.scale"] = q, scale
        elif name in TABLES:
            tensors[f"{name}.q"], tensors[f"{name}.scale"] = quant_section.quantize_rows_int8(weight)
        else:
            tensors[name] = weight.to(torch.float16)
    return tensors, sum(math.prod(shape) for shape in shapes.values()), squared_error / squared_norm


def compressed_size(job: tuple[bytes, dict]) -> tuple[int, float]:
    data, settings = job
    started = time.perf_counter()
    return len(brotli.compress(data, **settings)), time.perf_counter() - started


def order0_entropy_bytes(values: np.ndarray) -> float:
    """What a coder that sees each byte alone could reach at best: the bytes' Shannon entropy."""
    counts = np.bincount(values.view(np.uint8), minlength=256).astype(np.float64)
    probabilities = counts[counts > 0] / values.size
    return float(-(probabilities * np.log2(probabilities)).sum() * values.size / 8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=11)
    parser.add_argument("--clip-choice", choices=("row", "matrix"), default="row",
                        help="int6 clip quantile chosen per row (this draft) or per matrix (the reference)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=os.cpu_count())
    args = parser.parse_args()

    tensors, parameters, relative_mse = synthetic_model(args.layers, args.clip_choice, args.seed)
    int6 = np.concatenate([t.numpy().reshape(-1) for name, t in tensors.items()
                           if name.endswith(".q") and name.removesuffix(".q").split(".")[-1] in BLOCK_MATRICES])
    print(f"{args.layers} layers, {parameters:,} parameters, clip chosen per {args.clip_choice}: "
          f"int6 relative MSE {relative_mse:.3e}, int6 values {int6.size:,}, "
          f"order-0 entropy of the int6 values {order0_entropy_bytes(int6):,.0f} bytes")

    bodies = {layout: quant_section.serialize_body(tensors, {}, widths) for layout, widths in SHUFFLE_LAYOUTS.items()}
    print(f"uncompressed body: {len(next(iter(bodies.values()))):,} bytes")
    jobs = [(layout, setting) for layout in SHUFFLE_LAYOUTS for setting in BROTLI_SETTINGS]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = pool.map(compressed_size, [(bodies[layout], BROTLI_SETTINGS[setting]) for layout, setting in jobs])
        print(f"{'byte shuffle':<24} {'brotli':<26} {'bytes':>12} {'seconds':>8}")
        for (layout, setting), (size, seconds) in zip(jobs, results):
            print(f"{layout:<24} {setting:<26} {size:>12,} {seconds:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
