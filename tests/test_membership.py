"""Heavier checks of tokexp.membership: vectorized reductions against naive loops, score directions on a deliberately
overfit model (members must score as members), exclusions of short texts, evaluation wiring, population data."""
from dataclasses import replace

import numpy as np
import pytest

from tokexp.core import InputError
from tokexp.lm import TINY, TokenStats, token_stats, toy_corpus, train_tokenizer, fit_lm
from tokexp.membership import (MIA_SCORES, bottom_k_mean, corpus_frequencies, evaluate_membership, first_occurrence,
                               overfit_spec, score_membership, token_frequencies, train_overfit_lm, zlib_bits,
                               zlib_bytes)


# ---------------------------------------------------------------- vectorized reductions vs loops
def test_bottom_k_mean_matches_loop():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 40)); L = rng.integers(1, 41, 50); mask = np.arange(40)[None] < L[:, None]
    for k in (0.05, 0.2, 0.5, 1.0):
        ref = [np.sort(x[i, :L[i]])[:max(1, int(np.floor(k * L[i] + 1e-9)))].mean() for i in range(50)]
        np.testing.assert_allclose(bottom_k_mean(x, mask, k), ref, rtol=1e-12)


def test_first_occurrence_matches_loop():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 6, (30, 25)); mask = rng.random((30, 25)) < 0.8
    ref = np.zeros_like(mask)
    for i in range(30):
        seen = set()
        for j in range(25):
            if mask[i, j] and ids[i, j] not in seen: ref[i, j] = True; seen.add(ids[i, j])
    np.testing.assert_array_equal(first_occurrence(ids, mask), ref)


def test_token_frequencies_laplace():
    f = token_frequencies([[0, 0, 2]], 3, alpha=1.0)
    np.testing.assert_allclose(f, [3 / 6, 1 / 6, 2 / 6])
    with pytest.raises(InputError, match="alpha"): token_frequencies([[0]], 3, alpha=0)


def test_zlib_bits_grow_with_entropy():
    b = zlib_bits(["a" * 400, "".join(chr(97 + (i * 7919) % 26) for i in range(400))])
    assert b[0] < b[1]


# ---------------------------------------------------------------- a deliberately overfit model
WORDS = ("apple river stone cloud quiet orange table winter letter garden silver window music yellow horse candle "
         "forest paper bridge island morning thunder pocket ladder mirror basket dragon violin rocket pepper").split()


def random_texts(n, seed, lo=10, hi=16):
    "Random word sequences: a model can only tell members from non-members by memorizing them."
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(lo, hi))) for _ in range(n)]


@pytest.fixture(scope="module")
def setup():
    """Members: 24 random word sequences the model is trained on for many epochs; non-members: 24 others from the same
    distribution; population: a third disjoint set for the reference model and the frequency table."""
    members, nonmembers, population = random_texts(24, 0), random_texts(24, 1), random_texts(200, 2)
    tok = train_tokenizer(population + members + nonmembers, 300)
    spec = replace(overfit_spec(steps=200, vocab_size=len(tok), ctx=32), d_model=64, batch_size=8, lr=1e-2)
    target, log = train_overfit_lm(members, tok, spec)
    ref, _ = fit_lm(replace(spec, name="mia-ref", seed=99, steps=60), tok, {"population": (population, [])}, progress=False)
    eval_texts = members + nonmembers
    y = np.r_[np.ones(24, int), np.zeros(24, int)]
    ts = token_stats(target, tok, eval_texts)
    rs = token_stats(ref.eval(), tok, eval_texts)
    freq = corpus_frequencies(tok, population)
    return dict(tok=tok, target=target, ts=ts, rs=rs, freq=freq, y=y, texts=eval_texts, log=log)


