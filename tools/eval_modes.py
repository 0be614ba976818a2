"""Evaluate one artifact with plain sliding windows and each SLOT mode, side by side.

    python tools/eval_modes.py final_model.int6.ptz            # settings from the environment
    SMOKE=1 python tools/eval_modes.py final_model.int6.ptz    # the smoke run's settings

Uses the settings of the run that wrote the artifact (set the same variables) and prints
one line per mode with BPB, the change against plain sliding, the evaluation time, and
whether such a score is causal and accepted by the challenge (no SLOT score has been).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.artifact import load_quantized_model
from trainer.evaluation import SLOT_LABELS, evaluate_sliding, score_kind, with_slot
from trainer.main import load_data
from trainer.model import ModelConfig
from trainer.runtime import start_runtime
from trainer.settings import Hyperparameters, InputError


def parse_modes(text: str) -> list[str]:
    modes = [mode.strip() for mode in text.split(",") if mode.strip()]
    unknown = [mode for mode in modes if mode not in SLOT_LABELS]
    if unknown or not modes:
        raise InputError(f"--modes {text!r}: expected a comma-separated list of {', '.join(SLOT_LABELS)}")
    return modes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--modes", default=",".join(SLOT_LABELS), help="comma-separated; off = no SLOT")
    args = parser.parse_args(argv)
    try:
        modes = parse_modes(args.modes)
        blob = args.artifact.read_bytes() if args.artifact.is_file() else None
        if blob is None:
            raise InputError(f"{args.artifact}: no such artifact file")
        hp = Hyperparameters.from_env()
        runtime = start_runtime(hp)
        data = load_data(hp, runtime)
        model = load_quantized_model(ModelConfig.from_settings(hp), blob, str(args.artifact), runtime)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    plain = None
    print(f"{'mode':<14} {'val_bpb':>11} {'vs plain':>10} {'eval_time':>10}  causal accepted")
    for mode in modes:
        without, adapted = evaluate_sliding(model, data, with_slot(hp, mode), runtime)
        plain = without.bpb if plain is None else plain
        result, kind = adapted or without, score_kind(mode)
        print(f"{mode:<14} {result.bpb:>11.6f} {result.bpb - plain:>+10.6f} {result.seconds:>9.1f}s  "
              f"{'yes' if kind.causal else 'no':<6} {'yes' if kind.accepted else 'no'}")
    runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
