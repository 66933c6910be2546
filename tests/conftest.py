import os, sys
from pathlib import Path

# Triton kernels are checked on CPU-only machines through Triton's interpreter, which must be chosen before triton is
# first imported in the process (any test module may import it): decide here, once, before collection.
if not (os.path.exists("/dev/nvidia0") or os.environ.get("CUDA_VISIBLE_DEVICES")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

@pytest.fixture
def reports_tmp(tmp_path, monkeypatch):
    "An isolated reports folder for runner/site tests (the real reports/ is never touched)."
    d = tmp_path/"reports"
    monkeypatch.setenv("TOKEXP_REPORTS_DIR", str(d))
    return d

@pytest.fixture(scope="module")
def one_torch_thread():
    "One torch thread for a test module: small CPU models train many times faster without intra-op threads on a shared, oversubscribed machine (restored after)."
    import torch
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def reads_as_report(nb_path):
    "The report convention: title, quiet compute cells, ## Findings in words before ## Method, no streams or bare reprs, ends with save_metrics."
    import nbformat
    cells = nbformat.read(nb_path, as_version=4).cells
    md = [(i, c.source.strip()) for i, c in enumerate(cells) if c.cell_type == "markdown"]
    assert md[0][0] == 0 and md[0][1].startswith("# ")
    heads = {s.splitlines()[0]: i for i, s in md if s.startswith("## ")}
    f = heads["## Findings"]
    assert f < heads["## Method"]
    assert any("text/markdown" in o.get("data", {}) for o in cells[f + 1].get("outputs", []))
    for i, c in enumerate(cells):
        if c.cell_type != "code": continue
        if "parameters" in c.metadata.get("tags", []): assert "remove-cell" in c.metadata["tags"]
        for o in c.get("outputs", []):
            assert o.get("output_type") not in ("stream", "error"), (i, o)
            assert set(o.get("data", {})) & {"text/html", "text/markdown", "image/png"}, (i, o)
            if i < f: assert not o.get("data"), (i, "compute cells before the findings must be quiet")
    assert "save_metrics(" in [c for c in cells if c.cell_type == "code"][-1].source

def tiny_lm(arch, impl="sdpa", layers=2, seed=0, vocab=97):
    "A small random GPT-2 or Llama (GQA) model for the KV-cache tests."
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_positions=256, n_embd=64, n_layer=layers, n_head=4, initializer_range=0.2,
                         bos_token_id=0, eos_token_id=None, pad_token_id=0)
    else:
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
                          bos_token_id=0, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()
