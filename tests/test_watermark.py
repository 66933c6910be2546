"""Heavier checks of tokexp.watermark: calibration under no watermark (z ~ N(0,1), false-positive rates with exact
binomial tolerances, uniform Aaronson p-values), power on generations of a real (tiny) HF model through
`model.generate`, the vectorized detector against a naive per-token loop, and robustness to edits."""
import functools
import math
from dataclasses import replace

import numpy as np
import pytest
from scipy import stats

from tokexp.watermark import (KGW, Aaronson, WatermarkLogitsProcessor, context_hash, detect, edit_ids, token_uniform,
                              toy_generate)

N_NULL, T_NULL, V_NULL = 20000, 200, 5000


@pytest.fixture(scope="module")
def null_ids():
    "Unwatermarked text: uniformly random token sequences (no model needed: detection reads ids only)."
    return np.random.default_rng(123).integers(0, V_NULL, (N_NULL, T_NULL))


@pytest.mark.parametrize("gamma,h", [(0.25, 1), (0.5, 2), (0.1, 4)])
def test_kgw_null_z_is_standard_normal(null_ids, gamma, h):
    z = detect(KGW(gamma=gamma, h=h, key=7), null_ids)["z"]
    n = len(z)
    # mean ~ N(0, 1/n) and sample sd ~ N(1, 1/(2n)) under H0: 5-sigma tolerances (false alarm < 1e-6 per check)
    assert abs(z.mean()) < 5 / math.sqrt(n), z.mean()
    assert abs(z.std() - 1) < 5 / math.sqrt(2 * n), z.std()
    # false-positive rates: the count above a threshold must be inside a 99.99% binomial interval of its nominal rate
    # (the z-test uses the normal approximation of a binomial; at n ~ 200 the tail error is small but not zero, so the
    # nominal rate is the one-sided binomial tail computed exactly)
    for thr in (1.645, 2.326):
        k = int((z > thr).sum())
        nt = T_NULL - h
        cut = gamma * nt + thr * math.sqrt(nt * gamma * (1 - gamma))
        exact = stats.binom.sf(math.floor(cut), nt, gamma)  # P(G > cut) with the typical number of scored tokens
        lo, hi = stats.binom.ppf(5e-5, n, exact), stats.binom.ppf(1 - 5e-5, n, exact)
        assert lo - 0.01 * n <= k <= hi + 0.01 * n, (thr, k, exact * n)
    # z > 4: nominal 3.2e-5 (exact binomial tail a bit higher); P(count > 6 | rate 1e-4, n=20000) < 2e-3
    assert int((z > 4).sum()) <= 6


def test_aaronson_null_p_values_uniform(null_ids):
    p = detect(Aaronson(key=7, h=2), null_ids)["p_value"]
    assert stats.kstest(p, "uniform").pvalue > 1e-4
    n = len(p)
    for a in (0.01, 0.05):
        k = int((p < a).sum())
        assert stats.binom.ppf(5e-5, n, a) <= k <= stats.binom.ppf(1 - 5e-5, n, a), (a, k)


def test_detect_matches_naive_loop():
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, 50, rng.integers(1, 40)) for _ in range(30)]
    for wm in (KGW(gamma=0.3, h=2, key=11), Aaronson(h=1, key=5)):
        for ignore in (True, False):
            r = detect(wm, seqs, ignore_repeated=ignore)
            for i, s in enumerate(seqs):
                seen, n, tot = set(), 0, 0.0
                for t in range(wm.h, len(s)):
                    ctx = tuple(s[t - wm.h:t])
                    if ignore and (ctx, s[t]) in seen: continue
                    seen.add((ctx, s[t]))
                    u = token_uniform(context_hash(wm.key, np.array(ctx, np.int64)), s[t])
                    tot += float(u < wm.gamma) if isinstance(wm, KGW) else -math.log1p(-u)
                    n += 1
                assert r["n_scored"][i] == n
                assert r["score"][i] == pytest.approx(tot, rel=1e-12, abs=1e-12)


