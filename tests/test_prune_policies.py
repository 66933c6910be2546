"""KV pruning policies and real KV eviction in generate (tokexp.prune.policies).

Models here are small randomly initialised GPT-2 / Llama (GQA 4q/2kv, RoPE) models with a large init range, so that
attention is far from uniform and positions matter; they need no asset and build in milliseconds.
"""
import math, warnings
import pytest
import torch

from tokexp.core import ConfigError, InputError
from tokexp.kernels.attention import attention_importance
from tokexp.prune.policies import (cache_keyword, PrunePolicy, POLICIES, make_policy, H2O, SnapKV, TOVA, A2SF, StreamingLLM, LazyLLM,
                                   RandomPolicy, KeyNorm, select_keep, gather_positions, attend_to, evict, kv_bytes,
                                   attention_layers, module_queries)
from conftest import reads_as_report, tiny_lm

VOCAB = 97


def tiny(arch, impl="sdpa", layers=2, seed=0): return tiny_lm(arch, impl, layers, seed, VOCAB)


def ids(n, seed=1, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, n), generator=g)


ARCHS = ["gpt2", "llama"]


# ---------------------------------------------------------------- policies on constructed attention patterns
@pytest.mark.parametrize("name", ["h2o", "tova", "a2sf", "snapkv", "lazyllm"])
def test_attended_key_is_kept(name):
    q, k = attend_to(5, nq=6, nk=30, hq=4, hkv=2)
    # SnapKV without pooling here: pooling spreads a key's score over its neighbours (tested on its own below)
    pol = make_policy(name, budget=4, recent=1, **({"window": 3, "kernel": 1} if name == "snapkv" else {}))
    idx = pol.prune(q, k, k)[2]
    assert idx.shape == (1, 2, 4)
    for h in range(2):
        assert 5 in idx[0, h].tolist() and 29 in idx[0, h].tolist(), (name, idx)


def test_h2o_is_accumulated_attention():
    q, k = attend_to(3, nq=7, nk=11, hq=4, hkv=2, strength=2.0)
    s = H2O().scores(q, k)
    ref = torch.zeros(1, 2, 11, dtype=torch.float64)
    G = 2
    logits = (q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2)) / math.sqrt(16)
    mask = torch.arange(11)[None, :] <= (11 - 7) + torch.arange(7)[:, None]
    p = logits.masked_fill(~mask, float("-inf")).softmax(-1).sum(2)  # [1, 4, 11]
    ref = p.view(1, 2, 2, 11).sum(2)
    torch.testing.assert_close(s.double(), ref, rtol=1e-5, atol=1e-6)
    # carried scores add up
    torch.testing.assert_close(H2O().scores(q, k, past=torch.ones(1, 2, 11)), s + 1)


def test_a2sf_forgets_old_queries():
    # the early queries attend to key 1, the latest ones to key 9: H2O prefers whichever has more mass, A2SF the recent
    g = torch.Generator().manual_seed(0)
    d = 16
    k = torch.randn(1, 1, 12, d, generator=g) * 0.05
    u1, u9 = torch.zeros(d), torch.zeros(d); u1[0] = 1; u9[1] = 1
    k[0, 0, 1] += 6 * u1; k[0, 0, 9] += 6 * u9
    q = torch.zeros(1, 1, 12, d)
    q[0, 0, :8] = u1 * 4; q[0, 0, 9:] = u9 * 4; q[0, 0, 8] = u1 * 4
    h = H2O().scores(q, k); a = A2SF(alpha=0.5).scores(q, k)
    assert h[0, 0, 1] > h[0, 0, 9]
    assert a[0, 0, 9] > a[0, 0, 1]
    # carried scores decay by alpha per new query
    torch.testing.assert_close(A2SF(alpha=0.5).scores(q[:, :, -2:], k, past=torch.ones(1, 1, 12)),
                               A2SF(alpha=0.5).scores(q[:, :, -2:], k) + 0.25)


def test_streaming_llm_exact_sinks_and_window():
    k = torch.randn(2, 3, 50, 8)
    for budget, sinks in [(10, 4), (0.2, 4), (6, 0), (5, 5)]:
        pol = StreamingLLM(budget, sinks=sinks)
        n = pol.keep_count(50)
        idx = pol.prune(None, k, k)[2]
        want = list(range(sinks)) + list(range(50 - (n - sinks), 50))
        assert (idx == torch.tensor(want)).all(), (budget, sinks, idx[0, 0])


def test_snapkv_pooling_keeps_neighbours():
    q, k = attend_to(10, nq=4, nk=30)
    idx = SnapKV(5, window=2, kernel=3, recent=2).prune(q, k, k)[2][0, 0].tolist()
    assert {9, 10, 11, 28, 29} == set(idx)
    idx = SnapKV(3, window=2, kernel=1, recent=2).prune(q, k, k)[2][0, 0].tolist()
    assert idx == [10, 28, 29]
    s_avg = SnapKV(window=2, kernel=5, pooling="avg").scores(q, k)
    assert s_avg.shape == (1, 1, 30) and torch.isfinite(s_avg).all()


def test_tova_uses_last_query_only():
    q, k = attend_to(4, nq=5, nk=10)
    q2 = q.clone(); q2[:, :, :-1] = torch.randn_like(q2[:, :, :-1])
    torch.testing.assert_close(TOVA().scores(q, k), TOVA().scores(q2, k))


def test_baselines():
    k = torch.randn(1, 2, 40, 8)
    k[0, 0, 13] *= 1e-4
    assert 13 in KeyNorm(4).prune(None, k, k)[2][0, 0].tolist()
    a = RandomPolicy(10, seed=3).prune(None, k, k)[2]
    b = RandomPolicy(10, seed=3).prune(None, k, k)[2]
    c = RandomPolicy(10, seed=4).prune(None, k, k)[2]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_per_head_vs_shared_selection():
    q, k = attend_to(2, nq=3, nk=20, hq=2, hkv=2)
    k[0, 1, 2] = 0; k[0, 1, 15] += k[0, 0, 2] * 1.0  # head 1 attends to key 15 instead
    per = H2O(2, recent=1).prune(q, k, k)[2]
    assert per[0, 0].tolist() == [2, 19] and per[0, 1].tolist() == [15, 19]
    shared = H2O(2, recent=1, per_head=False).prune(q, k, k)[2]
    assert torch.equal(shared[0, 0], shared[0, 1])


def test_sinks_and_recent_forced_and_sorted():
    s = torch.rand(2, 3, 25)
    idx = select_keep(s, 8, sinks=2, recent=3)
    assert (idx[..., :2] == torch.tensor([0, 1])).all() and (idx[..., -3:] == torch.tensor([22, 23, 24])).all()
    assert (idx.diff(dim=-1) > 0).all()
    # float recent = fraction of the kept count
    idx = H2O(10, recent=0.5).select(torch.zeros(1, 1, 40), 10)
    assert idx[0, 0].tolist()[-5:] == [35, 36, 37, 38, 39]


def test_gather_shapes():
    t = torch.randn(2, 3, 10, 4)
    idx = torch.tensor([1, 4, 7]).expand(2, 3, 3)
    assert torch.equal(gather_positions(t, idx), t[:, :, [1, 4, 7]])
    assert torch.equal(gather_positions(t[..., 0], idx), t[:, :, [1, 4, 7], 0])


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [0.0, -0.1, 1.01, 2.0, 0, -5, True, "0.5", None])
def test_budget_validation(bad):
    with pytest.raises(ConfigError):
        H2O(bad)


