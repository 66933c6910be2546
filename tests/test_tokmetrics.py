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
