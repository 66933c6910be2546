"""LLM Output Signatures (tokexp.graybox.signatures, issue 15): token_stats(topk) against a direct float64 forward pass
on a real reference LM (padding, batching, sliding windows), topk leaving every other field unchanged, the cache,
LOS-Net determinism and learning, attribution counts, and the output_signatures template end to end."""
import copy, json

import numpy as np
import pytest
import torch

from conftest import reads_as_report
from tokexp.core import InputError
from tokexp.lm import train_lm, load_lm, token_stats, cached_token_stats, sliding_windows, TokenStats
from tokexp.graybox.signatures import (los_features, train_losnet, synthetic_signatures, attribution_summary, transfer_matrix,
                                       LOSNet, Signatures)

TEXTS = ["The cat sees the moon at night, and the dog sleeps under the old wooden table.",
         "a small word",
         "Wisdom is knowing what to do next; skill is knowing how to do it, and virtue is doing it. " * 7,
         "Oak: a tree of the genus Quercus, bearing acorns."]


@pytest.fixture(scope="module")
def ref():
    "ref-small (trained into the cache the first time, as the other tests that load reference LMs do)."
    p = train_lm("ref-small", progress=False)
    m, tok = load_lm(p, device="cpu")
    return p, m, tok, copy.deepcopy(m).double().eval()


def direct_topk(m64, tok, text, W, stride):
    "The BOS-prefixed ids and {scored position: full float64 log-prob vector}, by an independent loop over the windows."
    seq = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    out = {}
    for s, e, f in sliding_windows(len(seq), W, stride):
        with torch.no_grad(): lp = torch.log_softmax(m64(torch.tensor([seq[s:e]])).logits[0].double(), -1)
        for p in range(f, e):  # token seq[p] is predicted from window position p-1-s
            out[p - 1] = lp[p - 1 - s]
    return seq, out


@pytest.mark.parametrize("side,bs,W,stride", [("right", 4, 128, 64), ("left", 3, 128, 64), ("right", 2, 24, 10)])
def test_topk_equals_full_logits(ref, side, bs, W, stride):
    _, m, tok, m64 = ref
    k = 16
    ts = token_stats(m, tok, TEXTS, topk=k, batch_size=bs, padding_side=side, max_length=W, stride=stride)
    sig = los_features(ts)
    for i, t in enumerate(TEXTS):
        seq, lp = direct_topk(m64, tok, t, W, stride)
        assert ts.mask[i].sum() == len(seq) - 1 == len(lp)
        for j, row in lp.items():
            np.testing.assert_allclose(ts.topk_logp[i, j], row.sort(descending=True).values[:k].numpy(), atol=2e-4)
            np.testing.assert_allclose(row[ts.topk_ids[i, j]].numpy(), ts.topk_logp[i, j], atol=2e-4)  # ids point at those values (ties allowed)
            np.testing.assert_allclose(sig.tds[i, j], row.exp().sort(descending=True).values[:k].numpy(), atol=1e-5)
            assert sig.atp[i, j] == pytest.approx(float(row[seq[j + 1]].exp()), abs=1e-5)
            assert sig.rank[i, j] == int((row > row[seq[j + 1]]).sum()) + 1
    assert (ts.topk_ids[~ts.mask] == -1).all() and (sig.tds[~ts.mask] == 0).all()


def test_topk_leaves_other_fields_unchanged(ref):
    p, m, tok, _ = ref
    m2, _ = load_lm(p, device="cpu")
    kw = dict(other=(m2, tok), hidden=True, batch_size=3, max_length=32, stride=16)
    a, b = token_stats(m, tok, TEXTS, **kw), token_stats(m, tok, TEXTS, topk=5, **kw)
    assert a.topk_logp is None and b.topk_logp.shape == a.ids.shape + (5,)
    for f in a.array_fields(): np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    with pytest.raises(InputError, match="exceeds the vocabulary"): token_stats(m, tok, TEXTS[:1], topk=len(tok) + 1)


def test_topk_cache(ref, tmp_path):
    p, m, tok, _ = ref
    a = cached_token_stats(p, TEXTS, lm=(m, tok), cache_dir=tmp_path, topk=6)
    b = cached_token_stats(p, TEXTS, lm=(None, None), cache_dir=tmp_path, topk=6)  # a hit never touches the model
    np.testing.assert_array_equal(a.topk_logp, b.topk_logp); np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
    c = cached_token_stats(p, TEXTS, lm=(m, tok), cache_dir=tmp_path)  # topk is part of the key
    assert c.topk_logp is None and len(list((tmp_path / "tokenstats").glob("*.npz"))) == 2
    key = next(j for j in (tmp_path / "tokenstats").glob("*.json") if "topk" in j.read_text() and json.loads(j.read_text())["meta"]["topk"] == 6)
    sig = los_features(key.with_suffix(""))  # straight from the cached file
    np.testing.assert_array_equal(sig.tds, los_features(a).tds)
    np.testing.assert_array_equal(sig[[1, 0]].tds[1], sig.tds[0])


