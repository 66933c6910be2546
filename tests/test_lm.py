"""Heavier checks of tokexp.lm: training determinism, save/load round trips, TokenStats against a naive float64
computation, padding / window invariance, two-model checks and bad input."""
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tokexp.core import AssetMissingError, InputError, IntegrityError
from tokexp.lm import (LMS, TINY, TokenStats, cached_token_stats, check_same_vocab, cli, fit_lm, load_lm, lm_split,
                       shared_tokenizer, sliding_windows, split_records, token_stats, toy_corpus, train_lm, train_tokenizer)

TEXTS = ["The cat sees the moon at night.",
         "A dog follows a quiet song slowly. The teacher answers the letter again. My friend draws a broken clock.",
         "Hi",
         "the act of telling stories; our neighbour carries the last train before dawn."]


@pytest.fixture(scope="module")
def corpus(): return toy_corpus()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory, corpus):
    return train_lm(TINY, corpus=corpus, cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


@pytest.fixture(scope="module")
def tiny(tiny_path): return load_lm(tiny_path, device="cpu")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, corpus):
    spec = replace(TINY, name="tiny-llama", arch="llama", n_heads=4, n_kv_heads=2, seed=7)
    return load_lm(train_lm(spec, corpus=corpus, cache_dir=tmp_path_factory.mktemp("cache"), progress=False), device="cpu")


# ---------------------------------------------------------------- training
def test_training_is_deterministic(corpus, tmp_path):
    tok = shared_tokenizer(TINY, corpus, tmp_path)
    spec = replace(TINY, steps=12)
    (m1, log1), (m2, log2) = fit_lm(spec, tok, corpus, progress=False), fit_lm(spec, tok, corpus, progress=False)
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert log1["loss"] == log2["loss"]
    m3, _ = fit_lm(replace(spec, seed=99), tok, corpus, progress=False)
    assert not torch.equal(m3.state_dict()["transformer.wte.weight"], s1["transformer.wte.weight"])
    assert not torch.are_deterministic_algorithms_enabled()  # the global torch setting is restored


def test_saved_model_round_trip(tiny_path, corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    tok = AutoTokenizer.from_pretrained(tiny_path)
    log = json.loads((tiny_path / "train_log.json").read_text())
    assert len(log["loss"]) == TINY.steps and log["tokens_per_second"] > 0
    assert set(log["heldout_ppl"]) == set(corpus) and all(v > 1 for v in log["heldout_ppl"].values())
    # retraining from scratch gives exactly the saved weights
    fresh, _ = fit_lm(TINY, tok, corpus, progress=False)
    sd = m.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in fresh.state_dict().items())
    # tokenizer: same vocab, specials, round trip
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert tok.decode(tok("a quiet song")["input_ids"]) == "a quiet song"
    # the cache is keyed by the spec: another seed gives another folder
    assert train_lm(replace(TINY, seed=5, steps=2), corpus=corpus, cache_dir=tiny_path.parent.parent, progress=False) != tiny_path


def test_split_records_properties():
    recs = [f"line {i} of the synthetic corpus" for i in range(1000)]
    tr, ho = split_records(recs, max_chars=None)
    assert len(tr) + len(ho) == 1000 and 160 < len(ho) < 240 and not set(tr) & set(ho)
    rng = np.random.default_rng(0)
    shuffled = list(rng.permutation(recs))
    assert split_records(shuffled, max_chars=None) == (tr, ho)
    # adding records never moves an existing record to the other side
    tr2, ho2 = split_records(recs + [f"extra {i} record text here" for i in range(100)], max_chars=None)
    assert set(tr) <= set(tr2) and set(ho) <= set(ho2)


def test_lm_split_real_domain():
    from tokexp.assets import fetch
    fetch(["fortunes"])
    tr, ho = lm_split("fortunes")
    assert len(tr) > 1000 and 0.18 < len(ho) / (len(tr) + len(ho)) < 0.22
    assert not set(tr) & set(ho)
    assert lm_split("fortunes") == (tr, ho)


