"""Bad input from a neighbour: every kind is refused with a reason naming the sender and
the key, nothing changes on the node, no exception escapes, and a good payload beside a
bad one is still taken. The fuzz tests generate payloads the way a buggy or hostile
neighbour (or a corrupted transfer) would."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drdfl_flwr.client_app import train
from drdfl_flwr.config import RunConfig
from drdfl_flwr.intake import take_in
from drdfl_flwr.records import decode_received, to_array_record
from drdfl_flwr.registry import build_learner
from strategies.wire import IN_META_PREFIX, IN_PAYLOAD_PREFIX, METRICS, REJECTIONS, add_incoming
from tests.test_client_app import context, train_message

CFG = RunConfig(method="drdfl", local_epochs=1)


def take_in_content(learner, content, server_round):
    """What the ClientApp does with a train message: decode, then take in."""
    incoming, undecodable = decode_received(content)
    return take_in(learner, incoming, server_round, undecodable)


def node(partition_id: int = 0):
    return build_learner(CFG, (1, 8, 8), 10, partition_id=partition_id)


def snapshot(learner) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": v.detach().clone()
        for name, module in learner.modules().items()
        if isinstance(module, torch.nn.Module)
        for k, v in module.state_dict().items()
    }


def unchanged(before: dict[str, torch.Tensor], learner) -> bool:
    after = snapshot(learner)
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def content_with(records: dict[int, ArrayRecord]) -> RecordDict:
    content = RecordDict()
    for sender, record in records.items():
        add_incoming(content, sender, record, weight=100.0)
    return content


def good_payload(partition_id: int = 1) -> dict[str, torch.Tensor]:
    return node(partition_id).shared_payload()


def with_array(key: str, array: Array) -> ArrayRecord:
    record = to_array_record(good_payload())
    record[key] = array
    return record


def pickled_object_array() -> bytes:
    """What Flower's Array refuses to build itself: a pickle on the wire."""
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buffer.getvalue()


KEY = "learngene.moments.weight"
RAW = to_array_record(good_payload())[KEY]


def scaled(factor: float, key: str = KEY) -> dict:
    payload = good_payload()
    payload[key] = payload[key] * factor
    return payload


BAD = {
    "garbage bytes": with_array(KEY, Array("float32", RAW.shape, RAW.stype, b"\x00garbage")),
    "truncated bytes": with_array(KEY, Array("float32", RAW.shape, RAW.stype, RAW.data[:-9])),
    "header shape lies": with_array(KEY, Array("float32", (3, 3), RAW.stype, RAW.data)),
    "unknown storage type": with_array(KEY, Array("float32", RAW.shape, "nonsense", RAW.data)),
    "object dtype": with_array(KEY, Array("object", (1,), RAW.stype, pickled_object_array())),
    "complex dtype": with_array(KEY, Array(np.zeros(RAW.shape, np.complex64))),
    "NaN": to_array_record(scaled(float("nan"))),
    "a Learngene of 1e30": to_array_record(scaled(1e30)),
    "non-positive variance": to_array_record(scaled(-1.0, "stats.var")),
    "missing key": ArrayRecord(
        {k: v for k, v in to_array_record(good_payload()).items() if k != KEY}
    ),
    "wrong shape": with_array(KEY, Array(np.zeros((2, 2), np.float32))),
}


# round 1: a fresh node absorbs; round 2: a fresh node joins a running ring (Algorithm 2)
ROUNDS = {"absorb": 1, "join": 2}


@pytest.mark.parametrize("path", ROUNDS)
@pytest.mark.parametrize("kind", BAD, ids=list(BAD))
def test_bad_payload_is_refused_naming_sender_and_key_and_changes_nothing(kind, path):
    learner = node()
    before = snapshot(learner)
    intake = take_in_content(learner, content_with({4: BAD[kind]}), ROUNDS[path])
    assert intake.accepted == [] and list(intake.rejections) == ["4"]
    reason = intake.rejections["4"]
    key = "stats.var" if kind == "non-positive variance" else KEY
    assert key in reason, reason
    assert unchanged(before, learner)


@pytest.mark.parametrize("path", ROUNDS)
def test_a_good_payload_beside_a_bad_one_is_still_taken(path):
    learner = node()
    before = snapshot(learner)
    content = content_with({3: BAD["NaN"], 4: to_array_record(good_payload())})
    intake = take_in_content(learner, content, ROUNDS[path])
    assert [i.sender for i in intake.accepted] == [4] and list(intake.rejections) == ["3"]
    assert not unchanged(before, learner)  # the good one was absorbed


def test_the_reason_goes_back_in_the_reply_and_the_node_trains_on():
    ctx = context()
    bad = good_payload()
    bad["stats.var"] = -bad["stats.var"]
    reply = train(train_message({2: bad}), ctx)
    reasons = dict(reply.content.config_records[REJECTIONS])
    assert list(reasons) == ["2"] and "stats.var" in reasons["2"]
    metrics = reply.content[METRICS]
    assert metrics["payloads_rejected"] == 1.0 and "l_rec" in metrics


