"""Build an English proxy corpus from Debian's documentation where FineWeb cannot be downloaded.

    python tools/build_proxy_corpus.py all --install        # apt-get the manuals, extract, tokenise
    python tools/build_proxy_corpus.py extract               # manuals -> data/proxy/proxy_text.jsonl.xz
    python tools/build_proxy_corpus.py tokenize --workers 16 # that file -> data/datasets/proxy_sp1024
    python tools/build_proxy_corpus.py verify [--expect SHA] # shards == their manifest (== another machine's)
    python tools/build_proxy_corpus.py train-tokenizer       # an SP8192 model trained on the proxy text (NOT FineWeb's)
    python tools/build_proxy_corpus.py tokenize --tokenizer data/tokenizers/proxy_8192_bpe.model  # -> proxy_sp8192

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

Any SentencePiece model tokenises the text (--tokenizer; the shards go to
data/datasets/proxy_sp<VOCAB> unless --out says otherwise), and manifest.json records its
sha256, so the trainer refuses the shards with another tokenizer. For machines without
FineWeb's SP8192 tokenizer, `train-tokenizer` trains a BPE model of --vocab-size pieces
(default 8192) on the proxy text's training pages, with the settings FineWeb's SP8192 model
records (byte fallback, split digits, NFKC, no dummy prefix, ids pad 0, BOS 1, EOS 2,
UNK 3). Such a model is NOT FineWeb's tokenizer: it learned other text, so its scores
are not comparable with FineWeb BPB. It is written as proxy_<VOCAB>_bpe.model, a name
that cannot be taken for FineWeb's, and never replaces a file. Train on its shards with
DATA_PATH=./data/datasets/proxy_sp8192 TOKENIZER_PATH=./data/tokenizers/proxy_8192_bpe.model
VOCAB_SIZE=8192.

Bad input (an existing dataset in --out, a tokenizer that is not a SentencePiece model,
an existing --model, a bad --vocab-size) is one line and exit status 2; a text file or
shards that cannot make the corpus, exit status 1.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import io
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

from tools.export_text import DEFAULT_TOKENIZER, ShardWriter, check_new_dataset_folder, load_tokenizer, remove_written
from tools import ROOT
from trainer.files import file_sha256, write_atomic
from trainer.settings import InputError
from trainer.shards import BOS_ID, MANIFEST, read_shard


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
DATASETS = ROOT / "data" / "datasets"  # the shards go to DATASETS / proxy_sp<VOCAB>
TOKENIZERS = ROOT / "data" / "tokenizers"  # a trained model goes to TOKENIZERS / proxy_<VOCAB>_bpe.model
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


def tokens_sha256(files: list[dict]) -> str:
    """One sum over every shard's name and sum: equal sums, equal tokens."""
    return hashlib.sha256("".join(f"{f['file']} {f['sha256']}\n" for f in files).encode()).hexdigest()


def tokenize(text_file: Path, tokenizer: Path, out_dir: Path, workers: int, shard_tokens: int = SHARD_TOKENS) -> dict:
    """Validation pages in file order, then training pages in a fixed shuffled order (by a
    hash of their keys, so the shards mix the manuals); returns the manifest. All or
    nothing: a failure half-way removes the shards written."""
    load_tokenizer(tokenizer)  # here, not in a worker: a bad model is one line, not a worker's traceback
    check_new_dataset_folder(out_dir)
    documents = read_text_file(text_file)
    ordered = [d for d in documents if d["split"] == "val"]
    ordered += sorted((d for d in documents if d["split"] == "train"), key=lambda d: hashlib.sha256(d["key"].encode()).digest())
    started = time.perf_counter()
    created = not out_dir.exists()
    writers = {split: ShardWriter(out_dir, split, shard_tokens) for split in ("val", "train")}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_shards(ordered, tokenizer, writers, workers)
        manifest = shards_manifest(text_file, tokenizer, out_dir, writers, started)
        write_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=2).encode(), overwrite=False)
    except BaseException:  # Ctrl-C too: never leave shards that look like a corpus but are not all of it
        remove_written(writers.values(), out_dir, created)
        raise
    return manifest


