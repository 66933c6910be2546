"""Sweeps end to end: the serial and Ray executors agree, a killed Ray worker's task is retried, a finished sweep is
reused, a failing combination leaves the others, and the command line."""
import json, os, signal, subprocess, threading, time
from pathlib import Path
import nbformat, pytest
from conftest import BIN
from tokexp.core import ConfigError, read_json
from tokexp.sweep import run_sweep, sweep_path, RayExecutor

PARAMS = "a: int = 1  # a number\nb: float = 0.5  # a scale\nseed: int = 0  # seed\nmarker: str = ''  # kill test only\noutput_dir: str = ''  # runner"
BODY = """import os, pathlib, time, numpy as np
from tokexp.report import save_metrics
if marker and (a, b) == (2, 0.5):  # the first attempt of one combination waits to be killed with its worker
    m = pathlib.Path(marker)
    if not m.exists():
        m.write_text(f"{os.getppid()} {os.getpid()}"); time.sleep(300)
assert a != 3, "a=3 is refused"
x = np.random.default_rng(seed + 1000 * a).normal(size=1000) * b
save_metrics(output_dir, {"mean": float(x.mean()), "std": float(x.std()), "ab": a * b, "ppid": os.getppid(), "nested": {"ab2": 2 * a * b}})
"""

@pytest.fixture
def tpl(tmp_path):
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "python3", "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell(PARAMS, metadata={"tags": ["parameters"]}), nbformat.v4.new_code_cell(BODY)]
    p = tmp_path/"tiny.ipynb"; nbformat.write(nb, p); return str(p)

def metrics(root, rec):
    return [{k: v for k, v in read_json(root/r["path"]/"metrics.json").items() if k not in ("_run", "_schema", "ppid")}
            for r in rec["runs"]]

def test_ray_matches_serial(tpl, tmp_path, monkeypatch):
    grid = {"a": [1, 2], "b": [0.5, 2.0]}
    monkeypatch.setenv("TOKEXP_REPORTS_DIR", str(tmp_path/"serial"))
    ser = run_sweep(tpl, grid, executor="serial", progress=False)
    monkeypatch.setenv("TOKEXP_REPORTS_DIR", str(tmp_path/"ray"))
    ray_ = run_sweep(tpl, grid, executor="ray", max_parallel=2, progress=False)  # a local Ray started and stopped here
    import ray; assert not ray.is_initialized()
    assert ser["status"] == ray_["status"] == "ok" and ray_["executor"] == "ray"
    assert [r["run_id"] for r in ser["runs"]] == [r["run_id"] for r in ray_["runs"]]
    assert [r["values"] for r in ray_["runs"]] == [{"a": a, "b": b} for a in (1, 2) for b in (0.5, 2.0)]
    assert metrics(tmp_path/"serial", ser) == metrics(tmp_path/"ray", ray_)
    assert [{k: v for k, v in r.items() if k != "ppid"} for r in ser["table"]] == \
           [{k: v for k, v in r.items() if k != "ppid"} for r in ray_["table"]]
    ppids = {r["ppid"] for r in ray_["table"]}  # the kernels' parents: the Ray workers, two of them, not this process
    assert os.getpid() not in ppids and len(ppids) == 2, ppids
    assert {r["ppid"] for r in ser["table"]} == {os.getpid()}
    assert (tmp_path/"ray"/"tiny"/f"sweep-{ray_['sweep_id']}.png").exists()

@pytest.fixture(scope="module")
def local_ray():
    import ray
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()

def test_killed_worker_is_retried(tpl, tmp_path, monkeypatch, local_ray):
    monkeypatch.setenv("TOKEXP_REPORTS_DIR", str(tmp_path/"reports"))
    marker = tmp_path/"first-attempt"
    def killer():
        while not marker.exists(): time.sleep(0.2)
        time.sleep(0.5); worker, kernel = map(int, marker.read_text().split())
        os.kill(worker, signal.SIGKILL)
        time.sleep(5)
        try: os.kill(kernel, signal.SIGKILL)  # the orphaned kernel normally exits with its parent; make sure
        except ProcessLookupError: pass
    th = threading.Thread(target=killer, daemon=True); th.start()
    rec = run_sweep(tpl, {"a": [1, 2]}, {"marker": str(marker)}, executor="ray", max_parallel=2, progress=False)
    th.join(timeout=30)
    assert rec["status"] == "ok", rec["runs"]
    killed_worker = int(marker.read_text().split()[0])
    row = rec["table"][1]
    assert row["a"] == 2 and row["ppid"] != killed_worker  # finished by another worker after the retry
    assert local_ray.is_initialized()  # an existing Ray is joined, not shut down

def test_gpu_profile_refused_on_cluster_without_gpu(tpl, tmp_path, monkeypatch, local_ray):
    monkeypatch.setenv("TOKEXP_REPORTS_DIR", str(tmp_path/"reports"))
    with pytest.raises(ConfigError, match="asks for a GPU, but the Ray cluster has 0"):
        run_sweep(tpl, {"a": [1, 2]}, profile="gpu", executor="ray", progress=False)

