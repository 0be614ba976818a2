"""Training and evaluation throughput of the trainer on whatever device is present.

    python tools/bench.py                      # the default 27M model (meant for a CUDA GPU)
    python tools/bench.py --tiny --steps 3     # the embedded default's small model (any CPU)

Runs full optimiser steps (TRAIN_BATCH_TOKENS per step, gradient accumulation as on
one rank of an 8-GPU run times 8 / world size) on random tokens, then sliding-window
evaluation with and without SLOT over a fixed number of windows, and prints one table:
ms per step, tokens/s, model FLOP utilisation against --peak-tflops, peak memory, and
ms per evaluation window. Settings come from the environment as for train_gpt.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import train_gpt  # noqa: E402
from train_gpt import torch  # noqa: E402


def flops_per_token(hp: train_gpt.Hyperparameters, model: train_gpt.GPT) -> float:
    """6 x matmul parameters (tied head included) + causal attention, forward and backward."""
    matmul_params = sum(p.numel() for name, p in model.named_parameters() if name in train_gpt.BANK_NAMES)
    matmul_params += model.tok_emb.weight.numel()
    return 6 * matmul_params + 6 * hp.num_layers * hp.train_seq_len * hp.model_dim


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(hp, model, runtime, steps: int, warmup: int) -> float:
    """Seconds per optimiser step, after `warmup` untimed steps (compilation happens there)."""
    accum = hp.grad_accum_steps or 8
    train_model = train_gpt.compile_if_enabled(hp, model, runtime)
    optimizers = train_gpt.build_optimizers(hp, model, runtime.device)
    rows = hp.train_batch_tokens // hp.train_seq_len // accum
    generator = torch.Generator().manual_seed(0)
    batches = [(tokens[:, :-1], tokens[:, 1:]) for tokens in
               (torch.randint(0, hp.vocab_size, (rows, hp.train_seq_len + 1), generator=generator).to(runtime.device)
                for _ in range(accum))]
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(runtime.device)
            started = time.perf_counter()
        train_gpt.train_step(train_model, optimizers, batches, hp, runtime)
    synchronize(runtime.device)
    return (time.perf_counter() - started) / steps


def time_evaluation(hp, model, runtime, windows: int, slot: bool) -> float:
    """Seconds per sliding window (a first call warms up and compiles)."""
    tokens = torch.randint(0, hp.vocab_size, (hp.eval_seq_len + windows * hp.eval_stride + 1,))
    token_bytes = train_gpt.TokenBytes(*(torch.ones(hp.vocab_size, dtype=dtype, device=runtime.device)
                                         for dtype in (torch.int64, torch.bool, torch.bool)))
    short = tokens[: hp.eval_seq_len + hp.eval_batch_seqs * hp.eval_stride + 1]
    train_gpt.evaluate_sliding(model, short, hp, token_bytes, runtime, slot)
    result = train_gpt.evaluate_sliding(model, tokens, hp, token_bytes, runtime, slot)
    return result.seconds / (windows + 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the embedded default's small model (SMOKE=1)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--eval-windows", type=int, default=512)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of one GPU (H100 SXM: 989)")
    args = parser.parse_args()
    hp = train_gpt.Hyperparameters.from_env({"SMOKE": "1"} if args.tiny else None)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    runtime = train_gpt.Runtime(device=device)
    if device.type == "cuda":
        train_gpt.enable_flash_attention_3(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    model = train_gpt.build_model(hp).to(device)
    step_seconds = time_training(hp, model, runtime, args.steps, args.warmup)
    peak_mib = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    tokens_per_second = hp.train_batch_tokens / step_seconds
    utilisation = flops_per_token(hp, model) * tokens_per_second / (args.peak_tflops * 1e12)
    plain = time_evaluation(hp, model, runtime, args.eval_windows, slot=False)
    with_slot = time_evaluation(hp, model, runtime, args.eval_windows, slot=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    attention = "flash_attention_3" if train_gpt.FLASH_ATTENTION_3 is not None else "sdpa"
    print(f"device: {name}, torch {torch.__version__}, attention {attention}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, {hp.train_batch_tokens:,} tokens per step")
    print(f"| {'ms/step':>9} | {'tokens/s':>11} | {'MFU':>6} | {'peak MiB':>9} | {'eval ms/window':>14} | {'+SLOT ms/window':>15} |")
    print(f"| {1000 * step_seconds:9.1f} | {tokens_per_second:11,.0f} | {utilisation:6.1%} | {peak_mib:9.0f} | "
          f"{1000 * plain:14.2f} | {1000 * with_slot:15.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
