"""Build a proxy English corpus where FineWeb cannot be downloaded.

    python tools/build_proxy_corpus.py --install     # apt-get install the documentation first
    python tools/build_proxy_corpus.py               # packages already installed

Collects English prose from Debian documentation packages (the Debian Administrator's
Handbook, the Python 3.11, Linux kernel and PostgreSQL manuals, the Debian Reference),
strips the HTML markup,
splits it into documents (one per page) and exports them with the FineWeb tokenizer to
./data/datasets/proxy_sp1024 (first 500 pages: validation). Needs at least --min-mb of
text (default 40). The corpus is built here, never committed. Train on it with
DATA_PATH=./data/datasets/proxy_sp1024.
"""

from __future__ import annotations

import argparse
import gzip
import html
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

from export_text import DEFAULT_TOKENIZER, export_documents
from repo import ROOT

PACKAGES = {"debian-handbook": "/usr/share/doc/debian-handbook/html/en-US",
            "python3.11-doc": "/usr/share/doc/python3.11/html",
            "debian-reference-en": "/usr/share/doc/debian-reference-en",
            "linux-doc-6.1": "/usr/share/doc/linux-doc-6.1/html",
            "postgresql-doc-15": "/usr/share/doc/postgresql-doc-15/html"}
SKIPPED_TAGS = {"script", "style", "pre", "code", "nav", "head", "header", "footer"}
BLOCK_TAGS = {"p", "div", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "br", "dd", "dt", "section", "table"}


class TextExtractor(HTMLParser):
    """Visible prose of an HTML page: no scripts, styles, code blocks or navigation."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in SKIPPED_TAGS:
            self.skipping += 1
        elif tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in SKIPPED_TAGS and self.skipping:
            self.skipping -= 1
        elif tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    extractor = TextExtractor()
    extractor.feed(markup)
    text = html.unescape("".join(extractor.parts))
    lines = (re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def page_text(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    markup = raw.decode("utf-8", errors="replace")
    return html_to_text(markup) if ".htm" in path.name else markup.strip()


def collect_pages(roots: list[Path]) -> list[str]:
    pages = []
    for root in roots:
        for path in sorted(root.rglob("*")):
            if "_sources" in path.parts:  # reST sources of the HTML pages: the same text twice
                continue
            if path.is_file() and re.search(r"\.(html?|txt)(\.gz)?$", path.name):
                text = page_text(path)
                if len(text) > 500:
                    pages.append(text)
    return pages


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--install", action="store_true", help="apt-get install the documentation packages first")
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "datasets" / "proxy_sp1024")
    parser.add_argument("--val-docs", type=int, default=500)
    parser.add_argument("--min-mb", type=float, default=40.0)
    args = parser.parse_args()
    if args.install:
        subprocess.run(["apt-get", "install", "-y", "-q", *PACKAGES], check=True)
    roots = [Path(p) for p in PACKAGES.values() if Path(p).is_dir()]
    if not roots:
        print(f"error: none of {', '.join(PACKAGES.values())} exists; run with --install", file=sys.stderr)
        return 2
    pages = collect_pages(roots)
    megabytes = sum(len(p.encode()) for p in pages) / 1e6
    print(f"{len(pages)} pages, {megabytes:.1f} MB of text from {', '.join(map(str, roots))}")
    if megabytes < args.min_mb:
        print(f"error: only {megabytes:.1f} MB of text; --min-mb asks for {args.min_mb}", file=sys.stderr)
        return 1
    manifest = export_documents(pages, DEFAULT_TOKENIZER, args.out, args.val_docs, total=len(pages))
    print(f"wrote {sum(f['tokens'] for f in manifest['files'])} tokens in {len(manifest['files'])} shards to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
