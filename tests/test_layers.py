"""The layering is checked by import-linter's contracts in pyproject.toml: an import that
points up (a learner importing the registry, a router importing the node side, a method
importing Flower) fails here, not in a review."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"
PACKAGES = ("drdfl_flwr", "strategies", "baselines")


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT), "--no-cache"], cwd=root, capture_output=True, text=True, check=False
    )


def test_every_import_points_down():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "upward", "contract"),
    [
        ("drdfl_flwr/learner.py", "from drdfl_flwr import registry", "points down"),
        ("strategies/rounds.py", "from drdfl_flwr.payload import Incoming", "points down"),
        ("baselines/fedavg.py", "from flwr.app import ArrayRecord", "plain PyTorch"),
    ],
)
def test_an_upward_import_breaks_a_contract(tmp_path, module, upward, contract):
    """The check can fail: the same tree with one import added upward is refused."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{upward}  # noqa\n")
    result = lint(tmp_path)
    assert result.returncode != 0
    broken = [line for line in result.stdout.splitlines() if line.endswith("BROKEN")]
    assert any(contract in line for line in broken), result.stdout


def test_the_app_fab_holds_the_code_and_fits_flowers_limit():
    """`flwr run` packs the project into a FAB of at most 10 MiB: the committed grids'
    run folders must stay out of it (pyproject's fab-include), the code must be in."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk
    from flwr.common.constant import FAB_MAX_SIZE

    fab = build_fab_from_disk(ROOT)
    assert len(fab) < FAB_MAX_SIZE
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    tops = {name.split("/")[0] for name in names}
    assert {"drdfl_flwr", "strategies", "baselines"} <= tops
    assert not tops & {"benchmarks", "tests", "notebooks", "docs", "conf", "deploy"}
    # the grid runner and its figures stay on the researcher's machine; the apps run
    assert not [n for n in names if n.startswith("drdfl_flwr/experiments/")]
    assert {"drdfl_flwr/client_app.py", "drdfl_flwr/server_app.py"} <= set(names)


def test_a_device_install_without_ray_runs_the_apps_and_names_the_extra_to_simulate(
    monkeypatch,
):
    """A SuperNode's install leaves Ray out (the ``simulation`` extra adds it): the apps a
    SuperNode and a SuperLink load must import without it, and a simulation asked for
    where it is missing says which extra to install, before anything starts."""
    blocked = (
        "import sys; sys.modules['ray'] = None; "
        "import drdfl_flwr.client_app, drdfl_flwr.server_app; "
        "assert 'ray' not in {m.split('.')[0] for m in sys.modules if sys.modules[m]}"
    )
    done = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    import importlib.util

    from drdfl_flwr.config import RunConfig
    from drdfl_flwr.simulation import simulate

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match=r"drdfl-flwr\[simulation\]"):
        simulate(RunConfig(method="local", dataset="digits"), num_clients=2)
