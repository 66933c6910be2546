"""Dynamic KV selection at decode (tokexp.prune.dynamic): TokenSelect and TidalDecode through the sparse decode kernel.

Models are small randomly initialised GPT-2 / Llama (GQA 4q/2kv, RoPE) models with a large init range, so attention is far
from uniform; they need no asset and build in milliseconds.
"""
import copy, math
import pytest
import torch

from tokexp.core import ConfigError, InputError
from tokexp.prune.policies import cache_keyword
from tokexp.prune.dynamic import (SELECTORS, make_selector, TokenSelect, TidalDecode, DynamicSelector, dynamic_select,
                                  tokenselect_votes, tidal_layers)
from conftest import tiny_lm

VOCAB = 97


def tiny(arch, impl="sdpa", layers=4, seed=0): return tiny_lm(arch, impl, layers, seed, VOCAB)


def batch(n=37, b=2, pad=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, n), generator=g)
    am = torch.ones_like(ids)
    if pad and b > 1: am[1, :pad] = 0; ids[1, :pad] = 0  # left padding in the second row
    return ids, am


def generate(model, ids, am, n=10):
    with torch.no_grad():
        return model.generate(ids, attention_mask=am, max_new_tokens=n, do_sample=False, pad_token_id=0)


FULL = {"tokenselect": lambda: TokenSelect(k=10_000, n_init=3, n_local=5, dense_fallback=False),
        "tidaldecode": lambda: TidalDecode(top_k=10_000, selection_layers=(1, 2))}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(FULL))
def test_full_selection_is_token_identical(arch, impl, name):
    model = tiny(arch, impl)
    ids, am = batch()
    ref = generate(model, ids, am)
    with dynamic_select(model, FULL[name]()) as ds:
        out = generate(model, ids, am)
    assert torch.equal(out, ref), (name, arch, impl)
    assert ds.stats["sparse"] > 0 and ds.stats["attended_fraction"] == 1.0, ds.stats  # went through the sparse kernel
    assert model.config._attn_implementation == impl


def test_full_selection_same_logits():
    model = tiny("llama")
    ids, am = batch(pad=0)
    kw = cache_keyword(model.forward, "forward")[0]  # the keyword this transformers takes the cache under
    am2 = torch.cat([am, am[:, :1]], 1)
    with torch.no_grad():
        ref = model(ids, attention_mask=am, use_cache=True)
        nxt = ref.logits[:, -1:].argmax(-1)
        want = model(nxt, attention_mask=am2, **{kw: getattr(ref, kw)}).logits
        with dynamic_select(model, FULL["tidaldecode"]()) as ds:
            out = model(ids, attention_mask=am, use_cache=True)
            got = model(nxt, attention_mask=am2, **{kw: getattr(out, kw)}).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert ds.stats["sparse"] == 1 and ds.stats["dense"] == 3  # layer 0 dense, 1 and 2 select (dense), 3 sparse


