"""The `gpu-smoke` profile: the gpu profile's code paths (hub ids from a local HF cache, bfloat16, long-context settings
scaled down) run end to end on a CPU-only machine with tiny per-experiment overrides from settings.ini."""
import json, os
from pathlib import Path
import nbformat, pytest
from tokexp.core import ConfigError, load_settings, read_json

# templates whose code depends on the profile (device, dtype, hub, max_context, [gpu:NAME] overrides); the tokenizer-only
# templates run the same code under every profile and are covered by their cpu runs
SMOKE = ["env_report", "reference_lms", "kv_pruning_quality", "importance_kernel_benchmark", "detector_benchmark",
         "membership_benchmark", "watermark_benchmark", "encoder_pruning", "kv_long_context", "alignment_shift",
         "lm_inversion", "selfcheck", "output_signatures", "sparse_attention_benchmark"]

def test_overrides_from(tmp_path, monkeypatch):
    "A profile with `overrides_from = cpu` takes [cpu:NAME] first, then its own [profile:NAME]; unknown bases are refused."
    (tmp_path/"nbs"/"experiments").mkdir(parents=True)
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "python3", "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell("a: int = 1  # a\nb: int = 1  # b\nc: int = 1  # c\noutput_dir: str = ''  # runner",
                                          metadata={"tags": ["parameters"]})]
    nbformat.write(nb, tmp_path/"nbs"/"experiments"/"t.ipynb")
    (tmp_path/"settings.ini").write_text("[DEFAULT]\nseed = 0\nreports_dir = reports\n[cpu]\ndevice = cpu\n[cpu:t]\na = 2\nb = 2\n"
                                         "[smoke]\ndevice = cpu\noverrides_from = cpu\n[smoke:t]\nb = 3\n"
                                         "[bad]\noverrides_from = cpu, tpu\n[plain]\ndevice = cpu\n")
    monkeypatch.setenv("TOKEXP_ROOT", str(tmp_path))
    from tokexp.report import resolve_parameters
    p = resolve_parameters("t", profile="smoke")
    assert (p["a"], p["b"], p["c"]) == (2, 3, 1)
    assert resolve_parameters("t", {"a": 5}, profile="smoke")["a"] == 5
    p = resolve_parameters("t", profile="plain")
    assert (p["a"], p["b"], p["c"]) == (1, 1, 1)  # no base: the cpu sections do not leak into other profiles
    with pytest.raises(ConfigError, match="unknown profile 'tpu'"): resolve_parameters("t", profile="bad")

def test_profile_is_the_gpu_path():
    st = load_settings(); smoke, gpu = st.profile("gpu-smoke"), st.profile("gpu")
    assert smoke["hub"] is True and gpu["hub"] is True and smoke["dtype"] == gpu["dtype"] == "bfloat16"
    assert smoke["offline"] is True and smoke["device"] == "cpu" and smoke["max_context"] <= 256 < gpu["max_context"]
    from tokexp.report import list_experiments, resolve_parameters
    for n in list_experiments(): resolve_parameters(n, profile="gpu-smoke")  # every template resolves (sections name real parameters)

@pytest.fixture(scope="module")
def smoke_env(tmp_path_factory):
    "Reference LMs in a temporary HF hub cache as hf:tokexp/<name>, offline, and an isolated reports folder."
    from tokexp.lm import export_to_hub_cache, train_lm
    home = tmp_path_factory.mktemp("hf_home"); reports = tmp_path_factory.mktemp("reports")
    for n in ("ref-small", "ref-small-s2", "ref-llama"):
        train_lm(n, progress=False)  # a fresh clone has not trained them yet (cached after the first time)
        export_to_hub_cache(n, cache_dir=home/"hub")
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "TOKEXP_REPORTS_DIR": str(reports)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # inherited by the report kernels papermill starts
    yield reports
    for k, v in old.items():
        if v is None: os.environ.pop(k, None)
        else: os.environ[k] = v

@pytest.mark.parametrize("name", SMOKE)
def test_gpu_smoke(smoke_env, name):
    from tokexp.report import run_experiment
    r = run_experiment(name, profile="gpu-smoke", progress=False)
    assert r.status == "ok", r.error[-3000:]
    run = read_json(r.path/"run.json")
    assert run["profile"] == "gpu-smoke"
    m = read_json(r.path/"metrics.json")
    assert m and any(not k.startswith("_") for k in m)
    if name == "reference_lms":
        assert run["parameters"]["models"] == ["hf:tokexp/ref-small", "hf:tokexp/ref-llama"]
        assert "hf:tokexp/ref-small" in json.dumps(m)
    if name == "kv_pruning_quality":
        assert run["parameters"]["hub_models"] == ["hf:tokexp/ref-llama"]
        assert "hf:tokexp/ref-llama" in json.dumps(m)
