"""Export local text into token shards the trainer reads.

    python tools/export_text.py books/*.txt --out data/datasets/mytext_sp1024 --val-docs 500
    python tools/export_text.py corpus.jsonl --text-field text --out data/datasets/web_sp1024

Inputs: UTF-8 plain text files (each file is one document, or with --blank-line-docs each
blank-line-separated paragraph is one) and JSONL files (one document per line, text in
--text-field). Every document is encoded with the SentencePiece model and gets BOS in
front. The first --val-docs documents form the validation split (fineweb_val_*.bin),
the rest training (fineweb_train_*.bin), --shard-tokens tokens per shard at most. A
manifest.json lists what was written and records the tokenizer's sha256, so the trainer
refuses these shards with another tokenizer.

Never replaces data: --out must be a new folder or one without shards and manifest. Bad
input (an argument, an input that is not a UTF-8 file, a folder that already holds a
dataset) is one line and exit status 2; an export that fails half-way removes the shards
it wrote.
"""

from __future__ import annotations

import argparse
import codecs
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from tools import ROOT
from trainer.files import file_sha256, regular_file, write_atomic
from trainer.settings import InputError, RunError
from trainer.shards import BOS_ID, MANIFEST, write_shard

DEFAULT_TOKENIZER = ROOT / "data" / "tokenizers" / "fineweb_1024_bpe.model"
SHARD_PATTERN = "fineweb_*.bin"


class ShardWriter:
    """Buffers tokens and writes numbered shards of at most shard_tokens tokens; never
    replaces a file (the folder was checked to hold no shards)."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        if shard_tokens < 1:  # 0 would never fill a shard (an endless loop), a negative count slices backwards
            raise InputError(f"shard_tokens={shard_tokens}: must be a positive integer")
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
        try:
            write_shard(path, np.concatenate(self.buffer), overwrite=False)
        except FileExistsError:
            raise InputError(f"{path}: appeared while exporting (another export into the same folder?)") from None
        self.files.append({"file": path.name, "tokens": self.buffered})
        self.buffer, self.buffered = [], 0


def check_new_dataset_folder(out_dir: Path) -> None:
    """A dataset folder must be new or hold no dataset: adding shards to another dataset's,
    or replacing its manifest, silently changes what a run trains on."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: not a folder (--out names the folder the shards go to)")
    if not out_dir.is_dir():
        return
    held = sorted(path.name for path in out_dir.glob(SHARD_PATTERN)) + [MANIFEST] * (out_dir / MANIFEST).exists()
    if held:
        raise InputError(f"{out_dir}: already holds a dataset ({held[0]}{' and more' if len(held) > 1 else ''}); "
                         "choose a new folder, or move that one away to rebuild it")


def load_tokenizer(path: Path) -> Any:
    """The SentencePiece model, or one line saying why not (its ids must fit the shards' uint16)."""
    import sentencepiece

    regular_file(path, "tokenizer")
    try:
        tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as error:
        raise InputError(f"{path}: not a SentencePiece model ({error})") from None
    if tokenizer.vocab_size() > 65536:
        raise InputError(f"{path}: {tokenizer.vocab_size()} pieces do not fit the shards' uint16 tokens")
    return tokenizer


def progress(done: int, total: int | None, started: float) -> None:
    rate = done / max(time.perf_counter() - started, 1e-9)
    if total:
        filled = int(30 * done / total)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} docs {rate:.0f}/s")
    else:
        sys.stderr.write(f"\r{done} docs {rate:.0f}/s")
    sys.stderr.flush()


def remove_written(writers: Iterable[ShardWriter], out_dir: Path, created: bool) -> None:
    """Undo a failed export: its shards, and the folder when the export made it."""
    for writer in writers:
        for entry in writer.files:
            (out_dir / entry["file"]).unlink(missing_ok=True)
    if created:
        try:
            out_dir.rmdir()
        except OSError:  # something else was put there meanwhile: leave it
            pass


