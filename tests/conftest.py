"""Shared fixtures: offline, quiet Flower; Message ids outside a Flower runtime; tiny data.

Test tiers (markers registered in pyproject.toml)::

    pytest -m fast          # no Ray, no Jupyter kernel, no SuperNode: about 2 minutes
    pytest -m "not slow"    # the default run (.ci/run): the fast tier, Ray and kernels
    pytest -m slow          # paper-scale runs and the SuperLink/SuperNode deployments

A test that starts Ray's simulation engine is marked ``ray``, one that starts a Jupyter
kernel ``kernel``, one that starts a SuperLink and SuperNodes as processes ``deployment``;
every test with none of these marks and not ``slow`` is marked ``fast`` here, at
collection, so that a new test lands in the fast tier unless it says otherwise.

Fuzz size: the Hypothesis tests take their ``max_examples`` from a settings profile,
``fast`` (50 examples) when the run selects ``-m fast``, ``full`` (400) otherwise;
``HYPOTHESIS_PROFILE=fast`` (or ``full``) or Hypothesis's own ``--hypothesis-profile``
chooses one explicitly.

Threads: torch runs on ``OMP_NUM_THREADS`` threads, 1 unless set (the kernels, Ray
workers and SuperNodes the tests start inherit it), as in the simulation engine's
ClientApp actors (Ray sets an actor's OMP_NUM_THREADS to its num_cpus). These models are
tiny: on two cores that other work shares, two threads each spin-waiting for the other
made the same tests 10 to 30 times slower.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from drdfl_flwr import registry  # noqa: E402
from drdfl_flwr.config import RunConfig  # noqa: E402
from drdfl_flwr.data import ClientData  # noqa: E402
from strategies.reducers import Contribution  # noqa: E402

CIFAR10_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10"

# A test that starts any of these is not in the fast tier.
HEAVY_MARKERS = ("slow", "ray", "kernel", "deployment")

settings.register_profile("fast", max_examples=50)
settings.register_profile("full", max_examples=400)


def hypothesis_profile(markexpr: str) -> str:
    """``HYPOTHESIS_PROFILE`` when set, else ``fast`` for a run that selects the fast tier
    (``-m fast``, ``-m "fast and not x"``), else ``full``."""
    chosen = os.environ.get("HYPOTHESIS_PROFILE")
    if chosen:
        return chosen
    selects_fast = re.search(r"(?<!not )\bfast\b", markexpr) is not None
    return "fast" if selects_fast else "full"


def pytest_configure(config):
    # before the test modules are imported: their @settings inherit the loaded profile
    if not config.getoption("hypothesis_profile", None):
        settings.load_profile(hypothesis_profile(config.getoption("markexpr", "") or ""))


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if not any(item.get_closest_marker(name) for name in HEAVY_MARKERS):
            item.add_marker(pytest.mark.fast)


@pytest.fixture(autouse=True)
def _task_identity():
    """``Message(...)`` reads run/node/task ids that only a Flower runtime sets."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


def random_client_data(n: int = 64, shape=(1, 8, 8), num_classes: int = 10, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *shape), generator=gen) * 2 - 1
    y = torch.randint(0, num_classes, (n,), generator=gen)
    return ClientData(x, y, x[:16], y[:16], x, y, num_classes)


@pytest.fixture
def tiny_data() -> ClientData:
    return random_client_data()


def make_config(**kwargs) -> RunConfig:
    """A RunConfig from keyword arguments, ``_`` for ``-``; a ``<section>_`` prefix puts the
    rest in that method's section: ``dslth_keep_ratio_conv=0.4`` is
    ``dslth.keep-ratio-conv = 0.4``."""
    sections = registry.option_classes()
    flat = {}
    for name, value in kwargs.items():
        section = next((s for s in sections if name.startswith(s + "_")), None)
        key = f"{section}.{name[len(section) + 1 :]}" if section else name
        flat[key.replace("_", "-")] = value
    cfg = RunConfig.from_run_config(flat)
    registry.check_run_config(cfg)  # as the ServerApp does at start-up
    return cfg


def contribution(partition_id: int, payload, metrics: dict) -> Contribution:
    """A node's reply as a hub reducer sees it, from tensors, numpy arrays or a record."""
    arrays = {
        k: v.numpy() if hasattr(v, "numpy") else np.asarray(v) for k, v in dict(payload).items()
    }
    return Contribution(partition_id, arrays, metrics)


def as_tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """A reducer's output as the tensors a node receives."""
    return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
