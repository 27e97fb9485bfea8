"""Readable names for a grid's variants, as the figures and the papers write them.

A variant string (``drdfl+isolated``, ``drdfl{mode="sequential"}``,
``fedbn{classifier-norm="batch"}``, ``drdfl@random-k{topology-k=1}``) is parsed by the
grid's own parser (:func:`drdfl_flwr.experiments.grid._variant_values`) and written as
the method's name in the papers' spelling followed by its qualifiers in brackets:
``DRDFL (isolated)``, ``DRDFL (sequential)``, ``FedBN (batch norm)``,
``DRDFL (random-k, k=1)``; the method's name is the ``title`` on its
:class:`~drdfl_flwr.spec.MethodSpec`. The tables keep the variant strings (they are what
the conf file says); every figure uses these names.
"""

from __future__ import annotations

from typing import Any

from drdfl_flwr.config import ConfigError
from drdfl_flwr.experiments.grid import VARIANT, _variant_values
from drdfl_flwr.registry import METHODS, method_spec

# run-config keys with a shorter wording than key=value
KEY_NAMES = {"num-server-rounds": "rounds", "topology-k": "k", "local-epochs": "epochs"}
ISOLATED = "isolated"
STRUCTURAL = ("method", "isolated", "topology")


def method_name(method: str) -> str:
    """``fedbn`` -> ``FedBN``: the ``title`` on the method's spec (imports that one method);
    an unknown method keeps its key."""
    if method not in METHODS:
        return method
    return method_spec(method).title


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def override_text(key: str, value: Any, method: str = "") -> str:
    """One ``key=value`` override as a reader would say it: ``mode="sequential"`` ->
    ``sequential``, ``classifier-norm="batch"`` -> ``batch norm``,
    ``drdfl.ablation="no-pr"`` -> ``ablation no-pr``; otherwise ``key=value`` with the
    method's own section dropped from the key (``fedfed.distill-rounds=1`` ->
    ``distill-rounds=1``)."""
    text = _value_text(value)
    if key == "mode":
        return text
    if key == "classifier-norm":
        return f"{text} norm"
    section, dot, name = key.partition(".")
    if dot and section in (method, method.split("-")[0]):
        key = name
    if key == "ablation":
        return f"ablation {text}"
    return f"{KEY_NAMES.get(key, key)}={text}"


def display_name(variant: str) -> str:
    """A variant string as the figures name it: ``drdfl+isolated`` -> ``DRDFL
    (isolated)``, ``drdfl{mode="sequential"}`` -> ``DRDFL (sequential)``,
    ``fedbn{classifier-norm="batch"}`` -> ``FedBN (batch norm)``, ``drdfl@full`` ->
    ``DRDFL (full)``. A string that is not a variant is returned unchanged."""
    if not VARIANT.match(variant):
        return variant
    try:
        values = _variant_values(variant)
    except ConfigError:
        return variant
    method = values["method"]
    qualifiers = [ISOLATED] if values["isolated"] else []
    if "topology" in values:
        qualifiers.append(str(values["topology"]))
    qualifiers += [
        override_text(key, value, method) for key, value in values.items() if key not in STRUCTURAL
    ]
    name = method_name(method)
    return f"{name} ({', '.join(qualifiers)})" if qualifiers else name


def base_variant(variant: str) -> str:
    """The shared variant an ``+isolated`` variant is the twin of (itself otherwise)."""
    return variant.replace("+" + ISOLATED, "", 1)


def is_isolated(variant: str) -> bool:
    return "+" + ISOLATED in variant