def write_shards(ordered: list[dict], tokenizer: Path, writers: dict[str, ShardWriter], workers: int) -> None:
    batches = [ordered[i : i + 256] for i in range(0, len(ordered), 256)]
    with ProcessPoolExecutor(workers) as pool:
        encoded = pool.map(encode_texts, [str(tokenizer)] * len(batches), [[d["text"] for d in b] for b in batches])
        for batch, arrays in zip(batches, encoded):  # map keeps the order: the shards never depend on the workers
            for document, tokens in zip(batch, arrays):
                writers[document["split"]].add(tokens)
    for writer in writers.values():
        writer.flush()


def shards_manifest(text_file: Path, tokenizer: Path, out_dir: Path, writers: dict[str, ShardWriter], started: float) -> dict:
    files = writers["val"].files + writers["train"].files
    for entry in files:
        entry["sha256"] = file_sha256(out_dir / entry["file"])
    tokens = {split: sum(f["tokens"] for f in w.files) for split, w in writers.items()}
    if tokens["val"] < MIN_VAL_TOKENS:
        print(f"warning: only {tokens['val']} validation tokens (fewer than {MIN_VAL_TOKENS})", file=sys.stderr)
    return {"text_file": text_file.name, "text_sha256": file_sha256(text_file), "tokenizer": tokenizer.name,
            "tokenizer_sha256": file_sha256(tokenizer), "tokens": tokens, "files": files,
            "tokens_sha256": tokens_sha256(files), "seconds": round(time.perf_counter() - started, 1)}


def verify(out_dir: Path, expected: str | None = None) -> dict:
    """Check every shard against the manifest's sums, and the sum over all of them against
    `expected` (another machine's tokens_sha256) when given; CorpusError on a difference."""
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as error:
        raise CorpusError(f"{out_dir / MANIFEST}: cannot read the manifest ({error})") from None
    for entry in files:
        path = out_dir / entry["file"]
        if not path.is_file() or file_sha256(path) != entry["sha256"] or read_shard(path).size != entry["tokens"]:
            raise CorpusError(f"{path}: does not match manifest.json (missing, changed or truncated)")
    if tokens_sha256(files) != manifest["tokens_sha256"]:
        raise CorpusError(f"{out_dir / MANIFEST}: tokens_sha256 does not match its own file list")
    if expected is not None and manifest["tokens_sha256"] != expected:
        raise CorpusError(f"{out_dir}: tokens_sha256 {manifest['tokens_sha256']} is not the expected {expected} "
                          "(another text file, tokenizer or sentencepiece version)")
    return manifest


# -----------------------------------------------------------------------------
# Train a tokenizer: the proxy text -> an SP BPE model (NOT FineWeb's)
# -----------------------------------------------------------------------------

# The training settings the challenge's SP8192 FineWeb model records in its own file (its
# trainer_spec and normalizer_spec; ../shared/tokenizers/fineweb_8192_bpe.model), so a model
# trained here differs from it in the text it learned from, not in how it was trained:
# byte fallback (no <unk> for unseen characters), digits split, NFKC, no dummy prefix,
# and the ids the shards and the trainer assume (BOS 1).
FINEWEB_SP_SETTINGS = {"model_type": "bpe", "character_coverage": 0.999, "byte_fallback": True, "split_digits": True,
                       "normalization_rule_name": "nmt_nfkc", "add_dummy_prefix": False, "hard_vocab_limit": False,
                       "pad_id": 0, "bos_id": BOS_ID, "eos_id": 2, "unk_id": 3}
MIN_VOCAB_SIZE = 260  # 256 byte pieces and the 4 special ones
# The model file records its thread count, so a fixed one gives the same bytes (and sha256)
# on every machine; the pieces do not depend on it (the same with 1 and 2 threads).
TRAIN_THREADS = 16
NOT_FINEWEB = "NOT FineWeb's tokenizer: scores with it are not comparable with FineWeb BPB"


