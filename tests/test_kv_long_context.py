"Long-context tasks (tokexp.prune.longctx) and the kv_long_context template end to end."
import json, random
import pytest
from conftest import reads_as_report
from tokexp.lm import lm_split, train_tokenizer
from tokexp.prune.longctx import TaskConfig, task_instances, training_documents, make_key, needle_text, KVLONG
from dataclasses import replace

TINY = dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, ctx=96, vocab_size=512, steps=3, batch_size=2, eval_tokens=192)


@pytest.fixture(scope="module")
def tok():
    tr, _ = lm_split("fortunes")
    return train_tokenizer(tr[:1500] + [needle_text(make_key(random.Random(i)), str(10000 + 37 * i)) for i in range(300)], 1024)


def test_heldout_instances_do_not_overlap_training_documents(tok):
    "Evaluation haystacks come from held-out records: no 40-character window of an evaluation prompt's haystack occurs in training documents."
    spec = replace(KVLONG, ctx=130, steps=10, batch_size=4)
    train = "\n".join(tok.decode(d) for d in training_documents(tok, spec, TaskConfig(), "train"))
    ev = task_instances(tok, "continuation", 4, 128, seed=9)
    for inst in ev:
        text = tok.decode(inst.prompt[1:])
        windows = [text[i:i + 40] for i in range(0, len(text) - 40, 40)]
        assert sum(w in train for w in windows) <= len(windows) // 4  # only stock phrases may repeat


def test_answers_are_retrievable_from_the_prompt(tok):
    for task in ("needle", "multikey", "copy"):
        for inst in task_instances(tok, task, 5, 150, seed=2, cfg=TaskConfig(n_keys=3)):
            ans = tok.decode(inst.answer)
            assert ans.strip() and ans in tok.decode(inst.prompt)       # planted earlier in the prompt
            assert len(inst.prompt) + len(inst.answer) == 151


def test_kv_long_context_template_runs_small(reports_tmp):
    from tokexp.report import run_experiment
    r = run_experiment("kv_long_context", dict(lm_overrides=TINY, train_overrides=dict(warm_steps=2, warm_len=32, warm_batch=2),
                                               n_instances=2, copy_len=6, cont_len=6, n_keys=2, layerwise_policies=["h2o"],
                                               policies=["h2o", "zipvl", "adakv", "elastic+decode"], budgets=[0.25, 1.0], selectors=["tidaldecode"],
                                               selector_budgets=[0.25, 1.0], lazy_keeps=[0.5, 1.0], lazy_lengths=[32, 94], lazy_repeats=1),
                       force=True, progress=False)
    assert r.ok, r.error
    m = json.loads((r.path / "metrics.json").read_text())
    assert m["budget_one_identical"] is True and m["lazyllm"]["computed_once"] is True
    assert set(m["acc_at_budget"]) == {"h2o", "zipvl", "adakv", "elastic+decode"} and abs(m["kv_ratio_at_budget"]["h2o"] - 0.25) < 0.06
    assert m["real_kv_ratio_at_budget"]["adakv"] <= m["kv_ratio_at_budget"]["adakv"] + 1e-9
    assert m["layerwise"]["same_predictions_as_post_prefill"]["h2o"] is True and m["layerwise"]["peak_ratio_at_budget"]["h2o"] < 1.0
    assert m["lazyllm"]["flops_ratio"]["94@0.5"] < 0.9 and m["lazyllm"]["flops_ratio"]["94@1.0"] == 1.0
    for f in ("quality_vs_memory.png", "lazyllm_prefill.png", "summary.csv"): assert (r.path / f).exists()
    reads_as_report(r.path / "kv_long_context.ipynb")
