"Exact byte-level probabilities (tokexp.bytelevel) against brute force, and the byte_level_probs template end to end."
import itertools, json, math
from collections import Counter

import numpy as np
import pytest

from tokexp import bytelevel as B
from tokexp.core import InputError

# A toy BPE and a hand-written token LM, both defined here from scratch (not with tokexp's helpers).
ALPHA = b"abc"
MERGES = [(b"a", b"b"), (b"c", b"a"), (b"ab", b"c"), (b"b", b"b"), (b"a", b"a")]


def ref_bpe(b: bytes) -> list[bytes]:
    "Textbook BPE: while some adjacent pair has a merge, merge the leftmost occurrence of the best-ranked pair."
    rank = {m: i for i, m in enumerate(MERGES)}
    parts = [bytes([c]) for c in b]
    while True:
        cands = [(rank[(parts[k], parts[k + 1])], k) for k in range(len(parts) - 1) if (parts[k], parts[k + 1]) in rank]
        if not cands: return parts
        _, k = min(cands)
        parts = parts[:k] + [parts[k] + parts[k + 1]] + parts[k + 2:]


TOKENS = [bytes([c]) for c in ALPHA] + [a + b for a, b in MERGES]
V = len(TOKENS) + 1  # + EOS
EOS_ID = V - 1
MAXLEN = 3


def ref_valid(seq) -> bool:
    "A token sequence is a valid encoding when re-encoding its bytes gives it back."
    return [TOKENS.index(p) for p in ref_bpe(b"".join(TOKENS[t] for t in seq))] == list(seq)


def toy_next(seq):
    "Next-token probabilities: hand-set weights depending on the previous token, zero on invalid encodings, EOS after MAXLEN tokens."
    p = np.zeros(V)
    if len(seq) >= MAXLEN:
        p[EOS_ID] = 1.0; return p
    prev = seq[-1] if seq else -1
    for t in range(V - 1):
        if ref_valid(tuple(seq) + (t,)): p[t] = 1 + ((3 * t + 5 * prev) % 4)
    p[EOS_ID] = 1.5
    return p / p.sum()


def brute_documents():
    "Probability of every complete token document (all sequences up to MAXLEN tokens, then EOS)."
    docs = {}
    for k in range(MAXLEN + 1):
        for s in itertools.product(range(V - 1), repeat=k):
            p = 1.0
            for j in range(k + 1): p *= toy_next(s[:j])[s[j] if j < k else EOS_ID]
            if p > 0:
                x = b"".join(TOKENS[t] for t in s)
                docs[x] = docs.get(x, 0.0) + p
    return docs


@pytest.fixture(scope="module")
def toy():
    codec = B.toy_codec(ALPHA, MERGES)
    assert codec.token_bytes[:-1] == TOKENS and codec.eos_id == EOS_ID
    return B.ByteLM(codec, B.FunctionLM(toy_next, V), strict=True), brute_documents()


def test_toy_bpe_matches_textbook_bpe():
    for n in range(1, 7):
        for b in itertools.product(ALPHA, repeat=n):
            assert B.bpe_encode(bytes(b), MERGES) == ref_bpe(bytes(b))


def test_next_byte_matches_brute_force_and_sums_to_one(toy):
    bl, docs = toy
    assert math.isclose(sum(docs.values()), 1.0, rel_tol=1e-12)
    starts = lambda x: sum(v for d, v in docs.items() if d.startswith(x))
    n_checked = 0
    for n in range(0, 5):
        for x in map(bytes, itertools.product(ALPHA, repeat=n)):
            if starts(x) == 0: continue
            d = bl.next_byte_dists(x)
            np.testing.assert_allclose(d.sum(1), 1.0, atol=1e-12)
            want = np.array([starts(x + bytes([c])) for c in ALPHA] + [docs.get(x, 0.0)]) / starts(x)
            np.testing.assert_allclose(d[-1][list(ALPHA) + [B.EOS]], want, atol=1e-12)
            assert d[-1][[c for c in range(256) if c not in ALPHA]].sum() == 0
            n_checked += 1
    assert n_checked > 30


def test_string_probability_is_the_token_marginal(toy):
    bl, docs = toy
    for x, p in sorted(docs.items(), key=lambda kv: -kv[1])[:25]:
        # docs[x] sums P over every token sequence decoding to x (brute force): the token model's marginal
        assert math.isclose(float(np.exp(bl.logprob(x).sum())), p, rel_tol=1e-10), x


def test_exact_rule_and_cover_sum(toy):
    bl, docs = toy
    starts = lambda x: sum(v for d, v in docs.items() if d.startswith(x))
    for x in [b"ab", b"abc", b"ca", b"bb"]:
        st = bl.init_state()
        for a in x: st = bl.advance(st, b"", bl.lm.score([st.enc])[0][0], a)
        assert math.isclose(math.exp(st.log_prefix_prob()), starts(x), rel_tol=1e-10)  # Byte-Token Representation Lemma
        np.testing.assert_allclose(B.predict_next_byte(bl, x, "exact"), bl.next_byte_dists(x)[-1], atol=1e-12)


def test_sampler_matches_document_distribution(toy):
    bl, docs = toy
    n = 1500
    c = Counter(B.sample_bytes(bl, b"", 12, seed=s) for s in range(n))
    assert set(c) <= set(docs)
    for x, k in c.most_common(5):
        assert abs(k / n - docs[x]) < 4 * math.sqrt(docs[x] * (1 - docs[x]) / n) + 1e-3, x


