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

DATASETS = ("digits", "cifar10", "cifar100", "svhn")
METHODS = ("drdfl", "local", "dfml", "dslth")
MODES = ("synchronous", "sequential")
TOPOLOGIES = ("ring",)
PARTITIONERS = ("dirichlet", "shard", "iid")
CLASSIFIERS = ("small-cnn", "resnet8", "resnet18", "alexnet-dslth")
DENSE_CLASSIFIERS = ("small-cnn", "resnet8", "resnet18")  # alexnet-dslth is DSLTH-only
DSLTH_CLASSIFIERS = ("small-cnn", "alexnet-dslth")
DFML_SHARES = ("own", "received")
DFML_PREDICTS = ("peak", "current")
DSLTH_WEIGHT_INITS = ("kaiming-uniform", "signed-constant", "kaiming-normal", "uniform")
DSLTH_PROCEDURES = ("released", "epochs")
LEARNGENE_MERGES = ("replace", "average", "ema")
DRDFL_TRAININGS = ("per-block", "joint")
DRDFL_ABLATIONS = ("none", "no-pr", "no-gl")
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
    num_server_rounds: int = 16
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
    learngene_merge: str = "replace"
    learngene_ema_alpha: float = 0.5
    drdfl_training: str = "per-block"
    drdfl_ablation: str = "none"
    isolated: bool = False
    eval_every: int = 1
    results_dir: str = "results"
    run_name: str = ""
    device: str = "auto"
    # DFML (paper 002)
    architectures: str = ""
    dfml_period: int = 4
    dfml_alpha_min: float = 0.0
    dfml_alpha_max: float = 0.8
    dfml_share: str = "own"
    dfml_predict: str = "peak"
    # DSLTH (paper 003)
    dslth_procedure: str = "released"
    dslth_keep_ratio_conv: float = 0.3
    dslth_keep_ratio_fc: float = 0.9
    dslth_keep_ratios: str = ""
    dslth_score_lr: float = 10.0
    dslth_weight_decay: float = 5e-4
    dslth_finetune_scale: float = 10.0
    dslth_group_lasso: float = 0.0
    dslth_weight_init: str = "kaiming-uniform"

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("dataset", self.dataset, DATASETS)
        _choice("mode", self.mode, MODES)
        _choice("topology", self.topology, TOPOLOGIES)
        _choice("partitioner", self.partitioner, PARTITIONERS)
        _choice("classifier", self.classifier, CLASSIFIERS)
        _choice("learngene-merge", self.learngene_merge, LEARNGENE_MERGES)
        _choice("drdfl-training", self.drdfl_training, DRDFL_TRAININGS)
        _choice("drdfl-ablation", self.drdfl_ablation, DRDFL_ABLATIONS)
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
        for key in ("ema-alpha", "learngene-ema-alpha"):
            if not 0.0 <= getattr(self, _attr(key)) <= 1.0:
                raise ConfigError(key, getattr(self, _attr(key)), "must lie in [0, 1]")
        if self.noise_variance < 0:
            raise ConfigError("noise-variance", self.noise_variance, "must be >= 0")
        self._validate_dfml()
        self._validate_dslth()
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

    def _validate_dfml(self) -> None:
        _positive("dfml-period", self.dfml_period)
        for key in ("dfml-alpha-min", "dfml-alpha-max"):
            if not 0.0 <= getattr(self, _attr(key)) <= 1.0:
                raise ConfigError(key, getattr(self, _attr(key)), "must lie in [0, 1]")
        if self.dfml_alpha_min > self.dfml_alpha_max:
            raise ConfigError(
                "dfml-alpha-min",
                self.dfml_alpha_min,
                f"must not exceed dfml-alpha-max ({self.dfml_alpha_max})",
            )
        _choice("dfml-share", self.dfml_share, DFML_SHARES)
        _choice("dfml-predict", self.dfml_predict, DFML_PREDICTS)
        for name in self.architecture_list():
            _choice("architectures", name, DENSE_CLASSIFIERS)
        if self.method != "dslth" and self.classifier not in DENSE_CLASSIFIERS:
            raise ConfigError(
                "classifier", self.classifier, f"{self.method} needs one of {DENSE_CLASSIFIERS}"
            )

    def _validate_dslth(self) -> None:
        _choice("dslth-procedure", self.dslth_procedure, DSLTH_PROCEDURES)
        for key in ("dslth-keep-ratio-conv", "dslth-keep-ratio-fc"):
            if not 0.0 < getattr(self, _attr(key)) <= 1.0:
                raise ConfigError(key, getattr(self, _attr(key)), "must lie in (0, 1]")
        self.node_keep_ratio_list()  # raises on malformed entries
        _positive("dslth-score-lr", self.dslth_score_lr)
        for key in ("dslth-weight-decay", "dslth-finetune-scale", "dslth-group-lasso"):
            if getattr(self, _attr(key)) < 0:
                raise ConfigError(key, getattr(self, _attr(key)), "must be >= 0")
        _choice("dslth-weight-init", self.dslth_weight_init, DSLTH_WEIGHT_INITS)
        if self.method == "dslth":
            _choice("classifier", self.classifier, DSLTH_CLASSIFIERS)

    def architecture_list(self) -> list[str]:
        """``architectures`` split on commas (empty: every node uses ``classifier``)."""
        return [a.strip() for a in self.architectures.split(",") if a.strip()]

    def node_keep_ratio_list(self) -> list[tuple[float, float]]:
        """``dslth-keep-ratios`` as (conv, fc) pairs, one per node, cycled over partition ids.

        Each comma-separated entry is ``conv/fc`` or ``conv`` (fc then stays
        ``dslth-keep-ratio-fc``). Empty: every node uses the two global ratios.
        """
        pairs = []
        for entry in (e.strip() for e in self.dslth_keep_ratios.split(",")):
            if not entry:
                continue
            conv, _, fc = entry.partition("/")
            try:
                pair = (float(conv), float(fc) if fc else self.dslth_keep_ratio_fc)
            except ValueError:
                raise ConfigError(
                    "dslth-keep-ratios",
                    self.dslth_keep_ratios,
                    f"entry {entry!r} is not 'conv' or 'conv/fc' numbers",
                ) from None
            if not all(0.0 < r <= 1.0 for r in pair):
                raise ConfigError(
                    "dslth-keep-ratios", self.dslth_keep_ratios, "every ratio must lie in (0, 1]"
                )
            pairs.append(pair)
        return pairs

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

    @classmethod
    def from_toml(cls, path: str | Path, **changes: Any) -> RunConfig:
        """A run-config file (``conf/*.toml``, flat ``key = value`` as ``flwr run
        --run-config`` takes it) over the defaults, then ``changes`` (field names)."""
        import tomllib

        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError("run-config file", str(path), "no such file") from None
        return cls.from_run_config(values).replace(**changes)

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
    """TOML gives ints where floats are meant (``learning-rate = 1``); accept those only.
    Booleans are accepted only where a bool is meant (``isolated = true``)."""
    expected = {"int": int, "float": float, "str": str, "bool": bool}[str(type_name)]
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, f"expected true or false, got {type(value).__name__}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(key, value, f"expected {expected.__name__}")
    if expected is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, expected):
        raise ConfigError(key, value, f"expected {expected.__name__}, got {type(value).__name__}")
    return value
