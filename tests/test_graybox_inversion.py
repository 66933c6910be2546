"PILS inversion: the compact representation against a real reference LM in float64, the subspace bound, metrics against a direct implementation, deterministic training, and the template end to end."
import dataclasses, json
import numpy as np
import pytest
import torch

from conftest import reads_as_report, tiny_lm
from tokexp.graybox import inversion as INV


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ref_small64():
    from tokexp.lm import load_lm, train_lm
    train_lm("ref-small", progress=False)  # a fresh clone has none (cached after the first time)
    model, tok = load_lm("ref-small", device="cpu")
    return model.double().eval(), tok


def _logprobs(model, tok, texts):
    "Float64 log-prob vectors at every position of `texts` (BOS first, at most 40 tokens), stacked [N, V]."
    rows = []
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([[tok.bos_token_id] + tok(t, add_special_tokens=False).input_ids[:39]])
            rows.append(torch.log_softmax(model(ids).logits[0], -1).numpy())
    return np.concatenate(rows)


@pytest.fixture(scope="module")
def texts():
    "Distinct corpus records (fortunes and WordNet), enough positions to exceed hidden size + 1 several times."
    from tokexp.assets import read_domain
    return read_domain("fortunes", limit=8, seed=0, min_chars=80) + read_domain("wordnet", limit=8, seed=0, min_chars=80)


@pytest.fixture(scope="module")
def ref_lp(ref_small64, texts): return _logprobs(*ref_small64, texts)


def test_compact_reconstructs_full_logprobs_float64(ref_small64, ref_lp):
    model, lp = ref_small64[0], ref_lp
    assert lp.shape[0] > 400  # many positions, more than hidden size + 1
    W, b = INV.output_embedding(model)
    for seed in (0, 1):
        cm = INV.compact_map(W, b, seed=seed)
        assert cm.dim == model.config.n_embd  # no output bias: D numbers per step
        rec = cm.reconstruct(cm.project(lp))
        assert np.abs(rec - lp).max() < 1e-9
        assert np.abs(np.exp(rec).sum(-1) - 1).max() < 1e-12
    # an unrelated model's map cannot reconstruct these outputs: the check can fail
    bad = INV.compact_map(np.random.default_rng(0).normal(size=W.shape))
    assert np.abs(bad.reconstruct(bad.project(lp)) - lp).max() > 1e-3


def test_singular_values_show_dimension_at_most_hidden_plus_one(ref_small64, ref_lp):
    lp, D = ref_lp, ref_small64[0].config.n_embd
    basis, s = INV.svd_basis(lp, rtol=1e-10)
    assert s[D + 1] / s[0] < 1e-11  # index D+1 is the (D+2)-th singular value: zero up to rounding
    assert s[D - 1] / s[0] > 1e-6  # and the subspace is not degenerate (rank close to D + 1, not tiny)
    assert basis.shape[1] <= D + 1
    assert np.abs(lp @ basis @ basis.T - lp).max() < 1e-9


def test_llama_architecture_compact_map():
    "A Llama (RMSNorm, tied head, GQA) model: the compact map with extra tokens is exact too."
    model = tiny_lm("llama", vocab=97).double()
    W, b = INV.output_embedding(model)
    cm = INV.compact_map(W, b, n_extra=3, seed=2)
    ids = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(): lp = torch.log_softmax(model(ids).logits, -1).reshape(-1, 97).numpy()
    assert cm.dim == 64 + 3 and np.abs(cm.reconstruct(cm.project(lp)) - lp).max() < 1e-9


