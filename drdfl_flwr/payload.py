"""What crosses the wire: tensors <-> ArrayRecord, validation of received payloads, byte counts.

The relay counts bytes on the serialized protobuf of each message's content, i.e. the
bytes Flower actually puts on the wire for it, not a back-of-the-envelope
``numel * 4``; :func:`num_parameters` gives the paper's parameter count beside it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

Tensors = dict[str, torch.Tensor]

# Record names in the messages exchanged between the relay and the ClientApp.
OUT_PAYLOAD = "payload"  # node -> relay: what the node shares this round
IN_PAYLOAD_PREFIX = "in-payload."  # relay/hub -> node: one record per sender
IN_META_PREFIX = "in-meta."  # beside each: who sent it, with what weight, peer or hub
HUB = "hub"  # sender name of the hub's aggregate
CONFIG = "config"
EVALUATE_KEY = "evaluate"  # in a train message's config: evaluate after training
ARTIFACTS = "artifacts"  # train config flag (last round) and the reply record it asks for:
# images a learner makes for the results folder; they go to the relay, never to a peer
METRICS = "metrics"
PEER, AGGREGATE = "peer", "hub"  # Incoming.origin


class PayloadError(ValueError):
    """A payload received from a neighbour does not fit this node's model."""


def to_array_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def from_array_record(record: ArrayRecord) -> Tensors:
    return {k: torch.from_numpy(v.numpy().copy()) for k, v in record.items()}


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


def in_payload_name(sender: int | str) -> str:
    """Record name of what a node receives from ``sender`` (a ring position or ``HUB``)."""
    return f"{IN_PAYLOAD_PREFIX}{sender}"


def add_incoming(content: RecordDict, sender: int | str, payload: ArrayRecord, weight: float):
    """Put one sender's payload and its description into a train message's content."""
    content[in_payload_name(sender)] = payload
    origin = AGGREGATE if sender == HUB else PEER
    content[f"{IN_META_PREFIX}{sender}"] = ConfigRecord({"weight": float(weight), "origin": origin})


def received_payloads(content: RecordDict) -> list[Incoming]:
    """What a train message brings, peers ordered by ring position (numerically:
    ``in-payload.2`` before ``in-payload.10``), the hub's aggregate last."""
    senders: list[int | str] = []
    for name in content.array_records:
        if not name.startswith(IN_PAYLOAD_PREFIX):
            continue
        suffix = name.removeprefix(IN_PAYLOAD_PREFIX)
        if suffix != HUB and not suffix.isdigit():
            raise PayloadError(f"received record {name!r} does not name a sender")
        senders.append(suffix if suffix == HUB else int(suffix))
    ordered = sorted(senders, key=lambda s: (s == HUB, s if s != HUB else 0))
    incoming = []
    for sender in ordered:
        meta = content.config_records.get(f"{IN_META_PREFIX}{sender}", ConfigRecord())
        weight = meta.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise PayloadError(f"sender {sender} comes with an invalid weight {weight!r}")
        incoming.append(
            Incoming(
                tensors=from_array_record(content.array_records[in_payload_name(sender)]),
                sender=-1 if sender == HUB else int(sender),
                weight=float(weight),
                origin=AGGREGATE if sender == HUB else PEER,
            )
        )
    return incoming


def peers(*payloads: Mapping[str, torch.Tensor], weight: float = 1.0) -> list[Incoming]:
    """Payloads as if received from peers 0, 1, ... (tests, notebooks, in-process runs)."""
    return [Incoming(dict(p), i, weight, PEER) for i, p in enumerate(payloads)]


def from_hub(aggregate: Mapping[str, torch.Tensor], weight: float = 1.0) -> list[Incoming]:
    """An aggregate as if broadcast by the hub."""
    return [Incoming(dict(aggregate), -1, weight, AGGREGATE)]


def check_payload(received: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]):
    """Raise :class:`PayloadError` naming the first key that is missing, extra, misshapen or
    not finite. Run before anything is applied, so a bad payload changes nothing."""
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


def num_parameters(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(math.prod(t.shape) for t in tensors.values())


def content_bytes(content: RecordDict) -> int:
    """Bytes of the serialized message content (Flower's protobuf encoding)."""
    return recorddict_to_proto(content).ByteSize()
