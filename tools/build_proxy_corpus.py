"""Build an English proxy corpus from Debian's documentation where FineWeb cannot be downloaded.

    python tools/build_proxy_corpus.py all --install        # apt-get the manuals, extract, tokenise
    python tools/build_proxy_corpus.py extract               # manuals -> data/proxy/proxy_text.jsonl.xz
    python tools/build_proxy_corpus.py tokenize --workers 16 # that file -> data/datasets/proxy_sp1024
    python tools/build_proxy_corpus.py verify [--expect SHA] # shards == their manifest (== another machine's)

Two steps, so a machine without network can have the corpus: `extract` (where Debian's
packages can be installed) turns the HTML manuals into one deterministic xz-compressed
JSON-lines file of documents (well under 60 MiB: it travels with the working tree), and
`tokenize` (anywhere, with many processes) turns that file into token shards whose
sha256 sums, and one sum over all of them, go into manifest.json. The same text file and
tokenizer give the same sums on any machine and any number of workers, so two machines
provably train on the same tokens; `verify` re-reads the shards and checks them.

What `extract` keeps: the visible prose of every page (no scripts, styles, code blocks,
navigation), one document per page, lines of five or more words kept only at their first
appearance in the whole corpus (API manuals repeat boilerplate on thousands of pages),
and pages with at least MIN_PAGE_CHARS characters left. Validation is a fixed set of
pages, chosen by a hash of the page's name (VAL_PER_MILLE of them), so it does not move
when a package is added. Train on it with DATA_PATH=./data/datasets/proxy_sp1024.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import json
import lzma
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator

import numpy as np

from tools.export_text import DEFAULT_TOKENIZER, ShardWriter
from tools import ROOT
from trainer.files import write_atomic
from trainer.shards import BOS_ID, read_shard


@dataclass(frozen=True)
class Source:
    package: str
    root: str
    skip: tuple[str, ...] = ()  # path fragments of pages that are not prose (listings, indexes, sources)


SOURCES = (
    Source("debian-handbook", "/usr/share/doc/debian-handbook/html/en-US"),
    Source("debian-reference-en", "/usr/share/debian-reference"),
    Source("debian-policy", "/usr/share/doc/debian-policy/policy.html"),
    Source("python3.11-doc", "/usr/share/doc/python3.11/html"),
    Source("linux-doc-6.1", "/usr/share/doc/linux-doc-6.1/html"),
    Source("postgresql-doc-15", "/usr/share/doc/postgresql-doc-15/html"),
    Source("rust-doc", "/usr/share/doc/rust-doc/html", ("/arch/", "/src/", "/implementors/", "all.html")),
    Source("openjdk-17-doc", "/usr/share/doc/openjdk-17-jre-headless/api", ("class-use", "index-files", "-tree.html")),
    Source("gimp-help-en", "/usr/share/gimp/2.0/help/en"),
    Source("libreoffice-help-en-us", "/usr/share/libreoffice/help/en-US"),
    Source("python-scipy-doc", "/usr/share/doc/python-scipy-doc/html"),
    Source("cppreference-doc-en-html", "/usr/share/cppreference/doc/html/en"),
    Source("git-doc", "/usr/share/doc/git-doc"),
    Source("octave-doc", "/usr/share/doc/octave"),
    Source("maxima-doc", "/usr/share/doc/maxima-doc/html"),
    Source("python-django-doc", "/usr/share/doc/python-django-doc/html"),
    Source("python-sqlalchemy-doc", "/usr/share/doc/python-sqlalchemy-doc/html"),
    Source("python-sklearn-doc", "/usr/share/doc/python-sklearn-doc/html"),
    Source("python-pandas-doc", "/usr/share/doc/python-pandas-doc/html"),
    Source("python-sympy-doc", "/usr/share/doc/python-sympy-doc/html"),
    Source("python-astropy-doc", "/usr/share/doc/python-astropy-doc/html"),
    Source("sphinx-doc", "/usr/share/doc/sphinx-doc/html"),
    Source("cmake-doc", "/usr/share/doc/cmake-data/html"),
    Source("llvm-14-doc", "/usr/share/doc/llvm-14-doc/html"),
    Source("clang-14-doc", "/usr/share/doc/clang-14/html"),
    Source("nodejs-doc", "/usr/share/doc/nodejs/api"),
    Source("erlang-doc", "/usr/share/doc/erlang-doc"),
    Source("libboost1.74-doc", "/usr/share/doc/libboost1.74-doc"),
    Source("sqlite3-doc", "/usr/share/doc/sqlite3"),
    Source("kicad-doc-en", "/usr/share/doc/kicad/help/en"),
    Source("gnucash-docs", "/usr/share/doc/gnucash-docs", ("-de/", "-it/", "-ja/", "-pt/")),
)
# Never prose: Sphinx's page sources and highlighted code, and index or search pages.
SKIPPED_EVERYWHERE = ("/_sources/", "/_modules/", "genindex", "modindex", "/search.html")
TEXT_FILE = ROOT / "data" / "proxy" / "proxy_text.jsonl.xz"
OUT_DIR = ROOT / "data" / "datasets" / "proxy_sp1024"
PAGE_NAME = re.compile(r"\.(html?|txt)(\.gz)?$")
MIN_PAGE_CHARS = 500
DEDUP_MIN_WORDS = 5  # shorter lines (headings, "Examples") may repeat
VAL_PER_MILLE = 25  # pages per thousand held out for validation
MIN_VAL_TOKENS = 1_000_000
SHARD_TOKENS = 10_000_000  # several training shards, so the sampler mixes them
XZ_PRESET = 6

SKIPPED_TAGS = {"script", "style", "pre", "nav", "head", "header", "footer"}
BLOCK_TAGS = {"p", "div", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "br", "dd", "dt", "section", "table"}


class CorpusError(Exception):
    """Input that cannot make the corpus: one line, exit status 1."""


# -----------------------------------------------------------------------------
# Extract: HTML manuals -> documents
# -----------------------------------------------------------------------------

class TextExtractor(HTMLParser):
    """Visible prose of an HTML page: no scripts, styles, code blocks or navigation
    (inline <code> stays: it is part of the sentence around it)."""

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


def source_pages(source: Source) -> list[tuple[str, Path]]:
    """(key, path) of every page of a source, sorted; the key is package/relative path."""
    root = Path(source.root)
    pages = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        skipped = any(part in f"/{relative}" for part in source.skip + SKIPPED_EVERYWHERE)
        if PAGE_NAME.search(path.name) and not skipped and path.is_file():
            pages.append((f"{source.package}/{relative}", path))
    return pages


def is_validation(key: str) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 1000 < VAL_PER_MILLE


def deduplicate(pages: Iterator[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    """Drop every line of DEDUP_MIN_WORDS or more words already on a kept page (or earlier
    on this one), then pages left shorter than MIN_PAGE_CHARS."""
    seen: set[bytes] = set()
    for key, text in pages:
        kept, new = [], set()
        for line in text.split("\n"):
            if len(line.split()) >= DEDUP_MIN_WORDS:
                digest = hashlib.blake2b(line.lower().encode(), digest_size=12).digest()
                if digest in seen or digest in new:
                    continue
                new.add(digest)
            kept.append(line)
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()
        if len(text) >= MIN_PAGE_CHARS:
            seen |= new
            yield key, text


def extract(sources: tuple[Source, ...], out: Path, workers: int) -> dict:
    """Write the documents as xz-compressed JSON lines (key, split, text); returns a summary."""
    present = [s for s in sources if Path(s.root).is_dir()]
    if not present:
        raise CorpusError(f"none of the manuals is installed ({', '.join(s.root for s in sources)}); run with --install")
    pages = [page for source in present for page in source_pages(source)]
    print(f"{len(pages)} pages in {len(present)} packages: {', '.join(s.package for s in present)}", flush=True)
    started = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        texts = pool.map(page_text, [path for _, path in pages], chunksize=64)
        documents = [{"key": key, "split": "val" if is_validation(key) else "train", "text": text}
                     for key, text in deduplicate(zip((key for key, _ in pages), texts))]
    body = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in documents).encode()
    write_atomic(out, lzma.compress(body, preset=XZ_PRESET))
    per_package: dict[str, int] = {}
    for document in documents:
        package = document["key"].split("/", 1)[0]
        per_package[package] = per_package.get(package, 0) + len(document["text"].encode())
    return {"documents": len(documents), "text_bytes": len(body), "compressed_bytes": out.stat().st_size,
            "sha256": hashlib.sha256(out.read_bytes()).hexdigest(), "seconds": time.perf_counter() - started,
            "bytes_per_package": per_package}


# -----------------------------------------------------------------------------
# Tokenize: documents -> shards with checksums
# -----------------------------------------------------------------------------

def read_text_file(path: Path) -> list[dict]:
    try:
        lines = lzma.decompress(path.read_bytes()).decode().splitlines()
        documents = [json.loads(line) for line in lines]
        if not all({"key", "split", "text"} <= set(d) and d["split"] in ("val", "train") for d in documents):
            raise ValueError("a line without key, split (val/train) and text")
    except FileNotFoundError:
        raise CorpusError(f"{path}: no such file (run `extract` first, or copy it here)") from None
    except (lzma.LZMAError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as error:
        raise CorpusError(f"{path}: not a proxy text file ({error})") from None
    return documents


_TOKENIZER = None


def encode_texts(tokenizer_path: str, texts: list[str]) -> list[np.ndarray]:
    """BOS + ids of each text (run in a worker process that keeps its tokenizer)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        import sentencepiece

        _TOKENIZER = sentencepiece.SentencePieceProcessor(model_file=tokenizer_path)
    return [np.array([BOS_ID] + ids, dtype=np.uint16) for ids in _TOKENIZER.encode(texts)]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokens_sha256(files: list[dict]) -> str:
    """One sum over every shard's name and sum: equal sums, equal tokens."""
    return hashlib.sha256("".join(f"{f['file']} {f['sha256']}\n" for f in files).encode()).hexdigest()


