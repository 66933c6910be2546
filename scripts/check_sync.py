#!/usr/bin/env python3
"""Fail if `nbdev-clean` or `nbdev-export` would change anything: notebooks must be committed clean and the package in sync."""
import hashlib, subprocess, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
bin_ = Path(sys.executable).parent

def snapshot():
    files = sorted(root.glob("nbs/**/*.ipynb")) + sorted(root.glob("tokexp/**/*.py"))
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if ".ipynb_checkpoints" not in p.parts}

before = snapshot()
for cmd in (["nbdev-clean"], ["nbdev-export"]):
    r = subprocess.run([str(bin_/cmd[0]), *cmd[1:]], cwd=root, capture_output=True, text=True)
    if r.returncode: sys.exit(f"{cmd[0]} failed:\n{r.stdout}\n{r.stderr}")
after = snapshot()
changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
if changed:
    print("Notebooks not clean or package out of sync with nbs/. These files changed when running nbdev-clean && nbdev-export:", file=sys.stderr)
    for c in changed: print(f"  {c}", file=sys.stderr)
    sys.exit("Fix: run `.venv/bin/nbdev-clean && .venv/bin/nbdev-export` and commit the result (never edit tokexp/ by hand).")
print(f"notebooks clean and package in sync ({len(after)} files checked)")
