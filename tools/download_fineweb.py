"""Download the challenge's FineWeb shards and their tokenizer from Hugging Face.

    python tools/download_fineweb.py --variant sp1024 --train-shards 80
    python tools/download_fineweb.py --variant sp8192 --repo kevclark/parameter-golf   # PR #1493's data

Files land where the trainer's defaults look: ./data/datasets/fineweb10B_<variant>/ and
./data/tokenizers/ (e.g. fineweb10B_sp8192/ and fineweb_8192_bpe.model, where
PROFILE=pr1493 looks). The dataset repository's manifest (datasets/manifest.json) says
which shards and tokenizer files a variant has; the tokenizer always comes from the same
repository as the data, as each record did: the SP8192 data PR #1493 trained on is in
kevclark/parameter-golf, not in the challenge's repository (the default).

What is on disk is checked, never trusted for being there:
- a shard must pass the header-and-size check and hold the token count the repository's
  manifest implies (from its shard size and the split's token total, when it gives both);
  one that fails is fetched again, and every fetched shard is checked before it lands;
- the tokenizer files are fetched on every run (they are small) and must equal the files
  already on disk, which are never replaced: a different file there is refused;
- the dataset folder gets a manifest.json naming the repository, the dataset and the
  tokenizer's sha256, so the trainer refuses the shards with another tokenizer. A folder
  whose manifest names other data (another repository, or shards exported or built with
  another tool) is refused before anything is downloaded.

Exit status: 2 for bad arguments or a folder holding other data (found before the
network is used), 1 for a failed download.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from tools import ROOT
from trainer.files import file_sha256, temporary_name, write_atomic
from trainer.settings import InputError
from trainer.shards import MANIFEST, read_shard

REPO_ID = "willdepueoai/parameter-golf"  # the challenge's dataset repository
REMOTE_ROOT = "datasets"  # the export's folder inside the repository (as the challenge's own downloader has it)
REPO_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
Fetch = Callable[[str, Path], None]  # (path in the repo, local destination)


class ManifestError(ValueError):
    """The repository's manifest lacks what the download needs: exit status 1."""


class DownloadError(RuntimeError):
    """A fetch failed or brought a file that fails its check: exit status 1."""


@dataclass(frozen=True)
class Shard:
    remote: str
    tokens: int | None  # what the repository's manifest implies; None where it does not say


@dataclass(frozen=True)
class Plan:
    dataset: str
    shards: tuple[Shard, ...]
    tokenizer_files: tuple[str, ...]  # the model first
    vocab_size: int | None
    stats: dict


def dataset_name(variant: str) -> str:
    if variant.startswith("sp") and variant[2:].isdigit():
        return f"fineweb10B_{variant}"
    if variant == "byte260":
        return "fineweb10B_byte260"
    raise InputError(f"--variant {variant!r}: expected sp<VOCAB> (e.g. sp1024, sp8192) or byte260")


def shard_tokens(shard_size: object, total: object, files: int) -> list[int | None]:
    """Tokens per shard as the challenge's exporter lays a split out (full shards of
    shard_size, the rest in the last one); None for each where the manifest does not give
    both numbers or they do not fit that layout."""
    if (not isinstance(shard_size, int) or not isinstance(total, int) or shard_size < 1 or files < 1
            or not (files - 1) * shard_size < total <= files * shard_size):
        return [None] * files
    return [shard_size] * (files - 1) + [total - shard_size * (files - 1)]


def repository_file(path: object, what: str) -> str:
    """A path the manifest names, kept inside the export (a manifest is remote input)."""
    parts = PurePosixPath(str(path)).parts
    if not parts or PurePosixPath(str(path)).is_absolute() or ".." in parts:
        raise ManifestError(f"{what} {path!r} is not a path inside the repository's export")
    return f"{REMOTE_ROOT}/{PurePosixPath(*parts)}"


