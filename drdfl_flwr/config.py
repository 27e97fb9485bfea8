"""The run configuration: one typed, validated object built from Flower's run config.

Flower hands every component a flat ``{str: scalar}`` mapping (``context.run_config``)
whose defaults live in ``pyproject.toml``. Everything downstream reads the fields of
:class:`RunConfig` instead of raw keys, so a typo or a nonsensical value fails once,
at start-up, with an error that names the key and the value, rather than deep inside
a training loop on some remote node.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

METHODS = ("drdfl", "local")
MODES = ("synchronous", "sequential")
TOPOLOGIES = ("ring",)
PARTITIONERS = ("dirichlet", "shard", "iid")
CLASSIFIERS = ("small-cnn", "resnet18")
LEARNGENE_MERGES = ("average", "replace")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type, or out of range."""

    def __init__(self, key: str, value: Any, reason: str) -> None:
        super().__init__(f"run config '{key}' = {value!r}: {reason}")
        self.key = key
        self.value = value


@dataclass(frozen=True)
class RunConfig:
    """Every knob of a run. Field ``foo_bar`` is run-config key ``foo-bar``."""

    method: str = "drdfl"
    num_server_rounds: int = 8
    mode: str = "synchronous"
    topology: str = "ring"
    round_timeout: float = 600.0
    node_wait_timeout: float = 300.0
    dataset: str = "digits"
    data_dir: str = ""
    partitioner: str = "dirichlet"
    dirichlet_beta: float = 0.4
    classes_per_client: int = 4
    subset_train: int = 0
    subset_test: int = 0
    seed: int = 42
    local_epochs: int = 2
    batch_size: int = 64
    learning_rate: float = 1e-3
    classifier: str = "small-cnn"
    persona_dim: int = 16
    learngene_dim: int = 16
    ema_alpha: float = 0.99
    noise_variance: float = 0.15
    learngene_merge: str = "average"
    eval_every: int = 1
    results_dir: str = "results"
    run_name: str = ""
    device: str = "auto"

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("mode", self.mode, MODES)
        _choice("topology", self.topology, TOPOLOGIES)
        _choice("partitioner", self.partitioner, PARTITIONERS)
        _choice("classifier", self.classifier, CLASSIFIERS)
        _choice("learngene-merge", self.learngene_merge, LEARNGENE_MERGES)
        _choice("device", self.device, DEVICES)
        for key in (
            "num-server-rounds",
            "classes-per-client",
            "local-epochs",
            "batch-size",
            "persona-dim",
            "learngene-dim",
            "eval-every",
        ):
            _positive(key, getattr(self, _attr(key)))
        for key in ("subset-train", "subset-test"):
            if getattr(self, _attr(key)) < 0:
                raise ConfigError(key, getattr(self, _attr(key)), "must be >= 0 (0 = use all)")
        for key in ("round-timeout", "node-wait-timeout", "learning-rate", "dirichlet-beta"):
            _positive(key, getattr(self, _attr(key)))
        if not 0.0 <= self.ema_alpha <= 1.0:
            raise ConfigError("ema-alpha", self.ema_alpha, "must lie in [0, 1]")
        if self.noise_variance < 0:
            raise ConfigError("noise-variance", self.noise_variance, "must be >= 0")
        if self.data_dir:
            folder = Path(self.data_dir).expanduser()
            if not folder.is_dir():
                raise ConfigError(
                    "data-dir", self.data_dir, f"no such folder (resolved to {folder.resolve()})"
                )
            if not (folder / "train.parquet").is_file() or not (folder / "test.parquet").is_file():
                raise ConfigError(
                    "data-dir", self.data_dir, "must hold train.parquet and test.parquet"
                )

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's flat mapping; unknown keys and wrong types are errors."""
        known = {_key(f.name): f for f in fields(cls)}
        unknown = sorted(set(run_config) - set(known))
        if unknown:
            raise ConfigError(unknown[0], run_config[unknown[0]], "unknown run-config key")
        kwargs: dict[str, Any] = {}
        for key, value in run_config.items():
            kwargs[known[key].name] = _coerce(key, value, known[key].type)
        return cls(**kwargs)

    def to_run_config(self) -> dict[str, Any]:
        """The inverse of :meth:`from_run_config` (for ``run_simulation`` and results)."""
        return {_key(k): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> RunConfig:
        """A validated copy with some fields changed (notebooks, benchmarks)."""
        return dataclasses.replace(self, **changes)


def _key(attr: str) -> str:
    return attr.replace("_", "-")


def _attr(key: str) -> str:
    return key.replace("-", "_")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, value, f"must be one of {', '.join(allowed)}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(key, value, "must be > 0")


def _coerce(key: str, value: Any, type_name: Any) -> Any:
    """TOML gives ints where floats are meant (``learning-rate = 1``); accept those only."""
    expected = {"int": int, "float": float, "str": str}[str(type_name)]
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(key, value, f"expected {expected.__name__}")
    if expected is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, expected):
        raise ConfigError(key, value, f"expected {expected.__name__}, got {type(value).__name__}")
    return value
