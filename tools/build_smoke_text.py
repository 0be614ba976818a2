"""Make data/smoke/pydoc_text.json.xz, the text of the smoke run's corpus.

    python tools/build_smoke_text.py            # rewrite it from the running Python

The smoke run (`SMOKE=1`, or `python train_gpt.py` without FineWeb) trains on
English that ships with CPython: the language reference's pydoc topic pages
(validation: their last tenth) and the long docstrings of the standard library
(training, with the other pages). The text is vendored, not read from the running
Python, because every Python version carries slightly different text and the smoke run
must give the same tokens, hence the same score, on every machine. The committed file
was made with CPython 3.11.7 (text (c) Python Software Foundation, PSF License v2).
"""

from __future__ import annotations

import ast
import json
import lzma
import sys
import sysconfig
from pathlib import Path

from trainer.data import SMOKE_TEXT
from trainer.files import write_atomic

MIN_PARAGRAPH_CHARS, MIN_DOCSTRING_CHARS = 40, 200


def topic_paragraphs() -> list[str]:
    import pydoc_data.topics

    return [paragraph.strip() for _, page in sorted(pydoc_data.topics.topics.items())
            for paragraph in page.split("\n\n") if len(paragraph.strip()) > MIN_PARAGRAPH_CHARS]


def stdlib_docstrings() -> list[str]:
    docstrings = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if {"site-packages", "test", "tests"} & set(path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        docstrings += [doc for node in ast.walk(tree) if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
                       and len(doc := ast.get_docstring(node) or "") > MIN_DOCSTRING_CHARS]
    return docstrings


def main() -> int:
    pages = topic_paragraphs()
    split = len(pages) - len(pages) // 10
    text = {"python": sys.version.split()[0], "val": pages[split:], "train": pages[:split] + stdlib_docstrings()}
    blob = lzma.compress(json.dumps(text, ensure_ascii=False).encode(), preset=9 | lzma.PRESET_EXTREME)
    path = Path(__file__).resolve().parents[1] / SMOKE_TEXT
    write_atomic(path, blob)
    print(f"wrote {path}: {len(text['val'])} validation and {len(text['train'])} training documents, {len(blob)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
