"""A bad or hostile contribution costs the hub that contribution, never the round: every
reducer's input is screened (finite arrays and weight, the majority's keys, dtypes and
shapes, whatever the reducer refuses in one reply), the rest is reduced as if the bad
one had not come, and the aggregate is always finite."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from baselines.fedfed import fedfed_reduce
from baselines.fednova import MODEL, NORM_METRIC, START, UPDATE, fednova_reduce
from strategies.reducers import (
    EXAMPLES,
    Contribution,
    ReductionError,
    reduce_screened,
    weighted_mean,
)


def contribution(partition: int, values, examples: float = 10.0, **metrics) -> Contribution:
    arrays = {"w": np.asarray(values, dtype=np.float32)}
    return Contribution(partition, arrays, {EXAMPLES: examples, **metrics})


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (contribution(2, [np.nan, 1.0]), "NaN or inf"),
        (contribution(2, [np.inf, 1.0]), "NaN or inf"),
        (contribution(2, [5.0, 8.0], examples=-5), "must be finite and positive"),
        (contribution(2, [5.0, 8.0], examples=float("nan")), "must be finite and positive"),
        (contribution(2, [5.0, 8.0], examples=0), "must be finite and positive"),
        (contribution(2, [5.0, 8.0, 1.0]), "has shape (3,), the others' is (2,)"),
        (contribution(2, [5.0]), "has shape (1,), the others' is (2,)"),  # would broadcast
        (Contribution(2, {"w": np.array([5, 8])}, {EXAMPLES: 10}), "dtype int64"),
        (Contribution(2, {"v": np.ones(2, np.float32)}, {EXAMPLES: 10}), "keys ['v', 'w']"),
    ],
)
def test_one_bad_contribution_is_left_out_and_named(bad, reason):
    """Before: NaN gave a NaN aggregate, counts -5 and 10 extrapolated [1, 2] and [3, 5]
    to [5, 8], a one-element array broadcast into the mean."""
    good = [contribution(0, [1.0, 2.0]), contribution(1, [3.0, 5.0])]
    for position in (0, 2):  # first or last: the majority is the reference either way
        replies = [*good[:position], bad, *good[position:]]
        reduction = reduce_screened(weighted_mean, replies, None)
        assert list(reduction.refused) == [2] and reason in reduction.refused[2]
        np.testing.assert_array_equal(reduction.aggregate["w"], [2.0, 3.5])
        assert reduction.weight == 20.0


def test_nothing_valid_keeps_the_previous_aggregate():
    reduction = reduce_screened(weighted_mean, [contribution(0, [np.nan])], {"w": np.ones(1)})
    assert reduction.aggregate is None and reduction.refused and reduction.error


def fednova_reply(partition: int, update, start=(1.0, 1.0), a: float = 2.0) -> Contribution:
    arrays = {
        UPDATE + "w": np.asarray(update, np.float32),
        START + "w": np.asarray(start, np.float32),
    }
    return Contribution(partition, arrays, {EXAMPLES: 10.0, NORM_METRIC: a})


def test_one_nan_update_no_longer_poisons_fednova_for_the_rest_of_the_run():
    """Before: round 1 with one NaN entry gave [nan, -0.4], and round 2 with every reply
    healthy still [nan, -0.8]: each round starts from the previous aggregate."""
    round1 = [fednova_reply(0, [0.1, 0.2]), fednova_reply(1, [np.nan, 0.2])]
    first = reduce_screened(fednova_reduce, round1, None)
    assert list(first.refused) == [1]
    np.testing.assert_allclose(first.aggregate[MODEL + "w"], [0.8, 0.6])
    round2 = [fednova_reply(0, [0.1, 0.2]), fednova_reply(1, [0.1, 0.2])]
    second = reduce_screened(fednova_reduce, round2, first.aggregate)
    assert not second.refused and np.isfinite(second.aggregate[MODEL + "w"]).all()
    np.testing.assert_allclose(second.aggregate[MODEL + "w"], [0.6, 0.2])


def test_fednova_leaves_out_a_bad_norm_and_a_foreign_start_point():
    replies = [
        fednova_reply(0, [0.1, 0.2]),
        fednova_reply(1, [0.1, 0.2], a=float("nan")),
        fednova_reply(2, [0.1, 0.2], start=(9.0, 9.0)),
        fednova_reply(3, [0.1, 0.2]),
    ]
    reduction = reduce_screened(fednova_reduce, replies, None)
    assert sorted(reduction.refused) == [1, 2]
    assert "another model than the others" in reduction.refused[2]
    np.testing.assert_allclose(reduction.aggregate[MODEL + "w"], [0.8, 0.6])


def test_fedfed_pools_every_valid_share_and_leaves_out_a_torn_one():
    def share(partition: int, rows: int, label_rows: int | None = None) -> Contribution:
        arrays = {
            "classifier.w": np.ones(2, np.float32) * partition,
            "share.x": np.ones((rows, 3), np.float16),
            "share.y": np.zeros(label_rows if label_rows is not None else rows, np.float32),
        }
        return Contribution(partition, arrays, {EXAMPLES: 10.0})

    replies = [share(0, 4), share(1, 2), share(2, 5, label_rows=3), share(3, 1)]
    reduction = reduce_screened(fedfed_reduce, replies, None)
    assert list(reduction.refused) == [2] and "row counts" in reduction.refused[2]
    assert reduction.aggregate["share.x"].shape == (7, 3)
    np.testing.assert_allclose(reduction.aggregate["classifier.w"], [4 / 3, 4 / 3])


# -- the fuzz: generated contribution sets mixing valid and malformed ones -------------

SHAPE = (3,)
MALFORMATIONS = ("nan", "inf", "negative", "zero", "nan-count", "shape", "dtype", "keys")


def malformed(partition: int, kind: str, values: np.ndarray) -> Contribution:
    arrays = {"a": values.copy(), "b": values[:2].copy()}
    examples = 5.0
    if kind == "nan":
        arrays["a"][0] = np.nan
    elif kind == "inf":
        arrays["b"][1] = -np.inf
    elif kind == "negative":
        examples = -3.0
    elif kind == "zero":
        examples = 0.0
    elif kind == "nan-count":
        examples = float("nan")
    elif kind == "shape":
        arrays["a"] = np.ones(4, np.float32)
    elif kind == "dtype":
        arrays["a"] = arrays["a"].astype(np.int32)
    elif kind == "keys":
        arrays["c"] = arrays.pop("b")
    return Contribution(partition, arrays, {EXAMPLES: examples})


finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
valid_reply = st.tuples(st.lists(finite, min_size=3, max_size=3), st.integers(1, 100))


@given(
    valid=st.lists(valid_reply, min_size=2, max_size=6),
    bad=st.lists(
        st.tuples(st.sampled_from(MALFORMATIONS), st.lists(finite, min_size=3, max_size=3)),
        max_size=1,
    ),
    order=st.randoms(use_true_random=False),
)
def test_fuzz_the_aggregate_is_the_valid_contributions_alone(valid, bad, order):
    """Fewer malformed than valid replies (the majority defines the expected keys and
    shapes): never a crash, every malformed one left out, the aggregate equal to the
    aggregate of the valid ones alone, and finite."""
    good = [
        Contribution(
            i,
            {"a": np.asarray(v, np.float32), "b": np.asarray(v[:2], np.float32)},
            {EXAMPLES: float(n)},
        )
        for i, (v, n) in enumerate(valid)
    ]
    hostile = [
        malformed(len(good) + j, kind, np.asarray(v, np.float32)) for j, (kind, v) in enumerate(bad)
    ]
    replies = good + hostile
    order.shuffle(replies)
    reduction = reduce_screened(weighted_mean, replies, None)
    assert sorted(reduction.refused) == [c.partition_id for c in hostile]
    expected = weighted_mean(sorted(good, key=lambda c: replies.index(c)))
    for key, value in expected.items():
        np.testing.assert_array_equal(reduction.aggregate[key], value)
        assert np.isfinite(reduction.aggregate[key]).all()


def test_a_reducer_failure_naming_no_contribution_keeps_the_previous_aggregate():
    def refuses_all(contributions, previous):
        raise ReductionError("not today")

    reduction = reduce_screened(refuses_all, [contribution(0, [1.0])], None)
    assert reduction.aggregate is None and reduction.error == "not today"
