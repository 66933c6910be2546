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
        index = build_site(tmp/"_site", engine="sphinx", notebooks=r"^00_core\.ipynb$")  # one API page keeps the build short
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
    assert "Environment and asset report" in r.stdout and "Compute check" in r.stdout and "Findings" in r.stdout
    assert "<img" in r.stdout, "the report's plot is missing"
    api = chromium(tmp, "--dump-dom", f"file://{index.parent/'api'/'00_core.html'}").stdout
    assert "Registry" in api and "atomic_write" in api


PROBE = """<script>(function () {
  var h = Array.from(document.querySelectorAll('h2')).find(function (e) { return e.textContent.trim().indexOf('Findings') === 0; });
  var sec = h ? h.closest('section') : null, p = sec ? sec.querySelector('div.cell_output p') : null;
  var inputs = Array.from(document.querySelectorAll('div.cell_input'));
  var body = document.body.cloneNode(true);
  body.querySelectorAll('script').forEach(function (s) { s.remove(); });  // this probe's own source names the strings
  var text = body.textContent, y = window.scrollY;
  var r = {vh: window.innerHeight, findings_top: h ? h.getBoundingClientRect().top + y : -1,
           para_bottom: p ? p.getBoundingClientRect().bottom + y : -1, para: p ? p.textContent.slice(0, 80) : '',
           inputs: inputs.length, inputs_shown: inputs.filter(function (e) { var d = e.closest('details');
             return (!d || d.open) && (e.checkVisibility ? e.checkVisibility() : e.getBoundingClientRect().height > 0); }).length,
           folds: document.querySelectorAll('details.hide.above-input').length,
           tables: document.querySelectorAll('div.cell_output table').length,
           tables_cut: Array.from(document.querySelectorAll('div.cell_output table')).filter(function (t) {  // sticks out on the right
             return t.getBoundingClientRect().right > t.closest('article').getBoundingClientRect().right + 1; }).length,
           params_shown: text.indexOf('matmul_sizes: list') >= 0 || text.indexOf('# Parameters') >= 0 || text.indexOf('check_hub: bool') >= 0};
  var pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(r); document.body.appendChild(pre);
})();</script>"""

def probe(tmp, page, size=(1200, 900)):
    "Layout facts of a built page, measured by a script run in headless Chromium (a copy of the page beside it)."
    import html as _html, json, re
    copy = page.with_name(f"_probe_{page.name}")
    copy.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    try: r = chromium(tmp, f"--window-size={size[0]},{size[1]}", "--virtual-time-budget=3000", "--dump-dom", f"file://{copy}")
    finally: copy.unlink()
    m = re.search(r'<pre id="probe">(.*?)</pre>', r.stdout, re.S)
    assert m, r.stderr[-2000:]
    return json.loads(_html.unescape(m.group(1)))

def test_report_page_opens_with_findings_and_folds_code(site):
    "The first screen of a report shows its findings; its code is folded, its parameter cells are not on the page."
    tmp, index, run = site
    page = index.parent/"reports"/"env_report"/run.run_id/"env_report.html"
    p = probe(tmp, page)
    assert p["vh"] >= 700, p  # the window (headless Chromium leaves some of the 900 px to its own frame)
    assert 0 < p["findings_top"] < p["para_bottom"] <= p["vh"], p  # heading and the first findings paragraph in the first screen
    assert "This machine" in p["para"], p
    assert p["inputs"] > 0 and p["inputs_shown"] == 0 and p["folds"] == p["inputs"], p  # every code input folded
    assert not p["params_shown"], p
    assert p["tables"] >= 3 and p["tables_cut"] == 0, p  # wide tables scroll inside the page instead of being cut off
    assert str(run.path) not in page.read_text(encoding="utf-8")  # papermill's injected cell named this machine path

def test_reports_index_links_and_titles(site):
    "The reports index names each experiment by its page title, links it to its page, and the sidebar uses that title."
    import re
    tmp, index, run = site
    idx = index.parent/"reports"/"index.html"
    html = idx.read_text(encoding="utf-8")
    rows = re.findall(r"<tr[^>]*>\s*<td[^>]*>(.*?)</td>", html, re.S)
    links = [re.search(r'href="([^"]+)"[^>]*>(?:<span[^>]*>)?([^<]+)', c) for c in rows]
    links = [(h, t.strip()) for h, t in (l.groups() for l in links if l)]
    assert links, rows
    for href, text in links:
        target = (idx.parent/href.split("#")[0]).resolve()
        assert target.exists(), href
        page = target.read_text(encoding="utf-8")
        h1 = re.search(r"<h1>(.*?)<a class=\"headerlink\"", page, re.S).group(1).strip()
        assert text == h1, (text, h1)
        side = re.findall(r'<a class="reference internal" href="[^"]*">([^<]+)</a>', page.split('class="sidebar-tree"', 1)[1].split("</nav>", 1)[0])
        assert h1 in side, (h1, side)
    assert any(t == "Environment and asset report" for _, t in links)
    assert re.search(r"peak_matmul_gflops <strong>[\d.,]+ GFLOP/s</strong>", html), "headline: documented keys with units"
    assert "What the headline numbers mean" in html and "best float32 square-matmul throughput" in html
