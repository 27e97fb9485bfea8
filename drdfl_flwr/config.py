"""The run configuration: one typed, validated object built from Flower's run config.

Flower hands every component a flat ``{str: scalar}`` mapping (``context.run_config``)
whose defaults live in ``pyproject.toml``. Generic keys (data, schedule, topology,
training budget) are fields of :class:`RunConfig`, validated when it is built; each
method's own keys live in its section (``[tool.flwr.app.config.drdfl]`` in TOML, flattened
by Flower to ``drdfl.noise-variance``) and are parsed and validated by that method's
:class:`MethodOptions` class when the method asks for them (:meth:`RunConfig.options`).
Building a RunConfig imports no method: a node builds one per message. The whole
config, every section and the method's fit with the generic keys included, is checked
once at start-up by :func:`drdfl_flwr.registry.check_run_config` (the ServerApp, the
simulation, the experiment runner), so a typo or a nonsensical value fails there, with an
error that names the key and the value, rather than deep inside a training loop on some
remote node.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

from strategies.topology import MODES, STAR, TOPOLOGY_NAMES

DATASETS = ("digits", "cifar10", "cifar100", "svhn")  # built in: columns and classes known
# any other dataset: a hub name (``owner/name``, as flwr-datasets' FederatedDataset takes
# it), or with ``data-dir`` a name for that parquet folder; its columns named in the config
DATASET_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
OPTIMIZERS = ("adam", "adamw", "sgd")  # the generic optimizer (drdfl_flwr/optim.py)
LR_SCHEDULES = ("constant", "cosine", "step")
TOPOLOGIES = ("auto", *TOPOLOGY_NAMES, STAR)  # the routers' catalogue, and auto
PARTITIONERS = ("dirichlet", "dirichlet-client", "shard", "iid")
SHARD_ASSIGNMENTS = ("balanced", "random")
CLASSIFIERS = ("small-cnn", "resnet8", "resnet18", "alexnet-dslth")
DENSE_CLASSIFIERS = ("small-cnn", "resnet8", "resnet18")  # alexnet-dslth is DSLTH-only
NORMS = ("auto", "none", "batch", "group")
DEVICES = ("auto", "cpu", "cuda")
# a hostile neighbour, for measuring what one costs (drdfl_flwr/adversary.py)
ATTACKS = ("none", "sign-flip", "scale", "noise", "label-flip", "stale")
RING_DEFENCES = ("none", "outlier")
HUB_REDUCTIONS = ("mean", "median", "trimmed-mean", "krum")
TRACKINGS = ("none", "tensorboard")
IDLE_STATES = ("memory", "disk")  # where a node's state waits between its rounds
RUNNER_SECTION = "grid"  # the experiment runner's own keys (drdfl_flwr.experiments.grid):
# they may sit in a run-config file beside the app's; the app passes them by


OptionsT = TypeVar("OptionsT", bound="MethodOptions")


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type, or out of range."""

    def __init__(self, key: str, value: Any, reason: str) -> None:
        super().__init__(f"run config '{key}' = {value!r}: {reason}")
        self.key = key
        self.value = value
        self.reason = reason  # the message without its "run config 'key' = value" prefix


# Where :func:`unknown_key` finds the sections' keys (``drdfl.noise-variance``): filled by
# the layers that know them (drdfl_flwr.registry every method's, the grid runner its own),
# as config, below them, knows no method. Each returns full keys.
KEY_SOURCES: list[Callable[[], Iterable[str]]] = []


