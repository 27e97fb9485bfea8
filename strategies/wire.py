"""The wire protocol between the ServerApp's routers and the ClientApp: record names and
how a router puts one sender's payload into a node's train message.

Both sides import these names from here, so a renamed record cannot leave one side
talking past the other. Flower only: the routers never decode a payload.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.serde import message_to_proto, recorddict_to_proto

OUT_PAYLOAD = "payload"  # node -> router: what the node shares this round
IN_PAYLOAD_PREFIX = "in-payload."  # router -> node: one record per sender
IN_META_PREFIX = "in-meta."  # beside each: the sender's weight and whether it is the hub
HUB = "hub"  # sender name of the hub's aggregate
MADE_IN_ROUND = "made-in-round"  # in-meta of a stale payload: the round its sender made it
CONFIG = "config"
SERVER_ROUND = "server-round"  # in a train message's config
EVALUATE_KEY = "evaluate"  # in a train message's config: evaluate after training
METRICS = "metrics"
REJECTIONS = "rejections"  # node -> router: sender name -> why its payload was refused
RUN_KEY = "run-key"  # in every message's config: which run's checkpoints a node uses
RUN_FOLDER = "run-folder"  # with save-models, in every message's config: the run's folder
# a node's answer to the relay's description query (and its node config's keys)
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
# in-meta entries beside each sender's payload
WEIGHT = "weight"  # what the sender trained on (its examples; the hub: the total)
ORIGIN = "origin"  # ORIGIN_HUB or ORIGIN_PEER: must agree with the sender's record name
ORIGIN_HUB = "hub"
ORIGIN_PEER = "peer"


def in_payload_name(sender: int | str) -> str:
    """Record name of what a node receives from ``sender`` (a ring position or ``HUB``)."""
    return f"{IN_PAYLOAD_PREFIX}{sender}"


def in_meta_name(sender: int | str) -> str:
    """Record name of the description beside a sender's payload."""
    return f"{IN_META_PREFIX}{sender}"


def add_incoming(
    content: RecordDict,
    sender: int | str,
    payload: ArrayRecord,
    weight: float,
    made_in_round: int | None = None,
):
    """Put one sender's payload and its description into a train message's content.
    ``made_in_round``, when given, marks a stale payload with the round it was made in
    (its sender sat out since; see ``participation``): a ``made-in-round`` entry in the
    description, which the node side reads past."""
    content[in_payload_name(sender)] = payload
    origin = ORIGIN_HUB if sender == HUB else ORIGIN_PEER
    meta = ConfigRecord({WEIGHT: float(weight), ORIGIN: origin})
    if made_in_round is not None:
        meta[MADE_IN_ROUND] = int(made_in_round)
    content[in_meta_name(sender)] = meta


def content_bytes(content: RecordDict) -> int:
    """Bytes of the serialized message content (Flower's protobuf encoding): what Flower
    actually puts on the wire for it, not a back-of-the-envelope ``numel * 4``."""
    return recorddict_to_proto(content).ByteSize()


def field_bytes(size: int) -> int:
    """Bytes a length-delimited protobuf field of ``size`` bytes takes inside its parent
    (a one-byte tag, the length as a varint of 7 bits a byte, the bytes): how a record's
    size adds up into the message's without serializing the whole again."""
    return 1 + max(1, -(-size.bit_length() // 7)) + size


def reply_bytes(reply: Message) -> dict[str, int]:
    """A reply's sizes from one serialization: ``bytes_sent``, the payload alone (the
    papers' figure; 0 when it is empty), ``bytes_reply``, the whole content, and
    ``bytes_message``, the reply as Flower serializes it, metadata included (what the
    node transmits)."""
    proto = message_to_proto(reply)
    payload = next((item for item in proto.content.items if item.key == OUT_PAYLOAD), None)
    sent = 0
    if payload is not None and len(payload.array_record.items):
        sent = field_bytes(payload.ByteSize())
    return {
        "bytes_sent": sent,
        "bytes_reply": proto.content.ByteSize(),
        "bytes_message": proto.ByteSize(),
    }
