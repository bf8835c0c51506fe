"""The notebooks in `notebooks/` run top to bottom, headless, at their smallest settings.

Each runs in a fresh `python3` kernel (ipykernel, for the interpreter running the tests) with
`notebooks/` as its working directory and `SEQJAX_NOTEBOOK_SMOKE=1`, which every notebook's
settings cell reads to pick sizes that only check that each cell runs. The notebooks assert
their own checks (forms equal, decoding equal to the parallel pass, sharded equal to one
device, restored equal to saved), so a failing check fails the cell and this test.

    python -m pytest -m slow tests/test_notebooks.py
"""

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
SMOKE = "SEQJAX_NOTEBOOK_SMOKE"


def test_notebooks_are_committed_clean_and_read_the_smoke_setting():
    assert NOTEBOOKS, "no notebooks found in notebooks/"
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        code = [cell for cell in cells if cell["cell_type"] == "code"]
        assert all(not cell["outputs"] and cell["execution_count"] is None for cell in code), (
            f"{path.name}: clear its outputs before committing it"
        )
        assert any(SMOKE in "".join(cell["source"]) for cell in code), path.name


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_top_to_bottom_at_its_smallest_settings(path, monkeypatch):
    monkeypatch.setenv(SMOKE, "1")
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=600,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