def test_every_score_detects_memorization(setup):
    s = setup
    assert s["log"]["epochs"] > 10
    # DC-PDD's cap a=0.01 (chosen for 50k-token LLMs, where p is small) saturates on a 300-token toy model: lift it
    df = score_membership(s["ts"], texts=s["texts"], ref_stats=s["rs"], freq=s["freq"], params={"dc-pdd": {"a": 10.0}})
    assert set(df.columns) - {"n_tokens"} == set(MIA_SCORES.names())
    res = evaluate_membership(df, s["y"], n_boot=200)
    aucs = {n: r["auroc"] for n, r in res.items()}
    print(aucs)
    # measured (seeded, deterministic): loss 0.84, zlib-bits 0.84, min-k 0.81, ref 0.85, dc-pdd 0.73, min-k++ 0.55.
    # Min-K%++ is weak here: on memorized positions the model's distribution is peaked, so the z-score of the actual
    # token carries little extra information; its direction is checked in test_member_beats_random_tokens instead.
    floors = {"loss": 0.75, "zlib": 0.75, "zlib-bits": 0.75, "min-k": 0.75, "ref": 0.75, "dc-pdd": 0.65, "min-k++": 0.0}
    for n, a in aucs.items(): assert a > floors[n], (n, a)
    assert not df.isna().any().any()


def test_member_beats_random_tokens(setup):
    """A member text (the model predicts it well) vs a random token sequence: every score ranks the member higher."""
    s, tok = setup, setup["tok"]
    rng = np.random.default_rng(5)
    rand = tok.decode(rng.integers(3, len(tok), 30).tolist())
    texts = [s["texts"][0], rand]
    ts = token_stats(s["target"], tok, texts)
    df = score_membership(ts, texts=texts, freq=s["freq"])
    for n in df.columns[1:]:
        hm = MIA_SCORES[n].higher_means_member
        a, b = df[n].iloc[0], df[n].iloc[1]
        assert (a > b) if hm else (a < b), (n, a, b)


def test_short_texts_are_excluded_and_counted(setup):
    s = setup
    df = score_membership(s["ts"], texts=s["texts"], min_tokens=12)
    n_short = int((s["ts"].lengths < 12).sum())
    assert df.attrs["excluded"] == n_short and len(df) == len(s["texts"]) - n_short
    res = evaluate_membership(df, s["y"], groups=np.array(["a", "b"] * 24), n_boot=100)
    assert set(res["loss"]["groups"]) == {"a", "b"}


def test_bad_inputs(setup):
    s = setup
    with pytest.raises(InputError, match="text hashes differ"):
        MIA_SCORES["zlib"](s["ts"], texts=list(reversed(s["texts"])))
    with pytest.raises(InputError, match="labels"):
        evaluate_membership(score_membership(s["ts"]), s["y"][:10])
    with pytest.raises(InputError, match="params given"):
        score_membership(s["ts"], scores=["loss"], params={"min-k": {"k": 0.1}})


def test_population_texts_disjoint():
    from tokexp.lm import lm_split
    from tokexp.membership import population_texts
    pop = population_texts("fortunes", max_chars=200_000)
    tr, ho = lm_split("fortunes")
    assert len(pop) > 0
    assert not (set(pop) & (set(tr) | set(ho)))


# ---------------------------------------------------------------- non-finite token statistics are refused, not sorted away
@pytest.mark.parametrize("field,value", [("logp", np.nan), ("logp", -np.inf), ("var_logp", np.nan), ("mean_logp", np.nan)])
def test_nan_token_stats_are_refused_like_loss(field, value):
    """A NaN (or −inf) at a scored position: loss refuses it (its mean is NaN); Min-K% / Min-K%++ sort per-token values
    and used to push a NaN past the k% cut (or zero a −inf) and return a finite score — they must refuse it too."""
    from tokexp.membership import toy_mia_stats
    ts, _, _ = toy_mia_stats(n=4, T=10)
    arr = getattr(ts, field).copy(); arr[1, 7] = value
    bad = replace(ts, **{field: arr})
    names = ["min-k++"] + (["loss", "min-k"] if field == "logp" else [])
    for n in names:
        with pytest.raises(InputError, match="non-finite"): MIA_SCORES[n](bad)
    with pytest.raises(InputError, match="non-finite"): bottom_k_mean(np.where(np.arange(10) == 3, np.nan, 1.0)[None], np.ones((1, 10), bool))
    # an unscored position may hold anything (padding)
    arr2 = getattr(ts, field).copy(); m2 = ts.mask.copy(); arr2[1, 7] = value; m2[1, 7] = False
    ok = replace(ts, **{field: arr2, "mask": m2})
    for n in names: assert np.isfinite(MIA_SCORES[n](ok)[0]).all()