def _direct_f1(pred, ref):
    "Token F1 as precision/recall of the word multiset, computed with an explicit loop."
    p, r = pred.split(), ref.split()
    if not p and not r: return 1.0
    if not p or not r: return 0.0
    left, common = list(r), 0
    for w in p:
        if w in left: left.remove(w); common += 1
    if common == 0: return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def test_metrics_match_direct_implementation():
    rng = np.random.default_rng(0)
    vocab = ["a", "b", "c", "dog", "cat", "the"]
    preds = [" ".join(rng.choice(vocab, rng.integers(0, 6))) for _ in range(300)]
    refs = [" ".join(rng.choice(vocab, rng.integers(0, 6))) for _ in range(300)]
    refs[:20] = preds[:20]
    np.testing.assert_allclose(INV.token_f1(preds, refs), [_direct_f1(p, r) for p, r in zip(preds, refs)], atol=1e-12)
    em = INV.exact_match(preds, refs)
    assert em.tolist() == [float(p.split() == r.split()) for p, r in zip(preds, refs)] and em[:20].all()
    assert INV.token_f1(["the cat sat"], ["sat the cat"])[0] == 1.0 and INV.exact_match(["the cat sat"], ["sat the cat"])[0] == 0.0


def _synthetic(n=160, V=30, T=3, F=8, seed=0):
    rng = np.random.default_rng(seed)
    tg = [list(map(int, rng.integers(0, V, rng.integers(1, 4)))) for _ in range(n)]
    E = rng.normal(size=(V, F)).astype(np.float32)
    c = np.zeros((n, T, F), np.float32)
    for i, t in enumerate(tg): c[i, :len(t)] = E[t]
    ids = rng.integers(0, V, (n, T, 2)).astype(np.int32)
    return INV.Observations(np.zeros((n, T), np.int32), c, ids, rng.normal(size=(n, T, 2)).astype(np.float32), V), tg


CFG = INV.InverterConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, bottleneck=64, max_epochs=3, patience=2, max_len=4,
                         lr=3e-3, warmup=10, batch_size=32)


@pytest.mark.parametrize("view", ["compact", "topk"])
def test_inverter_training_is_deterministic(view):
    obs, tg = _synthetic()
    a = INV.train_inverter(obs, tg, view, 3, CFG, cache=False)
    b = INV.train_inverter(obs, tg, view, 3, CFG, cache=False)
    assert a.log["train_loss"] == b.log["train_loss"] and a.log["val_loss"] == b.log["val_loss"]
    sa, sb = a.net.state_dict(), b.net.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.predict(obs) == b.predict(obs)
    c = INV.train_inverter(obs, tg, view, 3, dataclasses.replace(CFG, seed=1), cache=False)
    assert c.log["train_loss"] != a.log["train_loss"]  # the seed matters: the equality above is not vacuous


def test_inverter_cache_roundtrip(tmp_path):
    obs, tg = _synthetic()
    a = INV.train_inverter(obs, tg, "compact", 2, CFG, cache_dir=tmp_path)
    assert len(list((tmp_path / "inversion").glob("inverter-compact-T2-*"))) == 1
    b = INV.train_inverter(obs, tg, "compact", 2, CFG, cache_dir=tmp_path)
    assert b.log == a.log and b.predict(obs) == a.predict(obs)


def test_template_runs_small(reports_tmp):
    from tokexp.report import run_experiment
    r = run_experiment("lm_inversion", dict(n_prompts=80, n_steps=4, test_steps=6, positions=[1, 4], max_epochs=2, d_model=32,
                                            n_layers=1, n_svd=8, n_boot=50), force=True, progress=False)
    assert r.ok, r.error
    m = json.loads((r.path / "metrics.json").read_text())
    assert set(m["exact_match"]) == {"compact/T1", "compact/T4", "compact/T4_test6", "topk/T1", "topk/T4"}
    assert all(0 <= v <= 1 for v in m["token_f1"].values()) and m["shared_groups"] == 0
    assert m["numerical_rank"] <= m["hidden_size"] + 1 and m["recon_max_abs_err"] < 1e-9
    assert {p.name for p in r.path.glob("*.png")} == {"inversion_by_positions.png", "singular_values.png"}
    reads_as_report(r.path / "lm_inversion.ipynb")
