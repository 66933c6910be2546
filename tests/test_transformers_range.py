"""The declared transformers range is tested at its floor too (issue #10).

`prune.policies` hooks transformers internals (the cache keyword of `forward`, cache layer objects), which change
between releases: 5.24 renamed `past_key_values` to `cache`. The venv holds the locked (newest) version; this test
installs the floor of the range declared in pyproject.toml — the oldest 5.x release that imports with the other
locked packages (tokenizers 0.23.3, huggingface-hub 2.4.0: 5.17.0 refuses hub 2.x at import, 5.18.0 is the first that
accepts it) — into a cache folder and runs `tests/test_prune_policies.py` against it in a subprocess.

The install is cached under data/cache/ (gitignored), keyed by version, and written atomically (a temporary folder
renamed into place), so an interrupted install is never reused. The test skips only when the package registry
cannot be reached.
"""
import os, re, shutil, subprocess, sys, tempfile, tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLOOR = "5.18.0"  # oldest 5.x release that imports with the locked tokenizers/huggingface-hub (see the docstring)
CACHE = ROOT / "data" / "cache" / "transformers-floor"
NETWORK_ERRORS = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution",
                  "Name or service not known", "Network is unreachable", "Connection refused", "ConnectTimeout",
                  "ReadTimeout", "timed out", "ProxyError", "SSLError", "No route to host")


def _declared_floor() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if re.match(r"transformers\s*[<>=!~]", d))
    m = re.search(r">=\s*([0-9][0-9.]*)", spec)
    assert m, f"pyproject.toml declares no floor for transformers: {spec!r}"
    return m.group(1)


def _installed(version: str) -> Path:
    "data/cache/transformers-floor/<version>, installed with `pip --no-deps --target` on first use (atomically)."
    final = CACHE / version
    if (final / f"transformers-{version}.dist-info").is_dir():
        return final
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=CACHE))
    os.chmod(tmp, 0o755)
    try:
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--quiet",
                            "--target", str(tmp), f"transformers=={version}"], capture_output=True, text=True, timeout=600)
        out = r.stdout + r.stderr
        if r.returncode != 0:
            if any(e in out for e in NETWORK_ERRORS):
                pytest.skip(f"package registry unreachable, cannot install transformers=={version}: {out.strip().splitlines()[-1]}")
            raise AssertionError(f"pip could not install transformers=={version} (registry reachable):\n{out[-3000:]}")
        assert (tmp / f"transformers-{version}.dist-info").is_dir(), f"pip installed no transformers-{version}.dist-info:\n{out[-2000:]}"
        try:
            os.rename(tmp, final)  # atomic: `final` exists only complete
        except OSError:
            if not (final / f"transformers-{version}.dist-info").is_dir(): raise  # else a concurrent run installed it first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def test_pyproject_floor_is_the_tested_one():
    from packaging.version import Version
    assert Version(_declared_floor()) == Version(FLOOR), "update FLOOR here (and re-run this test) when the transformers floor changes"


@pytest.mark.timeout(900)
def test_prune_policies_pass_at_the_transformers_floor():
    site = _installed(FLOOR)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]),
               PYTHONDONTWRITEBYTECODE="1")
    code = ("import sys, transformers, pytest; "
            "print('SEEN transformers', transformers.__version__, transformers.__file__, flush=True); "
            "sys.exit(pytest.main(['tests/test_prune_policies.py', '-q', '-x', '-p', 'no:cacheprovider']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    seen = re.search(r"SEEN transformers (\S+) (\S+)", out)
    assert seen, f"the subprocess did not start:\n{out[-3000:]}"
    assert seen.group(1) == FLOOR and Path(seen.group(2)).resolve().is_relative_to(site.resolve()), seen.group(0)
    assert r.returncode == 0, f"tests/test_prune_policies.py failed with transformers {FLOOR}:\n{out[-6000:]}"
    assert re.search(r"\b\d+ passed", out) and " failed" not in out, out[-3000:]