def plan_downloads(manifest: dict, variant: str, train_shards: int) -> Plan:
    """What to fetch for a variant: the validation shards, the first train_shards training
    shards and the tokenizer files, with each shard's expected token count."""
    name = dataset_name(variant)
    datasets = manifest.get("datasets", []) if isinstance(manifest, dict) else []
    dataset = next((d for d in datasets if isinstance(d, dict) and d.get("name") == name), None)
    if dataset is None:
        hint = " (PR #1493's SP8192 data is in --repo kevclark/parameter-golf)" if variant == "sp8192" else ""
        raise ManifestError(f"manifest has no dataset {name!r} (has: {[d.get('name') for d in datasets]}){hint}")
    stats = dataset.get("stats") or {}
    if not isinstance(stats.get("files_train"), int) or not isinstance(stats.get("files_val"), int):
        raise ManifestError(f"manifest entry {name!r} lacks stats.files_train / stats.files_val")
    if not 0 <= train_shards <= stats["files_train"]:  # an argument the repository says is wrong: bad input
        raise InputError(f"--train-shards {train_shards}: {name} has {stats['files_train']} training shards")
    tokenizers = manifest.get("tokenizers", [])
    tokenizer = next((t for t in tokenizers if isinstance(t, dict) and t.get("name") == dataset.get("tokenizer_name")), None)
    if tokenizer is None:
        raise ManifestError(f"manifest has no tokenizer {dataset.get('tokenizer_name')!r} for {name}")
    tokenizer_files = tuple(repository_file(tokenizer[key], "tokenizer file")
                            for key in ("model_path", "vocab_path", "path") if tokenizer.get(key))
    if not tokenizer_files:
        raise ManifestError(f"tokenizer {tokenizer['name']!r} lists no files (model_path / vocab_path)")
    shard_size = dataset.get("shard_size", manifest.get("shard_size"))
    prefix = f"{REMOTE_ROOT}/datasets/{name}"
    val = shard_tokens(shard_size, stats.get("tokens_val"), stats["files_val"])
    train = shard_tokens(shard_size, stats.get("tokens_train"), stats["files_train"])[:train_shards]
    shards = ([Shard(f"{prefix}/fineweb_val_{i:06d}.bin", tokens) for i, tokens in enumerate(val)]
              + [Shard(f"{prefix}/fineweb_train_{i:06d}.bin", tokens) for i, tokens in enumerate(train)])
    vocab_size = tokenizer.get("vocab_size", dataset.get("vocab_size"))
    return Plan(name, tuple(shards), tokenizer_files, vocab_size if isinstance(vocab_size, int) else None, stats)


def local_path(remote: str, out: Path) -> Path:
    """datasets/datasets/X/f.bin -> out/datasets/X/f.bin; datasets/tokenizers/t -> out/tokenizers/t."""
    parts = Path(remote).parts
    return out.joinpath(*(parts[1:] if parts[0] == REMOTE_ROOT else parts))


def shard_problem(path: Path, tokens: int | None) -> str | None:
    """Why the shard at `path` is not the planned one, or None when it is."""
    try:
        count = read_shard(path).size
    except InputError as error:
        return str(error)
    if tokens is not None and count != tokens:
        return f"{path}: {count} tokens where the repository's manifest implies {tokens}"
    return None


def tokenizer_problem(path: Path, vocab_size: int | None, model: bool) -> str | None:
    """Why a fetched tokenizer file is not usable (an error page, another vocabulary), or None."""
    if path.stat().st_size == 0:
        return f"{path}: empty"
    if not model:
        return None
    import sentencepiece

    try:
        pieces = sentencepiece.SentencePieceProcessor(model_file=str(path)).vocab_size()
    except (OSError, RuntimeError) as error:
        return f"{path}: not a SentencePiece model ({error})"
    if vocab_size is not None and pieces != vocab_size:
        return f"{path}: {pieces} pieces where the repository's manifest says {vocab_size}"
    return None