def test_power_on_toy_generations():
    for wm, greedy in [(KGW(delta=2.0, gamma=0.25), False), (Aaronson(), True)]:
        ids = toy_generate(WatermarkLogitsProcessor(wm), n=40, T=100, greedy=greedy, seed=4)
        r = detect(wm, ids)
        assert r["detected"].mean() >= 0.95, (wm.name, r["p_value"])  # p <= ALPHA (the level of z > 4)
        # robustness: 20% random substitutions still detected most of the time
        e = detect(wm, edit_ids(ids, 0.2, "substitute", 500, seed=1))
        assert (e["p_value"] < 1e-3).mean() >= 0.8, (wm.name, e["z"])


# ---------------------------------------------------------------- a real HF model through generate
@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from tokexp.lm import TINY, load_lm, toy_corpus, train_lm
    return load_lm(train_lm(TINY, corpus=toy_corpus(), cache_dir=tmp_path_factory.mktemp("cache"), progress=False), device="cpu")


@pytest.mark.parametrize("wm,sample", [(KGW(gamma=0.25, delta=2.0, h=1), True), (Aaronson(h=1), False)])
def test_hf_generate_is_detected_from_ids_only(tiny_lm, wm, sample):
    import torch
    from transformers import LogitsProcessorList
    model, tok = tiny_lm
    prompts = ["The cat", "A dog", "my friend", "the old man", "a small bird", "the teacher"]
    enc = tok(prompts, add_special_tokens=False)["input_ids"]
    outs = []
    for i, p in enumerate(enc):
        torch.manual_seed(i)
        x = torch.tensor([[tok.bos_token_id] + p])
        kw = dict(do_sample=True, top_k=0) if sample else dict(do_sample=False)
        y = model.generate(x, max_new_tokens=24, min_new_tokens=24, logits_processor=LogitsProcessorList([WatermarkLogitsProcessor(wm, len(tok))]),
                           pad_token_id=tok.pad_token_id, **kw)
        outs.append((x[0].tolist(), y[0, x.shape[1]:].tolist()))
    marked = detect(wm, [o for _, o in outs], prefix=[p for p, _ in outs])
    # a 1-layer toy model has low entropy on its own grammar, so 24 tokens give moderate evidence; pooled it is strong
    assert np.median(marked["z"]) > 2, marked["z"]
    pooled = detect(wm, [np.concatenate([o for _, o in outs])])
    assert pooled["p_value"][0] < 1e-4
    plain = []
    for i, p in enumerate(enc):
        torch.manual_seed(100 + i)
        y = model.generate(torch.tensor([[tok.bos_token_id] + p]), max_new_tokens=24, min_new_tokens=24, do_sample=True, top_k=0,
                           pad_token_id=tok.pad_token_id)
        plain.append(y[0, len(p) + 1:].tolist())
    assert detect(wm, [np.concatenate(plain)])["p_value"][0] > 1e-4


# ---------------------------------------------------------------- exact p-values and the false-positive rate they promise
def test_kgw_p_value_is_the_exact_binomial_tail():
    "KGW p-value = P(X ≥ green | n, γ), checked against a direct summation of the binomial pmf."
    wm = KGW(gamma=0.25)
    n = np.array([1, 5, 8, 8, 16, 40, 96, 200]); g = np.array([1, 3, 6, 8, 9, 20, 40, 80])
    _, p = wm.test(g.astype(float), n)
    ref = [sum(math.comb(int(m), k) * 0.25 ** k * 0.75 ** (int(m) - k) for k in range(int(x), int(m) + 1)) for x, m in zip(g, n)]
    np.testing.assert_allclose(p, ref, rtol=1e-10)
    z, _ = wm.test(g.astype(float), n)  # the z-score stays available as a secondary statistic
    np.testing.assert_allclose(z, (g - 0.25 * n) / np.sqrt(n * 0.25 * 0.75))


def test_aaronson_p_value_matches_simulated_null():
    "Aaronson p-value = Gamma(n, 1) survival of Σ −log(1 − r), checked against a Monte Carlo of i.i.d. uniform r."
    rng = np.random.default_rng(8)
    M = 200_000
    for n in (1, 4, 16):
        S = -np.log1p(-rng.random((M, n))).sum(1)
        for s in np.quantile(S, [0.5, 0.9, 0.99, 0.999]):
            _, p = Aaronson().test(np.array([s]), np.array([n]))
            emp = (S >= s).mean()
            assert abs(p[0] - emp) < 5 * math.sqrt(p[0] * (1 - p[0]) / M) + 1e-12, (n, s, p[0], emp)


