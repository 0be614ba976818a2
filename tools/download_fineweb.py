"""Download the challenge's FineWeb shards and tokenizer from Hugging Face.

    python tools/download_fineweb.py --variant sp1024 --train-shards 80

Files land where the trainer's defaults look: ./data/datasets/fineweb10B_sp1024/ and
./data/tokenizers/. The dataset repo's manifest (datasets/manifest.json) says which
shards and tokenizer files a variant has. Resumable: a shard already on disk that
passes the header-and-size check is skipped; one that fails is fetched again. Every
downloaded shard is checked; a bad one is deleted and reported.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
from pathlib import Path
from typing import Callable

from tools import ROOT
from trainer.settings import InputError
from trainer.shards import read_shard

REPO_ID = "willdepueoai/parameter-golf"
REMOTE_ROOT = "datasets"
Fetch = Callable[[str, Path], None]  # (path in the repo, local destination)


class ManifestError(ValueError):
    pass


def dataset_name(variant: str) -> str:
    if variant.startswith("sp") and variant[2:].isdigit():
        return f"fineweb10B_{variant}"
    if variant == "byte260":
        return "fineweb10B_byte260"
    raise ManifestError(f"--variant {variant!r}: expected sp<VOCAB> (e.g. sp1024) or byte260")


def plan_downloads(manifest: dict, variant: str, train_shards: int) -> list[str]:
    """Repository paths to fetch for a variant: validation shards, train shards, tokenizer files."""
    name = dataset_name(variant)
    dataset = next((d for d in manifest.get("datasets", []) if d.get("name") == name), None)
    if dataset is None:
        raise ManifestError(f"manifest has no dataset {name!r} (has: {[d.get('name') for d in manifest.get('datasets', [])]})")
    stats = dataset.get("stats") or {}
    if "files_train" not in stats or "files_val" not in stats:
        raise ManifestError(f"manifest entry {name!r} lacks stats.files_train / stats.files_val")
    if not 0 <= train_shards <= int(stats["files_train"]):
        raise ManifestError(f"--train-shards {train_shards}: {name} has {stats['files_train']} training shards")
    tokenizer = next((t for t in manifest.get("tokenizers", []) if t.get("name") == dataset.get("tokenizer_name")), None)
    if tokenizer is None:
        raise ManifestError(f"manifest has no tokenizer {dataset.get('tokenizer_name')!r} for {name}")
    tokenizer_files = [tokenizer[key] for key in ("model_path", "vocab_path", "path") if tokenizer.get(key)]
    if not tokenizer_files:
        raise ManifestError(f"tokenizer {tokenizer['name']!r} lists no files (model_path / vocab_path)")
    prefix = f"{REMOTE_ROOT}/datasets/{name}"
    return ([f"{prefix}/fineweb_val_{i:06d}.bin" for i in range(int(stats["files_val"]))]
            + [f"{prefix}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
            + [f"{REMOTE_ROOT}/{path}" for path in tokenizer_files])


def local_path(remote: str, out: Path) -> Path:
    """datasets/datasets/X/f.bin -> out/datasets/X/f.bin; datasets/tokenizers/t -> out/tokenizers/t."""
    parts = Path(remote).parts
    return out.joinpath(*(parts[1:] if parts[0] == REMOTE_ROOT else parts))


def is_complete(path: Path) -> bool:
    if not path.exists():
        return False
    if path.suffix != ".bin":
        return path.stat().st_size > 0
    try:
        read_shard(path)
        return True
    except InputError:
        return False


def download(remotes: list[str], out: Path, fetch: Fetch, log: Callable[[str], None] = print) -> list[Path]:
    """Fetch what is missing or broken; check every shard after it arrives."""
    written = []
    for index, remote in enumerate(remotes, 1):
        destination = local_path(remote, out)
        if is_complete(destination):
            continue
        fetch(remote, destination)
        if not is_complete(destination):
            destination.unlink(missing_ok=True)
            raise InputError(f"{destination}: downloaded file failed the header/size check and was deleted; run again")
        log(f"[{index}/{len(remotes)}] {destination}")
        written.append(destination)
    return written


def hugging_face_fetch(remote: str, destination: Path) -> None:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise SystemExit("error: the download needs huggingface_hub: pip install huggingface_hub") from None
    remote_path = Path(remote)
    cached = hf_hub_download(repo_id=REPO_ID, repo_type="dataset", filename=remote_path.name,
                             subfolder=remote_path.parent.as_posix())
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(destination.name + ".part")
    shutil.copyfile(Path(cached).resolve(), temporary)
    temporary.replace(destination)


def check_network(host: str = "huggingface.co") -> None:
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as error:
        raise SystemExit(f"error: cannot reach {host} ({error}); the download needs network access") from None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="sp1024")
    parser.add_argument("--train-shards", type=int, default=80)
    parser.add_argument("--out", type=Path, default=ROOT / "data")
    args = parser.parse_args()
    check_network()
    manifest_file = args.out / "manifest.json"
    try:
        hugging_face_fetch(f"{REMOTE_ROOT}/manifest.json", manifest_file)
        remotes = plan_downloads(json.loads(manifest_file.read_text()), args.variant, args.train_shards)
        download(remotes, args.out, hugging_face_fetch)
    except (ManifestError, InputError, json.JSONDecodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"done: {dataset_name(args.variant)} with {args.train_shards} training shards under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
