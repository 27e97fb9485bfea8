"""What crosses the wire: tensors <-> ArrayRecord, validation of received payloads, byte counts.

The relay counts bytes on the serialized protobuf of each message's content, i.e. the
bytes Flower actually puts on the wire for it, not a back-of-the-envelope
``numel * 4``; :func:`num_parameters` gives the paper's parameter count beside it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

Tensors = dict[str, torch.Tensor]

# Record names in the messages exchanged between the relay and the ClientApp.
OUT_PAYLOAD = "payload"  # node -> relay: what the node shares this round
IN_PAYLOAD_PREFIX = "in-payload."  # relay -> node: one record per in-neighbour
CONFIG = "config"
METRICS = "metrics"


class PayloadError(ValueError):
    """A payload received from a neighbour does not fit this node's model."""


def to_array_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def from_array_record(record: ArrayRecord) -> Tensors:
    return {k: torch.from_numpy(v.numpy().copy()) for k, v in record.items()}


def in_payload_name(sender_position: int) -> str:
    """Record name of the payload a node receives from the sender at ``sender_position``."""
    return f"{IN_PAYLOAD_PREFIX}{sender_position}"


def received_payloads(content: RecordDict) -> list[Tensors]:
    """The in-neighbours' payloads of a train message, ordered by sender ring position
    (numerically: ``in-payload.2`` before ``in-payload.10``)."""
    positions = []
    for name in content.array_records:
        if not name.startswith(IN_PAYLOAD_PREFIX):
            continue
        suffix = name.removeprefix(IN_PAYLOAD_PREFIX)
        if not suffix.isdigit():
            raise PayloadError(f"received record {name!r} does not name a sender position")
        positions.append(int(suffix))
    return [from_array_record(content.array_records[in_payload_name(p)]) for p in sorted(positions)]


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
