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
