"""SelfCheckGPT (tokexp.graybox.selfcheck): n-gram scores against hand counts and a direct implementation, the BERTScore
variant against a direct loop over MiniLM token embeddings, the probability baselines against a per-sequence forward,
and an end-to-end run of the `selfcheck` template."""
import json
import math
from collections import Counter

import numpy as np
import pytest

from tokexp.graybox import selfcheck as sc
from conftest import reads_as_report, tiny_lm

PASSAGE = "The cat sat on the mat. It purred."
SAMPLES = ["The cat sat on a mat. It slept.", "A dog sat on the mat. It purred loudly."]
# the same texts tokenized by hand, sentence by sentence (lowercased words and punctuation)
HAND = [["the", "cat", "sat", "on", "the", "mat", "."], ["it", "purred", "."],
        ["the", "cat", "sat", "on", "a", "mat", "."], ["it", "slept", "."],
        ["a", "dog", "sat", "on", "the", "mat", "."], ["it", "purred", "loudly", "."]]


def direct_ngram(n, conditional=False):
    "Sentence (avg, max) −log p of the passage's two sentences by explicit counting loops."
    grams, hist = {}, {}
    total = 0
    for sent in HAND:
        padded = ["<s>"] * (n - 1) + sent
        for j in range(len(sent)):
            g = tuple(padded[j:j + n])
            grams[g] = grams.get(g, 0) + 1
            hist[g[:-1]] = hist.get(g[:-1], 0) + 1
            total += 1
    out = []
    for sent in HAND[:2]:
        padded = ["<s>"] * (n - 1) + sent
        nll = []
        for j in range(len(sent)):
            g = tuple(padded[j:j + n])
            p = grams[g] / (hist[g[:-1]] if conditional and n > 1 else total)
            nll.append(-math.log(p))
        out.append((sum(nll) / len(nll), max(nll)))
    return out


def test_unigram_hand_counts():
    m = sc.NgramModel(1)
    for t in [PASSAGE] + SAMPLES: m.add(t)
    assert m.total == 31  # 7 + 3 + 7 + 3 + 7 + 4 tokens
    assert (m.counts[("the",)], m.counts[("mat",)], m.counts[(".",)], m.counts[("purred",)], m.counts[("loudly",)]) == (4, 3, 6, 2, 1)
    r = sc.selfcheck_ngram(sc.split_sentences(PASSAGE), PASSAGE, SAMPLES, 1)
    # "It purred.": it 3/31, purred 2/31, . 6/31 -> max is -log(2/31)
    assert r["max"][1] == pytest.approx(math.log(31 / 2))
    assert r["avg"][1] == pytest.approx(-(math.log(3 / 31) + math.log(2 / 31) + math.log(6 / 31)) / 3)


@pytest.mark.parametrize("n,conditional", [(1, False), (2, False), (3, False), (2, True), (3, True)])
def test_ngram_matches_direct_implementation(n, conditional):
    r = sc.selfcheck_ngram(sc.split_sentences(PASSAGE), PASSAGE, SAMPLES, n, conditional=conditional)
    d = direct_ngram(n, conditional)
    np.testing.assert_allclose(r["avg"], [a for a, _ in d], rtol=1e-12)
    np.testing.assert_allclose(r["max"], [b for _, b in d], rtol=1e-12)
    assert r["doc_avg_max"] == pytest.approx(np.mean([b for _, b in d]))  # mean of the sentence maxima
    reg = sc.NgramCheck("t", n=n, reduce="max", conditional=conditional)
    assert reg.passage_score(sc.split_sentences(PASSAGE), PASSAGE, SAMPLES) == pytest.approx(np.mean([b for _, b in d]))


def test_ngram_variant_ranks_the_contradicted_sentence_higher():
    p = "A dog is a mammal. It can fly."
    s = ["A dog is a mammal. It can bark.", "A dog is a mammal. It can swim.", "A dog is a pet mammal."]
    for name in ("unigram-avg", "unigram-max", "bigram-avg", "bigram-max"):
        v = sc.SELFCHECK[name].sentence_scores(sc.split_sentences(p), p, s)
        assert v[1] > v[0], name


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def minilm():
    return sc.TokenEmbedder()


