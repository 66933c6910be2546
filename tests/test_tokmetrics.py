"""Tests of tokexp.tokmetrics against slow per-word / per-token references on real zoo tokenizers and UDHR text,
anchor directions (Petrov et al. 2023), bad input and the vocabulary/digit audits. Needs the registry assets."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from tokexp import assets
from tokexp.core import ConfigError, InputError
from tokexp.tokenizers import load_tokenizer
from tokexp import tokmetrics as M

NEEDED = ["llama-cpp-vocab", "js-tiktoken", "mistral-common", "minilm", "udhr", "fortunes"]


@pytest.fixture(scope="session", autouse=True)
def _assets():
    assets.fetch([a for a in NEEDED if a in assets.ASSETS])


@pytest.fixture(scope="module")
def small_udhr():
    return M.udhr_corpus(["eng", "mya", "shn", "hin", "cmn_hans", "tha", "deu_1996"])


def ref_continued(tok, text):
    "Slow reference: token byte boundaries vs word byte spans, text by text."
    tb = tok.all_token_bytes()
    ids = tok.encode(text)
    bs = [tb[i] for i in ids]
    raw = text.encode("utf-8")
    shift = len(b"".join(bs)) - len(raw)
    if shift not in (0, 1): return None
    ends, pos = set(), -shift
    for b in bs:
        pos += len(b); ends.add(pos)
    ws, we = M.word_spans(M.codepoints(text))
    off = np.r_[0, np.cumsum(M.utf8_len(M.codepoints(text)))]
    out = []
    for s, e in zip(off[ws], off[we]):
        out.append(any(s < p < e for p in ends))
    return out


@pytest.mark.parametrize("name", ["gpt2", "cl100k_base", "llama-2", "mistral-v3", "qwen2"])
def test_continued_words_matches_reference(name, small_udhr):
    tok = load_tokenizer(name)
    r = M.corpus_metrics(tok, small_udhr)
    tab = r.table.set_index("group")
    for g in ["eng", "mya", "cmn_hans"]:
        texts = [t for t, gg in zip(small_udhr.texts, small_udhr.group) if small_udhr.group_names[gg] == g]
        flags = []
        for t in texts:
            f = ref_continued(tok, t)
            if f is not None: flags += f
        assert tab.loc[g, "continued_words"] == pytest.approx(np.mean(flags), abs=1e-12), g


def test_counts_match_per_text_encode(small_udhr):
    tok = load_tokenizer("cl100k_base")
    r = M.corpus_metrics(tok, small_udhr)
    ref = [len(tok.encode(t)) for t in small_udhr.texts]
    assert r.per_text.tokens.tolist() == ref
    tab = r.table.set_index("group")
    eng = [t for t, g in zip(small_udhr.texts, small_udhr.group) if small_udhr.group_names[g] == "eng"]
    n_tok = sum(len(tok.encode(t)) for t in eng)
    assert tab.loc["eng", "tokens"] == n_tok
    assert tab.loc["eng", "bytes_per_token"] == pytest.approx(sum(len(t.encode()) for t in eng) / n_tok)
    assert tab.loc["eng", "fertility"] == pytest.approx(n_tok / sum(M.count_words(t) for t in eng))
    assert 1.0 < tab.loc["eng", "fertility"] < 1.5


def test_efficiency_and_zipf_match_scalar_references(small_udhr):
    tok = load_tokenizer("gpt2")
    r = M.corpus_metrics(tok, small_udhr)
    tab = r.table.set_index("group")
    ids = [i for t, g in zip(small_udhr.texts, small_udhr.group) if small_udhr.group_names[g] == "hin" for i in tok.encode(t)]
    cnt = np.bincount(ids)
    cnt = cnt[cnt > 0]
    for a, col in [(1.0, "shannon_eff"), (2.5, "renyi_eff_2.5")]:
        H = M.renyi_entropy(cnt, a)
        assert tab.loc["hin", col] == pytest.approx(H / math.log(tok.vocab_size))
        assert tab.loc["hin", col + "_observed"] == pytest.approx(H / math.log(len(cnt)))
    c = np.sort(cnt)[::-1]
    lr = stats.linregress(np.log(np.arange(1, len(c) + 1)), np.log(c))
    assert tab.loc["hin", "zipf_s"] == pytest.approx(-lr.slope)
    assert tab.loc["hin", "zipf_r2"] == pytest.approx(lr.rvalue ** 2)
    inf = M.RenyiEfficiency(np.inf).compute(M.CorpusStats(small_udhr, M.encode_corpus(tok, small_udhr)))
    assert inf[small_udhr.group_names.index("hin")] == pytest.approx(-math.log(c[0] / c.sum()) / math.log(tok.vocab_size))


def test_alpha_validation():
    for a in (0, -1, -0.5, float("nan")):
        with pytest.raises(ConfigError, match="alpha must be > 0"): M.RenyiEfficiency(a)
    assert M.RenyiEfficiency(1).name == "shannon_eff"
    assert M.renyi_entropy([1, 2, 3], 1 + 1e-9) == pytest.approx(M.renyi_entropy([1, 2, 3], 1), rel=1e-6)


def test_premium_anchor_directions(small_udhr):
    """Petrov et al. (2023): Burmese/Shan/Hindi cost far more tokens than English for GPT-2 and cl100k, and cl100k
    narrows the gap. We check direction and rough magnitude (premiums of several x), not exact values: their corpus is
    FLORES-200, ours the UDHR."""
    res = M.evaluate_tokenizers(["gpt2", "cl100k_base"], small_udhr, progress=False)
    par, w = M.parity(res["per_text"], pivot="eng", n_boot=300)
    p = par.set_index(["tokenizer", "group"]).premium
    for t in ["gpt2", "cl100k_base"]:
        for g in ["mya", "shn", "hin"]: assert p[t, g] > 3, (t, g, p[t, g])
        assert p[t, "mya"] > p[t, "hin"]
    for g in ["mya", "shn", "hin"]: assert p["cl100k_base", g] < p["gpt2", g]
    assert (par.ci_low <= par.premium).all() and (par.premium <= par.ci_high).all()
    f = M.fairness_summary(par)
    assert ((f.gini > 0) & (f.gini < 1)).all()


def test_bad_input_skipped_with_warnings():
    tok = load_tokenizer("gpt2")
    c = M.Corpus(["", "   "], ["a", "b"])
    r = M.corpus_metrics(tok, c)
    assert len(r.table) == 0 and any("empty" in w for w in r.warnings)
    eng = M.udhr_corpus("eng")
    c = M.Corpus(eng.texts, ["eng"] * len(eng), eng.unit, expected_groups=["eng", "no_such_language"])
    r = M.corpus_metrics(tok, c)
    assert "no_such_language" not in set(r.table.group)
    assert any("no_such_language" in w for w in r.warnings)
    assert not r.table.drop(columns=["tokenizer", "group"]).isna().any().any()
    with pytest.raises(InputError): M.Corpus(["a", None], ["x", "y"])
    par, w = M.parity(r.per_text, pivot="fra")
    assert len(par) == 0 and "no text" in w[0]


def test_unk_and_byte_fallback_rates(small_udhr):
    bert = M.corpus_metrics("bert-minilm", small_udhr).table.set_index("group")
    assert bert.loc["mya", "unk_rate"] > 0.3 and bert.loc["eng", "unk_rate"] < 0.01
    llama = M.corpus_metrics("llama-2", small_udhr).table.set_index("group")
    assert llama.loc["mya", "byte_fallback_rate"] > 0.3 and llama.loc["eng", "byte_fallback_rate"] < 0.05
    gpt2 = M.corpus_metrics("gpt2", small_udhr).table.set_index("group")
    assert (gpt2.byte_fallback_rate == 0).all() and gpt2.loc["mya", "partial_utf8_rate"] > 0.5


@pytest.mark.parametrize("name,expect", [("cl100k_base", "L2R3"), ("o200k_base", "L2R3"), ("llama-2", "single-digit"),
                                         ("gpt2", "learned (irregular)")])
def test_digit_policies(name, expect):
    p = M.digit_profile(name, n_per_length=30)
    assert M.digit_policy(p) == expect
    if expect == "L2R3": assert (p.consistency == 1).all()


def test_separators_respected_by_cl100k():
    p = M.digit_profile("cl100k_base", separators=True, n_per_length=20)
    assert (p.respects_separators == 1).all()


def test_vocab_audit_categories():
    a = M.vocab_audit("llama-2").set_index("id")
    assert (a.category == "byte").sum() == 256
    assert (a.category == "special").sum() == 3
    tok = load_tokenizer("llama-2")
    i = tok.encode("hello")[-1]
    assert a.loc[i, "script"] == "Latn"
    g = M.vocab_audit("gpt2")
    assert (g.category == "byte").sum() + (g.category == "partial_utf8").sum() > 300
    assert set(g.script) >= {"Latn", "Hani", "none"}


def test_roundtrip_audit_counts_undecodable():
    rt = M.roundtrip_audit("gpt2")
    vc = rt.status.value_counts()
    assert vc["undecodable"] > 100 and vc["ok"] > 49000 and vc.get("unreachable", 0) < 10
    rt = M.roundtrip_audit("llama-2")
    assert (rt.status.isin(["ok", "ok_in_context"])).mean() > 0.95


def test_jaccard():
    J = M.vocab_jaccard(["gpt2", "r50k_base", "gpt-2-gguf", "cl100k_base"])
    assert J.loc["gpt2", "r50k_base"] == 1.0 and J.loc["gpt2", "gpt-2-gguf"] == 1.0
    assert 0.2 < J.loc["gpt2", "cl100k_base"] < 0.9


TEMPLATE_PARAMS = {
    "tokenizer_parity": dict(tokenizers=["gpt2", "cl100k_base"], articles=2, n_boot=100, bench_repeats=1),
    "vocab_audit": dict(tokenizers=["gpt2", "llama-2", "bert-minilm"], roundtrip_sample=500),
    "digit_chunking": dict(tokenizers=["cl100k_base", "llama-2"], max_digits=8, n_per_length=10),
}


@pytest.mark.parametrize("name", list(TEMPLATE_PARAMS))
def test_template_runs_small(name, tmp_path):
    "Each experiment template runs end to end with tiny parameters and writes a NaN-free metrics.json."
    import json, papermill
    from conftest import ROOT
    out = tmp_path/"out"
    papermill.execute_notebook(str(ROOT/"nbs"/"experiments"/f"{name}.ipynb"), str(tmp_path/f"{name}.ipynb"),
                               parameters={**TEMPLATE_PARAMS[name], "output_dir": str(out)}, progress_bar=False)
    m = json.loads((out/"metrics.json").read_text())
    assert m and list(out.glob("*.png"))
    if name == "tokenizer_parity":
        assert m["anchor_checks"]["cl100k_below_gpt2"] and m["anchor_checks"]["mya_shn_above_hin"]


# --- continued words on every tokenizer family (issue #10) ---------------------------------------------------------

FAMILIES = ["gpt2", "cl100k_base", "tekken-240718", "mistral-v3", "llama-2", "qwen2", "bert-minilm", "bert-bge",
            "nomic-bert-moe"]  # tiktoken, Tekken, SentencePiece, GGUF SPM, GGUF byte-level BPE, HF WordPiece, GGUF WordPiece, GGUF unigram


def library_offsets(tok, text):
    "Token ids and code-point offsets of one text, straight from the backing library (one text at a time)."
    from tokexp.tokenizers import HFTokenizer, SentencePieceTokenizer
    if isinstance(tok, HFTokenizer):
        e = tok.backend.encode(text, add_special_tokens=False)
        return list(e.ids), list(e.offsets)
    if isinstance(tok, SentencePieceTokenizer):
        r = tok.backend.encode_as_offset_mapping(text)
        return list(r["ids"]), list(r["offsets"])
    return None


def ref_continued_any(tok, text):
    """Slow reference of the published rule, text by text: byte boundaries where the token bytes reproduce the text,
    otherwise the starts of the library's offsets (whitespace-only tokens ignored; a character covered by several tokens
    is split)."""
    flags = ref_continued(tok, text)
    tb = tok.all_token_bytes()
    ids = tok.encode(text)
    raw = text.encode("utf-8")
    joined = b"".join(tb[i] for i in ids)
    if flags is not None and (joined == raw or joined == b" " + raw): return flags
    lo = library_offsets(tok, text)
    if lo is None or lo[0] != ids:  # the adapter pre-processes (GGUF): token texts matched against the text
        po = M.piece_offsets(tb, M.token_table(tok).unk, text, ids)
        if po is None: return None
        lo = (ids, po)
    cps = M.codepoints(text)
    off = np.r_[0, np.cumsum(M.utf8_len(cps))]
    marks, prev_end = set(), -1
    for i, (s, e) in zip(*lo):
        b = tb[i]
        if b and not b.strip(): continue  # a whitespace-only token (e.g. a lone "▁") sits between words
        bs, be = off[s], off[e]
        marks.add(bs)  # token starts: an end may be followed by characters the normalizer removed ("có" -> "co")
        if (bs < prev_end or s == e) and s < len(cps) and off[s] + 1 < off[s + 1]: marks.add(bs + 1)
        prev_end = max(prev_end, be)
    ws, we = M.word_spans(cps)
    return [any(a < p < z for p in marks) for a, z in zip(off[ws], off[we])]


@pytest.mark.parametrize("name", FAMILIES)
def test_continued_words_every_family(name, small_udhr):
    "continued_words is defined for every family (WordPiece included) and equals the text-by-text reference."
    tok = load_tokenizer(name)
    tab = M.corpus_metrics(tok, small_udhr).table.set_index("group")
    assert (tab.aligned_text_share == 1).all(), tab.aligned_text_share
    for g in small_udhr.group_names:
        flags = []
        for t, gg in zip(small_udhr.texts, small_udhr.group):
            if small_udhr.group_names[gg] == g: flags += ref_continued_any(tok, t)
        assert tab.loc[g, "continued_words"] == pytest.approx(np.mean(flags), abs=1e-12), g


@pytest.mark.parametrize("name", ["bert-minilm", "bert-bge"])
def test_continued_words_wordpiece_matches_per_word_encoding(name):
    """Independent count for WordPiece: BERT pre-tokenizes on whitespace and punctuation, so in space-delimited text
    each of our words is tokenized exactly as when it is encoded alone; a word is continued iff it alone takes > 1 token
    (lowercasing, accent stripping and [UNK] included)."""
    tok = load_tokenizer(name)
    c = M.udhr_corpus(["eng", "deu_1996", "fra", "rus", "vie"])
    tab = M.corpus_metrics(tok, c).table.set_index("group")
    for g in c.group_names:
        words = []
        for t, gg in zip(c.texts, c.group):
            if c.group_names[gg] != g: continue
            cps = M.codepoints(t)
            words += ["".join(map(chr, cps[a:z])) for a, z in zip(*M.word_spans(cps))]
        enc = tok.encode_batch(words)
        ref = np.mean([len(e) > 1 for e in enc])
        assert tab.loc[g, "continued_words"] == pytest.approx(ref, abs=1e-12), g
    assert tab.loc["eng", "continued_words"] < tab.loc["vie", "continued_words"] or tab.loc["eng", "continued_words"] < 0.2


def test_continued_words_normalizing_toy():
    """Accents stripped (decomposed and precomposed), case folded, [UNK], a ligature: boundaries come from offsets into
    the original text; per-word encoding is the reference."""
    import unicodedata
    tok = load_tokenizer("bert-minilm")
    text = "Héllo unaffable wörld " + unicodedata.normalize("NFD", "có các") + " ကမ္ဘာ ﬁne"
    c = M.Corpus([text], ["a"])
    tab = M.corpus_metrics(tok, c, [M.metrics["continued_words"](), M.metrics["aligned_text_share"]()], pooled=False).table
    cps = M.codepoints(text)
    words = ["".join(map(chr, cps[a:z])) for a, z in zip(*M.word_spans(cps))]
    flags = [len(tok.encode(w)) > 1 for w in words]
    assert flags[:6] == [False, True, False, False, True, False]  # hello | una ##ffa ##ble | world | co | ca ##c | [UNK]...
    assert tab.aligned_text_share.iloc[0] == 1 and tab.continued_words.iloc[0] == pytest.approx(np.mean(flags))


# --- vocabulary audit: user-defined and padding tokens, letters class (issue #10) -----------------------------------

PAD_RE = r"\[pad\w*\]|<\|pad\w*\|>|<pad(?:_\w*)?>"


def ref_audit(tok):
    """Direct per-token loop of the category rules on a GGUF vocabulary: metadata pad id (unless it doubles as another
    role) and pad-named tokens -> pad; the adapter's specials -> special; USER_DEFINED -> user_defined; byte pieces ->
    byte; otherwise content class of the token text with one leading word-boundary space allowed."""
    import re
    import regex
    from tokexp.tokenizers import TOKEN_USER_DEFINED, TOKEN_BYTE, TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_UNUSED
    v = tok.vocab
    tb = tok.all_token_bytes()
    roles = {int(x) for k, x in v.meta.items() if re.fullmatch(r"tokenizer\.ggml\.\w+_token_id", k) and k != "tokenizer.ggml.padding_token_id"}
    pad_id = v.meta.get("tokenizer.ggml.padding_token_id")
    specials = set(tok.special_ids.values())  # control/unknown/unused as the adapter reads them (llama.cpp re-marking included)
    cats, contents = [], []
    for i, (t, ty) in enumerate(zip(v.tokens, v.types.tolist())):
        b = tb[i]
        if pad_id is not None and i == int(pad_id) and i not in roles: cat = "pad"
        elif i not in roles and re.fullmatch(PAD_RE, t, re.I) and ty != TOKEN_BYTE: cat = "pad"
        elif i in specials: cat = "special"
        elif ty == TOKEN_USER_DEFINED: cat = "user_defined"
        elif ty == TOKEN_BYTE or (len(b) == 1 and b[0] >= 0x80): cat = "byte"
        elif not b: cat = "empty"
        else:
            try: b.decode("utf-8"); cat = "text"
            except UnicodeDecodeError: cat = "partial_utf8"
        cats.append(cat)
        if cat != "text": contents.append(cat); continue
        s = b.decode("utf-8")
        body = s[1:] if s.startswith(" ") else s
        if all(regex.fullmatch(r"\s", ch) for ch in s): con = "whitespace"
        elif body and all(regex.fullmatch(r"[\p{L}\p{M}]", ch) for ch in body): con = "letters"
        elif body and all(regex.fullmatch(r"\p{N}", ch) for ch in body): con = "digits"
        elif body and all(regex.fullmatch(r"[\p{P}\p{S}]", ch) for ch in body): con = "punct_symbol"
        else: con = "mixed"
        contents.append(con)
    return np.array(cats, dtype=object), np.array(contents, dtype=object)


@pytest.mark.parametrize("name,n_pad,n_user", [("qwen2", 290, 0), ("command-r", 972, 28)])
def test_vocab_audit_pad_and_user_defined(name, n_pad, n_user):
    "Categories and content classes equal the per-token loop on the real vocabularies; pads are not text."
    tok = load_tokenizer(name)
    a = M.vocab_audit(tok)
    cats, contents = ref_audit(tok)
    assert (a.category.to_numpy() == cats).all(), a[a.category.to_numpy() != cats].head()
    assert (a.content.to_numpy() == contents).all(), a[a.content.to_numpy() != contents].head()
    assert (a.category == "pad").sum() == n_pad and (a.category == "user_defined").sum() == n_user
    names = np.array(tok.vocab.tokens, dtype=object)
    assert not a.category[[n.startswith("[PAD") for n in names]].eq("text").any()
    if name == "qwen2":  # pad id 151643 is also bos/eos: a special token, padding by convention only
        assert a.loc[151643, "category"] == "special"
        assert set(a.pad_source[a.category == "pad"]) == {"name"}
    else:
        assert a.loc[0, "category"] == "pad" and a.loc[0, "pad_source"] == "metadata"


def test_vocab_audit_letters_exclude_whitespace():
    a = M.vocab_audit("qwen2").set_index("id")
    tok = load_tokenizer("qwen2")
    tab_if = [i for i, t in enumerate(tok.vocab.tokens) if t == "\u0109if"]  # byte-level "\tif"
    assert tab_if and a.loc[tab_if[0], "content"] != "letters"
    the = tok.encode(" the")
    assert len(the) == 1 and a.loc[the[0], "category_detail"] == "spaced_letters"
    g = M.vocab_audit("gpt2")
    txt = g[g.content == "letters"].text
    assert not txt.str[1:].str.contains(r"\s").any() and not txt.str.match(r"\s\s").any()


def test_vocab_audit_pad_sources_other_formats():
    "Pad metadata where the format has it (GGUF padding_token_id, SentencePiece pad_id); names otherwise (HF here)."
    bge = M.vocab_audit("bert-bge")
    assert bge.loc[0, "category"] == "pad" and bge.loc[0, "pad_source"] == "metadata"
    mini = M.vocab_audit("bert-minilm")
    assert mini.loc[0, "category"] == "pad" and mini.loc[0, "pad_source"] == "name"
    assert (mini.category == "special").sum() == 4


@pytest.mark.parametrize("name,exact", [("bert-bge", False), ("nomic-bert-moe", False), ("qwen2", True), ("llama-2", True),
                                        ("bert-minilm", True)])
def test_token_offsets_only_for_exact_backends(name, exact):
    """GGUF WordPiece and unigram ids come from the adapter's own llama.cpp rules, not from the `tokenizers` object:
    its offsets belong to other ids, so `token_offsets` gives None there (and the library's offsets, with the
    adapter's ids, elsewhere)."""
    tok = load_tokenizer(name)
    assert tok.backend_exact is exact
    texts = ["Héllo wörld, ﬁne CAFÉ", "naïve   x</s>y"]
    got = M.token_offsets(tok, texts)
    if not exact: assert got is None
    else: assert [list(i) for i, _ in got] == [tok.encode(t) for t in texts] and [tuple(o) for _, o in got] == [tuple(o) for o in (library_offsets(tok, t)[1] for t in texts)]


def test_token_roles_phi3_eos_like_not_user_defined():
    """phi-3 stores </s> as user-defined; llama.cpp (and the adapter) re-mark it as control, so the audit files it as
    special, not user_defined: the user flag is the user-defined type minus the adapter's special tokens."""
    from tokexp.tokenizers import TOKEN_USER_DEFINED
    tok = load_tokenizer("phi-3")
    eos_like = tok.vocab.tokens.index("</s>")
    assert tok.vocab.types[eos_like] == TOKEN_USER_DEFINED and eos_like in tok.special_ids.values()
    _, user = M.token_roles(tok)
    assert not user[eos_like]
    specials = set(tok.special_ids.values())
    want = [i for i, ty in enumerate(tok.vocab.types.tolist()) if ty == TOKEN_USER_DEFINED and i not in specials]
    assert np.flatnonzero(user).tolist() == want  # phi-3's only user-defined token is </s>: none left
    assert M.vocab_audit(tok).set_index("id").loc[eos_like, "category"] == "special"


def test_vocab_audit_on_a_vocabulary_with_unassigned_ids():
    "cl100k leaves ids unassigned (100256, ...): the audit covers every id and files those apart from text (crashed before)."
    tok = load_tokenizer("cl100k_base")
    a = M.vocab_audit(tok)
    assert len(a) == tok.vocab_size
    hole = a.set_index("id").loc[100256]
    assert hole["category"] == "empty" and hole["nbytes"] == 0