def tokenize(text_file: Path, tokenizer: Path, out_dir: Path, workers: int, shard_tokens: int = SHARD_TOKENS) -> dict:
    """Validation pages in file order, then training pages in a fixed shuffled order (by a
    hash of their keys, so the shards mix the manuals); returns the manifest."""
    if not tokenizer.is_file():
        raise CorpusError(f"{tokenizer}: no such tokenizer")
    if any(out_dir.glob("fineweb_*.bin")):
        raise CorpusError(f"{out_dir}: already holds shards (remove them to rebuild)")
    documents = read_text_file(text_file)
    ordered = [d for d in documents if d["split"] == "val"]
    ordered += sorted((d for d in documents if d["split"] == "train"), key=lambda d: hashlib.sha256(d["key"].encode()).digest())
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {split: ShardWriter(out_dir, split, shard_tokens) for split in ("val", "train")}
    batches = [ordered[i : i + 256] for i in range(0, len(ordered), 256)]
    with ProcessPoolExecutor(workers) as pool:
        encoded = pool.map(encode_texts, [str(tokenizer)] * len(batches), [[d["text"] for d in b] for b in batches])
        for batch, arrays in zip(batches, encoded):  # map keeps the order: the shards never depend on the workers
            for document, tokens in zip(batch, arrays):
                writers[document["split"]].add(tokens)
    for writer in writers.values():
        writer.flush()
    files = writers["val"].files + writers["train"].files
    for entry in files:
        entry["sha256"] = file_sha256(out_dir / entry["file"])
    tokens = {split: sum(f["tokens"] for f in w.files) for split, w in writers.items()}
    if tokens["val"] < MIN_VAL_TOKENS:
        print(f"warning: only {tokens['val']} validation tokens (fewer than {MIN_VAL_TOKENS})", file=sys.stderr)
    manifest = {"text_file": text_file.name, "text_sha256": file_sha256(text_file), "tokenizer": tokenizer.name,
                "tokenizer_sha256": file_sha256(tokenizer), "tokens": tokens, "files": files,
                "tokens_sha256": tokens_sha256(files), "seconds": round(time.perf_counter() - started, 1)}
    write_atomic(out_dir / "manifest.json", json.dumps(manifest, indent=2).encode())
    return manifest


