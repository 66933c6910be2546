"""Notebook hygiene the docs build depends on."""
import ast, json
from pathlib import Path
import pytest
from conftest import ROOT

@pytest.mark.parametrize("nb", sorted((ROOT/"nbs"/"experiments").glob("*.ipynb")), ids=lambda p: p.name)
def test_templates_have_one_parameters_cell(nb):
    cells = json.loads(nb.read_text())["cells"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{nb.name}: {len(tagged)} cells tagged 'parameters'"
    assert all(not c.get("outputs") for c in cells if c["cell_type"] == "code"), f"{nb.name}: committed with outputs"
