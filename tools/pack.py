"""Generate the shipped train_gpt.py from the readable src/train_gpt.py.

    python tools/pack.py           # write train_gpt.py at the repository root
    python tools/pack.py --check   # exit 1 when the root file is stale

The shipped file is the source without comments and docstrings (removed through the
AST, so the code is unchanged), LZMA2-compressed, base85-encoded, in two lines that
decode and exec it. It behaves exactly like the source: same settings, same logs, and
`__name__`/`__file__` are the shipped file's own. The trainer imports pack_source
from here to count the shipped bytes when it runs from src/.
"""

from __future__ import annotations

import argparse
import ast
import base64
import lzma
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "train_gpt.py"
SHIPPED = ROOT / "train_gpt.py"
HEADER = "import lzma as L,base64 as B\n"  # the trainer recognises its packed form by this line
FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def strip_source(source: str) -> str:
    """The same program without comments and docstrings."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree) + "\n"


def pack_source(source: str) -> str:
    """The two-line self-extracting form of a source file."""
    payload = lzma.compress(strip_source(source).encode(), format=lzma.FORMAT_RAW, filters=FILTERS)
    encoded = base64.b85encode(payload).decode("ascii")  # base85 has no quote or backslash
    return (HEADER + f'exec(L.decompress(B.b85decode("{encoded}"),format=L.FORMAT_RAW,'
            'filters=[{"id":L.FILTER_LZMA2}]))\n')


def unpack_source(packed: str) -> str:
    """The program a packed file runs."""
    encoded = packed.split('B.b85decode("', 1)[1].split('")', 1)[0]
    return lzma.decompress(base64.b85decode(encoded), format=lzma.FORMAT_RAW,
                           filters=[{"id": lzma.FILTER_LZMA2}]).decode()


def write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that the shipped file is fresh")
    args = parser.parse_args()
    packed = pack_source(SOURCE.read_text(encoding="utf-8"))
    if args.check:
        current = SHIPPED.read_text(encoding="utf-8") if SHIPPED.exists() else ""
        if current != packed:
            print(f"{SHIPPED.name} is stale: run python tools/pack.py and commit it", file=sys.stderr)
            return 1
        print(f"{SHIPPED.name} is fresh ({len(packed.encode())} bytes)")
        return 0
    write_atomic(SHIPPED, packed)
    print(f"wrote {SHIPPED.name}: {len(SOURCE.read_bytes())} source bytes -> {len(packed.encode())} shipped bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
