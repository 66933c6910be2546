"""hf:<org>/<name> loading exercised offline: the reference LMs written into a Hugging Face hub cache under a temporary
HF_HOME and loaded by hub id with HF_HUB_OFFLINE=1 (models, tokenizers, dtype, device map, the error for an absent name)."""
import json, os, subprocess, sys
from pathlib import Path
import pytest
from conftest import ROOT

SCRIPT = r'''
import json, os, torch, tokenizers, huggingface_hub
from tokexp.lm import export_to_hub_cache, load_lm, hub_cache_dir, lm_path, LMS, train_lm
from tokexp.tokenizers import load_tokenizer
from tokexp.core import AssetMissingError, ConfigError
out = {"cache": str(hub_cache_dir())}
text = "The quiet river runs past the old mill at night."
for n in ["ref-small", "ref-small-s2", "ref-llama"]:
    train_lm(n, progress=False)  # a fresh clone has not trained it yet (cached after the first time)
    snap = export_to_hub_cache(n)
    local, tl = load_lm(n)
    hub, th = load_lm(f"hf:tokexp/{n}")
    bf, _ = load_lm(f"hf:tokexp/{n}", dtype="bfloat16")
    ids = tl(text)["input_ids"]
    x = torch.tensor([[tl.bos_token_id] + ids])
    with torch.no_grad(): a, b, c = local(x).logits, hub(x).logits, bf(x).logits.float()
    ref = tokenizers.Tokenizer.from_file(str(lm_path(LMS[n]) / "tokenizer.json"))  # the file itself, no transformers
    out[n] = {"snapshot": str(snap), "max_diff": (a - b).abs().max().item(), "bf16_dtype": str(bf.dtype),
              "bf16_rel": ((a - c).abs().max() / a.abs().max()).item(), "name": hub.tokexp_name, "device": str(hub.device),
              "hub_ids": th(text)["input_ids"], "adapter_ids": list(load_tokenizer(f"hf:tokexp/{n}").encode(text)),
              "ref_ids": ref.encode(text, add_special_tokens=False).ids,
              "snapshot_download": huggingface_hub.snapshot_download(f"tokexp/{n}", local_files_only=True)}
info = huggingface_hub.scan_cache_dir(hub_cache_dir())  # the hub library's own reading of the cache layout
out["scan"] = {r.repo_id: sorted(f.file_name for rev in r.revisions for f in rev.files) for r in info.repos}
out["scan_warnings"] = [str(w) for w in info.warnings]
for name, call in {"absent_model": lambda: load_lm("hf:tokexp/absent"), "absent_tok": lambda: load_tokenizer("hf:tokexp/absent"),
                   "device_map": lambda: load_lm("hf:tokexp/ref-small", device_map="auto")}.items():
    try: call(); out[name] = None
    except (AssetMissingError, ConfigError) as e: out[name] = f"{type(e).__name__}: {e}"
print("RESULT" + json.dumps(out))
'''

@pytest.fixture(scope="module")
def hub_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf_home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT")][-1]
    return home, json.loads(line[6:])

@pytest.mark.parametrize("name", ["ref-small", "ref-small-s2", "ref-llama"])
def test_reference_lm_by_hub_id(hub_run, name):
    home, out = hub_run
    o = out[name]
    repo = home/"hub"/f"models--tokexp--{name}"
    rev = (repo/"refs"/"main").read_text()
    assert Path(o["snapshot"]) == repo/"snapshots"/rev == Path(o["snapshot_download"])
    for f in Path(o["snapshot"]).iterdir():  # snapshot entries are relative links into blobs/, as the hub writes them
        assert f.is_symlink() and not os.path.isabs(os.readlink(f)) and f.resolve().parent == (repo/"blobs").resolve()
    assert o["max_diff"] <= 1e-6 and o["name"] == f"hf:tokexp/{name}" and o["device"] == "cpu"
    assert o["bf16_dtype"] == "torch.bfloat16" and 0 < o["bf16_rel"] < 0.05
    assert o["hub_ids"] == o["adapter_ids"] == o["ref_ids"] and len(o["ref_ids"]) > 5
    assert sorted(out["scan"][f"tokexp/{name}"]) == sorted(p.name for p in Path(o["snapshot"]).iterdir())
    assert "model.safetensors" in out["scan"][f"tokexp/{name}"] and "train_log.json" not in out["scan"][f"tokexp/{name}"]

def test_cache_layout_and_errors(hub_run):
    home, out = hub_run
    assert out["cache"] == str(home/"hub") and out["scan_warnings"] == []
    assert "AssetMissingError" in out["absent_model"] and "'tokexp/absent'" in out["absent_model"] and "offline mode" in out["absent_model"]
    assert "AssetMissingError" in out["absent_tok"] and "not in the local HF cache" in out["absent_tok"]
    assert "ConfigError" in out["device_map"] and "accelerate" in out["device_map"]
