"""What a hub reduction sees and the one it offers every centralized method: the mean
weighted by training examples (FedAvg).

A reducer takes the round's contributions (each node's payload as numpy arrays and its
metrics) and the previous aggregate, and returns the new aggregate every node receives.
A method whose server does more than average (FedNova's step normalization, FedFed's
pooled feature sets) keeps its own reducer in its own file beside its learner, as
Flower's baselines keep a method's server and client halves together, and names it on
its ``MethodSpec``. Numpy only, so a method file can import this without Flower.
Every reducer checks what it needs (same keys, float arrays) and raises
:class:`ReductionError` naming the offending key, so a bad reply fails the round's
reduction loudly instead of producing a silently wrong average.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Arrays = dict[str, np.ndarray]
EXAMPLES = "num-examples"  # reply metric: training examples (the weight |D_m|)


class ReductionError(ValueError):
    """Replies that cannot be reduced (different keys, integer arrays, no weight)."""


@dataclass(frozen=True)
class Contribution:
    """One node's reply as the hub's reducer sees it."""

    partition_id: int
    arrays: Arrays
    metrics: Mapping[str, float]

    @property
    def examples(self) -> float:
        if EXAMPLES not in self.metrics:
            raise ReductionError(f"partition {self.partition_id} reported no '{EXAMPLES}'")
        return float(self.metrics[EXAMPLES])


Reducer = Callable[[Sequence[Contribution], Arrays | None], Arrays]


def check_float_keys(
    contributions: Sequence[Contribution],
    keys: set[str],
    select: Callable[[str], bool] = lambda key: True,
) -> None:
    """Every contribution holds exactly ``keys`` among its ``select``-ed keys (all by
    default), as floating-point arrays."""
    for c in contributions:
        own = {k for k in c.arrays if select(k)}
        if own != keys:
            raise ReductionError(
                f"partition {c.partition_id} sent keys {sorted(own ^ keys)[:5]} that "
                "differ from the others'"
            )
        for key in keys:
            dtype = c.arrays[key].dtype
            if not np.issubdtype(dtype, np.floating):
                raise ReductionError(
                    f"'{key}' from partition {c.partition_id} has dtype {dtype}: only "
                    "floating-point arrays are averaged (never bit-packed masks or counters)"
                )


def float_array(contribution: Contribution, key: str) -> np.ndarray:
    """``key`` of one contribution as a floating-point array, or a :class:`ReductionError`."""
    if key not in contribution.arrays:
        raise ReductionError(f"partition {contribution.partition_id} sent no '{key}'")
    value = contribution.arrays[key]
    if not np.issubdtype(value.dtype, np.floating):
        raise ReductionError(
            f"'{key}' from partition {contribution.partition_id} has dtype {value.dtype}: "
            "only floating-point arrays are reduced"
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
    keys = set(contributions[0].arrays) if contributions else set()
    total = total_examples(contributions)
    check_float_keys(contributions, keys)
    out: Arrays = {}
    for c in contributions:
        factor = c.examples / total
        for key in sorted(keys):
            if key not in out:
                out[key] = c.arrays[key] * factor
            else:
                out[key] += c.arrays[key] * factor
    return {k: np.asarray(v).astype(contributions[0].arrays[k].dtype) for k, v in out.items()}
