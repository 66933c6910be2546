"""Adaptive KV budgets (tokexp.prune.budgets) against direct implementations of the published rules, and inside `evict`."""
import math
import pytest
import torch

from tokexp.core import ConfigError, InputError
from tokexp.prune.budgets import (BUDGETS, layer_importance, mass_count, pyramid_counts, prefix_counts, adakv_head_counts,
                                  PyramidKVBudget, PrefixKVBudget, ZipVLBudget)
from tokexp.prune.policies import evict, make_policy, POLICIES, kv_bytes

SEED = int.from_bytes(__import__("os").urandom(4), "little")
VOCAB = 97


def tiny(arch, layers=4, seed=0):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_positions=256, n_embd=64, n_layer=layers, n_head=4, initializer_range=0.2,
                         bos_token_id=0, eos_token_id=None, pad_token_id=0)
    else:
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
                          bos_token_id=0, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def ids(n, seed=1, batch=1):
    return torch.randint(1, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_pyramid_counts_follow_the_reference_formula():
    # PyramidKV's update_kv, written out: min_num, max_num (clamped to the prompt), steps over L - 1 layers, + window
    for L, C, w, beta, N in [(32, 128, 8, 20, 4000), (4, 20, 8, 20, 40), (6, 300, 8, 5, 400), (3, 9, 8, 20, 50), (5, 100, 8, 20, 150)]:
        got = pyramid_counts(L, C, w, beta, N)
        if C <= w: assert got == [C] * L; continue
        min_num = (C - w) // beta
        max_num = (C - w) * 2 - min_num
        if max_num >= N - w:
            max_num = N - w
            min_num = (C - w) * 2 - max_num
        steps = (max_num - min_num) // (L - 1)
        assert got == [max_num - l * steps + w for l in range(L)], (L, C)
        assert C <= sum(got) / L <= C + (L - 1) / 2 and got[0] > got[-1] and max(got) <= N


def _brute_prefix(imps, total):
    """Every threshold where some layer's count can change, counts by a direct scan, the largest p <= 1 that fits.

    A layer's count at p is the shortest prefix whose cumulative sum reaches p - 1e-12, so it steps up just after
    p = c + 1e-12 for each cumulative sum c: the candidates are every c and every c + 1e-12 (two layers' sums closer than
    the tolerance would otherwise hide an interval), capped at p = 1."""
    best, bestp = None, -1
    sorted_ = [sorted(a.tolist(), reverse=True) for a in imps]
    cands = {0.0, 1.0}
    for s in sorted_:
        acc = 0.0
        for x in s: acc += x; cands.update({acc, acc + 1e-12})
    for p in sorted(c for c in cands if c <= 1.0):
        cnt = []
        for s in sorted_:
            acc, n = 0.0, 0
            while n < len(s) and (n == 0 or acc < p - 1e-12): acc += s[n]; n += 1
            cnt.append(max(1, n))
        if sum(cnt) <= total and p > bestp: best, bestp = cnt, p
    return best


@pytest.mark.parametrize("trial", range(4))
def test_prefixkv_binary_search_equals_brute_force(trial):
    g = torch.Generator().manual_seed(SEED + trial)
    L = 2 + trial
    imps = [torch.softmax(torch.randn(int(torch.randint(5, 40, (1,), generator=g)), generator=g, dtype=torch.float64) * (0.3 + 2 * l), 0)
            for l in range(L)]
    n_all = sum(a.numel() for a in imps)
    for total in sorted({L, L + 3, n_all // 3, n_all // 2, n_all - 1, n_all}):
        got, p = prefix_counts(imps, total)
        assert got == _brute_prefix(imps, total), (SEED, trial, total)
        assert sum(got) <= total
    with pytest.raises(InputError, match="cannot keep one per layer"): prefix_counts(imps, L - 1)


def test_zipvl_and_mass_count_by_loop():
    g = torch.Generator().manual_seed(SEED)
    s = torch.rand(2, 3, 60, generator=g) ** 4
    a = layer_importance(s)
    ref = s.double().sum(1).mean(0); ref = ref / ref.sum()
    torch.testing.assert_close(a, ref)
    for tau in (0.1, 0.5, 0.9, 0.975):
        vals, acc, n = sorted(ref.tolist(), reverse=True), 0.0, 0
        while acc < tau - 1e-12: acc += vals[n]; n += 1
        assert mass_count(a, tau) == max(1, n)
        assert ZipVLBudget(tau).layer_counts([s, s], [5, 5], 60) == [max(1, n)] * 2
    assert mass_count(a, 1.0) == 60


def test_adakv_head_counts_by_greedy_loop():
    g = torch.Generator().manual_seed(SEED)
    B, H, N, k = 2, 4, 30, 6
    s = torch.rand(B, H, N, generator=g) ** torch.tensor([0.5, 1, 3, 8])[None, :, None]
    for alpha in (0.0, 0.2, 0.5, 1.0):
        got = adakv_head_counts(s, k, alpha)
        floor = int(alpha * k)
        for b in range(B):
            taken = {(h, j) for h in range(H) for j in sorted(range(N), key=lambda j: -float(s[b, h, j]))[:floor]}
            rest = sorted(((float(s[b, h, j]), h, j) for h in range(H) for j in range(N) if (h, j) not in taken), reverse=True)
            taken |= {(h, j) for _, h, j in rest[:H * k - len(taken)]}
            assert got[b].tolist() == [sum(1 for hh, _ in taken if hh == h) for h in range(H)], (alpha, b)
            assert min(got[b]) >= floor and int(got[b].sum()) == H * k
    with pytest.raises(InputError): adakv_head_counts(s, 0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("name,kw", [("pyramidkv", dict(budget=1.0)), ("prefixkv", dict(budget=1.0)),
                                     ("zipvl", dict(allocator=ZipVLBudget(1.0)))])
def test_full_budget_is_token_identical(arch, name, kw):
    m = tiny(arch)
    x = ids(70, batch=2)
    with torch.no_grad():
        base = m.generate(x, max_new_tokens=8, do_sample=False, pad_token_id=0)
        with evict(m, make_policy(name, **kw), every=3) as ev:
            out = m.generate(x, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(base, out), name
    assert all(k == e["n_seen"] for e in ev.events for k in e["kept"])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_allocated_counts_are_what_the_cache_holds(arch):
    m = tiny(arch)
    x = ids(90)
    L = 4
    for name, kw in [("pyramidkv", dict(budget=0.3)), ("prefixkv", dict(budget=0.3)), ("zipvl", dict(allocator=ZipVLBudget(0.6)))]:
        with torch.no_grad(), evict(m, make_policy(name, **kw)) as ev:
            out = m(x, use_cache=True)
            cache = getattr(out, ev._kw)
            held = [l.keys.shape[2] for l in cache.layers]
            nbytes = kv_bytes(cache)
        kept = ev.events[0]["kept"]
        assert held == kept, (name, held, kept)
        assert nbytes == sum(2 * l.keys.numel() * l.keys.element_size() for l in cache.layers)
        if name == "pyramidkv": assert kept == pyramid_counts(L, 27, 8, 20, 90)
        if name == "prefixkv": assert sum(kept) <= 4 * 27 and len(set(kept)) > 1  # adaptive, within the uniform total
        if name == "zipvl": assert max(kept) < 90


def test_allocator_validation():
    with pytest.raises(ConfigError, match="allocator must be"): make_policy("h2o", allocator="prefixkv")
    with pytest.raises(ConfigError, match="tau must be"): ZipVLBudget(1.5)
    assert set(BUDGETS.names()) == {"pyramidkv", "prefixkv", "zipvl"}
    assert {"pyramidkv", "prefixkv", "zipvl"} <= set(POLICIES.names())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_ada_pyramid_splits_each_layers_count_over_heads(arch):
    "Ada-Pyramid: PyramidKV's per-layer counts, each split unevenly over the layer's KV heads (AdaKV), entries exact."
    m = tiny(arch)
    x = ids(90)
    with torch.no_grad(), evict(m, make_policy("pyramidkv", budget=0.3, adaptive_heads=True)) as ev:
        out = m(x, use_cache=True)
        cache = getattr(out, ev._kw)
        slots = [l.keys.shape[2] for l in cache.layers]
    e = ev.events[0]
    want = pyramid_counts(4, 27, 8, 20, 90)
    H = cache.layers[0].keys.shape[1]
    assert e["entries"] == [H * c for c in want]  # each layer keeps exactly H x its pyramid count
    assert slots == e["kept"] and all(s >= c for s, c in zip(slots, want)) and any(s > c for s, c in zip(slots, want))
    assert e["real_bytes_after"] < e["bytes_after"] == kv_bytes(cache)