def default_model_path(vocab_size: int) -> Path:
    return TOKENIZERS / f"proxy_{vocab_size}_bpe.model"


def training_sentences(documents: list[dict]) -> Iterator[str]:
    """The non-empty lines of the training pages (validation stays unseen; SentencePiece
    skips sentences over 4,192 bytes, so whole pages would be lost)."""
    for document in documents:
        if document["split"] == "train":
            yield from (line for line in document["text"].split("\n") if line.strip())


def train_tokenizer(text_file: Path, model: Path, vocab_size: int) -> dict:
    """Train a BPE model on the proxy text and write it atomically, never over a file."""
    import sentencepiece

    if not MIN_VOCAB_SIZE < vocab_size <= 65536:
        raise InputError(f"--vocab-size {vocab_size}: must be above {MIN_VOCAB_SIZE} (256 byte pieces, 4 special) "
                         "and at most 65536 (the shards hold uint16 tokens)")
    if model.exists():
        raise InputError(f"{model}: already exists (a tokenizer is never replaced: name another --model or move it away)")
    documents = read_text_file(text_file)
    started, written = time.perf_counter(), io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(sentence_iterator=training_sentences(documents), model_writer=written,
                                                 vocab_size=vocab_size, num_threads=TRAIN_THREADS, minloglevel=2,
                                                 **FINEWEB_SP_SETTINGS)
    except RuntimeError as error:  # e.g. a vocabulary smaller than the text's characters need
        raise InputError(f"sentencepiece could not train a {vocab_size}-piece model on {text_file}: "
                         f"{str(error).strip().splitlines()[-1]}") from None
    try:
        write_atomic(model, written.getvalue(), overwrite=False)
    except FileExistsError:
        raise InputError(f"{model}: appeared while training; it was left as it is") from None
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(model)).vocab_size()
    return {"model": model, "pieces": pieces, "sha256": file_sha256(model), "seconds": time.perf_counter() - started}


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------

def dataset_folder(tokenizer: Path) -> Path:
    """data/datasets/proxy_sp<VOCAB>: the folder says which vocabulary made its shards."""
    return DATASETS / f"proxy_sp{load_tokenizer(tokenizer).vocab_size()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("all", "extract", "tokenize", "verify", "train-tokenizer"))
    parser.add_argument("--install", action="store_true", help="apt-get install the documentation packages first")
    parser.add_argument("--text-file", type=Path, default=TEXT_FILE)
    parser.add_argument("--out", type=Path, help="the shards' folder (default: data/datasets/proxy_sp<VOCAB>)")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER,
                        help="tokenize: any SentencePiece model (default: FineWeb's SP1024, vendored)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    parser.add_argument("--expect", help="verify: the tokens_sha256 another machine printed")
    parser.add_argument("--vocab-size", type=int, default=8192, help="train-tokenizer: pieces of the model (default 8192)")
    parser.add_argument("--model", type=Path, help="train-tokenizer: the model to write, never over a file "
                        f"(default data/tokenizers/proxy_<VOCAB>_bpe.model); it is {NOT_FINEWEB}")
    args = parser.parse_args(argv)
    try:
        if args.command in ("all", "tokenize", "verify") and args.out is None:
            args.out = dataset_folder(args.tokenizer)
        if args.command in ("all", "tokenize"):
            check_new_dataset_folder(args.out)  # before the long extract, not after it
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
        if args.command == "train-tokenizer":
            trained = train_tokenizer(args.text_file, args.model or default_model_path(args.vocab_size), args.vocab_size)
            print(f"train-tokenizer: {trained['model']}, {trained['pieces']} pieces trained on {args.text_file} in "
                  f"{trained['seconds']:.0f}s, sha256 {trained['sha256']}. It is {NOT_FINEWEB}. Shards with it: "
                  f"python tools/build_proxy_corpus.py tokenize --tokenizer {trained['model']}")
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except CorpusError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as error:
        print(f"error: apt-get failed (exit status {error.returncode}); install the packages by hand", file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
