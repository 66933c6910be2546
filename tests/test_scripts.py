"""Per-script token shares and domain tokenizers: checked against direct loops over the vocabulary and the encodings;
the template end to end."""
import json

import numpy as np
import pytest

from tokexp import scripts as S
from tokexp import tokmetrics as M
from tokexp.core import ConfigError, InputError
from tokexp.tokenizers import load_tokenizer
from conftest import reads_as_report


def direct_script(text):
    "Script of a token text by a per-character loop over letters (Unicode Script property via fontTools)."
    from fontTools.unicodedata import script
    import regex
    sc = {script(ch) for ch in text if regex.fullmatch(r"\p{L}|\p{M}", ch)}
    sc.discard("Zinh")
    return "none" if not sc else (sc.pop() if len(sc) == 1 else "Mixed")


@pytest.mark.parametrize("name", ["gpt2", "bert-minilm"])
def test_vocab_and_corpus_shares_match_direct_loop(name):
    tok = load_tokenizer(name)
    sc = S.token_scripts(tok)
    tb = tok.all_token_bytes()
    rng = np.random.default_rng(0)
    for i in rng.choice(tok.vocab_size, 300, replace=False):
        b = tb[i]
        try: txt = b.decode("utf-8")
        except UnicodeDecodeError: txt = ""
        if i in tok.special_ids.values(): txt = ""
        assert sc[i] == direct_script(txt), (i, b, sc[i])
    c = M.udhr_corpus(["eng", "rus", "ell_monotonic"], articles=[1])
    enc = M.encode_corpus(tok, c)
    got = S.corpus_script_shares(sc, enc.ids)
    ids = [i for t in c.texts for i in tok.encode(t)]
    for s, v in got.items():
        assert v == pytest.approx(np.mean([sc[i] == s for i in ids]))
    assert S.vocab_script_shares(sc).sum() == pytest.approx(1.0)


def test_fertility_by_script_pools_languages():
    c = M.udhr_corpus(["eng", "fra", "rus"], articles=[1, 2])
    r = S.script_shares(["cl100k_base"], c)
    f = r["fertility"].set_index("script")
    tok = load_tokenizer("cl100k_base")
    lat = [t for t, g in zip(c.texts, c.group) if c.group_names[g] in ("eng", "fra")]
    n_tok = sum(len(tok.encode(t)) for t in lat)
    n_words = sum(M.count_words(t) for t in lat)
    assert f.loc["Latn", "fertility"] == pytest.approx(n_tok / n_words) and f.loc["Latn", "n_languages"] == 2
    assert f.loc["Cyrl", "n_languages"] == 1


def test_domain_tokenizer_cached_and_better_in_domain(tmp_path):
    code = ["def f(x):\n    return x + 1\n", "class A:\n    def g(self):\n        return self\n"] * 30
    prose = ["The cat sat on the mat and looked at the dog.", "A dog is a loyal animal, said the old man."] * 30
    tc = S.domain_tokenizer(code, 300, "bpe-code", cache_dir=tmp_path)
    tp = S.domain_tokenizer(prose, 300, "bpe-prose", cache_dir=tmp_path)
    assert S.domain_tokenizer(code, 300, "bpe-code", cache_dir=tmp_path).encode("def f") == tc.encode("def f")
    assert len(list((tmp_path/"scripts").iterdir())) == 2
    df = S.domain_comparison({"code": tc, "prose": tp, "gpt2": "gpt2"}, {"code": code[:2], "prose": prose[:2]}, reference="gpt2")
    t = df.set_index(["domain", "tokenizer"]).tokens
    assert t["code", "code"] < t["code", "prose"] and t["prose", "prose"] < t["prose", "code"]
    assert t["code", "gpt2"] == sum(len(load_tokenizer("gpt2").encode(x)) for x in code[:2])
    with pytest.raises(InputError, match="reference"):
        S.domain_comparison({"code": tc}, {"code": code[:2]}, reference="gpt2")
    with pytest.raises(ConfigError, match="unknown domain"):
        S.domain_records("legal")


def test_domain_records_split_is_deterministic():
    a = S.domain_records("fortunes", max_chars=50_000)
    b = S.domain_records("fortunes", max_chars=50_000)
    assert a == b and a[1] and not set(a[0]) & set(a[1])


def test_template_runs_small(reports_tmp):
    from tokexp.report import run_experiment
    r = run_experiment("script_shares", dict(tokenizers=["gpt2", "llama-3"], articles=1, domains=["fortunes", "code"],
                                             domain_chars=60000, domain_vocab=600, references=["cl100k_base", "gpt2"]),
                       force=True, progress=False)
    assert r.ok, r.error
    m = json.loads((r.path/"metrics.json").read_text())
    assert m["n_tokenizers"] == 2 and set(m["domain_saving_vs_general"]) == {"fortunes", "code"}
    assert m["latn_vocab_share"]["gpt2"] > m["latn_vocab_share"]["llama-3"]  # llama-3's vocabulary is more multilingual
    assert "_schema" in m and list(r.path.glob("*.png"))
    reads_as_report(r.path/"script_shares.ipynb")