def verify(out_dir: Path, expected: str | None = None) -> dict:
    """Check every shard against the manifest's sums, and the sum over all of them against
    `expected` (another machine's tokens_sha256) when given; CorpusError on a difference."""
    try:
        manifest = json.loads((out_dir / "manifest.json").read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as error:
        raise CorpusError(f"{out_dir}/manifest.json: cannot read the manifest ({error})") from None
    for entry in files:
        path = out_dir / entry["file"]
        if not path.is_file() or file_sha256(path) != entry["sha256"] or read_shard(path).size != entry["tokens"]:
            raise CorpusError(f"{path}: does not match manifest.json (missing, changed or truncated)")
    if tokens_sha256(files) != manifest["tokens_sha256"]:
        raise CorpusError(f"{out_dir}/manifest.json: tokens_sha256 does not match its own file list")
    if expected is not None and manifest["tokens_sha256"] != expected:
        raise CorpusError(f"{out_dir}: tokens_sha256 {manifest['tokens_sha256']} is not the expected {expected} "
                          "(another text file, tokenizer or sentencepiece version)")
    return manifest


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("all", "extract", "tokenize", "verify"))
    parser.add_argument("--install", action="store_true", help="apt-get install the documentation packages first")
    parser.add_argument("--text-file", type=Path, default=TEXT_FILE)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    parser.add_argument("--expect", help="verify: the tokens_sha256 another machine printed")
    args = parser.parse_args(argv)
    try:
        if args.install:
            subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *(s.package for s in SOURCES)], check=True)
        if args.command in ("all", "extract"):
            summary = extract(SOURCES, args.text_file, args.workers)
            print(f"extract: {summary['documents']} documents, {summary['text_bytes'] / 1e6:.1f} MB of text, "
                  f"{summary['compressed_bytes'] / 2**20:.1f} MiB in {args.text_file}, {summary['seconds']:.0f}s; "
                  f"sha256 {summary['sha256']}")
            for package, size in summary["bytes_per_package"].items():
                print(f"  {package}: {size / 1e6:.1f} MB")
        if args.command in ("all", "tokenize"):
            manifest = tokenize(args.text_file, args.tokenizer, args.out, args.workers)
            print(f"tokenize: {manifest['tokens']['train']} training and {manifest['tokens']['val']} validation tokens "
                  f"in {len(manifest['files'])} shards in {args.out}, {manifest['seconds']:.0f}s; "
                  f"tokens_sha256 {manifest['tokens_sha256']}")
        if args.command == "verify":
            manifest = verify(args.out, args.expect)
            print(f"verify: {len(manifest['files'])} shards match; tokens_sha256 {manifest['tokens_sha256']}")
    except CorpusError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as error:
        print(f"error: apt-get failed (exit status {error.returncode}); install the packages by hand", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
