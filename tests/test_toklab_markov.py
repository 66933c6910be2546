"Markov sources (exact entropy rate, stationary distribution, likelihood) against independent implementations; model scoring; e2e template."
import itertools, json, math

import numpy as np
import pytest

from tokexp.toklab.markov import (MarkovSource, MarkovRun, get_source, random_source, switching, char_tokenizer, char_xent,
                                  compact_bpe, train_markov_lm, load_markov_lm)
from conftest import reads_as_report


def _mc_entropy(src:MarkovSource, n:int, seed:int, blocks:int=50):
    "Monte-Carlo entropy rate: -mean log2 P(x_t | context) along one long sample, by a direct loop; (mean, batch-means SE)."
    x = src.sample(1, n, seed=seed)[0]
    row = {"".join(c): np.asarray(src.table[i]) for i, c in enumerate(itertools.product(src.alphabet, repeat=src.k))}
    col = {c: j for j, c in enumerate(src.alphabet)}
    lp = np.array([-math.log2(row[x[t - src.k:t]][col[x[t]]]) for t in range(src.k, n)])
    b = lp[:len(lp) // blocks * blocks].reshape(blocks, -1).mean(1)
    return lp.mean(), b.std(ddof=1) / math.sqrt(blocks)


@pytest.mark.parametrize("src", [get_source("random-k2-abc-s0"), get_source("switching-k3"), random_source(3, "ab", seed=4),
                                 switching(2, p=0.9, q=0.3)], ids=lambda s: s.name)
def test_entropy_rate_matches_monte_carlo(src):
    mc, se = _mc_entropy(src, 200_000, seed=11)
    assert se < 0.01
    assert abs(mc - src.entropy_rate()) < 4 * se, (mc, se, src.entropy_rate())


def test_entropy_rate_detects_a_wrong_table():
    "The Monte-Carlo check can fail: the entropy of another source's table is far outside the interval."
    a, b = get_source("switching-k2"), switching(2, p=0.6, q=0.6)
    mc, se = _mc_entropy(a, 100_000, seed=3)
    assert abs(mc - b.entropy_rate()) > 10 * se


def test_stationary_matches_power_iteration_and_enumeration():
    src = random_source(2, "ab", seed=7, concentration=2.0)
    pi = src.stationary()
    # power iteration on the context chain, written from the table (not transition_matrix)
    S, m = src.n_states, src.m
    v = np.full(S, 1 / S)
    for _ in range(5000):
        w = np.zeros(S)
        for s in range(S):
            for a in range(m): w[(s * m) % S + a] += v[s] * src.table[s][a]
        v = w
    np.testing.assert_allclose(pi, v, atol=1e-10)
    # brute force: the context after n steps from a uniform start, summing the probability of every path
    n, dist = 14, np.zeros(S)
    for start in range(S):
        for path in itertools.product(range(m), repeat=n):
            p, s = 1 / S, start
            for a in path: p *= src.table[s][a]; s = (s * m) % S + a
            dist[s] += p
    np.testing.assert_allclose(pi, dist, atol=1e-6)
    # and the context frequencies of a long sample
    x = src.sample(1, 100_000, seed=2)[0]
    freq = np.bincount([int(x[t - 2:t].translate(str.maketrans("ab", "01")), 2) for t in range(2, len(x))], minlength=S) / (len(x) - 2)
    np.testing.assert_allclose(freq, pi, atol=0.01)


def test_log2prob_matches_direct_product():
    src = get_source("random-k3-abc-s0")
    pi = src.stationary()
    for t in src.sample(5, 37, seed=4) + ["ab", "c"]:
        ids = [src.alphabet.index(c) for c in t]
        if len(ids) >= 3:
            s = ids[0] * 9 + ids[1] * 3 + ids[2]
            lp = math.log2(pi[s])
            for a in ids[3:]: lp += math.log2(src.table[s][a]); s = (s * 3) % 27 + a
        else:  # marginal of the first symbols of a stationary block
            lp = math.log2(sum(pi[i] for i in range(27) if [i // 9, (i // 3) % 3, i % 3][:len(ids)] == ids))
        assert src.log2prob([t])[0] == pytest.approx(lp, abs=1e-9)


def test_true_source_cross_entropy_is_the_entropy_rate():
    "Per-character cross-entropy of the true probabilities: E = (block entropy + (n - k) H) / n, and -> H for long strings."
    for name in ("switching-k2", "random-k2-abc-s0"):
        src = get_source(name)
        n, texts = 2000, src.sample(100, 2000, seed=5)
        per = -src.log2prob(texts) / n
        expect = (src.block_entropy() + (n - src.k) * src.entropy_rate()) / n
        se = per.std(ddof=1) / math.sqrt(len(per))
        assert abs(per.mean() - expect) < 4 * se
        assert src.xent_per_char(texts) == pytest.approx(per.mean(), abs=1e-12)
        assert abs(src.xent_per_char(src.sample(2, 100_000, seed=6)) - src.entropy_rate()) < 0.01


def test_sampling_is_deterministic_and_stationary():
    src = get_source("switching-k3")
    assert src.sample(3, 50, seed=1) == src.sample(3, 50, seed=1)
    assert src.sample(3, 50, seed=1) != src.sample(3, 50, seed=2)
    first = np.array([[c == "1" for c in t[:3]] for t in src.sample(4000, 3, seed=9)])
    np.testing.assert_allclose(first.mean(0), 0.5, atol=0.03)   # the stationary start, not a fixed context


def test_char_xent_matches_one_string_at_a_time():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(1)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=6, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    tok = char_tokenizer("abc")
    texts = get_source("random-k2-abc-s0").sample(7, 40, seed=3) + ["abc", "c"]
    got = char_xent(model, tok, texts, batch_size=4)
    tot = 0.0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([[0] + [3 + "abc".index(c) for c in t]])
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            tot += -logp[torch.arange(len(t)), ids[0, 1:]].sum().item() / math.log(2)
    assert got["bits_per_char"] == pytest.approx(tot / sum(map(len, texts)), rel=1e-5)
    assert got["chars_per_token"] == 1.0


def test_char_xent_windows_score_every_token_once_with_its_window_context():
    "A string longer than the context: each token t is scored once, given the tokens from its window's start (direct loop)."
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(2)
    W = 16
    model = GPT2LMHeadModel(GPT2Config(vocab_size=5, n_positions=W, n_embd=32, n_layer=1, n_head=2)).eval()
    tok = char_tokenizer("01")
    text = get_source("switching-k2").sample(1, 50, seed=1)[0]
    seq = [0] + [3 + int(c) for c in text]
    total, start, scored = 0.0, 0, 1   # windows of W positions advancing by W // 2; the last one ends at the string's end
    with torch.no_grad():
        while scored < len(seq):
            end = min(start + W, len(seq))
            logp = torch.log_softmax(model(torch.tensor([seq[start:end]])).logits[0].double(), -1)
            total += sum(-logp[t - 1 - start, seq[t]].item() for t in range(scored, end)) / math.log(2)
            scored, start = end, min(start + W // 2, len(seq) - W)
    got = char_xent(model, tok, [text, "0110"], batch_size=3)
    assert got["nll_bits"][0] == pytest.approx(total, rel=1e-5)
    assert got["n_tokens"] == 54


def test_compact_bpe_segments_like_the_byte_level_bpe(tmp_path):
    from tokexp.toklab.train import TokRecipe, train_tokenizer, as_hf_tokenizer
    src = get_source("random-k2-abc-s0")
    full = train_tokenizer(src.sample(30, 600, seed=0), TokRecipe("bpe", 340, pre_tokenizer="none"), cache_dir=tmp_path)
    hf, small = as_hf_tokenizer(full), compact_bpe(full, "abc")
    held = src.sample(20, 150, seed=8)
    seg = lambda tk: [tk.convert_ids_to_tokens(e) for e in tk(held, add_special_tokens=False)["input_ids"]]
    assert seg(small) == seg(hf)
    assert len(small) == len(hf) - 256 + 3
    assert [small.decode(e) for e in small(held, add_special_tokens=False)["input_ids"]] == held


def test_training_is_deterministic_and_cached(tmp_path):
    run = MarkovRun("switching-k2", "bpe", bpe_vocab=50, n_train=20, train_len=300, d_model=16, n_heads=2, n_layers=1, ctx=32,
                    steps=4, batch_size=4, warmup=2)
    a = train_markov_lm(run, cache_dir=tmp_path / "a")
    b = train_markov_lm(run, cache_dir=tmp_path / "b")
    (ma, ta, la), (mb, tb, lb) = load_markov_lm(a), load_markov_lm(b)
    assert la["loss"] == lb["loss"] and la["vocab_size"] == 50
    import torch
    assert all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values()))
    assert a.name == b.name and train_markov_lm(run, cache_dir=tmp_path / "a") == a


def test_template_e2e(reports_tmp):
    from tokexp.report import run_experiment
    params = dict(sources=["switching-k2"], bpe_vocabs=[48], n_train=24, train_len=400, n_eval=8, eval_len=100, d_model=16,
                  n_heads=2, n_layers=1, ctx=48, steps=6, batch_size=4, warmup=2, long_steps=8, unigram_vocabs=[48, 64], long_sources=["switching-k2"])
    r = run_experiment("markov_tokenization", params, force=True, progress=False)
    assert r.ok, r.error
    reads_as_report(r.path / "markov_tokenization.ipynb")
    m = json.loads((r.path / "metrics.json").read_text())
    assert list(r.path.glob("*.png"))
    assert set(m["bits_per_char"]) == {"switching-k2/char", "switching-k2/bpe-48", "switching-k2/char-long"}
    assert m["entropy_rate"]["switching-k2"] == pytest.approx(0.7219, abs=1e-4)
