"""What a hub reduction sees and the one it offers every centralized method: the mean
weighted by training examples (FedAvg).

A reducer takes the round's contributions (each node's payload as numpy arrays and its
metrics) and the previous aggregate, and returns the new aggregate every node receives.
A method whose server does more than average (FedNova's step normalization, FedFed's
pooled feature sets) keeps its own reducer in its own file beside its learner, as
Flower's baselines keep a method's server and client halves together, and names it on
its ``MethodSpec``. Numpy only, so a method file can import this without Flower.
Every reducer checks what it needs (the keys, dtypes and shapes most contributions
agree on, float arrays) and raises :class:`ReductionError` naming the offending key and,
where one contribution is at fault, its partition (``partition_id``).
:func:`reduce_screened` is how the hub calls a reducer: it leaves out every contribution
that fails a check (non-finite arrays or example count, keys, dtypes or shapes that
differ from the majority's, anything the reducer refuses in it), reduces the rest as if
the bad ones had not come, and never returns a non-finite aggregate. A bad or hostile
node costs its own contribution, not the round.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Arrays = dict[str, np.ndarray]
EXAMPLES = "num-examples"  # reply metric: training examples (the weight |D_m|)


class ReductionError(ValueError):
    """Replies that cannot be reduced (different keys, integer arrays, no weight);
    ``partition_id`` names the contribution at fault where it is one."""

    def __init__(self, message: str, partition_id: int | None = None) -> None:
        super().__init__(message)
        self.partition_id = partition_id


@dataclass(frozen=True)
class Contribution:
    """One node's reply as the hub's reducer sees it."""

    partition_id: int
    arrays: Arrays
    metrics: Mapping[str, float]

    @property
    def examples(self) -> float:
        """The node's training examples: finite and positive, or a ReductionError."""
        if EXAMPLES not in self.metrics:
            raise ReductionError(
                f"partition {self.partition_id} reported no '{EXAMPLES}'", self.partition_id
            )
        value = float(self.metrics[EXAMPLES])
        if not (math.isfinite(value) and value > 0):
            raise ReductionError(
                f"partition {self.partition_id} reported '{EXAMPLES}' = {value}: a weight "
                "must be finite and positive",
                self.partition_id,
            )
        return value


Reducer = Callable[[Sequence[Contribution], Arrays | None], Arrays]


def majority(values: Sequence[tuple[int, object]]) -> object:
    """The value most contributions have (ties: the one of the lowest partition)."""
    counts: dict[object, int] = {}
    for _, value in values:
        counts[value] = counts.get(value, 0) + 1
    ordered = sorted(values, key=lambda item: (-counts[item[1]], item[0]))
    return ordered[0][1]


def check_float_keys(
    contributions: Sequence[Contribution],
    select: Callable[[str], bool] = lambda key: True,
    same_shape: bool = True,
) -> set[str]:
    """The ``select``-ed keys most contributions hold, after checking that every
    contribution holds exactly those, as floating-point arrays of the majority's dtype
    and (``same_shape``) shape. The majority, not the first reply, is the reference, so
    one bad reply is the one named, whichever position it came in."""
    if not contributions:
        return set()
    keys: frozenset[str] = majority(  # type: ignore[assignment]
        [(c.partition_id, frozenset(k for k in c.arrays if select(k))) for c in contributions]
    )
    for c in contributions:
        own = {k for k in c.arrays if select(k)}
        if own != keys:
            raise ReductionError(
                f"partition {c.partition_id} sent keys {sorted(own ^ keys)[:5]} that "
                "differ from the others'",
                c.partition_id,
            )
    for key in sorted(keys):
        dtype = majority([(c.partition_id, c.arrays[key].dtype) for c in contributions])
        shape = majority([(c.partition_id, c.arrays[key].shape) for c in contributions])
        for c in contributions:
            value = c.arrays[key]
            if not np.issubdtype(value.dtype, np.floating):
                raise ReductionError(
                    f"'{key}' from partition {c.partition_id} has dtype {value.dtype}: only "
                    "floating-point arrays are averaged (never bit-packed masks or counters)",
                    c.partition_id,
                )
            if value.dtype != dtype:
                raise ReductionError(
                    f"'{key}' from partition {c.partition_id} has dtype {value.dtype}, the "
                    f"others' is {dtype}",
                    c.partition_id,
                )
            if same_shape and value.shape != shape:
                raise ReductionError(
                    f"'{key}' from partition {c.partition_id} has shape {value.shape}, the "
                    f"others' is {shape}",
                    c.partition_id,
                )
    return set(keys)