def test_rerun_reuses_and_failure_leaves_others(tpl, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKEXP_REPORTS_DIR", str(tmp_path/"reports"))
    first = run_sweep(tpl, {"a": [1, 3, 2]}, executor="serial", progress=False)
    assert [r["status"] for r in first["runs"]] == ["ok", "failed", "ok"] and first["status"] == "failed"
    assert first["runs"][1]["path"].endswith(".failed") and "a=3 is refused" in first["runs"][1]["error"]
    assert (tmp_path/"reports"/first["runs"][1]["path"]/"error.json").exists()
    assert [r["ab"] for r in first["table"] if "ab" in r] == [0.5, 1.0]
    ok = run_sweep(tpl, {"a": [1, 2]}, executor="serial", progress=False)
    assert [r["status"] for r in ok["runs"]] == ["reused", "reused"] and ok["status"] == "ok"
    again = run_sweep(tpl, {"a": [1, 2]}, executor="serial", progress=False)
    assert again["sweep_id"] == ok["sweep_id"] and [r["status"] for r in again["runs"]] == ["reused", "reused"]
    assert read_json(sweep_path(again))["counts"] == {"ok": 0, "reused": 2, "failed": 0}
    forced = run_sweep(tpl, {"a": [1]}, executor="serial", force=True, progress=False)
    assert forced["runs"][0]["status"] == "ok"

def test_nested_metric(tpl, tmp_path, monkeypatch):
    "A dotted --metric reaches a nested number of metrics.json; a key no run has is refused with the ones that exist."
    monkeypatch.setenv("TOKEXP_REPORTS_DIR", str(tmp_path/"reports"))
    rec = run_sweep(tpl, {"a": [1, 2]}, {"b": 1.5}, executor="serial", metric="nested.ab2", progress=False)
    assert rec["metric"] == "nested.ab2" and [r["nested.ab2"] for r in rec["table"]] == [3.0, 6.0]
    assert (tmp_path/"reports"/"tiny"/rec["plot"]).exists()
    with pytest.raises(ConfigError, match="nested.nope"):
        run_sweep(tpl, {"a": [1, 2]}, {"b": 1.5}, executor="serial", metric="nested.nope", progress=False)

def test_cli(tpl, tmp_path):
    env = {**os.environ, "TOKEXP_REPORTS_DIR": str(tmp_path/"reports")}
    run = lambda *a: subprocess.run([str(BIN/"tokexp"), "sweep", *a], capture_output=True, text=True, env=env, cwd="/")
    r = run(tpl, "-p", "a", "[1, 2]", "-p", "b", "[0.5, 1.0]", "--zip", "--set", "seed", "3", "--executor", "serial", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "2/2 combinations finished" in r.stderr
    rec = read_json(next((tmp_path/"reports"/"tiny").glob("sweep-*.json")))
    assert [r_["values"] for r_ in rec["runs"]] == [{"a": 1, "b": 0.5}, {"a": 2, "b": 1.0}] and rec["fixed"]["seed"] == 3
    r = run(tpl, "-p", "a", "[1, two]", "--executor", "serial")
    assert r.returncode == 2 and "parameter 'a' expects int" in r.stderr
    r = run(tpl, "-p", "a", "[1, 2]", "-p", "b", "[1.0]", "--zip", "--executor", "serial")
    assert r.returncode == 2 and "one length" in r.stderr
    r = run(tpl, "-p", "a", "[3]", "--executor", "serial", "--quiet")
    assert r.returncode == 1 and "0/1 combinations finished" in r.stderr and "a=3 is refused" in r.stderr

def test_sweep_page_on_site(tpl, tmp_path, monkeypatch):
    from tokexp.site import build_site
    monkeypatch.setenv("TOKEXP_REPORTS_DIR", str(tmp_path/"reports"))
    rec = run_sweep(tpl, {"a": [1, 2], "b": [0.5, 2.0]}, executor="serial", progress=False, metric="ab")
    index = build_site(tmp_path/"site", tmp_path/"reports", notebooks=r"^52_sweep\.ipynb$")
    page = index.parent/"reports"/"sweeps"/f"tiny-{rec['sweep_id']}.html"
    html = page.read_text()
    assert f"tiny-{rec['sweep_id']}.png" in html and (page.parent/f"tiny-{rec['sweep_id']}.png").exists() or \
           any(p.name.startswith(f"tiny-{rec['sweep_id']}") for p in (index.parent/"_images").iterdir())
    for a in (1, 2):
        for b in (0.5, 2.0): assert f"<td><p>{a * b:.4g}</p></td>" in html or f"<td>{a * b:.4g}</td>" in html
    assert html.count(".html\"") >= 4  # each combination links to its executed report
    assert f"reports/sweeps/tiny-{rec['sweep_id']}.html" in index.read_text()
