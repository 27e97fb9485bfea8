"""What a node receives and sends, as tensors: the :class:`Incoming` a learner takes in,
the checks every received payload passes before anything is applied, and the paper's
parameter count. Plain PyTorch: the conversion to Flower's records and the record names
are the app's (:mod:`drdfl_flwr.records`, :mod:`strategies.wire`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

Tensors = dict[str, torch.Tensor]
PEER, AGGREGATE = "peer", "hub"  # Incoming.origin


class PayloadError(ValueError):
    """A payload received from a neighbour does not fit this node's model."""


@dataclass(frozen=True)
class Incoming:
    """One thing a node receives: a peer's payload or the hub's aggregate.

    ``sender`` is the peer's ring position (= partition id), -1 for the hub; ``weight``
    is what the sender trained on (its examples; for the hub, the total over the nodes
    it reduced), so a method can weight a merge without asking anyone.
    """

    tensors: Tensors
    sender: int
    weight: float
    origin: str  # PEER or AGGREGATE

    @property
    def from_hub(self) -> bool:
        return self.origin == AGGREGATE


def peers(*payloads: Mapping[str, torch.Tensor], weight: float = 1.0) -> list[Incoming]:
    """Payloads as if received from peers 0, 1, ... (tests, notebooks, in-process runs)."""
    return [Incoming(dict(p), i, weight, PEER) for i, p in enumerate(payloads)]


def from_hub(aggregate: Mapping[str, torch.Tensor], weight: float = 1.0) -> list[Incoming]:
    """An aggregate as if broadcast by the hub."""
    return [Incoming(dict(aggregate), -1, weight, AGGREGATE)]


def check_payload(received: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]):
    """Raise :class:`PayloadError` naming the first key that is missing, extra, misshapen,
    not finite or absurdly large (:func:`sane_magnitude`). Run before anything is applied,
    so a bad payload changes nothing."""
    missing = sorted(set(expected) - set(received))
    extra = sorted(set(received) - set(expected))
    if missing or extra:
        raise PayloadError(f"payload keys differ: missing {missing[:5]}, unexpected {extra[:5]}")
    for key, ref in expected.items():
        got = received[key]
        if not isinstance(got, torch.Tensor):
            raise PayloadError(f"payload '{key}' is a {type(got).__name__}, not a tensor")
        if got.is_floating_point() != ref.is_floating_point():
            raise PayloadError(f"payload '{key}' has dtype {got.dtype}, expected {ref.dtype}")
        if tuple(got.shape) != tuple(ref.shape):
            raise PayloadError(
                f"payload '{key}' has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
            )
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise PayloadError(f"payload '{key}' holds NaN or infinite values")
        if got.is_floating_point() and got.numel():
            limit = sane_magnitude(ref)
            largest = got.abs().max().item()
            if largest > limit:
                raise PayloadError(
                    f"payload '{key}' holds a value of magnitude {largest:.3g}, above the sane "
                    f"bound {limit:.3g} set from this node's own tensor"
                )


MAGNITUDE_FACTOR = 1e3  # how far a received tensor may exceed the node's own in magnitude
UNREFERENCED_LIMIT = 1e6  # the bound where the node holds no values of that kind


def sane_magnitude(own: torch.Tensor) -> float:
    """The largest magnitude accepted for a received tensor of this kind: a thousand times
    the node's own largest value, plus one. Peers train the same modules on similar data,
    so honest tensors stay within a small factor; a Learngene of 1e30 does not, and would
    turn the node's private state into NaN within a step. Where the node has only the
    shape (a model of an architecture it does not run), the bound is absolute."""
    if own.is_meta or not own.numel():  # a shape-only reference (DFML's other architectures)
        return UNREFERENCED_LIMIT
    return MAGNITUDE_FACTOR * (own.detach().abs().max().item() + 1.0)


def num_parameters(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(math.prod(t.shape) for t in tensors.values())