def _fpr_ok(k, N, alpha):
    "k false positives in N null texts are consistent with a level-α test (99.99% one-sided binomial bound)."
    return k <= stats.binom.ppf(1 - 1e-4, N, alpha)


@pytest.mark.parametrize("wm", [KGW(gamma=0.25, key=3), KGW(gamma=0.5, h=2, key=4), Aaronson(key=5)], ids=["kgw.25", "kgw.5", "aaronson"])
def test_measured_fpr_respects_nominal_alpha_at_all_lengths(wm):
    """On 20k null sequences per length, the detection decision (p ≤ α) fires at most at rate α — also at 8 tokens,
    where the old rules (normal-approximation z for KGW, z = (S − n)/√n for Aaronson) overshoot several-fold."""
    alpha, N = 1e-2, 20_000
    rng = np.random.default_rng(99)
    for T in (8, 16, 96):
        X = rng.integers(0, V_NULL, (N, T + wm.h))
        r = detect(wm, X, alpha=alpha)
        np.testing.assert_array_equal(r["detected"], r["p_value"] <= alpha)
        k = int(r["detected"].sum())
        assert _fpr_ok(k, N, alpha), (wm.name, T, k / N)
        if isinstance(wm, KGW):  # discrete: the attained level is the exact tail at the critical count
            @functools.lru_cache(None)
            def size_at(n):  # P(X ≥ g*) with g* the smallest green count whose tail is ≤ α (direct pmf sums)
                tails = [sum(math.comb(n, j) * wm.gamma ** j * (1 - wm.gamma) ** (n - j) for j in range(g, n + 1)) for g in range(n + 2)]
                return next(t for t in tails if t <= alpha)
            size = sum(size_at(int(n)) for n in r["n_scored"])
            sd = math.sqrt(size)
            assert abs(k - size) < 5 * sd + 1, (T, k, size)
        else:  # continuous null: the rate is α itself
            assert k >= stats.binom.ppf(1e-4, N, alpha), (T, k / N)
        # the check has power: the old z-threshold rules fail it at short lengths (KGW γ = 0.25: 2.7% at 8 tokens;
        # Aaronson: 2.5%); for γ = 0.5 at 8 tokens z > 2.33 needs all 8 green, 0.4%, which happens to be under 1%
        k_old = int((r["z"] > stats.norm.isf(alpha)).sum())
        if T == 8 and getattr(wm, "gamma", 0) != 0.5: assert not _fpr_ok(k_old, N, alpha), (wm.name, k_old / N)


def test_default_alpha_is_the_old_z4_level():
    from tokexp.watermark import ALPHA
    assert ALPHA == pytest.approx(stats.norm.sf(4.0), rel=1e-12)
    r = detect(KGW(), np.random.default_rng(0).integers(0, 1000, (5, 30)))
    np.testing.assert_array_equal(r["detected"], r["p_value"] <= ALPHA)


# ================================================================ the eight schemes (issue 16)
from tokexp.watermark import (WATERMARKS, DiPmark, EXPEdit, ModifiedGumbel, SWEET, SynthID, Unigram, ar_lower_bound,
                              best_of_n, copy_paste, distinct_n, levenshtein_cost, self_bleu, sentence_bleu,
                              shuffle_spans, step_distribution)

V_S = 400  # toy vocabulary of the scheme tests


def _zoo(V=V_S):
    "Every registered scheme at its paper defaults (EXP-edit with a short key so the tests stay fast)."
    return {"kgw": KGW(key=3), "unigram": Unigram(vocab_size=V, key=3), "sweet": SWEET(key=3), "aaronson": Aaronson(key=3),
            "modified_gumbel": ModifiedGumbel(key=3), "dipmark": DiPmark(vocab_size=V, key=3), "synthid": SynthID(key=3),
            "synthid_weighted": SynthID(key=3, score="weighted_mean"), "exp_edit": EXPEdit(key=3, n_key=16, n_resample=49)}


def test_registry_has_the_eight_schemes():
    assert set(WATERMARKS) >= {"kgw", "aaronson", "modified_gumbel", "unigram", "sweet", "dipmark", "synthid", "exp_edit"}


def _zipf_text(N, T, V, seed):
    "Unwatermarked 'model' text: Zipf(1.3) ranks through a per-text random permutation — many repeated tokens and n-grams."
    rng = np.random.default_rng(seed)
    ranks = np.minimum(rng.zipf(1.3, (N, T)), V) - 1
    perms = np.argsort(rng.random((N, V)), 1)
    return np.take_along_axis(perms, ranks, 1)


