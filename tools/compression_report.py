"""How many bytes an artifact's tensors take under different serialisations.

    python tools/compression_report.py final_model.int6.ptz

Decodes the artifact and re-encodes its tensors with and without byte-shuffling and with
several brotli settings (and LZMA for comparison), printing one line per setting. The
artifact format itself is fixed in src/train_gpt.py; this tool measures the choice.
"""

from __future__ import annotations

import argparse
import lzma
import sys
import time
from pathlib import Path

import brotli

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import train_gpt  # noqa: E402


def payload(tensors: dict, shuffle: bool) -> bytes:
    chunks = []
    for tensor in tensors.values():
        raw = tensor.contiguous().numpy().tobytes()
        chunks.append(train_gpt.byte_shuffle(raw, tensor.element_size()) if shuffle else raw)
    return b"".join(chunks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    args = parser.parse_args()
    try:
        tensors, _ = train_gpt.read_artifact(args.artifact)
    except train_gpt.ArtifactError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.artifact}: {args.artifact.stat().st_size} bytes as written; raw tensors {len(payload(tensors, False))} bytes")
    settings = [("brotli q11 (default window)", lambda data: brotli.compress(data, quality=11)),
                ("brotli q11 lgwin=24", lambda data: brotli.compress(data, quality=11, lgwin=24)),
                ("brotli q11 lgwin=24 mode=generic lgblock=24", lambda data: brotli.compress(data, quality=11, lgwin=24, lgblock=24)),
                ("lzma preset 9e", lambda data: lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))]
    print(f"{'setting':<45} {'shuffled':>10} {'unshuffled':>11} {'seconds':>8}")
    for name, compress in settings:
        started = time.perf_counter()
        shuffled = len(compress(payload(tensors, True)))
        seconds = time.perf_counter() - started
        print(f"{name:<45} {shuffled:>10} {len(compress(payload(tensors, False))):>11} {seconds:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
