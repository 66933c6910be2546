"""Build the site offline and check it in headless Chromium: index and a report render, no broken internal links."""
import os, shutil, subprocess
from pathlib import Path
import numpy as np, pytest
from conftest import ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars"]

def chromium(tmp, *args):
    assert CHROMIUM, "chromium is required for the site test (apt-get install chromium; .ci/run and `make env` install it)"
    r = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp}/profile", *args], capture_output=True, text=True, timeout=120)
    return r

@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("site")
    os.environ["TOKEXP_REPORTS_DIR"] = str(tmp/"reports")
    try:
        from tokexp.report import run_experiment
        from tokexp.site import build_site
        r = run_experiment("env_report", {"matmul_sizes": [32]}, progress=False)
        assert r.ok, r.error
        index = build_site(tmp/"_site", engine="sphinx")
    finally:
        del os.environ["TOKEXP_REPORTS_DIR"]
    return tmp, index, r

def test_site_files_and_links(site):
    from tokexp.site import broken_links
    tmp, index, run = site
    assert index.exists()
    html = index.read_text()
    assert "API" in html and "Reports" in html and "core" in html
    assert (index.parent/"api"/"00_core.html").exists()
    assert broken_links(index.parent) == []

def test_index_renders_in_chromium(site):
    tmp, index, _ = site
    r = chromium(tmp, "--dump-dom", f"file://{index}")
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    for text in ("tokexp", "Foundation", "Reports", "core"): assert text in dom, text
    shot = tmp/"index.png"
    r = chromium(tmp, f"--screenshot={shot}", "--window-size=1200,900", f"file://{index}")
    assert shot.exists(), r.stderr[-2000:]
    import matplotlib.image as mpimg
    img = mpimg.imread(shot)
    assert img.shape[0] > 100 and float(np.std(img[..., :3])) > 0.02, "screenshot is blank"

def test_report_page_renders_with_plot(site):
    tmp, index, run = site
    pages = list(index.parent.glob(f"reports/env_report/{run.run_id}/env_report.html"))
    assert pages, sorted(str(p.relative_to(index.parent)) for p in index.parent.rglob("*.html"))
    r = chromium(tmp, "--dump-dom", f"file://{pages[0]}")
    assert r.returncode == 0
    assert "Environment and asset report" in r.stdout and "Compute check" in r.stdout
    assert "<img" in r.stdout, "the report's plot is missing"
    api = chromium(tmp, "--dump-dom", f"file://{index.parent/'api'/'00_core.html'}").stdout
    assert "Registry" in api and "atomic_write" in api
