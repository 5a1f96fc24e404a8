"""Every tutorial notebook runs top to bottom (small settings, real MNIST)."""

from pathlib import Path

import pytest

from .conftest import mnist_dir

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("[0-9][0-9]_*.ipynb"))


def test_notebooks_found():
    assert len(NOTEBOOKS) == 9


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch):
    folder = mnist_dir("mnist")
    if folder is None:
        pytest.skip("real MNIST files not found ($RSO_NP_DATA or ../shared/data)")
    monkeypatch.setenv("RSO_NP_DATA", str(folder.parent))
    monkeypatch.setenv("RSO_NP_TUTORIAL_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].source.lstrip().startswith("# "), "starts with a title and what the reader will learn"
    assert "What to try next" in nb.cells[-1].source
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "stored without outputs"
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(TUTORIALS)}})
    client.execute()
    # the notebooks print their checks as "<what>: True"; a False there is a broken claim (whether a GPU is
    # available is information, not a check)
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    broken = [line for line in printed.splitlines() if ": False" in line and "GPU available" not in line]
    assert not broken, f"{path.name} prints a failed check: {broken}"
