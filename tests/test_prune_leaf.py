"LeaF (tokexp.prune.leaf) against direct implementations: per-token autograd, finite differences, hand examples, a direct KL."
import math
import pytest
import torch
from conftest import tiny_lm, reads_as_report
from tokexp.prune.leaf import (input_gradients, response_loss, minmax, gradient_difference, detect_confounders, confounder_spans,
                               counterfactuals, kd_loss, hybrid_loss)


def _batch():
    ids = torch.tensor([[0, 5, 9, 13, 21, 30, 41, 7], [0, 11, 12, 14, 3, 8, 0, 0]])
    att = torch.tensor([[1]*8, [1]*6 + [0]*2])
    resp = torch.zeros(2, 8, dtype=torch.bool); resp[0, 5:] = True; resp[1, 4:6] = True
    return ids, att, resp


def test_sensitivities_equal_per_token_autograd_and_finite_differences():
    "g_i equals the norm of d(loss of that sample)/d e_i from one backward per sample, and a central finite difference."
    torch.set_num_threads(1)
    model = tiny_lm("gpt2").double()
    ids, att, resp = _batch()
    g, loss = input_gradients(model, ids, att, resp)
    for b in range(2):
        n = int(att[b].sum())
        x = model.get_input_embeddings()(ids[b:b+1, :n]).detach()
        for i in range(n):  # one token at a time: only e_i is a leaf
            e = x.clone(); ei = e[0, i].clone().requires_grad_(True)
            e2 = torch.cat([e[:, :i], ei[None, None], e[:, i+1:]], 1)
            lg = model(inputs_embeds=e2, use_cache=False).logits
            l = response_loss(lg, ids[b:b+1, :n], resp[b:b+1, :n])[0]
            gi, = torch.autograd.grad(l, ei)
            assert abs(float(gi.norm()) - float(g[b, i])) < 1e-8 * max(1.0, float(gi.norm()))
        assert abs(float(l.detach()) - float(loss[b])) < 1e-10
    # finite difference along the gradient direction of one token
    n, i, h = 8, 2, 1e-5
    x = model.get_input_embeddings()(ids[:1]).detach().requires_grad_(True)
    l = response_loss(model(inputs_embeds=x, use_cache=False).logits, ids[:1], resp[:1])[0]
    gx, = torch.autograd.grad(l, x); u = gx[0, i]/gx[0, i].norm()
    def f(t):
        y = x.detach().clone(); y[0, i] += t*u
        return float(response_loss(model(inputs_embeds=y, use_cache=False).logits, ids[:1], resp[:1])[0])
    assert abs((f(h) - f(-h))/(2*h) - float(g[0, i])) < 1e-6
    assert (g[1, 6:] == 0).all()  # padding never matters


def test_detection_and_span_pruning_match_a_hand_example():
    "Normalise, difference, τ = 5% quantile capped at 0.5, runs, one counterfactual per run (worked by hand)."
    mask = torch.tensor([[False] + [True]*10 + [False]])
    gT = torch.tensor([[0., 1, 1, 9, 9, 9, 9, 5, 1, 1, 5, 0]])
    gS = torch.tensor([[0., 9, 9, 1, 1, 1, 1, 5, 9, 1, 5, 0]])
    # minmax: gT -> (g-1)/8, gS -> (g-1)/8; diff = (gT-gS)/8 in {-1, 1, 0}; renormalised: -1 -> 0, 0 -> 0.5, 1 -> 1
    d = gradient_difference(gT, gS, mask)
    want = [0, 0, 0, 1, 1, 1, 1, .5, 0, .5, .5, 0]
    assert torch.allclose(d, torch.tensor([want]))
    f = detect_confounders(d, mask)[0].tolist()  # sorted index floor(0.05*10) = 0 -> τ = 0
    assert f == [False, True, True, False, False, False, False, False, True, False, False, False]
    assert confounder_spans(f) == [(1, 3), (8, 9)]
    ids = list(range(100, 112))
    assert counterfactuals(ids, [(1, 3), (8, 9)]) == [[100] + list(range(103, 112)), [t for t in ids if t != 108]]
    f2 = detect_confounders(d, mask, quantile=0.5, cap=1.0)[0].tolist()  # sorted[5] = 0.5 -> τ = 0.5
    assert f2 == [False, True, True, False, False, False, False, True, True, True, True, False]
    assert detect_confounders(d, mask, quantile=0.8, cap=0.5)[0].tolist() == f2  # sorted[8] = 1, capped at 0.5


def test_minmax_constant_and_masked():
    x = torch.tensor([[3., 3, 3, 7]]); m = torch.tensor([[True, True, True, False]])
    assert minmax(x, m).tolist() == [[0, 0, 0, 0]]


def test_kd_loss_equals_a_direct_kl_loop():
    "kd_loss = T² · mean over response targets of Σ_v p_T log(p_T/p_S), written out position by position."
    torch.manual_seed(3)
    s, t = torch.randn(2, 6, 11, dtype=torch.float64), torch.randn(2, 6, 11, dtype=torch.float64)
    resp = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    for T in (1.0, 2.0):
        tot, n = 0.0, 0
        for b in range(2):
            for j in range(1, 6):
                if not resp[b, j]: continue
                p = torch.softmax(t[b, j-1]/T, -1).tolist(); q = torch.softmax(s[b, j-1]/T, -1).tolist()
                tot += sum(pi*math.log(pi/qi) for pi, qi in zip(p, q)); n += 1
        assert abs(float(kd_loss(s, t, resp, T)) - T*T*tot/n) < 1e-5
    a, c = torch.tensor(1.5), torch.tensor(0.5)
    assert float(hybrid_loss(a, c, 0.25)) == pytest.approx(0.25*1.5 + 0.75*0.5)


def test_leaf_template_runs_small(reports_tmp):
    "leaf_distillation end to end with a tiny teacher and a few steps; metrics are coherent."
    import json
    from tokexp.report import run_experiment
    torch.set_num_threads(1)
    r = run_experiment("leaf_distillation", dict(teacher_d_model=64, teacher_layers=2, teacher_steps=20, teacher_ft_steps=4,
                                                 n_train=24, n_heldout=12, distill_steps=3, batch_size=4, n_boot=200),
                       force=True, progress=False)
    assert r.ok, r.error
    m = json.loads((r.path/"metrics.json").read_text())
    for k in ("student_before", "kd", "leaf", "teacher"):
        v = m["heldout_nll"][k]
        assert v["lo"] <= v["mean"] <= v["hi"] and v["mean"] > 0, k
    assert 0 <= m["detection"]["precision"] <= 1 and 0 <= m["detection"]["recall"] <= 1
    assert 0 < m["distractor_token_share"] < 1
    assert m["n"] == {"train": 24, "heldout": 12}
    reads_as_report(r.path/"leaf_distillation.ipynb")