def test_tokenselect_votes_and_selection_by_loop():
    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, N, D = 2, 6, 2, 50, 8
    q, k = torch.randn(B, Hq, 1, D, generator=g), torch.randn(B, Hkv, N, D, generator=g)
    sel = TokenSelect(k=7, n_init=4, n_local=6)
    idx = sel.select(0, q, k, scale=1.0)
    for b in range(B):
        votes = [0.0] * N
        for h in range(Hq):
            logits = [float(q[b, h, 0].double() @ k[b, h // 3, j].double()) for j in range(4, N - 6)]
            m = max(logits); e = [math.exp(x - m) for x in logits]; z = sum(e)
            for j, x in enumerate(e): votes[4 + j] += x / z
        top = sorted(sorted(range(4, N - 6), key=lambda j: -votes[j])[:7])
        want = list(range(4)) + top + list(range(N - 6, N))
        for h in range(Hkv): assert idx[b, h].tolist() == want, (b, h)
    torch.testing.assert_close(tokenselect_votes(q, k[:, :, 4:N - 6]).sum(-1), torch.full((B,), float(Hq)))


def test_tokenselect_selection_cache():
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 4, 1, 16, generator=g), torch.randn(1, 2, 80, 16, generator=g)
    sel = TokenSelect(k=5, n_init=2, n_local=3, threshold=0.9)
    a = sel.select(1, q, k, scale=1.0)
    # the next step: one more key, a query with cosine >= 0.9 -> the cached selection plus the moved local window
    k2 = torch.cat([k, torch.randn(1, 2, 1, 16, generator=g)], 2)
    q2 = q + 0.05 * torch.randn(q.shape, generator=g)
    assert torch.nn.functional.cosine_similarity(q.flatten(), q2.flatten(), 0) > 0.9
    b = sel.select(1, q2, k2, scale=1.0)
    assert sel.stats["reused"] == 1 and sel.stats["selections"] == 1
    assert b[0, 0, 2:7].tolist() == a[0, 0, 2:7].tolist() and b[0, 0, -3:].tolist() == [78, 79, 80]
    # a dissimilar query selects again; other layers have their own cache
    c = sel.select(1, -q, k2, scale=1.0)
    assert sel.stats["selections"] == 2
    sel.select(0, q2, k2, scale=1.0)
    assert sel.stats["selections"] == 3
    no_cache = TokenSelect(k=5, n_init=2, n_local=3, selection_cache=False)
    no_cache.select(1, q, k, scale=1.0); no_cache.select(1, q2, k2, scale=1.0)
    assert no_cache.stats["reused"] == 0 and no_cache.stats["selections"] == 2


def test_tidaldecode_per_head_topk_and_reuse():
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 4, 1, 8, generator=g), torch.randn(2, 2, 33, 8, generator=g)
    td = TidalDecode(top_k=6, selection_layers=(1, 3)); td.reset(5)
    assert td.select(0, q, k, scale=1.0) is None and td.select(1, q, k, scale=1.0) is None
    idx = td.select(2, torch.randn(q.shape, generator=g), k, scale=1.0)
    for b in range(2):
        for h in range(4):
            s = [float(q[b, h, 0] @ k[b, h // 2, j]) for j in range(33)]
            assert idx[b, h].tolist() == sorted(sorted(range(33), key=lambda j: -s[j])[:6])
    q3 = torch.randn(q.shape, generator=g)
    assert td.select(3, q3, k, scale=1.0) is None  # re-selection layer
    assert not torch.equal(td.select(4, q, k, scale=1.0), idx)
    assert tidal_layers(32) == (2, 13) and tidal_layers(4) == (0, 2)


def test_small_budget_attends_to_the_budget():
    model = tiny("llama", layers=4)
    ids, am = batch(n=60, pad=0)
    with dynamic_select(model, TokenSelect(k=8, n_init=2, n_local=4, selection_cache=False)) as ds:
        generate(model, ids, am, n=6)
    # 5 decode steps after the prefill token, cache lengths 61..65, 4 layers each, 14 positions attended per step
    want = sum(14 / n for n in range(61, 66)) / 5
    assert ds.stats["sparse"] == 20 and ds.stats["selections"] == 20
    assert ds.stats["attended"] == 14 * 20 and ds.stats["available"] == 4 * sum(range(61, 66))
    with dynamic_select(model, TidalDecode(top_k=5, selection_layers=(1,))) as ds:
        generate(model, ids, am, n=6)
    assert ds.stats["dense"] == 2 * 5 and ds.stats["sparse"] == 2 * 5 and ds.stats["attended"] == 5 * 10


def test_loud_errors():
    model = tiny("llama", layers=3)
    with pytest.raises(ConfigError, match="DynamicSelector"): dynamic_select(model, "tokenselect")
    with pytest.raises(ConfigError, match="has 3 layers"):
        with dynamic_select(model, TidalDecode(selection_layers=(1, 5))): pass
    assert model.config._attn_implementation == "sdpa"
    # a layer that bypasses the registered attention function (its own config says sdpa) is caught, not decoded densely
    rogue = model.model.layers[1].self_attn
    rogue.config = copy.copy(model.config); rogue.config._attn_implementation = "sdpa"
    ids, am = batch(pad=0)
    with pytest.raises(ConfigError, match=r"attention layers \[1\] did not call"):
        with dynamic_select(model, TokenSelect(k=4, n_init=1, n_local=1)):
            generate(model, ids, am, n=2)
    assert model.config._attn_implementation == "sdpa"  # restored after the error
    with pytest.raises(ConfigError, match="unknown dynamic KV selector"): make_selector("tokensel")
    for bad in (dict(k=0), dict(threshold=1.5), dict(kernel_size=2), dict(n_local=-1)):
        with pytest.raises(ConfigError): TokenSelect(**bad)
    with pytest.raises(ConfigError): TidalDecode(top_k=0)
    assert set(SELECTORS.names()) >= {"tokenselect", "tidaldecode"}


def tokenselect_loop(q, k, valid, k_sel, n_init, n_local):
    "TokenSelect's published rule, one row at a time: the first n_init and last n_local real tokens, plus the top-k_sel"
    " candidates by Σ_h softmax over the candidates of q_h·k_j (raw dot products, as the reference)."
    B, Hq, _, D = q.shape; Hkv, N = k.shape[1], k.shape[2]; G = Hq // Hkv
    out = []
    for b in range(B):
        real = [j for j in range(N) if valid is None or bool(valid[b, j])]
        init, local = real[:n_init], [j for j in real[max(0, len(real) - n_local):] if j not in real[:n_init]]
        cands = [j for j in real if j not in init and j not in local]
        votes = {j: 0.0 for j in cands}
        for h in range(Hq):
            logits = [float(q[b, h, 0].double() @ k[b, h // G, j].double()) for j in cands]
            if not logits: continue
            m = max(logits); e = [math.exp(x - m) for x in logits]; z = sum(e)
            for j, x in zip(cands, e): votes[j] += x / z
        top = sorted(cands, key=lambda j: -votes[j])[:k_sel]
        out.append(set(init) | set(top) | set(local))
    return out


def test_tokenselect_left_padding_by_loop():
    "With left padding the sinks are each row's first real tokens; every row attends to exactly the loop's set, once."
    g = torch.Generator().manual_seed(6)
    B, Hq, Hkv, N, D = 3, 4, 2, 40, 8
    q, k = torch.randn(B, Hq, 1, D, generator=g), torch.randn(B, Hkv, N, D, generator=g)
    valid = torch.ones(B, N, dtype=torch.bool); valid[1, :9] = False; valid[2, :31] = False  # row 2: 9 real tokens only
    sel = TokenSelect(k=5, n_init=3, n_local=4, selection_cache=False)
    idx = sel.select(0, q, k, scale=1.0, valid=valid)
    want = tokenselect_loop(q, k, valid, 5, 3, 4)
    for b in range(B):
        for h in range(Hkv):
            got = [int(j) for j in idx[b, h] if j >= 0]
            assert len(got) == len(set(got)), (b, h, got)  # no position twice (softmax would count it twice)
            assert set(got) == want[b], (b, h, sorted(got), sorted(want[b]))
    assert len(want[2]) == 9  # the short row attends to all of its real tokens: 3 + (2 of 5 candidates) + 4
    # without padding the loop and the selector agree as well
    idx = sel.select(0, q, k, scale=1.0)
    assert [set(int(j) for j in idx[b, 0]) for b in range(B)] == tokenselect_loop(q, k, None, 5, 3, 4)


def test_tokenselect_padded_row_decodes_as_alone():
    "A left-padded row of a batch decodes the same tokens as that row alone: padding is never a sink, candidate or budget."
    model = tiny("llama", layers=2)
    g = torch.Generator().manual_seed(7)
    long, short = torch.randint(1, VOCAB, (1, 60), generator=g), torch.randint(1, VOCAB, (1, 44), generator=g)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 16, dtype=torch.long), short], 1)])
    am = torch.ones_like(ids); am[1, :16] = 0
    mk = lambda: TokenSelect(k=6, n_init=2, n_local=4, selection_cache=False)
    with dynamic_select(model, mk()) as ds:
        both = generate(model, ids, am, n=8)
    assert ds.stats["sparse"] > 0
    with dynamic_select(model, mk()):
        alone = generate(model, short, torch.ones_like(short), n=8)
    assert torch.equal(both[1, 16:], alone[0]), (both[1, 16:].tolist(), alone[0].tolist())
