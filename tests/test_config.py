"""A wrong run-config value stops the run with an error naming the key and the value."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict

from drdfl_flwr.config import ConfigError, RunConfig
from drdfl_flwr.data import load_client_data
from drdfl_flwr.experiments.grid import GridOptions
from drdfl_flwr.registry import check_run_config, recorded_run_config, resolved_topology

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def checked(values: dict) -> RunConfig:
    """A run config as the ServerApp takes it at start-up: built, then checked whole."""
    cfg = RunConfig.from_run_config(values)
    check_run_config(cfg)
    return cfg


def test_building_a_run_config_imports_no_method():
    """A node builds a RunConfig for every message: that must not import every method's
    module (nor validate every section); the start-up check does that once."""
    code = (
        "import sys; from drdfl_flwr.config import RunConfig; "
        "cfg = RunConfig.from_run_config({'method': 'fedavg', 'drdfl.noise-variance': 0.3}); "
        "loaded = [m for m in sys.modules if m.startswith(('baselines', 'drdfl_flwr.methods', "
        "'drdfl_flwr.registry', 'flwr'))]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PYPROJECT.parent)


def test_pyproject_defaults_are_the_typed_defaults():
    """`flwr run .` (pyproject) and run_simulation (dataclass) must run the same job."""
    nested = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    toml = flatten_dict(nested)  # as Flower flattens it: "drdfl.noise-variance"
    grid = {k: v for k, v in toml.items() if k.startswith("grid.")}
    assert grid == GridOptions().to_section()  # the runner's own section
    app = {k: v for k, v in toml.items() if k not in grid}
    assert app == recorded_run_config(RunConfig())  # every key, every method's section
    assert recorded_run_config(RunConfig.from_run_config(toml)) == app


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("method", "fedsomething"),
        ("dirichlet-beta", 0.0),
        ("dirichlet-beta", -1.0),
        ("mode", "async"),
        ("partitioner", "zipf"),
        ("drdfl.ema-alpha", 1.5),
        ("local-epochs", 0),
        ("data-dir", "/no/such/folder"),
        ("classifier", "vgg"),
        ("drdfl.learngene-merge", "sum"),
        ("batch-size", "64"),
        ("isolated", 1),
        ("drdfl.training", "both"),
        ("drdfl.ablation", "no-rec"),
        ("drdfl.learngene-ema-alpha", 2.0),
        ("drdfl.no-such-key", 1),
        ("dslth.keep-ratio-fc", 0.0),
        ("topology", "torus"),
        ("topology-k", 0),
        ("classifier-norm", "layer"),
        ("no-such-key", 1),
    ],
)
def test_bad_value_names_key_and_value(key, value):
    with pytest.raises(ConfigError) as err:
        checked({key: value})
    assert err.value.key == key
    assert key in str(err.value) and repr(value) in str(err.value)


def test_conf_files_are_valid_run_configs():
    for path in sorted(PYPROJECT.parent.joinpath("conf").glob("*.toml")):
        RunConfig.from_toml(path)


def test_paper_payload_budget_is_the_papers_058_m():
    """conf/drdfl-paper.toml: Learngene + class statistics within 5 % of 0.58 M parameters
    in the ResNet-18 / CIFAR-10 setting."""
    from drdfl_flwr.payload import num_parameters
    from drdfl_flwr.registry import build_learner

    cfg = RunConfig.from_toml(PYPROJECT.parent / "conf" / "drdfl-paper.toml")
    assert cfg.classifier == "resnet18"
    params = num_parameters(build_learner(cfg, (3, 32, 32), 10).shared_payload())
    assert abs(params / 0.58e6 - 1) <= 0.05, params


def test_isolated_is_a_boolean_switch():
    assert RunConfig.from_run_config({"isolated": True}).isolated is True


def test_int_is_accepted_where_float_is_meant():
    assert RunConfig.from_run_config({"learning-rate": 1}).learning_rate == 1.0


def test_data_dir_without_parquet_files(tmp_path):
    with pytest.raises(ConfigError, match="train.parquet"):
        RunConfig(data_dir=str(tmp_path))


def test_more_clients_than_samples():
    cfg = RunConfig(subset_train=3)
    with pytest.raises(ConfigError) as err:
        load_client_data(cfg, 0, 5)
    assert err.value.key == "subset-train"
    assert "3 training samples cannot be split over 5 clients" in str(err.value)


def test_too_many_classes_per_client():
    with pytest.raises(ConfigError) as err:
        load_client_data(RunConfig(partitioner="shard", classes_per_client=11), 0, 2)
    assert err.value.key == "classes-per-client"


@pytest.mark.parametrize(
    ("changes", "key", "reason"),
    [
        ({"method": "dslth", "topology": "star"}, "topology", "no hub reducer"),
        ({"method": "drdfl", "topology": "star"}, "topology", "drdfl-cfl"),
        ({"method": "fedavg", "topology": "ring"}, "topology", "centralized"),
        ({"method": "fedavg", "mode": "sequential"}, "mode", "synchronous only"),
        ({"method": "drdfl", "classifier": "alexnet-dslth"}, "classifier", "drdfl needs"),
    ],
)
def test_method_and_generic_keys_must_fit(changes, key, reason):
    """A centralized method runs on the star only, a decentralized one never does (a DSLTH
    mask is never averaged), and a method names the classifiers it can train."""
    with pytest.raises(ConfigError, match=reason) as err:
        checked(changes)
    assert err.value.key == key


@pytest.mark.parametrize(
    ("key", "meant"),
    [
        ("num-server-round", "num-server-rounds"),
        ("noise-variance", "drdfl.noise-variance"),  # a method's key without its section
        ("drdfl.noise-varience", "drdfl.noise-variance"),
        ("drdlf.noise-variance", "drdfl.noise-variance"),  # an unknown section
    ],
)
def test_an_unknown_key_is_refused_with_the_closest_known_keys(key, meant):
    with pytest.raises(ConfigError) as err:
        checked({key: 0.3})
    assert err.value.key == key and f"did you mean {meant!r}" in str(err.value)


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match="unknown section 'scaffold'"):
        checked({"scaffold.lr": 0.1})


def test_auto_topology_follows_the_method():
    assert resolved_topology(RunConfig(method="drdfl")) == "ring"
    assert resolved_topology(RunConfig(method="fedavg")) == "star"
