"""How many bytes an artifact's tensors take under different serialisations.

    python tools/compression_report.py final_model.int6.ptz            # settings from the environment
    SMOKE=1 python tools/compression_report.py final_model.int6.ptz    # the smoke run's settings

Decodes the artifact (never to more bytes than an artifact of the settings' model can
hold) and compresses its payload, as the trainer lays it out (byte-shuffled, int6 grids in
pairs) and as the raw tensors, with several brotli settings (and LZMA for comparison), one
line per setting. The artifact format itself is fixed in src/trainer/artifact.py; this
tool measures the choice.
"""

from __future__ import annotations

import argparse
import lzma
import sys
import time
from pathlib import Path

import brotli

from trainer.artifact import artifact_payload, body_limit, read_artifact
from trainer.model import ModelConfig
from trainer.settings import Hyperparameters, InputError

SETTINGS = [("brotli q11 lgwin=24 (the trainer's)", lambda data: brotli.compress(data, quality=11, lgwin=24)),
            ("brotli q11 lgwin=22", lambda data: brotli.compress(data, quality=11, lgwin=22)),
            ("brotli q11 lgwin=24 lgblock=24", lambda data: brotli.compress(data, quality=11, lgwin=24, lgblock=24)),
            ("lzma preset 9e", lambda data: lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    args = parser.parse_args(argv)
    try:
        limit = body_limit(ModelConfig.from_settings(Hyperparameters.from_env()))
        tensors, _ = read_artifact(args.artifact, limit)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    laid_out, raw = (artifact_payload(tensors, shuffle)[1] for shuffle in (True, False))
    print(f"{args.artifact}: {args.artifact.stat().st_size} bytes as written; raw tensors {len(raw)} bytes")
    print(f"{'setting':<36} {'laid out':>10} {'raw':>10} {'seconds':>8}")
    for name, compress in SETTINGS:
        started = time.perf_counter()
        size = len(compress(laid_out))
        seconds = time.perf_counter() - started
        print(f"{name:<36} {size:>10} {len(compress(raw)):>10} {seconds:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