def fetch_checked(remote: str, destination: Path, fetch: Fetch, problem: Callable[[Path], str | None]) -> Path:
    """Fetch to a temporary name beside the destination and check it there, so a file that
    fails its check never lands under the real name; the caller moves it into place."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(destination, os.getpid())
    try:
        fetch(remote, temporary)
        trouble = problem(temporary) if temporary.is_file() else f"{temporary}: the fetch wrote nothing"
    except BaseException:  # a failed or interrupted fetch leaves no partial file
        temporary.unlink(missing_ok=True)
        raise
    if trouble:
        temporary.unlink(missing_ok=True)
        raise DownloadError(f"{destination}: the downloaded file failed its check and was deleted ({trouble}); run again")
    return temporary


def download_shards(plan: Plan, out: Path, fetch: Fetch, log: Callable[[str], None] = print) -> list[Path]:
    """Fetch every planned shard that is missing or fails its check; a broken shard is
    replaced by the fetched one only after that one passed."""
    written = []
    for index, shard in enumerate(plan.shards, 1):
        destination = local_path(shard.remote, out)
        if shard_problem(destination, shard.tokens) is None:
            continue
        temporary = fetch_checked(shard.remote, destination, fetch, lambda path: shard_problem(path, shard.tokens))
        os.replace(temporary, destination)
        log(f"[{index}/{len(plan.shards)}] {destination}")
        written.append(destination)
    return written


def download_tokenizer(plan: Plan, out: Path, fetch: Fetch) -> Path:
    """Fetch the tokenizer files and put each in place unless an equal one is there; a
    different file there is refused, never replaced. Returns the model's path."""
    for remote in plan.tokenizer_files:
        destination = local_path(remote, out)
        model = remote.endswith(".model")
        temporary = fetch_checked(remote, destination, fetch, lambda path: tokenizer_problem(path, plan.vocab_size, model))
        try:
            if destination.exists() and file_sha256(destination) != file_sha256(temporary):
                raise InputError(f"{destination}: differs from the repository's {remote} (sha256 "
                                 f"{file_sha256(destination)[:16]} here, {file_sha256(temporary)[:16]} there); "
                                 "it is not that tokenizer: move it away and run again")
            if not destination.exists():
                os.link(temporary, destination)  # never replaces a file that appeared meanwhile
        finally:
            temporary.unlink(missing_ok=True)
    return local_path(plan.tokenizer_files[0], out)


def recorded_download(folder: Path, source: dict) -> str | None:
    """The tokenizer sha256 an earlier download of the same data recorded in the folder's
    manifest; None for a new folder (or shards without a manifest, from an older
    downloader). A manifest of other data is refused: mixing the two would change what a
    run trains on, and replacing it would lose what made them."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: not a folder (the dataset folder of --out)")
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not a readable manifest ({error}); move it away to download here") from None
    if manifest.get("source") != source:
        made_by = (f"data from {manifest['source']}" if "source" in manifest
                   else f"shards made by another tool with tokenizer {str(manifest.get('tokenizer_sha256'))[:16]}")
        raise InputError(f"{folder}: already holds {made_by}, not {source['repo']}'s {source['dataset']}; "
                         "choose another --out or move that folder away")
    recorded = manifest.get("tokenizer_sha256")
    return recorded if isinstance(recorded, str) else None


def check_recorded_tokenizer(folder: Path, source: dict, recorded: str | None, tokenizer: Path) -> str:
    """The tokenizer's sha256, when it is the one an earlier download recorded (or none was)."""
    sha256 = file_sha256(tokenizer)
    if recorded is not None and recorded != sha256:
        raise InputError(f"{folder / MANIFEST}: records tokenizer sha256 {recorded[:16]}, but {source['repo']}'s "
                         f"tokenizer is now {sha256[:16]}: download into another --out")
    return sha256


def write_dataset_manifest(out: Path, source: dict, plan: Plan, tokenizer: Path, recorded: str | None) -> dict:
    """The dataset folder's manifest.json: where the shards came from and which tokenizer
    they need. Replaces only a manifest of the same data and tokenizer."""
    folder = out / "datasets" / plan.dataset
    manifest = {"source": source, "tokenizer": tokenizer.name,
                "tokenizer_sha256": check_recorded_tokenizer(folder, source, recorded, tokenizer),
                "vocab_size": plan.vocab_size, "remote_stats": plan.stats,
                "files": [{"file": Path(shard.remote).name, "tokens": int(read_shard(local_path(shard.remote, out)).size)}
                          for shard in plan.shards]}
    try:
        write_atomic(folder / MANIFEST, json.dumps(manifest, indent=2).encode(), overwrite=recorded is not None)
    except FileExistsError:
        raise InputError(f"{folder / MANIFEST}: appeared during the download; run again to check it") from None
    return manifest