def test_bertscore_matches_direct_loop(minilm):
    import torch
    model, tok = minilm.model, minilm.tok
    specials = {tok.cls_token_id, tok.sep_token_id}

    def token_vectors(sentence):
        enc = tok(sentence, return_tensors="pt")
        with torch.no_grad(): h = model(**enc, output_hidden_states=True).hidden_states[-1][0]
        return h, [int(i) not in specials for i in enc["input_ids"][0]]

    def cos(u, v): return float(u @ v) / (float(u.norm()) * float(v.norm()))

    def f1(a, b):
        (ha, wa), (hb, wb) = token_vectors(a), token_vectors(b)
        p = [max(cos(ha[i], hb[j]) for j in range(len(hb))) for i in range(len(ha)) if wa[i]]
        r = [max(cos(ha[i], hb[j]) for i in range(len(ha))) for j in range(len(hb)) if wb[j]]
        P, R = sum(p) / len(p), sum(r) / len(r)
        return 2 * P * R / (P + R)

    sents = sc.split_sentences(PASSAGE)
    direct = [1 - np.mean([max(f1(s, t) for t in sc.split_sentences(smp)) for smp in SAMPLES]) for s in sents]
    got = sc.selfcheck_bertscore(sents, SAMPLES, minilm)
    np.testing.assert_allclose(got, direct, atol=2e-5)
    assert sc.SELFCHECK["bertscore"].passage_score(sents, PASSAGE, SAMPLES, minilm) == pytest.approx(np.mean(direct), abs=2e-5)
    # an empty sample supports nothing: it adds 0 to the mean of best F1
    np.testing.assert_allclose(sc.selfcheck_bertscore(sents, SAMPLES + [""], minilm), 1 - (1 - got) * 2 / 3, atol=1e-6)


def test_probability_baselines_match_direct_forward():
    import torch
    model = tiny_lm("gpt2", vocab=50)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, 50, size=k)) for k in (3, 5, 2)]
    passages = [list(rng.integers(1, 50, size=k)) for k in (4, 1, 6)]
    got = sc.probability_baselines(model, prompts, passages, batch_size=2)
    for i, (p, q) in enumerate(zip(prompts, passages)):
        with torch.no_grad(): lp = torch.log_softmax(model(input_ids=torch.tensor([p + q])).logits[0].double(), -1)
        nll = [-float(lp[len(p) - 1 + j, q[j]]) for j in range(len(q))]
        ent = [-float((lp[len(p) - 1 + j].exp() * lp[len(p) - 1 + j]).sum()) for j in range(len(q))]
        assert got["avg_nll"][i] == pytest.approx(np.mean(nll), abs=1e-4) and got["max_nll"][i] == pytest.approx(max(nll), abs=1e-4)
        assert got["avg_entropy"][i] == pytest.approx(np.mean(ent), abs=1e-4) and got["max_entropy"][i] == pytest.approx(max(ent), abs=1e-4)
    assert np.isnan(sc.probability_baselines(model, [[1, 2]], [[]])["avg_nll"][0])


def test_token_f1_and_auc_pr():
    assert sc.token_f1("the wood of a tree", "wood of the oak tree") == pytest.approx(2 * 1 * 0.75 / 1.75)
    from sklearn.metrics import average_precision_score
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 60); s = y + rng.normal(0, 1, 60)
    r = sc.auc_pr(s, y, n_boot=200)
    assert r["ap"] == pytest.approx(average_precision_score(y, s)) and r["ci"][0] <= r["ap"] <= r["ci"][1]


def test_template_runs_small(reports_tmp):
    from tokexp.report import run_experiment
    r = run_experiment("selfcheck", dict(base_steps=20, n_finetune=80, n_train_words=12, n_heldout_words=12, ft_steps=40,
                                         n_samples=4, n_boot=100, f1_threshold=0.2), force=True, progress=False)
    assert r.ok, r.error
    m = json.loads((r.path / "metrics.json").read_text())
    assert m["n_words"] == 24 and m["n_scored"] == m["n_supported"] + m["n_not_supported"]
    if m["evaluated"]:
        assert set(sc.SELFCHECK.names()) <= set(m["auroc"]) and all(0 <= v <= 1 for v in m["auroc"].values())
        assert set(m["auroc_vs_n"]["unigram-max"]) == {"1", "2", "4"}
    assert list(r.path.glob("*.png"))
    reads_as_report(r.path / "selfcheck.ipynb")