def _randomized_p(wm, r, rng):
    """An exactly-uniform version of a discrete exact p-value (P(X > x) + U·P(X = x)) computed from the null law directly
    (scipy pmf/sf, not the scheme's code): KS-uniform iff the scheme's null law is right."""
    n, s = r["n_scored"].astype(int), r["score"]
    u = rng.random(len(n))
    if isinstance(wm, Unigram):
        law = stats.hypergeom(wm.vocab_size, wm.n_green, n); x = np.rint(s)
    elif isinstance(wm, SynthID):
        law = stats.binom(n * wm.m, 0.5); x = np.rint(s * n * wm.m)
    elif isinstance(wm, DiPmark):
        law = stats.binom(n, wm.green_fraction); x = np.rint(s)
    else:
        law = stats.binom(n, wm.gamma); x = np.rint(s)
    return law.sf(x) + u * law.pmf(x)


@pytest.mark.parametrize("name", ["kgw", "unigram", "sweet", "aaronson", "modified_gumbel", "dipmark", "synthid", "synthid_weighted", "exp_edit"])
@pytest.mark.parametrize("source", ["random", "unwatermarked"])
def test_null_calibration(name, source):
    """Under no watermark: the rate of p ≤ α stays inside a 99.99% binomial interval of α at three levels, and the p-values
    (randomized within atoms for discrete nulls, within the 1/(R+1) grid for EXP-edit) are uniform by KS."""
    wm = _zoo()[name]
    exp = isinstance(wm, EXPEdit)
    N, T = (300, 24) if exp else (4000, 64)
    X = np.random.default_rng(11).integers(0, V_S, (N, T)) if source == "random" else _zipf_text(N, T, V_S, 12)
    kw = {}
    if wm.needs_entropy: kw["entropy"] = np.random.default_rng(13).exponential(1.5, (N, T))  # about half the positions pass 1.2 nats
    if exp:  # one key per text, as in the paper (a shared key couples texts that share tokens: ξ_q[v] is reused)
        p = np.array([detect(replace(wm, key=100 + i), X[i:i + 1], alpha=0.01)["p_value"][0] for i in range(N)])
    else:
        r = detect(wm, X, alpha=0.01, **kw)
        p = r["p_value"]
    assert np.isfinite(p).all() and (p > 0).all() and (p <= 1).all()
    for a in (0.01, 0.05, 0.1):
        k = int((p <= a).sum())
        assert k <= stats.binom.ppf(1 - 1e-4, N, a), (name, a, k / N)
        if name in ("aaronson", "modified_gumbel"):  # continuous null: the level is attained
            assert k >= stats.binom.ppf(1e-4, N, a), (name, a, k / N)
    rng = np.random.default_rng(5)
    if exp:
        pu = p - rng.random(N) / (wm.n_resample + 1)
    elif name in ("aaronson", "modified_gumbel", "synthid_weighted"):
        pu = p
    else:
        pu = _randomized_p(wm, r, rng)
    assert stats.kstest(pu, "uniform").pvalue > 1e-4, name


def test_exp_edit_calibrated_null_gives_uniform_p_values():
    "The fast test: a null from other texts under random keys, applied to fresh unwatermarked texts."
    wm = EXPEdit(key=9, n_key=16)
    null = wm.calibrate(_zipf_text(200, 20, V_S, 1), n_keys=5)
    X = _zipf_text(500, 20, V_S, 2)
    p = np.array([detect(replace(wm, key=500 + i), X[i:i + 1], null=null)["p_value"][0] for i in range(len(X))])
    assert int((p <= 0.05).sum()) <= stats.binom.ppf(1 - 1e-4, 500, 0.05)
    assert stats.kstest(p - np.random.default_rng(0).random(500) / (len(null) + 1), "uniform").pvalue > 1e-4


