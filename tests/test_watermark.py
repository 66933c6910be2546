"""Heavier checks of tokexp.watermark: calibration under no watermark (z ~ N(0,1), false-positive rates with exact
binomial tolerances, uniform Aaronson p-values), power on generations of a real (tiny) HF model through
`model.generate`, the vectorized detector against a naive per-token loop, and robustness to edits."""
import math

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
        assert (r["z"] > 4).mean() >= 0.95, (wm.name, r["z"])
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