# ---------------------------------------------------------------- zlib: the peers' per-token form, the total-bits variant
def test_zlib_scores_match_direct_computation(setup):
    """`zlib` = mean NLL per token (nats) / zlib bytes, as Carlini et al.'s extraction code (log perplexity / zlib size),
    the Min-K% code's ppl/zlib and MIMIR's ZLIBAttack (loss / zlib_entropy) compute it; `zlib-bits` = −Σ log2 p / zlib bits."""
    import math, zlib
    s = setup
    ts, texts = s["ts"], s["texts"]
    per_tok, bits = [], []
    for i, t in enumerate(texts):
        lp = [float(v) for v, m in zip(ts.logp[i], ts.mask[i]) if m]
        z = len(zlib.compress(bytes(t, "utf-8")))
        per_tok.append(-sum(lp) / len(lp) / z)
        bits.append(-sum(v / math.log(2) for v in lp) / (8 * z))
    np.testing.assert_allclose(MIA_SCORES["zlib"](ts, texts=texts)[0], per_tok, rtol=1e-9)
    np.testing.assert_allclose(MIA_SCORES["zlib-bits"](ts, texts=texts)[0], bits, rtol=1e-9)
    assert not MIA_SCORES["zlib"].higher_means_member and not MIA_SCORES["zlib-bits"].higher_means_member
    np.testing.assert_array_equal(zlib_bits(texts), 8 * zlib_bytes(texts))


def test_zlib_scores_length_dependence():
    """The measurement the notebook's prose quotes: on held-out natural text (fortunes) under a unigram LM of the training
    split, neither zlib score is length-independent; `zlib` falls like 1/length, `zlib-bits` rises with length."""
    import math
    from scipy.stats import spearmanr
    from tokexp.lm import lm_split
    from tokexp.membership import MIAScore
    tr, ho = lm_split("fortunes")
    tok = train_tokenizer(tr[:3000], 2048)
    f = token_frequencies(tok(tr, add_special_tokens=False)["input_ids"], len(tok))
    def scores(texts):
        enc = tok(texts, add_special_tokens=False)["input_ids"]
        T = max(map(len, enc)); lp = np.zeros((len(enc), T), np.float32); mask = np.zeros((len(enc), T), bool)
        for i, e in enumerate(enc): lp[i, :len(e)] = np.log(f[e]); mask[i, :len(e)] = True
        z = lambda a: np.zeros_like(a)
        st = TokenStats(ids=np.zeros((len(enc), T), np.int64), mask=mask, logp=lp, rank=np.ones((len(enc), T), np.int64), entropy=z(lp),
                        max_logp=z(lp), mass_geq=z(lp), mean_logp=z(lp), var_logp=z(lp), text_hashes=[str(i) for i in range(len(enc))], model_name="unigram")
        return st.lengths, {n: MIA_SCORES[n](st, texts=texts)[0] for n in ("zlib", "zlib-bits", "loss")}
    held = [t for t in ho if len(t) >= 40][:600]
    n, sc = scores(held)
    rho = {k: spearmanr(v, n).statistic for k, v in sc.items()}
    print("Spearman rho with length:", {k: round(v, 3) for k, v in rho.items()}, "tokens", n.min(), n.max())
    assert rho["zlib"] < -0.9 and rho["zlib-bits"] > 0.8 and abs(rho["loss"]) < 0.4, rho
    long = [t for t in held if len(t) >= 400]
    med = {frac: {k: float(np.median(v)) for k, v in scores([t[:int(len(t) * frac)] for t in long])[1].items()} for frac in (0.25, 0.5, 1.0)}
    print(len(long), "texts truncated:", med)
    assert med[0.25]["zlib"] > 2 * med[1.0]["zlib"]  # ~1/length
    assert med[0.25]["zlib-bits"] < med[0.5]["zlib-bits"] < med[1.0]["zlib-bits"]