# ---------------------------------------------------------------- distortion: Monte Carlo over keys on a toy model
@pytest.mark.parametrize("name", ["aaronson", "dipmark", "synthid", "exp_edit", "kgw", "unigram", "sweet", "modified_gumbel"])
def test_distortion_free_schemes_preserve_the_distribution_over_keys(name):
    """Averaged over keys, the next-token distribution of a distortion-free scheme is the model's. K = 20000 independent
    draws of the keyed randomness (distinct contexts under one key — the hash makes them independent — or distinct keys
    for the context-free schemes): every coordinate of the mean within 5 standard errors, or for forced choices the
    emitted-token counts pass a χ² test. The distorting schemes fail the same check, so it has power."""
    import torch
    V, K = 8, 20000
    p = np.array([0.65] + [0.05] * 7)
    zoo = {**_zoo(V), "synthid": SynthID(key=3, m=6, h=1), "exp_edit": EXPEdit(key=3, n_key=K), "sweet": SWEET(key=3, entropy_threshold=0.5)}
    wm = zoo[name]
    logits = torch.log(torch.as_tensor(p))[None].repeat(K, 1)
    if wm.h:
        Q = step_distribution(wm, logits, np.arange(K)[:, None].repeat(wm.h, 1))
    elif isinstance(wm, EXPEdit):  # one key sequence of length K: each step uses a fresh ξ
        Q = np.concatenate([step_distribution(wm, logits[:1], np.zeros((1, 0), np.int64), step=t) for t in range(K)])
    else:  # Unigram: the green list is per key
        Q = np.concatenate([step_distribution(replace(wm, key=1000 + k), logits[:1], np.zeros((1, 0), np.int64)) for k in range(2000)])
    mean, se = Q.mean(0), Q.std(0, ddof=1) / math.sqrt(len(Q))
    if ((Q == 0) | (Q == 1)).all():  # one-hot per draw: counts ~ Multinomial(K, p)
        ok = stats.chisquare(Q.sum(0), len(Q) * p).pvalue > 1e-4
    else:
        ok = bool((np.abs(mean - p) <= 5 * np.maximum(se, 1e-12) + 1e-9).all())
    assert ok == wm.distortion_free, (name, np.round(mean - p, 4))


# ---------------------------------------------------------------- vectorised generation and detection vs direct loops
def _u(key, ctx, v): return float(token_uniform(context_hash(key, np.array(ctx, np.int64)), v))


def _loop_process(wm, logits, ctx, step):
    "The published next-token rule of each scheme, token by token (float64), returned as a distribution."
    lp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    p = np.exp(lp); V = len(p)
    soft = lambda z: np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    if isinstance(wm, (KGW,)):
        if isinstance(wm, Unigram):
            order = sorted(range(wm.vocab_size), key=lambda v: (_u(wm.key, [], v), v))
            green = [v in set(order[:wm.n_green]) for v in range(V)]
        else:
            green = [_u(wm.key, ctx, v) < wm.gamma for v in range(V)]
        if isinstance(wm, SWEET) and -(p * lp).sum() < wm.entropy_threshold: green = [False] * V
        return soft(np.array([logits[v] + wm.delta * green[v] for v in range(V)]))
    if isinstance(wm, (Aaronson, EXPEdit)):
        r = [_u(wm.key, ctx, v) for v in range(V)] if not isinstance(wm, EXPEdit) else \
            [float(token_uniform(context_hash(wm.key ^ 0x3C3C3C3C, np.array([step % wm.n_key])), v)) for v in range(V)]
        if isinstance(wm, ModifiedGumbel):  # multinomial ∝ r^(1/p), in logs
            return soft(np.array([math.log(r[v]) / p[v] for v in range(V)]))
        out = np.zeros(V); out[max(range(V), key=lambda v: math.log(r[v]) / p[v])] = 1.0
        return out
    if isinstance(wm, DiPmark):
        order = sorted(range(V), key=lambda v: _u(wm.key, ctx, v))
        q, F0 = np.zeros(V), 0.0
        for v in order:
            F = F0 + p[v]
            q[v] = (max(F - wm.alpha, 0) - max(F0 - wm.alpha, 0)) + (max(F - 1 + wm.alpha, 0) - max(F0 - 1 + wm.alpha, 0))
            F0 = F
        return q
    raise AssertionError(wm)


