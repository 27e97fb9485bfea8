"""Every notebook runs top to bottom in a real Jupyter kernel (nbclient), on CI's smaller
settings, and leaves its summary figure; the committed copies carry no stale outputs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"


def _executor():
    spec = importlib.util.spec_from_file_location("execute", NOTEBOOK_DIR / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXECUTOR = _executor()
NOTEBOOKS = EXECUTOR.notebooks()
# notebooks whose kernel also starts Ray's simulation engine (drdfl_flwr.simulation)
WITH_RAY = {"01_quickstart"}


def test_the_four_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == [
        "01_quickstart.ipynb",
        "02_inside_drdfl.ipynb",
        "03_privacy_dlg.ipynb",
        "04_communication.ipynb",
    ]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(notebook):
    nb = nbformat.read(notebook, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, notebook.name


@pytest.mark.kernel
@pytest.mark.parametrize(
    "notebook",
    [
        pytest.param(p, id=p.stem, marks=[pytest.mark.ray] if p.stem in WITH_RAY else [])
        for p in NOTEBOOKS
    ],
)
def test_notebook_runs_in_a_kernel_and_saves_its_figure(notebook, tmp_path):
    EXECUTOR.execute(notebook, tmp_path, quick=True, timeout=900)
    figures = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(figures) == 1, figures
    assert (tmp_path / figures[0]).stat().st_size > 10_000


def test_library_plots_leave_matplotlibs_backend_alone(tmp_path, monkeypatch):
    """A notebook's inline backend must survive the results plots the library draws."""
    import matplotlib

    from drdfl_flwr.results import ResultsWriter

    def refuse(*args, **kwargs):
        raise AssertionError("library code switched matplotlib's backend")

    monkeypatch.setattr(matplotlib, "use", refuse)
    backend = matplotlib.get_backend()
    writer = ResultsWriter(tmp_path / "run", {})
    for r in (1, 2):
        accuracy = {"local_t_acc": 0.5, "global_t_acc": 0.2}
        writer.log_round({"round": r, "mean": accuracy, "std": accuracy})
    writer.plot()
    assert (tmp_path / "run" / "convergence.png").is_file()
    assert matplotlib.get_backend() == backend