class MethodOptions:
    """Base of a method's own config section: a frozen dataclass whose field ``foo_bar``
    is run-config key ``<SECTION>.foo-bar``. Subclasses validate in ``__post_init__``
    with the helpers below, so every error names the full key."""

    SECTION: ClassVar[str]

    @classmethod
    def from_section(cls, values: Mapping[str, Any]) -> Self:
        known = {_key(f.name): f for f in fields(cls)}  # type: ignore[arg-type]
        kwargs = {}
        for key, value in values.items():
            if key not in known:
                raise unknown_key(f"{cls.SECTION}.{key}", value)
            kwargs[known[key].name] = _coerce(f"{cls.SECTION}.{key}", value, known[key].type)
        return cls(**kwargs)

    def to_section(self) -> dict[str, Any]:
        return {f"{self.SECTION}.{_key(k)}": v for k, v in dataclasses.asdict(self).items()}  # type: ignore[call-overload]

    # -- validation helpers: every message names "<section>.<key>" --------------------
    def fail(self, key: str, reason: str) -> None:
        raise ConfigError(f"{self.SECTION}.{key}", getattr(self, _attr(key)), reason)

    def check_choice(self, key: str, allowed: tuple[str, ...]) -> None:
        if getattr(self, _attr(key)) not in allowed:
            self.fail(key, f"must be one of {', '.join(allowed)}")

    def check_positive(self, *keys: str) -> None:
        for key in keys:
            if not getattr(self, _attr(key)) > 0:
                self.fail(key, "must be > 0")

    def check_non_negative(self, *keys: str) -> None:
        for key in keys:
            if getattr(self, _attr(key)) < 0:
                self.fail(key, "must be >= 0")

    def check_unit(self, *keys: str, open_low: bool = False) -> None:
        for key in keys:
            value = getattr(self, _attr(key))
            if not ((value > 0.0) if open_low else (value >= 0.0)) or value > 1.0:
                self.fail(key, f"must lie in {'(0' if open_low else '[0'}, 1]")


