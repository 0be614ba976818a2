"""tools/ for data: download planning and resume logic, text export, HTML stripping (no network)."""

from __future__ import annotations

import json
import lzma

from tools import build_proxy_corpus
from tools import download_fineweb
from tools import export_text
import numpy as np
import pytest

from trainer.settings import InputError
from trainer.shards import BOS_ID, read_shard, write_shard
from conftest import TOKENIZER

MANIFEST = {"datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
                          "stats": {"files_train": 80, "files_val": 1}}],
            "tokenizers": [{"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
                            "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}]}


def test_plan_lists_validation_training_and_tokenizer_files():
    plan = download_fineweb.plan_downloads(MANIFEST, "sp1024", 2)
    assert plan == ["datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
                    "datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin",
                    "datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
                    "datasets/tokenizers/fineweb_1024_bpe.model", "datasets/tokenizers/fineweb_1024_bpe.vocab"]


def test_files_land_where_the_trainer_looks(tmp_path):
    shard = download_fineweb.local_path("datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin", tmp_path)
    tokenizer = download_fineweb.local_path("datasets/tokenizers/fineweb_1024_bpe.model", tmp_path)
    assert shard == tmp_path / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin"
    assert tokenizer == tmp_path / "tokenizers" / "fineweb_1024_bpe.model"


@pytest.mark.parametrize("manifest, variant, shards, message", [
    ({"datasets": []}, "sp1024", 1, "manifest has no dataset 'fineweb10B_sp1024'"),
    ({"datasets": [{"name": "fineweb10B_sp1024"}]}, "sp1024", 1, "lacks stats.files_train"),
    (MANIFEST, "sp1024", 81, "--train-shards 81: fineweb10B_sp1024 has 80 training shards"),
    ({**MANIFEST, "tokenizers": []}, "sp1024", 1, "manifest has no tokenizer 'sp_bpe_1024'"),
    (MANIFEST, "gpt2", 1, "--variant 'gpt2': expected sp<VOCAB>"),
])
def test_bad_manifests_say_what_is_missing(manifest, variant, shards, message):
    with pytest.raises(download_fineweb.ManifestError, match=message.replace("(", r"\(").replace("[", r"\[")):
        download_fineweb.plan_downloads(manifest, variant, shards)


def test_download_resumes_and_verifies(tmp_path):
    plan = download_fineweb.plan_downloads(MANIFEST, "sp1024", 2)
    good = download_fineweb.local_path(plan[0], tmp_path)
    write_shard(good, np.arange(100))
    truncated = download_fineweb.local_path(plan[1], tmp_path)
    write_shard(truncated, np.arange(100))
    truncated.write_bytes(truncated.read_bytes()[:-7])
    fetched = []

    def fake_fetch(remote, destination):
        fetched.append(remote)
        if destination.suffix == ".bin":
            write_shard(destination, np.arange(50))
        else:
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_text("tokenizer")

    download_fineweb.download(plan, tmp_path, fake_fetch, log=lambda line: None)
    assert fetched == plan[1:]  # the good shard was kept, the truncated one fetched again
    assert all(download_fineweb.is_complete(download_fineweb.local_path(r, tmp_path)) for r in plan)
    fetched.clear()
    download_fineweb.download(plan, tmp_path, fake_fetch, log=lambda line: None)
    assert fetched == []  # a second run finds everything in place


def test_a_bad_download_is_deleted_and_reported(tmp_path):
    plan = download_fineweb.plan_downloads(MANIFEST, "sp1024", 0)[:1]

    def broken_fetch(remote, destination):
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(b"<html>rate limited</html>" * 50)

    with pytest.raises(InputError, match="failed the header/size check and was deleted"):
        download_fineweb.download(plan, tmp_path, broken_fetch, log=lambda line: None)
    assert not download_fineweb.local_path(plan[0], tmp_path).exists()


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


def test_export_reads_jsonl_and_text_files(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "first"}\n\n{"text": "second", "id": 2}\n')
    (tmp_path / "b.txt").write_text("para one\n\npara two\n")
    docs = list(export_text.read_documents([tmp_path / "a.jsonl", tmp_path / "b.txt"], "text", blank_line_docs=True))
    assert docs == ["first", "second", "para one", "para two\n"]
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(SystemExit, match="bad.jsonl:1: not a JSON object with a 'text' field"):
        list(export_text.read_documents([tmp_path / "bad.jsonl"], "text", blank_line_docs=False))


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
    assert build_proxy_corpus.main(["tokenize", "--text-file", str(text_file), "--out", str(out)]) == 1
    assert "already holds shards" in capsys.readouterr().err


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