def read_remote_manifest(fetch: Fetch) -> dict:
    """The repository's manifest, read from a temporary copy (the local data/manifest.json
    of another downloader is left alone)."""
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / "manifest.json"
        fetch(f"{REMOTE_ROOT}/manifest.json", copy)
        try:
            manifest = json.loads(copy.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise DownloadError(f"{REMOTE_ROOT}/manifest.json: not a JSON manifest ({error})") from None
    if not isinstance(manifest, dict):
        raise DownloadError(f"{REMOTE_ROOT}/manifest.json: not a JSON object")
    return manifest


def hugging_face_fetcher(repo: str) -> Fetch:
    def fetch(remote: str, destination: Path) -> None:
        from huggingface_hub import hf_hub_download

        remote_path = Path(remote)
        try:
            cached = hf_hub_download(repo_id=repo, repo_type="dataset", filename=remote_path.name,
                                     subfolder=remote_path.parent.as_posix())
        except Exception as error:  # the hub raises many kinds (HTTP, missing entry, timeout): each is one line
            first_line = (str(error).strip().splitlines() or [""])[0]
            raise DownloadError(f"{repo}: {remote}: {type(error).__name__}: {first_line}") from None
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(cached).resolve(), destination)

    return fetch


def check_network(host: str = "huggingface.co") -> None:
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as error:
        raise DownloadError(f"cannot reach {host} ({error}); the download needs network access") from None


def check_arguments(args: argparse.Namespace) -> dict:
    """Everything that can be checked without the network; returns the download's source."""
    if not REPO_NAME.fullmatch(args.repo):
        raise InputError(f"--repo {args.repo!r}: expected a Hugging Face dataset repository, owner/name")
    if args.train_shards < 0:
        raise InputError(f"--train-shards {args.train_shards}: must be 0 or more")
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out}: not a folder")
    source = {"repo": args.repo, "dataset": dataset_name(args.variant)}
    recorded_download(args.out / "datasets" / source["dataset"], source)
    return source


def download(args: argparse.Namespace, source: dict, fetch: Fetch) -> Plan:
    """The whole download: plan, tokenizer (checked against the folder's manifest before
    any shard is fetched), shards, then the folder's manifest."""
    folder = args.out / "datasets" / source["dataset"]
    plan = plan_downloads(read_remote_manifest(fetch), args.variant, args.train_shards)
    recorded = recorded_download(folder, source)  # again: another download may have written it meanwhile
    tokenizer = download_tokenizer(plan, args.out, fetch)
    check_recorded_tokenizer(folder, source, recorded, tokenizer)  # before any shard is fetched
    download_shards(plan, args.out, fetch)
    write_dataset_manifest(args.out, source, plan, tokenizer, recorded)
    return plan


def main(argv: list[str] | None = None, fetch: Fetch | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="sp1024", help="sp<VOCAB> (sp1024, sp8192, ...) or byte260")
    parser.add_argument("--train-shards", type=int, default=80, help="training shards to fetch (100M tokens each)")
    parser.add_argument("--repo", default=REPO_ID, help=f"Hugging Face dataset repository (default {REPO_ID}; "
                        "kevclark/parameter-golf for PR #1493's sp8192)")
    parser.add_argument("--out", type=Path, default=ROOT / "data", help="data folder (default: the repository's ./data)")
    args = parser.parse_args(argv)
    try:
        source = check_arguments(args)
        if fetch is None:
            if importlib.util.find_spec("huggingface_hub") is None:
                raise InputError("the download needs huggingface_hub: pip install huggingface_hub")
            check_network()
            fetch = hugging_face_fetcher(args.repo)
        plan = download(args, source, fetch)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (ManifestError, DownloadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # what was fetched is kept (each file whole and checked): a rerun resumes
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    print(f"done: {plan.dataset} from {args.repo} with {args.train_shards} training shards under {args.out}; "
          f"tokenizer {local_path(plan.tokenizer_files[0], args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
