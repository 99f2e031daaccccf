"""The notebooks run top to bottom (nbclient) on a synthetic run directory, and are committed clean."""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from .synthetic import hand_run, planted_study

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
DEFAULT = 'RUNS = "runs/demo/*"'


@pytest.fixture(scope="module")
def runs_glob(tmp_path_factory):
    root = tmp_path_factory.mktemp("nb-runs")
    planted_study(root, n_stages=3, recipes=("full", "sa_proj", "mlp_gate_up"), runs_per_recipe=1)
    hand_run(root)
    return str(root / "*")


def test_notebooks_are_committed_without_outputs():
    assert len(NOTEBOOKS) >= 3
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code[0].source.startswith(DEFAULT), f"{path.name}: the first code cell must start with {DEFAULT}"
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, runs_glob):
    nb = nbformat.read(path, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    first.source = first.source.replace(DEFAULT, f"RUNS = {runs_glob!r}", 1)
    NotebookClient(nb, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 1, "no figure drawn"
    assert "4 runs:" in "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
