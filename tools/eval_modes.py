"""Evaluate one artifact with plain sliding windows and each SLOT mode, side by side.

    python tools/eval_modes.py final_model.int6.ptz            # settings from the environment
    SMOKE=1 python tools/eval_modes.py final_model.int6.ptz    # the embedded default's settings

Uses the settings of the run that wrote the artifact (set the same variables) and prints
one line per mode with BPB, the change against plain sliding, and the evaluation time.
`shared` is the reference's SLOT, which leaks future tokens: for comparison only.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import repo  # noqa: F401  (puts src/ on the path)
import trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--modes", default="off,window,batch_causal,shared", help="comma-separated; off = no SLOT")
    args = parser.parse_args(argv)
    try:
        hp = trainer.Hyperparameters.from_env()
        runtime = trainer.start_runtime(hp)
        data = trainer.load_data(hp, runtime)
        model = trainer.load_quantized_model(trainer.ModelConfig.from_settings(hp), args.artifact, runtime)
    except (trainer.ConfigError, trainer.DataError, trainer.ArtifactError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    baseline = None
    print(f"{'mode':<14} {'val_bpb':>11} {'vs plain':>10} {'eval_time':>10}")
    for mode in args.modes.split(","):
        settings = dataclasses.replace(hp, slot_mode=mode if mode != "off" else hp.slot_mode)
        result = trainer.evaluate_sliding(model, data, settings, runtime, slot=mode != "off")
        baseline = result.bpb if baseline is None else baseline
        legal = "" if mode == "off" or mode in trainer.LEGAL_SLOT_MODES else "not causal"
        print(f"{mode:<14} {result.bpb:>11.6f} {result.bpb - baseline:>+10.6f} {result.seconds:>9.1f}s {legal}")
    runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
