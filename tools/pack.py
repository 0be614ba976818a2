"""Generate the shipped train_gpt.py from the readable src/train_gpt.py.

    python tools/pack.py           # write train_gpt.py at the repository root
    python tools/pack.py --check   # exit 1 when the root file is stale

The packing itself lives in src/train_gpt.py (pack_source), because the trainer
needs it too: its size accounting counts the bytes of the shipped form.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "train_gpt.py"
SHIPPED = ROOT / "train_gpt.py"
sys.path.insert(0, str(SOURCE.parent))

import train_gpt  # noqa: E402  (the readable source; importing it runs nothing)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that the shipped file is fresh")
    args = parser.parse_args()
    packed = train_gpt.pack_source(SOURCE.read_text(encoding="utf-8"))
    if args.check:
        current = SHIPPED.read_text(encoding="utf-8") if SHIPPED.exists() else ""
        if current != packed:
            print(f"{SHIPPED.name} is stale: run python tools/pack.py and commit it", file=sys.stderr)
            return 1
        print(f"{SHIPPED.name} is fresh ({len(packed.encode())} bytes)")
        return 0
    train_gpt.write_atomic(SHIPPED, packed.encode())
    source_bytes = len(SOURCE.read_bytes())
    print(f"wrote {SHIPPED.name}: {source_bytes} source bytes -> {len(packed.encode())} shipped bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