def test_other_validation():
    with pytest.raises(ConfigError, match="sinks"): H2O(0.5, sinks=-1)
    with pytest.raises(ConfigError, match="recent"): H2O(0.5, recent=1.5)
    with pytest.raises(ConfigError, match="progressive"): LazyLLM(0.5, progressive=1.0)
    with pytest.raises(ConfigError, match="layer_budgets\\[0\\]"): H2O(layer_budgets=[0.0, 0.5])
    with pytest.raises(ConfigError, match="window"): SnapKV(window=0)
    with pytest.raises(ConfigError, match="pooling"): SnapKV(pooling="median")
    with pytest.raises(ConfigError, match="did you mean|Did you mean"): make_policy("tovaa")
    with pytest.raises(InputError, match="n_keep"): select_keep(torch.zeros(1, 1, 5), 6)


def test_budget_larger_than_sequence_is_noop_with_note():
    q, k = attend_to(2, nq=4, nk=8)
    with pytest.warns(UserWarning, match="nothing evicted"):
        kk, vv, idx, _ = H2O(100).prune(q, k, k)
    assert idx is None and kk is k
    m = tiny("llama")
    x = ids(12)
    with torch.no_grad():
        base = m.generate(x, max_new_tokens=4, do_sample=False)
        with pytest.warns(UserWarning, match="nothing evicted"), evict(m, H2O(100)) as ev:
            got = m.generate(x, max_new_tokens=4, do_sample=False)
    assert torch.equal(base, got) and ev.notes


def test_head_count_mismatch():
    with pytest.raises(InputError, match="multiple"):
        H2O().scores(torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8))


def test_unsupported_model_names_supported_ones():
    from transformers import AutoModelForCausalLM, OPTConfig
    m = AutoModelForCausalLM.from_config(OPTConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                                   num_attention_heads=2, max_position_embeddings=64))
    with pytest.raises(ConfigError, match="GPT-2.*Llama-family"):
        evict(m, H2O(0.5))
    with pytest.raises(ConfigError, match="sdpa"):
        evict(_with_impl(tiny("llama"), "flash_attention_2"), H2O(0.5))


def _with_impl(m, impl):
    m.config._attn_implementation_internal = impl
    m.config.__dict__["_attn_implementation"] = impl
    return m


# ---------------------------------------------------------------- queries from hooks match the model's attention
@pytest.mark.parametrize("arch", ARCHS)
def test_recomputed_queries_match_eager_attention(arch):
    m = tiny(arch, impl="eager")
    x = ids(19)
    caught = {}
    layers = attention_layers(m)
    hs = []
    for li, mod, kind in layers:
        def hook(mod, args, kwargs, li=li, kind=kind):
            h = kwargs.get("hidden_states", args[0] if args else None)
            caught[li] = module_queries(mod, kind, h, kwargs.get("position_embeddings"))
        hs.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            out = m(x, use_cache=True, output_attentions=True)
    finally:
        for h in hs: h.remove()
    for li, mod, kind in layers:
        k = out.past_key_values.layers[li].keys
        got = attention_importance(caught[li], k, None, scale=mod.scaling, group_reduce="none")
        ref = out.attentions[li].sum(2)  # [B, Hq, Nk] column sums of the eager attention
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- the cache really shrinks
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name,budget", [("h2o", 0.25), ("snapkv", 0.5), ("streaming_llm", 0.1), ("knorm", 16), ("tova", 0.3)])
def test_cache_bytes_shrink_with_budget(arch, name, budget):
    m = tiny(arch)
    x = ids(80)
    with torch.no_grad():
        full = m(x, use_cache=True).past_key_values
        full_bytes = kv_bytes(full)
        with evict(m, make_policy(name, budget=budget)) as ev:
            out = m(x, use_cache=True)
    n = make_policy(name, budget=budget).keep_count(80)
    assert all(l.keys.shape[2] == n and l.values.shape[2] == n for l in out.past_key_values.layers)
    after = kv_bytes(out.past_key_values)
    assert ev.events[0]["bytes_before"] == full_bytes and ev.events[0]["bytes_after"] == after
    assert after / full_bytes == pytest.approx(n / 80)
    assert after / full_bytes == pytest.approx(budget if isinstance(budget, float) else budget / 80, abs=1 / 80)


