"""tools/ for data: the FineWeb download (a fake hub, no network), text export, the proxy
corpus and its tokenizer. Every data tool refuses to replace data, records the tokenizer's
sha256 with its shards, and says what is wrong with bad input in one line."""

from __future__ import annotations

import json
import lzma
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from tools import build_proxy_corpus
from tools import download_fineweb
from tools import export_text
from trainer.files import file_sha256
from trainer.settings import InputError
from trainer.shards import BOS_ID, MANIFEST, read_shard, recorded_tokenizer, write_shard
from conftest import ROOT, TOKENIZER

MANIFEST_1024 = {"datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
                               "stats": {"files_train": 80, "files_val": 1}}],
                 "tokenizers": [{"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
                                 "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}]}


def one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    return captured.err


def folder_state(folder: Path) -> dict[str, bytes]:
    """Every file under a folder (hidden ones too) with its bytes: 'nothing touched' is equality."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -----------------------------------------------------------------------------
# download_fineweb: planning
# -----------------------------------------------------------------------------

def test_plan_lists_validation_training_and_tokenizer_files():
    plan = download_fineweb.plan_downloads(MANIFEST_1024, "sp1024", 2)
    assert [s.remote for s in plan.shards] == ["datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
                                               "datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin",
                                               "datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin"]
    assert plan.tokenizer_files == ("datasets/tokenizers/fineweb_1024_bpe.model", "datasets/tokenizers/fineweb_1024_bpe.vocab")
    assert [s.tokens for s in plan.shards] == [None] * 3  # this manifest gives no sizes: the header check only


def test_plan_expects_the_token_counts_the_exporter_lays_out():
    manifest = {**MANIFEST_1024, "shard_size": 1000}
    manifest["datasets"] = [{**MANIFEST_1024["datasets"][0],
                             "stats": {"files_val": 2, "files_train": 3, "tokens_val": 1500, "tokens_train": 2001}}]
    plan = download_fineweb.plan_downloads(manifest, "sp1024", 3)
    assert [s.tokens for s in plan.shards] == [1000, 500, 1000, 1000, 1]
    assert download_fineweb.shard_tokens(1000, 3001, 3) == [None] * 3  # numbers that do not fit: nothing claimed
    assert download_fineweb.shard_tokens(None, 3000, 3) == [None] * 3


def test_more_training_shards_than_the_repository_has_is_bad_input():
    with pytest.raises(InputError, match="--train-shards 81: fineweb10B_sp1024 has 80 training shards"):
        download_fineweb.plan_downloads(MANIFEST_1024, "sp1024", 81)


def test_files_land_where_the_trainer_looks(tmp_path):
    shard = download_fineweb.local_path("datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin", tmp_path)
    tokenizer = download_fineweb.local_path("datasets/tokenizers/fineweb_1024_bpe.model", tmp_path)
    assert shard == tmp_path / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin"
    assert tokenizer == tmp_path / "tokenizers" / "fineweb_1024_bpe.model"


@pytest.mark.parametrize("manifest, variant, shards, message", [
    ({"datasets": []}, "sp1024", 1, "manifest has no dataset 'fineweb10B_sp1024'"),
    ({"datasets": []}, "sp8192", 1, "is in --repo kevclark/parameter-golf"),
    ({"datasets": [{"name": "fineweb10B_sp1024"}]}, "sp1024", 1, "lacks stats.files_train"),
    ({**MANIFEST_1024, "tokenizers": []}, "sp1024", 1, "manifest has no tokenizer 'sp_bpe_1024'"),
    ({**MANIFEST_1024, "tokenizers": [{"name": "sp_bpe_1024", "model_path": "../../.bashrc"}]}, "sp1024", 1,
     "not a path inside the repository's export"),
])
def test_bad_manifests_say_what_is_missing(manifest, variant, shards, message):
    with pytest.raises(download_fineweb.ManifestError, match=message.replace("(", r"\(").replace("[", r"\[")):
        download_fineweb.plan_downloads(manifest, variant, shards)


# -----------------------------------------------------------------------------
# download_fineweb: a fake dataset repository, laid out as the challenge's exporter does
# -----------------------------------------------------------------------------

def shard_bytes(tmp_path: Path, tokens: np.ndarray) -> bytes:
    write_shard(tmp_path / "shard.tmp.bin", tokens)
    data = (tmp_path / "shard.tmp.bin").read_bytes()
    (tmp_path / "shard.tmp.bin").unlink()
    return data


class FakeHub:
    """One dataset repository: {path in the repo: bytes}; records what was fetched. The
    sp8192 tokenizer's bytes are the vendored SP1024 model's (its manifest says 1024
    pieces): only the bytes and the piece count matter to the download."""

    def __init__(self, tmp_path: Path, shard_size: int = 100, val_tokens: int = 130, train_tokens: int = 250):
        rng = np.random.default_rng(0)
        stats = {"files_val": -(-val_tokens // shard_size), "files_train": -(-train_tokens // shard_size),
                 "tokens_val": val_tokens, "tokens_train": train_tokens}
        manifest = {"shard_size": shard_size, "datasets": [{"name": "fineweb10B_sp8192", "tokenizer_name": "sp_bpe_8192",
                                                            "vocab_size": 1024, "stats": stats}],
                    "tokenizers": [{"name": "sp_bpe_8192", "vocab_size": 1024, "model_path": "tokenizers/fineweb_8192_bpe.model",
                                    "vocab_path": "tokenizers/fineweb_8192_bpe.vocab"}]}
        self.files = {"datasets/manifest.json": json.dumps(manifest).encode(),
                      "datasets/tokenizers/fineweb_8192_bpe.model": TOKENIZER.read_bytes(),
                      "datasets/tokenizers/fineweb_8192_bpe.vocab": b"<unk>\t0\n"}
        for split, total in (("val", val_tokens), ("train", train_tokens)):
            for index, start in enumerate(range(0, total, shard_size)):
                tokens = rng.integers(0, 1024, min(shard_size, total - start))
                self.files[f"datasets/datasets/fineweb10B_sp8192/fineweb_{split}_{index:06d}.bin"] = shard_bytes(tmp_path, tokens)
        self.fetched: list[str] = []

    def fetch(self, remote: str, destination: Path) -> None:
        self.fetched.append(remote)
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(self.files[remote])

    def shards_fetched(self) -> list[str]:
        return [Path(r).name for r in self.fetched if r.endswith(".bin")]


SP8192 = ["--variant", "sp8192", "--repo", "kevclark/parameter-golf"]


def download(out: Path, hub: FakeHub, *extra: str) -> int:
    shards = [] if "--train-shards" in extra else ["--train-shards", "1"]
    return download_fineweb.main([*SP8192, "--out", str(out), *shards, *extra], fetch=hub.fetch)


def test_sp8192_lands_where_pr1493_looks_with_its_own_tokenizer_recorded(tmp_path, capsys):
    hub, out = FakeHub(tmp_path), tmp_path / "data"
    assert download(out, hub, "--train-shards", "2") == 0
    folder, tokenizer = out / "datasets" / "fineweb10B_sp8192", out / "tokenizers" / "fineweb_8192_bpe.model"
    assert sorted(p.name for p in folder.glob("*.bin")) == ["fineweb_train_000000.bin", "fineweb_train_000001.bin",
                                                            "fineweb_val_000000.bin", "fineweb_val_000001.bin"]
    assert tokenizer.read_bytes() == hub.files["datasets/tokenizers/fineweb_8192_bpe.model"]  # beside the data, same repo
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["source"] == {"repo": "kevclark/parameter-golf", "dataset": "fineweb10B_sp8192"}
    assert recorded_tokenizer(folder) == file_sha256(tokenizer)  # what the trainer checks TOKENIZER_PATH against
    assert [f["tokens"] for f in manifest["files"]] == [100, 30, 100, 100]
    assert not (out / MANIFEST).exists()  # the repository's manifest is read, not left in data/
    assert not [p for p in out.rglob(".*")]  # no temporary file left
    assert "fineweb10B_sp8192 from kevclark/parameter-golf" in capsys.readouterr().out


def test_the_hub_fetch_asks_the_chosen_repository(tmp_path, monkeypatch):
    asked = []
    cached = tmp_path / "cache" / "blob"
    cached.parent.mkdir()
    cached.write_bytes(b"model")

    def hf_hub_download(repo_id, repo_type, filename, subfolder):
        asked.append((repo_id, repo_type, subfolder, filename))
        return str(cached)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=hf_hub_download))
    download_fineweb.hugging_face_fetcher("kevclark/parameter-golf")("datasets/tokenizers/fineweb_8192_bpe.model", tmp_path / "t")
    assert asked == [("kevclark/parameter-golf", "dataset", "datasets/tokenizers", "fineweb_8192_bpe.model")]
    assert (tmp_path / "t").read_bytes() == b"model"

    def failing(**kwargs):
        raise OSError("404 Client Error\nEntry Not Found for url: https://huggingface.co/...")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=failing))
    with pytest.raises(download_fineweb.DownloadError, match=r"^kevclark/parameter-golf: datasets/x.bin: OSError: 404 Client Error$"):
        download_fineweb.hugging_face_fetcher("kevclark/parameter-golf")("datasets/x.bin", tmp_path / "x")


def test_download_verifies_what_it_has_and_fetches_only_what_fails(tmp_path):
    hub, out = FakeHub(tmp_path), tmp_path / "data"
    assert download(out, hub, "--train-shards", "2") == 0
    folder = out / "datasets" / "fineweb10B_sp8192"
    truncated = folder / "fineweb_val_000000.bin"
    truncated.write_bytes(truncated.read_bytes()[:-7])  # fails the header-and-size check
    write_shard(folder / "fineweb_train_000001.bin", np.arange(50))  # a valid shard, but not the repository's size
    hub.fetched.clear()
    assert download(out, hub, "--train-shards", "2") == 0
    assert hub.shards_fetched() == ["fineweb_val_000000.bin", "fineweb_train_000001.bin"]
    on_disk = {p.name: p.read_bytes() for p in folder.glob("*.bin")}
    assert on_disk == {Path(r).name: data for r, data in hub.files.items() if r.endswith(".bin") and "000002" not in r}
    hub.fetched.clear()
    assert download(out, hub, "--train-shards", "2") == 0
    assert hub.shards_fetched() == []  # everything in place: only the manifest and the tokenizer files are read


def test_a_bad_download_is_deleted_and_reported(tmp_path, capsys):
    hub, out = FakeHub(tmp_path), tmp_path / "data"
    hub.files["datasets/datasets/fineweb10B_sp8192/fineweb_val_000001.bin"] = b"<html>rate limited</html>" * 50
    assert download(out, hub, "--train-shards", "0") == 1
    assert "fineweb_val_000001.bin: the downloaded file failed its check and was deleted" in one_line_error(capsys)
    folder = out / "datasets" / "fineweb10B_sp8192"
    assert sorted(p.name for p in folder.iterdir()) == ["fineweb_val_000000.bin"]  # no temporary file, no manifest


def test_a_bad_tokenizer_download_is_refused(tmp_path, capsys):
    hub, out = FakeHub(tmp_path), tmp_path / "data"
    hub.files["datasets/tokenizers/fineweb_8192_bpe.model"] = b"<html>rate limited</html>"
    assert download(out, hub) == 1
    assert "not a SentencePiece model" in one_line_error(capsys)
    assert hub.shards_fetched() == [] and not (out / "tokenizers" / "fineweb_8192_bpe.model").exists()


def test_a_tokenizer_of_another_vocabulary_is_refused(tmp_path, capsys):
    hub, out = FakeHub(tmp_path), tmp_path / "data"
    manifest = json.loads(hub.files["datasets/manifest.json"])
    manifest["tokenizers"][0]["vocab_size"] = 8192
    hub.files["datasets/manifest.json"] = json.dumps(manifest).encode()
    assert download(out, hub) == 1
    assert "1024 pieces where the repository's manifest says 8192" in one_line_error(capsys)
    assert hub.shards_fetched() == [] and not (out / "tokenizers" / "fineweb_8192_bpe.model").exists()


def test_an_interrupted_fetch_leaves_no_partial_file(tmp_path, capsys):
    hub, out = FakeHub(tmp_path), tmp_path / "data"

    def cut_off(remote: str, destination: Path) -> None:
        if remote.endswith("fineweb_val_000001.bin"):
            destination.write_bytes(hub.files[remote][:500])
            raise download_fineweb.DownloadError("connection reset")
        hub.fetch(remote, destination)

    assert download_fineweb.main([*SP8192, "--out", str(out), "--train-shards", "0"], fetch=cut_off) == 1
    assert one_line_error(capsys) == "error: connection reset\n"
    assert sorted(p.name for p in (out / "datasets" / "fineweb10B_sp8192").iterdir()) == ["fineweb_val_000000.bin"]


def test_a_tokenizer_on_disk_that_differs_is_refused_never_replaced(tmp_path, capsys):
    hub, out = FakeHub(tmp_path), tmp_path / "data"
    mine = out / "tokenizers" / "fineweb_8192_bpe.model"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"someone's own tokenizer")
    assert download(out, hub) == 2
    assert f"{mine}: differs from the repository's" in one_line_error(capsys)
    assert mine.read_bytes() == b"someone's own tokenizer" and hub.shards_fetched() == []


def test_a_folder_recording_another_tokenizer_is_refused_before_any_shard(tmp_path, capsys):
    hub, out = FakeHub(tmp_path), tmp_path / "data"
    assert download(out, hub, "--train-shards", "1") == 0
    manifest = out / "datasets" / "fineweb10B_sp8192" / MANIFEST
    recorded = json.loads(manifest.read_text())
    recorded["tokenizer_sha256"] = "0" * 64  # as if the repository had changed its tokenizer since
    manifest.write_text(json.dumps(recorded))
    before = folder_state(out / "datasets")
    hub.fetched.clear()
    assert download(out, hub, "--train-shards", "2") == 2
    assert "records tokenizer sha256 0000000000000000, but kevclark/parameter-golf's tokenizer is now" in one_line_error(capsys)
    assert hub.shards_fetched() == [] and folder_state(out / "datasets") == before


def test_a_folder_of_other_data_is_refused_before_the_network(tmp_path, capsys, monkeypatch):
    out = tmp_path / "data"
    folder = out / "datasets" / "fineweb10B_sp8192"
    export_text.export_documents(["my own text"] * 3, TOKENIZER, folder, val_docs=1)
    capsys.readouterr()
    monkeypatch.setattr(download_fineweb, "check_network", lambda: pytest.fail("the network was used"))
    assert download_fineweb.main([*SP8192, "--out", str(out)]) == 2
    assert f"{folder}: already holds shards made by another tool" in one_line_error(capsys)
    (folder / MANIFEST).write_text(json.dumps({"source": {"repo": "willdepueoai/parameter-golf", "dataset": "fineweb10B_sp8192"}}))
    before = folder_state(out)
    assert download_fineweb.main([*SP8192, "--out", str(out)]) == 2
    assert "already holds data from {'repo': 'willdepueoai/parameter-golf'" in one_line_error(capsys)
    assert folder_state(out) == before


@pytest.mark.parametrize("arguments, message", [
    (["--train-shards", "-1"], "--train-shards -1: must be 0 or more"),
    (["--variant", "gpt2"], "--variant 'gpt2': expected sp<VOCAB>"),
    (["--repo", "kevclark"], "--repo 'kevclark': expected a Hugging Face dataset repository, owner/name"),
    (["--out", "{file}"], "--out {file}: not a folder"),
])
def test_bad_arguments_are_one_line_before_the_network(tmp_path, capsys, monkeypatch, arguments, message):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setattr(download_fineweb, "check_network", lambda: pytest.fail("the network was used"))
    arguments = [a.replace("{file}", str(tmp_path / "file")) for a in arguments]
    assert download_fineweb.main(["--out", str(tmp_path / "data"), *arguments]) == 2
    assert message.replace("{file}", str(tmp_path / "file")) in one_line_error(capsys)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("tool", ["download_fineweb", "export_text", "build_proxy_corpus"])
def test_help_never_imports_torch(tool):
    """The data tools run where torch is not installed, and --help is instant."""
    done = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "tools" / f"{tool}.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "usage:" in done.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    assert "numpy" in imported  # the check sees the imports
    assert not [name for name in imported if name.split(".")[0] == "torch"]


# -----------------------------------------------------------------------------
# export_text
# -----------------------------------------------------------------------------

DOCUMENTS = [f"Document number {i} says hello to the world." for i in range(7)] + ["A longer one. " * 40]


def test_export_writes_bos_separated_documents_and_splits_by_count(tmp_path, tokenizer):
    manifest = export_text.export_documents(DOCUMENTS, TOKENIZER, tmp_path, val_docs=3, shard_tokens=64)
    assert manifest["documents"] == {"val": 3, "train": 5}
    for split, expected in (("val", DOCUMENTS[:3]), ("train", DOCUMENTS[3:])):
        files = sorted(tmp_path.glob(f"fineweb_{split}_*.bin"))
        tokens = np.concatenate([np.asarray(read_shard(f)) for f in files])
        assert all(read_shard(f).size <= 64 for f in files)
        assert tokens[0] == BOS_ID and (tokens == BOS_ID).sum() == len(expected)
        pieces = np.split(tokens, np.flatnonzero(tokens == BOS_ID))[1:]
        assert [tokenizer.decode(p[1:].tolist()) for p in pieces] == [d.strip() for d in expected]
    assert len(manifest["files"]) > 2  # small shards: several of them
    listed = {f["file"]: f["tokens"] for f in manifest["files"]}
    assert listed == {p.name: int(read_shard(p).size) for p in tmp_path.glob("*.bin")}
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert recorded_tokenizer(tmp_path) == file_sha256(TOKENIZER)


def test_export_reads_jsonl_and_text_files(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "first"}\n\n{"text": "second", "id": 2}\n')
    (tmp_path / "b.txt").write_text("para one\n\npara two\n")
    docs = list(export_text.read_documents([tmp_path / "a.jsonl", tmp_path / "b.txt"], "text", blank_line_docs=True))
    assert docs == ["first", "second", "para one", "para two\n"]
    for line in ('{"body": "x"}', '{"text": 5}', '["text"]', "not json"):
        (tmp_path / "bad.jsonl").write_text(line + "\n")
        with pytest.raises(InputError, match="bad.jsonl:1: not a JSON object with a 'text' field holding text"):
            list(export_text.read_documents([tmp_path / "bad.jsonl"], "text", blank_line_docs=False))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    for bad, message in (("latin1.jsonl", "latin1.jsonl:2: not UTF-8 text (byte 13 is 0xe9)"),
                         ("latin1.txt", "latin1.txt: not UTF-8 text (byte 3 is 0xe9)"), ("", "not a regular file")):
        with pytest.raises(InputError, match=re.escape(message)):
            list(export_text.read_documents([tmp_path / bad], "text", blank_line_docs=False))


@pytest.mark.parametrize("held", ["fineweb_val_000000.bin", "fineweb_train_000003.bin", MANIFEST])
def test_export_never_touches_a_folder_that_holds_a_dataset(tmp_path, capsys, held):
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / held).write_bytes(b"what was there")
    (tmp_path / "new.txt").write_text("new text " * 100)
    before = folder_state(folder)
    assert export_text.main([str(tmp_path / "new.txt"), "--out", str(folder), "--val-docs", "0"]) == 2
    assert f"{folder}: already holds a dataset ({held})" in one_line_error(capsys)
    assert folder_state(folder) == before


@pytest.mark.parametrize("arguments, message", [
    (["{text}", "--shard-tokens", "0"], "--shard-tokens 0: must be a positive integer"),
    (["{text}", "--shard-tokens", "-5"], "--shard-tokens -5: must be a positive integer"),
    (["{text}", "--val-docs", "-1"], "--val-docs -1: must be 0 or more"),
    (["{text}", "{tmp}"], "{tmp}: not a regular file"),  # after a long input: found before any work
    (["{text}", "{tmp}/missing.txt"], "{tmp}/missing.txt: no such text file"),
    (["{text}", "{latin1}"], "{latin1}: not UTF-8 text (byte 3 is 0xe9)"),
    (["{jsonl}"], "{jsonl}: not UTF-8 text (byte 27 is 0xff)"),
    (["{text}", "--out", "{text}"], "{text}: not a folder"),
    (["{text}", "--tokenizer", "{text}"], "{text}: not a SentencePiece model"),
])
def test_export_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, arguments, message):
    names = {"{tmp}": str(tmp_path), "{text}": str(tmp_path / "a.txt"), "{latin1}": str(tmp_path / "b.txt"),
             "{jsonl}": str(tmp_path / "c.jsonl")}
    (tmp_path / "a.txt").write_text("\n\n".join(f"Paragraph {i} of plain text." for i in range(600)))
    (tmp_path / "b.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    (tmp_path / "c.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "\xff"}\n')

    def named(text: str) -> str:
        for key, value in names.items():
            text = text.replace(key, value)
        return text

    before = folder_state(tmp_path)
    arguments = [named(a) for a in arguments]
    defaults = ["--out", str(tmp_path / "out")] if "--out" not in arguments else []
    assert export_text.main([*arguments, *defaults, "--blank-line-docs", "--shard-tokens" if "--shard-tokens" not in arguments else "--val-docs",
                             "64" if "--shard-tokens" not in arguments else "1"]) == 2
    assert named(message) in one_line_error(capsys)
    assert folder_state(tmp_path) == before and not (tmp_path / "out").exists()


def test_an_error_found_while_exporting_is_a_line_of_its_own_after_the_progress(tmp_path, capsys):
    lines = [json.dumps({"text": f"Document {i}."}) for i in range(300)] + ['{"body": "no text"}']
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    assert export_text.main([str(tmp_path / "docs.jsonl"), "--out", str(tmp_path / "out"), "--shard-tokens", "64"]) == 2
    err = capsys.readouterr().err
    assert "docs" in err.split("\n")[0]  # the progress was shown (documents were encoded) ...
    assert err.split("\n")[-2].startswith("error: ") and err.endswith("docs.jsonl:301: not a JSON object with a 'text' field holding text\n")
    assert not (tmp_path / "out").exists()  # ... and its shards removed


def test_the_utf8_check_names_the_byte_across_block_boundaries(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("\u00e9".encode() * 5 + b"\xff")
    for block in (1, 3, 4, 1 << 20):
        with pytest.raises(InputError, match=r"t.txt: not UTF-8 text \(byte 10 is 0xff\)"):
            export_text.check_utf8(path, block)
    path.write_bytes("a\u00e9".encode()[:-1])
    with pytest.raises(InputError, match="ends inside a character"):
        export_text.check_utf8(path, 1)


def test_the_export_functions_check_their_own_arguments(tmp_path):
    for size in (0, -3):
        with pytest.raises(InputError, match=f"shard_tokens={size}: must be a positive integer"):
            export_text.ShardWriter(tmp_path, "train", size)
    with pytest.raises(InputError, match="val_docs=-1: must be 0 or more"):
        export_text.export_documents(DOCUMENTS, TOKENIZER, tmp_path / "out", val_docs=-1)
    assert not (tmp_path / "out").exists()


def test_a_shard_or_manifest_that_appears_during_an_export_is_never_replaced(tmp_path):
    (tmp_path / "fineweb_train_000000.bin").write_bytes(b"another export's")
    writer = export_text.ShardWriter(tmp_path, "train", 4)
    with pytest.raises(InputError, match="fineweb_train_000000.bin: appeared while exporting"):
        writer.add(np.arange(4, dtype=np.uint16))
    assert (tmp_path / "fineweb_train_000000.bin").read_bytes() == b"another export's"
    out = tmp_path / "out"

    def documents():
        yield "a document"
        (out / MANIFEST).write_text("another export's")

    with pytest.raises(InputError, match="manifest.json: appeared while exporting"):
        export_text.export_documents(documents(), TOKENIZER, out, val_docs=0)
    assert folder_state(out) == {MANIFEST: b"another export's"}  # its own shards removed, the other's manifest kept


def test_an_export_that_fails_half_way_removes_what_it_wrote(tmp_path):
    def documents():
        yield from (f"Document {i} fills a shard or two." for i in range(600))  # 256 at a time: shards get written
        raise InputError("the second input is not UTF-8")

    with pytest.raises(InputError, match="not UTF-8"):
        export_text.export_documents(documents(), TOKENIZER, tmp_path / "out", val_docs=1, shard_tokens=64)
    assert not (tmp_path / "out").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not UTF-8"):
        export_text.export_documents(documents(), TOKENIZER, tmp_path / "kept", val_docs=1, shard_tokens=64)
    assert folder_state(tmp_path / "kept") == {"notes.txt": b"mine"}


def test_html_stripping_keeps_prose_only():
    markup = """<html><head><title>T</title><style>p {color: red}</style></head><body>
      <nav>Home | Next</nav><h1>Chapter&nbsp;1</h1><p>The <b>quick</b> brown fox &amp; <code>friends</code>.</p>
      <pre>code = 1</pre><script>alert(1)</script><ul><li>One</li><li>Two</li></ul></body></html>"""
    text = build_proxy_corpus.html_to_text(markup)
    assert text == "Chapter\xa01\n\nThe quick brown fox & friends.\n\nOne\n\nTwo"  # blocks apart, one blank line between
    assert "alert" not in text and "color" not in text and "code = 1" not in text and "Home" not in text


BOILERPLATE = "This function is available on every platform the manual covers."


def manual_page(title: str, sentences: int) -> str:
    body = "".join(f"<p>{title} sentence number {i} explains one more detail of it.</p>" for i in range(sentences))
    return f"<html><body><h1>{title}</h1><p>{BOILERPLATE}</p><p>Examples</p>{body}</body></html>"


@pytest.fixture
def manuals(tmp_path, monkeypatch):
    """Two fake installed manuals, one of them with a page the source skips."""
    for package, pages in (("alpha-doc", 30), ("beta-doc", 20)):
        for i in range(pages):
            page = tmp_path / "usr" / package / f"chapter{i:02d}.html"
            page.parent.mkdir(parents=True, exist_ok=True)
            page.write_text(manual_page(f"{package} chapter {i}", 8 if i else 1))  # page 0 is too short
    (tmp_path / "usr" / "alpha-doc" / "genindex.html").write_text(manual_page("index", 20))
    sources = (build_proxy_corpus.Source("alpha-doc", str(tmp_path / "usr" / "alpha-doc"), ("genindex",)),
               build_proxy_corpus.Source("beta-doc", str(tmp_path / "usr" / "beta-doc")),
               build_proxy_corpus.Source("not-installed", str(tmp_path / "usr" / "missing")))
    monkeypatch.setattr(build_proxy_corpus, "VAL_PER_MILLE", 200)
    return sources


def test_extract_keeps_each_long_line_once_and_holds_out_fixed_pages(tmp_path, manuals):
    text_file = tmp_path / "proxy.jsonl.xz"
    summary = build_proxy_corpus.extract(manuals, text_file, workers=1)
    documents = build_proxy_corpus.read_text_file(text_file)
    keys = [d["key"] for d in documents]
    assert keys == [f"alpha-doc/chapter{i:02d}.html" for i in range(1, 30)] + [f"beta-doc/chapter{i:02d}.html" for i in range(1, 20)]
    assert sum(d["text"].count(BOILERPLATE) for d in documents) == 1  # on the first page kept, never again
    assert all(d["text"].count("Examples") == 1 for d in documents)  # short lines may repeat
    assert [d["split"] == "val" for d in documents] == [build_proxy_corpus.is_validation(k) for k in keys]
    assert 0 < sum(d["split"] == "val" for d in documents) < len(documents)
    assert summary["documents"] == len(documents) and summary["compressed_bytes"] == text_file.stat().st_size
    first = text_file.read_bytes()
    build_proxy_corpus.extract(manuals, text_file, workers=2)
    assert text_file.read_bytes() == first  # the same manuals give the same file, whatever the workers


def test_tokenize_gives_the_same_checksummed_shards_with_any_number_of_workers(tmp_path, manuals, tokenizer):
    text_file = tmp_path / "proxy.jsonl.xz"
    build_proxy_corpus.extract(manuals, text_file, workers=1)
    manifests = [build_proxy_corpus.tokenize(text_file, TOKENIZER, tmp_path / f"out{workers}", workers, shard_tokens=1500)
                 for workers in (1, 2)]
    assert manifests[0]["tokens_sha256"] == manifests[1]["tokens_sha256"]
    assert [f["sha256"] for f in manifests[0]["files"]] == [f["sha256"] for f in manifests[1]["files"]]
    documents = build_proxy_corpus.read_text_file(text_file)
    for split in ("val", "train"):
        files = sorted((tmp_path / "out1").glob(f"fineweb_{split}_*.bin"))
        tokens = np.concatenate([np.asarray(read_shard(f)) for f in files])
        pieces = np.split(tokens, np.flatnonzero(tokens == BOS_ID))[1:]
        decoded = sorted(tokenizer.decode(p[1:].tolist()) for p in pieces)  # the tokenizer turns newlines into spaces
        assert decoded == sorted(" ".join(d["text"].split()) for d in documents if d["split"] == split)
        assert manifests[0]["tokens"][split] == tokens.size
    assert len([f for f in manifests[0]["files"] if f["file"].startswith("fineweb_train")]) > 1
    first_shard = tokenizer.decode(np.asarray(read_shard(tmp_path / "out1" / "fineweb_train_000000.bin")).tolist())
    assert "alpha-doc" in first_shard and "beta-doc" in first_shard  # training pages are shuffled across the manuals
    assert build_proxy_corpus.verify(tmp_path / "out1", expected=manifests[1]["tokens_sha256"]) == manifests[0]
    with pytest.raises(build_proxy_corpus.CorpusError, match="is not the expected 0123"):
        build_proxy_corpus.verify(tmp_path / "out1", expected="0123")


def test_verify_finds_a_changed_shard_and_tokenize_never_mixes_corpora(tmp_path, manuals, capsys):
    text_file = tmp_path / "proxy.jsonl.xz"
    build_proxy_corpus.extract(manuals, text_file, workers=1)
    out = tmp_path / "out"
    build_proxy_corpus.tokenize(text_file, TOKENIZER, out, 1)
    shard = out / "fineweb_train_000000.bin"
    tokens = np.asarray(read_shard(shard)).copy()
    tokens[-1] = (tokens[-1] + 1) % 1024
    write_shard(shard, tokens)
    with pytest.raises(build_proxy_corpus.CorpusError, match="fineweb_train_000000.bin: does not match manifest.json"):
        build_proxy_corpus.verify(out)
    before = folder_state(out)
    capsys.readouterr()
    assert build_proxy_corpus.main(["tokenize", "--text-file", str(text_file), "--out", str(out)]) == 2
    assert f"{out}: already holds a dataset (fineweb_train_000000.bin and more)" in one_line_error(capsys)
    (out / "fineweb_train_000000.bin").unlink()
    for shard in out.glob("*.bin"):
        shard.unlink()
    assert build_proxy_corpus.main(["tokenize", "--text-file", str(text_file), "--out", str(out)]) == 2
    assert f"{out}: already holds a dataset (manifest.json)" in one_line_error(capsys)
    assert folder_state(out) == {MANIFEST: before[MANIFEST]}
    with pytest.raises(InputError, match="already holds a dataset"):  # the function refuses too, not only the command
        build_proxy_corpus.tokenize(text_file, TOKENIZER, out, 1)
    assert folder_state(out) == {MANIFEST: before[MANIFEST]}


@pytest.mark.parametrize("content, message", [
    (None, "no such file"), (b"not xz", "not a proxy text file"),
    (lzma.compress(b'{"key": "a", "text": "t"}\n'), "not a proxy text file"),
])
def test_a_bad_text_file_is_one_line(tmp_path, capsys, content, message):
    text_file = tmp_path / "proxy.jsonl.xz"
    if content is not None:
        text_file.write_bytes(content)
    assert build_proxy_corpus.main(["tokenize", "--text-file", str(text_file), "--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"error: {text_file}: {message}") and error.count("\n") == 1


# -----------------------------------------------------------------------------
# build_proxy_corpus: any tokenizer, and a tokenizer trained on the proxy text
# -----------------------------------------------------------------------------

@pytest.fixture
def proxy_text(tmp_path, manuals) -> Path:
    text_file = tmp_path / "proxy.jsonl.xz"
    build_proxy_corpus.extract(manuals, text_file, workers=1)
    return text_file


def test_a_tokenizer_trained_on_the_proxy_text_has_fineweb_sp8192s_settings(tmp_path, proxy_text, capsys, monkeypatch):
    monkeypatch.setattr(build_proxy_corpus, "TOKENIZERS", tmp_path / "tokenizers")
    assert build_proxy_corpus.main(["train-tokenizer", "--text-file", str(proxy_text), "--vocab-size", "400"]) == 0
    model = tmp_path / "tokenizers" / "proxy_400_bpe.model"
    printed = capsys.readouterr().out
    assert f"train-tokenizer: {model}, 400 pieces" in printed and "It is NOT FineWeb's tokenizer" in printed
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    assert sp.vocab_size() == 400
    assert sum(sp.is_byte(i) for i in range(400)) == 256  # byte fallback: no <unk> for unseen characters
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, BOS_ID, 2, 3)
    assert sp.encode("\u4e16", out_type=str) == ["<0xE4>", "<0xB8>", "<0x96>"]
    digits = [p.strip("\u2581") for p in sp.encode("chapter 12", out_type=str) if p.strip("\u2581")][-2:]
    assert digits == ["1", "2"]  # split digits: "12" is frequent in the text, a piece without the setting
    assert not sp.encode("chapter", out_type=str)[0].startswith("\u2581")  # no dummy prefix
    assert sp.decode(sp.encode("\ufb01ve")) == "five"  # NFKC: the ligature is two letters
    assert [p.name for p in model.parent.iterdir()] == [model.name]  # written atomically: no temporary left
    first = model.read_bytes()
    assert build_proxy_corpus.main(["train-tokenizer", "--text-file", str(proxy_text), "--vocab-size", "400"]) == 2
    assert f"{model}: already exists (a tokenizer is never replaced" in one_line_error(capsys)
    assert model.read_bytes() == first
    again = build_proxy_corpus.train_tokenizer(proxy_text, tmp_path / "again.model", 400)
    assert again["sha256"] == file_sha256(model)  # the same text gives the same model, to the byte


@pytest.mark.parametrize("size, message", [("260", "--vocab-size 260: must be above 260"),
                                           ("70000", "--vocab-size 70000: must be above 260"),
                                           ("280", "Vocabulary size is smaller than required_chars")])
def test_a_bad_vocabulary_size_is_one_line(tmp_path, proxy_text, capsys, size, message):
    model = tmp_path / "m.model"
    assert build_proxy_corpus.main(["train-tokenizer", "--text-file", str(proxy_text), "--vocab-size", size,
                                    "--model", str(model)]) == 2
    assert message in one_line_error(capsys)
    assert not model.exists()


def test_a_tokenizer_learns_from_training_pages_only():
    documents = [{"key": "a", "split": "train", "text": "one\n\ntwo"}, {"key": "b", "split": "val", "text": "held out"},
                 {"key": "c", "split": "train", "text": "three"}]
    assert list(build_proxy_corpus.training_sentences(documents)) == ["one", "two", "three"]


def test_all_refuses_a_folder_that_holds_a_dataset_before_the_long_extract(tmp_path, capsys, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / MANIFEST).write_text("{}")
    monkeypatch.setattr(build_proxy_corpus, "extract", lambda *args: pytest.fail("extracted before refusing"))
    assert build_proxy_corpus.main(["all", "--out", str(tmp_path / "out")]) == 2
    assert "already holds a dataset (manifest.json)" in one_line_error(capsys)


def test_a_tokenize_that_fails_half_way_removes_its_shards(tmp_path, proxy_text, monkeypatch):
    def failing(*args):
        raise build_proxy_corpus.CorpusError("disk full")

    monkeypatch.setattr(build_proxy_corpus, "shards_manifest", failing)  # after every shard is written
    with pytest.raises(build_proxy_corpus.CorpusError, match="disk full"):
        build_proxy_corpus.tokenize(proxy_text, TOKENIZER, tmp_path / "out", 1, shard_tokens=500)
    assert not (tmp_path / "out").exists()


def test_the_help_says_a_trained_tokenizer_is_not_finewebs():
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "build_proxy_corpus.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert "Such a model is NOT FineWeb's tokenizer" in done.stdout


def test_tokenize_with_any_model_records_it_and_names_the_folder_by_its_vocabulary(tmp_path, proxy_text, monkeypatch, capsys):
    model = tmp_path / "proxy_400_bpe.model"
    build_proxy_corpus.train_tokenizer(proxy_text, model, 400)
    monkeypatch.setattr(build_proxy_corpus, "DATASETS", tmp_path / "datasets")
    assert build_proxy_corpus.main(["tokenize", "--text-file", str(proxy_text), "--tokenizer", str(model), "--workers", "1"]) == 0
    out = tmp_path / "datasets" / "proxy_sp400"
    assert recorded_tokenizer(out) == file_sha256(model)
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    tokens = np.concatenate([np.asarray(read_shard(f)) for f in sorted(out.glob("fineweb_val_*.bin"))])
    pieces = np.split(tokens, np.flatnonzero(tokens == BOS_ID))[1:]
    documents = build_proxy_corpus.read_text_file(proxy_text)
    expected = sorted(" ".join(d["text"].split()) for d in documents if d["split"] == "val")  # NFKC: newlines become spaces
    assert sorted(sp.decode(p[1:].tolist()) for p in pieces) == expected
    capsys.readouterr()
    for out in ([], ["--out", str(tmp_path / "out")]):  # the default folder needs the vocabulary; tokenize checks too
        assert build_proxy_corpus.main(["tokenize", "--text-file", str(proxy_text), "--tokenizer", str(proxy_text), *out]) == 2
        assert f"{proxy_text}: not a SentencePiece model" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()