# ---------------------------------------------------------------- loading
def test_load_lm_errors(tmp_path):
    with pytest.raises(Exception, match="neither a reference LM"): load_lm("definitely-not-a-model")
    with pytest.raises(AssetMissingError, match="hub"): load_lm("hf:gpt2", local_files_only=True)
    from tokexp.assets import fetch
    fetch(["fortunes", "gcide", "wordnet"])
    with pytest.raises(AssetMissingError, match="tokexp lm train ref-small"): load_lm("ref-small", cache_dir=tmp_path)


def test_cli_list(capsys):
    from tokexp.assets import fetch
    fetch(["fortunes", "gcide", "wordnet"])
    assert cli(["list"]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in ("ref-small", "ref-small-s2", "ref-llama"))


# ---------------------------------------------------------------- TokenStats
def reference(model, tokenizer, text, W, stride, other=None, add_bos=True):
    "Per-token float64 reference stats computed window by window with log_softmax + gather."
    seq = ([tokenizer.bos_token_id] if add_bos else []) + tokenizer(text, add_special_tokens=False)["input_ids"]
    res = {k: [] for k in ("logp", "rank", "entropy", "max_logp", "mass_geq", "mean_logp", "var_logp", "cmean", "cvar")}
    for s, e, f in sliding_windows(len(seq), W, stride):
        x = torch.tensor([seq[s:e]])
        with torch.no_grad():
            lp = torch.log_softmax(model(x).logits[0].double(), -1)
            lq = torch.log_softmax(other(x).logits[0].double(), -1) if other is not None else None
        for t in range(f, e):
            row, tgt = lp[t - 1 - s], seq[t]
            p = row.exp()
            res["logp"].append(row[tgt].item())
            res["rank"].append(int((row > row[tgt]).sum()) + 1)
            res["entropy"].append(-(p * row).sum().item())
            res["max_logp"].append(row.max().item())
            res["mass_geq"].append(p[row >= row[tgt]].sum().item())
            mean = (p * row).sum()
            res["mean_logp"].append(mean.item())
            res["var_logp"].append((p * (row - mean) ** 2).sum().item())
            if lq is not None:
                q = lq[t - 1 - s].exp()
                cm = (q * row).sum()
                res["cmean"].append(cm.item()); res["cvar"].append((q * (row - cm) ** 2).sum().item())
    return {k: np.array(v) for k, v in res.items()}


@pytest.mark.parametrize("W,stride", [(32, 16), (12, 5), (6, 1)])
def test_token_stats_match_naive_reference(tiny, W, stride):
    m, tok = tiny
    ts = token_stats(m, tok, TEXTS, max_length=W, stride=stride, batch_size=3, other=(m, tok))
    for i, text in enumerate(TEXTS):
        ref = reference(m, tok, text, W, stride, other=m)
        n = len(ref["logp"])
        assert ts.mask[i].sum() == n and ts.mask[i, :n].all()
        for k in ("logp", "entropy", "max_logp", "mass_geq", "mean_logp", "var_logp"):
            np.testing.assert_allclose(getattr(ts, k)[i, :n], ref[k], atol=2e-4, rtol=1e-4, err_msg=k)
        np.testing.assert_array_equal(ts.rank[i, :n], ref["rank"])
        np.testing.assert_allclose(ts.cross_mean_logp[i, :n], ref["cmean"], atol=2e-4, rtol=1e-4)
        np.testing.assert_allclose(ts.cross_var_logp[i, :n], ref["cvar"], atol=1e-3, rtol=1e-3)


