"""Execute every notebook top to bottom in a real Jupyter kernel.

    python notebooks/execute.py                   # all notebooks, full settings
    python notebooks/execute.py --figures docs    # ... and write their figures to docs/
    python notebooks/execute.py --quick           # CI's smaller settings

Each notebook saves one summary figure into ``--figures`` (``DRDFL_FIGURES_DIR`` in the
kernel). Outputs are not written back: the committed notebooks stay free of outputs, and
the figures are the record. Needs the dev extras (nbclient, ipykernel).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent


def notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def execute(notebook: Path, figures: Path, quick: bool, timeout: int = 1800) -> float:
    """Run ``notebook`` in a fresh kernel, cwd = notebooks/; seconds taken. A failing cell
    raises nbclient's CellExecutionError with the cell and its traceback."""
    env = {
        "DRDFL_FIGURES_DIR": str(Path(figures).resolve()),
        "DRDFL_NOTEBOOK_QUICK": "1" if quick else "0",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        nb = nbformat.read(notebook, as_version=4)
        start = time.time()
        NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(NOTEBOOKS)}},
        ).execute()
        return time.time() - start
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figures", type=Path, default=NOTEBOOKS / "figures")
    parser.add_argument("--quick", action="store_true", help="CI's smaller settings")
    parser.add_argument("names", nargs="*", help="notebook file names (default: all)")
    args = parser.parse_args(argv)
    chosen = [NOTEBOOKS / n for n in args.names] if args.names else notebooks()
    total = 0.0
    for notebook in chosen:
        print(f"{notebook.name} ...", flush=True)
        seconds = execute(notebook, args.figures, args.quick)
        total += seconds
        print(f"{notebook.name}: {seconds:.0f} s", flush=True)
    print(f"{len(chosen)} notebooks in {total:.0f} s; figures in {args.figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
