"URIAL token distribution shift: classes, ranks and KL against a direct loop over full logits; decoding; the template."
import json
import numpy as np, pytest, torch
from transformers import GPT2Config, GPT2LMHeadModel
from tokexp.core import ConfigError
from tokexp.graybox import shift as S
from conftest import reads_as_report


def direct_rank(logits_row, target):
    "1 + the number of vocabulary entries with a strictly larger logit, by a Python loop."
    t = float(logits_row[target]); return 1 + sum(1 for v in logits_row.tolist() if v > t)

def direct_class(rank):
    return "unshifted" if rank == 1 else "marginal" if rank in (2, 3) else "shifted"


def test_hand_computed_example():
    # base logits over 6 tokens at 4 positions; the aligned model chose tokens 2, 0, 5, 1
    base = torch.tensor([[0.1, 0.2, 3.0, 0.0, 0.0, 0.0],   # token 2 is top-1            -> rank 1, unshifted
                         [1.0, 2.0, 0.5, 0.0, 0.0, 1.5],   # token 0 is 3rd (2.0, 1.5)   -> rank 3, marginal
                         [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],   # token 5 is last             -> rank 6, shifted
                         [0.0, 2.0, 9.0, 0.0, 0.0, 0.0]])  # token 1 is 2nd             -> rank 2, marginal
    aligned = torch.zeros_like(base); aligned[[0, 1, 2, 3], [2, 0, 5, 1]] = 4.0
    tg = torch.tensor([2, 0, 5, 1])
    st = S.position_stats(base, aligned, tg, impl="torch")
    assert st["base_rank"].tolist() == [1, 3, 6, 2]
    assert [S.SHIFT_CLASSES[c] for c in S.classify_shift(st["base_rank"].numpy())] == ["unshifted", "marginal", "shifted", "marginal"]
    sh = S.shift_shares(S.classify_shift(st["base_rank"].numpy()))
    assert (sh["unshifted"], sh["marginal"], sh["shifted"], sh["n"]) == (0.25, 0.5, 0.25, 4)


def test_random_logits_match_direct_loop():
    g = torch.Generator().manual_seed(0)
    base, aligned = torch.randn(40, 30, generator=g) * 2, torch.randn(40, 30, generator=g) * 2
    tg = aligned.argmax(-1)
    st = S.position_stats(base, aligned, tg, impl="torch")
    ranks = [direct_rank(base[i], int(tg[i])) for i in range(40)]
    assert st["base_rank"].tolist() == ranks
    assert [S.SHIFT_CLASSES[c] for c in S.classify_shift(np.array(ranks))] == [direct_class(r) for r in ranks]
    pa, pb = aligned.double().softmax(-1), base.double().softmax(-1)
    kl = [sum(pa[i, v] * (pa[i, v].log() - pb[i, v].log()) for v in range(30)).item() for i in range(40)]
    np.testing.assert_allclose(st["kl"].numpy(), kl, atol=1e-4)
    assert (st["aligned_rank"] == 1).all()


def tiny(seed, vocab=60, ctx=48):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=ctx, n_embd=32, n_layer=2, n_head=2, initializer_range=0.4)).eval()


def test_score_shift_against_unpadded_full_forward():
    base, aligned = tiny(0), tiny(1)
    ctx = [[0, 4, 9, 11], [0, 5], [0, 7, 8], [0, 3, 3, 3, 3]]
    resp = S.greedy_decode(aligned, ctx, max_new_tokens=7, eos_id=13, batch_size=2)
    assert all(13 not in r for r in resp) and any(len(r) > 0 for r in resp)
    prefix = [21, 22, 23]
    bctx = [[c[0]] + prefix + c[1:] for c in ctx]
    st = S.score_shift(base, aligned, ctx, resp, base_contexts=bctx, batch_size=3, impl="torch")  # padded batches
    for i, r in enumerate(resp):
        assert st.mask[i].sum() == len(r) and (st.ids[i, :len(r)] == r).all()
        with torch.no_grad():
            lb = base(torch.tensor([bctx[i] + r])).logits[0].double()
            la = aligned(torch.tensor([ctx[i] + r])).logits[0].double()
        for t, tok in enumerate(r):
            rb, ra = lb[len(bctx[i]) + t - 1], la[len(ctx[i]) + t - 1]
            assert st.base_rank[i, t] == direct_rank(rb, tok)
            assert st.aligned_rank[i, t] == direct_rank(ra, tok) == 1  # greedy decode: aligned top-1
            pa, pb = ra.softmax(-1), rb.softmax(-1)
            assert st.kl[i, t] == pytest.approx(float((pa * (pa.log() - pb.log())).sum()), abs=1e-4)
            assert st.base_logp[i, t] == pytest.approx(float(pb[tok].log()), abs=1e-4)


def test_greedy_decode_matches_step_loop():
    m = tiny(2)
    ctx = [[0, 4, 9], [0, 1, 2], [0, 6]]
    out = S.greedy_decode(m, ctx, max_new_tokens=6, eos_id=None)
    for c, o in zip(ctx, out):
        seq = list(c)
        with torch.no_grad():
            for _ in range(6): seq.append(int(m(torch.tensor([seq])).logits[0, -1].argmax()))
        assert o == seq[len(c):]
    with pytest.raises(ConfigError, match="context"): S.greedy_decode(m, [[0] * 45], max_new_tokens=6, eos_id=None)
    with pytest.raises(ConfigError, match="exceed"): S.score_shift(m, m, [[0] * 45], [[1] * 6])


def test_categories_on_decoded_pieces():
    from tokexp.lm import train_tokenizer
    tok = train_tokenizer(['Sure! "cat" means a small animal. I hope this helps!'] * 20 + ["the practice of making"] * 20, vocab_size=320)
    text = ' Sure! "cat" means a small animal. I hope this helps!'
    ids = tok(text, add_special_tokens=False)["input_ids"]
    cats = S.categorize_pieces([tok.decode([i]) for i in ids])
    by_word = {}
    for i, c in zip(ids, cats): by_word.setdefault(c, []).append(tok.decode([i]))
    assert "".join(by_word["discourse"]).split() == ["Sure", "hope", "helps"]
    assert set("".join(by_word["content"]).split()) == {"cat", "means", "small", "animal"}


def test_template_runs_small(reports_tmp):
    from tokexp.report import run_experiment
    r = run_experiment("alignment_shift", dict(base_steps=20, n_finetune=64, ft_steps=6, n_prompts=6, max_new_tokens=10, k_shots=2, n_reference=8),
                       force=True, progress=False)
    assert r.ok, r.error
    m = json.loads((r.path/"metrics.json").read_text())
    for cond in ("base", "urial", "control"):
        assert sum(m["shares"][cond][k] for k in S.SHIFT_CLASSES) == pytest.approx(1.0, abs=1e-6)
    assert m["positions"] > 0 and 0 <= m["shares"]["base"]["shifted"] <= 1
    assert list(r.path.glob("*.png"))
    reads_as_report(r.path/"alignment_shift.ipynb")
