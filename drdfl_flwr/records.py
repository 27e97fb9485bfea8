"""Tensors <-> Flower's records, on the node: what the ClientApp decodes from a train
message into :class:`~drdfl_flwr.payload.Incoming` and encodes back as its payload.

Decoding is the first line of the node's trust boundary: a record that does not decode
to numeric arrays costs only its sender's payload, with a reason naming the sender and
the key (:func:`decode_received`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from drdfl_flwr.payload import AGGREGATE, PEER, Incoming, PayloadError, Tensors
from strategies.wire import (
    HUB,
    IN_PAYLOAD_PREFIX,
    ORIGIN,
    ORIGIN_HUB,
    ORIGIN_PEER,
    WEIGHT,
    in_meta_name,
    in_payload_name,
)


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


def decode_received(content: RecordDict) -> tuple[list[Incoming], dict[str, str]]:
    """Every sender's payload in a train message, decoded on its own: the ones that decode
    (peers ordered by ring position, numerically, the hub's aggregate last) and, for the
    others, the reason by sender name: a record that decodes to no numeric arrays, an
    invalid weight, or an in-meta origin that contradicts the record's name (the hub's
    aggregate is named ``hub``; a peer's, by its ring position). One bad sender costs
    only its own payload."""
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
        meta = content.config_records.get(in_meta_name(sender), ConfigRecord())
        weight = meta.get(WEIGHT, 1.0)
        if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            rejections[str(sender)] = f"sender {sender} comes with an invalid weight {weight!r}"
            continue
        origin = meta.get(ORIGIN, ORIGIN_HUB if sender == HUB else ORIGIN_PEER)
        if origin != (ORIGIN_HUB if sender == HUB else ORIGIN_PEER):
            rejections[str(sender)] = f"sender {sender} comes with the origin {origin!r}"
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
