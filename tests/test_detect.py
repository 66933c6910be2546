"""AI-text detectors (tokexp.detect) on a tiny trained LM: directions, Fast-DetectGPT moments vs Monte Carlo,
one pass per model, Binoculars vocabulary check, DNA-GPT, PAWN from cached stats (issue 6)."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from tokexp.core import InputError, IntegrityError
from tokexp.lm import TINY, toy_corpus, train_lm, load_lm, token_stats, train_tokenizer, TokenStats
from tokexp.detect import (DETECTORS, score_all, two_model_stats, dna_gpt_scores, generate_ids, sampling_discrepancy,
                           train_pawn, PAWNHead, split_indices, available_detectors, masked_sum)
from tokexp.evaluate import evaluate_scores


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    corpus = toy_corpus()
    import os
    cache = os.environ.get("TOKEXP_TEST_LM_CACHE") or tmp_path_factory.mktemp("cache")  # set to reuse tiny models across runs
    a = load_lm(train_lm(replace(TINY, steps=60), corpus=corpus, cache_dir=cache, progress=False), device="cpu")
    b = load_lm(train_lm(replace(TINY, steps=60, seed=99), corpus=corpus, cache_dir=cache, progress=False), device="cpu")
    return a, b


@pytest.fixture(scope="module")
def texts(models):
    "24 greedy continuations of the model (label 1) and 24 uniformly random token sequences (label 0)."
    (m, tok), _ = models
    specials = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    ok = np.array([i for i in range(len(tok)) if i not in specials])
    rng = np.random.default_rng(0)
    starts = [[tok.bos_token_id, int(t)] for t in rng.choice(ok, 24, replace=False)]
    gen = generate_ids(m, starts, 24, do_sample=False, suppress=sorted(specials))
    machine = [tok.decode(s[1:] + g) for s, g in zip(starts, gen)]
    human = [tok.decode(rng.choice(ok, 25).tolist()) for _ in range(24)]
    return machine + human, np.r_[np.ones(24), np.zeros(24)].astype(int)


@pytest.fixture(scope="module")
def stats(models, texts):
    (m, tok), other = models
    return token_stats(m, tok, texts[0], other=other, hidden=True)


def test_directions(stats, texts):
    "Every TokenStats detector ranks the model's own greedy text above random tokens, per its declared direction."
    y = texts[1]
    df = score_all(stats)
    assert df.attrs["excluded"] == 0 and not df.isna().any().any()
    assert len(df.columns) - 1 >= 14
    aucs = {}
    for name in df.columns[1:]:
        if name == "gltr-top1000" and stats.meta["vocab_size"] <= 1000:  # every token is in the top 1000 of a tiny vocab
            assert (df[name] == 1).all(); continue
        d = DETECTORS[name]
        aucs[name] = evaluate_scores(df[name], y[df.index], higher_means_positive=d.higher_means_machine, n_boot=50,
                                     fpr_targets=(0.25,))["auroc"]
    assert all(a > 0.75 for a in aucs.values()), aucs


def test_likelihood_ratio_and_pair_checks(models, texts, stats):
    (m, tok), (m2, tok2) = models
    own2 = token_stats(m2, tok2, texts[0])
    df = score_all(stats, own2, detectors=["likelihood-ratio", "loglik"])
    assert df.shape[0] == len(texts[0])
    # stats of other texts are refused
    with pytest.raises(InputError, match="same texts"):
        score_all(stats, token_stats(m2, tok2, texts[0][::-1]), detectors=["likelihood-ratio"])


def test_fast_detectgpt_moments_monte_carlo(models, texts):
    "Σ E[log p] and Σ Var[log p] match a Monte-Carlo estimate from tokens sampled position by position."
    (m, tok), (m2, tok2) = models
    text = texts[0][0]
    st = token_stats(m, tok, [text], other=(m2, tok2))
    ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        lp = torch.log_softmax(m(ids).logits[0, :-1].double(), -1)   # scoring model p
        lq = torch.log_softmax(m2(ids).logits[0, :-1].double(), -1)  # reference model q
    g = torch.Generator().manual_seed(0)
    S = 40000
    for logits_s, mean_f, var_f in ((lp, "mean_logp", "var_logp"), (lq, "cross_mean_logp", "cross_var_logp")):
        x = torch.multinomial(logits_s.exp(), S, replacement=True, generator=g)  # [T, S] tokens sampled per position
        tot = lp.gather(1, x).sum(0).numpy()                                   # Σ_t log p(x̃_t) per sample
        mean_a = float(masked_sum(getattr(st, mean_f), st.mask)[0]); var_a = float(masked_sum(getattr(st, var_f), st.mask)[0])
        se = np.sqrt(var_a / S)
        assert abs(tot.mean() - mean_a) < 5 * se + 1e-3, (mean_f, tot.mean(), mean_a)
        assert abs(tot.var() - var_a) / var_a < 0.05, (var_f, tot.var(), var_a)
    # and the score is the standardized discrepancy of the observed log-likelihood
    d = sampling_discrepancy(st.logp, st.mean_logp, st.var_logp, st.mask)[0]
    x = torch.multinomial(lp.exp(), S, replacement=True, generator=g)
    tot = lp.gather(1, x).sum(0).numpy()
    ll = float(masked_sum(st.logp, st.mask)[0])
    assert abs(d - (ll - tot.mean()) / tot.std()) < 0.05 * max(1, abs(d))


def test_one_pass_per_model(models, texts):
    "token_stats runs each model once per batch; score_all runs no model at all."
    (m, tok), (m2, tok2) = models
    calls = {"a": 0, "b": 0}
    ha = m.register_forward_hook(lambda *a: calls.__setitem__("a", calls["a"] + 1))
    hb = m2.register_forward_hook(lambda *a: calls.__setitem__("b", calls["b"] + 1))
    try:
        st = two_model_stats((m, tok), (m2, tok2), texts[0], batch_size=10_000)  # every window in one batch
        assert calls == {"a": 1, "b": 1}
        df = score_all(st)
        assert calls == {"a": 1, "b": 1} and len(df.columns) - 1 >= 14
    finally:
        ha.remove(); hb.remove()


def test_binoculars_vocab_mismatch(models, texts):
    (m, tok), (m2, _) = models
    other_tok = train_tokenizer(["completely different words from another corpus entirely"] * 50, vocab_size=TINY.vocab_size)
    with pytest.raises(InputError, match="Binoculars.*different vocabularies"):
        two_model_stats((m, tok), (m2, other_tok), texts[0][:2])
    st = token_stats(m, tok, texts[0][:4])
    with pytest.raises(InputError, match="other=\\(model2, tok2\\)"):
        score_all(st, detectors=["binoculars"])
    ok, skipped = available_detectors(st)
    assert "binoculars" in skipped and "fast-detectgpt-2m" in skipped and "loglik" in ok


def test_short_texts_excluded(models):
    (m, tok), other = models
    st = token_stats(m, tok, ["the cat sees the moon today.", "a", "the teacher draws a red apple slowly."], other=other)
    df = score_all(st, min_tokens=3)
    assert df.attrs["excluded"] == 1 and df.attrs["excluded_index"] == [1]
    assert list(df.index) == [0, 2] and np.isfinite(df.drop(columns="n_tokens").to_numpy()).all()


def test_dna_gpt(models, texts):
    (m, tok), _ = models
    sc, keep = dna_gpt_scores(m, tok, texts[0][:8] + texts[0][24:32], k=3, temperature=0.5, seed=0)
    assert keep.all() and np.isfinite(sc).all()
    assert sc[:8].mean() > sc[8:].mean() + 0.05
    sc2, _ = dna_gpt_scores(m, tok, texts[0][:8] + texts[0][24:32], k=3, temperature=0.5, seed=0)
    assert np.array_equal(sc, sc2)  # seeded


def test_pawn_from_disk(stats, texts, tmp_path):
    "PAWN trains from saved TokenStats, stops early, and reloads to identical predictions."
    y = texts[1]
    tr, va, te = split_indices(y, (0.5, 0.25, 0.25), seed=0)
    for name, idx in (("tr", tr), ("va", va), ("te", te)): stats[idx].save(tmp_path / name)
    head = train_pawn(tmp_path / "tr", y[tr], tmp_path / "va", y[va], max_epochs=60, patience=6, seed=1)
    assert head.history["epochs"] <= 60 and head.history["best_epoch"] >= 0
    p = head.predict(tmp_path / "te")
    assert evaluate_scores(p, y[te], n_boot=50, fpr_targets=(0.25,))["auroc"] > 0.8
    head.save(tmp_path / "pawn")
    again = PAWNHead.load(tmp_path / "pawn")
    assert np.allclose(again.predict(stats[te]), p, atol=1e-6)
    (tmp_path / "pawn" / "model.pt").write_bytes(b"garbage")
    with pytest.raises(IntegrityError): PAWNHead.load(tmp_path / "pawn")


def test_bench_detectors(models, texts):
    "One pass per model gives the same scores as per-detector passes, with far fewer passes."
    from tokexp.detect import bench_detectors
    r = bench_detectors(*models, texts[0][:6], batch_size=64)
    assert r["n_detectors"] >= 14
    assert r["one_pass"]["forward_passes"] == {"model": 1, "other": 1}
    assert sum(r["per_detector"]["forward_passes"].values()) >= 6 * r["n_detectors"]
    assert r["max_rel_diff"] < 1e-3


def test_two_model_stats_prefixes_only_vocab_mismatches(monkeypatch):
    """two_model_stats names Binoculars in VocabMismatchError from token_stats, by type, and passes other InputErrors on
    unchanged, even when their text mentions truncate_vocab."""
    import tokexp.lm
    from tokexp.lm import VocabMismatchError
    class Tok:
        def get_vocab(self): return {"a": 0, "b": 1}
    pair = (None, Tok())
    def raising(err):
        def f(*a, **k): raise err
        return f
    monkeypatch.setattr(tokexp.lm, "token_stats", raising(VocabMismatchError("output widths 10 and 12 differ")))
    with pytest.raises(VocabMismatchError, match="^Binoculars / two-model Fast-DetectGPT: output widths 10 and 12 differ$"):
        two_model_stats(pair, pair, ["x"])
    monkeypatch.setattr(tokexp.lm, "token_stats", raising(InputError("truncate_vocab must be a bool, got 'yes'")))
    with pytest.raises(InputError, match="^truncate_vocab must be a bool, got 'yes'$"):
        two_model_stats(pair, pair, ["x"], truncate_vocab="yes")


def test_binoculars_output_width_mismatch_needs_opt_in(models, texts):
    """Same tokenizer, output layers of different widths (here: one model with 32 extra, heavily weighted logits):
    Binoculars / two-model Fast-DetectGPT refuse unless truncate_vocab=True, which compares over the first V ids."""
    import copy
    (m, tok), (m2, tok2) = models
    wide = copy.deepcopy(m2)
    V = m2.get_output_embeddings().weight.shape[0]
    wide.resize_token_embeddings(V + 32, mean_resizing=False)
    with torch.no_grad(): wide.get_output_embeddings().weight[V:] = 5.0 * wide.get_output_embeddings().weight[:32]
    with pytest.raises(InputError, match=rf"(?s)Binoculars.*{V}.*{V + 32}.*truncate_vocab=True"):
        two_model_stats((m, tok), (wide, tok2), texts[0][:4])
    cut = two_model_stats((m, tok), (wide, tok2), texts[0][:4], truncate_vocab=True)
    ref = two_model_stats((m, tok), (m2, tok2), texts[0][:4])  # wide's first V logits are m2's
    a, b = score_all(cut, detectors=["binoculars", "fast-detectgpt-2m"]), score_all(ref, detectors=["binoculars", "fast-detectgpt-2m"])
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-5, atol=1e-6)
