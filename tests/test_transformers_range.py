"""The declared transformers range is tested at its floor too (issue #10).

`prune.policies` hooks transformers internals (the cache keyword of `forward`, cache layer objects), which change
between releases: 5.24 renamed `past_key_values` to `cache`. The venv holds the locked (newest) version; this test
installs the floor of the range declared in pyproject.toml — the oldest 5.x release that imports with the other
locked packages (tokenizers 0.23.3, huggingface-hub 2.4.0: 5.17.0 refuses hub 2.x at import, 5.18.0 is the first that
accepts it) — into a cache folder and runs `tests/test_prune_policies.py` against it in a subprocess.

The wheel is installed with `pip --require-hashes` against the sha256 pinned in FLOOR_WHEEL_SHA256, as the project lock
(requirements.lock) is: the hash is that of transformers-5.18.0-py3-none-any.whl as PyPI serves it (taken from
`pip download --no-deps transformers==5.18.0` + sha256sum, and checked against the `hashes` field of
https://pypi.org/simple/transformers/ in its JSON form). The install is cached under data/cache/ (gitignored), keyed by
version and hash, and written atomically (a temporary folder renamed into place), so an interrupted or unverified
install is never reused. The test skips only when the package registry cannot be reached.

The subprocess is judged by its exit code and by pytest's own report (`-rA`): the summary line must count passes and no
failures or errors, and the eviction tests that exercise the hooked internals (REQUIRED) must each be reported PASSED.
"""
import os, re, shutil, subprocess, sys, tempfile, tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLOOR = "5.18.0"  # oldest 5.x release that imports with the locked tokenizers/huggingface-hub (see the docstring)
# sha256 of transformers-5.18.0-py3-none-any.whl from PyPI (see the docstring for where it came from)
FLOOR_WHEEL_SHA256 = "d79e5a515a572ee3deb33eb0d578be47d91e70c75d54cf21bf6eede6edef14a9"
# tests of tests/test_prune_policies.py that drive evict() through forward/generate: each must be PASSED at the floor
REQUIRED = ("test_decode_time_eviction_keeps_cache_bounded", "test_budget_one_generation_is_token_exact",
            "test_evicted_cache_equals_masked_full_attention", "test_generate_budget_one_is_exact_and_keeps_full_kv_per_layer",
            "test_streaming_llm_keeps_exactly_n_per_layer_in_generate", "test_continuation_call_with_past_key_values",
            "test_hooks_removed_on_error")
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


def _installed(version: str, sha256: str) -> Path:
    "data/cache/transformers-floor/<version>-<sha256[:16]>, installed with `pip --require-hashes --no-deps --target` on first use (atomically)."
    final = CACHE / f"{version}-{sha256[:16]}"
    if (final / f"transformers-{version}.dist-info").is_dir():
        return final
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=CACHE))
    os.chmod(tmp, 0o755)
    try:
        req = tmp.parent / f"{tmp.name}.requirements.txt"  # beside tmp, not in it: pip --target owns tmp
        req.write_text(f"transformers=={version} --hash=sha256:{sha256}\n")
        try:
            r = subprocess.run([sys.executable, "-m", "pip", "install", "--require-hashes", "--only-binary=:all:", "--no-deps",
                                "--no-compile", "--quiet", "--target", str(tmp), "-r", str(req)],
                               capture_output=True, text=True, timeout=600)
        finally:
            req.unlink(missing_ok=True)
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


def _summary(out: str) -> dict[str, int]:
    "Counts of pytest's final summary line ('3 passed, 1 skipped, 2 warnings in 4.1s'), {outcome: n}."
    lines = [l.strip(" =") for l in out.splitlines() if re.fullmatch(r"=*\s*\d+ \w+(, \d+ \w+)* in [\d.]+s( \([^)]*\))?\s*=*", l.strip())]
    assert lines, f"no pytest summary line in the output:\n{out[-3000:]}"
    counts = {}
    for n, k in re.findall(r"(\d+) (\w+)", lines[-1].rsplit(" in ", 1)[0]):
        k = {"error": "errors", "warning": "warnings"}.get(k, k)
        counts[k] = counts.get(k, 0) + int(n)
    return counts


def test_summary_parser():
    out = "x failed to y\nPASSED a\n===== 12 passed, 1 skipped, 3 warnings in 4.20s =====\n"
    assert _summary(out) == {"passed": 12, "skipped": 1, "warnings": 3}
    assert _summary("1 failed, 2 passed, 1 error in 0.5s") == {"failed": 1, "passed": 2, "errors": 1}
    assert _summary("3 passed in 61.02s (0:01:01)") == {"passed": 3}
    with pytest.raises(AssertionError): _summary("no tests ran")


def test_pyproject_floor_is_the_tested_one():
    from packaging.version import Version
    assert Version(_declared_floor()) == Version(FLOOR), "update FLOOR here (and re-run this test) when the transformers floor changes"


@pytest.mark.timeout(900)
def test_prune_policies_pass_at_the_transformers_floor():
    site = _installed(FLOOR, FLOOR_WHEEL_SHA256)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]),
               PYTHONDONTWRITEBYTECODE="1")
    code = ("import sys, transformers, pytest; "
            "print('SEEN transformers', transformers.__version__, transformers.__file__, flush=True); "
            "sys.exit(pytest.main(['tests/test_prune_policies.py', '-q', '-x', '-rA', '-p', 'no:cacheprovider']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    seen = re.search(r"SEEN transformers (\S+) (\S+)", out)
    assert seen, f"the subprocess did not start:\n{out[-3000:]}"
    assert seen.group(1) == FLOOR and Path(seen.group(2)).resolve().is_relative_to(site.resolve()), seen.group(0)
    assert r.returncode == 0, f"tests/test_prune_policies.py failed with transformers {FLOOR}:\n{out[-6000:]}"
    counts = _summary(out)
    assert counts.get("passed", 0) > 0 and counts.get("failed", 0) == 0 and counts.get("errors", 0) == 0, (counts, out[-3000:])
    passed = set(re.findall(r"^PASSED tests/test_prune_policies\.py::(\w+)", out, re.M))
    missing = [t for t in REQUIRED if t not in passed]
    assert not missing, f"with transformers {FLOOR} these eviction tests did not pass (skipped or not collected): {missing}\n{out[-3000:]}"
