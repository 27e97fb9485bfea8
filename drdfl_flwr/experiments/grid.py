"""An experiment grid: one ``conf/*.toml`` file, expanded into the runs it stands for.

A conf file is a run config (``flwr run . --run-config conf/<name>.toml`` runs its base
job) with an optional ``[grid]`` table that the grid runner expands into

    variants x datasets x partitions x seeds

runs, every one of them the base config with a few keys changed. The ``grid`` keys are
declared in ``pyproject.toml`` like any other section (``flwr run`` refuses undeclared
keys) and a single run ignores them. Every value is a string, because Flower's run
config holds scalars only:

``variants``   ``method[+isolated][@topology][{key=value;key=value}]``, comma separated:
               ``drdfl``, ``drdfl+isolated`` (sharing cut off), ``drdfl@full``,
               ``drdfl{drdfl.ablation=no-pr}``; empty = the file's ``method``.
``datasets``   dataset names, built in or by name (``ylecun/mnist``, with the file's
               ``image-column`` and ``label-column``); with ``data-root`` set,
               ``<data-root>/<name>`` is used when that folder exists, otherwise the hub.
               Empty = the file's dataset.
``partitions`` ``dirichlet:<beta>``, ``dirichlet-client:<beta>``, ``shard:<classes per
               client>``, ``iid``, each optionally scoped to one dataset
               (``cifar100/shard:20``). Empty = the file's.
``seeds``      integers; empty = the file's ``seed``.
``clients``, ``cpus-per-client``, ``gpus-per-client``: the simulated federation.
``primary``    the comparisons declared before the runs, ``a - b @ metric``, comma
               separated (``drdfl - local @ expected_local_t_acc``): the report tests
               them with a multiplicity correction and calls every other difference
               exploratory. ``a`` and ``b`` are variants of the grid; ``metric`` one of
               :data:`PRIMARY_METRICS`.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drdfl_flwr.config import (
    DATASET_NAME,
    DATASETS,
    KEY_SOURCES,
    RUNNER_SECTION,
    ConfigError,
    MethodOptions,
    RunConfig,
)
from drdfl_flwr.registry import check_run_config
from drdfl_flwr.scoring import (
    ABSENT_CLASS,
    EXPECTED_LOCAL_T,
    GLOBAL_T,
    GLOBAL_T_BALANCED,
    LOCAL_T,
)

VARIANT = re.compile(
    r"^(?P<method>[a-z0-9-]+)(?P<isolated>\+isolated)?(?:@(?P<topology>[a-z-]+))?"
    r"(?:\{(?P<overrides>[^{}]*)\})?$"
)
PRIMARY = re.compile(r"^(?P<a>.+?)\s+-\s+(?P<b>.+?)\s*@\s*(?P<metric>[a-z_]+)$")
# what a primary comparison may be made on: the scores, not their standard errors
PRIMARY_METRICS = (LOCAL_T, EXPECTED_LOCAL_T, GLOBAL_T, GLOBAL_T_BALANCED, ABSENT_CLASS)
PARTITION = re.compile(
    r"^(?:(?P<dataset>[A-Za-z0-9][\w./-]*)/)?"
    r"(?P<kind>dirichlet-client|dirichlet|shard|iid)(?::(?P<value>[^/]+))?$"
)


@dataclass(frozen=True)
class GridOptions(MethodOptions):
    """The ``[grid]`` section, the runner's own: validated here; a single run
    (``flwr run``) passes it by."""

    SECTION = RUNNER_SECTION

    variants: str = ""
    datasets: str = ""
    data_root: str = ""
    partitions: str = ""
    seeds: str = ""
    clients: int = 10
    cpus_per_client: float = 1.0
    gpus_per_client: float = 0.0
    primary: str = ""

    def __post_init__(self) -> None:
        self.check_positive("clients", "cpus-per-client")
        self.check_non_negative("gpus-per-client")
        if self.clients < 2:
            self.fail("clients", "a ring needs at least 2 nodes")
        for item in _items(self.variants):
            if not VARIANT.match(item):
                self.fail(
                    "variants",
                    f"{item!r} is not method[+isolated][@topology][{{key=value;...}}]",
                )
        for item in _items(self.datasets):
            if not DATASET_NAME.match(item):
                self.fail(
                    "datasets",
                    f"{item!r} is not one of {', '.join(DATASETS)} nor a dataset name (owner/name)",
                )
        for item in _items(self.partitions):
            if not PARTITION.match(item):
                self.fail(
                    "partitions",
                    f"{item!r} is not dirichlet:<beta>, dirichlet-client:<beta>, "
                    "shard:<classes>, iid "
                    "(optionally <dataset>/ in front)",
                )
        for item in _items(self.seeds):
            if not re.fullmatch(r"-?\d+", item):
                self.fail("seeds", f"{item!r} is not an integer")
        self.primary_comparisons()  # raises on malformed entries

    def primary_comparisons(self) -> list[PrimaryComparison]:
        """``primary`` parsed; that ``a`` and ``b`` are variants is checked by
        :func:`load_grid`, which knows the variants."""
        comparisons = []
        for item in _items(self.primary):
            match = PRIMARY.match(item)
            if not match:
                self.fail("primary", f"{item!r} is not 'a - b @ metric'")
            if match["metric"] not in PRIMARY_METRICS:
                self.fail(
                    "primary",
                    f"{item!r}: metric {match['metric']!r} is not one of "
                    f"{', '.join(PRIMARY_METRICS)}",
                )
            comparisons.append(PrimaryComparison(match["a"], match["b"], match["metric"]))
        return comparisons


@dataclass(frozen=True)
class PrimaryComparison:
    """One comparison declared before the runs: ``a - b`` on ``metric``."""

    a: str
    b: str
    metric: str

    @property
    def text(self) -> str:
        return f"{self.a} - {self.b} @ {self.metric}"


KEY_SOURCES.append(lambda: GridOptions().to_section())  # for the did-you-mean of a typo


@dataclass(frozen=True)
class Partition:
    """One partition setting, as the paper's column headers name it."""

    kind: str  # dirichlet | dirichlet-client | shard | iid
    value: float | int | None = None

    @property
    def key(self) -> str:
        """Stable text form (``dirichlet:0.1``), used in run ids and CSV files."""
        return self.kind if self.value is None else f"{self.kind}:{self.value:g}"

    @property
    def label(self) -> str:
        """The paper's notation: β = 0.1, s = 4, IID."""
        if self.kind == "dirichlet":
            return f"β = {self.value:g}"
        if self.kind == "dirichlet-client":
            return f"β = {self.value:g} per client"
        if self.kind == "shard":
            return f"s = {self.value}"
        return "IID"

    def run_config(self) -> dict[str, Any]:
        if self.kind in ("dirichlet", "dirichlet-client"):
            return {"partitioner": self.kind, "dirichlet-beta": float(self.value)}
        if self.kind == "shard":
            return {"partitioner": "shard", "classes-per-client": int(self.value)}
        return {"partitioner": "iid"}

    @classmethod
    def of(cls, cfg: RunConfig) -> Partition:
        if cfg.partitioner in ("dirichlet", "dirichlet-client"):
            return cls(cfg.partitioner, cfg.dirichlet_beta)
        if cfg.partitioner == "shard":
            return cls("shard", cfg.classes_per_client)
        return cls("iid")


