"""The committed lock agrees with pyproject.toml's declared ranges, leaves torch to the torch step, and is what is installed."""
import re, tomllib, importlib.metadata as md
from packaging.requirements import Requirement
from packaging.version import Version
from tokexp.core import project_root, read_lock, lock_info

ROOT = project_root()

def _declared():
    proj = tomllib.loads((ROOT/"pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in proj["dependencies"] + proj["optional-dependencies"]["dev"] + proj["optional-dependencies"]["ray"]]

def _norm(n): return re.sub(r"[-_.]+", "-", n).lower()

def test_every_declared_dependency_is_locked_within_its_range():
    pins = read_lock(ROOT/"requirements.lock")
    for req in _declared():
        if _norm(req.name) == "torch": continue
        assert _norm(req.name) in pins, f"{req.name} is declared in pyproject.toml but not in requirements.lock: run `make lock`"
        assert Version(pins[_norm(req.name)]) in req.specifier, \
            f"requirements.lock pins {req.name}=={pins[_norm(req.name)]}, outside pyproject's {req.specifier}: run `make lock`"

def test_every_declared_dependency_has_both_bounds():
    for req in _declared():
        if _norm(req.name) in ("torch",): assert str(req.specifier).startswith("=="); continue
        ops = {s.operator for s in req.specifier}
        assert ops & {">=", ">", "=="}, f"{req} has no lower bound"
        if _norm(req.name) not in ("regex", "furo", "setuptools"):  # calendar-versioned / build tool: floor only
            assert ops & {"<", "<=", "==", "~="}, f"{req} has no upper bound"

def test_lock_is_hashed_and_leaves_torch_out():
    text = (ROOT/"requirements.lock").read_text()
    pins = read_lock(ROOT/"requirements.lock")
    assert "torch" not in pins, "torch is installed first (CPU or CUDA build) and must stay out of the lock"
    assert not [p for p in pins if p.startswith(("nvidia-", "cuda-"))], "the lock holds a CUDA torch's dependencies"
    assert text.count("--hash=sha256:") >= len(pins)
    blocks = re.split(r"\n(?=[a-z0-9])", text.split("\n", 2)[-1])
    for b in blocks:
        if re.match(r"[a-z0-9]", b): assert "--hash=sha256:" in b, f"lock entry without a hash: {b[:60]!r}"

def test_triton_matches_what_cuda_torch_requires():
    # CUDA torch 2.13.0 requires triton==3.7.1; the lock must not fight it on a GPU box
    assert read_lock(ROOT/"requirements.lock")["triton"] == "3.7.1"

def test_installed_environment_matches_the_lock():
    info = lock_info()
    assert info["mismatches"] == {}, f"installed packages differ from requirements.lock (run `make env`): {info['mismatches']}"
    assert md.version("torch").startswith("2.13.0")