def test_naive_and_healing_rules_by_hand(toy):
    bl, _ = toy
    x = b"ab"  # enc = [ab]
    ab = TOKENS.index(b"ab")
    p = toy_next((ab,))
    naive = np.zeros(257)
    for t in range(V - 1): naive[TOKENS[t][0]] += p[t]
    naive[B.EOS] = p[EOS_ID]
    np.testing.assert_allclose(B.predict_next_byte(bl, x, "naive"), naive, atol=1e-12)
    p0 = toy_next(())
    heal = np.zeros(257)
    for t in range(V - 1):
        tb = TOKENS[t]
        if tb.startswith(b"ab") and len(tb) > 2: heal[tb[2]] += p0[t]
    heal += p0[ab] * naive
    np.testing.assert_allclose(B.predict_next_byte(bl, x, "token_healing"), heal / heal.sum(), atol=1e-12)


def test_bad_inputs(toy):
    bl, _ = toy
    with pytest.raises(InputError, match="byte 0..255"): bl.advance(bl.init_state(), b"", np.zeros(V), 300)
    with pytest.raises(InputError, match="outside the text"): bl.next_byte_dists(b"ab", start=5)
    with pytest.raises(InputError, match="rows"): B.bits_per_byte(np.ones((2, 257)) / 257, b"abc")
    with pytest.raises(InputError, match="summing to 1"): B.ensemble_dists([np.ones((1, 257)) / 257] * 2, [0.7, 0.7])
    with pytest.raises(InputError, match="special token"): B.ByteCodec([b"a", b"b"], lambda b: list(b), eos_id=1)


@pytest.fixture(scope="module")
def real_tok():
    from tokexp import lm
    corpus = lm.toy_corpus()
    extra = ["it's 12 o'clock, isn't it? (yes)  twice... done!", "Don't stop: 3.14 or 2,718?\n\tNew line."]
    tok = lm.train_tokenizer([t for d in corpus for t in corpus[d][0]] + extra * 5, vocab_size=420)
    texts = [t for d in corpus for t in corpus[d][1][:10]] + extra
    return B.hf_codec(tok), texts


def test_real_tokenizer_mask_and_split_match_brute_force(real_tok):
    codec, texts = real_tok
    rng = np.random.default_rng(1)
    n = 0
    for t in texts:
        b = t.encode()
        for cut in sorted(set(rng.integers(1, len(b) + 1, 5).tolist())):
            x = b[:cut]
            full = codec.encode(x)
            j = codec.stable_split(x)
            assert codec.encode(x[:j]) + codec.encode(x[j:]) == full
            for y in (b[cut:cut + 6], b" x", b"'s"):  # the split survives continuations
                assert codec.encode(x + y)[:len(codec.encode(x[:j]))] == codec.encode(x[:j])
            bf = np.array([tb is not None and codec.encode(x + tb) == full + (i,) for i, tb in enumerate(codec.token_bytes)])
            bf[codec.eos_id] = True
            np.testing.assert_array_equal(codec.valid_next(x), bf)
            n += 1
    assert n > 40


def test_template_runs_small(tmp_path, reports_tmp):
    "byte_level_probs end to end on two tiny LMs with different tokenizers; metrics are coherent."
    from dataclasses import replace
    from tokexp import lm
    from tokexp.report import run_experiment
    corpus = lm.toy_corpus()
    pa = lm.train_lm(lm.TINY, corpus=corpus, cache_dir=tmp_path, progress=False)
    pb = lm.train_lm(replace(lm.TINY, name="tiny-b", vocab_size=360, seed=7), corpus=corpus, cache_dir=tmp_path, progress=False)
    texts = [t[:t.rfind(" ", 0, 40)] for d in corpus for t in corpus[d][1][:6] if len(t) > 45]
    r = run_experiment("byte_level_probs", dict(model=str(pa), partner=str(pb), texts=texts, n_prompts=3, n_texts=2,
                                                max_text_bytes=30, n_samples=1, sample_bytes_n=4), force=True, progress=False)
    assert r.ok, r.error
    m = json.loads((r.path / "metrics.json").read_text())
    assert m["same_tokenizer"] is False and m["vocab_sizes"][str(pa)] != m["vocab_sizes"][str(pb)]
    assert set(m["nll_bits"]["mid-token"]) == {"naive", "token_healing", "exact"}
    bp = m["bpb"]
    assert 0 < bp["ensemble"] <= (bp[str(pa)] + bp[str(pb)]) / 2 + 1e-3  # log of a mean >= mean of logs, byte by byte
    for k in (str(pa), str(pb)): assert bp[k] <= m["token_bpb"][k] + 1e-3  # summing over covers never loses mass
    assert list(r.path.glob("*.png"))
    import nbformat
    nb = nbformat.read(r.path / "byte_level_probs.ipynb", as_version=4)
    for i, c in enumerate(nb.cells):  # the report convention: no streams or errors, no bare reprs
        for o in c.get("outputs", []) if c.cell_type == "code" else []:
            assert o.get("output_type") not in ("stream", "error"), (i, o.get("text", o.get("evalue")))
            assert set(o.get("data", {})) & {"text/html", "text/markdown", "image/png"}, (i, o.get("data"))