def test_lazyllm_per_layer_lengths():
    m = tiny("llama", layers=3)
    x = ids(60)
    with torch.no_grad(), evict(m, LazyLLM(0.4, progressive=0.5)) as ev:
        out = m(x, use_cache=True)
        lens = [l.keys.shape[2] for l in out.past_key_values.layers]
        assert lens == [36, 24, 12] == ev.events[0]["kept"]
        # decoding keeps working with different cache lengths per layer
        nxt = m(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
    assert torch.isfinite(nxt.logits).all()
    assert kv_bytes(out.past_key_values) / ev.events[0]["bytes_before"] == pytest.approx((36 + 24 + 12) / 180 + 0, abs=0.02)


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_time_eviction_keeps_cache_bounded(arch):
    m = tiny(arch)
    x = ids(30)
    with torch.no_grad(), evict(m, StreamingLLM(12, sinks=2), every=1) as ev:
        out = m.generate(x, max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape[1] == 40
    assert [l.keys.shape[2] for l in out.past_key_values.layers] == [12, 12]
    assert all(e["kept"] == [12, 12] for e in ev.events)
    assert len(ev.events) == 1 + 9  # prefill + one per decode forward (the last token is not fed back)
    # ratio budget: the cache grows with the sequence at the budget's rate
    with torch.no_grad(), evict(m, H2O(0.5), every=4) as ev:
        out = m.generate(x, max_new_tokens=13, do_sample=False, return_dict_in_generate=True)
    assert [e["n_seen"] for e in ev.events] == [30, 34, 38, 42]
    assert ev.events[-1]["kept"] == [21, 21]


# ---------------------------------------------------------------- exactness: no-op eviction == baseline
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["h2o", "snapkv", "tova", "a2sf", "streaming_llm", "lazyllm", "random", "knorm"])
def test_budget_one_generation_is_token_exact(arch, name):
    m = tiny(arch)
    x = ids(25, seed=7)
    with torch.no_grad():
        base = m.generate(x, max_new_tokens=12, do_sample=False)
        with evict(m, make_policy(name, budget=1.0), every=3):
            got = m.generate(x, max_new_tokens=12, do_sample=False)
    assert torch.equal(base, got)


class Permuted(PrunePolicy):
    "Keeps every position but gathers them in a shuffled order (per head unless `shared`)."
    name = "permuted"
    needs_attention = False
    def __init__(self, shared=False, seed=0):
        super().__init__(1.0); self.shared, self.g = shared, torch.Generator().manual_seed(seed)
    def scores(self, q, k, past=None, *, scale=None, layer=0):
        return torch.zeros(k.shape[:3])
    def select(self, scores, n_keep, valid=None):
        B, H, N = scores.shape
        if self.shared: return torch.randperm(N, generator=self.g).expand(B, H, N).contiguous()
        return torch.stack([torch.stack([torch.randperm(N, generator=self.g) for _ in range(H)]) for _ in range(B)])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_permuted_identity_eviction_keeps_positions(arch, impl):
    m = tiny(arch, impl=impl)
    x = ids(21, seed=3)
    cont = ids(6, seed=4)
    with torch.no_grad():
        base = m.generate(x, max_new_tokens=10, do_sample=False, return_dict_in_generate=True, output_scores=True)
        with evict(m, Permuted(), every=2, force=True) as ev:
            got = m.generate(x, max_new_tokens=10, do_sample=False, return_dict_in_generate=True, output_scores=True)
        assert len(ev.events) > 3
        assert torch.equal(base.sequences, got.sequences)
        torch.testing.assert_close(torch.stack(got.scores), torch.stack(base.scores), rtol=1e-4, atol=1e-4)
        # multi-token continuation after a permuted prefill, direct calls without position_ids
        ref = m(torch.cat([x, cont], 1)).logits[:, -6:]
        with evict(m, Permuted(seed=1), force=True):
            pre = m(x, use_cache=True)
            out = m(cont, past_key_values=pre.past_key_values, use_cache=True).logits
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        # the check has power: wrong positions change the logits
        wrong = m(cont, past_key_values=m(x, use_cache=True).past_key_values, position_ids=torch.arange(6)[None] + 30).logits
        assert (wrong - ref).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch(arch):
    m = tiny(arch)
    a, b = ids(20, seed=5)[0], ids(13, seed=6)[0]
    x = torch.stack([a, torch.cat([torch.zeros(7, dtype=torch.long), b])])
    am = torch.stack([torch.ones(20, dtype=torch.long), torch.cat([torch.zeros(7, dtype=torch.long), torch.ones(13, dtype=torch.long)])])
    with torch.no_grad():
        base = m.generate(x, attention_mask=am, max_new_tokens=8, do_sample=False)
        with evict(m, Permuted(shared=True), every=3, force=True):
            got = m.generate(x, attention_mask=am, max_new_tokens=8, do_sample=False)
        assert torch.equal(base, got)
        # a real eviction on the padded batch: padding is evicted first, real tokens of row 1 all survive budget 13
        with evict(m, H2O(13, recent=2)) as ev:
            out = m(x, attention_mask=am, use_cache=True)
        assert ev.events[0]["kept"] == [13, 13]
        alone = m.generate(b[None], max_new_tokens=8, do_sample=False)
        with evict(m, H2O(13, recent=2)):
            padded = m.generate(x, attention_mask=am, max_new_tokens=8, do_sample=False)
    if arch == "llama":  # GPT-2 positions are not shifted by padding in generate, so only Llama matches exactly
        assert torch.equal(padded[1, 20:], alone[0, 13:])


@pytest.mark.parametrize("arch", ARCHS)
def test_evicted_cache_equals_masked_full_attention(arch):
    "Compacting the cache = attending to the kept positions only (same positions everywhere: StreamingLLM)."
    m = tiny(arch)
    x, cont = ids(40, seed=8), ids(5, seed=9)
    pol = StreamingLLM(14, sinks=3)
    with torch.no_grad():
        with evict(m, pol):
            pre = m(x, use_cache=True)
            got = m(cont, past_key_values=pre.past_key_values, use_cache=True).logits
        keep = torch.zeros(1, 45, dtype=torch.long); keep[:, :3] = 1; keep[:, 40 - 11:] = 1
        full = m(x, use_cache=True).past_key_values
        ref = m(cont, past_key_values=full, attention_mask=keep, position_ids=torch.arange(40, 45)[None]).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_hooks_removed_on_error():
    m = tiny("llama")
    n_pre = sum(len(mod._forward_pre_hooks) + len(mod._forward_hooks) for mod in m.modules())
    with pytest.raises(RuntimeError, match="boom"):
        with evict(m, H2O(0.5)):
            assert sum(len(mod._forward_pre_hooks) for mod in m.modules()) > n_pre
            raise RuntimeError("boom")
    assert sum(len(mod._forward_pre_hooks) + len(mod._forward_hooks) for mod in m.modules()) == n_pre


def test_registry_complete():
    assert set(POLICIES.names()) == {"h2o", "snapkv", "tova", "a2sf", "streaming_llm", "lazyllm", "random", "knorm", "pyramidkv", "prefixkv", "zipvl", "kvcrush", "elastic", "adakv"}
    for name in POLICIES.names():
        assert isinstance(make_policy(name, budget=0.5), PrunePolicy)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the Triton importance kernel path inside evict()")
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_triton_path(arch):
    m = tiny(arch).cuda()
    x = ids(200, seed=2).cuda()
    with torch.no_grad():
        base = m.generate(x, max_new_tokens=8, do_sample=False)
        with evict(m, H2O(1.0), every=2):
            same = m.generate(x, max_new_tokens=8, do_sample=False)
        with evict(m, SnapKV(0.25), every=0) as ev:
            m.generate(x, max_new_tokens=4, do_sample=False)
    assert torch.equal(base, same)
    assert ev.events[0]["bytes_after"] / ev.events[0]["bytes_before"] == pytest.approx(0.25, abs=0.01)
    q, k = attend_to(7, nq=50, nk=300, hq=4, hkv=2)
    torch.testing.assert_close(H2O().scores(q.cuda(), k.cuda()).cpu(), H2O().scores(q, k), rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------- transformers internals: the cache keyword (issue #10)
def _cache_len(cache):
    return [l.keys.shape[2] for l in cache.layers]


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_budget_one_is_exact_and_keeps_full_kv_per_layer(arch):
    "Budget 1.0 inside generate: token-identical and every layer holds the full length (not 1 position)."
    m = tiny(arch)
    x = ids(25, seed=7)
    with torch.no_grad():
        base = m.generate(x, max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
        for every in (0, 1, 3):
            with evict(m, H2O(1.0), every=every) as ev:
                got = m.generate(x, max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
            assert torch.equal(base.sequences, got.sequences), every
            assert _cache_len(got.past_key_values) == [25 + 12 - 1] * 2  # the last token is never fed back
            assert kv_bytes(got.past_key_values) == kv_bytes(base.past_key_values)
            assert ev.events and all(e["kept"] == [e["n_seen"]] * 2 for e in ev.events)


@pytest.mark.parametrize("arch", ARCHS)
def test_streaming_llm_keeps_exactly_n_per_layer_in_generate(arch):
    m = tiny(arch)
    x = ids(100, seed=11)
    with torch.no_grad():
        full = m(x, use_cache=True).past_key_values
        with evict(m, StreamingLLM(64, sinks=4), every=1) as ev:
            out = m.generate(x, max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
    assert _cache_len(out.past_key_values) == [64, 64]
    assert all(e["kept"] == [64, 64] for e in ev.events) and len(ev.events) == 10
    for lf, lo in zip(full.layers, out.past_key_values.layers):  # the sinks are the prompt's first 4 keys
        torch.testing.assert_close(lo.keys[:, :, :4], lf.keys[:, :, :4])
    # every=0: evicted once after the prefill, then the decoded tokens are appended
    with torch.no_grad(), evict(m, StreamingLLM(64, sinks=4), every=0) as ev:
        out = m.generate(x, max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
    assert _cache_len(out.past_key_values) == [64 + 9, 64 + 9] and len(ev.events) == 1


@pytest.mark.parametrize("arch", ARCHS)
def test_continuation_call_with_past_key_values(arch):
    "A direct continuation call passing past_key_values= (the old keyword, still accepted) after an evicted prefill."
    m = tiny(arch)
    x, cont = ids(40, seed=8), ids(5, seed=9)
    with torch.no_grad():
        ref_pre = m(x, use_cache=True)
        ref = m(cont, past_key_values=ref_pre.past_key_values, use_cache=True)
        with evict(m, H2O(1.0)) as ev:
            pre = m(x, use_cache=True)
            out = m(cont, past_key_values=pre.past_key_values, use_cache=True)
        assert _cache_len(out.past_key_values) == [45, 45]
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
        with evict(m, H2O(0.5)) as ev:
            pre = m(x, use_cache=True)
            out = m(cont, past_key_values=pre.past_key_values, use_cache=True)
        assert _cache_len(out.past_key_values) == [20 + 5, 20 + 5] and ev.events[0]["kept"] == [20, 20]
    assert torch.isfinite(out.logits).all()


def test_missing_cache_keyword_fails_loudly(monkeypatch):
    "No known cache keyword in the forward signature: a ConfigError naming the version and the keywords looked for."
    import transformers
    import tokexp.prune.policies as P
    m = tiny("llama")
    monkeypatch.setattr(P, "CACHE_KEYWORDS", ("kv_state_v9",))
    with pytest.raises(ConfigError, match=rf"transformers {transformers.__version__}.*kv_state_v9"):
        evict(m, H2O(1.0))


def test_cache_under_unexpected_keyword_fails_loudly_in_generate(monkeypatch):
    "The model-level hook looks under the wrong keyword (the 5.24 bug): generate must raise, not evict to one position."
    import transformers
    import tokexp.prune.policies as P
    m = tiny("llama")
    orig = P.cache_keyword
    monkeypatch.setattr(P, "cache_keyword", lambda fn, what: ("not_the_cache", None) if fn == m.forward else orig(fn, what))
    x = ids(25, seed=7)
    with pytest.raises(ConfigError, match=rf"transformers {transformers.__version__}.*not_the_cache"):
        with torch.no_grad(), evict(m, H2O(1.0), every=1):
            m.generate(x, max_new_tokens=4, do_sample=False)


def test_cache_without_layers_fails_loudly():
    with pytest.raises(ConfigError, match="layers"):
        kv_bytes(object())


# ---------------------------------------------------------------- every=0: the query buffer stays bounded (issue #10)
@pytest.mark.parametrize("name", ["h2o", "a2sf"])
def test_query_buffer_bounded_over_long_generation(name):
    m = tiny("llama")
    x = ids(40, seed=12)
    hq, d, n_layers = 4, 16, 2
    q_bytes = hq * d * 4 * n_layers  # one decode step's queries, all layers (fp32)
    with torch.no_grad():
        with evict(m, make_policy(name, budget=0.25), every=0) as ev:
            out = m.generate(x, max_new_tokens=150, do_sample=False, return_dict_in_generate=True)
            cache = out.past_key_values
            assert _cache_len(cache) == [10 + 149] * 2
            buf = kv_bytes(cache, ev) - kv_bytes(cache)
        assert 0 < buf < q_bytes  # carried scores only; no decode queries (nothing would ever use them)
        assert "buffer_bytes" in ev.events[0]
        with evict(m, make_policy(name, budget=0.25), every=10) as ev:
            out = m.generate(x, max_new_tokens=150, do_sample=False, return_dict_in_generate=True)
            cache = out.past_key_values
            n_seen = 40 + 149
            assert _cache_len(cache) == [math.ceil(0.25 * 180) + 9] * 2  # last eviction at 180 seen, then 9 appended
            buf = kv_bytes(cache, ev) - kv_bytes(cache)
        assert buf <= 10 * q_bytes + 2 * 4 * 2 * n_seen  # at most `every` steps of queries + carried scores
        assert all(e["buffer_bytes"] < 10 * q_bytes for e in ev.events)


def test_buffer_bytes_after_exit_raises_and_keeps_the_exit_size():
    "After the with block evict's buffers are freed: kv_bytes(cache, ev) refuses instead of adding 0; exit_buffer_bytes keeps the size."
    import weakref
    m = tiny("llama")
    ev = evict(m, make_policy("h2o", budget=0.25), every=0)
    assert ev.buffer_bytes() == 0 and ev.exit_buffer_bytes is None  # not entered yet: nothing held
    with torch.no_grad(), ev:
        out = m.generate(ids(40, seed=12), max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
        cache = out.past_key_values
        inside = kv_bytes(cache, ev) - kv_bytes(cache)
        held = [t for t in ev._st.past if t is not None]
        direct = sum(t.numel() * t.element_size() for t in held)  # H2O, every=0: only carried scores are held
        refs = [weakref.ref(t) for t in held]
        del held
    assert inside == direct > 0
    assert ev.exit_buffer_bytes == inside
    assert all(r() is None for r in refs), "evict's buffers should be freed when the with block ends"
    with pytest.raises(InputError, match="closed"):
        kv_bytes(cache, ev)
    with pytest.raises(InputError, match="exit_buffer_bytes"):
        ev.buffer_bytes()
    kv_bytes(cache)  # the cache itself is still measurable


# ---------------------------------------------------------------- TOVA and SnapKV as published (issue #10)
def _rand_qk(hq, hkv, nq, nk, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, hq, nq, d, generator=g) * 1.5, torch.randn(1, hkv, nk, d, generator=g) * 1.5


def test_tova_default_is_head_averaged_like_the_paper():
    hq, hkv, nk, n_keep, d = 4, 2, 30, 9, 16
    q, k = _rand_qk(hq, hkv, 6, nk)
    G = hq // hkv
    # direct loop of TOVA's rule: the last query's softmax attention, averaged over all heads of the layer, top-k
    avg = [0.0] * nk
    for h in range(hq):
        logits = [sum(q[0, h, -1, t].item() * k[0, h // G, j, t].item() for t in range(d)) / math.sqrt(d) for j in range(nk)]
        mx = max(logits); e = [math.exp(v - mx) for v in logits]; z = sum(e)
        for j in range(nk): avg[j] += e[j] / z / hq
    want = sorted(sorted(range(nk), key=lambda j: -avg[j])[:n_keep])
    idx = TOVA(n_keep).prune(q, k, k)[2]
    assert idx.shape == (1, hkv, n_keep)
    for g in range(hkv): assert idx[0, g].tolist() == want
    # per-head option: each KV head ranks by its own query heads' attention
    per = TOVA(n_keep, per_head=True).prune(q, k, k)[2]
    for g in range(hkv):
        sub = [0.0] * nk
        for h in range(g * G, (g + 1) * G):
            p = torch.softmax(q[0, h, -1].double() @ k[0, g].double().T / math.sqrt(d), -1)
            for j in range(nk): sub[j] += p[j].item()
        assert per[0, g].tolist() == sorted(sorted(range(nk), key=lambda j: -sub[j])[:n_keep])
    assert LazyLLM(0.5).per_head is False  # LazyLLM also averages the last token's attention over heads


def _snapkv_reference(q, k, n_keep, window, kernel, pooling):
    "SnapKV's published rule, head by head: window attention summed over the window's queries, pooled over the prefix."
    B, H, nq, d = q.shape; nk = k.shape[2]
    out = []
    for h in range(H):
        att = [0.0] * nk
        for i in range(nq - window, nq):
            pos = nk - nq + i  # the query's position; causal
            logits = [(q[0, h, i] @ k[0, h, j]).item() / math.sqrt(d) if j <= pos else -math.inf for j in range(nk)]
            mx = max(logits); e = [math.exp(v - mx) for v in logits]; z = sum(e)
            for j in range(nk): att[j] += e[j] / z
        pre = att[:nk - window]
        r = kernel // 2
        if pooling == "avg":  # zero padding counted (torch's avg_pool1d default, as the reference code uses)
            pooled = [sum(pre[t] for t in range(j - r, j + r + 1) if 0 <= t < len(pre)) / kernel for j in range(len(pre))]
        else:
            pooled = [max(pre[t] for t in range(j - r, j + r + 1) if 0 <= t < len(pre)) for j in range(len(pre))]
        top = sorted(range(len(pre)), key=lambda j: -pooled[j])[:n_keep - window]
        out.append((sorted(top) + list(range(nk - window, nk)), pooled))
    return out


def test_snapkv_defaults_are_the_papers():
    pol = SnapKV(0.5)
    assert (pol.window, pol.kernel, pol.pooling, pol.recent) == (32, 5, "avg", 32)
    q, k = _rand_qk(2, 2, 40, 90, seed=3)
    n_keep = 50
    ref = _snapkv_reference(q, k, n_keep, 32, 5, "avg")
    assert SnapKV(n_keep).prune(q, k, k)[2][0].tolist() == [r[0] for r in ref]
    # the earlier defaults stay available as options; max pooling ties neighbours, so compare scores and top-k-ness
    pol = SnapKV(20, window=8, pooling="max")
    s, idx = pol.scores(q, k), pol.prune(q, k, k)[2][0]
    for h, (want, pooled) in enumerate(_snapkv_reference(q, k, 20, 8, 5, "max")):
        torch.testing.assert_close(s[0, h, :82].double(), torch.tensor(pooled, dtype=torch.float64), rtol=1e-4, atol=1e-6)
        kept = [j for j in idx[h].tolist() if j < 82]
        assert idx[h].tolist()[-8:] == list(range(82, 90)) and len(kept) == 12
        assert min(pooled[j] for j in kept) >= max(pooled[j] for j in range(82) if j not in kept) - 1e-6


# ---------------------------------------------------------------- the kv_pruning_quality template, end to end (issue 17)
def test_kv_pruning_quality_template_runs_small(reports_tmp):
    "Every method family through the runner with tiny parameters: budget 1.0 identical, bytes measured, plots written."
    import json
    from tokexp.report import run_experiment
    pols, sels = ["h2o", "snapkv", "pyramidkv", "prefixkv", "zipvl", "adakv"], ["tokenselect", "tidaldecode"]
    r = run_experiment("kv_pruning_quality", dict(models=["ref-llama"], policies=pols, selectors=sels, budgets=[0.5, 1.0], selector_budgets=[0.5, 1.0],
                                                  n_windows=4, prefix_len=40, cont_len=8, probe_trials=4, probe_segment=12,
                                                  probe_steps=10, batch_size=4), force=True, progress=False)
    assert r.ok, r.error
    m = json.loads((r.path / "metrics.json").read_text())
    assert m["budget_one_identical"] is True
    assert m["kv_bytes_ratio_max_abs_dev"] < 0.06  # ceil(budget x length) per layer plus bookkeeping
    mm = m["models"]["ref-llama"]
    assert set(mm["ppl_ratio_at_budget"]) == set(pols + sels)
    assert all(0.5 < v < 20 for v in mm["ppl_ratio_at_budget"].values())
    kb = mm["kv_bytes_ratio_at_budget"]
    assert all(abs(kb[p] - 0.5) < 0.1 for p in ("h2o", "snapkv", "prefixkv")) and kb["tokenselect"] == 1.0 == kb["tidaldecode"]
    assert 0 < kb["zipvl"] <= 1
    assert 0.5 - 0.02 <= kb["adakv"] <= 1.0  # AdaKV's measured bytes are its padded tensors: at least the budget
    assert set(m["copy_probe"]["acc_at_budget"]) == set(pols + sels)
    assert (r.path / "quality_vs_memory.png").exists() and (r.path / "ppl.csv").exists()
    reads_as_report(r.path / "kv_pruning_quality.ipynb")


# ---------------------------------------------------------------- representation instead of eviction: KVCrush, Elastic Cache
def _loop_merge(t, idx, valid=None):
    "Independent Elastic Cache merge: each position joins its nearest kept position (ties: earlier); anchors = group means."
    B, H, N, D = t.shape
    out = torch.zeros(B, H, idx.shape[-1], D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kept = idx[b, h].tolist()
            groups = {a: [] for a in kept}
            for j in range(N):
                if valid is not None and not bool(valid[b, j]): continue
                a = min(kept, key=lambda a: (abs(a - j), a))
                groups[a].append(j)
            for s, a in enumerate(kept):
                out[b, h, s] = t[b, h, groups[a]].double().mean(0) if groups[a] else t[b, h, a].double()
    return out


def test_elastic_merge_by_loop():
    from tokexp.prune.policies import ElasticCache
    g = torch.Generator().manual_seed(7)
    k, v = torch.randn(2, 3, 31, 8, generator=g), torch.randn(2, 3, 31, 5, generator=g)
    q = torch.randn(2, 6, 5, 8, generator=g)
    pol = ElasticCache(9)
    k2, v2, idx, s = pol.prune(q, k, v)
    torch.testing.assert_close(k2.double(), _loop_merge(k, idx), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v2.double(), _loop_merge(v, idx), rtol=1e-5, atol=1e-6)
    valid = torch.ones(2, 31, dtype=torch.bool); valid[1, :4] = False
    idx = pol.select(s, 9, valid)
    k3, _ = pol.compact(k, v, idx, valid)
    torch.testing.assert_close(k3.double(), _loop_merge(k, idx, valid), rtol=1e-5, atol=1e-6)


def test_elastic_positions_right_after_merge():
    # after merging 30 positions into 12 anchors, the next token must sit at RoPE position 30 (tokens seen), not 12 (cache length)
    from tokexp.prune.policies import ElasticCache
    m = tiny("llama")
    x = ids(30)
    kw = cache_keyword(m.forward, "forward")[0]
    def next_logits(**extra):
        with torch.no_grad(), evict(m, ElasticCache(0.4)):
            c = getattr(m(x, use_cache=True), kw)
            assert [l.keys.shape[2] for l in c.layers] == [12, 12]
            return m(x[:, -1:], use_cache=True, **{kw: c}, **extra).logits
    auto = next_logits()
    torch.testing.assert_close(auto, next_logits(position_ids=torch.tensor([[30]])))
    assert not torch.allclose(auto, next_logits(position_ids=torch.tensor([[12]])), atol=1e-4)


def _loop_kvcrush(scores, n_keep, share, seed, sinks=0, recent=0):
    "Independent KVCrush selection (one batch row): importance top-k, then one token per Hamming-distance bucket."
    H, N = scores.shape
    n_rep = int(share * n_keep); n_imp = n_keep - n_rep
    tot = scores.sum(0).tolist()
    forced = set(range(N - recent, N)) if recent else set()
    imp = sorted(forced | set(sorted((j for j in range(N) if j not in forced), key=lambda j: -tot[j])[:n_imp - len(forced)]))
    anchor = (torch.rand(H, generator=torch.Generator().manual_seed(seed)) < 0.5).tolist()
    thr = [sorted(scores[h].tolist(), reverse=True)[min(n_keep, N) - 1] for h in range(H)]
    dist = {j: sum((scores[h, j].item() >= thr[h]) != anchor[h] for h in range(H)) for j in range(N)}
    ev = sorted((j for j in range(N) if j not in imp), key=lambda j: (dist[j], j))
    nb = min(n_rep, len(ev))
    if nb == 0: return imp
    size, extra = divmod(len(ev), nb)
    reps, i = [], 0
    for c in range(nb):
        reps.append(ev[i]); i += size + (1 if c < extra else 0)
    return sorted(imp + reps)


def test_kvcrush_selection_by_loop():
    from tokexp.prune.policies import KVCrush
    g = torch.Generator().manual_seed(8)
    s = torch.rand(2, 4, 40, generator=g)
    for n_keep, share, recent in [(12, 0.25, 3), (20, 0.5, 0), (5, 0.0, 1)]:
        pol = KVCrush(n_keep, share=share, recent=recent, seed=3)
        idx = pol.select(s, n_keep)
        for b in range(2):
            want = _loop_kvcrush(s[b], n_keep, share, 3, recent=recent)
            for h in range(4): assert idx[b, h].tolist() == want, (n_keep, share, b)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["kvcrush", "elastic"])
def test_representation_policies_budget_one_identical(arch, name):
    m = tiny(arch)
    x = ids(50, batch=2)
    with torch.no_grad():
        base = m.generate(x, max_new_tokens=8, do_sample=False)
        with evict(m, make_policy(name, budget=1.0), every=2, force=True):  # force: the compact/merge path runs with singleton groups
            same = m.generate(x, max_new_tokens=8, do_sample=False)
    assert torch.equal(base, same)


# ---------------------------------------------------------------- layer-wise compression during prefill (issue 17)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["h2o", "snapkv", "tova", "elastic"])
def test_layerwise_prefill_same_result_lower_peak(arch, name):
    m = tiny(arch, layers=4)
    x = ids(60, batch=2)
    am = torch.ones_like(x); am[1, :6] = 0
    with torch.no_grad():
        with evict(m, make_policy(name, budget=0.25)) as post:
            a = m.generate(x, attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0)
        with evict(m, make_policy(name, budget=0.25), layerwise=True) as lw:
            b = m.generate(x, attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b), name
    e0, e1 = post.events[0], lw.events[0]
    assert e1["layerwise"] and not e0["layerwise"] and e0["kept"] == e1["kept"] and e0["bytes_after"] == e1["bytes_after"]
    assert e0["peak_bytes"] == e0["bytes_before"] == e1["bytes_before"]
    # at most one layer uncompressed at a time: peak = one full layer + the compressed earlier layers
    per_layer = e0["bytes_before"] / 4
    assert e1["peak_bytes"] <= per_layer + 3 * e1["bytes_after"] / 4 + 1
    assert e1["peak_bytes"] < 0.5 * e0["peak_bytes"]


def test_layerwise_refuses_allocators():
    with pytest.raises(ConfigError, match="layerwise=True"):
        evict(tiny("llama"), make_policy("prefixkv", budget=0.5), layerwise=True)


# ---------------------------------------------------------------- AdaKV: per-head adaptive budgets inside evict (issue 17)
def _kept_positions(ev_keys, full_keys):
    "Per (batch, KV head): the prompt positions whose keys a compacted cache holds (exact match; zero rows are padding)."
    B, H, K, _ = ev_keys.shape
    out = {}
    for b in range(B):
        for h in range(H):
            eq = (ev_keys[b, h, :, None, :] == full_keys[b, h, None, :, :]).all(-1)  # [K, N]
            real = ev_keys[b, h].abs().sum(-1) > 0
            assert (eq.sum(-1)[real] == 1).all() and eq[~real].sum() == 0
            out[b, h] = sorted(int(eq[s].nonzero()[0, 0]) for s in range(K) if real[s])
    return out


def _ref_lm(name):
    from tokexp.lm import train_lm, load_lm
    m, tok = load_lm(str(train_lm(name, progress=False)), device="cpu")
    return m.eval(), tok


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name,kw,every", [("adakv", {}, 0), ("adakv", {}, 3), ("pyramidkv", dict(adaptive_heads=True), 2),
                                          ("h2o", dict(adaptive_heads=True), 3)])
def test_adakv_budget_one_is_token_identical(arch, name, kw, every):
    m = tiny(arch)
    x = ids(50, seed=7, batch=2)
    with torch.no_grad():
        base = m.generate(x, max_new_tokens=10, do_sample=False, pad_token_id=0)
        with evict(m, make_policy(name, budget=1.0, **kw), every=every, force=True) as ev:
            got = m.generate(x, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(base, got), (name, kw)
    H = getattr(m.config, "num_key_value_heads", None) or m.config.n_head
    assert all(e["entries"] == [2 * H * e["n_seen"]] * 2 for e in ev.events)  # every slot real: nothing padded


@pytest.mark.parametrize("ref", ["ref-small", "ref-llama"])
def test_adakv_budget_one_identical_on_reference_lms(ref):
    from tokexp.prune.policies import prompt_ids
    m, tok = _ref_lm(ref)
    x = prompt_ids(tok, "The cat sees the moon at night. A dog likes a red apple again, and the bird sings in the tree.")
    with torch.no_grad():
        base = m.generate(x, max_new_tokens=12, do_sample=False)
        with evict(m, make_policy("adakv", budget=1.0, window=8), every=4, force=True):
            got = m.generate(x, max_new_tokens=12, do_sample=False)
        with evict(m, make_policy("adakv", budget=0.4, window=8)) as ev:  # and a real eviction runs on the trained models
            m.generate(x, max_new_tokens=4, do_sample=False)
    assert torch.equal(base, got)
    assert ev.events[0]["real_bytes_after"] < ev.events[0]["bytes_after"] <= ev.events[0]["bytes_before"]


def _adakv_reference_keep(s, n_keep, window, alpha):
    "Direct AdaKV: the window in every head, then the top H·(k−w) free scores (each head first its own top floor(α(k−w))), by loops."
    B, H, N = s.shape
    kf = n_keep - window
    floor = int(alpha * kf)
    out = []
    for b in range(B):
        free = {h: sorted(range(N - window), key=lambda j: -float(s[b, h, j])) for h in range(H)}
        taken = {(h, j) for h in range(H) for j in free[h][:floor]}
        rest = sorted(((float(s[b, h, j]), h, j) for h in range(H) for j in range(N - window) if (h, j) not in taken), reverse=True)
        taken |= {(h, j) for _, h, j in rest[:H * kf - len(taken)]}
        out.append([sorted([j for hh, j in taken if hh == h] + list(range(N - window, N))) for h in range(H)])
    return out


def test_adakv_each_head_keeps_its_counted_top_entries():
    from tokexp.prune.budgets import adakv_head_counts
    from tokexp.prune.policies import AdaKV
    g = torch.Generator().manual_seed(11)
    B, Hq, H, N, D = 2, 8, 4, 60, 16
    q = torch.randn(B, Hq, 20, D, generator=g) * torch.tensor([0.3, 3.0, 0.5, 6.0, 1.0, 2.0, 4.0, 0.2]).view(1, Hq, 1, 1)
    k = torch.randn(B, H, N, D, generator=g)
    for n_keep, window, alpha in [(16, 4, 0.2), (24, 8, 0.0), (12, 2, 0.5)]:
        pol = AdaKV(n_keep, window=window, ada_alpha=alpha)
        k2, v2, idx, s = pol.prune(q, k, k)
        want = _adakv_reference_keep(s, n_keep, window, alpha)
        free = s.clone(); free[..., N - window:] = float("-inf")
        counts = adakv_head_counts(free, n_keep - window, alpha)
        for b in range(B):
            for h in range(H):
                row = [j for j in idx[b, h].tolist() if j >= 0]
                assert row == want[b][h], (n_keep, b, h)
                assert len(row) == int(counts[b, h]) + window
                torch.testing.assert_close(k2[b, h, :len(row)], k[b, h, row])
                assert (k2[b, h, len(row):] == 0).all()
            assert sum(len([j for j in idx[b, h].tolist() if j >= 0]) for h in range(H)) == H * n_keep
        assert len({int(c) for c in counts.flatten()}) > 1  # the allocation really is ragged here


@pytest.mark.parametrize("arch", ARCHS)
def test_adakv_cache_holds_each_heads_entries_and_counts_real_bytes(arch):
    m = tiny(arch, layers=2)
    x = ids(64, seed=3)
    with torch.no_grad():
        full = m(x, use_cache=True).past_key_values
        with evict(m, make_policy("adakv", budget=0.25, window=4)) as ev:
            out = m(x, use_cache=True)
    cache = out.past_key_values
    e = ev.events[0]
    n_keep = 16
    for li, l in enumerate(cache.layers):
        H = l.keys.shape[1]
        kept = _kept_positions(l.keys, full.layers[li].keys)
        lens = [len(kept[0, h]) for h in range(H)]
        assert sum(lens) == H * n_keep == e["entries"][li]  # exactly the layer's budget H·k, spread unevenly
        assert l.keys.shape[2] == max(lens) == e["kept"][li]  # padded to the largest head
        assert all(set(range(60, 64)) <= set(kept[0, h]) for h in range(H))  # the window in every head
    assert e["bytes_after"] == kv_bytes(cache)  # the padded tensors are what is held
    per_entry = 2 * cache.layers[0].keys.shape[-1] * cache.layers[0].keys.element_size()
    assert e["real_bytes_after"] == sum(e["entries"]) * per_entry < e["bytes_after"]  # padding slots are held but not real


@pytest.mark.parametrize("arch", ARCHS)
def test_adakv_decode_attention_equals_per_head_float64_loop(arch):
    "A decode query's attention output: softmax over only its KV head's real slots, direct float64 loop."
    m = tiny(arch, layers=2)
    x = ids(48, seed=5)
    caught = {}
    layers = attention_layers(m)
    hs = []
    for li, mod, kind in layers:
        def pre(mod, args, kwargs, li=li, kind=kind):
            h = kwargs.get("hidden_states", args[0] if args else None)
            caught[li] = dict(hidden=h, pe=kwargs.get("position_embeddings"))
        def post(mod, args, kwargs, out, li=li):
            caught[li]["out"] = out[0]
        hs += [mod.register_forward_pre_hook(pre, with_kwargs=True), mod.register_forward_hook(post, with_kwargs=True)]
    try:
        with torch.no_grad(), evict(m, make_policy("adakv", budget=0.3, window=4)):
            pre_out = m(x, use_cache=True)
            cache = pre_out.past_key_values
            m(pre_out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    finally:
        for h in hs: h.remove()
    ragged = False
    for li, mod, kind in layers:
        c = caught[li]
        q = module_queries(mod, kind, c["hidden"], c["pe"]).double()  # [1, Hq, 1, D]
        kk, vv = cache.layers[li].keys.double(), cache.layers[li].values.double()  # after the step: kept slots + the new token
        Hq, H = q.shape[1], kk.shape[1]
        G = Hq // H
        real = kk.abs().sum(-1) > 0  # padded slots are zero rows
        ragged |= len({int(real[0, h].sum()) for h in range(H)}) > 1
        heads = []
        for h in range(Hq):
            slots = [s for s in range(kk.shape[2]) if real[0, h // G, s]]
            logits = [float(q[0, h, 0] @ kk[0, h // G, s]) * mod.scaling for s in slots]
            mx = max(logits); w = [math.exp(a - mx) for a in logits]; z = sum(w)
            heads.append(sum(wi / z * vv[0, h // G, s] for wi, s in zip(w, slots)))
        o = torch.cat(heads)[None, None]  # [1, 1, Hq·D]
        if kind == "gpt2": ref = o @ mod.c_proj.weight.double() + mod.c_proj.bias.double()
        else: ref = o @ mod.o_proj.weight.double().T
        torch.testing.assert_close(c["out"].double(), ref, rtol=1e-4, atol=1e-5)
    assert ragged


def _masked_reference(m, x, steps, kept):
    "Independent path: the full prompt cache, and per-layer per-head masks that hide each head's evicted prompt positions."
    layers = attention_layers(m)
    N = x.shape[1]
    state = {"t": 0}
    hs = []
    for li, mod, kind in layers:
        def pre(mod, args, kwargs, li=li):
            if state["t"] == 0: return None
            B = x.shape[0]
            H = max(h for _, h in kept[li]) + 1
            hq = getattr(mod, "num_heads", None) or mod.config.num_attention_heads
            allow = torch.ones(B, hq, 1, N + state["t"], dtype=torch.bool)
            for h in range(hq):
                prompt = torch.zeros(N, dtype=torch.bool); prompt[kept[li][0, h * H // hq]] = True
                allow[0, h, 0, :N] = prompt
            kwargs["attention_mask"] = allow
            return args, kwargs
        hs.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
    logits = []
    try:
        with torch.no_grad():
            out = m(x, use_cache=True)
            cache = out.past_key_values
            for t, tok in enumerate(steps):
                state["t"] = t + 1
                o = m(tok.view(1, 1), past_key_values=cache, use_cache=True, position_ids=torch.tensor([[N + t]]))
                logits.append(o.logits[:, -1])
    finally:
        for h in hs: h.remove()
    return torch.stack(logits)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name,kw", [("adakv", dict(window=4)), ("pyramidkv", dict(adaptive_heads=True, window=4, kernel=1))])
def test_adakv_decode_logits_equal_per_head_masked_full_cache(arch, name, kw):
    m = tiny(arch, layers=3)
    x = ids(60, seed=9)
    steps = ids(6, seed=10)[0]
    with torch.no_grad():
        full = m(x, use_cache=True).past_key_values
        full_keys = [l.keys.clone() for l in full.layers]
        got = []
        with evict(m, make_policy(name, budget=0.3, **kw)) as ev:
            out = m(x, use_cache=True)
            cache = out.past_key_values
            kept = {li: _kept_positions(cache.layers[li].keys, full_keys[li]) for li in range(3)}
            for tok in steps:
                got.append(m(tok.view(1, 1), past_key_values=cache, use_cache=True).logits[:, -1])
    assert any(len({len(v) for v in kept[li].values()}) > 1 for li in kept)  # ragged heads somewhere
    ref = _masked_reference(m, x, steps, kept)
    torch.testing.assert_close(torch.stack(got), ref, rtol=1e-4, atol=1e-4)
    # the check has power: attending to every prompt position gives other logits
    free = _masked_reference(m, x, steps, {li: {bh: list(range(60)) for bh in kept[li]} for li in kept})
    assert (free - ref).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_adakv_later_evictions_keep_the_layer_budget(arch):
    m = tiny(arch)
    x = ids(40, seed=2, batch=2)
    am = torch.ones_like(x); am[1, :5] = 0
    with torch.no_grad(), evict(m, make_policy("h2o", budget=0.4, adaptive_heads=True), every=3) as ev:
        out = m.generate(x, attention_mask=am, max_new_tokens=10, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert out.sequences.shape[1] == 50 and len(ev.events) == 4
    H = out.past_key_values.layers[0].keys.shape[1]
    for e in ev.events:
        n_keep = math.ceil(0.4 * e["n_seen"])
        for li in range(2):
            assert e["entries"][li] == 2 * H * n_keep  # the layer budget H·k per row, spread over heads; row 1's padding stays out


def test_adakv_bad_options_fail_with_a_fix():
    with pytest.raises(ConfigError, match="per_head=True"): make_policy("tova", budget=0.5, adaptive_heads=True)
    with pytest.raises(ConfigError, match="per_head=True"): make_policy("kvcrush", budget=0.5, adaptive_heads=True)
    with pytest.raises(ConfigError, match="ada_alpha"): make_policy("adakv", budget=0.5, ada_alpha=1.5)
    with pytest.raises(ConfigError, match="adaptive_heads must be"): make_policy("snapkv", budget=0.5, adaptive_heads="yes")
    with pytest.raises(InputError, match="n_keep"):
        from tokexp.prune.policies import adakv_select
        adakv_select(torch.zeros(1, 2, 5), 6)
    assert make_policy("adakv").adaptive_heads and make_policy("adakv").ada_alpha == 0.2 and make_policy("adakv").window == 32


# ---------------------------------------------------------------- Elastic Cache as published: both stages (issue 17)
def test_elastic_prefill_anchors_and_means_by_direct_loop():
    "Frequency over all prompt queries averaged over heads, 4 start tokens and the last token kept, the rest merged into the nearest anchor."
    from tokexp.prune.policies import ElasticCache
    m = tiny("llama", impl="eager")
    x = ids(40, seed=4)
    n_keep = 14
    with torch.no_grad():
        full = m(x, use_cache=True, output_attentions=True)
        with evict(m, ElasticCache(n_keep)) as ev:
            out = m(x, use_cache=True)
    for li in range(2):
        A = full.attentions[li][0].double()  # [Hq, N, N]
        imp = A.sum(1).mean(0).tolist()  # attention frequency, averaged over heads
        forced = [0, 1, 2, 3, 39]
        rest = sorted((j for j in range(40) if j not in forced), key=lambda j: -imp[j])[:n_keep - len(forced)]
        idx = torch.tensor(sorted(forced + rest)).expand(1, 2, -1)
        fk, fv = full.past_key_values.layers[li].keys, full.past_key_values.layers[li].values
        torch.testing.assert_close(out.past_key_values.layers[li].keys.double(), _loop_merge(fk, idx), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.past_key_values.layers[li].values.double(), _loop_merge(fv, idx), rtol=1e-5, atol=1e-6)
    assert ev.events[0]["kept"] == [n_keep, n_keep]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("budget,distance,every", [(30, -25, 1), (12, -5, 1), (12, 3, 1), (0.5, -25, 1), (12, -5, 3), (12, -25, 1)])
def test_elastic_fixed_point_elimination_by_direct_loop(arch, budget, distance, every):
    "Which entries survive T decode steps: a direct loop of the published rule on labels (anchors a_i, decoded tokens t_i)."
    from tokexp.prune.policies import ElasticCache
    m = tiny(arch)
    N, T = 60, 10
    x = ids(N, seed=6)
    toks = ids(T, seed=8)[0]
    pol = ElasticCache(budget, distance=distance)
    with torch.no_grad(), evict(m, pol, every=every) as ev:
        out = m(x, use_cache=True)
        cache = out.past_key_values
        Lc = cache.layers[0].keys.shape[2]
        rows = {("a", i): [l.keys[:, :, i].clone() for l in cache.layers] for i in range(Lc)}
        since = 0
        for t, tok in enumerate(toks):
            before = cache.layers[0].keys.shape[2]
            m(tok.view(1, 1), past_key_values=cache, use_cache=True)
            since += 1
            # the new token's entry: the last slot whenever nothing after it was removed (always, as p < end)
            rows["t", t] = [l.keys[:, :, -1].clone() for l in cache.layers]
    # the direct loop: labels, append each new token, remove the entry at the truncation point while over the limit
    lab = [("a", i) for i in range(Lc)]
    p0 = distance if distance > 0 else max(4, Lc + distance)  # a point counted back never reaches below the 4 start tokens
    pending = 0
    for t in range(T):
        lab.append(("t", t)); pending += 1
        if pending == every:
            pending = 0
            limit = budget if isinstance(budget, int) else math.ceil(budget * (N + t + 1))
            while len(lab) > limit:
                lab.pop(max(0, min(p0, len(lab) - 1)))
    assert [l.keys.shape[2] for l in cache.layers] == [len(lab)] * 2
    for li, l in enumerate(cache.layers):
        want = torch.stack([rows[r][li] for r in lab], 2)
        torch.testing.assert_close(l.keys, want)
    if isinstance(budget, int) and every == 1: assert len(lab) == budget  # an int budget keeps the post-prefill size


@pytest.mark.parametrize("arch", ARCHS)
def test_elastic_budget_one_and_positions_after_decode_eliminations(arch):
    from tokexp.prune.policies import ElasticCache
    m = tiny(arch)
    x = ids(50, seed=7, batch=2)
    with torch.no_grad():
        base = m.generate(x, max_new_tokens=10, do_sample=False, pad_token_id=0)
        with evict(m, ElasticCache(1.0), every=1):
            same = m.generate(x, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(base, same)
    # after prefill merging and 5 fixed-point eliminations the next token sits at position 55 (tokens seen), not the cache length
    x = ids(50, seed=7)
    kw = cache_keyword(m.forward, "forward")[0]
    def last(**extra):
        with torch.no_grad(), evict(m, ElasticCache(30, distance=-10), every=1):
            c = getattr(m(x, use_cache=True), kw)
            for t in ids(5, seed=3)[0]: m(t.view(1, 1), use_cache=True, **{kw: c})
            assert c.layers[0].keys.shape[2] == 30
            return m(x[:, -1:], use_cache=True, **{kw: c}, **extra).logits
    auto = last()
    torch.testing.assert_close(auto, last(position_ids=torch.tensor([[55]])))
    assert not torch.allclose(auto, last(position_ids=torch.tensor([[30]])), atol=1e-4)


def test_elastic_defaults_and_validation():
    from tokexp.prune.policies import ElasticCache
    p = ElasticCache()
    assert (p.sinks, p.recent, p.per_head, p.distance) == (4, 1, False, -25) and not p.decode_scores
    assert p.decode_select(31, 30, 30).tolist() == list(range(5)) + list(range(6, 31))
    assert p.decode_select(13, 12, 12).tolist() == [0, 1, 2, 3] + list(range(5, 13))  # 12 - 25 < 0: the start tokens stay
    assert ElasticCache(distance=3).decode_select(13, 12, 12).tolist() == [0, 1, 2] + list(range(4, 13))
    assert p.decode_select(30, 30, 30) is None
    with pytest.raises(ConfigError, match="distance"): ElasticCache(distance=2.5)
