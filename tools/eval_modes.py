"""Evaluate one artifact with plain sliding windows and each SLOT mode, side by side.

    python tools/eval_modes.py final_model.int6.ptz            # settings from the environment
    SMOKE=1 python tools/eval_modes.py final_model.int6.ptz    # the embedded default's settings

Uses the same settings as the run that wrote the artifact (set the same variables) and
prints one line per mode with BPB, the change against plain sliding, and eval time.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import train_gpt  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--modes", default="off,window,batch_causal,shared", help="comma-separated; off = no SLOT")
    args = parser.parse_args()
    try:
        hp = train_gpt.Hyperparameters.from_env()
        runtime = train_gpt.Runtime(device=train_gpt.torch.device("cuda" if train_gpt.torch.cuda.is_available() else "cpu"))
        data = train_gpt.load_data(hp, runtime)
        model = train_gpt.load_quantized_model(hp, args.artifact, runtime)
    except (train_gpt.ConfigError, train_gpt.DataError, train_gpt.ArtifactError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    baseline = None
    print(f"{'mode':<14} {'val_bpb':>11} {'vs plain':>10} {'eval_time':>10}")
    for mode in args.modes.split(","):
        settings = dataclasses.replace(hp, slot_mode=mode if mode != "off" else hp.slot_mode)
        result = train_gpt.evaluate_sliding(model, data.val_tokens, settings, data.token_bytes, runtime, slot=mode != "off")
        baseline = result.bpb if baseline is None else baseline
        causal = "not causal" if mode == "shared" else ""
        print(f"{mode:<14} {result.bpb:>11.6f} {result.bpb - baseline:>+10.6f} {result.seconds:>9.1f}s {causal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
