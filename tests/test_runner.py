"""End-to-end checks of the papermill runner: CLI errors, reuse, failures, interruption."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import nbformat, pytest
from conftest import ROOT, BIN

def tokexp(*args, env=None, **kw):
    return subprocess.run([str(BIN/"tokexp"), *args], capture_output=True, text=True, cwd="/", env=env, **kw)

def template(tmp_path, name, body, params="profile: str = 'cpu'  # run profile\noutput_dir: str = ''  # set by the runner"):
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell(params); p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    path = tmp_path/f"{name}.ipynb"; nbformat.write(nb, path); return path

def test_unknown_experiment_and_profile(reports_tmp):
    r = tokexp("run", "env_reprot")
    assert r.returncode == 2 and "Did you mean 'env_report'" in r.stderr and "Valid experiments" in r.stderr
    r = tokexp("run", "env_report", "--profile", "tpu")
    assert r.returncode == 2 and "Valid profiles: cpu, gpu" in r.stderr
    assert not reports_tmp.exists() or not any(reports_tmp.rglob("metrics.json"))

def test_bad_parameters_refused_before_execution(reports_tmp):
    r = tokexp("run", "env_report", "-p", "no_such_param", "1")
    assert r.returncode == 2 and "does not declare" in r.stderr and "no_such_param" in r.stderr
    r = tokexp("run", "env_report", "-p", "seed", "abc")
    assert r.returncode == 2 and "parameter 'seed' expects int" in r.stderr
    assert not reports_tmp.exists() or not any(reports_tmp.iterdir())

def test_run_reuse_and_metadata(reports_tmp):
    r = tokexp("run", "env_report", "--quiet", "-p", "matmul_sizes", "[32, 64]")
    assert r.returncode == 0, r.stderr
    runs = [p for p in (reports_tmp/"env_report").iterdir()]
    assert len(runs) == 1 and runs[0].name.startswith("cpu-")
    m = json.loads((runs[0]/"metrics.json").read_text())
    assert m["_run"]["profile"] == "cpu" and m["_run"]["seed"] == 1234 and m["_run"]["environment"]["packages"]["torch"]
    assert m["_run"]["parameters"]["matmul_sizes"] == [32, 64]
    from tokexp.core import project_root, sha256_file
    lock = m["_run"]["environment"]["lock"]  # the report names the lock it was installed from
    assert lock["sha256"] == sha256_file(project_root()/"requirements.lock") and lock["packages"] > 100
    assert m["lock_sha256"] == lock["sha256"] and lock["mismatches"] == {}, lock["mismatches"]
    nb = nbformat.read(runs[0]/"env_report.ipynb", as_version=4)
    assert nb.metadata["tokexp"]["run_id"] == runs[0].name and "papermill" in nb.metadata
    r2 = tokexp("run", "env_report", "--quiet", "-p", "matmul_sizes", "[32, 64]")
    assert r2.returncode == 0 and "reused" in r2.stderr
    r3 = tokexp("run", "env_report", "--quiet", "-p", "matmul_sizes", "[32, 64]", "--force")
    assert r3.returncode == 0 and "[    ok]" in r3.stderr

def test_failure_is_reported_and_others_continue(reports_tmp, tmp_path):
    from tokexp.report import run_experiments
    bad = template(tmp_path, "boom", "raise RuntimeError('deliberate failure')")
    good = template(tmp_path, "fine", "from tokexp.report import save_metrics\nsave_metrics(output_dir, {'x': 1})")
    res = run_experiments([str(bad), str(good)], progress=False)
    assert [r.status for r in res] == ["failed", "ok"]
    assert "deliberate failure" in res[0].error and res[0].path.name.endswith(".failed")
    assert not (reports_tmp/"boom").glob("cpu-*[!d]") or all(p.name.endswith(".failed") for p in (reports_tmp/"boom").iterdir())
    assert json.loads((res[1].path/"metrics.json").read_text())["x"] == 1

def test_missing_metrics_is_a_failure(reports_tmp, tmp_path):
    from tokexp.report import run_experiment
    r = run_experiment(str(template(tmp_path, "nometrics", "x = 1")), progress=False)
    assert r.status == "failed" and "metrics.json" in r.error

def test_interrupt_leaves_nothing_finished(reports_tmp, tmp_path):
    slow = template(tmp_path, "slow", "import time\ntime.sleep(60)\nfrom tokexp.report import save_metrics\nsave_metrics(output_dir, {'x': 1})")
    code = f"from tokexp.report import run_experiment; run_experiment({str(slow)!r}, progress=False)"
    p = subprocess.Popen([sys.executable, "-c", code], env={**os.environ}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not any((reports_tmp/"slow").glob(".*.tmp")): time.sleep(0.5)
    time.sleep(4)
    p.send_signal(signal.SIGINT); p.wait(timeout=60)
    assert p.returncode != 0
    left = list((reports_tmp/"slow").iterdir()) if (reports_tmp/"slow").exists() else []
    assert not any((d/"metrics.json").exists() for d in left), left
    assert not any(d.name.endswith(".tmp") for d in left), left

def test_papermill_cli_sees_parameters():
    r = subprocess.run([str(BIN/"papermill"), "--help-notebook", str(ROOT/"nbs/experiments/env_report.ipynb")], capture_output=True, text=True)
    assert r.returncode == 0 and "check_hub" in r.stdout and "matmul_sizes" in r.stdout

def test_every_template_has_one_typed_parameters_cell():
    from tokexp.report import list_experiments, template_parameters
    for name in list_experiments():
        ps = template_parameters(name)
        assert "output_dir" in ps and "profile" in ps, name
        assert all(p.help for p in ps.values()), f"{name}: every parameter needs a comment"


def test_report_outputs_carry_no_progress_bars_or_warnings(reports_tmp):
    "A report executed by the runner has no stderr output (tqdm / hub loading bars, library advisories) in any cell."
    import nbformat
    from tokexp.report import run_experiment
    # (checked to fail without tokexp.report.REPORT_ENV: two cells then carry tqdm widget bars)
    r = run_experiment("encoder_pruning", {"methods": ["random", "tome"], "fractions": [0.5], "n_queries": 8,
                                           "n_distractors": 8, "batch_size": 8}, progress=False)
    assert r.ok, r.error
    nb = nbformat.read(r.path/"encoder_pruning.ipynb", as_version=4)
    noise = [(i, "".join(o.get("text", ""))[:120]) for i, c in enumerate(nb.cells) if c.cell_type == "code"
             for o in c.get("outputs", []) if o.get("output_type") == "stream" and o.get("name") == "stderr"
             or "application/vnd.jupyter.widget-view+json" in o.get("data", {})]  # a notebook progress bar
    assert noise == [], noise


# --- reports read as reports (issue #12) ----------------------------------------------------------------------------

def test_metrics_schema_travels_and_bad_schemas_fail(reports_tmp, tmp_path):
    "save_metrics(meta=...) writes a _schema block (unit + meaning per headline key); a time not named *_s fails the run."
    from tokexp.report import run_experiment, describe_metrics
    good = template(tmp_path, "schema_ok", "from tokexp.report import save_metrics\n"
                    "save_metrics(output_dir, {'auroc': 0.75, 'fit': {'train_s': 2.0}, 'n': 3},\n"
                    "             meta={'auroc': ('fraction', 'AUROC of x'), 'fit.train_s': ('s', 'training time')});")
    r = run_experiment(str(good), progress=False)
    assert r.ok, r.error
    m = json.loads((r.path/"metrics.json").read_text())
    assert m["_schema"] == {"auroc": {"unit": "fraction", "meaning": "AUROC of x"}, "fit.train_s": {"unit": "s", "meaning": "training time"}}
    d = describe_metrics(r.path/"metrics.json")
    assert d.key.tolist() == ["auroc", "fit.train_s"] and d.value.tolist() == [0.75, 2.0] and d.unit.tolist() == ["fraction", "s"]
    run = json.loads((r.path/"run.json").read_text())
    assert run["wall_s"] > 0 and "seconds" not in run  # the runner's own times follow the *_s scheme
    bad = template(tmp_path, "schema_bad", "from tokexp.report import save_metrics\n"
                   "save_metrics(output_dir, {'auroc': 0.75, 'train_seconds': 3.0}, meta={'auroc': ('fraction', 'x')})")
    r2 = run_experiment(str(bad), progress=False)
    assert r2.status == "failed" and "train_seconds" in r2.error and "*_s" in r2.error
    typo = template(tmp_path, "schema_typo", "from tokexp.report import save_metrics\n"
                    "save_metrics(output_dir, {'auroc': 0.75}, meta={'aurc': ('fraction', 'x')})")
    r3 = run_experiment(str(typo), progress=False)
    assert r3.status == "failed" and "'aurc' is not in the metrics" in r3.error


# Tiny parameters for each template restructured to the report convention (parameters; quiet compute; ## Findings in
# words; figures; tables; ## Method; save_metrics with a schema).
REPORTS_SMALL = {
    "env_report": dict(matmul_sizes=[32]),
    "tokenizer_zoo": dict(tokenizers=["gpt2", "llama-2"], paras_per_language=1, bench_names=["cl100k_base"], bench_bytes=20000, bench_repeats=1),
    "vocab_audit": dict(tokenizers=["gpt2", "bert-minilm"], roundtrip_sample=300),
    "digit_chunking": dict(tokenizers=["cl100k_base", "llama-2"], max_digits=6, n_per_length=10),
    "tokenizer_parity": dict(tokenizers=["gpt2", "cl100k_base"], articles=2, n_boot=100, bench_repeats=1),
    "mixture_inference": dict(langs=["en", "de", "ru"], n_trials=1, train_bytes=200_000, n_merges=60, sample_bytes=30_000,
                              real_tokenizers=["gpt2"], real_max_bytes=20_000),
    "importance_kernel_benchmark": dict(nks=[64, 128], repeats=1),
    "sparse_attention_benchmark": dict(ns=[256, 512], fracs=[0.05, 0.2], repeats=1, heads=[4, 2], head_dim=32),
    "reference_lms": dict(models=["ref-small"], max_steps=20, n_eval=8, n_samples=1, sample_tokens=8, bench_texts=4),
    "membership_benchmark": dict(max_steps=20, domains=["fortunes"], n_per_class=30, ref_steps=10, freq_chars=30000,
                                 overfit_members=20, overfit_steps=20, n_boot=100),
    "detector_benchmark": dict(lm_steps=20, domains=["fortunes"], n_per_domain=24, decodings=["greedy", "top_p_0.9"],
                               attacks=["char_noise"], pairs=["ref-small+ref-small-s2"], n_boot=100, dna_gpt_n=4, bench_texts=4),
}
TIME_WORDS = ("second", "seconds", "secs", "time", "duration", "elapsed")

@pytest.mark.parametrize("name", list(REPORTS_SMALL))
def test_report_reads_as_report(name, reports_tmp):
    "Findings first and in words, no noise (stderr, bare reprs, raw dumps), parameter cells hidden on the site, a metrics schema."
    from tokexp.report import run_experiment
    r = run_experiment(name, REPORTS_SMALL[name], progress=False)
    assert r.ok, r.error
    nb = nbformat.read(r.path/f"{name}.ipynb", as_version=4)
    cells = nb.cells
    md = [(i, c.source.strip()) for i, c in enumerate(cells) if c.cell_type == "markdown"]
    assert md[0][0] == 0 and md[0][1].startswith("# "), "a report opens with its title"
    heads = {s.splitlines()[0]: i for i, s in md if s.startswith("## ")}
    assert "## Findings" in heads and "## Method" in heads and heads["## Findings"] < heads["## Method"], heads
    f = heads["## Findings"]
    words = [o for o in cells[f + 1].get("outputs", []) if "text/markdown" in o.get("data", {})]
    assert cells[f + 1].cell_type == "code" and words, "the Findings heading is followed by findings rendered in words"
    text = "".join(words[0]["data"]["text/markdown"])
    assert len(text) > 200 and any(ch.isdigit() for ch in text), text[:300]
    for i, c in enumerate(cells):
        if c.cell_type != "code": continue
        tags = c.metadata.get("tags", [])
        if {"parameters", "injected-parameters"} & set(tags): assert "remove-cell" in tags, (i, tags)
        for o in c.get("outputs", []):
            data = o.get("data", {})
            assert o.get("output_type") != "stream", (i, "".join(o.get("text", ""))[:200])  # no prints, warnings or bars
            assert o.get("output_type") != "error", (i, o.get("evalue"))
            assert set(data) & {"text/html", "text/markdown", "image/png"}, (i, str(data.get("text/plain", ""))[:200])  # no bare reprs
            plain = "".join(data.get("text/plain", ""))
            assert "PosixPath(" not in plain and "Styler at 0x" not in plain, (i, plain[:200])
            if i < f: assert not data, (i, "compute cells before the findings must be quiet", list(data))
            if "text/html" in data and "<table" in "".join(data["text/html"]):
                assert "row_heading" not in "".join(data["text/html"]), (i, "a table with its meaningless index")
    assert "save_metrics(" in [c for c in cells if c.cell_type == "code"][-1].source, "the report ends with save_metrics"
    m = json.loads((r.path/"metrics.json").read_text())
    assert m.get("_schema"), "metrics.json describes its headline keys"
    for k, v in m["_schema"].items():
        x = m
        for part in k.split("."): x = x[int(part)] if isinstance(x, list) else x[part]  # every documented key exists
        assert v["unit"] and v["meaning"] and "\n" not in v["meaning"], (k, v)
    def keys(d, pre=""):
        for k, v in (d.items() if isinstance(d, dict) else []):
            yield f"{pre}{k}"; yield from keys(v, f"{pre}{k}.")
    bad = [k for k in keys({k: v for k, v in m.items() if not k.startswith("_")})
           if any(k.split(".")[-1].endswith(w) for w in TIME_WORDS) and "per_" not in k.split(".")[-1]]
    assert bad == [], f"times must be named *_s: {bad}"


def test_cli_progress_bar_carries_no_kernel_log(reports_tmp, tmp_path):
    "ipykernel's own log (its 'running over TCP without encryption' warning) stays out of `tokexp run`'s progress bar."
    t = template(tmp_path, "quiet_kernel", "from tokexp.report import save_metrics\nsave_metrics(output_dir, {'x': 1});")
    r = tokexp("run", str(t))
    assert r.returncode == 0, r.stderr
    assert "Executing" in r.stderr and "IPKernelApp" not in r.stderr and "TCP" not in r.stderr, r.stderr[-1500:]
