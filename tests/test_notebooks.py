"""Notebooks are executed with tiny parameters so they never rot, and are stored without outputs.

Each notebook has one cell tagged ``parameters``; the test inserts a cell right after it that
overrides those values (as papermill does), runs every cell with nbclient, and checks that the
run produced its plots.
"""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

# name -> overriding source; sizes chosen to run in well under a minute on a loaded 2-core CPU
SMALL_PARAMETERS = {
    "distillation_walkthrough.ipynb": "L = 128\nK = 8\nSTATES = [20, 40]\nD = 2\n",
    "scan_vs_fft_latency.ipynb": (
        "D = 4\nH = 4\nK = 4\nLENGTHS = [32, 64]\nDECODE_LENGTHS = [32, 64]\n"
        "LDS_STATES = 16\nREPEATS = 1\n"
    ),
}


def test_every_notebook_has_small_parameters():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(SMALL_PARAMETERS)


@pytest.mark.parametrize("name", sorted(SMALL_PARAMETERS))
def test_notebook_is_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, "strip outputs before commit"


@pytest.mark.parametrize("name", sorted(SMALL_PARAMETERS))
def test_notebook_runs_with_small_parameters(name, tmp_path):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell must be tagged 'parameters'"
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(SMALL_PARAMETERS[name]))
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    ).execute()
    images = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if "image/png" in out.get("data", {})
    ]
    assert len(images) >= 2  # one log-log plot per part