def test_cross_stats_two_different_models(tiny, corpus, tmp_path):
    m, tok = tiny
    spec2 = replace(TINY, seed=11)
    m2, tok2 = load_lm(train_lm(spec2, corpus=corpus, cache_dir=tmp_path, progress=False), device="cpu")
    check_same_vocab(tok, tok2)  # shared tokenizer
    ts = token_stats(m, tok, TEXTS, other=(m2, tok2), max_length=32, stride=16)
    for i, text in enumerate(TEXTS):
        ref = reference(m, tok, text, 32, 16, other=m2)
        n = len(ref["logp"])
        np.testing.assert_allclose(ts.cross_mean_logp[i, :n], ref["cmean"], atol=2e-4, rtol=1e-4)
        np.testing.assert_allclose(ts.cross_var_logp[i, :n], ref["cvar"], atol=1e-3, rtol=1e-3)
    assert np.allclose(ts.xent[ts.mask], -ts.cross_mean_logp[ts.mask])
    assert ts.other_name and ts.other_name != ts.model_name


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_padding_and_batch_invariance(tiny, tiny_llama, which):
    m, tok = tiny if which == "gpt2" else tiny_llama
    alone = [token_stats(m, tok, [t]) for t in TEXTS]
    for side in ("left", "right"):
        for bs in (1, 2, 4):
            b = token_stats(m, tok, TEXTS, batch_size=bs, padding_side=side, hidden=True)
            for i, a in enumerate(alone):
                n = a.ids.shape[1]
                np.testing.assert_array_equal(b.ids[i, :n], a.ids[0]); assert (b.ids[i, n:] == -1).all()
                np.testing.assert_array_equal(b.mask[i, :n], a.mask[0]); assert not b.mask[i, n:].any()
                for k in ("logp", "entropy", "max_logp", "mass_geq", "mean_logp", "var_logp"):
                    np.testing.assert_allclose(getattr(b, k)[i, :n], getattr(a, k)[0], atol=1e-4, rtol=1e-4, err_msg=f"{k} {side} {bs}")
                np.testing.assert_array_equal(b.rank[i, :n], a.rank[0])
            assert np.isfinite(b.hidden).all()


def test_hidden_alignment(tiny):
    m, tok = tiny
    ts = token_stats(m, tok, TEXTS[:1], hidden=True)
    seq = [tok.bos_token_id] + tok(TEXTS[0], add_special_tokens=False)["input_ids"]
    with torch.no_grad(): h = m(torch.tensor([seq]), output_hidden_states=True).hidden_states[-1][0]
    # the hidden state stored under token j is the one at the position that predicts it (j-1 in BOS+ids, i.e. j in seq)
    np.testing.assert_allclose(ts.hidden[0, :len(seq) - 1], h[:-1].numpy(), atol=1e-4)


def test_sliding_windows_long_text(tiny):
    m, tok = tiny
    long = " ".join([TEXTS[1]] * 6)
    ts = token_stats(m, tok, [long, TEXTS[0]])
    n = len(tok(long)["input_ids"])
    assert n > 3 * m.config.n_positions
    assert ts.mask[0].sum() == n and ts.mask[0, :n].all()
    assert np.isfinite(ts.logp[ts.mask]).all()


def test_bad_input(tiny, tmp_path):
    m, tok = tiny
    with pytest.raises(InputError, match="no token to score"): token_stats(m, tok, ["ok text", ""])
    with pytest.raises(InputError, match="without BOS"): token_stats(m, tok, ["a"], add_bos=False)
    with pytest.raises(InputError, match="list of strings"): token_stats(m, tok, "text")
    with pytest.raises(InputError, match="must be strings"): token_stats(m, tok, ["x", 3])
    with pytest.raises(InputError, match="stride"): token_stats(m, tok, ["some text"], max_length=8, stride=8)
    with pytest.raises(InputError, match="padding_side"): token_stats(m, tok, ["some text"], padding_side="middle")
    other_tok = train_tokenizer(["completely different words in another corpus entirely"] * 50 + TEXTS, vocab_size=TINY.vocab_size)
    with pytest.raises(InputError, match="different vocabularies"): token_stats(m, tok, TEXTS, other=(m, other_tok))
    # a tokenizer larger than the model: out-of-range ids are refused
    big = train_tokenizer(TEXTS * 20 + ["zebra quokka xylophone"] * 20, vocab_size=TINY.vocab_size + 200)
    if len(big) > m.config.vocab_size:
        with pytest.raises(InputError, match="outside the model vocabulary"): token_stats(m, big, ["zebra quokka xylophone " * 3])
    # NaN weights -> a clear error, not NaN output
    import copy
    bad = copy.deepcopy(m)
    with torch.no_grad(): bad.transformer.ln_f.weight.fill_(float("nan"))
    with pytest.raises(InputError, match="NaN|non-finite"): token_stats(bad, tok, TEXTS[:1])
    # allow_empty: all-masked rows with finite zeros
    e = token_stats(m, tok, ["ok text", ""], allow_empty=True)
    assert not e.mask[1].any() and np.isfinite(e.logp).all() and np.isnan(e.mean("logp")[1])