def export_documents(documents: Iterable[str], tokenizer_path: Path, out_dir: Path, val_docs: int,
                     shard_tokens: int = 100_000_000, total: int | None = None, batch: int = 256) -> dict:
    """Encode and write documents; returns the manifest (also written as manifest.json).
    All or nothing: an error or an interrupt while reading the documents removes every
    shard written so far."""
    if val_docs < 0:
        raise InputError(f"val_docs={val_docs}: must be 0 or more")
    check_new_dataset_folder(out_dir)
    tokenizer = load_tokenizer(tokenizer_path)
    writers = {"val": ShardWriter(out_dir, "val", shard_tokens), "train": ShardWriter(out_dir, "train", shard_tokens)}
    counts = {"val": 0, "train": 0}
    started, done, pending = time.perf_counter(), 0, []
    created = not out_dir.exists()

    def encode_pending() -> None:
        nonlocal done
        for ids in tokenizer.encode(pending):
            split = "val" if done < val_docs else "train"
            writers[split].add(np.array([BOS_ID] + ids, dtype=np.uint16))
            counts[split] += 1
            done += 1
        pending.clear()
        progress(done, total, started)

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for document in documents:
            pending.append(document)
            if len(pending) == batch:
                encode_pending()
        encode_pending()
        for writer in writers.values():
            writer.flush()
        manifest = {"tokenizer": str(tokenizer_path), "tokenizer_sha256": file_sha256(tokenizer_path),
                    "documents": counts, "shard_tokens": shard_tokens,
                    "files": writers["val"].files + writers["train"].files}
        write_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=2).encode(), overwrite=False)
    except FileExistsError:
        remove_written(writers.values(), out_dir, created)
        raise InputError(f"{out_dir / MANIFEST}: appeared while exporting (another export into the same folder?)") from None
    except BaseException:  # Ctrl-C too: never leave a dataset that looks complete but is not
        remove_written(writers.values(), out_dir, created)
        raise
    finally:
        if done:  # end the progress line, so what follows is a line of its own
            sys.stderr.write("\n")
    return manifest


def utf8_text(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{where}: not UTF-8 text (byte {error.start} is {data[error.start]:#04x})") from None


def check_utf8(path: Path, block: int = 1 << 20) -> None:
    """Decode the whole file before any shard is written: a bad byte in the last input
    must not cost the tokenising of all the others."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as handle:
        while data := handle.read(block):
            try:
                decoder.decode(data)
            except UnicodeDecodeError as error:  # error.object is this block after the bytes held from the last one
                where = offset - (len(error.object) - len(data)) + error.start
                raise InputError(f"{path}: not UTF-8 text (byte {where} is {error.object[error.start]:#04x})") from None
            offset += len(data)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text (it ends inside a character)") from None


def json_text(line: str, text_field: str, where: str) -> str:
    try:
        text = json.loads(line)[text_field]
    except (json.JSONDecodeError, KeyError, TypeError, IndexError):
        text = None
    if not isinstance(text, str):  # a number or a list would fail deep in the tokenizer
        raise InputError(f"{where}: not a JSON object with a {text_field!r} field holding text")
    return text


def read_documents(paths: list[Path], text_field: str, blank_line_docs: bool) -> Iterator[str]:
    for path in paths:
        regular_file(path, "text file")
        if path.suffix == ".jsonl":
            with open(path, "rb") as handle:
                for number, raw in enumerate(handle, 1):
                    line = utf8_text(raw, f"{path}:{number}")
                    if line.strip():
                        yield json_text(line, text_field, f"{path}:{number}")
        else:
            text = utf8_text(path.read_bytes(), str(path))
            yield from ([p for p in text.split("\n\n") if p.strip()] if blank_line_docs else [text])


def check_arguments(args: argparse.Namespace) -> None:
    """The arguments and inputs, before any work (export_documents checks --out)."""
    if args.shard_tokens < 1:
        raise InputError(f"--shard-tokens {args.shard_tokens}: must be a positive integer")
    if args.val_docs < 0:
        raise InputError(f"--val-docs {args.val_docs}: must be 0 or more")
    for path in args.inputs:
        regular_file(path, "text file")
        check_utf8(path)
    regular_file(args.tokenizer, "tokenizer")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="a new folder (or one without shards and manifest)")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER, help="SentencePiece model")
    parser.add_argument("--val-docs", type=int, default=1000, help="documents in the validation split (0 or more)")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard at most (1 or more)")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--blank-line-docs", action="store_true", help="each blank-line-separated paragraph is a document")
    args = parser.parse_args(argv)
    try:
        check_arguments(args)
        manifest = export_documents(read_documents(args.inputs, args.text_field, args.blank_line_docs), args.tokenizer,
                                    args.out, args.val_docs, args.shard_tokens)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: the shards written to {args.out} were removed", file=sys.stderr)
        return 130
    tokens = sum(f["tokens"] for f in manifest["files"])
    print(f"wrote {len(manifest['files'])} shards, {tokens} tokens, {manifest['documents']} documents to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