@dataclass(frozen=True)
class GridRun:
    """One run of a grid: where it sits in the tables and the exact config it runs."""

    variant: str
    dataset: str
    partition: Partition
    seed: int
    cfg: RunConfig

    @property
    def run_id(self) -> str:
        """Folder name under ``<out>/runs``; unique within a grid, filesystem-safe."""
        variant = file_safe(self.variant.replace('"', ""))
        partition = self.partition.key.replace(":", "-")
        return f"{variant}__{file_safe(self.dataset)}__{partition}__seed{self.seed}"


def file_safe(text: str) -> str:
    """``text`` as part of a file name: runs of other characters than letters, digits and
    ``.=+@-`` as one ``_`` (a hub name's ``/``); the built-in dataset names unchanged."""
    return re.sub(r"[^A-Za-z0-9.=+@-]+", "_", text).strip("_")


@dataclass(frozen=True)
class Grid:
    """A conf file's runs, in the order they run (variants innermost, so a partly done
    grid already fills whole columns of the tables)."""

    name: str
    source: Path
    base: RunConfig
    options: GridOptions
    runs: tuple[GridRun, ...]


def load_grid(path: str | Path, overrides: dict[str, Any] | None = None) -> Grid:
    """Read ``path`` (a conf file), apply run-config ``overrides`` to its base config, and
    expand its ``[grid]`` table. Every run's config is validated here, before anything
    runs, so a typo fails in the first second rather than an hour into the grid."""
    path = Path(path)
    base = RunConfig.from_toml(path)
    if overrides:
        base = base.with_values(overrides)
    options = base.options(GridOptions)
    variants = _items(options.variants) or [base.method]
    datasets = _items(options.datasets) or [base.dataset]
    seeds = [int(s) for s in _items(options.seeds)] or [base.seed]
    runs = []
    # every seed of a variant before the next variant: an interrupted grid then has whole
    # cells (intervals over seeds) rather than one seed of everything
    for dataset in datasets:
        data_dir = _data_dir(options, dataset, base)
        if dataset not in DATASETS and "/" not in dataset and not data_dir:
            raise ConfigError(
                "grid.datasets",
                dataset,
                f"is not built in ({', '.join(DATASETS)}), nor a hub name (owner/name), nor "
                "a folder under grid.data-root",
            )
        for partition in _partitions(options, dataset, base):
            for variant in variants:
                for seed in seeds:
                    values = {
                        **base.to_run_config(),
                        **_variant_values(variant),
                        **partition.run_config(),
                        "dataset": dataset,
                        "data-dir": data_dir,
                        "seed": seed,
                    }
                    try:
                        cfg = RunConfig.from_run_config(values)
                        check_run_config(cfg)
                    except ConfigError as err:
                        raise ConfigError(
                            err.key,
                            err.value,
                            f"{err.reason} (grid run {variant}, {dataset}, {partition.key}, "
                            f"seed {seed})",
                        ) from None
                    runs.append(GridRun(variant, dataset, partition, seed, cfg))
    for comparison in options.primary_comparisons():
        unknown = [v for v in (comparison.a, comparison.b) if v not in variants]
        if unknown:
            raise ConfigError(
                "grid.primary",
                comparison.text,
                f"names {', '.join(map(repr, unknown))}, not a variant of the grid "
                f"({', '.join(variants)})",
            )
    ids = [run.run_id for run in runs]
    if len(set(ids)) != len(ids):
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        raise ConfigError("grid", duplicates, "the grid names the same run twice")
    return Grid(path.stem, path, base, options, tuple(runs))