def float_array(contribution: Contribution, key: str) -> np.ndarray:
    """``key`` of one contribution as a floating-point array, or a :class:`ReductionError`."""
    if key not in contribution.arrays:
        raise ReductionError(
            f"partition {contribution.partition_id} sent no '{key}'", contribution.partition_id
        )
    value = contribution.arrays[key]
    if not np.issubdtype(value.dtype, np.floating):
        raise ReductionError(
            f"'{key}' from partition {contribution.partition_id} has dtype {value.dtype}: "
            "only floating-point arrays are reduced",
            contribution.partition_id,
        )
    return value


def total_examples(contributions: Sequence[Contribution]) -> float:
    """The examples behind the contributions; a :class:`ReductionError` when none."""
    if not contributions:
        raise ReductionError("no replies to reduce")
    total = sum(c.examples for c in contributions)
    if total <= 0:
        raise ReductionError("the replies' examples sum to 0: nothing to weight by")
    return total


def weighted_mean(contributions: Sequence[Contribution], previous: Arrays | None = None) -> Arrays:
    """FedAvg: the mean of every array weighted by the senders' training examples,
    accumulated in the order and with the arithmetic of Flower's
    ``aggregate_arrayrecords`` (``sum_i a_i * (n_i / n)``), in each array's own dtype."""
    total = total_examples(contributions)
    keys = check_float_keys(contributions)
    out: Arrays = {}
    for c in contributions:
        factor = c.examples / total
        for key in sorted(keys):
            if key not in out:
                out[key] = c.arrays[key] * factor
            else:
                out[key] += c.arrays[key] * factor
    return {k: np.asarray(v).astype(contributions[0].arrays[k].dtype) for k, v in out.items()}


@dataclass(frozen=True)
class Reduction:
    """What the hub made of a round: the aggregate (``None``: keep the previous one),
    the examples behind it, and every left-out contribution's reason, by partition."""

    aggregate: Arrays | None
    weight: float
    refused: dict[int, str]
    error: str = ""  # why no aggregate was made, when none was


def own_fault(contribution: Contribution) -> str | None:
    """What is wrong with one contribution on its own: a weight that is not finite and
    positive, an array with NaN or inf. ``None`` when nothing is."""
    try:
        contribution.examples  # noqa: B018 - the property checks the weight
    except ReductionError as err:
        return str(err)
    for key, value in sorted(contribution.arrays.items()):
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            bad = int((~np.isfinite(value)).sum())
            return f"'{key}' from partition {contribution.partition_id} holds {bad} NaN or inf"
    return None


def all_finite(arrays: Arrays) -> bool:
    return all(np.isfinite(v).all() for v in arrays.values() if np.issubdtype(v.dtype, np.floating))


def reduce_screened(
    reducer: Reducer, contributions: Sequence[Contribution], previous: Arrays | None
) -> Reduction:
    """``reducer`` over the contributions that pass every check: each one's own
    (:func:`own_fault`), then whatever the reducer refuses in one of them (a
    :class:`ReductionError` naming its partition), each refusal leaving that contribution
    out and reducing the rest again. A failure that names no contribution, or an
    aggregate that is not finite, makes no aggregate (the hub keeps the previous one)."""
    refused: dict[int, str] = {}
    valid = []
    for c in contributions:
        fault = own_fault(c)
        if fault is None:
            valid.append(c)
        else:
            refused[c.partition_id] = fault
    while valid:
        try:
            aggregate = reducer(valid, previous)
        except ReductionError as err:
            culprit = err.partition_id
            if culprit is None or culprit not in {c.partition_id for c in valid}:
                return Reduction(None, 0.0, refused, str(err))
            refused[culprit] = str(err)
            valid = [c for c in valid if c.partition_id != culprit]
            continue
        if not all_finite(aggregate):
            return Reduction(None, 0.0, refused, "the aggregate is not finite")
        return Reduction(aggregate, sum(c.examples for c in valid), refused)
    return Reduction(None, 0.0, refused, "no valid contribution")
