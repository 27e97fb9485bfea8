"""Robust hub reductions, from Flower's own aggregation functions (not rewritten): the
coordinate-wise median, the trimmed mean and Krum, for the methods whose hub takes the
weighted mean (``hub-reduction``). They stand in for :func:`strategies.reducers.weighted_mean`
and take the same screened contributions (:func:`strategies.reducers.reduce_screened`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.server.strategy.aggregate import aggregate_krum, aggregate_median, aggregate_trimmed_avg

from strategies.reducers import Arrays, Contribution, Reducer, check_float_keys

TRIM = 0.2  # the trimmed mean cuts this fraction at each end, per coordinate
ASSUMED_ATTACKERS = 1  # Krum's f: the hostile contributions it is built to outvote


def robust_reducer(kind: str) -> Reducer:
    """A reducer applying Flower's ``kind`` (median, trimmed-mean, krum) to every key."""

    def reduce(contributions: Sequence[Contribution], previous: Arrays | None) -> Arrays:
        keys = sorted(check_float_keys(contributions))
        results = [([c.arrays[k] for k in keys], int(c.examples)) for c in contributions]
        if kind == "median":
            arrays = aggregate_median(results)
        elif kind == "trimmed-mean":
            arrays = aggregate_trimmed_avg(results, TRIM)
        elif kind == "krum":
            arrays = aggregate_krum(results, num_malicious=ASSUMED_ATTACKERS, to_keep=0)
        else:
            raise ValueError(f"unknown robust reduction {kind!r}")
        dtypes = {k: contributions[0].arrays[k].dtype for k in keys}
        return {k: np.asarray(a).astype(dtypes[k]) for k, a in zip(keys, arrays, strict=True)}

    reduce.__name__ = f"robust_{kind.replace('-', '_')}"
    return reduce