def _items(text: str) -> list[str]:
    """Comma-separated items; commas inside ``{...}`` belong to the item."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += char == "{"
        depth -= char == "}"
        if char == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += char
    items.append(current.strip())
    return [item for item in items if item]


def _variant_values(variant: str) -> dict[str, Any]:
    match = VARIANT.match(variant)
    assert match is not None  # GridOptions validated the syntax
    values: dict[str, Any] = {"method": match["method"], "isolated": bool(match["isolated"])}
    if match["topology"]:
        values["topology"] = match["topology"]
    for pair in (match["overrides"] or "").split(";"):
        if not pair.strip():
            continue
        key, eq, raw = pair.partition("=")
        if not eq:
            raise ConfigError("grid.variants", variant, f"{pair!r} is not key=value")
        values[key.strip()] = _toml_value(raw.strip())
    return values


def _toml_value(raw: str) -> Any:
    """A TOML scalar (``0.3``, ``true``, ``"x"``); a bare word is a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _partitions(options: GridOptions, dataset: str, base: RunConfig) -> list[Partition]:
    chosen = []
    for item in _items(options.partitions):
        match = PARTITION.match(item)
        assert match is not None
        if match["dataset"] and match["dataset"] != dataset:
            continue
        kind, value = match["kind"], match["value"]
        if kind == "iid":
            chosen.append(Partition("iid"))
            continue
        try:
            number = float(value) if kind.startswith("dirichlet") else int(value)
        except (TypeError, ValueError):
            raise ConfigError("grid.partitions", item, f"{kind} needs a number") from None
        chosen.append(Partition(kind, number))
    return chosen or [Partition.of(base)]


def _data_dir(options: GridOptions, dataset: str, base: RunConfig) -> str:
    if options.data_root:
        folder = Path(options.data_root).expanduser() / dataset
        return str(folder.resolve()) if folder.is_dir() else ""
    return base.data_dir if dataset == base.dataset else ""
