"LazyLLM (tokexp.prune.lazyllm) against an independent computation through transformers' own decoder layers."
import math
import pytest, torch
from conftest import tiny_lm
from tokexp.core import ConfigError
from tokexp.prune.lazyllm import (LazyLLMConfig, lazy_prefill, lazy_step, lazy_generate, computed_once, full_prefill_flops,
                                  stage_layers, llama_parts)


def _reference_prefill(model, ids, prune_layer, keep_pos):
    "Next-token logits when layers >= prune_layer run only on `keep_pos` (original positions), via the HF decoder layers."
    inner = model.model
    h = inner.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    for li, layer in enumerate(inner.layers):
        if li == prune_layer: h, pos = h[:, keep_pos], pos[:, keep_pos]
        n = h.shape[1]
        mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
        h = layer(h, attention_mask=mask, position_embeddings=inner.rotary_emb(h, pos), position_ids=pos)
        h = h[0] if isinstance(h, tuple) else h
    return model.lm_head(inner.norm(h[:, -1:]))[:, 0]


@pytest.mark.parametrize("n", [7, 33, 80])
def test_keep_one_is_the_unpruned_model(n):
    m = tiny_lm("llama", layers=4, seed=n)
    ids = torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(n))
    with torch.no_grad(): ref = m(ids).logits[:, -1]
    lg, st = lazy_prefill(m, ids, LazyLLMConfig(keep=1.0))
    torch.testing.assert_close(lg, ref, atol=1e-4, rtol=1e-4)
    assert [p.numel() for p in st.P] == [n] * 4 and st.flops == full_prefill_flops(m, n)
    gen, _ = lazy_generate(m, ids, 5, LazyLLMConfig(keep=1.0))
    with torch.no_grad(): hf = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0)[0, n:]
    assert gen.tolist() == hf.tolist()


def test_pruned_prefill_matches_the_shorter_sequence_through_hf_layers():
    "Pruning at layer 2 of 4 = layers 2, 3 run on the kept positions only (checked through transformers' layers)."
    m = tiny_lm("llama", layers=4, seed=3)
    ids = torch.randint(0, 97, (1, 50), generator=torch.Generator().manual_seed(1))
    lg, st = lazy_prefill(m, ids, LazyLLMConfig(keep=0.4, prune_layers=(2,)))
    kept = st.P[2]
    assert kept.numel() == math.ceil(0.4 * 50) and int(kept[-1]) == 49           # top 40 %, the last token kept
    assert [p.numel() for p in st.P] == [50, 50, 20, 20]                           # later layers really run on fewer tokens
    assert sorted(st.aux[2][0].tolist() + kept.tolist()) == list(range(50))        # the rest sits in the Aux Cache
    with torch.no_grad(): ref = _reference_prefill(m, ids, 2, kept)
    torch.testing.assert_close(lg, ref, atol=1e-4, rtol=1e-4)


def test_selection_is_the_last_tokens_attention_of_the_previous_layer():
    "The kept set = top-k of the head-mean softmax(q_N · K) of layer l-1 (eager attention weights from transformers)."
    m = tiny_lm("llama", impl="eager", layers=2, seed=5)
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(): att = m(ids, output_attentions=True).attentions[0][0, :, -1].mean(0)  # layer 0, last query
    _, st = lazy_prefill(m, ids, LazyLLMConfig(keep=0.25))
    s = att.clone(); s[-1] = float("inf")
    assert set(st.P[1].tolist()) == set(torch.topk(s, 10).indices.tolist())


def test_revival_computes_each_token_at_most_once_per_layer():
    m = tiny_lm("llama", layers=4, seed=7)
    ids = torch.randint(0, 97, (1, 64), generator=torch.Generator().manual_seed(3))
    gen, s = lazy_generate(m, ids, 12, LazyLLMConfig(keep=0.3))
    st = s["state"]
    assert computed_once(st) and s["revived"] > 0
    for li in range(1, 4):  # every prompt position is either computed at this layer or waiting in an Aux Cache at or below it
        have = set(st.P[li].tolist())
        waiting = {int(p) for l, (ps, _) in st.aux.items() if l <= li for p in ps}
        assert set(range(64)) <= have | waiting
    assert s["prefill_flops"] < full_prefill_flops(m, 64)


def test_no_revival_keeps_the_prefill_selection():
    m = tiny_lm("llama", layers=4, seed=8)
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(4))
    _, s = lazy_generate(m, ids, 6, LazyLLMConfig(keep=0.5, revive=False))
    assert s["revived"] == 0 and computed_once(s["state"])


def test_errors_and_schedule():
    assert stage_layers(32) == (8, 16, 24) and stage_layers(4) == (1, 2, 3) and stage_layers(2) == (1,)
    with pytest.raises(ConfigError, match="Llama-family"): llama_parts(tiny_lm("gpt2"))
    with pytest.raises(ConfigError, match="keep"): LazyLLMConfig(keep=1.5)
