"""The Flower API the project leans on that Flower has announced it will remove: a test
that fails loudly, with where to look, the day it goes (docs/reproducing.md)."""

from __future__ import annotations

import warnings


def test_run_simulation_is_still_there_and_still_only_deprecated():
    try:
        from flwr.simulation import run_simulation
    except ImportError as err:  # pragma: no cover - the day Flower removes it
        raise AssertionError(
            "flwr.simulation.run_simulation is gone: move drdfl_flwr/simulation.py to "
            "Flower's replacement (docs/reproducing.md, 'Why the grid runner uses a "
            f"deprecated Flower function'): {err}"
        ) from err
    assert callable(run_simulation)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import flwr.simulation  # noqa: F401 - importing alone must not warn
