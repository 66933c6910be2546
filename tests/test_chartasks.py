"""CharBench-style tasks: generator answers checked by direct string loops, properties against a brute-force
segmentation, likelihood scoring against one forward pass per option, correlations against numpy; template e2e."""
import json

import numpy as np
import pandas as pd
import pytest

from tokexp import chartasks as CT
from tokexp.core import ConfigError, InputError
from conftest import reads_as_report


def test_items_answers_are_right():
    words = CT.word_list("en", 3, 8)
    assert len(words) > 1000 and all(w.isalpha() and w.islower() and 3 <= len(w) <= 8 for w in words[:500])
    for task in CT.TASKS:
        it = CT.make_items(words, task, 200, seed=5)
        for r in it.itertuples():
            if task == "count": truth = sum(ch == r.char for ch in r.word)
            elif task == "locate": truth = next(k + 1 for k, ch in enumerate(r.word) if ch == r.char)
            else: truth = r.word[r.position - 1]
            assert r.answer == str(truth) and r.answer in r.options
        assert it.equals(CT.make_items(words, task, 200, seed=5))
    assert (CT.make_items(words, "count", 200, seed=1).answer == "0").mean() == pytest.approx(0.2, abs=0.08)
    with pytest.raises(ConfigError): CT.make_items(words, "reverse", 3)
    with pytest.raises(InputError): CT.make_items(["ABC", "1"], "count", 3)


def test_properties_brute_force():
    "Every segmentation of short words: properties equal a per-character brute force."
    import itertools
    for word in ["abca", "strawberry"[:6]]:
        n = len(word)
        for cuts in itertools.chain.from_iterable(itertools.combinations(range(1, n), k) for k in range(n)):
            b = [0, *cuts, n]
            spans = list(zip(b, b[1:]))
            for q in range(1, n + 1):
                p = CT.token_properties(spans, word, word[q - 1], position=q)
                owner = [t for t, (a, e) in enumerate(spans) for _ in range(a, e)]
                t = owner[q - 1]
                assert p["n_tokens"] == len(spans)
                assert p["token_len"] == spans[t][1] - spans[t][0] and p["pos_in_token"] == q - 1 - spans[t][0]
                assert p["tokens_with_char"] == len({owner[i] for i, ch in enumerate(word) if ch == word[q - 1]})


def test_word_spans_from_a_real_tokenizer():
    from tokexp.lm import load_lm, train_lm
    _, tok = load_lm(train_lm("ref-small", progress=False), device="cpu")  # trained on first use in a fresh clone
    p = 'Q: How many times does the letter "r" appear in the word "strawberry"?\nA:'
    st = p.rindex('"strawberry"') + 1
    enc = tok(p, add_special_tokens=False, return_offsets_mapping=True)
    spans = CT.word_token_spans(enc["offset_mapping"], st, st + 10)
    assert "".join("strawberry"[a:b] for a, b in spans) == "strawberry"
    assert CT.token_properties(spans, "strawberry", "r")["n_tokens"] == len(spans)


def test_option_scores_match_direct_forward():
    import torch
    from tokexp.lm import load_lm, train_lm
    model, tok = load_lm(train_lm("ref-small", progress=False), device="cpu")  # trained on first use in a fresh clone
    prompts = ["Q: Which letter is at position 2 of the word \"cat\"?\nA:", "Q: How many letters?\nA:"]
    options = [["a", "b", "t"], ["3", "10", "12"]]
    got = CT.option_logprobs(model, tok, prompts, options, batch_size=2)
    for p, opts, g in zip(prompts, options, got):
        a = [tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"]
        for o, s in zip(opts, g):
            b = tok(p + " " + o, add_special_tokens=False)["input_ids"][len(a) - 1:]
            with torch.no_grad(): lp = torch.log_softmax(model(torch.tensor([a + b])).logits[0], -1)
            assert s == pytest.approx(float(sum(lp[len(a) - 1 + k, t] for k, t in enumerate(b))), abs=1e-3)


def test_correlations_match_numpy():
    rng = np.random.default_rng(0)
    d = pd.DataFrame({"task": "locate", "correct": rng.random(50) < 0.4, "token_len": rng.integers(1, 6, 50).astype(float)})
    d.loc[:4, "token_len"] = np.nan
    r = CT.property_correlations(d, ["token_len"]).iloc[0]
    x = d.dropna()
    assert r.r == pytest.approx(np.corrcoef(x.correct.astype(float), x.token_len)[0, 1]) and r.n == 45


def test_template_runs_small(reports_tmp):
    from tokexp.report import run_experiment
    r = run_experiment("char_tasks", dict(models=["ref-small"], n_items=8, n_shots=1), force=True, progress=False)
    assert r.ok, r.error
    m = json.loads((r.path/"metrics.json").read_text())
    assert set(m["accuracy"]) == {"ref-small/count", "ref-small/locate", "ref-small/char_at"}
    assert all(0 <= v <= 1 for v in m["accuracy"].values()) and m["chance"]["ref-small/char_at"] == pytest.approx(1 / 26, abs=1e-4)
    assert list(r.path.glob("*.png"))
    reads_as_report(r.path/"char_tasks.ipynb")


