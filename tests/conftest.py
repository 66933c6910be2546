import os, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

@pytest.fixture
def reports_tmp(tmp_path, monkeypatch):
    "An isolated reports folder for runner/site tests (the real reports/ is never touched)."
    d = tmp_path/"reports"
    monkeypatch.setenv("TOKEXP_REPORTS_DIR", str(d))
    return d
