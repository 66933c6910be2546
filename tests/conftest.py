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
