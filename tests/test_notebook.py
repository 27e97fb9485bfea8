"""The notebook's code cells run top to bottom (executed as a script, no Jupyter needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore.ipynb"


@pytest.mark.slow
def test_notebook_runs(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    source = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    namespace: dict = {}
    exec(compile(source, str(NOTEBOOK), "exec"), namespace)  # noqa: S102
    assert set(namespace["summaries"]) == {"drdfl", "local"}
    assert os.path.exists("results/notebook/drdfl/convergence.png")
