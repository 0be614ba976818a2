"""Generate the shipped train_gpt.py from the readable src/trainer.py.

    python tools/pack.py           # write train_gpt.py at the repository root
    python tools/pack.py --check   # exit 1 when the root file is stale

The packing itself (strip comments and docstrings through the AST, LZMA2, base85, a
three-line self-extracting wrapper) lives in the trainer, which also uses it to count
the shipped bytes when it runs from src/; this is its command line.
"""

from __future__ import annotations

import argparse
import sys

from repo import ROOT
from trainer import pack_source, write_atomic

SOURCE = ROOT / "src" / "trainer.py"
SHIPPED = ROOT / "train_gpt.py"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that the shipped file is fresh")
    args = parser.parse_args(argv)
    packed = pack_source(SOURCE.read_text(encoding="utf-8"))
    if args.check:
        current = SHIPPED.read_text(encoding="utf-8") if SHIPPED.exists() else ""
        if current != packed:
            print(f"{SHIPPED.name} is stale: run python tools/pack.py and commit it", file=sys.stderr)
            return 1
        print(f"{SHIPPED.name} is fresh ({len(packed.encode())} bytes)")
        return 0
    write_atomic(SHIPPED, packed.encode())
    print(f"wrote {SHIPPED.name}: {len(SOURCE.read_bytes())} source bytes -> {len(packed.encode())} shipped bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