# -- fuzzing -------------------------------------------------------------------------------

REFERENCE = good_payload()
KEYS = sorted(REFERENCE)


@st.composite
def hostile_array(draw, key: str) -> Array:
    """One array as a bad neighbour might send it: broken bytes, a lying header, odd
    dtypes and shapes, non-finite or absurd values, or (rarely) an honest one."""
    ref = REFERENCE[key].numpy()
    kind = draw(
        st.sampled_from(["bytes", "header", "dtype", "shape", "values", "scale", "stype", "honest"])
    )
    if kind == "bytes":
        honest = Array(ref)
        data = draw(
            st.one_of(
                st.binary(max_size=64),
                st.just(honest.data[: draw(st.integers(0, len(honest.data)))]),
            )
        )
        return Array(honest.dtype, honest.shape, honest.stype, data)
    if kind == "header":
        honest = Array(ref)
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        dtype = draw(st.sampled_from(["float32", "float64", "int64", "uint8", "bool", "<U3", "x"]))
        return Array(dtype, shape, honest.stype, honest.data)
    if kind == "dtype":
        dtype = draw(st.sampled_from([np.int64, np.uint8, np.bool_, np.float16, np.complex64]))
        return Array(np.zeros(ref.shape, dtype))
    if kind == "shape":
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        return Array(np.zeros(shape, np.float32))
    if kind == "values":
        value = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        values = ref.copy()
        values.flat[draw(st.integers(0, values.size - 1))] = value
        return Array(values)
    if kind == "scale":
        exponent = draw(st.integers(-40, 38))
        sign = draw(st.sampled_from([1.0, -1.0]))
        return Array((ref * sign * np.float32(10.0) ** exponent).astype(np.float32))
    if kind == "stype":
        honest = Array(ref)
        return Array(honest.dtype, honest.shape, draw(st.text(max_size=8)), honest.data)
    return Array(ref.copy())


@st.composite
def hostile_content(draw) -> RecordDict:
    content = RecordDict()
    for sender in draw(st.lists(st.integers(0, 9), min_size=1, max_size=2, unique=True)):
        keys = draw(st.lists(st.sampled_from(KEYS), min_size=0, max_size=3, unique=True))
        record = ArrayRecord({k: Array(REFERENCE[k].numpy().copy()) for k in KEYS})
        for key in keys:
            record[key] = draw(hostile_array(key))
        if draw(st.booleans()) and keys:
            del record[keys[0]]
        if draw(st.integers(0, 9)) == 0:
            record[draw(st.text(min_size=1, max_size=6))] = Array(np.zeros(1, np.float32))
        content[f"{IN_PAYLOAD_PREFIX}{sender}"] = record
        weight = draw(st.sampled_from([100.0, 0.0, -1.0, math.nan, math.inf]))
        content[f"{IN_META_PREFIX}{sender}"] = ConfigRecord({"weight": weight, "origin": "peer"})
    return content


FUZZ_LEARNER = node()


def check_intake_survives(content: RecordDict, server_round: int) -> None:
    """No exception escapes; refused everything -> nothing changed; whatever was taken
    leaves the node finite. Round 1 fuzzes absorb, round 2 join (the node is fresh)."""
    learner = FUZZ_LEARNER
    before = snapshot(learner)
    intake = take_in_content(learner, content, server_round)
    senders = {k.removeprefix(IN_PAYLOAD_PREFIX) for k in content.array_records}
    assert set(intake.rejections) | {str(i.sender) for i in intake.accepted} == senders
    if not intake.accepted:
        assert unchanged(before, learner)
    assert all(torch.isfinite(v).all() for v in snapshot(learner).values() if v.is_floating_point())
    if intake.accepted:  # put it back, so every example starts from the same node
        for name, module in learner.modules().items():
            if isinstance(module, torch.nn.Module):
                module.load_state_dict(
                    {
                        k.removeprefix(f"{name}."): v
                        for k, v in before.items()
                        if k.startswith(f"{name}.")
                    }
                )


def fuzz(examples: int | None = None) -> settings:
    """Derandomized, no deadline; ``examples`` or, when None, the loaded profile's
    ``max_examples`` (50 in the fast tier, 400 otherwise: tests/conftest.py)."""
    size = {} if examples is None else {"max_examples": examples}
    return settings(
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
        **size,
    )


@fuzz()
@given(hostile_content(), st.sampled_from(list(ROUNDS.values())))
def test_fuzzed_payloads_never_crash_or_change_a_node(content, server_round):
    check_intake_survives(content, server_round)


@pytest.mark.slow
@fuzz(10_000)
@given(hostile_content(), st.sampled_from(list(ROUNDS.values())))
def test_fuzzed_payloads_never_crash_or_change_a_node_10k(content, server_round):
    check_intake_survives(content, server_round)
