"""Export local text into token shards the trainer reads.

    python tools/export_text.py books/*.txt --out data/datasets/mytext_sp1024 --val-docs 500
    python tools/export_text.py corpus.jsonl --text-field text --out data/datasets/web_sp1024

Inputs: plain text files (each file is one document, or with --blank-line-docs each
blank-line-separated paragraph is one) and JSONL files (one document per line, text in
--text-field). Every document is encoded with the SentencePiece model and gets BOS in
front. The first --val-docs documents form the validation split (fineweb_val_*.bin),
the rest training (fineweb_train_*.bin), --shard-tokens tokens per shard at most. A
manifest.json lists what was written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from tools import ROOT
from trainer.files import write_atomic
from trainer.shards import BOS_ID, write_shard

DEFAULT_TOKENIZER = ROOT / "data" / "tokenizers" / "fineweb_1024_bpe.model"


class ShardWriter:
    """Buffers tokens and writes numbered shards of at most shard_tokens tokens."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.files: list[dict] = []

    def add(self, tokens: np.ndarray) -> None:
        while tokens.size:
            room = self.shard_tokens - self.buffered
            self.buffer.append(tokens[:room])
            self.buffered += min(room, tokens.size)
            tokens = tokens[room:]
            if self.buffered == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if not self.buffered:
            return
        path = self.out_dir / f"fineweb_{self.split}_{len(self.files):06d}.bin"
        write_shard(path, np.concatenate(self.buffer))
        self.files.append({"file": path.name, "tokens": self.buffered})
        self.buffer, self.buffered = [], 0


def progress(done: int, total: int | None, started: float) -> None:
    rate = done / max(time.perf_counter() - started, 1e-9)
    if total:
        filled = int(30 * done / total)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} docs {rate:.0f}/s")
    else:
        sys.stderr.write(f"\r{done} docs {rate:.0f}/s")
    sys.stderr.flush()


def export_documents(documents: Iterable[str], tokenizer_path: Path, out_dir: Path, val_docs: int,
                     shard_tokens: int = 100_000_000, total: int | None = None, batch: int = 256) -> dict:
    """Encode and write documents; returns the manifest (also written as manifest.json)."""
    import sentencepiece

    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_path))
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {"val": ShardWriter(out_dir, "val", shard_tokens), "train": ShardWriter(out_dir, "train", shard_tokens)}
    counts = {"val": 0, "train": 0}
    started, done, pending = time.perf_counter(), 0, []

    def encode_pending() -> None:
        nonlocal done
        for ids in tokenizer.encode(pending):
            split = "val" if done < val_docs else "train"
            writers[split].add(np.array([BOS_ID] + ids, dtype=np.uint16))
            counts[split] += 1
            done += 1
        pending.clear()
        progress(done, total, started)

    for document in documents:
        pending.append(document)
        if len(pending) == batch:
            encode_pending()
    encode_pending()
    sys.stderr.write("\n")
    for writer in writers.values():
        writer.flush()
    manifest = {"tokenizer": str(tokenizer_path), "tokenizer_sha256": hashlib.sha256(tokenizer_path.read_bytes()).hexdigest(),
                "documents": counts, "shard_tokens": shard_tokens,
                "files": writers["val"].files + writers["train"].files}
    write_atomic(out_dir / "manifest.json", json.dumps(manifest, indent=2).encode())
    return manifest


def read_documents(paths: list[Path], text_field: str, blank_line_docs: bool) -> Iterator[str]:
    for path in paths:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)[text_field]
                        except (json.JSONDecodeError, KeyError, TypeError):
                            raise SystemExit(f"error: {path}:{number}: not a JSON object with a {text_field!r} field") from None
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
            yield from ([p for p in text.split("\n\n") if p.strip()] if blank_line_docs else [text])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--val-docs", type=int, default=1000)
    parser.add_argument("--shard-tokens", type=int, default=100_000_000)
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--blank-line-docs", action="store_true", help="each blank-line-separated paragraph is a document")
    args = parser.parse_args()
    missing = [str(p) for p in args.inputs + [args.tokenizer] if not p.exists()]
    if missing:
        print(f"error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    manifest = export_documents(read_documents(args.inputs, args.text_field, args.blank_line_docs), args.tokenizer,
                                args.out, args.val_docs, args.shard_tokens)
    tokens = sum(f["tokens"] for f in manifest["files"])
    print(f"wrote {len(manifest['files'])} shards, {tokens} tokens, {manifest['documents']} documents to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