@pytest.mark.parametrize("name", ["kgw", "unigram", "sweet", "aaronson", "modified_gumbel", "dipmark", "exp_edit"])
def test_generation_rule_matches_a_direct_loop(name):
    import torch
    V = 40
    wm = {**_zoo(V), "sweet": SWEET(key=3, entropy_threshold=3.0)}[name]
    g = torch.Generator().manual_seed(4)
    for b in range(4):
        logits = torch.randn(1, V, generator=g, dtype=torch.float64) * (0.5 + b)
        ctx = np.array([[7 + b] * wm.h]) if wm.h else np.zeros((1, 0), np.int64)
        got = step_distribution(wm, logits, ctx, step=b + 2)[0]
        np.testing.assert_allclose(got, _loop_process(wm, logits[0].numpy(), list(ctx[0]), b + 2), atol=1e-9)


def test_synthid_closed_form_equals_the_explicit_tournament():
    """The per-layer update p·(1 + g − Σpg) equals the tournament of 2^m sampled candidates, computed by enumerating
    every candidate tuple (pairs compete on g_ℓ, ties split evenly) — the paper's algorithm, brute force."""
    import itertools
    import torch
    V, m = 4, 2
    wm = SynthID(key=5, h=1, m=m)
    logits = torch.tensor([[0.3, -0.2, 1.0, 0.1]], dtype=torch.float64)
    p = torch.softmax(logits, -1).numpy()[0]
    ctx = np.array([[2]])
    gv = wm.gvalues(context_hash(wm.key, ctx)[:, None], np.arange(V)[None])[0].astype(int)  # [V, m]
    win = np.zeros(V)
    for cands in itertools.product(range(V), repeat=2 ** m):
        w = np.prod(p[list(cands)])
        dist = {}  # distribution over winners of the tournament on this tuple
        def play(c, layer):
            if len(c) == 1: return {c[0]: 1.0}
            out = {}
            for a, pa in play(c[:len(c) // 2], layer - 1).items():
                for b, pb in play(c[len(c) // 2:], layer - 1).items():
                    ga, gb = gv[a, layer], gv[b, layer]
                    res = {a: 1.0} if ga > gb else {b: 1.0} if gb > ga else {a: 0.5, b: 0.5} if a != b else {a: 1.0}
                    for t, pt in res.items(): out[t] = out.get(t, 0) + pa * pb * pt
            return out
        for t, pt in play(list(cands), m - 1).items(): win[t] += w * pt
    np.testing.assert_allclose(step_distribution(wm, logits, ctx)[0], win, atol=1e-12)


@pytest.mark.parametrize("name", ["kgw", "unigram", "sweet", "aaronson", "modified_gumbel", "dipmark", "synthid"])
def test_detect_scores_match_a_direct_loop(name):
    rng = np.random.default_rng(6)
    V = 60
    wm = _zoo(V)[name]
    seqs = [rng.integers(0, V, rng.integers(2, 30)) for _ in range(12)]
    ent = [rng.exponential(1.5, len(s)) for s in seqs]
    r = detect(wm, seqs, entropy=ent if wm.needs_entropy else None)
    for i, s in enumerate(seqs):
        seen, vals = set(), []
        for t in range(wm.h, len(s)):
            ctx = tuple(s[t - wm.h:t])
            if wm.needs_entropy and ent[i][t] < wm.entropy_threshold: continue
            if (ctx, s[t]) in seen: continue
            seen.add((ctx, s[t]))
            if isinstance(wm, Unigram):
                order = sorted(range(V), key=lambda v: (_u(wm.key, [], v), v)); vals.append(float(s[t] in order[:wm.n_green]))
            elif isinstance(wm, DiPmark):
                us = [_u(wm.key, ctx, v) for v in range(V)]
                vals.append(float(sum(x < us[s[t]] for x in us) >= math.ceil(wm.gamma * V)))
            elif isinstance(wm, SynthID):
                hsh = context_hash(wm.key, np.array(ctx, np.int64))
                from tokexp.watermark import mix64, _LAYER_SALT, _GOLD
                with np.errstate(over="ignore"):
                    x = int(mix64(hsh ^ mix64(np.uint64(int(s[t])) + _GOLD) ^ _LAYER_SALT))
                gs = [float((x >> l) & 1) for l in range(wm.m)]  # layer ℓ's g-value: bit ℓ of the keyed hash
                vals.append(sum(gs) / wm.m)
            elif isinstance(wm, Aaronson): vals.append(-math.log1p(-_u(wm.key, ctx, s[t])))
            else: vals.append(float(_u(wm.key, ctx, s[t]) < wm.gamma))
        assert r["n_scored"][i] == len(vals)
        np.testing.assert_allclose(np.nansum(r["token_scores"][i]), sum(vals), rtol=1e-12, atol=1e-12)
        n, g = len(vals), sum(vals)
        if n == 0: assert r["p_value"][i] == 1.0; continue
        if isinstance(wm, Unigram):  # exact hypergeometric tail by direct summation
            G = wm.n_green
            ref = sum(math.comb(G, k) * math.comb(V - G, n - k) for k in range(int(round(g)), min(n, G) + 1)) / math.comb(V, n)
        elif isinstance(wm, SynthID):
            x = int(round(g * wm.m)); ref = sum(math.comb(n * wm.m, k) for k in range(x, n * wm.m + 1)) / 2 ** (n * wm.m)
        elif isinstance(wm, Aaronson):
            ref = math.exp(-g) * sum(g ** k / math.factorial(k) for k in range(n))  # Gamma(n, 1) tail = Poisson cdf
        else:
            q = wm.green_fraction if isinstance(wm, DiPmark) else wm.gamma
            ref = sum(math.comb(n, k) * q ** k * (1 - q) ** (n - k) for k in range(int(round(g)), n + 1))
        assert r["p_value"][i] == pytest.approx(ref, rel=1e-8, abs=1e-300), (name, i)


def test_exp_edit_statistic_matches_the_papers_double_loop():
    wm = EXPEdit(key=2, n_key=6, gamma_edit=0.3)
    ids = np.random.default_rng(1).integers(0, 30, (3, 5))
    phi, _ = wm.statistic(ids)
    for i in range(3):
        best = math.inf
        for s in range(wm.n_key):
            xi = [[float(token_uniform(context_hash(wm.key ^ 0x3C3C3C3C, np.array([(s + j) % wm.n_key])), v)) for v in range(30)] for j in range(5)]
            A = np.zeros((6, 6))
            for a in range(6):
                for b in range(6):
                    if a == 0: A[a, b] = b * wm.gamma_edit
                    elif b == 0: A[a, b] = a * wm.gamma_edit
                    else: A[a, b] = min(A[a - 1, b] + wm.gamma_edit, A[a, b - 1] + wm.gamma_edit, A[a - 1, b - 1] + math.log(1 - xi[b - 1][ids[i, a - 1]]))
            best = min(best, A[5, 5])
        assert phi[i] == pytest.approx(best, rel=1e-5)


def test_every_scheme_detects_its_toy_generations_and_survives_its_attacks():
    for name, wm in _zoo(300).items():
        if name in ("synthid_weighted",): continue
        ids = toy_generate(WatermarkLogitsProcessor(wm), n=12, T=60, V=300, seed=8)
        kw = dict(entropy=np.full(ids.shape, 5.0)) if wm.needs_entropy else {}
        a = 0.05 if isinstance(wm, EXPEdit) else 0.01  # EXP-edit's permutation p-value is at least 1/(R+1) = 0.02 here
        assert (detect(wm, ids, alpha=a, **kw)["detected"]).mean() >= 0.9, name
    # robustness properties the schemes are built for
    ids = toy_generate(WatermarkLogitsProcessor(Unigram(vocab_size=300, key=3)), n=12, T=60, V=300, seed=8)
    assert detect(Unigram(vocab_size=300, key=3), shuffle_spans(ids, 4, seed=1), alpha=0.01)["detected"].mean() >= 0.9
    wm = EXPEdit(key=3, n_key=64, n_resample=49)
    ids = toy_generate(WatermarkLogitsProcessor(wm), n=10, T=40, V=300, seed=8)
    assert detect(wm, edit_ids(ids, 0.2, "delete", seed=2), alpha=0.05)["detected"].mean() >= 0.8  # edit-robust


def test_emoji_attack_breaks_context_hashing_but_not_the_fixed_list(tiny_lm):
    from tokexp.watermark import generate_with_insertions
    model, tok = tiny_lm
    prompts = np.array([[tok.bos_token_id] + tok("The cat", add_special_tokens=False)["input_ids"][:2]] * 16)
    emoji = tok("!", add_special_tokens=False)["input_ids"][0]
    for wm, broken in [(KGW(delta=4.0, key=3), True), (Unigram(vocab_size=len(tok), delta=4.0, key=3), False)]:
        ids = generate_with_insertions(model, prompts, WatermarkLogitsProcessor(wm, len(tok)), 14, emoji, seed=1)  # 3 + 28 < ctx 32
        pooled = detect(wm, [ids.ravel()])["p_value"][0]
        assert (pooled > 1e-3) == broken, (wm.name, pooled)


def test_copy_paste_and_span_shuffle():
    h = [np.arange(1000, 1100)]
    out = copy_paste([np.arange(50)], h, 0.3, seed=2)[0]
    assert len(out) == 100 and set(out) & set(range(50)) == set(range(30))
    s = shuffle_spans([np.arange(23)], 5, seed=0)[0]
    assert sorted(s) == list(range(23)) and list(s) != list(range(23))


# ---------------------------------------------------------------- diversity and Alignment Resampling
def test_bleu_matches_nltk():
    from nltk.translate.bleu_score import SmoothingFunction
    from nltk.translate.bleu_score import sentence_bleu as nltk_bleu
    rng = np.random.default_rng(2)
    sm = SmoothingFunction().method1
    for _ in range(40):
        hyp = list(rng.integers(0, 8, rng.integers(4, 25)))
        refs = [list(rng.integers(0, 8, rng.integers(4, 25))) for _ in range(rng.integers(1, 4))]
        assert sentence_bleu(hyp, refs) == pytest.approx(nltk_bleu(refs, hyp, smoothing_function=sm), rel=1e-9, abs=1e-12)
    texts = [list(rng.integers(0, 6, 15)) for _ in range(5)]
    ref = np.mean([nltk_bleu(texts[:i] + texts[i + 1:], texts[i], smoothing_function=sm) for i in range(5)])
    assert self_bleu(texts) == pytest.approx(ref, rel=1e-9)
    assert distinct_n([[1, 2, 3, 1, 2, 3]], 2)[0] == pytest.approx(3 / 5)


def test_ar_best_of_n_and_the_papers_bound():
    "best_of_n against the exact expected maximum of n Gaussians (numerical integration); the bound stays below it."
    from scipy import integrate
    mu, sd = 0.3, 2.0
    r = np.random.default_rng(0).normal(mu, sd, (100_000, 6))
    emp = best_of_n(r)
    for n in range(1, 7):
        exact = integrate.quad(lambda x: x * n * stats.norm.pdf(x) * stats.norm.cdf(x) ** (n - 1), -12, 12)[0]
        assert emp[n - 1] == pytest.approx(mu + sd * exact, abs=5 * sd / math.sqrt(100_000) * 1.5)
        assert mu + sd * exact - 1.0 >= ar_lower_bound(n, 1.0, mu, sd) - 1e-12  # E[max] − E[r_unwm] ≥ C√(log n) − ε


# ---------------------------------------------------------------- the watermark_benchmark template, end to end
def test_watermark_benchmark_template_runs_small(reports_tmp):
    "All eight schemes through the runner with tiny parameters (smoke-run LMs): leaderboard metrics present and sane."
    import json
    from tokexp.report import run_experiment
    r = run_experiment("watermark_benchmark", dict(max_steps=20, n_prompts=6, new_tokens=12, lengths=[12], null_keys=2,
                                                   exp_null_keys=20, paste_fractions=[0.5], ar_n=2, ar_prompts=3, span=4),
                       force=True, progress=False)
    assert r.ok, r.error
    m = json.loads((r.path / "metrics.json").read_text())
    names = {"kgw", "unigram", "sweet", "aaronson", "modified_gumbel", "dipmark", "synthid", "exp_edit"}
    assert set(m["tpr_at_alpha"]) == names and set(m["robust_tpr"]) == names
    assert all(0 <= v <= 1 for s in m["tpr_at_alpha"].values() for v in s.values())
    assert m["tpr_at_alpha"]["aaronson"]["12"] >= 0.5  # 12 tokens of a near-uniform smoke model carry a strong Gumbel signal
    assert m["measured_fpr_max"] <= 0.25  # 12 null tests per cell at α = 0.01: a loose sanity bound
    assert m["ar_candidate_self_bleu"]["aaronson"] == 1.0  # deterministic Gumbel: identical candidates
    assert len(m["ar_reward"]["modified_gumbel"]) == 2 and m["ar_candidate_self_bleu"]["modified_gumbel"] < 1.0  # diverse
    for f in ("power_vs_quality.png", "robustness.png", "alignment_resampling.png", "power_vs_tokens.csv"):
        assert (r.path / f).exists(), f
