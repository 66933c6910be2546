"finetune_lm: deterministic (two independent runs give identical weights), cached, keyed by its inputs."
import pytest, torch
from tokexp.core import read_json
from tokexp.finetune import finetune_lm
from tokexp.lm import TINY, toy_corpus, train_lm, load_lm

STYLE = [f"Instruction: define {w}.\nResponse: {w} is a thing." for w in ["cat", "dog", "bird", "river", "clock", "door"] * 6]
KW = dict(steps=8, lr=5e-3, batch_size=4, ctx=32, warmup=2, progress=False)

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return train_lm(TINY, corpus=toy_corpus(), cache_dir=tmp_path_factory.mktemp("lm"), progress=False)

def _weights(path):
    m, _ = load_lm(path)
    return {k: v.clone() for k, v in m.state_dict().items()}

def test_deterministic(base, tmp_path):
    a = finetune_lm(base, STYLE, "det", cache_dir=tmp_path / "a", **KW)
    b = finetune_lm(base, STYLE, "det", cache_dir=tmp_path / "b", **KW)
    assert a.name == b.name and a != b
    wa, wb, w0 = _weights(a), _weights(b), _weights(base)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], w0[k]) for k in wa)  # training changed the weights
    assert read_json(a / "train_log.json")["loss"] == read_json(b / "train_log.json")["loss"]

def test_cached_and_keyed(base, tmp_path):
    p = finetune_lm(base, STYLE, "c", cache_dir=tmp_path, **KW)
    t = (p / "model.safetensors").stat().st_mtime_ns
    assert finetune_lm(base, STYLE, "c", cache_dir=tmp_path, **KW) == p
    assert (p / "model.safetensors").stat().st_mtime_ns == t  # not retrained
    assert finetune_lm(base, STYLE, "c", cache_dir=tmp_path, **{**KW, "lr": 1e-3}) != p
    assert finetune_lm(base, STYLE[::-1], "c", cache_dir=tmp_path, **KW) != p
    q = finetune_lm(base, STYLE, "c", cache_dir=tmp_path, force=True, **KW)
    assert q == p and (p / "model.safetensors").stat().st_mtime_ns != t
    assert not [x for x in p.parent.iterdir() if x.name.startswith(".")]  # no temp folders left
