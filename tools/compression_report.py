"""How many bytes an artifact's tensors take under different serialisations.

    python tools/compression_report.py final_model.int6.ptz

Decodes the artifact and compresses its payload, byte-shuffled as the trainer writes it
and unshuffled, with several brotli settings (and LZMA for comparison), one line per
setting. The artifact format itself is fixed in src/trainer.py; this tool measures the
choice.
"""

from __future__ import annotations

import argparse
import lzma
import sys
import time
from pathlib import Path

import brotli

import repo  # noqa: F401  (puts src/ on the path)
import trainer

SETTINGS = [("brotli q11 (the trainer's)", lambda data: brotli.compress(data, quality=11)),
            ("brotli q11 lgwin=24", lambda data: brotli.compress(data, quality=11, lgwin=24)),
            ("brotli q11 lgwin=24 lgblock=24", lambda data: brotli.compress(data, quality=11, lgwin=24, lgblock=24)),
            ("lzma preset 9e", lambda data: lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    args = parser.parse_args(argv)
    try:
        tensors, _ = trainer.read_artifact(args.artifact)
    except trainer.ArtifactError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    shuffled, unshuffled = (trainer.artifact_payload(tensors, shuffle)[1] for shuffle in (True, False))
    print(f"{args.artifact}: {args.artifact.stat().st_size} bytes as written; raw tensors {len(unshuffled)} bytes")
    print(f"{'setting':<34} {'shuffled':>10} {'unshuffled':>11} {'seconds':>8}")
    for name, compress in SETTINGS:
        started = time.perf_counter()
        size = len(compress(shuffled))
        seconds = time.perf_counter() - started
        print(f"{name:<34} {size:>10} {len(compress(unshuffled)):>11} {seconds:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
