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
REJECTIONS = "rejections"  # node -> relay: sender name -> why its payload was refused
PEER, AGGREGATE = "peer", "hub"  # Incoming.origin


class PayloadError(ValueError):
    """A payload received from a neighbour does not fit this node's model."""


def to_array_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


DECODABLE_KINDS = "fiub"  # numpy dtype kinds a payload may hold: float, int, uint, bool


def from_array_record(record: ArrayRecord, sender: int | str | None = None) -> Tensors:
    """The record's arrays as tensors; :class:`PayloadError` naming the key (and the
    sender, when given) for anything that does not decode to a numeric array: truncated
    or garbage bytes, a bad header, an unknown storage type, object or complex dtypes."""
    origin = "" if sender is None else f" from sender {sender}"
    tensors: Tensors = {}
    for key, array in record.items():
        try:
            values = array.numpy()
            if values.dtype.kind not in DECODABLE_KINDS:
                raise TypeError(f"dtype {values.dtype} is not a numeric tensor type")
            if tuple(values.shape) != tuple(array.shape):
                raise ValueError(f"header says shape {tuple(array.shape)}, data {values.shape}")
            tensors[key] = torch.from_numpy(values.copy())
        except PayloadError:
            raise
        except Exception as err:  # noqa: BLE001 - any decoder failure is the sender's fault
            raise PayloadError(
                f"payload{origin}: array {key!r} cannot be decoded ({type(err).__name__}: {err})"
            ) from None
    return tensors


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


def decode_received(content: RecordDict) -> tuple[list[Incoming], dict[str, str]]:
    """Every sender's payload in a train message, decoded on its own: the ones that decode
    (peers ordered by ring position, numerically, the hub's aggregate last) and, for the
    others, the reason by sender name. One bad sender costs only its own payload."""
    senders: list[int | str] = []
    rejections: dict[str, str] = {}
    for name in content.array_records:
        if not name.startswith(IN_PAYLOAD_PREFIX):
            continue
        suffix = name.removeprefix(IN_PAYLOAD_PREFIX)
        if suffix != HUB and not suffix.isdigit():
            rejections[suffix] = f"received record {name!r} does not name a sender"
            continue
        senders.append(suffix if suffix == HUB else int(suffix))
    ordered = sorted(senders, key=lambda s: (s == HUB, s if s != HUB else 0))
    incoming = []
    for sender in ordered:
        meta = content.config_records.get(f"{IN_META_PREFIX}{sender}", ConfigRecord())
        weight = meta.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            rejections[str(sender)] = f"sender {sender} comes with an invalid weight {weight!r}"
            continue
        try:
            tensors = from_array_record(content.array_records[in_payload_name(sender)], sender)
        except PayloadError as err:
            rejections[str(sender)] = str(err)
            continue
        incoming.append(
            Incoming(
                tensors=tensors,
                sender=-1 if sender == HUB else int(sender),
                weight=float(weight),
                origin=AGGREGATE if sender == HUB else PEER,
            )
        )
    return incoming, rejections


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


def content_bytes(content: RecordDict) -> int:
    """Bytes of the serialized message content (Flower's protobuf encoding)."""
    return recorddict_to_proto(content).ByteSize()
