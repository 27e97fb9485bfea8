"""One registry: method name -> the module that holds its learner and its :class:`MethodSpec`.

Adding a method is one new file that ends with ``SPEC = MethodSpec(...)`` plus one line in
:data:`METHODS`. The names can be listed (and a wrong ``method`` refused) without importing
any method; validating a run config imports every method once, because every method's
config section is validated, whichever method runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from drdfl_flwr.config import DENSE_CLASSIFIERS, ConfigError, MethodOptions

if TYPE_CHECKING:
    from drdfl_flwr.config import RunConfig

# name -> module defining SPEC. The papers' three methods live in drdfl_flwr/methods,
# the comparison methods in baselines/.
METHODS: dict[str, str] = {
    "drdfl": "drdfl_flwr.methods.drdfl",
    "dfml": "drdfl_flwr.methods.dfml",
    "dslth": "drdfl_flwr.methods.dslth",
    "local": "baselines.local",
    "fedavg": "baselines.fedavg",
    "fedprox": "baselines.fedprox",
    "drdfl-gen": "drdfl_flwr.methods.drdfl_gen",
    "drdfl-cfl": "baselines.drdfl_cfl",
    "fednova": "baselines.fednova",
    "fedfed": "baselines.fedfed",
    "dfedpgp": "baselines.dfedpgp",
    "dispfl": "baselines.dispfl",
    "cvae": "baselines.cvae",
    "fedrep": "baselines.fedrep",
    "fedbn": "baselines.fedbn",
}


@dataclass(frozen=True)
class MethodSpec:
    """What the rest of the app needs to know about a method.

    ``reducer`` names the hub's reduction (:data:`strategies.reducers.REDUCERS`) for a
    centralized method; ``None`` means decentralized: peers' payloads are routed by the
    relay and never averaged by anyone but the receiving node.
    ``personalized`` says in words which part stays on the node (the paper's Table 1
    column), for the experiment runner's communication table. ``reads`` names other
    methods' sections the method also reads (an extension configured on top of its base).
    """

    name: str
    learner: type
    personalized: str  # what stays on the node, for the communication table (Table 1)
    options: type[MethodOptions] | None = None
    reducer: str | None = None
    classifiers: tuple[str, ...] = DENSE_CLASSIFIERS
    check: Callable[[RunConfig], None] | None = None  # cross-key checks beyond the section
    reads: tuple[str, ...] = ()  # other methods' sections this one also reads (drdfl-gen)

    @property
    def sections(self) -> tuple[str, ...]:
        """Every config section the method's results depend on."""
        own = (self.options.SECTION,) if self.options is not None else ()
        return own + self.reads

    @property
    def centralized(self) -> bool:
        return self.reducer is not None


def method_spec(name: str) -> MethodSpec:
    try:
        module_name = METHODS[name]
    except KeyError:
        raise ConfigError("method", name, f"must be one of {', '.join(METHODS)}") from None
    spec = importlib.import_module(module_name).SPEC
    if spec.name != name:
        raise RuntimeError(f"{module_name}.SPEC is named {spec.name!r}, registered as {name!r}")
    return spec


def option_classes() -> dict[str, type[MethodOptions]]:
    """Section name -> options class, over every registered method (sections may be shared:
    drdfl-cfl reads the drdfl section), plus the experiment runner's ``grid`` section."""
    from drdfl_flwr.experiments.grid import GridOptions

    classes: dict[str, type[MethodOptions]] = {GridOptions.SECTION: GridOptions}
    for name in METHODS:
        options = method_spec(name).options
        if options is not None:
            classes[options.SECTION] = options
    return classes


def parse_sections(raw: Mapping[str, Any]) -> dict[str, MethodOptions]:
    """Every known section's validated options; absent sections take their defaults."""
    classes = option_classes()
    for section, values in raw.items():
        if section not in classes:
            first = next(iter(values), "") if isinstance(values, Mapping) else ""
            raise ConfigError(
                f"{section}.{first}",
                values,
                f"unknown section {section!r}; sections are {', '.join(sorted(classes))}",
            )
    parsed = {}
    for section, cls in classes.items():
        values = raw.get(section, {})
        parsed[section] = values if isinstance(values, cls) else cls.from_section(values)
    return parsed


def check_method_fits(cfg: RunConfig) -> None:
    """Cross-checks between the method and the generic keys (classifier, topology, mode)."""
    spec = method_spec(cfg.method)
    if cfg.classifier not in spec.classifiers:
        raise ConfigError(
            "classifier", cfg.classifier, f"{spec.name} needs one of {', '.join(spec.classifiers)}"
        )
    topology = cfg.resolved_topology
    if spec.centralized:
        if topology != "star":
            raise ConfigError(
                "topology", cfg.topology, f"{spec.name} is centralized: it runs on the star"
            )
        if cfg.mode != "synchronous":
            raise ConfigError("mode", cfg.mode, f"{spec.name} is centralized: synchronous only")
    elif topology == "star":
        hubs = ", ".join(n for n in METHODS if method_spec(n).centralized)
        raise ConfigError(
            "topology",
            cfg.topology,
            f"{spec.name} is decentralized and has no hub reducer; the star runs {hubs}",
        )
    if spec.check is not None:
        spec.check(cfg)