def test_save_load_and_cache(tiny, tiny_path, tmp_path):
    m, tok = tiny
    ts = token_stats(m, tok, TEXTS, other=(m, tok), hidden=True)
    ts.save(tmp_path / "a.npz")
    back = TokenStats.load(tmp_path / "a")
    for k in ts.array_fields(): np.testing.assert_array_equal(getattr(back, k), getattr(ts, k))
    assert (back.text_hashes, back.model_name, back.other_name, back.meta) == (ts.text_hashes, ts.model_name, ts.other_name, ts.meta)
    # corruption is detected
    (tmp_path / "a.npz").write_bytes((tmp_path / "a.npz").read_bytes()[:-10] + b"0123456789")
    with pytest.raises(IntegrityError): TokenStats.load(tmp_path / "a")
    # cache: hit returns identical arrays; other arguments -> another entry
    c1 = cached_token_stats(tiny_path, TEXTS, cache_dir=tmp_path)
    c2 = cached_token_stats(tiny_path, TEXTS, cache_dir=tmp_path, lm=(None, None))
    np.testing.assert_array_equal(c1.logp, c2.logp)
    cached_token_stats(tiny_path, TEXTS, cache_dir=tmp_path, add_bos=False)
    assert len(list((tmp_path / "tokenstats").glob("*.npz"))) == 2
    # row selection
    sub = ts[[3, 0]]
    assert sub.text_hashes == [ts.text_hashes[3], ts.text_hashes[0]] and sub.hidden.shape[0] == 2


def test_vocab_mismatches_raise_vocab_mismatch_error(tiny):
    """Both vocabulary refusals (different token → id maps; same tokenizer, different output widths) raise
    VocabMismatchError, an InputError subclass callers can catch without reading the message."""
    import copy
    from tokexp.lm import VocabMismatchError
    assert issubclass(VocabMismatchError, InputError)
    m, tok = tiny
    other_tok = train_tokenizer(["completely different words in another corpus entirely"] * 50 + TEXTS, vocab_size=TINY.vocab_size)
    with pytest.raises(VocabMismatchError, match="different vocabularies"): check_same_vocab(tok, other_tok)
    with pytest.raises(VocabMismatchError, match="different vocabularies"): token_stats(m, tok, TEXTS, other=(m, other_tok))
    wide = copy.deepcopy(m)
    wide.resize_token_embeddings(m.get_output_embeddings().weight.shape[0] + 8, mean_resizing=False)
    with pytest.raises(VocabMismatchError, match="truncate_vocab=True"): token_stats(m, tok, TEXTS, other=(wide, tok))
    with pytest.raises(InputError) as e: token_stats(m, tok, ["ok text", ""])  # other bad input is not a vocabulary mismatch
    assert not isinstance(e.value, VocabMismatchError)


def test_two_models_with_different_output_widths_need_opt_in(tiny):
    """Two models that share a tokenizer but have output layers of different widths: cross statistics refuse to cut the
    wider one to the narrower one's ids unless truncate_vocab=True, which then equals comparing over the first V ids."""
    import copy
    m, tok = tiny
    wide = copy.deepcopy(m)
    V = m.get_output_embeddings().weight.shape[0]
    wide.resize_token_embeddings(V + 64, mean_resizing=False)  # 64 extra output rows (tied): the first V logits are m's own
    with torch.no_grad(): wide.get_output_embeddings().weight[V:] += 3.0  # make the extra tokens carry real mass
    assert wide.get_output_embeddings().weight.shape[0] == V + 64
    with pytest.raises(InputError, match=rf"(?s){V}.*{V + 64}.*truncate_vocab=True"):
        token_stats(m, tok, TEXTS, other=(wide, tok))
    with pytest.raises(InputError, match="truncate_vocab"):
        token_stats(wide, tok, TEXTS, other=(m, tok))
    cut = token_stats(m, tok, TEXTS, other=(wide, tok), truncate_vocab=True)
    same = token_stats(m, tok, TEXTS, other=(m, tok))  # the first V logits of `wide` are m's: the truncated comparison
    np.testing.assert_allclose(cut.cross_mean_logp[cut.mask], same.cross_mean_logp[same.mask], atol=1e-5)
    np.testing.assert_allclose(cut.cross_var_logp[cut.mask], same.cross_var_logp[same.mask], atol=1e-4)
    assert cut.meta["truncate_vocab"] and cut.meta["output_vocab_sizes"] == [V, V + 64]