@dataclass(frozen=True)
class RunConfig:
    """Every generic knob of a run. Field ``foo_bar`` is run-config key ``foo-bar``;
    ``sections`` holds the method sections' values as given (section name -> key ->
    value), parsed by :meth:`options`."""

    method: str = "drdfl"
    num_server_rounds: int = 16
    mode: str = "synchronous"
    topology: str = "auto"
    topology_k: int = 2
    round_timeout: float = 600.0
    node_wait_timeout: float = 300.0
    min_nodes: int = 0
    participation: float = 1.0
    dataset: str = "digits"
    data_dir: str = ""
    image_column: str = ""
    label_column: str = ""
    dataset_subset: str = ""
    partitioner: str = "dirichlet"
    dirichlet_beta: float = 0.4
    classes_per_client: int = 4
    shard_assignment: str = "balanced"
    subset_train: int = 0
    subset_test: int = 0
    oracle_absent_per_class: int = 0
    seed: int = 42
    local_epochs: int = 2
    batch_size: int = 64
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    lr_step_rounds: int = 10
    lr_step_factor: float = 0.1
    lr_min_factor: float = 0.0
    classifier: str = "small-cnn"
    classifier_norm: str = "auto"
    isolated: bool = False
    eval_every: int = 1
    results_dir: str = "results"
    run_name: str = ""
    resume: bool = False
    device: str = "auto"
    warm_cache_mib: int = 1024
    attack: str = "none"
    attack_partitions: str = ""
    attack_strength: float = 10.0
    ring_defence: str = "none"
    ring_defence_bound: float = 1.0
    hub_reduction: str = "mean"
    tracking: str = "none"
    save_models: bool = False
    idle_state: str = "memory"
    sections: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise ConfigError("method", self.method, "must name a method")
        self._check_dataset()
        _choice("mode", self.mode, MODES)
        _choice("topology", self.topology, TOPOLOGIES)
        _choice("partitioner", self.partitioner, PARTITIONERS)
        _choice("shard-assignment", self.shard_assignment, SHARD_ASSIGNMENTS)
        _choice("classifier", self.classifier, CLASSIFIERS)
        _choice("classifier-norm", self.classifier_norm, NORMS)
        _choice("device", self.device, DEVICES)
        _choice("attack", self.attack, ATTACKS)
        _choice("ring-defence", self.ring_defence, RING_DEFENCES)
        _choice("hub-reduction", self.hub_reduction, HUB_REDUCTIONS)
        _choice("tracking", self.tracking, TRACKINGS)
        _choice("idle-state", self.idle_state, IDLE_STATES)
        self._check_optimizer()
        self.attackers()  # raises on malformed entries
        if self.resume and not self.run_name:
            raise ConfigError("resume", self.resume, "needs a run-name: the run to resume")
        for key in (
            "num-server-rounds",
            "topology-k",
            "classes-per-client",
            "local-epochs",
            "batch-size",
            "eval-every",
        ):
            _positive(key, getattr(self, _attr(key)))
        if self.min_nodes < 0:
            raise ConfigError("min-nodes", self.min_nodes, "must be >= 0 (0 = all num-partitions)")
        if not 0.0 < self.participation <= 1.0:
            raise ConfigError(
                "participation",
                self.participation,
                "must lie in (0, 1]: the fraction of nodes that train each round",
            )
        if self.warm_cache_mib < 0:
            raise ConfigError("warm-cache-mib", self.warm_cache_mib, "must be >= 0 (0 = off)")
        for key in ("subset-train", "subset-test"):
            if getattr(self, _attr(key)) < 0:
                raise ConfigError(key, getattr(self, _attr(key)), "must be >= 0 (0 = use all)")
        if self.oracle_absent_per_class < 0:
            raise ConfigError(
                "oracle-absent-per-class",
                self.oracle_absent_per_class,
                "must be >= 0 (0 = off; a diagnostic: real images of the classes a node lacks)",
            )
        for key in (
            "round-timeout",
            "node-wait-timeout",
            "learning-rate",
            "dirichlet-beta",
            "attack-strength",
            "ring-defence-bound",
        ):
            _positive(key, getattr(self, _attr(key)))
        object.__setattr__(self, "sections", _raw_sections(self.sections))
        object.__setattr__(self, "_parsed", {})
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

    def _check_dataset(self) -> None:
        """A built-in name, or any other dataset by name with its columns named."""
        if self.dataset in DATASETS:
            pass
        elif not isinstance(self.dataset, str) or not DATASET_NAME.match(self.dataset):
            raise ConfigError(
                "dataset",
                self.dataset,
                f"must be one of {', '.join(DATASETS)}, a hub name (owner/name) or, with "
                "data-dir, a name for that folder",
            )
        elif "/" not in self.dataset and not self.data_dir:
            close = difflib.get_close_matches(self.dataset, DATASETS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                "dataset",
                self.dataset,
                f"is not built in ({', '.join(DATASETS)}): a dataset on the hub is named "
                f"owner/name (ylecun/mnist), a local parquet folder needs data-dir{hint}",
            )
        else:
            for key in ("image-column", "label-column"):
                if not getattr(self, _attr(key)):
                    raise ConfigError(
                        key,
                        "",
                        f"dataset {self.dataset!r} is not built in: name the column that "
                        f"holds its {key.split('-')[0]}s",
                    )
        if self.image_column and self.image_column == self.label_column:
            raise ConfigError(
                "label-column", self.label_column, "is the image-column too: name two columns"
            )

    def _check_optimizer(self) -> None:
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("lr-schedule", self.lr_schedule, LR_SCHEDULES)
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError("momentum", self.momentum, "must lie in [0, 1)")
        if self.momentum and self.optimizer != "sgd":
            raise ConfigError(
                "momentum",
                self.momentum,
                f"is SGD's; {self.optimizer} has none (optimizer = sgd to use it)",
            )
        if self.weight_decay < 0:
            raise ConfigError("weight-decay", self.weight_decay, "must be >= 0")
        _positive("lr-step-rounds", self.lr_step_rounds)
        if not 0.0 < self.lr_step_factor <= 1.0:
            raise ConfigError("lr-step-factor", self.lr_step_factor, "must lie in (0, 1]")
        if not 0.0 <= self.lr_min_factor <= 1.0:
            raise ConfigError("lr-min-factor", self.lr_min_factor, "must lie in [0, 1]")

    def attackers(self) -> frozenset[int]:
        """``attack-partitions`` as partition ids: the nodes that attack (with ``attack``
        other than none)."""
        ids = set()
        for entry in (e.strip() for e in self.attack_partitions.split(",")):
            if not entry:
                continue
            if not entry.isdigit():
                raise ConfigError(
                    "attack-partitions",
                    self.attack_partitions,
                    f"entry {entry!r} is not a partition id (comma-separated integers >= 0)",
                )
            ids.add(int(entry))
        return frozenset(ids)

    def options(self, options_class: type[OptionsT]) -> OptionsT:
        """One section's validated options (``cfg.options(DRDFLOptions)``), its defaults
        where the section is absent; parsed once per config."""
        parsed = self._parsed  # type: ignore[attr-defined]
        if options_class not in parsed:
            parsed[options_class] = options_class.from_section(
                self.sections.get(options_class.SECTION, {})
            )
        return parsed[options_class]

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's flat mapping (``section.key`` for method keys); unknown keys
        and wrong types are errors. Missing keys take their defaults."""
        known = {_key(f.name): f for f in fields(cls) if f.name != "sections"}
        kwargs: dict[str, Any] = {}
        sections: dict[str, dict[str, Any]] = {}
        for key, value in run_config.items():
            section, dot, name = key.partition(".")
            if dot:
                sections.setdefault(section, {})[name] = value
            elif key in known:
                kwargs[known[key].name] = _coerce(key, value, known[key].type)
            else:
                raise unknown_key(key, value)
        return cls(**kwargs, sections=sections)

    @classmethod
    def from_toml(cls, path: str | Path, **changes: Any) -> RunConfig:
        """A run-config file (``conf/*.toml``, as ``flwr run --run-config`` takes it, method
        sections as TOML tables) over the defaults, then ``changes`` (run-config keys with
        ``_`` for ``-``, or ``{"section.key": value}`` through :meth:`with_values`)."""
        import tomllib

        try:
            with open(path, "rb") as f:
                values = flatten_tables(tomllib.load(f))
        except FileNotFoundError:
            raise ConfigError("run-config file", str(path), "no such file") from None
        return cls.from_run_config(values).replace(**changes)

    def to_run_config(self) -> dict[str, Any]:
        """The inverse of :meth:`from_run_config`: every generic key and the section keys
        given (``drdfl_flwr.registry.recorded_run_config`` adds every section's defaults,
        for the record of a run)."""
        flat = {_key(f.name): getattr(self, f.name) for f in fields(self) if f.name != "sections"}
        for section, values in self.sections.items():
            flat.update({f"{section}.{key}": value for key, value in values.items()})
        return flat

    def replace(self, **changes: Any) -> RunConfig:
        """A validated copy with some generic fields changed (notebooks, benchmarks)."""
        return dataclasses.replace(self, **changes)

    def with_values(self, values: Mapping[str, Any]) -> RunConfig:
        """A validated copy with run-config keys changed, section keys included:
        ``cfg.with_values({"drdfl.noise-variance": 0.3, "local-epochs": 1})``."""
        return RunConfig.from_run_config({**self.to_run_config(), **values})


def unknown_key(key: str, value: Any, reason: str = "unknown run-config key") -> ConfigError:
    """The error for a key that no section declares, with the known keys closest to it:
    every unknown key, generic, in a method's section or in an unknown section, is
    refused with this one message."""
    close = difflib.get_close_matches(key, known_keys(), n=3)
    if close:
        reason += f"; did you mean {' or '.join(repr(k) for k in close)}?"
    return ConfigError(key, value, reason)


def known_keys() -> list[str]:
    """Every run-config key: the generic ones and the sections' (:data:`KEY_SOURCES`;
    every method's where the registry is loaded, which imports every method: for error
    messages, never on a run's way)."""
    keys = {_key(f.name) for f in fields(RunConfig) if f.name != "sections"}
    for source in KEY_SOURCES:
        keys.update(source())
    return sorted(keys)


def flatten_tables(tables: Mapping[str, Any], parent: str = "") -> dict[str, Any]:
    """TOML tables as Flower flattens a run config: ``{"drdfl": {"ema-alpha": 0.9}}`` is
    ``{"drdfl.ema-alpha": 0.9}``. Only scalars are run-config values."""
    flat: dict[str, Any] = {}
    for key, value in tables.items():
        name = f"{parent}.{key}" if parent else key
        if isinstance(value, Mapping):
            flat.update(flatten_tables(value, name))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            raise ConfigError(name, value, "a run-config value is a number, a string or a bool")
    return flat


def _raw_sections(sections: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Section name -> {key: value}, from values as given or from parsed options."""
    raw: dict[str, dict[str, Any]] = {}
    for section, values in sections.items():
        if isinstance(values, MethodOptions):
            values = {k.removeprefix(f"{section}."): v for k, v in values.to_section().items()}
        if not isinstance(values, Mapping):
            raise ConfigError(section, values, "a config section must be a table of keys")
        raw[section] = dict(values)
    return raw


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
        quote = f' (a string is quoted: {key} = "{value}")' if expected is str else ""
        raise ConfigError(
            key, value, f"expected {expected.__name__}, got {type(value).__name__}{quote}"
        )
    return value