def test_losnet_deterministic_and_learns():
    s, y = synthetic_signatures(n=100, T=20, k=8, seed=11)
    perm = np.random.default_rng(0).permutation(len(y))
    tr, va, te = perm[:120], perm[120:160], perm[160:]
    kw = dict(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_epochs=30, patience=5, seed=7)
    a, b = train_losnet(s[tr], y[tr], s[va], y[va], **kw), train_losnet(s[tr], y[tr], s[va], y[va], **kw)
    for (ka, va_), (kb, vb) in zip(a.module.state_dict().items(), b.module.state_dict().items()):
        assert ka == kb and torch.equal(va_, vb), ka
    assert a.history["val_loss"] == b.history["val_loss"]
    from sklearn.metrics import roc_auc_score
    assert roc_auc_score(y[te], a.score(s[te])) > 0.95
    # labels shuffled: nothing to learn, the held-out AUROC stays near chance (the test can fail)
    ys = np.random.default_rng(1).permutation(y)
    c = train_losnet(s[tr], ys[tr], s[va], ys[va], **kw)
    assert abs(roc_auc_score(ys[te], c.score(s[te])) - 0.5) < 0.2
    # ablations run and learn too
    for extra in (dict(rank_encoding=False), dict(pooling="mean")):
        d = train_losnet(s[tr], y[tr], s[va], y[va], **{**kw, **extra})
        assert roc_auc_score(y[te], d.score(s[te])) > 0.9, extra


def test_losnet_early_stopping_keeps_best_epoch():
    s, y = synthetic_signatures(n=30, T=12, k=4, seed=3)
    perm = np.random.default_rng(5).permutation(len(y))
    net = train_losnet(s[perm[:40]], y[perm[:40]], s[perm[40:]], y[perm[40:]], d_model=16, n_layers=1, n_heads=2, d_ff=32,
                       max_epochs=200, patience=3, lr=1e-2, seed=0)
    h = net.history
    assert h["epochs"] < 200 and h["epochs"] - 1 - h["best_epoch"] == 3  # stopped 3 epochs after the best one
    assert h["best_val_loss"] == min(h["val_loss"])
    import torch.nn.functional as F
    t = [torch.from_numpy(np.ascontiguousarray(a)) for a in (s.tds[perm[40:]], s.atp[perm[40:]], s.rank[perm[40:]], s.mask[perm[40:]])]
    with torch.no_grad(): vl = F.cross_entropy(net.module(*t), torch.from_numpy(y[perm[40:]])).item()
    assert vl == pytest.approx(h["best_val_loss"], abs=1e-5)  # the returned weights are the best epoch's


def test_attribution_summary_matches_counts():
    rng = np.random.default_rng(0)
    yt, yp = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    a = attribution_summary(yt, yp, list("abcd"))
    cm = np.array(a["confusion"])
    for i in range(4):
        for j in range(4): assert cm[i, j] == ((yt == i) & (yp == j)).sum()
    assert a["accuracy"] == pytest.approx((yt == yp).mean())
    from scipy.stats import beta
    k, n = int((yt == yp).sum()), 200
    assert a["accuracy_ci"] == pytest.approx([beta.ppf(0.025, k, n - k + 1), beta.ppf(0.975, k + 1, n - k)], abs=1e-6)


def test_transfer_matrix_shape_and_inputs():
    s, y = synthetic_signatures(n=40, T=10, k=6, seed=2)
    perm = np.random.default_rng(0).permutation(len(y))
    noise = Signatures(np.random.default_rng(1).dirichlet(np.ones(6), s.tds.shape[:2]).astype(np.float32), s.atp, s.rank, s.mask)
    kw = dict(d_model=16, n_layers=1, n_heads=2, d_ff=32, max_epochs=20, patience=4, lr=3e-3, seed=0)
    tm, models = transfer_matrix({"real": s, "noise": noise}, y, perm[:48], perm[48:64], perm[64:], **kw)
    assert tm.shape == (2, 2) and set(models) == {"real", "noise"}
    assert tm.loc["real", "real"] > 0.85  # the real signal is learned
    with pytest.raises(InputError, match="same texts"): transfer_matrix({"a": s, "b": s[:10]}, y, perm[:48], perm[48:64], perm[64:], **kw)


def test_template_runs_small(reports_tmp):
    from tokexp.report import run_experiment
    P = dict(domains=["fortunes"], n_per_domain=10, n_member=10, overfit=True, overfit_members=10, overfit_steps=5, topk=8,
             d_model=16, n_layers=1, max_epochs=3, patience=2, n_boot=20, lm_steps=5, batch_size=16,
             generators=["ref-small", "ref-llama"], decodings=["top_p_0.9"], transfer_models=["ref-small", "ref-llama"], other="ref-llama")
    r = run_experiment("output_signatures", P, force=True, progress=False)
    assert r.ok, r.error
    m = json.loads((r.path / "metrics.json").read_text())
    assert 0 <= m["detection_losnet_auroc"] <= 1 and m["attribution_classes"] == 2
    assert set(m["transfer_auroc"]) == {"ref-small", "ref-llama"} and "LOS-Net" in m["membership_auroc"]
    assert {"roc.png", "attribution_transfer.png", "signature_profile.png"} <= {p.name for p in r.path.glob("*.png")}
    reads_as_report(r.path / "output_signatures.ipynb")
