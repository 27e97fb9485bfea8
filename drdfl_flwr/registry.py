"""One registry: method name -> the module that holds its learner and its :class:`MethodSpec`.

Adding a method is one new file that ends with ``SPEC = MethodSpec(...)`` plus one line in
:data:`METHODS`. The names can be listed (and a wrong ``method`` refused) without importing
any method; :func:`check_run_config`, run once at start-up, imports every method, because
every method's config section is validated, whichever method runs. It sits above the
methods (it finds them by name) and below the apps; it knows no runner: the experiment
runner's ``[grid]`` section (:data:`~drdfl_flwr.config.RUNNER_SECTION`) is the runner's
to validate.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from drdfl_flwr.config import (
    KEY_SOURCES,
    RUNNER_SECTION,
    ConfigError,
    MethodOptions,
    RunConfig,
    unknown_key,
)
from drdfl_flwr.learner import Learner, derived_seed
from drdfl_flwr.spec import MethodSpec

# name -> module defining SPEC. The papers' three methods live in drdfl_flwr/methods,
# the comparison methods in baselines/.
METHODS: dict[str, str] = {
    "drdfl": "drdfl_flwr.methods.drdfl",
    "dfml": "drdfl_flwr.methods.dfml",
    "dslth": "drdfl_flwr.methods.dslth",
    "local": "baselines.local",
    "fedavg": "baselines.fedavg",
    "fedprox": "baselines.fedprox",
    "drdfl-vf": "drdfl_flwr.methods.drdfl_vf",
    "drdfl-cfl": "baselines.drdfl_cfl",
    "fednova": "baselines.fednova",
    "fedfed": "baselines.fedfed",
    "dfedpgp": "baselines.dfedpgp",
    "dispfl": "baselines.dispfl",
    "cvae": "baselines.cvae",
    "fedrep": "baselines.fedrep",
    "fedbn": "baselines.fedbn",
    "fedper": "baselines.fedper",
}

# Methods taken out of the registry -> why, and where their record and code still are: a
# config or an archived grid that names one is told so, not only "unknown".
REMOVED: dict[str, str] = {
    "drdfl-gen": (
        "was removed (issue 29): drdfl-vf superseded it; its measured record is in "
        'benchmarks/RESULTS.md ("DRDFL-Gen") and benchmarks/archive/drdfl-gen, its code in '
        "git: git show 0f9e0e7:drdfl_flwr/methods/drdfl_gen.py"
    ),
}


def method_spec(name: str) -> MethodSpec:
    try:
        module_name = METHODS[name]
    except KeyError:
        if name in REMOVED:
            raise ConfigError("method", name, REMOVED[name]) from None
        raise ConfigError("method", name, f"must be one of {', '.join(METHODS)}") from None
    spec = importlib.import_module(module_name).SPEC
    if spec.name != name:
        raise RuntimeError(f"{module_name}.SPEC is named {spec.name!r}, registered as {name!r}")
    return spec


def option_classes() -> dict[str, type[MethodOptions]]:
    """Section name -> options class, over every registered method (sections may be
    shared: drdfl-cfl reads the drdfl section)."""
    classes: dict[str, type[MethodOptions]] = {}
    for name in METHODS:
        options = method_spec(name).options
        if options is not None:
            classes[options.SECTION] = options
    return classes


def section_keys() -> list[str]:
    """Every method section's keys, as run-config keys (``drdfl.noise-variance``)."""
    return [key for options in option_classes().values() for key in options().to_section()]


KEY_SOURCES.append(section_keys)  # for the did-you-mean of an unknown key


def resolved_topology(cfg: RunConfig) -> str:
    """``auto``: the star for centralized methods, the directed ring otherwise."""
    if cfg.topology != "auto":
        return cfg.topology
    return "star" if method_spec(cfg.method).centralized else "ring"


def check_run_config(cfg: RunConfig) -> None:
    """The whole run config, once at start-up: the method exists, every section is a
    known one with valid values (absent ones take their defaults), and the method fits
    the generic keys (classifier, topology, mode, its own cross-key checks)."""
    spec = method_spec(cfg.method)
    classes = option_classes()
    for section, values in cfg.sections.items():
        if section not in classes and section != RUNNER_SECTION:
            name, value = next(iter(values.items()))
            raise unknown_key(
                f"{section}.{name}",
                value,
                f"unknown section {section!r}; sections are "
                f"{', '.join(sorted([*classes, RUNNER_SECTION]))}",
            )
    for options in classes.values():
        cfg.options(options)
    check_method_fits(cfg, spec)
    hub_reducer(cfg)  # a robust reduction the method cannot take is refused here


def check_method_fits(cfg: RunConfig, spec: MethodSpec) -> None:
    """Cross-checks between the method and the generic keys (classifier, topology, mode)."""
    if cfg.classifier not in spec.classifiers:
        raise ConfigError(
            "classifier", cfg.classifier, f"{spec.name} needs one of {', '.join(spec.classifiers)}"
        )
    topology = resolved_topology(cfg)
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


def recorded_run_config(cfg: RunConfig) -> dict[str, Any]:
    """The run config as a run's record holds it: every generic key and every method
    section's keys, defaults included (``run_config.json``), so that a record says what
    ran even after a default changes. The runner's section is the runner's record."""
    flat = {k: v for k, v in cfg.to_run_config().items() if "." not in k}
    for options in option_classes().values():
        flat.update(cfg.options(options).to_section())
    return flat


def build_learner(
    cfg: RunConfig, input_shape: tuple[int, int, int], num_classes: int, partition_id: int = 0
) -> Learner:
    """Instantiate the configured method, checked against the generic keys: shared
    modules from the run's common stream (:meth:`Learner.common_init`), private ones from
    this node's own."""
    spec = method_spec(cfg.method)
    check_method_fits(cfg, spec)
    torch.manual_seed(derived_seed("private", cfg.seed, partition_id))
    return spec.learner(
        cfg, input_shape, num_classes, partition_id=partition_id, centralized=spec.centralized
    )


def hub_reducer(cfg: RunConfig):
    """The hub's reduction for ``cfg``: the method's own, or, with ``hub-reduction`` other
    than mean, Flower's robust one in place of the weighted mean (a method with a reducer
    of its own, FedNova's or FedFed's, cannot swap it: refused by name)."""
    from strategies.reducers import weighted_mean

    reducer = method_spec(cfg.method).reducer
    if cfg.hub_reduction == "mean" or reducer is None:
        return reducer
    if reducer is not weighted_mean:
        raise ConfigError(
            "hub-reduction",
            cfg.hub_reduction,
            f"{cfg.method} reduces with its own reducer ({reducer.__name__}); a robust "
            "reduction replaces only the weighted mean",
        )
    from strategies.robust import robust_reducer

    return robust_reducer(cfg.hub_reduction)
